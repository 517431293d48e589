"""The MM force field's GPU path: cluster tiles (fastff::nonbonded_tiles, gpu_clusters.py)
against the float64 pair reference, and MD steps that never synchronise with the host.

Interpreted on CPU tensors with the Triton backend, the route CUDA takes (tests/conftest.py;
compiled on a GPU): the host-synchronisation counts speak for the GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastff
from fastff.kernels._runtime import status as status_bits
from fastff.kernels.nonbonded import gpu_clusters, op
from fastff.kernels.nonbonded import reference as ref
from fastff.mm import _terms, water_force_field
from fastff.systems import water_box
from fastff.testing import assert_close_scaled, count_host_syncs

CUTOFF, SKIN = 0.5, 0.1
K_RF = (78.3 - 1) / ((2 * 78.3 + 1) * CUTOFF ** 3)
METHODS = {
    "rf_switch": dict(coulomb=ref.COULOMB_REACTION_FIELD, lj=True, sw=0.4),
    "plain": dict(coulomb=ref.COULOMB_PLAIN, lj=True, sw=-1.0),
    "ewald": dict(coulomb=ref.COULOMB_EWALD_REAL, lj=False, sw=-1.0),
}


def _system(rng, n=70, box=1.6, periodic=True, dtype=torch.float64):
    """Jittered lattice (closest pairs ~0.1 nm), unwrapped by random box vectors, random
    parameters, and exclusions among close pairs (as in molecules)."""
    side = 5
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[rng.permutation(side ** 3)[:n]]
    pos = torch.as_tensor((grid + 0.5 + rng.uniform(-0.2, 0.2, (n, 3))) * box / side)
    cell = torch.eye(3, dtype=torch.float64) * box if periodic else None
    if periodic:
        pos = pos + torch.as_tensor(rng.integers(-2, 3, (n, 3))) * box
    nl = fastff.neighbor_list(pos, 0.35, cell, half=True, backend="reference")
    pick = torch.as_tensor(rng.permutation(len(nl))[:n // 2])
    excl_ptr, excl_j = _terms._exclusion_rows(torch.stack([nl.i[pick], nl.j[pick]], 1), n)
    return dict(pos=pos.to(dtype), cell=cell, q=torch.as_tensor(rng.normal(0, 0.4, n)),
                s=torch.as_tensor(rng.uniform(0.1, 0.2, n)),
                e=torch.as_tensor(rng.uniform(0.1, 0.5, n)), excl_ptr=excl_ptr, excl_j=excl_j)


def _cells(sysd, dtype):
    return (torch.zeros(1, 3, 3) if sysd["cell"] is None else sysd["cell"][None]).to(dtype)


def _build(sysd, backend, tiles=64, xtiles=64):
    """A tile list in fresh buffers, built by ``backend``'s cluster_list_into."""
    pos = sysd["pos"]
    n = pos.shape[0]
    nclus = gpu_clusters.num_clusters(n)
    b = dict(status=torch.tensor([status_bits.REBUILD, 0], dtype=torch.int32),
             reference=torch.zeros(n, 3, dtype=pos.dtype),
             ref_cells=torch.zeros(1, 3, 3, dtype=pos.dtype),
             order=torch.zeros(n, dtype=torch.int32), slot=torch.zeros(n, dtype=torch.int32),
             tile_ptr=torch.zeros(nclus + 1, dtype=torch.int64),
             xtile_ptr=torch.zeros(nclus + 1, dtype=torch.int64),
             tile_j=torch.zeros(tiles, dtype=torch.int32),
             tile_x=torch.zeros(tiles, dtype=torch.int32),
             masks=torch.zeros(xtiles, 32, dtype=torch.int32))
    counts = sysd["excl_ptr"][1:] - sysd["excl_ptr"][:-1]
    op.cluster_list_into(pos, _cells(sysd, pos.dtype), sysd["cell"] is not None, CUTOFF,
                         CUTOFF + SKIN, sysd["excl_ptr"], sysd["excl_j"], int(counts.max()),
                         *b.values(), backend)
    return b


def _tiles(sysd, b, method, backend, pos=None, cells=None):
    m = METHODS[method]
    pos = sysd["pos"] if pos is None else pos
    cells = _cells(sysd, pos.dtype) if cells is None else cells
    return op.nonbonded_tiles(pos, cells, b["order"], b["tile_ptr"], b["tile_j"], b["tile_x"],
                              b["masks"], sysd["q"].to(pos.dtype), sysd["s"].to(pos.dtype),
                              sysd["e"].to(pos.dtype), CUTOFF, m["sw"], m["coulomb"], m["lj"],
                              K_RF, 1 / CUTOFF + K_RF * CUTOFF ** 2, 3.0, 138.935456,
                              sysd["cell"] is not None, backend)


