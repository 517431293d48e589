"""Pairs in and out: NeighborList.from_edge_index from outside lists (vesin, ASE, shuffled edge
lists), edge_index, to, cat, and the errors an outside edge list gets. Outside pairs must give
the same results as fastff's own list in every op and module."""

import numpy as np
import pytest
import torch

import fastff
import fastff.nn as fnn
from fastff import NeighborList
from fastff.models import PaiNN, SchNet, energy_and_forces
from fastff.testing import assert_close_scaled, assert_same_pairs, neighbor_list_from_pairs

F64 = torch.float64


def triclinic(rng, edge=6.0, skew=0.3):
    cell = np.diag(edge * (1 + 0.2 * rng.random(3)))
    cell[1, 0], cell[2, 0], cell[2, 1] = skew * edge * (rng.random(3) - 0.5) * 2
    return torch.tensor(cell, dtype=F64)


def periodic_system(rng, n=30, edge=6.0, cutoff=2.5):
    cell = triclinic(rng, edge)
    pos = torch.tensor(rng.random((n, 3)), dtype=F64) @ cell
    return pos, cell, fastff.neighbor_list(pos, cutoff, cell)


def vesin_pairs(pos, cell, cutoff, periodic=True):
    """(i, j, S) int64 from vesin, a list found by other code (ASE's convention)."""
    vesin = pytest.importorskip("vesin")
    calc = vesin.NeighborList(cutoff=cutoff, full_list=True)
    box = cell.numpy() if cell is not None else np.zeros((3, 3))
    i, j, s = calc.compute(pos.numpy(), box, periodic, "ijS")
    return (torch.from_numpy(i.astype(np.int64)), torch.from_numpy(j.astype(np.int64)),
            torch.from_numpy(s.astype(np.int64)))


def shuffled(rng, *columns):
    order = torch.from_numpy(rng.permutation(columns[0].shape[0]))
    return [c[order] for c in columns]


# ---- round trips and outside lists ---------------------------------------------------------


@pytest.mark.parametrize("flow", ["source_to_target", "target_to_source"])
def test_round_trip_keeps_everything(rng, flow):
    pos, cell, nl = periodic_system(rng)
    back = NeighborList.from_edge_index(nl.edge_index(flow), len(pos), shifts=nl.shifts,
                                        cell=cell, cutoff=nl.cutoff, flow=flow)
    for name in ("i", "j", "shifts", "ptr"):
        assert torch.equal(getattr(back, name), getattr(nl, name)), name
    assert back.symmetric and back.shifts.dtype == torch.int32 and back.backend == "numba"
    assert torch.equal(back.reverse, nl.reverse)
    torch.testing.assert_close(back.distances(pos, cell), nl.distances(pos, cell))
    torch.testing.assert_close(back.vectors(pos, cell), nl.vectors(pos, cell))
    expected = torch.stack([nl.j, nl.i]) if flow == "source_to_target" else torch.stack(
        [nl.i, nl.j])
    assert torch.equal(nl.edge_index(flow), expected)


def test_shuffled_vesin_list_is_sorted_by_receiver(rng):
    pos, cell, nl = periodic_system(rng)
    i, j, s = shuffled(rng, *vesin_pairs(pos, cell, nl.cutoff))
    out = NeighborList.from_edge_index(torch.stack([j, i]), len(pos), shifts=s, cell=cell,
                                       cutoff=nl.cutoff)
    assert bool((out.i[1:] >= out.i[:-1]).all())
    counts = torch.bincount(out.i, minlength=len(pos))
    assert torch.equal(out.ptr[1:] - out.ptr[:-1], counts) and int(out.ptr[-1]) == len(out)
    # stable: within a row, the pairs keep their given order
    first = [int(k) for k in torch.nonzero(i == int(out.i[0])).flatten()]
    assert torch.equal(out.j[:len(first)], j[first])
    assert_same_pairs((out.i, out.j, out.shifts), (nl.i, nl.j, nl.shifts), cutoff=nl.cutoff,
                      dtype=F64, actual_distances=out.distances(pos, cell),
                      expected_distances=nl.distances(pos, cell))
    r = out.reverse
    assert torch.equal(out.i[r], out.j) and torch.equal(out.shifts[r], -out.shifts)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outside_list_in_cfconv_and_painn(rng, dtype):
    """CFConv and PaiNNMessage give the same outputs and gradients on vesin's pairs as on
    fastff's own list."""
    pos, cell, nl = periodic_system(rng)
    i, j, s = shuffled(rng, *vesin_pairs(pos, cell, nl.cutoff))
    outside = NeighborList.from_edge_index(torch.stack([j, i]), len(pos), shifts=s, cell=cell,
                                           cutoff=nl.cutoff)
    p, c = pos.to(dtype), cell.to(dtype)
    n, nf = len(pos), 8
    conv = fnn.CFConv(nf, 6, nl.cutoff).to(dtype)
    painn = fnn.PaiNNMessage(nf, 6, nl.cutoff).to(dtype)
    x = torch.randn(n, nf, dtype=dtype)
    v = torch.randn(n, 3, nf, dtype=dtype)
    results = []
    for graph in (nl, outside):
        q = p.clone().requires_grad_(True)
        out = conv(x, q, graph, c)
        ds, dv = painn(x, v, q, graph, c)
        total = out.square().sum() + ds.square().sum() + dv.square().sum()
        (force,) = torch.autograd.grad(total, q)
        results.append((out, ds, dv, force))
    for a, b in zip(*results, strict=True):
        assert_close_scaled(a, b, "message", dtype, "outside list vs fastff list")


