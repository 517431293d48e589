"""Message-passing primitives: every backend against the float64 torch reference (including
block boundaries that split receiver rows), gradcheck / gradgradcheck / opcheck of every op, and
the ops that must refuse to be differentiated."""

import math

import pytest
import torch

import fastff
from fastff.kernels.message import cpu_numba, dense, gpu_triton, op, reference
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
    monkeypatch.setattr(cpu_numba, "BLOCK_FEATURES", 60)  # 2 to 20 pairs per block
    monkeypatch.setattr(cpu_numba, "SMALL_F_GROWTH", 1.0)
    monkeypatch.setattr(cpu_numba, "PAINN_BLOCK", 7)
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
        rev = nl.reverse
        # one filter per pair (mirrored distances equal, as from positions), or two per pair
        # where they differ (here: every edge, independently skewed)
        skewed = d * (1 + 0.05 * torch.rand(len(nl), dtype=dtype))
        for dd in (d, skewed):
            assert torch.equal(dd, dd[rev]) == (dd is d)
            dd64 = dd.double()
            _close(m.cfconv_forward(x, dd, i, j, ptr, rev, *p, *args),
                   reference.cfconv_forward(x64, dd64, i, j, ptr, rev, *p64, *args), dtype)
            for need, need_x, need_d in ((False, False, True), (True, True, True),
                                         (False, True, True), (True, True, False),
                                         (True, False, False), (False, True, False)):
                got = m.cfconv_vjp(g, x, dd, i, j, ptr, rev, *p, *args, need, need_x, need_d)
                want = reference.cfconv_vjp(g64, x64, dd64, i, j, ptr, rev, *p64, *args, need,
                                            need_x, need_d)
                for a, b in zip(got, want, strict=True):
                    assert a.shape == b.shape
                    if b.numel():
                        _close(a, b, dtype)
            # the second backward of force training: d<v, grad_d>/d(g, x, d, parameters)
            v = torch.randn(len(nl), dtype=dtype)
            for need_g, need_x, need, need_d in ((True, True, True, True),
                                                 (False, True, False, True),
                                                 (True, False, False, True),
                                                 (True, True, True, False),
                                                 (False, True, True, False),
                                                 (True, False, False, False)):
                got = m.cfconv_vjp_vjp(v, g, x, dd, i, j, ptr, rev, *p, *args, need_g, need_x,
                                       need, need_d)
                want = reference.cfconv_vjp_vjp(v.double(), g64, x64, dd64, i, j, ptr, rev,
                                                *p64, *args, need_g, need_x, need, need_d)
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
        # its first derivative is the fused cfconv_vjp_vjp (the d-gradient's cotangent alone)
        # or the composite (all outputs); its second the composite
        "cfconv_vjp (distances)": (lambda g, x, d, *p: op.cfconv_vjp(
            g, x, d, *a, *p, 2.0, "bessel", "polynomial", "silu", True, False, backend)[1],
            (g, x, d, *p)),
        "cfconv_vjp (all)": (lambda g, x, d, *p: op.cfconv_vjp(
            g, x, d, *a, *p, 2.0, "gaussian", "cosine", "shifted_softplus", True, True,
            backend), (g, x, d, *p)),
        "cfconv_vjp_vjp": (lambda v, g, x, d, *p: op.cfconv_vjp_vjp(
            v, g, x, d, *a, *p, 2.0, "gaussian", "cosine", "silu", True, True, True, backend),
            (scale, g, x, d, *p)),
        "spline_conv": (lambda x, d, s: op.spline_conv(x, d, s, coeffs, *a, 2.0, 0, backend),
                        (x, d, scale)),
        "spline_edge_dot": (lambda g, x, d: op.spline_edge_dot(g, x, d, coeffs, *a, 2.0, 0,
                                                               backend), (g, x, d)),
    }
    fast = backend == "triton"  # interpreted: the random-projection (fast mode) checks
    for name, (f, inputs) in cases.items():
        assert torch.autograd.gradcheck(f, inputs, fast_mode=fast), name
        # the second derivatives of the backward ops are composites of the ops above, whose
        # own are checked here on every backend: interpreted Triton skips them (minutes)
        if not (fast and name.startswith("cfconv_vjp")):
            assert torch.autograd.gradgradcheck(f, inputs, fast_mode=fast), name


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
    torch.library.opcheck(op.cfconv_vjp, (*detached[:3], i, j, ptr, rev, *detached[3:], *filt,
                                          True, True, backend))
    v = torch.randn(len(nl), dtype=torch.float64)
    torch.library.opcheck(op.cfconv_vjp_vjp, (v, *detached[:3], i, j, ptr, rev, *detached[3:],
                                              *filt, True, True, True, backend))
    torch.library.opcheck(op.spline_conv, (x, d, scale, coeffs, *a, 2.0, 1, backend))
    torch.library.opcheck(op.spline_conv, (x, d, None, coeffs, *a, 2.0, 0, backend))
    torch.library.opcheck(op.spline_edge_dot, (g, x, d, coeffs, *a, 2.0, 2, backend))


