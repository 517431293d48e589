"""Cluster-pair nonbonded path (fastff::nonbonded_clusters, cpu_clusters.py): against the pair
op's float64 torch reference on a fresh neighbor list, after Verlet moves and with unwrapped
positions; gradcheck / gradgradcheck / opcheck; the ForceField's choice of path."""

import math

import numpy as np
import pytest
import torch

import fastff
from fastff.kernels.nonbonded import cpu_clusters, op
from fastff.kernels.nonbonded import reference as ref
from fastff.mm import _terms
from fastff.mm._clusters import ClusterList
from fastff.testing import TOLERANCES, assert_close_scaled

CUTOFF = 0.6
SKIN = 0.1
K_RF = (78.3 - 1) / ((2 * 78.3 + 1) * CUTOFF ** 3)
METHODS = {
    "plain": dict(coulomb=ref.COULOMB_PLAIN, lj=True, sw=-1.0),
    "rf_switch": dict(coulomb=ref.COULOMB_REACTION_FIELD, lj=True, sw=0.45),
    "ewald": dict(coulomb=ref.COULOMB_EWALD_REAL, lj=False, sw=-1.0),
    "lj_only": dict(coulomb=ref.COULOMB_NONE, lj=True, sw=0.3),
}


def _system(rng, n=900, box=3.0, periodic=True):
    """Jittered lattice at ~36 atoms/nm^3 (closest pairs ~0.13 nm), random parameters, and
    exclusions among lattice neighbours (as in molecules)."""
    side = 11
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[rng.permutation(side ** 3)[:n]]
    spacing = box / side
    pos = torch.as_tensor((grid + 0.5 + rng.uniform(-0.25, 0.25, (n, 3))) * spacing)
    cell = torch.eye(3, dtype=torch.float64) * box if periodic else None
    q = torch.as_tensor(rng.normal(0, 0.4, n))
    s = torch.as_tensor(rng.uniform(0.15, 0.3, n))
    e = torch.as_tensor(rng.uniform(0.05, 0.8, n))
    nl = fastff.neighbor_list(pos, 0.4, cell, half=True)
    pick = torch.as_tensor(rng.permutation(nl.num_pairs)[:n // 2])
    excl_pairs = torch.stack([nl.i[pick], nl.j[pick]], 1)
    excl_ptr, excl_j = _terms._exclusion_rows(excl_pairs, n)
    return dict(pos=_clear_of_cutoff(pos, cell), cell=cell, q=q, s=s, e=e, excl_ptr=excl_ptr,
                excl_j=excl_j)


def _clusters(sysd, positions=None):
    pos = sysd["pos"] if positions is None else positions
    cell = sysd["cell"]
    arrays = cpu_clusters.build(pos.double().numpy(), None if cell is None else cell.numpy(),
                                CUTOFF + SKIN, sysd["excl_ptr"].numpy(), sysd["excl_j"].numpy())
    assert arrays is not None
    return ClusterList(arrays, cutoff=CUTOFF + SKIN, num_atoms=pos.shape[0], cell=cell,
                       dtype=pos.dtype)


def _cells(sysd, dtype):
    cell = sysd["cell"]
    return (torch.zeros(1, 3, 3) if cell is None else cell[None]).to(dtype)


def _cluster_call(sysd, cl, method, backend, pos, cells):
    m = METHODS[method]
    return op.nonbonded_clusters(pos, cells, cl.slot_atom, cl.slot_wrap, cl.cluster_ptr,
                                 cl.entry_j, cl.entry_shift, cl.entry_mask,
                                 sysd["q"].to(pos.dtype), sysd["s"].to(pos.dtype),
                                 sysd["e"].to(pos.dtype), CUTOFF, m["sw"], m["coulomb"], m["lj"],
                                 K_RF, 1 / CUTOFF + K_RF * CUTOFF ** 2, 3.0, 138.935456, backend)


def _pair_reference(sysd, method, pos):
    """The pair op on the torch reference over a fresh half list (float64)."""
    m = METHODS[method]
    cell = sysd["cell"]
    nl = fastff.neighbor_list(pos, CUTOFF, cell, half=True)
    n = pos.shape[0]
    return op.nonbonded(pos, _cells(sysd, torch.float64), torch.zeros(n, dtype=torch.int64),
                        nl.i, nl.j, nl.shifts, nl.ptr, sysd["excl_ptr"], sysd["excl_j"],
                        sysd["q"], sysd["s"], sysd["e"], CUTOFF, m["sw"], m["coulomb"], m["lj"],
                        K_RF, 1 / CUTOFF + K_RF * CUTOFF ** 2, 3.0, 138.935456, False, True,
                        "reference")[:3]


@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("periodic", [True, False])
def test_matches_pair_reference(rng, backend, method, dtype, periodic):
    sysd = _system(rng, periodic=periodic)
    cl = _clusters(sysd)
    # a Verlet step later (every atom moved less than skin / 2) the list built before still
    # holds; a list built from positions outside the box (unwrapped) works the same
    step = torch.as_tensor(rng.normal(0, 1, sysd["pos"].shape))
    step *= 0.45 * SKIN / step.norm(dim=1, keepdim=True).max()
    cases = [(sysd["pos"], cl), (_clear_of_cutoff(sysd["pos"] + step, sysd["cell"]), cl)]
    if periodic:
        unwrapped = sysd["pos"] + torch.as_tensor(rng.integers(-2, 3, step.shape)) * 3.0
        cases.append((unwrapped, _clusters(sysd, unwrapped.to(dtype))))
    for pos, cl in cases:
        pos = pos.to(dtype).double()  # the reference sees the rounded inputs
        got = _cluster_call(sysd, cl, method, backend, pos.to(dtype), _cells(sysd, dtype))
        expected = _pair_reference(sysd, method, pos)
        for name, a, b in zip(("energy", "grad_positions", "grad_cells"), got, expected,
                              strict=True):
            assert a.dtype == dtype
            if name == "energy":
                # pair energies of both signs cancel (random charges): scale by sum |U_ij|
                err = float((a.double() - b).abs().max())
                scale = _abs_energy(sysd, method, pos)
                assert err <= TOLERANCES["mm"][dtype][0] * scale, f"{backend} {method} energy"
                continue
            if name == "grad_cells" and not periodic:
                continue
            assert_close_scaled(a, b, "mm", dtype, f"{backend} {method} {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_serial_and_parallel_packing_agree_bitwise(rng, dtype, monkeypatch):
    """Small systems pack slots and gather forces in serial loops (no parallel region to wait
    for), larger ones in parallel: each slot is written once and its chunk shares are added in
    chunk order either way, so the results are bitwise equal."""
    sysd = _system(rng)
    cl = _clusters(sysd)
    pos, cells = sysd["pos"].to(dtype), _cells(sysd, dtype)
    assert cl.slot_atom.shape[0] < cpu_clusters.SERIAL_SLOTS_BELOW
    serial = _cluster_call(sysd, cl, "rf_switch", "numba", pos, cells)
    monkeypatch.setattr(cpu_clusters, "SERIAL_SLOTS_BELOW", 0)
    parallel = _cluster_call(sysd, cl, "rf_switch", "numba", pos, cells)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a, b)


def _clear_of_cutoff(pos, cell, clearance=1e-5):
    """pos with no pair distance within ``clearance`` nm of CUTOFF: every Coulomb method's force
    jumps there (OpenMM's definitions), and a float32 distance and a float64 one may put a pair
    on opposite sides. Moves one atom of each such pair along the pair by 2 * clearance."""
    pos = pos.clone()
    for _ in range(10):
        nl = fastff.neighbor_list(pos, CUTOFF + clearance, cell, half=True)
        d = nl.distances(pos)
        near = (d - CUTOFF).abs() < clearance
        if not bool(near.any()):
            return pos
        vec = nl.vectors(pos)[near]
        away = torch.where(d[near] < CUTOFF, -2.0, 2.0) * clearance  # to the nearer side
        pos.index_add_(0, nl.j[near], vec / d[near, None] * away[:, None])
    raise AssertionError("pairs stay within the clearance of the cutoff")


def _abs_energy(sysd, method, pos):
    """sum over pairs within the cutoff of |U_ij| (float64): the scale of float32 round-off."""
    m = METHODS[method]
    nl = fastff.neighbor_list(pos, CUTOFF, sysd["cell"], half=True)
    d = nl.distances(pos)
    q, s, e = sysd["q"], sysd["s"], sysd["e"]
    u = ref.pair_energy(d, q[nl.i], q[nl.j], s[nl.i], s[nl.j], e[nl.i], e[nl.j], cutoff=CUTOFF,
                        switch_distance=m["sw"], coulomb=m["coulomb"], lj=m["lj"], k_rf=K_RF,
                        c_rf=1 / CUTOFF + K_RF * CUTOFF ** 2, alpha=3.0,
                        coulomb_constant=138.935456)
    return float(u.abs().sum()) + 1e-30


def test_every_pair_within_the_list_cutoff_is_listed_once(rng):
    sysd = _system(rng)
    cl = _clusters(sysd)
    i, j, shifts = ref.cluster_pairs(cl.slot_atom, cl.slot_wrap, cl.cluster_ptr, cl.entry_j,
                                     cl.entry_shift, cl.entry_mask, cpu_clusters.LANES)
    nl = fastff.neighbor_list(sysd["pos"], CUTOFF + SKIN, sysd["cell"], half=True)
    excluded = ref.excluded_pairs(nl.i, nl.j, sysd["excl_ptr"], sysd["excl_j"],
                                  sysd["pos"].shape[0])
    n = sysd["pos"].shape[0]
    box = sysd["cell"][0, 0]

    def keys(a, b, s, pos):
        r = pos[b] - pos[a] + s.double() * box
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        return set((lo * n + hi).tolist()), r.norm(dim=1)

    want, _ = keys(nl.i[~excluded], nl.j[~excluded], nl.shifts[~excluded], sysd["pos"])
    got, d = keys(i, j, shifts, sysd["pos"])
    assert len(got) == i.shape[0]  # no pair twice
    assert want <= got  # every pair within cutoff + skin that is not excluded
    assert float(d.max()) < CUTOFF + SKIN + 2 * 0.6  # partners are near their cluster
    assert bool((i != j).all())
    pairs = ref.excluded_pairs(i, j, sysd["excl_ptr"], sysd["excl_j"], n)
    assert not bool(pairs.any())  # exclusions never listed


def test_gradcheck_and_gradgradcheck(rng):
    sysd = _system(rng, n=600)
    cl = _clusters(sysd)
    cells = _cells(sysd, torch.float64)

    def energy(pos, c):
        return _cluster_call(sysd, cl, "rf_switch", "numba", pos, c)[0]

    inputs = (sysd["pos"].clone().requires_grad_(True), cells.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(energy, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(energy, inputs, fast_mode=True)


def test_opcheck(rng):
    sysd = _system(rng, n=40, periodic=False)
    cl = _clusters(sysd)
    m = METHODS["rf_switch"]
    args = (sysd["pos"].requires_grad_(True), _cells(sysd, torch.float64), cl.slot_atom,
            cl.slot_wrap, cl.cluster_ptr, cl.entry_j, cl.entry_shift, cl.entry_mask, sysd["q"],
            sysd["s"], sysd["e"], CUTOFF, m["sw"], m["coulomb"], m["lj"], K_RF,
            1 / CUTOFF + K_RF * CUTOFF ** 2, 0.0, 138.935456, "numba")
    torch.library.opcheck(op.nonbonded_clusters, args)


def test_layouts_it_does_not_handle_are_declined(rng):
    sysd = _system(rng)
    pos = sysd["pos"].numpy()
    no_excl = np.zeros(pos.shape[0] + 1, np.int64)
    tilted = sysd["cell"].numpy().copy()
    tilted[1, 0] = 0.3
    assert cpu_clusters.build(pos, tilted, CUTOFF + SKIN, no_excl, no_excl[:0]) is None
    small = np.eye(3) * 1.5  # under 2 (cutoff + skin + cluster radius)
    assert cpu_clusters.build(pos % 1.5, small, CUTOFF + SKIN, no_excl, no_excl[:0]) is None


def test_cluster_list_refuses_parameter_gradients(rng):
    sysd = _system(rng)
    cl = _clusters(sysd)
    q = sysd["q"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="parameter gradients"):
        _terms.nonbonded(sysd["pos"], cl, q, sysd["s"], sysd["e"], cutoff=CUTOFF,
                         cell=sysd["cell"], method="reaction_field")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_force_field_takes_clusters_for_md_and_pairs_for_training(dtype):
    box = fastff.systems.water_box(1000, seed=3, dtype=dtype)
    ff = fastff.mm.water_force_field(box)

    def energy_forces(frozen, use_clusters=True, positions=box.positions, cell=box.cell):
        ff.requires_grad_(not frozen)
        ff.use_clusters = use_clusters
        p = positions.clone().requires_grad_(True)
        e = ff(p, cell)
        return e.detach(), torch.autograd.grad(e, p)[0]

    e_pairs, f_pairs = energy_forces(True, use_clusters=False)
    e_cl, f_cl = energy_forces(True)
    assert ff.clusters.rebuilds == 1
    assert_close_scaled(e_cl, e_pairs, "mm", dtype, "energy")
    assert_close_scaled(f_cl, f_pairs, "mm", dtype, "forces")
    e_train, f_train = energy_forces(False)  # parameters need gradients: the pair list
    assert ff.clusters.rebuilds == 1
    assert_close_scaled(e_train, e_pairs, "mm", dtype, "energy (training path)")
    step = torch.randn_like(box.positions)
    moved = box.positions + 0.4 * SKIN * step / step.norm(dim=1).max()
    e_cl, f_cl = energy_forces(True, positions=moved)
    e_pairs, f_pairs = energy_forces(True, use_clusters=False, positions=moved)
    assert ff.clusters.rebuilds == 1  # moved less than skin / 2: reused
    assert_close_scaled(f_cl, f_pairs, "mm", dtype, "forces after a move")
    tilted = box.cell.clone()
    tilted[1, 0] = 0.2 * tilted[0, 0]
    e_cl, f_cl = energy_forces(True, cell=tilted)  # triclinic: declined, pairs instead
    e_pairs, f_pairs = energy_forces(True, use_clusters=False, cell=tilted)
    assert ff.clusters._list is None
    assert_close_scaled(f_cl, f_pairs, "mm", dtype, "forces, triclinic")
    assert math.isfinite(float(e_cl))
