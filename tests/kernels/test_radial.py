"""Radial bases: every backend against the float64 torch reference, the closed-form derivatives
against torch autograd, gradcheck / gradgradcheck / opcheck, and bad input."""

import pytest
import torch

import fastff.mp as mp
from fastff.kernels.radial import cpu_numba, gpu_triton, op, reference
from fastff.testing import tolerance

KINDS = ["gaussian", "bessel"]
ENVS = ["none", "cosine", "polynomial"]
LAUNCHERS = {"numba": cpu_numba.radial_basis, "triton": gpu_triton.radial_basis}


def _distances(n, cutoff, dtype=torch.float64):
    # [0.2, 1.2 cutoff): inside and beyond the cutoff, away from the Bessel singularity at 0
    return (torch.rand(n, dtype=torch.float64) * 1.0 + 0.2 / cutoff).mul(cutoff).to(dtype)


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("envelope", ENVS)
@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_matches_reference(rng, backend, kind, envelope, order):
    cutoff = float(rng.uniform(2.0, 6.0))
    num_basis = int(rng.integers(1, 12))
    for dtype in (torch.float64, torch.float32):
        d = _distances(40 if backend == "triton" else 500, cutoff, dtype)
        want = reference.radial_basis(d.double(), num_basis, cutoff, kind, envelope, order)
        got = LAUNCHERS[backend](d, num_basis, cutoff, kind, envelope, order)
        assert got.dtype == dtype and got.shape == want.shape
        scale = want.abs().max().clamp_min(1e-30)
        torch.testing.assert_close((got.double() / scale), want / scale,
                                   **tolerance("radial", dtype))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("envelope", ENVS)
@pytest.mark.parametrize("order", [0, 1, 2])
def test_numba_orders_in_one_pass(rng, kind, envelope, order):
    """radial_orders (what the blocked filters read: the bare basis and the envelope, all orders
    in one pass) against the reference at every order, with distances at zero (Bessel's limit)
    and beyond the cutoff."""
    from fastff.kernels.radial.reference import envelope_derivatives

    cutoff = float(rng.uniform(2.0, 6.0))
    num_basis = int(rng.integers(1, 40))
    for dtype in (torch.float64, torch.float32):
        d = _distances(500, cutoff, dtype)
        d[0] = 0.0
        basis, env = cpu_numba.radial_orders(d, num_basis, cutoff, kind, envelope, order)
        assert len(basis) == len(env) == order + 1
        env_want = envelope_derivatives(d.double(), cutoff, envelope, order)
        for n, (g, u) in enumerate(zip(basis, env, strict=True)):
            want = reference.radial_basis(d.double(), num_basis, cutoff, kind, "none", n)
            assert g.dtype == dtype and g.shape == want.shape
            scale = want.abs().max().clamp_min(1e-30)
            torch.testing.assert_close(g.double() / scale, want / scale,
                                       **tolerance("radial", dtype))
            assert u.dtype == dtype and u.shape == d.shape
            scale = env_want[n].abs().max().clamp_min(1e-30)
            torch.testing.assert_close(u.double() / scale, env_want[n] / scale,
                                       **tolerance("radial", dtype))
    with pytest.raises(ValueError, match="order must be"):
        cpu_numba.radial_orders(d, num_basis, cutoff, kind, envelope, 3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("envelope", ENVS)
def test_closed_forms_match_autograd(rng, kind, envelope):
    cutoff = float(rng.uniform(2.0, 6.0))
    d = _distances(50, cutoff).requires_grad_(True)
    y = reference.radial_basis(d, 6, cutoff, kind, envelope, 0)
    want = [y]
    for _ in range(2):
        prev = want[-1]
        want.append(torch.stack([torch.autograd.grad(prev[:, k].sum(), d, create_graph=True)[0]
                                 for k in range(6)], 1))
    for order in (1, 2):
        got = reference.radial_basis(d.detach(), 6, cutoff, kind, envelope, order)
        torch.testing.assert_close(got, want[order].detach(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["numba", "triton", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_any_order(rng, backend, kind):
    cutoff = float(rng.uniform(2.0, 6.0))
    d = _distances(6, cutoff).requires_grad_(True)
    envelope = ["cosine", "polynomial"][int(rng.integers(2))]

    def f(d):
        return mp.radial_basis(d, num_basis=3, cutoff=cutoff, kind=kind, envelope=envelope,
                               backend=backend)

    assert torch.autograd.gradcheck(f, (d,))
    assert torch.autograd.gradgradcheck(f, (d,))


@pytest.mark.parametrize("backend", ["numba", "triton", "reference"])
def test_opcheck(rng, backend):
    d = _distances(7, 4.0).requires_grad_(True)
    torch.library.opcheck(op.radial_basis, (d, 5, 4.0, "gaussian", "cosine", 0, backend))
    torch.library.opcheck(op.radial_basis, (d, 5, 4.0, "bessel", "polynomial", 1, backend))


def test_bad_input():
    d = torch.rand(5, dtype=torch.float64) + 0.1
    with pytest.raises(ValueError, match="num_basis"):
        mp.radial_basis(d, num_basis=0, cutoff=5.0)
    with pytest.raises(ValueError, match="cutoff"):
        mp.radial_basis(d, num_basis=4, cutoff=-1.0)
    with pytest.raises(ValueError, match="kind"):
        mp.radial_basis(d, num_basis=4, cutoff=5.0, kind="sinc")
    with pytest.raises(ValueError, match="envelope"):
        mp.radial_basis(d, num_basis=4, cutoff=5.0, envelope="exp")
    with pytest.raises(ValueError, match="distances"):
        mp.radial_basis(d.view(5, 1), num_basis=4, cutoff=5.0)
    with pytest.raises(TypeError, match="distances"):
        mp.radial_basis(torch.arange(5), num_basis=4, cutoff=5.0)