@pytest.mark.parametrize("model_cls", [SchNet, PaiNN])
def test_outside_list_as_model_nl(rng, model_cls):
    pos, cell, nl = periodic_system(rng, cutoff=2.5)
    i, j, s = shuffled(rng, *vesin_pairs(pos, cell, nl.cutoff))
    outside = neighbor_list_from_pairs(i, j, s, num_atoms=len(pos), cutoff=nl.cutoff, cell=cell)
    model = model_cls(16, 2, cutoff=2.5).double()
    species = torch.from_numpy(rng.integers(1, 9, len(pos)))
    ref = energy_and_forces(model, species, pos, cell, nl=nl, stress=True)
    out = energy_and_forces(model, species, pos, cell, nl=outside, stress=True)
    for a, b in zip(ref, out, strict=True):
        assert_close_scaled(b, a, "model", F64, model_cls.__name__)


def test_non_periodic_list_without_shifts(rng):
    pos = torch.tensor(rng.random((25, 3)) * 5, dtype=F64)
    nl = fastff.neighbor_list(pos, 2.0)
    i, j, _ = shuffled(rng, *vesin_pairs(pos, None, 2.0, periodic=False))
    out = NeighborList.from_edge_index(torch.stack([i, j]), len(pos), cutoff=2.0,
                                       flow="target_to_source")
    assert out.cell is None and not bool(out.pbc.any())
    assert_same_pairs((out.i, out.j, out.shifts), (nl.i, nl.j, nl.shifts), cutoff=2.0, dtype=F64,
                      actual_distances=out.distances(pos), expected_distances=nl.distances(pos))
    within = out.within(pos, 1.5)
    assert within.symmetric and bool((within.distances(pos) < 1.5).all())
    ref = nl.within(pos, 1.5)
    assert_same_pairs((within.i, within.j, within.shifts), (ref.i, ref.j, ref.shifts),
                      cutoff=1.5, dtype=F64)


def test_half_list(rng):
    pos, cell, _ = periodic_system(rng)
    half = fastff.neighbor_list(pos, 2.5, cell, half=True)
    i, j, s = shuffled(rng, half.i, half.j, half.shifts)
    out = NeighborList.from_edge_index(torch.stack([j, i]), len(pos), shifts=s, cell=cell,
                                       cutoff=2.5, half=True)
    assert out.half and not out.symmetric
    assert_same_pairs((out.i, out.j, out.shifts), (half.i, half.j, half.shifts), cutoff=2.5,
                      dtype=F64)
    with pytest.raises(ValueError, match="half neighbor list has no mirror"):
        _ = out.reverse


def test_unknown_cutoff_is_infinite(rng):
    pos, cell, nl = periodic_system(rng)
    out = NeighborList.from_edge_index(nl.edge_index(), len(pos), shifts=nl.shifts, cell=cell)
    assert out.cutoff == float("inf")
    conv = fnn.CFConv(4, 6, 2.5).double()  # a module with an envelope accepts it
    conv(torch.randn(len(pos), 4, dtype=F64), pos, out, cell)