def _pair_reference(sysd, method):
    """The pair op's float64 torch reference on a fresh half list."""
    m = METHODS[method]
    pos = sysd["pos"].double()
    n = pos.shape[0]
    nl = fastff.neighbor_list(pos, CUTOFF, sysd["cell"], half=True, backend="reference")
    return op.nonbonded(pos, _cells(sysd, torch.float64), torch.zeros(n, dtype=torch.int64),
                        nl.i, nl.j, nl.shifts, nl.ptr, sysd["excl_ptr"], sysd["excl_j"],
                        sysd["q"], sysd["s"], sysd["e"], CUTOFF, m["sw"], m["coulomb"], m["lj"],
                        K_RF, 1 / CUTOFF + K_RF * CUTOFF ** 2, 3.0, 138.935456, False, True,
                        "reference")[:3]


@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("method", list(METHODS))
def test_tiles_match_the_pair_reference_float64(rng, periodic, method):
    sysd = _system(rng, periodic=periodic)
    want = _pair_reference(sysd, method)
    for build in ("triton", "reference"):  # the GPU build, and the plain one of reference.py
        b = _build(sysd, build)
        assert int(b["status"][0]) & status_bits.INVALID == 0
        got = _tiles(sysd, b, method, "triton")
        for name, x, y in zip(("energy", "forces", "cell gradient"), got, want, strict=True):
            if name == "cell gradient" and not periodic:
                continue
            # the bar the brief sets for the tiles: 1e-12 of the largest entry in float64
            err = float((x - y).abs().max())
            assert err <= 1e-12 * float(y.abs().max()), f"{build} {method} {name}: {err}"


def _pair_energy_magnitude(sysd, method):
    """sum |e_pair| over the interacting pairs (float64): the scale of the energy's float32
    rounding, which the total (positive and negative terms) can cancel well below."""
    m = METHODS[method]
    pos, n = sysd["pos"].double(), sysd["pos"].shape[0]
    nl = fastff.neighbor_list(pos, CUTOFF, sysd["cell"], half=True, backend="reference")
    d = nl.distances(pos, sysd["cell"])
    keep = ~ref.excluded_pairs(nl.i, nl.j, sysd["excl_ptr"], sysd["excl_j"], n)
    i, j = nl.i[keep], nl.j[keep]
    q, s, e = sysd["q"], sysd["s"], sysd["e"]
    pair = ref.pair_energy(d[keep], q[i], q[j], s[i], s[j], e[i], e[j], cutoff=CUTOFF,
                           switch_distance=m["sw"], coulomb=m["coulomb"], lj=m["lj"], k_rf=K_RF,
                           c_rf=1 / CUTOFF + K_RF * CUTOFF ** 2, alpha=3.0,
                           coulomb_constant=138.935456)
    return float(pair.abs().sum())


def test_tiles_float32(rng):
    sysd = _system(rng)
    want = _pair_reference(sysd, "rf_switch")
    f32 = dict(sysd, pos=sysd["pos"].float())
    got = _tiles(f32, _build(f32, "triton"), "rf_switch", "triton")
    for name, x, y in zip(("energy", "forces", "cell"), got, want, strict=True):
        assert x.dtype == torch.float32
        if name == "energy":  # the total may cancel to ~0.3 kJ/mol: scaled by its terms
            err = abs(float(x) - float(y))
            assert err <= 1e-4 * _pair_energy_magnitude(sysd, "rf_switch"), err
            continue
        assert_close_scaled(x, y, "mm", torch.float32, name)


def test_tile_build_covers_every_pair_and_overflows_loudly(rng):
    sysd = _system(rng)
    b = _build(sysd, "triton")
    i, j, _ = ref.tile_pairs(sysd["pos"], _cells(sysd, torch.float64), b["order"], b["tile_ptr"],
                             b["tile_j"], b["tile_x"], b["masks"], True)
    listed = set(zip(torch.minimum(i, j).tolist(), torch.maximum(i, j).tolist(), strict=True))
    nl = fastff.neighbor_list(sysd["pos"], CUTOFF + SKIN, sysd["cell"], half=True,
                              backend="reference")
    excluded = ref.excluded_pairs(nl.i, nl.j, sysd["excl_ptr"], sysd["excl_j"], 70)
    wanted = set(zip(torch.minimum(nl.i, nl.j)[~excluded].tolist(),
                     torch.maximum(nl.i, nl.j)[~excluded].tolist(), strict=True))
    assert wanted <= listed  # every pair within rlist, and no excluded pair
    assert not set(zip(torch.minimum(nl.i, nl.j)[excluded].tolist(),
                       torch.maximum(nl.i, nl.j)[excluded].tolist(), strict=True)) & listed
    small = _build(sysd, "triton", tiles=2, xtiles=1)
    assert int(small["status"][0]) & status_bits.OVERFLOW
    assert int(small["tile_ptr"][-1]) == int(b["tile_ptr"][-1])  # counted, never truncated


