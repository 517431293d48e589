"""Message-passing primitives: every backend against the float64 torch reference (including
block boundaries that split receiver rows), gradcheck / gradgradcheck / opcheck of every op, and
the ops that must refuse to be differentiated."""

import pytest
import torch

import fastff
from fastff.kernels.message import cpu_numba, gpu_triton, op, reference
from fastff.testing import tolerance

BACKENDS = ["numba", "triton", "reference"]
MODULES = {"numba": cpu_numba, "triton": gpu_triton, "reference": reference}


def graph(rng, n, cutoff=2.0, dtype=torch.float64, box=None):
    """A random periodic system and its full neighbor list (~10-20 neighbours per atom, or
    fewer with a larger ``box``)."""
    box = box or (n / 0.6) ** (1 / 3) * cutoff / 2.0
    pos = torch.rand(n, 3, dtype=torch.float64) * box
    cell = torch.eye(3, dtype=torch.float64) * box + 0.1 * torch.rand(3, 3, dtype=torch.float64)
    nl = fastff.neighbor_list(pos, cutoff, cell, backend="reference")
    d = nl.distances(pos, cell).to(dtype)
    return nl, d


def params(num_basis, nf, dtype=torch.float64, grad=False):
    ps = [torch.randn(nf, num_basis), torch.randn(nf), torch.randn(nf, nf) / nf**0.5,
          torch.randn(nf)]
    return [p.to(dtype).requires_grad_(grad) for p in ps]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # blocks of 7 edges split rows of ~15 edges: the row-accumulation across blocks is exercised
    monkeypatch.setattr(cpu_numba, "BLOCK", 7)
    monkeypatch.setattr(gpu_triton, "BLOCK", 7)


def _close(got, want, dtype, kind="message"):
    scale = want.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(got.double() / scale, want.double() / scale,
                               **tolerance(kind, dtype))


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_launchers_match_reference(rng, backend, dtype):
    n = 10 if backend == "triton" else 40
    nl, d = graph(rng, n, dtype=dtype)
    nf, num_basis = (5, 4) if backend == "triton" else (24, 10)
    m = MODULES[backend]
    x, g = torch.randn(n, nf, dtype=dtype), torch.randn(n, nf, dtype=dtype)
    w = torch.randn(len(nl), nf, dtype=dtype)
    p = params(num_basis, nf, dtype)
    d64, x64, g64, w64 = d.double(), x.double(), g.double(), w.double()
    p64 = [t.double() for t in p]
    i, j, ptr = nl.i, nl.j, nl.ptr
    _close(m.gms(x, w, i, j, ptr), reference.gms(x64, w64, i, j, ptr), dtype)
    _close(m.ggm(x, g, i, j), reference.ggm(x64, g64, i, j), dtype)
    variants = [("gaussian", "cosine", "shifted_softplus"), ("bessel", "polynomial", "silu")]
    if backend == "triton":  # interpreted: one variant per dtype keeps the run short
        variants = variants[:1] if dtype == torch.float64 else variants[1:]
    for kind, env, act in variants:
        args = (2.0, kind, env, act)
        _close(m.cfconv_forward(x, d, i, j, ptr, *p, *args),
               reference.cfconv_forward(x64, d64, i, j, ptr, *p64, *args), dtype)
        for need in (False, True):
            got = m.cfconv_vjp(g, x, d, i, j, ptr, *p, *args, need)
            want = reference.cfconv_vjp(g64, x64, d64, i, j, ptr, *p64, *args, need)
            for a, b in zip(got, want, strict=True):
                assert a.shape == b.shape
                if b.numel():
                    _close(a, b, dtype)
    coeffs = torch.randn(9, 4, nf, dtype=dtype)
    scale = torch.randn(len(nl), dtype=dtype)
    for order in range(5):
        for s in (None, scale):
            _close(m.spline_conv(x, d, s, coeffs, i, j, ptr, 2.0, order),
                   reference.spline_conv(x64, d64, None if s is None else s.double(),
                                         coeffs.double(), i, j, ptr, 2.0, order), dtype)
        if order < 4:
            _close(m.spline_edge_dot(g, x, d, coeffs, i, j, 2.0, order),
                   reference.spline_edge_dot(g64, x64, d64, coeffs.double(), i, j, 2.0, order),
                   dtype)
        else:
            assert not m.spline_edge_dot(g, x, d, coeffs, i, j, 2.0, order).any()


