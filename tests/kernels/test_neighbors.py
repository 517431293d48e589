"""Neighbor lists: every CPU backend against the float64 brute force, and the brute force
against ASE and vesin. Fresh random systems each run (the `rng` fixture prints its seed)."""

import numpy as np
import pytest
import torch

import fastff
from fastff.testing import assert_same_pairs

BACKENDS = ["numba", "reference"]


def random_cell(rng, edge, skew=0.3, dtype=torch.float64):
    """A triclinic cell with rows of length ~edge, lower-triangular with random tilts."""
    cell = np.diag(edge * (1 + 0.2 * rng.random(3)))
    cell[1, 0], cell[2, 0], cell[2, 1] = skew * edge * (rng.random(3) - 0.5) * 2
    return torch.tensor(cell, dtype=dtype)


def random_positions(rng, n, cell, spread=1.0, dtype=torch.float64):
    """Positions inside (spread=1) or around (spread>1) the cell."""
    frac = (rng.random((n, 3)) - 0.5) * spread + 0.5
    return torch.tensor(frac, dtype=dtype) @ cell.to(dtype)


def check_against_reference(positions, cutoff, cell=None, pbc=None, batch=None, *, half=False,
                            backend="numba"):
    nl = fastff.neighbor_list(positions, cutoff, cell, pbc, batch, half=half, backend=backend)
    ref = fastff.neighbor_list(positions.double(), cutoff,
                               None if cell is None else cell.double(), pbc, batch, half=half,
                               backend="reference")
    assert_same_pairs((nl.i, nl.j, nl.shifts), (ref.i, ref.j, ref.shifts), cutoff=cutoff,
                      dtype=positions.dtype, actual_distances=nl.distances(positions),
                      expected_distances=ref.distances(positions.double()))
    check_structure(nl, positions, cell)
    return nl, ref