def test_no_silent_zero_gradients(rng):
    nl, a, d, x, g, w, scale, coeffs, p = _ops(rng, "numba", 6, 3, 4)
    table = coeffs.clone().requires_grad_(True)
    y = op.spline_conv(x, d, None, table, *a, 2.0, 0, "numba")
    with pytest.raises(RuntimeError, match="tabulated"):
        y.sum().backward()


# ---------------------------------------------------------------- fused spline_conv backward
def _vjp_inputs(rng, n, dtype, cutoff=2.0):
    """A full list whose mirrored distances are bitwise equal except for planted edges: one
    whose mirror has another distance (d_rev != d), one beyond the cutoff on both sides, one
    beyond it only for d_rev and one only for d."""
    nl, d = graph(rng, n, cutoff, dtype=dtype)
    assert torch.equal(d[nl.reverse], d) and len(nl) >= 6  # the one-interval case is the norm
    d = d.clone()
    d_rev = d[nl.reverse].clone()
    d_rev[0] = d_rev[0] * 0.37  # another interval of the table
    d[1] = d_rev[1] = cutoff + 0.25
    d_rev[2] = cutoff
    d[3] = cutoff * 1.5
    return nl, d, d_rev


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spline_conv_vjp_matches_reference(rng, backend, dtype):
    """Both halves against the float64 reference (the unfused pair), orders 0..3."""
    # Triton, interpreted: small; F = 70 is two feature blocks (partial dots summed)
    n, nf = (40, 24) if backend == "numba" else (10, 70 if dtype == torch.float64 else 5)
    orders = range(4) if backend == "numba" else (0, 2)
    m = MODULES[backend]
    nl, d, d_rev = _vjp_inputs(rng, n, dtype)
    i, j, ptr = nl.i, nl.j, nl.ptr
    x, g = torch.randn(n, nf, dtype=dtype), torch.randn(n, nf, dtype=dtype)
    coeffs = torch.randn(9, 4, nf, dtype=dtype)
    wide = [t.double() for t in (g, x, d, d_rev, coeffs)]
    for order in orders:
        gx, gd = m.spline_conv_vjp(g, x, d, d_rev, coeffs, i, j, ptr, 2.0, order)
        want_x, want_d = reference.spline_conv_vjp(*wide, i, j, ptr, 2.0, order)
        assert gx.dtype == gd.dtype == dtype
        _close(gx, want_x, dtype)
        _close(gd, want_d, dtype)
        assert gd[1] == 0 and gd[3] == 0  # beyond the cutoff: exactly zero
    # an out-of-range sender is skipped: as if its edge were beyond the cutoff on both sides
    bad_j = j.clone()
    bad_j[5] = n
    far, far_rev = d.clone(), d_rev.clone()
    far[5] = far_rev[5] = 3.0
    gx, gd = m.spline_conv_vjp(g, x, d, d_rev, coeffs, i, bad_j, ptr, 2.0, 1)
    want_x, want_d = m.spline_conv_vjp(g, x, far, far_rev, coeffs, i, j, ptr, 2.0, 1)
    assert gd[5] == 0
    torch.testing.assert_close(gx, want_x, rtol=0, atol=0)
    torch.testing.assert_close(gd, want_d, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spline_conv_vjp_empty_edge_set(backend):
    n, nf = 5, 3
    empty = torch.zeros(0, dtype=torch.int64)
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    d = torch.zeros(0, dtype=torch.float64)
    g, x = torch.randn(n, nf, dtype=torch.float64), torch.randn(n, nf, dtype=torch.float64)
    coeffs = torch.randn(6, 4, nf, dtype=torch.float64)
    gx, gd = op.spline_conv_vjp(g, x, d, d, coeffs, empty, empty, ptr, empty, 2.0, 0, backend)
    assert gx.shape == (n, nf) and not gx.any() and gd.shape == (0,)


def _fused_node(t):
    return "spline_conv_vjp" in t.grad_fn.name()


@pytest.mark.parametrize("backend", BACKENDS)
def test_spline_conv_fused_backward_any_order(rng, backend):
    """spline_conv without scale, x and d both wanted: its backward is the fused op. gradcheck
    and gradgradcheck through spline_conv (the fused op and its own backward); then the fused op
    alone with an independent d_rev (its second-interval branch), and a third order (the fused
    op's backward differentiated again: it must stay connected to the inputs)."""
    n, nf = (4, 2) if backend == "triton" else (7, 3)
    nl, a, d, x, g, w, scale, coeffs, p = _ops(rng, backend, n, nf, 3)

    def conv(x, d):
        return op.spline_conv(x, d, None, coeffs, *a, 2.0, 0, backend)

    gx, gd = torch.autograd.grad(conv(x, d).pow(2).sum(), (x, d), create_graph=True)
    assert _fused_node(gx) and _fused_node(gd)
    fast = backend == "triton"  # interpreted: the random-projection (fast mode) checks
    assert torch.autograd.gradcheck(conv, (x, d), fast_mode=fast)
    assert torch.autograd.gradgradcheck(conv, (x, d), fast_mode=fast)
    if backend == "triton":  # interpreted, the rest takes minutes (numba runs the same checks)
        return
    d_rev = (d.detach()[nl.reverse] + 0.05 * torch.rand(len(nl), dtype=d.dtype))

    def fused(g, x, d, d_rev):
        return op.spline_conv_vjp(g, x, d, d_rev, coeffs, *a, 2.0, 1, backend)

    inputs = (g, x, d, d_rev.requires_grad_(True))
    assert torch.autograd.gradcheck(fused, inputs)
    assert torch.autograd.gradgradcheck(fused, inputs)
    assert torch.autograd.gradgradcheck(
        lambda x, d: torch.autograd.grad(conv(x, d).pow(2).sum(), (x, d), create_graph=True),
        (x, d))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_spline_conv_vjp(rng, backend):
    n, nf = (4, 2) if backend == "triton" else (7, 3)
    nl, a, d, x, g, w, scale, coeffs, p = _ops(rng, backend, n, nf, 3)
    d_rev = d.detach()[a[3]].clone().requires_grad_(True)
    torch.library.opcheck(op.spline_conv_vjp, (g, x, d, d_rev, coeffs, *a, 2.0, 0, backend))
    torch.library.opcheck(op.spline_conv_vjp, (g.detach(), x.detach(), d.detach(),
                                               d_rev.detach(), coeffs, *a, 2.0, 2, backend))


# ---------------------------------------------------------------- PaiNN message
PAINN_FILTER = (2.0, "bessel", "cosine")


def _painn_inputs(n, nf, num_basis, dtype=torch.float64, grad=False):
    phi = torch.randn(n, 3 * nf, dtype=dtype)
    v = torch.randn(n, 3, nf, dtype=dtype)
    wf, bf = torch.randn(3 * nf, num_basis, dtype=dtype), torch.randn(3 * nf, dtype=dtype)
    return [t.requires_grad_(grad) for t in (phi, v, wf, bf)]


def _units(nl, dtype=torch.float64):
    """Random unit vectors, exactly negated on mirrored edges (as nl.vectors gives them)."""
    u = torch.nn.functional.normalize(torch.randn(len(nl), 3, dtype=dtype), dim=1)
    upper = torch.arange(len(nl)) < nl.reverse
    u[nl.reverse[upper]] = -u[upper]
    return u


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_painn_launchers_match_reference(rng, backend, dtype):
    """Forward and fused backward against the edge-by-edge reference, with mirrored distances
    (one filter per block) and with distances whose mirror differs (a second filter)."""
    n, nf, num_basis = (6, 2, 3) if backend == "triton" else (40, 12, 6)
    nl, d = graph(rng, n, dtype=dtype)
    m = MODULES[backend]
    phi, v, wf, bf = _painn_inputs(n, nf, num_basis, dtype)
    gs, gv = torch.randn(n, nf, dtype=dtype), torch.randn(n, 3, nf, dtype=dtype)
    unit = _units(nl, dtype)
    a = (nl.i, nl.j, nl.ptr)
    skewed = d * (1 + 0.05 * torch.rand(len(nl), dtype=dtype))
    # interpreted Triton: the second filter in float64, the shared one in float32
    cases = [skewed if dtype == torch.float64 else d] if backend == "triton" else [d, skewed]
    for dist in cases:
        t64 = [t.double() for t in (phi, v, dist, unit)]
        p64 = [t.double() for t in (wf, bf)]
        got = m.painn_forward(phi, v, dist, unit, *a, wf, bf, *PAINN_FILTER)
        want = reference.painn_forward(*t64, *a, *p64, *PAINN_FILTER)
        for x, y in zip(got, want, strict=True):
            _close(x, y, dtype)
        for need in (False, True):
            got = m.painn_vjp(gs, gv, phi, v, dist, unit, *a, nl.reverse, wf, bf, *PAINN_FILTER,
                              need)
            want = reference.painn_vjp(gs.double(), gv.double(), *t64, *a, nl.reverse, *p64,
                                       *PAINN_FILTER, need)
            for x, y in zip(got, want, strict=True):
                assert x.shape == y.shape
                if y.numel():
                    _close(x, y, dtype)


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_painn_out_of_range_sender_is_skipped(rng, backend):
    """An out-of-range sender (possible only with value checks off) contributes nothing and is
    never read: the forward equals the reference without that edge, its gradients are zero."""
    n, nf = 9, 3
    nl, d = graph(rng, n)
    m = MODULES[backend]
    phi, v, wf, bf = _painn_inputs(n, nf, 4)
    unit = _units(nl)
    bad_j = nl.j.clone()
    bad_j[5] = n + 3
    keep = torch.arange(len(nl)) != 5
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(nl.i[keep], minlength=n), 0)
    got = m.painn_forward(phi, v, d, unit, nl.i, bad_j, nl.ptr, wf, bf, *PAINN_FILTER)
    want = reference.painn_forward(phi, v, d[keep], unit[keep], nl.i[keep], nl.j[keep], ptr, wf,
                                   bf, *PAINN_FILTER)
    for x, y in zip(got, want, strict=True):
        _close(x, y, torch.float64)
    gs, gv = torch.randn(n, nf, dtype=torch.float64), torch.randn(n, 3, nf, dtype=torch.float64)
    grads = m.painn_vjp(gs, gv, phi, v, d, unit, nl.i, bad_j, nl.ptr, nl.reverse, wf, bf,
                        *PAINN_FILTER, True)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[2][5] == 0 and not grads[3][5].any()


