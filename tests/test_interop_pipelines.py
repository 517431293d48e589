"""fastff.interop.pipelines against the neighbor lists of MACE (matscipy) and NequIP (ASE): the
same pairs (sets after a lexsort), shifts, distances, dtypes and returned cells on random
periodic, triclinic, mixed-periodic and non-periodic systems, and each adapter installed in its
package's own data pipeline."""

import os

# e3nn (imported by MACE and NequIP) loads its constants with torch.load, which torch >= 2.6
# refuses by default (weights_only=True); read when e3nn is imported.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fastff.interop import pipelines  # noqa: E402
from fastff.testing import BOUNDARY  # noqa: E402

warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")

PBCS = [(True, True, True), (True, False, True), (False, True, False), (False, False, False)]


def triclinic(rng, edge):
    cell = np.diag(edge * (1 + 0.2 * rng.random(3)))
    cell[1, 0], cell[2, 0], cell[2, 1] = 0.6 * edge * (rng.random(3) - 0.5)
    return cell


def positions(rng, n, cell, spread=1.2):
    return ((rng.random((n, 3)) - 0.5) * spread + 0.5) @ cell


def pair_set(edge_index, shifts, distances, cutoff, dtype=torch.float64):
    """{(i, j, S): distance} without pairs within BOUNDARY of the cutoff (either side)."""
    rows = np.column_stack([edge_index[0], edge_index[1], shifts]).astype(np.int64).tolist()
    return {tuple(r): d for r, d in zip(rows, distances.tolist(), strict=True)
            if abs(d - cutoff) >= BOUNDARY[dtype]}


def assert_same_pairs(ours, theirs):
    assert ours.keys() == theirs.keys(), (len(ours), len(theirs),
                                         list(ours.keys() - theirs.keys())[:3],
                                         list(theirs.keys() - ours.keys())[:3])
    keys = sorted(ours)
    np.testing.assert_allclose([ours[k] for k in keys], [theirs[k] for k in keys],
                               rtol=1e-12, atol=1e-12)


# ---- MACE ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mace_neighborhood():
    return pytest.importorskip("mace.data.neighborhood").get_neighborhood


@pytest.mark.parametrize("pbc", PBCS)
@pytest.mark.parametrize("edge, cutoff", [(7.0, 3.0), (3.0, 4.0)], ids=["cell", "small cell"])
def test_mace_same_as_get_neighborhood(rng, mace_neighborhood, pbc, edge, cutoff):
    cell = triclinic(rng, edge)
    pos = positions(rng, 25, cell)
    ours = pipelines.mace_get_neighborhood(pos, cutoff, pbc=pbc, cell=cell.copy())
    theirs = mace_neighborhood(pos, cutoff, pbc=pbc, cell=cell.copy())
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.shape[1:] == b.shape[1:]
    np.testing.assert_allclose(ours[3], theirs[3], rtol=1e-15)  # MACE's returned cell

    def pairs(out):
        edge_index, shifts, unit_shifts, _ = out
        np.testing.assert_allclose(shifts, unit_shifts @ out[3], rtol=1e-14, atol=1e-12)
        # MACE's vectors: positions[receiver] - positions[sender] + shifts
        vectors = pos[edge_index[1]] - pos[edge_index[0]] + shifts
        return pair_set(edge_index, unit_shifts, np.linalg.norm(vectors, axis=1), cutoff)

    expected = pairs(theirs)
    assert_same_pairs(pairs(ours), expected)
    assert len(expected) > 0


def test_mace_defaults_and_caller_cell(rng, mace_neighborhood):
    pos = positions(rng, 15, np.eye(3) * 5)
    ours, theirs = pipelines.mace_get_neighborhood(pos, 2.5), mace_neighborhood(pos, 2.5)
    np.testing.assert_array_equal(ours[3], theirs[3])
    assert_same_pairs(pair_set(ours[0], ours[2], np.zeros(ours[0].shape[1]), 2.5),
                      pair_set(theirs[0], theirs[2], np.zeros(theirs[0].shape[1]), 2.5))
    cell = np.eye(3) * 5
    pipelines.mace_get_neighborhood(pos, 2.5, pbc=(True, False, True), cell=cell)
    np.testing.assert_array_equal(cell, np.eye(3) * 5)  # not modified in place


def test_mace_pipeline_with_the_adapter_installed(rng, monkeypatch):
    """MACE's AtomicData.from_config builds the same graph with the adapter in place."""
    atomic_data = pytest.importorskip("mace.data.atomic_data")
    import ase
    from mace.data.utils import config_from_atoms
    from mace.tools import AtomicNumberTable

    cell = triclinic(rng, 6.0)
    config = config_from_atoms(ase.Atoms(numbers=rng.choice([1, 8], 30),
                                         positions=positions(rng, 30, cell), cell=cell,
                                         pbc=True))
    table = AtomicNumberTable([1, 8])

    def graph():
        data = atomic_data.AtomicData.from_config(config, z_table=table, cutoff=3.0)
        d = np.linalg.norm((data.positions[data.edge_index[1]] - data.positions[data.edge_index[0]]
                            + data.shifts).numpy(), axis=1)
        return pair_set(data.edge_index.numpy(), data.unit_shifts.numpy(), d, 3.0)

    theirs = graph()
    monkeypatch.setattr(atomic_data, "get_neighborhood", pipelines.mace_get_neighborhood)
    assert_same_pairs(graph(), theirs)