def test_batched_list(rng):
    frames = [periodic_system(rng, n) for n in (12, 20)]
    pos = torch.cat([f[0] for f in frames])
    cells = torch.stack([f[1] for f in frames])
    batch = torch.tensor([0] * 12 + [1] * 20)
    nl = fastff.neighbor_list(pos, 2.5, cells, batch=batch)
    i, j, s = shuffled(rng, nl.i, nl.j, nl.shifts)
    out = NeighborList.from_edge_index(torch.stack([j, i]), len(pos), shifts=s, cell=cells,
                                       batch=batch, cutoff=2.5)
    assert torch.equal(out.batch, batch) and out._cells.shape == (2, 3, 3)
    assert_same_pairs((out.i, out.j, out.shifts), (nl.i, nl.j, nl.shifts), cutoff=2.5, dtype=F64,
                      actual_distances=out.distances(pos, cells),
                      expected_distances=nl.distances(pos, cells))


def test_unchecked_list_computes_reverse_when_needed(rng):
    pos, cell, nl = periodic_system(rng)
    i, j, s = shuffled(rng, nl.i, nl.j, nl.shifts)
    with fastff.no_checks():
        out = NeighborList.from_edge_index(torch.stack([j, i]), len(pos), shifts=s, cell=cell,
                                           cutoff=nl.cutoff)
    assert out._reverse is None and not out.symmetric
    r = out.reverse
    assert bool((r >= 0).all()) and torch.equal(out.j[r], out.i)


def test_empty_and_atomless_lists():
    none = torch.empty(2, 0, dtype=torch.int64)
    out = NeighborList.from_edge_index(none, 5)
    assert len(out) == 0 and torch.equal(out.ptr, torch.zeros(6, dtype=torch.int64))
    assert out.symmetric and out.reverse.shape == (0,)
    assert len(NeighborList.from_edge_index(none, 0)) == 0


# ---- errors: count and one example, before the list is used ---------------------------------


def _outside(rng):
    pos, cell, nl = periodic_system(rng)
    i, j, s = shuffled(rng, nl.i, nl.j, nl.shifts)
    return pos, cell, nl, torch.stack([j, i]), s


def test_missing_mirror_reports_count_and_column(rng):
    pos, cell, nl, edges, s = _outside(rng)
    drop = [3, 7]
    keep = torch.tensor([k not in drop for k in range(edges.shape[1])])
    kept_edges, kept_shifts = edges[:, keep], s[keep]
    with pytest.raises(ValueError, match="not a full list: 2 of") as info:
        NeighborList.from_edge_index(kept_edges, len(pos), shifts=kept_shifts, cell=cell)
    column = int(str(info.value).split("column ")[1].split(":")[0])
    src, tgt = int(kept_edges[0, column]), int(kept_edges[1, column])
    # the reported pair is one whose mirror was dropped
    mirrors = [(int(edges[1, k]), int(edges[0, k]), (-s[k]).tolist()) for k in drop]
    assert (src, tgt, kept_shifts[column].tolist()) in mirrors
    assert f"source {src} -> target {tgt}" in str(info.value)


def test_duplicates(rng):
    pos, cell, nl, edges, s = _outside(rng)
    with pytest.raises(ValueError, match=r"2 duplicate pairs, e.g. columns \d+ and \d+"):
        NeighborList.from_edge_index(torch.cat([edges, edges[:, :2]], 1), len(pos),
                                     shifts=torch.cat([s, s[:2]]), cell=cell)


def test_same_pair_in_two_images_is_not_a_duplicate(rng):
    cell = torch.eye(3, dtype=F64) * 2.0  # small cell: many images of one pair
    pos = torch.tensor(rng.random((3, 3)) * 2.0, dtype=F64)
    nl = fastff.neighbor_list(pos, 3.0, cell)
    assert len(set(zip(nl.i.tolist(), nl.j.tolist(), strict=True))) < len(nl)
    out = NeighborList.from_edge_index(nl.edge_index(), 3, shifts=nl.shifts, cell=cell)
    assert out.symmetric and len(out) == len(nl)


@pytest.mark.parametrize("value, error, words", [
    (-1, IndexError, "1 pairs with a negative index"),
    (10**6, IndexError, "index >= num_atoms=30"),
])
def test_bad_indices(rng, value, error, words):
    pos, cell, nl, edges, s = _outside(rng)
    edges = edges.clone()
    edges[0, 5] = value
    with pytest.raises(error, match=words + r".*column 5"):
        NeighborList.from_edge_index(edges, len(pos), shifts=s, cell=cell)