def _painn_op(a, backend):
    def f(phi, v, d, unit, wf, bf):
        return op.painn_message(phi, v, d, unit, *a, wf, bf, *PAINN_FILTER, backend)
    return f


@pytest.mark.parametrize("backend", BACKENDS)
def test_painn_gradcheck_and_opcheck(rng, backend, monkeypatch):
    """First order runs the fused painn_message_vjp, second order the composite backward."""
    n, nf = (3, 2) if backend == "triton" else (7, 3)
    nl, a, d, *_ = _ops(rng, backend, n, nf, 3)
    phi, v, wf, bf = _painn_inputs(n, nf, 3, grad=True)
    unit = _units(nl).requires_grad_(True)
    f = _painn_op(a, backend)
    inputs = (phi, v, d, unit, wf, bf)
    calls = []
    fused = op.painn_message_vjp
    monkeypatch.setattr(op, "painn_message_vjp", lambda *args: calls.append(1) or fused(*args))
    ds, dv = f(*inputs)
    torch.autograd.grad(ds.sum() + dv.pow(2).sum(), phi)
    assert calls  # no graph asked for: the fused op
    ds, dv = f(*inputs)
    calls.clear()
    torch.autograd.grad(ds.sum() + dv.pow(2).sum(), phi, create_graph=True)
    assert not calls  # a graph: the composite backward
    monkeypatch.undo()
    # interpreted Triton: the fast (random-projection) Jacobian check
    assert torch.autograd.gradcheck(f, inputs, fast_mode=backend == "triton")
    torch.library.opcheck(op.painn_message, (*inputs[:4], *a, wf, bf, *PAINN_FILTER, backend))
    if backend == "triton":  # interpreted; the composite backward is gms's, gradgradchecked above
        return
    assert torch.autograd.gradgradcheck(f, inputs)
    g = [torch.randn(n, nf, dtype=torch.float64), torch.randn(n, 3, nf, dtype=torch.float64)]
    detached = [t.detach() for t in inputs]
    for need in (False, True):
        torch.library.opcheck(op.painn_message_vjp, (*g, *detached[:4], *a, *detached[4:],
                                                     *PAINN_FILTER, need, backend))