def check_structure(nl, positions, cell):
    n = positions.shape[0]
    assert nl.i.dtype == nl.j.dtype == nl.ptr.dtype == torch.int64
    assert nl.shifts.dtype == torch.int32 and nl.shifts.shape == (len(nl), 3)
    assert nl.ptr.shape == (n + 1,) and int(nl.ptr[-1]) == len(nl)
    assert bool((nl.i[1:] >= nl.i[:-1]).all()), "pairs must be sorted by i"
    counts = torch.bincount(nl.i, minlength=n)
    assert torch.equal(nl.ptr[1:] - nl.ptr[:-1], counts)
    # distances returned by the kernel equal those recomputed from positions and shifts
    recomputed = torch.linalg.vector_norm(nl.vectors(positions, cell), dim=1)
    torch.testing.assert_close(nl.distances(positions), recomputed,
                               **fastff.testing.tolerance("distances", positions.dtype))
    assert bool((recomputed < nl.cutoff * (1 + 1e-5)).all())
    if not nl.half and len(nl):
        r = nl.reverse
        assert bool((r >= 0).all()), "every pair of a full list has a mirror"
        assert torch.equal(nl.i[r], nl.j) and torch.equal(nl.j[r], nl.i)
        assert torch.equal(nl.shifts[r], -nl.shifts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_tiny_systems(rng, backend, half, n):
    cell = random_cell(rng, 3.0)
    pos = random_positions(rng, n, cell)
    check_against_reference(pos, 4.0, cell, half=half, backend=backend)  # images of itself
    check_against_reference(pos, 2.0, None, half=half, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("half", [False, True])
def test_periodic_triclinic(rng, backend, dtype, half):
    cell = random_cell(rng, 9.0, skew=0.5)
    pos = random_positions(rng, 60, cell, dtype=dtype)
    check_against_reference(pos, 3.5, cell.to(dtype), half=half, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", [False, True])
def test_cell_smaller_than_cutoff(rng, backend, half):
    """Edges ~4 A with a 6 A cutoff: many images, including each atom's own."""
    cell = random_cell(rng, 4.0, skew=0.6)
    pos = random_positions(rng, 8, cell)
    nl, _ = check_against_reference(pos, 6.0, cell, half=half, backend=backend)
    assert bool(((nl.i == nl.j) & (nl.shifts != 0).any(dim=1)).any()), "self images expected"


@pytest.mark.parametrize("backend", BACKENDS)
def test_thin_cell_one_axis(rng, backend):
    """A slab-like cell with one height far below the cutoff."""
    cell = torch.diag(torch.tensor([8.0, 8.0, 1.3], dtype=torch.float64))
    cell[2, 0] = 0.4
    pos = random_positions(rng, 20, cell)
    check_against_reference(pos, 3.0, cell, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pbc", [[True, True, False], [False, True, False], [True, False, True]])
def test_mixed_pbc(rng, backend, pbc):
    cell = random_cell(rng, 6.0)
    for k in range(3):
        if not pbc[k]:
            cell[k] = 0.0  # rows of non-periodic axes may be zero
    pos = random_positions(rng, 40, random_cell(rng, 6.0), spread=1.5)
    check_against_reference(pos, 3.0, cell, pbc=pbc, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", [False, True])
def test_no_cell(rng, backend, half):
    pos = torch.tensor(rng.normal(size=(70, 3)) * 4)
    nl, _ = check_against_reference(pos, 3.0, None, half=half, backend=backend)
    assert not bool(nl.shifts.any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_outside_cell(rng, backend):
    """Unwrapped positions: shifts stay consistent with the positions given."""
    cell = random_cell(rng, 7.0, skew=0.4)
    pos = random_positions(rng, 30, cell, spread=5.0)  # up to two cells away
    check_against_reference(pos, 3.0, cell, backend=backend)


def random_batch(rng):
    """Four systems of 7, 0, 12 and 5 atoms: triclinic, empty, mixed pbc with a zero cell row,
    non-periodic; (positions, cells [4, 3, 3], pbc [4, 3], batch)."""
    sizes = [7, 0, 12, 5]
    cells = torch.stack([random_cell(rng, 5.0), random_cell(rng, 5.0),
                         random_cell(rng, 3.0), torch.zeros(3, 3, dtype=torch.float64)])
    pbc = torch.tensor([[True, True, True], [True, True, True], [True, False, True],
                        [False, False, False]])
    cells[2, 1] = 0.0
    pos = torch.cat([random_positions(rng, n, random_cell(rng, 5.0)) for n in sizes])
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return pos, cells, pbc, batch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", [False, True])
def test_batch(rng, backend, half):
    pos, cells, pbc, batch = random_batch(rng)
    nl, _ = check_against_reference(pos, 3.5, cells, pbc, batch, half=half, backend=backend)
    assert torch.equal(batch[nl.i], batch[nl.j]), "no pair may cross systems"
    # each system alone gives the same pairs
    start = 0
    for s, n in enumerate(torch.bincount(batch, minlength=len(cells)).tolist()):
        alone = fastff.neighbor_list(pos[start:start + n], 3.5, cells[s], pbc[s], half=half,
                                     backend=backend)
        mine = (nl.i >= start) & (nl.i < start + n)
        assert_same_pairs((nl.i[mine] - start, nl.j[mine] - start, nl.shifts[mine]),
                          (alone.i, alone.j, alone.shifts), cutoff=3.5, dtype=torch.float64)
        start += n


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_is_full_filtered(rng, backend):
    cell = random_cell(rng, 5.0)
    pos = random_positions(rng, 25, cell)
    full = fastff.neighbor_list(pos, 4.0, cell, backend=backend)
    half = fastff.neighbor_list(pos, 4.0, cell, half=True, backend=backend)
    assert 2 * len(half) == len(full)
    s = full.shifts.long()
    positive = (s[:, 0] > 0) | ((s[:, 0] == 0) & ((s[:, 1] > 0) | ((s[:, 1] == 0) & (s[:, 2] > 0))))
    keep = (full.i < full.j) | ((full.i == full.j) & positive)
    assert fastff.testing.pair_keys(full.i[keep], full.j[keep], full.shifts[keep]) == \
        fastff.testing.pair_keys(half.i, half.j, half.shifts)


def test_numba_is_deterministic(rng):
    cell = random_cell(rng, 30.0)
    pos = random_positions(rng, 6000, cell)  # above SERIAL_BELOW: the parallel kernels run
    a = fastff.neighbor_list(pos, 4.0, cell, backend="numba")
    b = fastff.neighbor_list(pos, 4.0, cell, backend="numba")
    pairs = ((a.i, b.i), (a.j, b.j), (a.shifts, b.shifts), (a.distances(pos), b.distances(pos)))
    for x, y in pairs:
        assert torch.equal(x, y)


@pytest.mark.parametrize("half", [False, True])
def test_numba_parallel_matches_reference(rng, half, monkeypatch):
    """Small systems run the serial kernels; force the parallel ones here."""
    from fastff.kernels.neighbors import cpu_numba

    monkeypatch.setattr(cpu_numba, "SERIAL_BELOW", 0)
    cell = random_cell(rng, 10.0)
    pos = random_positions(rng, 400, cell, dtype=torch.float32)
    check_against_reference(pos, 3.0, cell.float(), half=half, backend="numba")


# ---- outside references -----------------------------------------------------------------------

def _ase_atoms(pos, cell, pbc):
    ase = pytest.importorskip("ase")
    return ase.Atoms(positions=pos.numpy(), cell=cell.numpy(), pbc=pbc)


@pytest.mark.parametrize("pbc", [[True, True, True], [True, False, True]])
def test_reference_matches_ase(rng, pbc):
    from ase.neighborlist import neighbor_list as ase_neighbor_list

    cell = random_cell(rng, 4.5, skew=0.5)
    pos = random_positions(rng, 15, cell, spread=2.0)
    i, j, S, d = ase_neighbor_list("ijSd", _ase_atoms(pos, cell, pbc), 5.0)
    nl = fastff.neighbor_list(pos, 5.0, cell, pbc=pbc, backend="reference")
    assert_same_pairs((nl.i, nl.j, nl.shifts),
                      (torch.from_numpy(i), torch.from_numpy(j), torch.from_numpy(S)),
                      cutoff=5.0, dtype=torch.float64, actual_distances=nl.distances(pos),
                      expected_distances=torch.from_numpy(d))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pbc", [True, False, [True, True, False]])
def test_matches_vesin(rng, backend, pbc):
    vesin = pytest.importorskip("vesin")
    cell = random_cell(rng, 10.0, skew=0.4)
    pos = random_positions(rng, 200, cell)
    i, j, S, d = vesin.NeighborList(cutoff=3.0, full_list=True).compute(
        pos.numpy(), cell.numpy(), pbc, "ijSd")
    nl = fastff.neighbor_list(pos, 3.0, cell, pbc=torch.tensor(pbc).expand(3),
                              backend=backend)
    assert_same_pairs((nl.i, nl.j, nl.shifts),
                      (torch.from_numpy(i.astype(np.int64)), torch.from_numpy(j.astype(np.int64)),
                       torch.from_numpy(S)),
                      cutoff=3.0, dtype=torch.float64, actual_distances=nl.distances(pos),
                      expected_distances=torch.from_numpy(d))


# ---- vectors, distances and their derivatives -------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_vector_gradients_match_reference(rng, backend):
    cell = random_cell(rng, 5.0)
    pos = random_positions(rng, 20, cell, spread=1.5)
    batch = torch.tensor([0] * 12 + [1] * 8)
    cells = torch.stack([cell, random_cell(rng, 6.0)])
    nl = fastff.neighbor_list(pos, 4.0, cells, batch=batch, backend=backend)
    weights = torch.tensor(rng.normal(size=(len(nl), 3)))

    def grads(be):
        p = pos.clone().requires_grad_(True)
        c = cells.clone().requires_grad_(True)
        nl.backend = be
        v = nl.vectors(p, c)
        (v * weights).sum().backward()
        return v.detach(), p.grad, c.grad

    got, want = grads(backend), grads("reference")
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_vectors_and_distances(rng, backend):
    cell = random_cell(rng, 4.0)
    pos = random_positions(rng, 6, cell)
    nl = fastff.neighbor_list(pos, 3.5, cell, backend=backend)
    assert len(nl) > 0
    p = pos.clone().requires_grad_(True)
    c = cell.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(nl.vectors, (p, c))
    assert torch.autograd.gradgradcheck(nl.vectors, (p, c))
    assert torch.autograd.gradcheck(nl.distances, (p, c))
    assert torch.autograd.gradgradcheck(nl.distances, (p, c))


def test_stress_from_cell_gradient(rng):
    """dE/dcell of a pair energy equals the virial sum_ij S (x) dE/dr_ij the ASE way (finite
    differences of the energy under a strain of cell and positions)."""
    cell = random_cell(rng, 5.0)
    pos = random_positions(rng, 10, cell)
    nl = fastff.neighbor_list(pos, 3.0, cell)

    def energy(p, c):
        d = nl.distances(p, c)
        return (torch.exp(-d) * (1 - d / 3.0) ** 2).sum()

    strain = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    deform = torch.eye(3, dtype=torch.float64) + strain
    e = energy(pos @ deform, cell @ deform)
    (virial,) = torch.autograd.grad(e, strain)
    h = 1e-6
    fd = torch.zeros(3, 3, dtype=torch.float64)
    for a in range(3):
        for b in range(3):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            eps[a, b] = h
            fd[a, b] = (energy(pos @ (torch.eye(3, dtype=torch.float64) + eps),
                               cell @ (torch.eye(3, dtype=torch.float64) + eps))
                        - energy(pos @ (torch.eye(3, dtype=torch.float64) - eps),
                                 cell @ (torch.eye(3, dtype=torch.float64) - eps))) / (2 * h)
    torch.testing.assert_close(virial, fd, rtol=1e-6, atol=1e-8)


def test_cached_distances_are_not_stale(rng):
    cell = random_cell(rng, 5.0)
    pos = random_positions(rng, 10, cell)
    nl = fastff.neighbor_list(pos, 3.0, cell)
    before = nl.distances(pos).clone()
    pos += 0.01  # in place: the version counter changes
    after = nl.distances(pos)
    torch.testing.assert_close(after, torch.linalg.vector_norm(nl.vectors(pos), dim=1))
    assert not torch.equal(before, after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(rng, backend):
    from fastff.kernels.neighbors import op

    cell = random_cell(rng, 4.0)
    pos = random_positions(rng, 8, cell)
    cells = cell.unsqueeze(0)
    pbc = torch.ones(1, 3, dtype=torch.bool)
    ptr = torch.tensor([0, 8])
    torch.library.opcheck(op.neighbor_list, (pos, 3.0, cells, pbc, ptr, False, backend))
    i, j, shifts, nptr, _ = op.neighbor_list(pos, 3.0, cells, pbc, ptr, False, backend)
    p = pos.clone().requires_grad_(True)
    c = cells.clone().requires_grad_(True)
    torch.library.opcheck(op.pair_vectors, (p, c, None, i, j, shifts, backend))
    g = torch.randn(i.shape[0], 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(op.pair_vectors_transpose, (g, 8, cells, None, i, j, shifts, backend))
    torch.library.opcheck(op.neighbor_reverse, (i, j, shifts, nptr, backend))


@pytest.mark.parametrize("backend", ["numba", "triton", "reference"])
def test_full_list_symmetric_at_the_cutoff(rng, backend):
    """Self-images exactly one lattice vector away, with the cutoff equal to that length: the
    rounded distance may fall on either side, but a pair and its mirror must agree."""
    edge = float(rng.uniform(3.0, 5.0))
    cell = torch.diag(torch.tensor([edge, edge * 1.3, edge * 1.7], dtype=torch.float64))
    pos = random_positions(rng, 10, cell, spread=3.0)
    nl = fastff.neighbor_list(pos, edge, cell, backend=backend)
    assert bool((nl.reverse >= 0).all())


# ---- property test over random geometries ----------------------------------------------------

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    given = None

if given is not None:

    @settings(max_examples=30, deadline=None)
    @given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 25),
           edge=st.floats(1.5, 9.0), skew=st.floats(0.0, 0.9), cutoff=st.floats(0.5, 6.0),
           pbc=st.lists(st.booleans(), min_size=3, max_size=3), spread=st.floats(0.5, 4.0),
           half=st.booleans(), single=st.booleans())
    def test_random_geometries(seed, n, edge, skew, cutoff, pbc, spread, half, single):
        """Any cell shape, periodicity, cutoff and atom placement: numba equals the reference."""
        rng = np.random.default_rng(seed)
        dtype = torch.float32 if single else torch.float64
        cell = random_cell(rng, edge, skew=skew)
        pos = random_positions(rng, n, cell, spread=spread, dtype=dtype)
        check_against_reference(pos, cutoff, cell.to(dtype), pbc=pbc, half=half, backend="numba")


# ---- compaction: a list's pairs within a smaller cutoff ---------------------------------------

def moved(rng, pos, skin):
    """Every atom moved in a random direction by less than ``skin / 2``: the pairs within the
    cutoff are still in a list built at cutoff + skin."""
    step = torch.tensor(rng.normal(size=tuple(pos.shape)))
    step *= 0.5 * skin * torch.tensor(rng.random((pos.shape[0], 1))) / step.norm(dim=1,
                                                                                keepdim=True)
    return pos + (0.999 * step).to(pos.dtype)


def check_compacted(skin_list, positions, cutoff, cell=None, pbc=None, batch=None, *, backend):
    """Compact ``skin_list`` to ``cutoff`` at ``positions``; compare it with a fresh float64
    brute-force list there, and its reverse with one computed from scratch."""
    nl = skin_list.within(positions, cutoff)
    ref = fastff.neighbor_list(positions.double(), cutoff,
                               None if cell is None else cell.double(), pbc, batch,
                               half=skin_list.half, backend="reference")
    assert_same_pairs((nl.i, nl.j, nl.shifts), (ref.i, ref.j, ref.shifts), cutoff=cutoff,
                      dtype=positions.dtype, actual_distances=nl.distances(positions),
                      expected_distances=ref.distances(positions.double()))
    check_structure(nl, positions, cell)
    assert nl.cutoff == cutoff and nl.half == skin_list.half and nl.backend == skin_list.backend
    assert nl.batch is skin_list.batch and torch.equal(nl.pbc, skin_list.pbc)
    assert nl.symmetric == (not nl.half)
    if not nl.half:
        from fastff.kernels.neighbors import reference

        assert torch.equal(nl.reverse, reference.neighbor_reverse(nl.i, nl.j, nl.shifts, nl.ptr))
    # kept pairs come in their old order (so still sorted by i): a subsequence of the source
    source = {tuple(r): k for k, r in enumerate(torch.cat(
        [skin_list.i[:, None], skin_list.j[:, None], skin_list.shifts.long()], 1).tolist())}
    where = [source[tuple(r)] for r in torch.cat(
        [nl.i[:, None], nl.j[:, None], nl.shifts.long()], 1).tolist()]
    assert where == sorted(where), "compaction must keep the pair order"
    return nl


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("half", [False, True])
def test_compact_periodic_triclinic(rng, backend, dtype, half):
    cell = random_cell(rng, 9.0, skew=0.5).to(dtype)
    pos = random_positions(rng, 60, cell, spread=1.5, dtype=dtype)
    skin_list = fastff.neighbor_list(pos, 3.5 + 0.7, cell, half=half, backend=backend)
    check_compacted(skin_list, moved(rng, pos, 0.7), 3.5, cell, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", [False, True])
def test_compact_cell_smaller_than_cutoff(rng, backend, half):
    cell = random_cell(rng, 4.0, skew=0.6)
    pos = random_positions(rng, 8, cell)
    skin_list = fastff.neighbor_list(pos, 6.5, cell, half=half, backend=backend)
    nl = check_compacted(skin_list, moved(rng, pos, 0.5), 6.0, cell, backend=backend)
    assert bool(((nl.i == nl.j) & (nl.shifts != 0).any(dim=1)).any()), "self images expected"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pbc", [[True, True, False], [False, True, False]])
def test_compact_mixed_pbc(rng, backend, pbc):
    cell = random_cell(rng, 6.0)
    for k in range(3):
        if not pbc[k]:
            cell[k] = 0.0
    pos = random_positions(rng, 40, random_cell(rng, 6.0), spread=1.5)
    skin_list = fastff.neighbor_list(pos, 3.6, cell, pbc, backend=backend)
    check_compacted(skin_list, moved(rng, pos, 0.6), 3.0, cell, pbc, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", [False, True])
def test_compact_batch(rng, backend, half):
    pos, cells, pbc, batch = random_batch(rng)
    skin_list = fastff.neighbor_list(pos, 4.0, cells, pbc, batch, half=half, backend=backend)
    nl = check_compacted(skin_list, moved(rng, pos, 0.5), 3.5, cells, pbc, batch,
                         backend=backend)
    assert torch.equal(batch[nl.i], batch[nl.j])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 2])
def test_compact_tiny(rng, backend, n):
    cell = random_cell(rng, 3.0)
    pos = random_positions(rng, n, cell)
    for c in (cell, None):
        skin_list = fastff.neighbor_list(pos, 4.5, c, backend=backend)
        check_compacted(skin_list, moved(rng, pos, 0.5), 4.0, c, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_matches_vesin(rng, backend):
    vesin = pytest.importorskip("vesin")
    cell = random_cell(rng, 10.0, skew=0.4)
    pos = random_positions(rng, 200, cell)
    skin_list = fastff.neighbor_list(pos, 3.6, cell, backend=backend)
    now = moved(rng, pos, 0.6)
    nl = skin_list.within(now, 3.0)
    i, j, S, d = vesin.NeighborList(cutoff=3.0, full_list=True).compute(
        now.numpy(), cell.numpy(), True, "ijSd")
    assert_same_pairs((nl.i, nl.j, nl.shifts),
                      (torch.from_numpy(i.astype(np.int64)), torch.from_numpy(j.astype(np.int64)),
                       torch.from_numpy(S)),
                      cutoff=3.0, dtype=torch.float64, actual_distances=nl.distances(now),
                      expected_distances=torch.from_numpy(d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compact_keeps_mirrors_at_the_cutoff(rng, dtype):
    """The keep test is exactly antisymmetric: with the cutoff set to the distance of an actual
    pair (rounding then decides), a pair is kept if and only if its mirror is, in many random
    unwrapped triclinic systems; numba and the reference agree bitwise."""
    from fastff.kernels.neighbors import cpu_numba, reference

    for _ in range(12):
        cell = random_cell(rng, float(rng.uniform(2.5, 6.0)), skew=0.6).to(dtype)
        pos = random_positions(rng, 30, cell, spread=3.0, dtype=dtype)
        skin_list = fastff.neighbor_list(pos, 4.0, cell)
        now = moved(rng, pos, 0.2)
        d = skin_list.distances(now.double(), cell.double())
        for cutoff in rng.choice(d[d < skin_list.cutoff].tolist(), size=8, replace=False):
            args = (now, skin_list._cells, None, skin_list.i, skin_list.j, skin_list.shifts,
                    skin_list.ptr, cutoff)
            got, want = cpu_numba.neighbor_compact(*args), reference.neighbor_compact(*args)
            for x, y in zip(got, want, strict=True):
                assert torch.equal(x, y)
            nl = skin_list.within(now, cutoff)
            assert bool((nl.reverse >= 0).all()), "a kept pair lost its mirror"
            assert torch.equal(nl.i[nl.reverse], nl.j) and torch.equal(nl.reverse[nl.reverse],
                                                                       torch.arange(len(nl)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_parallel_matches_reference(rng, backend):
    """Hundreds of atoms, rows split across threads, float32 positions; compacted twice to
    check determinism."""
    cell = random_cell(rng, 12.0)
    pos = random_positions(rng, 500, cell, dtype=torch.float32)
    skin_list = fastff.neighbor_list(pos, 2.8, cell.float(), backend=backend)
    now = moved(rng, pos, 0.3)
    nl = check_compacted(skin_list, now, 2.5, cell.float(), backend=backend)
    again = skin_list.within(now, 2.5)
    for x, y in ((nl.i, again.i), (nl.j, again.j), (nl.shifts, again.shifts),
                 (nl.ptr, again.ptr), (nl.reverse, again.reverse)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_out_of_range_neighbour_is_dropped(rng, backend):
    """A pair whose neighbour index is out of range (possible only with value checks off) is
    dropped and never read; the other pairs are compacted as usual, and a reverse entry that
    points outside the source gives -1."""
    from fastff.kernels.neighbors import cpu_numba, reference

    module = cpu_numba if backend == "numba" else reference
    cell = random_cell(rng, 5.0)
    pos = random_positions(rng, 12, cell)
    src = fastff.neighbor_list(pos, 3.5, cell)
    bad_j = src.j.clone()
    bad_j[3], bad_j[7] = src.num_atoms + 2, -1
    i, j, shifts, ptr, rank = module.neighbor_compact(pos, src._cells, None, src.i, bad_j,
                                                      src.shifts, src.ptr, 3.0)
    assert rank[3] == -1 and rank[7] == -1
    index = torch.arange(len(src))
    keep = (src.distances(pos) < 3.0) & (index != 3) & (index != 7)
    assert torch.equal(j, src.j[keep]) and torch.equal(i, src.i[keep])
    assert torch.equal(shifts, src.shifts[keep]) and int(ptr[-1]) == int(keep.sum())
    bad_rev = src.reverse.clone()
    bad_rev[keep.nonzero()[0, 0]] = len(src) + 5
    rev = module.neighbor_compact_reverse(bad_rev, src.j, src.ptr, rank, ptr, len(i))
    assert rev[0] == -1 and rev.shape == (len(i),)


def test_compact_opcheck(rng):
    from fastff.kernels.neighbors import op

    cell = random_cell(rng, 4.0)
    pos = random_positions(rng, 8, cell)
    src = fastff.neighbor_list(pos, 3.5, cell)
    for backend in BACKENDS:
        args = (pos, src._cells, None, src.i, src.j, src.shifts, src.ptr, 3.0)
        torch.library.opcheck(op.neighbor_compact, (*args, backend))
        i, _, _, ptr, rank = op.neighbor_compact(*args, backend)
        torch.library.opcheck(op.neighbor_compact_reverse,
                              (src.reverse, src.j, src.ptr, rank, ptr, i.shape[0], backend))