def test_self_pair_without_shift(rng):
    pos, cell, nl, edges, s = _outside(rng)
    edges = torch.cat([edges, torch.tensor([[4], [4]])], 1)
    s = torch.cat([s, torch.zeros(1, 3, dtype=s.dtype)])
    with pytest.raises(ValueError, match="1 pairs of an atom with itself.*atom 4"):
        NeighborList.from_edge_index(edges, len(pos), shifts=s, cell=cell)


def test_pairs_across_systems():
    batch = torch.tensor([0] * 5 + [1] * 5)
    edges = torch.tensor([[0, 1, 4, 5], [1, 0, 5, 4]])
    with pytest.raises(ValueError, match=r"2 pairs across systems.*column 2: atom 4 \(system "
                                         r"0\) -> atom 5 \(system 1\)"):
        NeighborList.from_edge_index(edges, 10, batch=batch)


def test_shift_along_non_periodic_axis():
    edges = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]])
    shifts = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1]])
    with pytest.raises(ValueError, match=r"2 pairs shifted along a non-periodic axis, e.g. "
                                         r"column 2: shift \[0, 0, 1\]"):
        NeighborList.from_edge_index(edges, 2, shifts=shifts, cell=torch.eye(3, dtype=F64) * 5,
                                     pbc=[True, True, False])


def test_half_list_holding_mirrors(rng):
    pos, cell, nl, edges, s = _outside(rng)
    with pytest.raises(ValueError, match="half=True but edge_index holds .* with their mirror"):
        NeighborList.from_edge_index(edges, len(pos), shifts=s, cell=cell, half=True)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"edge_index": np.zeros((2, 3), np.int64)}, TypeError, "edge_index must be a torch.Tensor"),
    ({"edge_index": torch.zeros(2, 3, dtype=torch.int32)}, TypeError,
     "edge_index must be int64"),
    ({"edge_index": torch.zeros(3, 2, dtype=torch.int64)}, ValueError, r"shape \[2, E\]"),
    ({"edge_index": torch.zeros(2, dtype=torch.int64)}, ValueError, r"shape \[2, E\]"),
    ({"num_atoms": 4.0}, TypeError, "num_atoms must be an int"),
    ({"num_atoms": True}, TypeError, "num_atoms must be an int"),
    ({"num_atoms": -1}, ValueError, "num_atoms must be >= 0"),
    ({"shifts": torch.zeros(2, 3, dtype=torch.int32)}, ValueError,
     r"shifts must have shape \[E, 3\] = \[3, 3\]"),
    ({"shifts": torch.zeros(3, 3)}, TypeError, "shifts must hold integer cell shifts"),
    ({"shifts": torch.zeros(3, 3, dtype=torch.int32), "cell": None}, ValueError,
     "shifts were given but no cell"),
    ({"cell": torch.eye(3, dtype=torch.int64)}, TypeError,
     "cell must be float32 or float64, got torch.int64"),
    ({"cell": torch.eye(2, dtype=F64)}, ValueError, r"cell must have shape \[3, 3\]"),
    ({"cell": torch.zeros(3, 3, dtype=F64)}, ValueError, "cell is singular"),
    ({"pbc": [True, False, False]}, ValueError, "pbc is True along some axis but no cell"),
    ({"batch": torch.zeros(3, dtype=torch.int64)}, ValueError, r"batch must have shape \[4\]"),
    ({"cutoff": -1.0}, ValueError, "cutoff must be finite and positive"),
    ({"flow": "forward"}, ValueError, "flow must be one of"),
    ({"backend": "cuda"}, ValueError, "not a fastff backend"),
])
def test_bad_arguments(kwargs, error, words):
    args = {"edge_index": torch.tensor([[0, 1, 2], [1, 0, 3]]), "num_atoms": 4}
    args.update(kwargs)
    edge_index, num_atoms = args.pop("edge_index"), args.pop("num_atoms")
    with pytest.raises(error, match=words):
        NeighborList.from_edge_index(edge_index, num_atoms, **args)


def test_shifts_beyond_int32(rng):
    edges = torch.tensor([[0, 1], [1, 0]])
    shifts = torch.tensor([[2**40, 0, 0], [-(2**40), 0, 0]])
    with pytest.raises(ValueError, match="beyond int32"):
        NeighborList.from_edge_index(edges, 2, shifts=shifts, cell=torch.eye(3, dtype=F64))


# ---- to and cat ------------------------------------------------------------------------------


