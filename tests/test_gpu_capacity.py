"""Capacity-mode neighbor lists and sync-free Verlet lists on the Triton path.

Interpreted on CPU tensors (compiled on a GPU, see tests/conftest.py): the same kernels, the
same route as CUDA, so the host-synchronisation counts speak for the GPU. Systems stay at a few
dozen atoms (the interpreter costs ~0.1-0.5 ms per Triton operation).
"""

from __future__ import annotations

import pytest
import torch

import fastff
from fastff.kernels._runtime import status as status_bits
from fastff.kernels.neighbors import op as nop
from fastff.testing import assert_same_pairs, count_host_syncs
from fastff.verlet import VerletList


def _system(rng, n=24, box=5.0, dtype=torch.float64):
    positions = torch.as_tensor(rng.uniform(0.0, box, (n, 3))).to(dtype)
    return positions, torch.eye(3, dtype=dtype) * box


def _exact_pairs(nl):
    c = nl.compacted()
    return c.i, c.j, c.shifts


@pytest.mark.parametrize("half", [False, True])
def test_capacity_list_is_the_exact_list_then_padding(rng, half):
    positions, cell = _system(rng)
    exact = fastff.neighbor_list(positions, 2.0, cell, half=half, backend="triton")
    capacity = len(exact) + 17
    nl = fastff.neighbor_list(positions, 2.0, cell, half=half, backend="triton",
                              capacity=capacity)
    assert nl.capacity == capacity and len(nl) == capacity
    assert int(nl.count) == len(exact) and nl.status.tolist() == [0, 1]
    for name in ("i", "j", "shifts"):  # same pairs in the same (deterministic) order
        assert torch.equal(getattr(nl, name)[:len(exact)], getattr(exact, name))
    assert torch.equal(nl.ptr, exact.ptr)
    n = positions.shape[0]
    assert bool((nl.i[len(exact):] == n).all()) and bool((nl.j[len(exact):] == n).all())
    assert bool((nl.shifts[len(exact):] == 0).all())
    nl.check()
    compact = nl.compacted()
    assert torch.equal(compact.i, exact.i) and compact.status is None
    for method in (lambda: nl.vectors(positions), lambda: nl.distances(positions),
                   lambda: nl.within(positions, 1.0)):
        with pytest.raises(ValueError, match="capacity mode"):
            method()