def test_painn_vjp_refuses_differentiation(rng):
    nl, a, d, *_ = _ops(rng, "numba", 6, 3, 4)
    phi, v, wf, bf = _painn_inputs(6, 3, 4, grad=True)
    g = [torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, 3, dtype=torch.float64)]
    out = op.painn_message_vjp(*g, phi, v, d, _units(nl), *a, wf, bf, *PAINN_FILTER, True,
                               "numba")
    with pytest.raises(RuntimeError, match="no derivative"):
        out[0].sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_painn_empty_edge_set(backend):
    n, nf = 5, 3
    empty = torch.zeros(0, dtype=torch.int64)
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    d, unit = torch.zeros(0, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64)
    phi, v, wf, bf = _painn_inputs(n, nf, 4, grad=True)
    ds, dv = op.painn_message(phi, v, d, unit, empty, empty, ptr, empty, wf, bf, *PAINN_FILTER,
                              backend)
    assert ds.shape == (n, nf) and dv.shape == (n, 3, nf) and not ds.any() and not dv.any()
    gphi, gwf = torch.autograd.grad(ds.sum() + dv.sum(), (phi, wf))
    assert not gphi.any() and not gwf.any()


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_cfconv_out_of_range_pair_end_is_skipped(rng, backend):
    """A pair whose end is out of range (possible only with value checks off) contributes
    nothing and is never read: the forward and the gradients equal the reference without that
    pair, and its edges get no d-gradient."""
    n, nf, num_basis = 9, 3, 4
    nl, d = graph(rng, n)
    m = MODULES[backend]
    rev = nl.reverse
    bad = int(torch.nonzero(torch.arange(len(nl)) < rev)[3])  # the canonical edge of a pair
    bad_j = nl.j.clone()
    bad_j[bad] = n + 3
    keep = (torch.arange(len(nl)) != bad) & (torch.arange(len(nl)) != rev[bad])
    new_index = torch.cumsum(keep.long(), 0) - 1
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(nl.i[keep], minlength=n), 0)
    kept = (nl.i[keep], nl.j[keep], ptr, new_index[rev[keep]])
    p = params(num_basis, nf)
    x, g = torch.randn(n, nf, dtype=torch.float64), torch.randn(n, nf, dtype=torch.float64)
    filt = (2.0, "gaussian", "cosine", "shifted_softplus")
    _close(m.cfconv_forward(x, d, nl.i, bad_j, nl.ptr, rev, *p, *filt),
           reference.cfconv_forward(x, d[keep], *kept, *p, *filt), torch.float64)
    got = m.cfconv_vjp(g, x, d, nl.i, bad_j, nl.ptr, rev, *p, *filt, True, True)
    want = reference.cfconv_vjp(g, x, d[keep], *kept, *p, *filt, True, True)
    assert got[1][bad] == 0 and got[1][rev[bad]] == 0
    _close(got[1][keep], want[1], torch.float64)
    for a, b in zip(got[:1] + got[2:], want[:1] + want[2:], strict=True):
        _close(a, b, torch.float64)
    v = torch.randn(len(nl), dtype=torch.float64)
    got = m.cfconv_vjp_vjp(v, g, x, d, nl.i, bad_j, nl.ptr, rev, *p, *filt, True, True, True)
    want = reference.cfconv_vjp_vjp(v[keep], g, x, d[keep], *kept, *p, *filt, True, True, True)
    assert got[2][bad] == 0 and got[2][rev[bad]] == 0
    _close(got[2][keep], want[2], torch.float64)
    for a, b in zip(got[:2] + got[3:], want[:2] + want[3:], strict=True):
        _close(a, b, torch.float64)


