"""The Triton neighbor-list path, interpreted on CPU tensors, against the float64 reference.

TRITON_INTERPRET=1 is set by tests/conftest.py. The interpreter costs ~0.1-0.5 ms per Triton
operation whatever the block size, so systems stay at a few dozen atoms and a few bins.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import fastff
from fastff.kernels import gpu_binning
from fastff.kernels.neighbors import gpu_triton, reference
from fastff.kernels.neighbors import op as nop
from fastff.testing import assert_same_pairs, tolerance

DTYPES = [torch.float32, torch.float64]


def _random_cell(rng, lengths, skew, dtype):
    """Rows: lattice vectors of about the given lengths, with off-diagonal parts up to skew."""
    cell = torch.diag(torch.tensor(lengths, dtype=torch.float64))
    cell += torch.tensor(rng.uniform(-skew, skew, size=(3, 3))) * torch.tril(torch.ones(3, 3), -1)
    return cell.to(dtype)


def _check(positions, cutoff, cell=None, pbc=None, batch=None, half=False):
    """Build with triton and reference; compare pair sets, distances and the CSR structure."""
    dtype = positions.dtype
    nl = fastff.neighbor_list(positions, cutoff, cell, pbc, batch, half=half, backend="triton")
    pos64 = positions.double()
    cell64 = None if cell is None else cell.double()
    ref = fastff.neighbor_list(pos64, cutoff, cell64, pbc, batch, half=half, backend="reference")
    assert nl.backend == "triton"
    assert nl.i.dtype == torch.int64 and nl.j.dtype == torch.int64
    assert nl.shifts.dtype == torch.int32 and nl.shifts.shape == (len(nl), 3)
    assert nl.ptr.dtype == torch.int64 and nl.ptr.shape == (positions.shape[0] + 1,)
    assert bool((nl.i[1:] >= nl.i[:-1]).all())
    counts = torch.bincount(nl.i, minlength=positions.shape[0])
    assert torch.equal(nl.ptr[1:] - nl.ptr[:-1], counts) and int(nl.ptr[0]) == 0
    kernel_distances = nl.distances(positions)  # the distances written by the fill pass
    assert kernel_distances.dtype == dtype
    assert_same_pairs((nl.i, nl.j, nl.shifts), (ref.i, ref.j, ref.shifts), cutoff=cutoff,
                      dtype=dtype, actual_distances=kernel_distances,
                      expected_distances=ref.distances(pos64))
    # Shifts are consistent with the positions as given: recompute r_ij in float64.
    cells64 = nl._cells.double()
    system = None if batch is None else batch
    vec = reference.pair_vectors(pos64, cells64, system, nl.i, nl.j, nl.shifts)
    torch.testing.assert_close(kernel_distances.double(), vec.norm(dim=1),
                               **tolerance("distances", dtype))
    if len(nl):
        assert float(kernel_distances.max()) < cutoff * (1 + 1e-5)
        if batch is not None:
            assert torch.equal(batch[nl.i], batch[nl.j])  # never a pair across systems
    return nl, ref


@pytest.mark.parametrize("n", [0, 1, 2, 3])
@pytest.mark.parametrize("half", [False, True])
def test_tiny_systems(rng, n, half):
    # Cell edges ~2.2-2.8 with cutoff 3: one bin, reach 2 per axis, the atoms' own images.
    cell = _random_cell(rng, rng.uniform(2.2, 2.8, size=3), 0.3, torch.float64)
    positions = torch.rand(n, 3, dtype=torch.float64) @ cell
    nl, ref = _check(positions, 3.0, cell, half=half)
    assert len(nl) == len(ref)
    if n == 1:
        assert len(nl) > 0 and bool((nl.i == nl.j).all())  # only self-images


@pytest.mark.parametrize(("dtype", "half"), [(torch.float32, False), (torch.float64, True)])
def test_random_periodic_cubic(rng, dtype, half):
    box = float(rng.uniform(5.2, 6.0))
    positions = (torch.rand(24, 3, dtype=torch.float64) * box).to(dtype)
    cell = torch.eye(3, dtype=dtype) * box
    nl, _ = _check(positions, 2.6, cell, half=half)  # 2 x 2 x 2 bins, reach 1
    if dtype == torch.float32 and not half:  # deterministic, order included (once: slow)
        again = fastff.neighbor_list(positions, 2.6, cell, half=half, backend="triton")
        for name in ("i", "j", "shifts", "ptr"):
            assert torch.equal(getattr(nl, name), getattr(again, name))
        assert torch.equal(nl.distances(positions), again.distances(positions))
    if not half:
        rev = nl.reverse
        expected = reference.neighbor_reverse(nl.i, nl.j, nl.shifts, nl.ptr)
        assert torch.equal(rev, expected)
        assert torch.equal(nl.i[rev], nl.j) and torch.equal(nl.j[rev], nl.i)
        assert torch.equal(nl.shifts[rev], -nl.shifts)


@pytest.mark.parametrize("half", [False, True])
def test_triclinic_cell_smaller_than_cutoff(rng, half):
    cell = _random_cell(rng, rng.uniform(1.6, 2.2, size=3), 0.8, torch.float64)
    positions = torch.rand(4, 3, dtype=torch.float64) @ cell
    nl, _ = _check(positions, 2.9, cell, half=half)
    assert bool((nl.i == nl.j).any())  # an atom sees its own images


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_pbc_zero_row(rng, dtype):
    cell = _random_cell(rng, rng.uniform(4.5, 5.5, size=3), 0.5, torch.float64)
    cell[2] = 0.0  # the non-periodic row may be zero
    positions = torch.rand(20, 3, dtype=torch.float64) @ cell
    positions[:, 2] = torch.rand(20, dtype=torch.float64) * 7.0 - 1.0
    nl, _ = _check(positions.to(dtype), 2.5, cell.to(dtype), pbc=[True, True, False])
    assert bool((nl.shifts[:, 2] == 0).all())


def test_no_cell(rng):
    positions = torch.rand(20, 3, dtype=torch.float64) * 6.0 - 2.0
    nl, _ = _check(positions, 2.5)
    assert bool((nl.shifts == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_positions_outside_cell(rng, dtype):
    cell = _random_cell(rng, rng.uniform(4.0, 4.5, size=3), 1.0, torch.float64)
    inside = torch.rand(12, 3, dtype=torch.float64) @ cell
    images = torch.randint(-3, 4, (12, 3)).double()
    positions = (inside + images @ cell).to(dtype)
    nl, _ = _check(positions, 2.2, cell.to(dtype), half=bool(rng.integers(2)))
    assert bool((nl.shifts != 0).any())  # shifts follow the unwrapped positions


@pytest.mark.parametrize("half", [False, True])
def test_batch_of_three(rng, half):
    sizes = [8, 10, 6]
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    cells = torch.stack([_random_cell(rng, rng.uniform(3.5, 4.0, size=3), 0.5, torch.float64)
                         for _ in range(3)])
    cells[1, 2] = 0.0
    pbc = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    positions = torch.cat([torch.rand(n, 3, dtype=torch.float64) @ cells[s]
                           for s, n in enumerate(sizes)])
    nl, _ = _check(positions, 2.4, cells, pbc=pbc, batch=batch, half=half)
    assert set(batch[nl.i].tolist()) == {0, 1, 2}


def test_sparse_system_gets_few_bins(rng):
    # 12 atoms over ~1000 A with a 2 A cutoff would be 500^3 bins uncapped; a cluster of 6
    # gives pairs to compare.
    positions = torch.rand(12, 3, dtype=torch.float64) * 1000.0
    positions[6:] = positions[0] + torch.rand(6, 3, dtype=torch.float64) * 2.0
    nl, _ = _check(positions, 2.0)
    assert len(nl) > 0
    bins = gpu_binning.bin_atoms(positions, torch.zeros(1, 3, 3, dtype=torch.float64),
                                 torch.zeros(1, 3, dtype=torch.int32), torch.tensor([0, 12]),
                                 torch.zeros(12, dtype=torch.int64),
                                 torch.full((3,), 2.0, dtype=torch.float64))
    assert 1 <= int(bins.sys_bin_offset[-1]) <= 12


def test_box_an_exact_multiple_of_the_cutoff(rng):
    # box / cutoff = 2 exactly: rounding in float32 binning must not lose pairs at the edges.
    positions = torch.rand(16, 3, dtype=torch.float32) * 10.0
    positions[:4] = torch.tensor([[0.0, 0.0, 0.0], [4.9999, 0.0, 0.0], [9.9999, 0.0, 0.0],
                                  [5.0, 5.0, 5.0]])
    _check(positions, 5.0, torch.eye(3) * 10.0, half=bool(rng.integers(2)))


def test_empty_system_in_batch(rng):
    batch = torch.tensor([0, 0, 0, 2, 2, 2])  # system 1 has no atoms
    cells = torch.eye(3, dtype=torch.float64).expand(3, 3, 3) * 3.0
    positions = torch.rand(6, 3, dtype=torch.float64) * 3.0
    _check(positions, 1.7, cells.contiguous(), batch=batch)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_positions_without_checks_stay_in_bounds(rng):
    positions = torch.rand(10, 3, dtype=torch.float64) * 4.0
    positions[3] = float("nan")
    positions[5, 1] = float("inf")
    cell = torch.eye(3, dtype=torch.float64) * 4.0
    with fastff.no_checks():
        nl = fastff.neighbor_list(positions, 1.9, cell, backend="triton")
    assert bool(((nl.j >= 0) & (nl.j < 10)).all())
    assert int(nl.ptr[-1]) == len(nl)
    with pytest.raises(ValueError, match="positions"):
        fastff.neighbor_list(positions, 1.9, cell, backend="triton")


def test_memory_estimate_before_allocation(rng, monkeypatch):
    # one free page: a homogeneous box is refused by the density estimate before any pass
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else 4096)
    cell = torch.eye(3, dtype=torch.float64) * 3.0
    with pytest.raises(MemoryError, match=r"cutoff 1.9 would give about .* pairs"):
        fastff.neighbor_list(torch.rand(50, 3, dtype=torch.float64) * 3.0, 1.9, cell,
                             backend="triton")
    # a cluster in a large cell: the estimate fits, the kernel's exact count does not
    with pytest.raises(MemoryError, match="the neighbor list would need"):
        fastff.neighbor_list(torch.rand(50, 3, dtype=torch.float64) * 0.5, 1.9, cell * 6.0,
                             backend="triton")


def _with_backend(nl, backend):
    other = copy.copy(nl)
    other.backend = backend
    return other


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batched", [False, True])
def test_vectors_and_gradients(rng, dtype, batched):
    n = 14
    cell = _random_cell(rng, rng.uniform(3.5, 4.0, size=3), 0.5, torch.float64)
    if batched:
        batch = torch.repeat_interleave(torch.arange(2), torch.tensor([9, 5]))
        cells = torch.stack([cell, cell * 1.1])
        positions = torch.cat([torch.rand(9, 3, dtype=torch.float64) @ cells[0],
                               torch.rand(5, 3, dtype=torch.float64) @ cells[1]])
    else:
        batch, cells = None, cell
        positions = torch.rand(n, 3, dtype=torch.float64) @ cell
    positions, cells = positions.to(dtype), cells.to(dtype)
    nl = fastff.neighbor_list(positions, 2.0, cells, batch=batch, backend="triton")
    assert len(nl) > 0
    weights = torch.randn(len(nl), 3, dtype=dtype)
    results = {}
    for backend in ("triton", "reference"):
        x = positions.clone().requires_grad_(True)
        c = cells.clone().requires_grad_(True)
        vec = _with_backend(nl, backend).vectors(x, c)
        ((vec * weights).sum() + vec.norm(dim=1).sum()).backward()
        results[backend] = (vec.detach(), x.grad, c.grad)
    for got, want in zip(results["triton"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, **tolerance("vectors", dtype))


@pytest.mark.parametrize("batched", [False, True])
def test_gradcheck_and_gradgradcheck(rng, batched):
    cell = _random_cell(rng, [2.5, 2.6, 2.7], 0.3, torch.float64)
    if batched:
        batch = torch.tensor([0, 0, 0, 1, 1])
        cells = torch.stack([cell, cell * 0.9])
        positions = torch.cat([torch.rand(3, 3, dtype=torch.float64) @ cells[0],
                               torch.rand(2, 3, dtype=torch.float64) @ cells[1]])
    else:
        batch, cells = None, cell
        positions = torch.rand(4, 3, dtype=torch.float64) @ cell
    nl = fastff.neighbor_list(positions, 1.6, cells, batch=batch, backend="triton")
    assert len(nl) > 0

    def distances(x, c):
        return nl.distances(x, c)

    inputs = (positions.clone().requires_grad_(True), cells.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(distances, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(distances, inputs, fast_mode=True)
    assert torch.autograd.gradcheck(nl.vectors, inputs, fast_mode=True)


def test_opcheck_triton_ops(rng):
    cell = torch.eye(3, dtype=torch.float64) * 3.0
    positions = torch.rand(5, 3, dtype=torch.float64) * 3.0
    nl = fastff.neighbor_list(positions, 1.8, cell, backend="triton")
    cells = cell.unsqueeze(0)
    args = (positions.requires_grad_(True), cells, None, nl.i, nl.j, nl.shifts, "triton")
    torch.library.opcheck(nop.pair_vectors, args)
    grad = torch.randn(len(nl), 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(nop.pair_vectors_transpose,
                          (grad, 5, cells, None, nl.i, nl.j, nl.shifts, "triton"))
    torch.library.opcheck(nop.neighbor_reverse, (nl.i, nl.j, nl.shifts, nl.ptr, "triton"))


def test_reverse_marks_missing_mirrors(rng):
    # A half list has no mirrors: the launcher must say so with -1, never point elsewhere.
    positions = torch.rand(8, 3, dtype=torch.float64) * 3.0
    cell = torch.eye(3, dtype=torch.float64) * 3.0
    nl = fastff.neighbor_list(positions, 1.8, cell, half=True, backend="triton")
    rev = gpu_triton.neighbor_reverse(nl.i, nl.j, nl.shifts, nl.ptr)
    assert torch.equal(rev, reference.neighbor_reverse(nl.i, nl.j, nl.shifts, nl.ptr))
    assert bool((rev == -1).all())


def test_unsupported_dtype_names_the_argument():
    positions = torch.rand(4, 3, dtype=torch.float16)
    with pytest.raises(TypeError, match="positions must be float32 or float64"):
        fastff.neighbor_list(positions, 1.0, backend="triton")
    with pytest.raises(TypeError, match="grad must be float32 or float64"):
        gpu_triton.pair_vectors_transpose(torch.zeros(1, 3, dtype=torch.float16), 2,
                                          torch.zeros(1, 3, 3, dtype=torch.float16), None,
                                          torch.zeros(1, dtype=torch.int64),
                                          torch.ones(1, dtype=torch.int64),
                                          torch.zeros(1, 3, dtype=torch.int32))