def test_overflow_is_flagged_never_silent(rng):
    positions, cell = _system(rng)
    exact = fastff.neighbor_list(positions, 2.0, cell, backend="triton")
    nl = fastff.neighbor_list(positions, 2.0, cell, backend="triton", capacity=len(exact) // 2)
    assert int(nl.status[0]) & status_bits.OVERFLOW
    assert int(nl.count) == len(exact)  # ptr counts every pair; only the slots were short
    assert torch.equal(nl.i, exact.i[:len(exact) // 2])
    with pytest.raises(RuntimeError, match=rf"overflow \({len(exact)} pairs for"):
        nl.check()
    with pytest.raises(RuntimeError, match="overflow"):
        nl.compacted()
    energy = torch.ones((), dtype=torch.float64)
    assert torch.isnan(fastff.neighbors.poison_invalid(energy, nl.status))


@pytest.mark.parametrize("half", [False, True])
def test_ops_match_the_reference(rng, half):
    """verlet_check and neighbor_list_into: Triton against the torch reference, step by step."""
    positions, cell = _system(rng, n=16, box=4.0)
    cells = cell.unsqueeze(0)
    pbc = torch.ones(1, 3, dtype=torch.bool)
    system_ptr = torch.tensor([0, 16])
    out = {}
    for backend in ("triton", "reference"):
        buffers = fastff.neighbors.CapacityBuffers(16, 300, positions, cells)
        buffers.status[0] = status_bits.REBUILD
        steps = []
        x = positions.clone()
        for shift in (0.0, 0.05, 0.5):  # built, kept, rebuilt
            x = x + shift
            nop.verlet_check(x, cells, buffers.reference, buffers.ref_cells, 0.4,
                             buffers.status, backend)
            if shift == 0.0:
                buffers.status[0] = status_bits.REBUILD
            nop.neighbor_list_into(x, 1.9, cells, pbc, system_ptr, half, buffers.status,
                                   buffers.reference, buffers.ref_cells, buffers.i, buffers.j,
                                   buffers.shifts, buffers.ptr, buffers.distances, backend)
            steps.append([t.clone() for t in (buffers.status, buffers.ptr, buffers.reference)])
            count = int(buffers.ptr[-1])
            steps[-1].append((buffers.i[:count], buffers.j[:count], buffers.shifts[:count]))
        out[backend] = steps
    for got, want in zip(out["triton"], out["reference"], strict=True):
        assert torch.equal(got[0], want[0])  # flags and rebuild counts
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        assert_same_pairs(got[3], want[3], cutoff=1.9, dtype=torch.float64)
    assert [int(s[0][1]) for s in out["triton"]] == [1, 1, 2]


def test_ops_register(rng):
    positions, cell = _system(rng, n=6, box=3.0)
    cells = cell.unsqueeze(0)
    buffers = fastff.neighbors.CapacityBuffers(6, 60, positions, cells)
    buffers.status[0] = status_bits.REBUILD
    torch.library.opcheck(nop.verlet_check, (positions, cells, buffers.reference,
                                             buffers.ref_cells, 0.4, buffers.status, "triton"))
    torch.library.opcheck(nop.neighbor_list_into,
                          (positions, 1.4, cells, torch.ones(1, 3, dtype=torch.bool),
                           torch.tensor([0, 6]), False, buffers.status, buffers.reference,
                           buffers.ref_cells, buffers.i, buffers.j, buffers.shifts,
                           buffers.ptr, buffers.distances, "triton"))


def test_verlet_steps_are_sync_free(rng):
    """Steps that keep the list and steps whose device check rebuilds it: no host
    synchronisation in either, and the list stays the exact list."""
    positions, cell = _system(rng, n=20, box=4.5)
    vl = VerletList(1.5, 0.4, backend="triton", capacity="auto")
    nl = vl.update(positions, cell)
    vl.update(positions, cell)  # the first steady step fills the device constants' cache
    counts = []
    for kick in (0.02, 0.02, 0.6, 0.02):  # the third rebuilds (moved > skin / 2)
        positions = positions + kick * torch.randn_like(positions)
        with count_host_syncs() as syncs:
            assert vl.update(positions, cell) is nl
        counts.append(int(syncs))
        assert int(syncs) == 0, syncs.report()
        listed = set(zip(*(t.tolist() for t in _exact_pairs(nl)[:2]),
                         map(tuple, _exact_pairs(nl)[2].tolist()), strict=True))
        within = fastff.neighbor_list(positions, 1.5, cell, backend="reference")
        assert set(zip(within.i.tolist(), within.j.tolist(), map(tuple, within.shifts.tolist()),
                       strict=True)) <= listed  # every pair within the cutoff is listed
        if kick > 0.5:  # rebuilt on the device: the list at these positions
            ref = fastff.neighbor_list(positions, 1.9, cell, backend="reference")
            assert_same_pairs(_exact_pairs(nl), (ref.i, ref.j, ref.shifts), cutoff=1.9,
                              dtype=torch.float64)
    assert vl.rebuilds == 2 and vl.steps == 6


def test_verlet_overflow_raises_at_the_next_step_and_grows(rng):
    positions, cell = _system(rng, n=20, box=4.5)
    vl = VerletList(1.5, 0.4, backend="triton", capacity=10)
    vl.update(positions, cell)
    with pytest.raises(RuntimeError, match="overflow"):
        vl.update(positions, cell)
        vl.update(positions, cell)
    nl = vl.update(positions, cell)  # rebuilt by the host into larger buffers
    assert nl.capacity > 10 and nl.status.tolist()[0] == 0
    nl.check()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nonfinite_positions_are_flagged_in_steady_steps(rng):
    positions, cell = _system(rng, n=12, box=4.0)
    vl = VerletList(1.5, 0.4, backend="triton", capacity="auto")
    vl.update(positions, cell)
    bad = positions.clone()
    bad[3, 1] = float("nan")
    nl = vl.update(bad, cell)  # no value check on the host: the device flags it
    assert int(nl.status[0]) & status_bits.NONFINITE
    with pytest.raises(RuntimeError, match="non-finite"):
        vl.check()