def _ops(rng, backend, n, nf, num_basis):
    nl, d = graph(rng, n, box=4.0)  # a few neighbours per atom: cheap numerical Jacobians
    d = d.requires_grad_(True)
    x = torch.randn(n, nf, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n, nf, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(nl), nf, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(len(nl), dtype=torch.float64, requires_grad=True)
    coeffs = torch.randn(6, 4, nf, dtype=torch.float64)
    p = params(num_basis, nf, grad=True)
    return nl, (nl.i, nl.j, nl.ptr, nl.reverse), d, x, g, w, scale, coeffs, p


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_every_op(rng, backend):
    n, nf, num_basis = (4, 2, 3) if backend == "triton" else (7, 3, 4)
    nl, a, d, x, g, w, scale, coeffs, p = _ops(rng, backend, n, nf, num_basis)
    cases = {
        "gms": (lambda x, w: op.gms(x, w, *a, backend), (x, w)),
        "ggm": (lambda x, g: op.ggm(x, g, *a, backend), (x, g)),
        "cfconv": (lambda x, d, *p: op.cfconv(x, d, *a, *p, 2.0, "gaussian", "cosine",
                                               "shifted_softplus", backend), (x, d, *p)),
        "spline_conv": (lambda x, d, s: op.spline_conv(x, d, s, coeffs, *a, 2.0, 0, backend),
                        (x, d, scale)),
        "spline_edge_dot": (lambda g, x, d: op.spline_edge_dot(g, x, d, coeffs, *a, 2.0, 0,
                                                               backend), (g, x, d)),
    }
    for name, (f, inputs) in cases.items():
        assert torch.autograd.gradcheck(f, inputs), name
        assert torch.autograd.gradgradcheck(f, inputs), name


def test_third_order_cfconv(rng):
    """d^3 through cfconv (composite backward of the composite backward) matches the reference."""
    nl, a, d, x, g, w, scale, coeffs, p = _ops(rng, "numba", 4, 2, 2)
    assert torch.autograd.gradgradcheck(
        lambda d: torch.autograd.grad(
            op.cfconv(x, d, *a, *p, 2.0, "bessel", "polynomial", "silu", "numba").pow(2).sum(),
            d, create_graph=True)[0], (d,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_op(rng, backend):
    n, nf, num_basis = (4, 2, 3) if backend == "triton" else (7, 3, 4)
    nl, a, d, x, g, w, scale, coeffs, p = _ops(rng, backend, n, nf, num_basis)
    i, j, ptr, rev = a
    filt = (2.0, "gaussian", "cosine", "shifted_softplus")
    torch.library.opcheck(op.gms, (x, w, *a, backend))
    torch.library.opcheck(op.ggm, (x, g, *a, backend))
    torch.library.opcheck(op.cfconv, (x, d, *a, *p, *filt, backend))
    detached = [t.detach() for t in (g, x, d, *p)]
    torch.library.opcheck(op.cfconv_vjp, (*detached[:3], i, j, ptr, *detached[3:], *filt, True,
                                          backend))
    torch.library.opcheck(op.spline_conv, (x, d, scale, coeffs, *a, 2.0, 1, backend))
    torch.library.opcheck(op.spline_conv, (x, d, None, coeffs, *a, 2.0, 0, backend))
    torch.library.opcheck(op.spline_edge_dot, (g, x, d, coeffs, *a, 2.0, 2, backend))


def test_no_silent_zero_gradients(rng):
    nl, a, d, x, g, w, scale, coeffs, p = _ops(rng, "numba", 6, 3, 4)
    i, j, ptr, rev = a
    out = op.cfconv_vjp(g, x, d, i, j, ptr, *p, 2.0, "gaussian", "cosine", "silu", True, "numba")
    with pytest.raises(RuntimeError, match="no derivative"):
        out[0].sum().backward()
    table = coeffs.clone().requires_grad_(True)
    y = op.spline_conv(x, d, None, table, *a, 2.0, 0, "numba")
    with pytest.raises(RuntimeError, match="tabulated"):
        y.sum().backward()