@pytest.mark.parametrize("kind", ["shifted_softplus", "silu"])
def test_numba_fused_activation_matches_torch_float64(kind):
    """The one-pass float32 activation (polynomial exp / log1p) of the numba filter networks:
    values and slopes within a few float32 ulp of max(1, |value|) of torch in float64, over
    random pre-activations, extremes and sizes that are not a multiple of its chunk."""
    from fastff.kernels.message.cpu_numba_activation import FusedActivation

    h = torch.randn(int(torch.randint(1, 5000, ())), 3) * 10
    h.view(-1)[:10] = torch.tensor([0.0, -0.0, 1e-8, -1e-8, 30.0, -30.0, 88.0, -88.0, 200.0,
                                    -200.0])[:h.numel()]
    act = FusedActivation(kind)
    values, slopes = act.values_and_slope(h)
    assert torch.equal(act.values(h), values)
    h64 = h.double()
    s64 = torch.sigmoid(h64)
    if kind == "silu":
        want, want_slope = h64 * s64, s64 * (1 + h64 * (1 - s64))
    else:
        want, want_slope = torch.nn.functional.softplus(h64) - math.log(2.0), s64
    torch_values, torch_slopes = dense.as_activation(kind).values_and_slope(h)
    for got, ref, torch32 in ((values, want, torch_values), (slopes, want_slope, torch_slopes)):
        assert got.dtype == torch.float32

        def err(t, ref=ref):
            return float(((t.double() - ref).abs() / ref.abs().clamp_min(1.0)).max())

        # silu's slope s (1 + h (1 - s)) cancels in float32 (8 ulp at h ~ 17, torch alike)
        assert err(got) < max(4 * torch.finfo(torch.float32).eps, 1.01 * err(torch32))
    # float64 and tensors that require grad keep torch's functions (bitwise)
    torch.testing.assert_close(act.values(h64), dense.as_activation(kind).values(h64), rtol=0,
                               atol=0)