def test_to_same_device_is_identity(rng):
    _, _, nl = periodic_system(rng)
    assert nl.to("cpu") is nl


def test_to_moves_everything(rng):
    """The meta device stands in for an accelerator: every tensor moves, a CPU-only backend is
    replaced by the device's default, the computed reverse moves along."""
    pos, cell, nl = periodic_system(rng)
    _ = nl.reverse
    moved = nl.to("meta")
    for name in ("i", "j", "shifts", "ptr", "_cells", "pbc", "cell", "_reverse"):
        assert getattr(moved, name).device.type == "meta", name
    assert moved.backend == "reference" and moved.symmetric and len(moved) == len(nl)
    assert moved.cutoff == nl.cutoff and moved.num_atoms == nl.num_atoms
    compacted = nl.within(pos, 2.0)
    assert compacted._reverse is None
    lazy = compacted.to("meta")
    source, rank = lazy._compacted_from
    assert source.i.device.type == "meta" and rank.device.type == "meta"


def test_cat_is_the_batched_list(rng):
    """Per-frame lists (periodic triclinic, non-periodic, periodic) joined equal one batched
    build, and a model's energies and forces on the joined list equal the per-frame ones."""
    frames = [periodic_system(rng, 14)[:2], (torch.tensor(rng.random((9, 3)) * 4, dtype=F64),
                                             None), periodic_system(rng, 21)[:2]]
    lists = [fastff.neighbor_list(p, 2.5, c) for p, c in frames]
    for nl in lists[:2]:
        _ = nl.reverse  # one list with its mirror index computed, others without
    joined = NeighborList.cat(lists)
    pos = torch.cat([p for p, _ in frames])
    batch = torch.cat([torch.full((len(p),), k) for k, (p, _) in enumerate(frames)])
    cells = torch.stack([c if c is not None else torch.zeros(3, 3, dtype=F64) for _, c in frames])
    pbc = torch.tensor([[True] * 3, [False] * 3, [True] * 3])
    assert torch.equal(joined.batch, batch) and torch.equal(joined.pbc, pbc)
    assert torch.equal(joined._cells, cells) and joined.num_atoms == len(pos)
    ref = fastff.neighbor_list(pos, 2.5, cells, pbc, batch)
    assert_same_pairs((joined.i, joined.j, joined.shifts), (ref.i, ref.j, ref.shifts), cutoff=2.5,
                      dtype=F64, actual_distances=joined.distances(pos, cells),
                      expected_distances=ref.distances(pos, cells))
    assert joined.symmetric and bool((joined.i[1:] >= joined.i[:-1]).all())
    r = joined.reverse
    assert torch.equal(joined.j[r], joined.i) and torch.equal(joined.shifts[r], -joined.shifts)

    model = SchNet(16, 2, cutoff=2.5).double()
    species = torch.from_numpy(rng.integers(1, 9, len(pos)))
    energies, forces = energy_and_forces(model, species, pos, cells, pbc, batch, nl=joined)
    start = 0
    for k, (p, c) in enumerate(frames):
        e, f = energy_and_forces(model, species[start:start + len(p)], p, c, nl=lists[k])
        assert_close_scaled(energies[k:k + 1], e, "model", F64, f"energy of frame {k}")
        assert_close_scaled(forces[start:start + len(p)], f, "model", F64, f"forces {k}")
        start += len(p)


def test_cat_of_reverse_when_all_computed(rng):
    lists = [periodic_system(rng, n)[2] for n in (8, 16)]
    for nl in lists:
        _ = nl.reverse
    joined = NeighborList.cat(lists)
    assert joined._reverse is not None
    assert torch.equal(joined._reverse, torch.cat([lists[0].reverse,
                                                   lists[1].reverse + len(lists[0])]))


def test_cat_bad_input(rng):
    _, _, nl = periodic_system(rng)
    half = fastff.neighbor_list(torch.rand(5, 3, dtype=F64), 1.0, half=True)
    with pytest.raises(ValueError, match="lists is empty"):
        NeighborList.cat([])
    with pytest.raises(TypeError, match=r"lists\[1\] must be a fastff.NeighborList"):
        NeighborList.cat([nl, "pairs"])
    with pytest.raises(ValueError, match=r"lists\[1\] is a half list"):
        NeighborList.cat([nl, half])
    with pytest.raises(ValueError, match=r"lists\[1\] is on meta"):
        NeighborList.cat([nl, nl.to("meta")])
