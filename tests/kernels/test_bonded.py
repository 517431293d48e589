"""Bonded kernels (fastff::harmonic_bonds, harmonic_angles, periodic_torsions, lj_coulomb_pairs):
every backend against the float64 torch reference, gradcheck / gradgradcheck, opcheck."""

import numpy as np
import pytest
import torch

from fastff.kernels.bonded import op
from fastff.testing import TOLERANCES, assert_close_scaled

BACKENDS = ["numba", "triton", "reference"]
WIDTH = {"harmonic_bonds": 2, "harmonic_angles": 3, "periodic_torsions": 4,
         "lj_coulomb_pairs": 2}


def _terms(rng, kind, n=10, t=7, dtype=torch.float64, periodic=True, nsys=1):
    """Chains of nearby atoms (bond lengths 0.1-0.2), some split across the cell boundary.
    Bond angles stay within 30-150 degrees, as in molecules: near 0 or 180 degrees a torsion's
    gradient grows like 1/sin^2 and float32 round-off with it."""
    steps = []
    while len(steps) < n:
        u = rng.normal(0, 1, 3)
        u /= np.linalg.norm(u)
        if steps and abs(float(u @ steps[-1])) / np.linalg.norm(steps[-1]) > 0.866:
            continue
        steps.append(u * rng.uniform(0.1, 0.2))
    pos = torch.cumsum(torch.as_tensor(np.array(steps)), 0).to(dtype)  # leaves the cell
    box = 0.9
    cell = (torch.eye(3) * box + torch.as_tensor(rng.uniform(-0.03, 0.03, (3, 3)))).to(dtype)
    if periodic:  # wrap some atoms so that minimum images are needed
        shift = torch.as_tensor(rng.integers(-1, 2, (n, 3))).to(dtype)
        pos = pos + shift @ cell
    w = WIDTH[kind]
    per = max(n // nsys, w)
    index = []
    for _ in range(t):
        s = int(rng.integers(0, nsys))
        start = s * per + int(rng.integers(0, per - w + 1))
        index.append(list(range(start, start + w)))
    index = torch.tensor(index)
    if kind != "harmonic_bonds" and rng.random() < 0.5:
        index = index.flip(1)
    system = torch.arange(n) // per
    system = system.clamp(max=nsys - 1)
    cells = cell.expand(nsys, 3, 3).contiguous()
    params = {
        "harmonic_bonds": [torch.as_tensor(rng.uniform(100, 500, t)),
                           torch.as_tensor(rng.uniform(0.1, 0.2, t))],
        "harmonic_angles": [torch.as_tensor(rng.uniform(50, 300, t)),
                            torch.as_tensor(rng.uniform(1.5, 2.2, t))],
        "periodic_torsions": [torch.as_tensor(rng.uniform(0.5, 5, t)),
                              torch.as_tensor(rng.integers(1, 5, t)),
                              torch.as_tensor(rng.uniform(-3, 3, t))],
        "lj_coulomb_pairs": [torch.as_tensor(rng.normal(0, 0.3, t)),
                             torch.as_tensor(rng.uniform(0.05, 0.15, t)),
                             torch.as_tensor(rng.uniform(0.1, 1.0, t))],
    }[kind]
    params = [p.to(dtype) if p.is_floating_point() else p for p in params]
    return pos, cells, system, index, params


def _call(kind, backend, pos, cells, system, index, params, periodic):
    fn = getattr(op, kind)
    inv = torch.linalg.inv(cells.detach()) if periodic else cells.detach()
    extra = (138.935456,) if kind == "lj_coulomb_pairs" else ()
    return fn(pos, cells, inv, system, periodic, index, *params, *extra, True, backend)


def _diff_params(kind, params):
    return [k for k, p in enumerate(params) if p.is_floating_point()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(WIDTH))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("periodic", [True, False])
def test_matches_reference(rng, backend, kind, dtype, periodic):
    pos, cells, system, index, params = _terms(rng, kind, n=30, t=25, periodic=periodic, nsys=2)
    # the reference sees the inputs rounded to dtype: the test measures the kernel's arithmetic,
    # not the conditioning of the geometry under rounding of its input
    pos, cells = pos.to(dtype).double(), cells.to(dtype).double()
    params = [p.to(dtype).double() if p.is_floating_point() else p for p in params]
    expected = _call(kind, "reference", pos, cells, system, index, params, periodic)
    cast = [p.to(dtype) if p.is_floating_point() else p for p in params]
    got = _call(kind, backend, pos.to(dtype), cells.to(dtype), system, index, cast, periodic)
    for k, (a, b) in enumerate(zip(got, expected, strict=False)):
        assert a.dtype == dtype
        if k == 0 and kind == "lj_coulomb_pairs":
            # Coulomb terms of both signs cancel: scale by the energy with |charge products|
            # and the magnitude of the LJ part
            qq, sg, ep = params
            scale = (_call(kind, "reference", pos, cells, system, index, [qq.abs(), sg, ep],
                           periodic)[0].abs()
                     + 2 * _call(kind, "reference", pos, cells, system, index,
                                 [qq * 0, sg, ep], periodic)[0].abs())
            err = (a.double() - b).abs()
            assert bool((err <= TOLERANCES["mm"][dtype][0] * scale + 1e-30).all()), (err, scale)
            continue
        assert_close_scaled(a, b, "mm", dtype, f"{kind} {backend} output {k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(WIDTH))
def test_gradcheck_and_gradgradcheck(rng, backend, kind):
    pos, cells, system, index, params = _terms(rng, kind, n=8, t=4)
    diff = _diff_params(kind, params)
    inputs = [pos.requires_grad_(True), cells.requires_grad_(True)]
    inputs += [params[k].requires_grad_(True) for k in diff]

    def energy(pos, cells, *ps):
        full = list(params)
        for k, p in zip(diff, ps, strict=False):
            full[k] = p
        return _call(kind, backend, pos, cells, system, index, full, True)[0]

    # fast mode checks random projections of the Jacobian: the same bound, far fewer calls
    assert torch.autograd.gradcheck(energy, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(energy, inputs, fast_mode=True)


# opcheck tests the op registration (schema, fake, autograd), common to every backend
@pytest.mark.parametrize("backend", ["numba"])
@pytest.mark.parametrize("kind", list(WIDTH))
def test_opcheck(rng, backend, kind):
    pos, cells, system, index, params = _terms(rng, kind, n=8, t=4)
    params = [p.requires_grad_(True) if p.is_floating_point() else p for p in params]
    inv = torch.linalg.inv(cells)
    extra = (138.935456,) if kind == "lj_coulomb_pairs" else ()
    args = (pos.requires_grad_(True), cells.requires_grad_(True), inv, system, True, index,
            *params, *extra, True, backend)
    torch.library.opcheck(getattr(op, kind), args)


# ------------------------------------------------------------ fastff::bonded_terms (fused)
def _all_kinds(rng, dtype=torch.float64, nsys=1, periodic=(True, False, True)):
    """Bonds, angles and torsions on one set of chains (shared positions and cells)."""
    pos, cells, system, b_index, b_params = _terms(rng, "harmonic_bonds", n=30, t=20,
                                                   dtype=dtype, nsys=nsys)
    kinds = [(b_index, *b_params)]
    for kind, t in (("harmonic_angles", 15), ("periodic_torsions", 10)):
        _, _, _, index, params = _terms(rng, kind, n=30, t=t, dtype=dtype, nsys=nsys)
        kinds.append((index, *params))
    return pos, cells, system, kinds, periodic


def _fused(backend, pos, cells, system, kinds, periodic, param_grads=True):
    inv = torch.linalg.inv(cells.detach())
    (bi, bk, br), (ai, ak, at), (ti, tk, tn, tp) = kinds
    return op.bonded_terms(pos, cells, inv, system, bi, bk, br, periodic[0], ai, ak, at,
                           periodic[1], ti, tk, tn, tp, periodic[2], param_grads, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bonded_terms_is_the_sum_of_the_kinds(rng, backend, dtype):
    pos, cells, system, kinds, periodic = _all_kinds(rng, nsys=2)
    # as in test_matches_reference: the reference sees the inputs rounded to dtype
    pos, cells = pos.to(dtype).double(), cells.to(dtype).double()
    kinds = [tuple(x.to(dtype).double() if x.is_floating_point() else x for x in kind)
             for kind in kinds]
    separate = [_call(kind, "reference", pos, cells, system, k[0], list(k[1:]), per)
                for kind, k, per in zip(("harmonic_bonds", "harmonic_angles",
                                         "periodic_torsions"), kinds, periodic, strict=True)]
    expected = (sum(s[0] for s in separate), sum(s[1] for s in separate),
                sum(s[2] for s in separate), *(g for s in separate for g in s[3:]))
    cast = [tuple(x.to(dtype) if x.is_floating_point() else x for x in kind) for kind in kinds]
    got = _fused(backend, pos.to(dtype), cells.to(dtype), system, cast, periodic)
    assert len(got) == len(expected) == 9
    for k, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.dtype == dtype
        assert_close_scaled(a, b, "mm", dtype, f"bonded_terms {backend} output {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bonded_terms_with_absent_kinds(rng, backend):
    pos, cells, system, kinds, periodic = _all_kinds(rng)
    empty = (torch.zeros(0, 3, dtype=torch.int64), pos.new_zeros(0), pos.new_zeros(0))
    got = _fused(backend, pos, cells, system, [kinds[0], empty, kinds[2]], periodic)
    bonds = _call("harmonic_bonds", "reference", pos, cells, system, kinds[0][0],
                  list(kinds[0][1:]), periodic[0])
    torsions = _call("periodic_torsions", "reference", pos, cells, system, kinds[2][0],
                     list(kinds[2][1:]), periodic[2])
    assert_close_scaled(got[0], bonds[0] + torsions[0], "mm", torch.float64, "energy")
    assert_close_scaled(got[1], bonds[1] + torsions[1], "mm", torch.float64, "forces")
    assert got[5].shape == got[6].shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bonded_terms_gradcheck_and_gradgradcheck(rng, backend):
    pos, cells, system, kinds, periodic = _all_kinds(rng)
    kinds = [tuple(x[:3] for x in kind) for kind in kinds]  # 3 terms per kind: fast enough
    floats = [(kind, k) for kind in range(3) for k in range(1, len(kinds[kind]))
              if kinds[kind][k].is_floating_point()]
    inputs = [pos.requires_grad_(True), cells.requires_grad_(True)]
    inputs += [kinds[kind][k].clone().requires_grad_(True) for kind, k in floats]

    def energy(pos, cells, *ps):
        full = [list(kind) for kind in kinds]
        for (kind, k), p in zip(floats, ps, strict=True):
            full[kind][k] = p
        return _fused(backend, pos, cells, system, full, periodic)[0]

    assert torch.autograd.gradcheck(energy, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(energy, inputs, fast_mode=True)


def test_bonded_terms_opcheck(rng):
    pos, cells, system, kinds, periodic = _all_kinds(rng)
    kinds = [tuple(x.requires_grad_(True) if x.is_floating_point() else x for x in kind)
             for kind in kinds]
    inv = torch.linalg.inv(cells)
    (bi, bk, br), (ai, ak, at), (ti, tk, tn, tp) = kinds
    args = (pos.requires_grad_(True), cells.requires_grad_(True), inv, system, bi, bk, br,
            periodic[0], ai, ak, at, periodic[1], ti, tk, tn, tp, periodic[2], True, "numba")
    torch.library.opcheck(op.bonded_terms, args)
