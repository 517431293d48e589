"""Nonbonded kernels (fastff::nonbonded): every backend against the float64 torch reference,
float64 gradcheck / gradgradcheck in every differentiable input, opcheck."""

import math

import pytest
import torch

import fastff
from fastff.kernels.nonbonded import op
from fastff.kernels.nonbonded import reference as ref
from fastff.testing import TOLERANCES, assert_close_scaled

BACKENDS = ["numba", "triton", "reference"]
CUTOFF = 0.6


def _positions(rng, n, box, dtype):
    """Jittered lattice: no two atoms closer than ~0.15 (realistic LJ energies)."""
    side = math.ceil(n ** (1 / 3))
    grid = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij"), -1)
    grid = grid.reshape(-1, 3)[torch.as_tensor(rng.permutation(side ** 3)[:n])]
    spacing = box / side
    jitter = torch.as_tensor(rng.uniform(-0.15, 0.15, (n, 3))) * spacing
    return ((grid + 0.5) * spacing + jitter).to(dtype)


def _system(rng, n=12, box=1.5, dtype=torch.float64, periodic=True, batch=None, excl=True,
            half=False):
    pos = _positions(rng, n, box, dtype)
    cell = torch.eye(3, dtype=dtype) * box + torch.as_tensor(rng.uniform(-0.05, 0.05, (3, 3))
                                                             ).to(dtype) if periodic else None
    if batch is not None:
        cell = cell.expand(int(batch.max()) + 1, 3, 3).contiguous() if periodic else None
    nl = fastff.neighbor_list(pos, CUTOFF + 0.1, cell, batch=batch, half=half)
    q = torch.as_tensor(rng.normal(0, 0.5, n)).to(dtype)
    s = torch.as_tensor(rng.uniform(0.2, 0.3, n)).to(dtype)
    e = torch.as_tensor(rng.uniform(0.1, 1.0, n)).to(dtype)
    if excl and n > 3:  # exclude a few pairs that are within the cutoff
        d = nl.distances(pos)
        close = ((nl.i != nl.j) & (d < CUTOFF)).nonzero().flatten()[:3]
        pairs = torch.stack([nl.i[close], nl.j[close]], 1)
    else:
        pairs = torch.zeros(0, 2, dtype=torch.int64)
    rows = torch.cat([pairs[:, 0], pairs[:, 1]])
    cols = torch.cat([pairs[:, 1], pairs[:, 0]])
    order = torch.argsort(rows * n + cols)
    excl_ptr = torch.zeros(n + 1, dtype=torch.int64)
    excl_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    cells = (cell if cell is None or cell.dim() == 3 else cell[None])
    if cells is None:
        cells = torch.zeros(1 if batch is None else int(batch.max()) + 1, 3, 3, dtype=dtype)
    system = torch.zeros(n, dtype=torch.int64) if batch is None else batch
    return dict(pos=pos, cells=cells, system=system, nl=nl, q=q, s=s, e=e, excl_ptr=excl_ptr,
                excl_j=cols[order])


METHODS = {
    "plain": dict(coulomb=ref.COULOMB_PLAIN, lj=True, sw=-1.0),
    "rf_switch": dict(coulomb=ref.COULOMB_REACTION_FIELD, lj=True, sw=0.45),
    "ewald": dict(coulomb=ref.COULOMB_EWALD_REAL, lj=False, sw=-1.0),
    "lj_only": dict(coulomb=ref.COULOMB_NONE, lj=True, sw=0.3),
}


def _call(sysd, method, backend, pos=None, cells=None, q=None, s=None, e=None, param_grads=True):
    m = METHODS[method]
    nl = sysd["nl"]
    k_rf = (78.3 - 1) / ((2 * 78.3 + 1) * CUTOFF ** 3)
    return op.nonbonded(
        sysd["pos"] if pos is None else pos, sysd["cells"] if cells is None else cells,
        sysd["system"], nl.i, nl.j, nl.shifts, nl.ptr, sysd["excl_ptr"], sysd["excl_j"],
        sysd["q"] if q is None else q, sysd["s"] if s is None else s,
        sysd["e"] if e is None else e, CUTOFF, m["sw"], m["coulomb"], m["lj"], k_rf,
        1 / CUTOFF + k_rf * CUTOFF ** 2, 3.0, 138.935456, param_grads, nl.half, backend)