@pytest.mark.parametrize("kind", dense.ACTIVATIONS)
def test_numba_fused_filter_terms_match_torch_float64(kind):
    """The one-pass float32 kernels of the numba filter network around its activation: W from
    the hidden layer (its bias added as it is read; envelope and the second bias folded into
    the second GEMM), energy + forces'
    backward terms (env t act'(h), <t, act(h)>) and both from one pass, against
    dense.Activation in float64."""
    from fastff.kernels.message.cpu_numba_activation import FusedActivation

    b, nf = int(torch.randint(1, 300, ())), int(torch.randint(1, 70, ()))
    h, t, b1 = torch.randn(b, nf) * 4, torch.randn(b, nf), torch.randn(nf)
    env, w2, b2 = torch.rand(b), torch.randn(nf, nf) / nf**0.5, torch.randn(nf)
    fused, exact = FusedActivation(kind), dense.Activation(kind)
    want = exact.filter_values(h.double(), b1.double(), env.double(), w2.double(), b2.double())
    got = fused.filter_values(h, b1, env, w2, b2)
    assert got.dtype == torch.float32 and got.shape == (b, nf)
    _close(got, want, torch.float32)
    got_g, got_ta = fused.vjp_terms(h, b1, t, env)
    want_g, want_ta = exact.vjp_terms(h.double(), b1.double(), t.double(), env.double())
    assert got_g.shape == (b, nf) and got_ta.shape == (b,)
    _close(got_g, want_g, torch.float32)
    _close(got_ta, want_ta, torch.float32)
    got_all = fused.vjp_terms_and_values(h, b1, t, env, w2, b2)
    assert [x.shape for x in got_all] == [(b, nf), (b,), (b, nf)]
    for g, w in zip(got_all, (want_g, want_ta, want), strict=True):
        _close(g, w, torch.float32)
    # an operand that requires grad keeps torch's (differentiable) formulas
    env_grad = env.clone().requires_grad_(True)
    assert fused.filter_values(h, b1, env_grad, w2, b2).requires_grad
    assert fused.vjp_terms(h, b1, t, env_grad)[0].requires_grad  # g = env t act'(h + b1)
    g_env, _, w_env = fused.vjp_terms_and_values(h, b1, t, env_grad, w2, b2)
    assert g_env.requires_grad and w_env.requires_grad
    b1_grad = b1.clone().requires_grad_(True)
    assert fused.filter_values(h, b1_grad, env, w2, b2).requires_grad
    assert fused.vjp_terms(h, b1_grad, t, env)[0].requires_grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numba_second_order_terms_match_torch(dtype):
    """The one-pass elementwise terms of force training's second backward (numba) against the
    torch formulas of dense.Activation, with and without parameter gradients."""
    from fastff.kernels.message.cpu_numba_activation import FusedActivation

    b, nf = int(torch.randint(1, 300, ())), int(torch.randint(1, 70, ()))
    args = [torch.randn(b, nf, dtype=dtype) for _ in range(6)]
    args += [torch.randn(b, dtype=dtype) for _ in range(3)]
    for need_params in (False, True):
        want = dense.Activation("shifted_softplus").second_order_terms(*args, need_params)
        got = FusedActivation("shifted_softplus").second_order_terms(*args, need_params)
        for g, w in zip(got, want, strict=True):
            if w is None:
                assert g is None
                continue
            assert g.dtype == dtype and g.shape == w.shape
            _close(g, w, dtype)


def _radial64(d, num_basis, cutoff, kind, env_kind, order):
    """The radial_fn of dense's blocked functions from the float64 reference formulas."""
    from fastff.kernels.radial.reference import basis_derivatives

    return (basis_derivatives(d, num_basis, cutoff, kind, order)[:order + 1],
            dense.envelope(d, cutoff, env_kind, order))


@pytest.mark.parametrize(("num_basis", "nf", "env_kind", "kind"), [
    (50, 128, "cosine", "shifted_softplus"), (32, 37, "polynomial", "silu"),
    (3, 5, "none", "shifted_softplus"), (1, 16, "cosine", "silu")])
def test_numba_fused_gaussian_filter_matches_float64(num_basis, nf, env_kind, kind):
    """The numba filter network fused from the distances (gaussian band of 16 functions in the
    first layer, no first GEMM): W; the gradients of <u, W> in the distances (with and without
    W) and the parameters; force training's second-order terms (dense.filter_vjp_vjp) with and
    without parameter gradients; all against dense.Activation's formulas in float64.
    Distances at 0, at and beyond the cutoff, and beyond the last function's band (where the
    first layer is b1)."""
    from fastff.kernels.message.cpu_numba_filter import FusedFilter
    from fastff.kernels.radial.cpu_numba import radial_orders

    cutoff, b = 3.0, int(torch.randint(1, 700, ()))
    d = torch.rand(b) * cutoff * 1.2
    d[:4] = torch.tensor([0.0, cutoff, cutoff * 1.1, 30 * cutoff])[:b]
    ps = [torch.randn(nf, num_basis), torch.randn(nf), torch.randn(nf, nf) / nf**0.5,
          torch.randn(nf)]
    p64 = [p.double() for p in ps]
    u, weight = torch.randn(b, nf), torch.randn(b)
    fused, exact = FusedFilter(kind), dense.Activation(kind)
    args, args64 = ("gaussian", env_kind, radial_orders), ("gaussian", env_kind, _radial64)
    got = fused.filter_from_distances(d, ps, cutoff, *args[:2], radial_orders)
    want = exact.filter_from_distances(d.double(), p64, cutoff, *args64)
    assert got.dtype == torch.float32 and got.shape == (b, nf)
    _close(got, want, torch.float32)
    for need_params in (False, True):
        want = exact.filter_vjp_from_distances(u.double(), d.double(), p64, cutoff,
                                               *args64[:2], need_params, True, _radial64)
        for need_values in (False, True):
            got = fused.filter_vjp_from_distances(u, d, ps, cutoff, *args[:2], need_params,
                                                  need_values, radial_orders)
            assert got[0].shape == (b,)
            for g, w in zip(got, want[:5] + (want[5] if need_values else None,), strict=True):
                if w is None:
                    assert g is None
                else:
                    assert g.dtype == torch.float32 and g.shape == w.shape
                    _close(g, w, torch.float32)
        got = fused.filter_vjp_vjp_from_distances(u, weight, d, ps, cutoff, *args[:2],
                                                  need_params, radial_orders)
        want = exact.filter_vjp_vjp_from_distances(u.double(), weight.double(), d.double(),
                                                   p64, cutoff, *args64[:2], need_params,
                                                   _radial64)
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if w is not None:
                assert g.dtype == torch.float32 and g.shape == w.shape
                _close(g, w, torch.float32)
    # what the kernels do not cover takes the basis + GEMM path, with the same results
    bessel = fused.filter_from_distances(d, ps, cutoff, "bessel", env_kind, radial_orders)
    _close(bessel, exact.filter_from_distances(d.double(), p64, cutoff, "bessel", env_kind,
                                               _radial64), torch.float32)
    trained = [p.clone().requires_grad_(True) for p in ps]  # differentiable: torch formulas
    assert fused.filter_from_distances(d, trained, cutoff, "gaussian", env_kind,
                                       radial_orders).requires_grad