def test_tiles_deterministic_mode(rng):
    """Fixed-point partner forces: the same values (to their 2^-32 resolution) as float sums,
    bitwise the same across calls."""
    sysd = _system(rng)
    b = _build(sysd, "triton")
    plain = _tiles(sysd, b, "rf_switch", "triton")
    torch.use_deterministic_algorithms(True)
    try:
        first = _tiles(sysd, b, "rf_switch", "triton")
        second = _tiles(sysd, b, "rf_switch", "triton")
    finally:
        torch.use_deterministic_algorithms(False)
    for x, y, z in zip(first, second, plain, strict=True):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z, rtol=0, atol=1e-8)  # 2^-32 per added value


def test_tiles_gradcheck_and_opcheck(rng):
    sysd = _system(rng, n=40, box=1.6)
    b = _build(sysd, "triton")
    pos = sysd["pos"].clone().requires_grad_(True)
    # the box stays orthorhombic (the tiles' domain): derivatives along its three lengths; the
    # whole cell gradient (that of r = x_j - x_i + S @ C, as every path) is compared with the
    # pair reference in test_tiles_match_the_pair_reference_float64
    lengths = torch.diagonal(_cells(sysd, torch.float64)[0]).clone().requires_grad_(True)

    def energy(p, ls):
        return _tiles(sysd, b, "rf_switch", "triton", p, torch.diag(ls)[None])[0]

    assert torch.autograd.gradcheck(energy, (pos, lengths), fast_mode=True)
    assert torch.autograd.gradgradcheck(energy, (pos, lengths), fast_mode=True)
    cells = _cells(sysd, torch.float64).clone().requires_grad_(True)
    m = METHODS["rf_switch"]
    torch.library.opcheck(op.nonbonded_tiles, (
        pos, cells, b["order"], b["tile_ptr"], b["tile_j"], b["tile_x"], b["masks"], sysd["q"],
        sysd["s"], sysd["e"], CUTOFF, m["sw"], m["coulomb"], m["lj"], K_RF,
        1 / CUTOFF + K_RF * CUTOFF ** 2, 3.0, 138.935456, True, "triton"))


def _md_step(ff, positions):
    x = positions.clone().requires_grad_(True)
    energy = ff(x)
    (grad,) = torch.autograd.grad(energy, x)
    return energy.detach(), -grad


@pytest.mark.parametrize("use_clusters", [True, False])
def test_forcefield_md_steps_are_sync_free(rng, use_clusters):
    """Steps that keep the lists and steps whose device check rebuilds them: no host
    synchronisation after the first checked steps; energies and forces as the reference."""
    box = water_box(40, seed=int(rng.integers(1000)), dtype=torch.float64, relax_steps=0)
    ff = water_force_field(box, cutoff=0.45, skin=0.05, backend="triton").requires_grad_(False)
    ff.use_clusters = use_clusters
    ref_ff = water_force_field(box, cutoff=0.45, skin=0.05,
                               backend="reference").requires_grad_(False)
    positions = box.positions.clone()
    for _ in range(3):  # the first steps check values and fill caches
        _md_step(ff, positions)
    rebuilds = (ff.tiles if use_clusters else ff.verlet).rebuilds
    for kick in (0.002, 0.002, 0.05, 0.002):  # the third moves atoms beyond skin / 2
        positions = positions + kick * torch.randn_like(positions)
        with count_host_syncs() as syncs:
            energy, forces = _md_step(ff, positions)
        assert int(syncs) == 0, syncs.report()
        want_e, want_f = _md_step(ref_ff, positions)
        assert_close_scaled(energy, want_e, "mm", torch.float64, "energy")
        assert_close_scaled(forces, want_f, "mm", torch.float64, "forces")
    assert (ff.tiles if use_clusters else ff.verlet).rebuilds > rebuilds  # rebuilt on device
    if use_clusters:
        assert isinstance(ff.tiles._list, fastff.mm._clusters.TileList)
    else:
        assert ff.verlet.skin_list.capacity is not None


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_forcefield_nan_positions_poison_the_step(rng):
    box = water_box(40, seed=3, dtype=torch.float64, relax_steps=0)
    ff = water_force_field(box, cutoff=0.45, skin=0.05, backend="triton").requires_grad_(False)
    positions = box.positions.clone()
    for _ in range(2):
        _md_step(ff, positions)
    bad = positions.clone()
    bad[5, 0] = float("nan")
    energy, forces = _md_step(ff, bad)  # no host check: the device flag poisons the result
    assert torch.isnan(energy) and bool(torch.isnan(forces).all())
    with pytest.raises(RuntimeError, match="non-finite"):
        _md_step(ff, positions)  # the flag read without waiting, one step later