def _abs_energy(sysd, method):
    """sum over pairs within the cutoff of |U_ij| (float64): the scale of float32 round-off."""
    m = METHODS[method]
    nl = sysd["nl"]
    d = nl.distances(sysd["pos"], sysd["cells"][0] if sysd["cells"].shape[0] == 1 else None)
    keep = d < CUTOFF
    i, j, d = nl.i[keep], nl.j[keep], d[keep]
    k_rf = (78.3 - 1) / ((2 * 78.3 + 1) * CUTOFF ** 3)
    q, s, e = sysd["q"], sysd["s"], sysd["e"]
    u = ref.pair_energy(d, q[i], q[j], s[i], s[j], e[i], e[j], cutoff=CUTOFF,
                        switch_distance=m["sw"], coulomb=m["coulomb"], lj=m["lj"], k_rf=k_rf,
                        c_rf=1 / CUTOFF + k_rf * CUTOFF ** 2, alpha=3.0,
                        coulomb_constant=138.935456)
    return float(u.abs().sum()) + 1e-30


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("half", [False, True])
def test_matches_reference(rng, backend, method, dtype, periodic, half):
    sysd = _system(rng, n=20, dtype=torch.float64, periodic=periodic, half=half)
    # the reference sees the inputs rounded to dtype (the test measures arithmetic, not input
    # rounding)
    sysd = {k: (v.to(dtype).double() if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in sysd.items()}
    expected = _call(sysd, method, "reference")
    cast = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in sysd.items()}
    got = _call(cast, method, backend)
    names = ["energy", "grad_positions", "grad_cells", "grad_charges", "grad_sigma",
             "grad_epsilon"]
    for name, a, b in zip(names, got, expected, strict=False):
        assert a.dtype == dtype, name
        if name == "energy":
            # pair energies of both signs cancel (random charges): scale by sum |U_ij|
            scale = _abs_energy(sysd, method)
            err = float((a.double() - b).abs().max())
            rtol = TOLERANCES["mm"][dtype][0]
            assert err <= rtol * scale, f"{backend} {method} energy: {err:.3e} vs {scale:.3e}"
            continue
        if name == "grad_charges" and METHODS[method]["coulomb"] == 0:
            continue
        if name in ("grad_sigma", "grad_epsilon") and not METHODS[method]["lj"]:
            continue
        assert_close_scaled(a, b, "mm", dtype, f"{backend} {method} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", [False, True])
def test_batch_matches_separate_calls(rng, backend, half):
    sizes = [5, 9, 7]
    batch = torch.cat([torch.full((k,), b) for b, k in enumerate(sizes)])
    sysd = _system(rng, n=sum(sizes), batch=batch, excl=False, half=half)
    energy = _call(sysd, "rf_switch", backend)[0]
    assert energy.shape == (3,)
    start = 0
    for b, k in enumerate(sizes):
        sl = slice(start, start + k)
        pos = sysd["pos"][sl]
        nl = fastff.neighbor_list(pos, CUTOFF + 0.1, sysd["cells"][b], half=half)
        one = dict(sysd, pos=pos, cells=sysd["cells"][b:b + 1],
                   system=torch.zeros(k, dtype=torch.int64), nl=nl, q=sysd["q"][sl],
                   s=sysd["s"][sl], e=sysd["e"][sl],
                   excl_ptr=torch.zeros(k + 1, dtype=torch.int64), excl_j=sysd["excl_j"][:0])
        assert_close_scaled(energy[b:b + 1], _call(one, "rf_switch", backend)[0], "mm",
                            torch.float64, f"system {b}")
        start += k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,half", [("rf_switch", False), ("ewald", True)])
def test_gradcheck_and_gradgradcheck(rng, backend, method, half):
    sysd = _system(rng, n=8, box=1.3, half=half)
    inputs = [sysd[k].clone().requires_grad_(True) for k in ("pos", "cells", "q", "s", "e")]

    def energy(pos, cells, q, s, e):
        return _call(sysd, method, backend, pos, cells, q, s, e)[0]

    # fast mode checks random projections of the Jacobian: the same bound, far fewer calls
    assert torch.autograd.gradcheck(energy, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(energy, inputs, fast_mode=True)


# opcheck tests the op registration (schema, fake, autograd), common to every backend
@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_opcheck(rng, backend):
    sysd = _system(rng, n=8, box=1.3)
    nl = sysd["nl"]
    args = (sysd["pos"].requires_grad_(True), sysd["cells"].requires_grad_(True), sysd["system"],
            nl.i, nl.j, nl.shifts, nl.ptr, sysd["excl_ptr"], sysd["excl_j"],
            sysd["q"].requires_grad_(True), sysd["s"].requires_grad_(True),
            sysd["e"].requires_grad_(True), CUTOFF, 0.45, ref.COULOMB_REACTION_FIELD, True, 0.3,
            1 / CUTOFF + 0.3 * CUTOFF ** 2, 0.0, 138.935456, True, nl.half, backend)
    torch.library.opcheck(op.nonbonded, args)


def test_parameter_gradient_never_silently_zero(rng):
    sysd = _system(rng, n=8)
    q = sysd["q"].clone().requires_grad_(True)
    energy = _call(sysd, "plain", "numba", q=q, param_grads=False)[0]
    with pytest.raises(RuntimeError, match="param_grads"):
        energy.sum().backward()


def test_pairs_beyond_cutoff_and_excluded_pairs_contribute_nothing(rng):
    sysd = _system(rng, n=12)
    full = _call(sysd, "plain", "numba")[0]
    far = dict(sysd, nl=fastff.neighbor_list(sysd["pos"], CUTOFF + 0.5, sysd["cells"][0]))
    assert_close_scaled(_call(far, "plain", "numba")[0], full, "mm", torch.float64, "skin")
    none = dict(sysd, excl_ptr=torch.zeros_like(sysd["excl_ptr"]), excl_j=sysd["excl_j"][:0])
    assert not torch.allclose(_call(none, "plain", "numba")[0], full)