def test_mirror_pairs_reused_only_for_the_same_unchanged_list(rng):
    """One MirrorPairs serves every call on the same (i, j, rev) tensors; another list, an
    in-place change or a freed list gets its own, equal to a fresh construction."""
    nl, _ = graph(rng, 30)
    i, j, rev = nl.i, nl.j, nl.reverse
    first = dense.mirror_pairs(i, j, rev)
    assert dense.mirror_pairs(i, j, rev) is first
    fresh = dense.MirrorPairs(i, j, rev)
    assert all(torch.equal(getattr(first, k), getattr(fresh, k)) for k in "cmab")
    other = dense.mirror_pairs(i, j, rev.clone())
    assert other is not first and torch.equal(other.c, first.c)
    swapped = rev.clone()
    again = dense.mirror_pairs(i, j, swapped)
    assert again is dense.mirror_pairs(i, j, swapped)
    swapped[[0, 1]] = swapped[[1, 0]]  # in place: the pairs must be rebuilt
    assert dense.mirror_pairs(i, j, swapped) is not again
    del swapped, again, other
    assert dense.mirror_pairs(i, j, rev) is not first  # replaced meanwhile: rebuilt


def test_kept_filters_match_only_the_same_unchanged_tensors():
    """KeptBlocks hands an entry out once, only for the very tensors (same versions) and
    settings it was kept for, drops it with its first tensor, and holds at most ``capacity``."""
    kept = dense.KeptBlocks(capacity=2)
    d, w = torch.rand(5), torch.randn(3, 2)
    blocks = [torch.randn(4, 2)]
    kept.put((d, w), ("a", 1), blocks)
    assert kept.take((d, w.clone()), ("a", 1)) is None  # another tensor, equal values
    assert kept.take((d, w), ("a", 2)) is None  # other settings
    assert kept.take((d, w), ("a", 1)) is blocks
    assert kept.take((d, w), ("a", 1)) is None  # handed out once
    kept.put((d, w), ("a", 1), blocks)
    w.add_(0)  # in place: another version
    assert kept.take((d, w), ("a", 1)) is None
    kept.put((d, w), ("a", 1), blocks)
    d.data[0] += 1e-3  # through .data: no new version, but other values
    assert kept.take((d, w), ("a", 1)) is None
    for k in range(3):
        kept.put((d, w), ("b", k), blocks)
    assert len(kept) == 2 and kept.take((d, w), ("b", 0)) is None  # the oldest went first
    kept.budget = 4 * blocks[0].numel()  # room for one entry of float32 blocks
    assert kept.fits(kept.budget) and not kept.fits(kept.budget + 1)
    kept.put((d, w), ("c", 0), blocks)
    assert len(kept) == 1 and kept.take((d, w), ("b", 2)) is None  # over the budget: dropped
    assert kept.take((d, w), ("c", 0)) is blocks
    kept.put((d, w), ("c", 0), blocks)
    del d  # the distances freed: their entries go with them
    assert len(kept) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numba_cfconv_x_gradient_from_kept_filters(rng, dtype, monkeypatch):
    """A forward on an x that requires grad keeps its blocks of W, and the backward's
    x-gradient reads them: the same gradients as recomputing W (against the float64
    reference), mirrors with unequal distances included; a backward without an x-gradient
    frees them."""
    n, nf, num_basis = 40, 24, 10
    nl, d = graph(rng, n, dtype=dtype)
    d = d.clone()
    d[3] = d[3] * 1.01  # one pair whose mirrored distances differ: the mean of two filters
    x = torch.randn(n, nf, dtype=dtype, requires_grad=True)
    g = torch.randn(n, nf, dtype=dtype)
    p = params(num_basis, nf, dtype)
    i, j, ptr, rev = nl.i, nl.j, nl.ptr, nl.reverse
    # a store of its own: entries of earlier tests in this process (full, or dropped as their
    # distances are collected) would move the counts below
    kept = dense.KeptBlocks()
    monkeypatch.setattr(cpu_numba, "KEPT_FILTERS", kept)
    for kind, env, act in (("gaussian", "cosine", "shifted_softplus"),
                           ("bessel", "polynomial", "silu")):
        args = (2.0, kind, env, act)
        before = len(kept)
        out = cpu_numba.cfconv_forward(x, d, i, j, ptr, rev, *p, *args)
        assert len(kept) == before + 1
        got = cpu_numba.cfconv_vjp(g, x.detach(), d, i, j, ptr, rev, *p, *args, False, True)
        assert len(kept) == before  # handed out
        recomputed = cpu_numba.cfconv_vjp(g, x.detach(), d, i, j, ptr, rev, *p, *args, False,
                                          True)
        want = reference.cfconv_vjp(g.double(), x.detach().double(), d.double(), i, j, ptr,
                                    rev, *[t.double() for t in p], *args, False, True)
        _close(out, reference.cfconv_forward(x.detach().double(), d.double(), i, j, ptr, rev,
                                             *[t.double() for t in p], *args), dtype)
        for a, b, c in zip(got[:2], recomputed[:2], want[:2], strict=True):
            _close(a, c, dtype)
            _close(b, c, dtype)
        cpu_numba.cfconv_forward(x, d, i, j, ptr, rev, *p, *args)
        cpu_numba.cfconv_vjp(g, x.detach(), d, i, j, ptr, rev, *p, *args, False, False)
        assert len(kept) == before  # a backward without the x-gradient frees them
    monkeypatch.setattr(kept, "budget", len(nl) // 2 * nf * x.element_size() - 1)
    cpu_numba.cfconv_forward(x, d, i, j, ptr, rev, *p, *args)
    assert len(kept) == before  # filters over the memory budget are not kept


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numba_cfconv_vjp_vjp_from_kept_products(rng, dtype, monkeypatch):
    """A backward whose g requires grad (one that is itself differentiated: force training)
    keeps its products t = u w2, and cfconv_vjp_vjp of the same g and x reads them: the same
    gradients as recomputing t (against the float64 reference), mirrors with unequal distances
    included. A g without grad keeps nothing."""
    n, nf, num_basis = 40, 24, 10
    nl, d = graph(rng, n, dtype=dtype)
    d = d.clone()
    d[3] = d[3] * 1.01  # one pair whose mirrored distances differ: the mean of two filters
    x = torch.randn(n, nf, dtype=dtype)
    g = torch.randn(n, nf, dtype=dtype, requires_grad=True)
    v = torch.randn(len(nl), dtype=dtype)
    p = params(num_basis, nf, dtype)
    i, j, ptr, rev = nl.i, nl.j, nl.ptr, nl.reverse
    kept = dense.KeptBlocks()  # a store of its own, as above
    monkeypatch.setattr(cpu_numba, "KEPT_PRODUCTS", kept)
    for kind, env, act in (("gaussian", "cosine", "shifted_softplus"),
                           ("bessel", "polynomial", "silu")):
        args = (2.0, kind, env, act)
        cpu_numba.cfconv_vjp(g.detach(), x, d, i, j, ptr, rev, *p, *args, False, False)
        assert len(kept) == 0  # g without grad: nothing to differentiate later
        first = cpu_numba.cfconv_vjp(g, x, d, i, j, ptr, rev, *p, *args, False, False)
        assert len(kept) == 1
        got = cpu_numba.cfconv_vjp_vjp(v, g, x, d, i, j, ptr, rev, *p, *args, True, True, True)
        assert len(kept) == 0  # handed out
        recomputed = cpu_numba.cfconv_vjp_vjp(v, g, x, d, i, j, ptr, rev, *p, *args, True, True,
                                              True)
        p64 = [t.double() for t in p]
        g64, x64, d64 = g.detach().double(), x.double(), d.double()
        _close(first[1], reference.cfconv_vjp(g64, x64, d64, i, j, ptr, rev, *p64, *args, False,
                                              False)[1], dtype)
        want = reference.cfconv_vjp_vjp(v.double(), g64, x64, d64, i, j, ptr, rev, *p64, *args,
                                        True, True, True)
        for a, b, c in zip(got, recomputed, want, strict=True):
            _close(a, c, dtype)
            _close(b, c, dtype)