def test_mace_periodic_axis_without_cell(rng):
    pos = positions(rng, 5, np.eye(3) * 3)
    with pytest.raises(ValueError, match="pbc is True along axis 0 but the cell has no lattice "
                                         "vector there .no cell given.; MACE would"):
        pipelines.mace_get_neighborhood(pos, 2.0, pbc=(True, False, False))
    with pytest.raises(ValueError, match="pbc must be three bools"):
        pipelines.mace_get_neighborhood(pos, 2.0, pbc=(1, 0, 0))


# ---- NequIP ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nequip_neighbor_list():
    return pytest.importorskip("nequip.data.AtomicData").neighbor_list_and_relative_vec


def nequip_pairs(out, pos, cutoff, dtype=torch.float64):
    edge_index, shifts, cell = (x.double().numpy() if x.is_floating_point() else x.numpy()
                                for x in out)
    vectors = pos[edge_index[1]] - pos[edge_index[0]] + shifts @ cell
    return pair_set(edge_index, shifts, np.linalg.norm(vectors, axis=1), cutoff, dtype)


@pytest.mark.parametrize("pbc", PBCS)
@pytest.mark.parametrize("edge, cutoff", [(7.0, 3.0), (3.0, 4.0)], ids=["cell", "small cell"])
@pytest.mark.parametrize("self_interaction, strict", [(False, True), (True, True),
                                                      (True, False)])
def test_nequip_same_as_neighbor_list_and_relative_vec(rng, nequip_neighbor_list, pbc, edge,
                                                       cutoff, self_interaction, strict):
    cell = triclinic(rng, edge)
    pos = positions(rng, 25, cell)
    x = torch.tensor(pos)
    ours = pipelines.nequip_neighbor_list(x, cutoff, self_interaction, strict, cell=cell,
                                          pbc=pbc)
    theirs = nequip_neighbor_list(x, cutoff, self_interaction, strict, cell=cell, pbc=pbc)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.device == b.device and a.shape[1:] == b.shape[1:]
    assert torch.equal(ours[2], theirs[2])
    expected = nequip_pairs(theirs, pos, cutoff)
    assert_same_pairs(nequip_pairs(ours, pos, cutoff), expected)
    assert len(expected) > 0


@pytest.mark.parametrize("as_tensor", [True, False])
def test_nequip_dtypes_float32_and_arrays(rng, nequip_neighbor_list, as_tensor):
    cell = triclinic(rng, 6.0)
    pos = positions(rng, 20, cell)
    x = torch.tensor(pos, dtype=torch.float32) if as_tensor else pos
    c = torch.tensor(cell, dtype=torch.float32) if as_tensor else cell
    ours = pipelines.nequip_neighbor_list(x, 2.5, cell=c, pbc=True)
    theirs = nequip_neighbor_list(x, 2.5, cell=c, pbc=True)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.device == b.device
    assert torch.equal(ours[2], theirs[2])
    p64 = np.asarray(x, dtype=np.float64)
    dtype = torch.float32 if as_tensor else torch.float64  # float32 pairs may round across
    assert_same_pairs(nequip_pairs(ours, p64, 2.5, dtype), nequip_pairs(theirs, p64, 2.5, dtype))


def test_nequip_no_edges(rng, nequip_neighbor_list):
    pos = torch.tensor([[0.0, 0, 0], [5.0, 0, 0]], dtype=torch.float64)
    for fn in (pipelines.nequip_neighbor_list, nequip_neighbor_list):
        with pytest.raises(ValueError, match="Every single atom has no neighbors"):
            fn(pos, 1.0)
    assert pipelines.nequip_neighbor_list(pos, 1.0, self_interaction=True)[0].shape == (2, 2)


def test_nequip_pipeline_with_the_adapter_installed(rng, monkeypatch):
    """NequIP's AtomicData.from_points builds the same graph with the adapter in place."""
    module = pytest.importorskip("nequip.data.AtomicData")
    cell = triclinic(rng, 6.0)
    pos = positions(rng, 30, cell)

    def graph():
        data = module.AtomicData.from_points(pos=pos, r_max=3.0, cell=cell, pbc=True)
        out = (data.edge_index, data.edge_cell_shift, data.cell.view(3, 3))
        return nequip_pairs(out, data.pos.double().numpy(), 3.0)

    theirs = graph()
    monkeypatch.setattr(module, "neighbor_list_and_relative_vec", pipelines.nequip_neighbor_list)
    assert_same_pairs(graph(), theirs)


def test_nequip_periodic_axis_without_cell():
    with pytest.raises(ValueError, match="NequIP would substitute a 1 A unit vector"):
        pipelines.nequip_neighbor_list(torch.rand(4, 3), 1.0, pbc=True)


def test_interop_is_lazy():
    import fastff.interop

    assert fastff.interop.pipelines is pipelines
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        _ = fastff.interop.nothing_here
