"""Message-passing primitives: every backend against the float64 torch reference (including
block boundaries that split receiver rows), gradcheck / gradgradcheck / opcheck of every op, and
the ops that must refuse to be differentiated."""

import math

import pytest
import torch

import fastff
from fastff.kernels.message import cpu_numba, dense, gpu_triton, gpu_triton_filter, op, reference
from fastff.testing import tolerance

BACKENDS = ["numba", "triton", "reference"]
BUDGET = 256 * 2**20  # bytes a pass may keep (fastff.nn.KEEP_BUDGET)
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
    # float32 against the reference at 2e-5: IEEE float32 filter GEMMs (TF32 is the default;
    # tests/kernels/test_message_fused_triton.py bounds it)
    monkeypatch.setattr(gpu_triton_filter, "TF32", False)


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
    i, j, ptr, rev, pairs = nl.i, nl.j, nl.ptr, nl.reverse, nl.mirror_pairs
    _close(m.gms(x, w, i, j, ptr, rev), reference.gms(x64, w64, i, j, ptr, rev), dtype)
    _close(m.ggm(x, g, i, j, ptr, rev), reference.ggm(x64, g64, i, j, ptr, rev), dtype)
    empty = x.new_empty(0, nf)
    variants = [("gaussian", "cosine", "shifted_softplus"), ("bessel", "polynomial", "silu")]
    if backend == "triton":  # interpreted: one variant per dtype keeps the run short
        variants = variants[:1] if dtype == torch.float64 else variants[1:]
    for kind, env, act in variants:
        args = (2.0, kind, env, act)
        # one filter per pair (mirrored distances equal, as from positions), or two per pair
        # where they differ (here: every edge, independently skewed)
        skewed = d * (1 + 0.05 * torch.rand(len(nl), dtype=dtype))
        for dd in (d, skewed):
            assert torch.equal(dd, dd[rev]) == (dd is d)
            dd64 = dd.double()
            # the pair filters a forward keeps are the reference's mirror mean of its pairs
            out, kept = m.cfconv(x, dd, i, j, ptr, rev, pairs, *p, *args, True, BUDGET)
            want_out, want_kept = reference.cfconv(x64, dd64, i, j, ptr, rev, pairs, *p64,
                                                   *args, True, BUDGET)
            assert kept.shape == want_kept.shape == (pairs.shape[1], nf)
            _close(out, want_out, dtype)
            _close(kept, want_kept, dtype)
            for need, need_x, need_d in ((False, False, True), (True, True, True),
                                         (False, True, True), (True, True, False),
                                         (True, False, False), (False, True, False)):
                # x-gradients from the kept filters and recomputed; products kept or not
                for filters, budget in ((kept, BUDGET), (empty, 0)):
                    got = m.cfconv_vjp(g, x, dd, i, j, ptr, rev, pairs, filters, *p, *args,
                                       need, need_x, need_d, budget)
                    want = reference.cfconv_vjp(g64, x64, dd64, i, j, ptr, rev, pairs,
                                                want_kept, *p64, *args, need, need_x, need_d,
                                                budget)
                    for a, b in zip(got, want, strict=True):
                        assert a.shape == b.shape
                        if b.numel():
                            _close(a, b, dtype)
            products = got[-1]  # t = u w2 of every pair, kept for the second backward
            # the second backward of force training: d<v, grad_d>/d(g, x, d, parameters)
            v = torch.randn(len(nl), dtype=dtype)
            for need_g, need_x, need, need_d in ((True, True, True, True),
                                                 (False, True, False, True),
                                                 (True, False, False, True),
                                                 (True, True, True, False),
                                                 (False, True, True, False),
                                                 (True, False, False, False)):
                want = reference.cfconv_vjp_vjp(v.double(), g64, x64, dd64, i, j, ptr, rev,
                                                pairs, empty, *p64, *args, need_g, need_x, need,
                                                need_d)
                for kept_products in (products, empty):  # read, or recomputed
                    got = m.cfconv_vjp_vjp(v, g, x, dd, i, j, ptr, rev, pairs, kept_products,
                                           *p, *args, need_g, need_x, need, need_d)
                    for a, b in zip(got, want, strict=True):
                        assert a.shape == b.shape
                        if b.numel():
                            _close(a, b, dtype)
    coeffs = torch.randn(9, 4, nf, dtype=dtype)
    scale = torch.randn(len(nl), dtype=dtype)
    for order in range(5):
        for s in (None, scale):
            _close(m.spline_conv(x, d, s, coeffs, i, j, ptr, rev, 2.0, order),
                   reference.spline_conv(x64, d64, None if s is None else s.double(),
                                         coeffs.double(), i, j, ptr, rev, 2.0, order), dtype)
        if order < 4:
            _close(m.spline_edge_dot(g, x, d, coeffs, i, j, ptr, rev, 2.0, order),
                   reference.spline_edge_dot(g64, x64, d64, coeffs.double(), i, j, ptr, rev,
                                             2.0, order), dtype)
        else:
            assert not m.spline_edge_dot(g, x, d, coeffs, i, j, ptr, rev, 2.0, order).any()


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


def _cfconv(backend, a, pairs, keep=True):
    """cfconv's output alone, for gradcheck: (x, d, *params) -> out [N, F]."""
    def f(x, d, *p, filt=("gaussian", "cosine", "shifted_softplus")):
        return op.cfconv(x, d, *a, pairs, *p, 2.0, *filt, keep, BUDGET if keep else 0,
                         backend)[0]
    return f


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_every_op(rng, backend):
    n, nf, num_basis = (4, 2, 3) if backend == "triton" else (7, 3, 4)
    nl, a, d, x, g, w, scale, coeffs, p = _ops(rng, backend, n, nf, num_basis)
    pairs, none = nl.mirror_pairs, x.new_empty(0, nf)
    cases = {
        "gms": (lambda x, w: op.gms(x, w, *a, backend), (x, w)),
        "ggm": (lambda x, g: op.ggm(x, g, *a, backend), (x, g)),
        # the backward reads the kept pair filters, or recomputes them
        "cfconv": (_cfconv(backend, a, pairs), (x, d, *p)),
        "cfconv (recomputed)": (_cfconv(backend, a, pairs, keep=False), (x, d, *p)),
        # its first derivative is the fused cfconv_vjp_vjp (the d-gradient's cotangent alone)
        # or the composite (all outputs); its second the composite
        "cfconv_vjp (distances)": (lambda g, x, d, *p: op.cfconv_vjp(
            g, x, d, *a, pairs, none, *p, 2.0, "bessel", "polynomial", "silu", True, False,
            True, BUDGET, backend)[1], (g, x, d, *p)),
        "cfconv_vjp (all)": (lambda g, x, d, *p: op.cfconv_vjp(
            g, x, d, *a, pairs, none, *p, 2.0, "gaussian", "cosine", "shifted_softplus", True,
            True, True, 0, backend)[:6], (g, x, d, *p)),
        "cfconv_vjp_vjp": (lambda v, g, x, d, *p: op.cfconv_vjp_vjp(
            v, g, x, d, *a, pairs, none, *p, 2.0, "gaussian", "cosine", "silu", True, True,
            True, True, backend), (scale, g, x, d, *p)),
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
    conv = _cfconv("numba", a, nl.mirror_pairs)
    assert torch.autograd.gradgradcheck(
        lambda d: torch.autograd.grad(
            conv(x, d, *p, filt=("bessel", "polynomial", "silu")).pow(2).sum(), d,
            create_graph=True)[0], (d,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_op(rng, backend):
    n, nf, num_basis = (4, 2, 3) if backend == "triton" else (7, 3, 4)
    nl, a, d, x, g, w, scale, coeffs, p = _ops(rng, backend, n, nf, num_basis)
    i, j, ptr, rev = a
    pairs = nl.mirror_pairs
    filt = (2.0, "gaussian", "cosine", "shifted_softplus")
    torch.library.opcheck(op.gms, (x, w, *a, backend))
    torch.library.opcheck(op.ggm, (x, g, *a, backend))
    torch.library.opcheck(op.mirror_pairs, (i, j, rev, "reference"))
    for keep, budget in ((True, BUDGET), (False, BUDGET), (True, 0)):
        torch.library.opcheck(op.cfconv, (x, d, *a, pairs, *p, *filt, keep, budget, backend))
    detached = [t.detach() for t in (g, x, d, *p)]
    with torch.no_grad():
        _, kept = op.cfconv(*detached[1:3], *a, pairs, *detached[3:], *filt, True, BUDGET,
                            backend)
    products = None
    for filters, budget in ((kept, BUDGET), (kept[:0], 0)):
        torch.library.opcheck(op.cfconv_vjp, (*detached[:3], *a, pairs, filters, *detached[3:],
                                              *filt, True, True, True, budget, backend))
        if products is None:
            products = op.cfconv_vjp(*detached[:3], *a, pairs, filters, *detached[3:], *filt,
                                     False, False, True, budget, backend)[-1]
    v = torch.randn(len(nl), dtype=torch.float64)
    for kept_products in (products, products[:0]):
        torch.library.opcheck(op.cfconv_vjp_vjp, (v, *detached[:3], *a, pairs, kept_products,
                                                  *detached[3:], *filt, True, True, True, True,
                                                  backend))
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
    i, j, ptr, rev = nl.i, nl.j, nl.ptr, nl.reverse
    x, g = torch.randn(n, nf, dtype=dtype), torch.randn(n, nf, dtype=dtype)
    coeffs = torch.randn(9, 4, nf, dtype=dtype)
    wide = [t.double() for t in (g, x, d, d_rev, coeffs)]
    for order in orders:
        gx, gd = m.spline_conv_vjp(g, x, d, d_rev, coeffs, i, j, ptr, rev, 2.0, order)
        want_x, want_d = reference.spline_conv_vjp(*wide, i, j, ptr, rev, 2.0, order)
        assert gx.dtype == gd.dtype == dtype
        _close(gx, want_x, dtype)
        _close(gd, want_d, dtype)
        assert gd[1] == 0 and gd[3] == 0  # beyond the cutoff: exactly zero
    # an out-of-range sender is skipped: as if its edge were beyond the cutoff on both sides
    bad_j = j.clone()
    bad_j[5] = n
    far, far_rev = d.clone(), d_rev.clone()
    far[5] = far_rev[5] = 3.0
    gx, gd = m.spline_conv_vjp(g, x, d, d_rev, coeffs, i, bad_j, ptr, rev, 2.0, 1)
    want_x, want_d = m.spline_conv_vjp(g, x, far, far_rev, coeffs, i, j, ptr, rev, 2.0, 1)
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
    a = (nl.i, nl.j, nl.ptr, nl.reverse)
    skewed = d * (1 + 0.05 * torch.rand(len(nl), dtype=dtype))
    # interpreted Triton: the second filter in float64, the shared one in float32
    cases = [skewed if dtype == torch.float64 else d] if backend == "triton" else [d, skewed]
    for dist in cases:
        t64 = [t.double() for t in (phi, v, dist, unit)]
        p64 = [t.double() for t in (wf, bf)]
        got = m.painn_message(phi, v, dist, unit, *a, wf, bf, *PAINN_FILTER)
        want = reference.painn_message(*t64, *a, *p64, *PAINN_FILTER)
        for x, y in zip(got, want, strict=True):
            _close(x, y, dtype)
        for need in (False, True):
            got = m.painn_message_vjp(gs, gv, phi, v, dist, unit, *a, wf, bf, *PAINN_FILTER,
                                      need)
            want = reference.painn_message_vjp(gs.double(), gv.double(), *t64, *a, *p64,
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
    got = m.painn_message(phi, v, d, unit, nl.i, bad_j, nl.ptr, nl.reverse, wf, bf,
                          *PAINN_FILTER)
    want = reference.painn_message(phi, v, d[keep], unit[keep], nl.i[keep], nl.j[keep], ptr,
                                   None, wf, bf, *PAINN_FILTER)
    for x, y in zip(got, want, strict=True):
        _close(x, y, torch.float64)
    gs, gv = torch.randn(n, nf, dtype=torch.float64), torch.randn(n, 3, nf, dtype=torch.float64)
    grads = m.painn_message_vjp(gs, gv, phi, v, d, unit, nl.i, bad_j, nl.ptr, nl.reverse, wf,
                                bf, *PAINN_FILTER, True)
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
    monkeypatch.setattr(op, "painn_message_vjp",
                        lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
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
    kept_pairs = dense.mirror_pairs(kept[0], kept[1], kept[3])
    pairs = dense.mirror_pairs(nl.i, bad_j, rev)  # the bad pair's end b is out of range
    p = params(num_basis, nf)
    x, g = torch.randn(n, nf, dtype=torch.float64), torch.randn(n, nf, dtype=torch.float64)
    filt = (2.0, "gaussian", "cosine", "shifted_softplus")
    none = x.new_empty(0, nf)
    _close(m.cfconv(x, d, nl.i, bad_j, nl.ptr, rev, pairs, *p, *filt, False, 0)[0],
           reference.cfconv(x, d[keep], *kept, kept_pairs, *p, *filt, False, 0)[0],
           torch.float64)
    got = m.cfconv_vjp(g, x, d, nl.i, bad_j, nl.ptr, rev, pairs, none, *p, *filt, True, True,
                       True, 0)[:6]
    want = reference.cfconv_vjp(g, x, d[keep], *kept, kept_pairs, none, *p, *filt, True, True,
                                True, 0)[:6]
    assert got[1][bad] == 0 and got[1][rev[bad]] == 0
    _close(got[1][keep], want[1], torch.float64)
    for a, b in zip(got[:1] + got[2:], want[:1] + want[2:], strict=True):
        _close(a, b, torch.float64)
    v = torch.randn(len(nl), dtype=torch.float64)
    got = m.cfconv_vjp_vjp(v, g, x, d, nl.i, bad_j, nl.ptr, rev, pairs, none, *p, *filt, True,
                           True, True, True)
    want = reference.cfconv_vjp_vjp(v[keep], g, x, d[keep], *kept, kept_pairs, none, *p, *filt,
                                    True, True, True, True)
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
    settings = dense.FilterSettings(cutoff, "gaussian", env_kind, kind)
    got = fused.filter_from_distances(d, ps, settings, radial_orders)
    want = exact.filter_from_distances(d.double(), p64, settings, _radial64)
    assert got.dtype == torch.float32 and got.shape == (b, nf)
    _close(got, want, torch.float32)
    into = torch.empty(b, nf)  # written into a kept slice
    assert fused.filter_from_distances(d, ps, settings, radial_orders, into) is into
    torch.testing.assert_close(into, got, rtol=0, atol=0)
    for need_params in (False, True):
        want = exact.filter_vjp_from_distances(u.double(), d.double(), p64, settings,
                                               need_params, True, _radial64)
        for need_values in (False, True):
            got = fused.filter_vjp_from_distances(u, d, ps, settings, need_params,
                                                  need_values, radial_orders)
            assert got[0].shape == (b,)
            for g, w in zip(got, want[:5] + (want[5] if need_values else None,), strict=True):
                if w is None:
                    assert g is None
                else:
                    assert g.dtype == torch.float32 and g.shape == w.shape
                    _close(g, w, torch.float32)
        got = fused.filter_vjp_vjp_from_distances(u, weight, d, ps, settings, need_params,
                                                  radial_orders)
        want = exact.filter_vjp_vjp_from_distances(u.double(), weight.double(), d.double(),
                                                   p64, settings, need_params, _radial64)
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if w is not None:
                assert g.dtype == torch.float32 and g.shape == w.shape
                _close(g, w, torch.float32)
    # what the kernels do not cover takes the basis + GEMM path, with the same results
    bessel = settings._replace(kind="bessel")
    _close(fused.filter_from_distances(d, ps, bessel, radial_orders),
           exact.filter_from_distances(d.double(), p64, bessel, _radial64), torch.float32)
    trained = [p.clone().requires_grad_(True) for p in ps]  # differentiable: torch formulas
    assert fused.filter_from_distances(d, trained, settings, radial_orders).requires_grad


def test_mirror_pairs_of_a_list(rng):
    """nl.mirror_pairs: every unordered pair once as (canonical edge c < rev[c], mirror
    m = rev[c], ends i[c], j[c]), computed once per list."""
    nl, _ = graph(rng, 30)
    pairs = nl.mirror_pairs
    assert nl.mirror_pairs is pairs  # kept with the list
    c, m, a, b = pairs
    assert pairs.dtype == torch.int64 and pairs.shape == (4, len(nl) // 2)
    assert bool((c < m).all()) and torch.equal(m, nl.reverse[c])
    assert torch.equal(a, nl.i[c]) and torch.equal(b, nl.j[c])
    assert torch.equal(torch.sort(torch.cat([c, m])).values, torch.arange(len(nl)))
    assert torch.equal(op.mirror_pairs(nl.i, nl.j, nl.reverse, "reference"), pairs)


def test_mirror_pairs_traced_with_a_data_dependent_size(rng):
    """Inside a symbolic trace (torch.compile, export), a list rebuilt from traced tensors
    computes its pairs with the custom op (a new symbolic size P) and does not keep them; the
    traced graph gives the eager pairs on a list of another size."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def pairs_of(i, j, shifts, ptr, cells, pbc, reverse):
        nl = fastff.NeighborList(i, j, shifts, ptr, cutoff=2.0, half=False,
                                 num_atoms=ptr.shape[0] - 1, batch=None, cells=cells, pbc=pbc,
                                 cell=None, backend="reference")
        nl._reverse = reverse
        pairs = nl.mirror_pairs
        assert nl._mirror_pairs is None  # computed while tracing: not kept
        return pairs

    def tensors(nl):
        return nl.i, nl.j, nl.shifts, nl.ptr, nl._cells, nl.pbc, nl.reverse

    nl, _ = graph(rng, 20)
    with fastff.no_checks():
        traced = make_fx(pairs_of, tracing_mode="symbolic")(*tensors(nl))
    assert any("mirror_pairs" in str(node.target) for node in traced.graph.nodes)
    other, _ = graph(rng, 26)
    assert len(other) != len(nl)
    assert torch.equal(traced(*tensors(other)), other.mirror_pairs)


def test_cfconv_keeps_its_pair_filters_within_the_budget(rng):
    """cfconv returns its pair filters [P, F] when asked and when they fit in the budget (the
    fake impl decides the same way), else an empty [0, F]; the backward gives the same
    gradients from them as recomputed."""
    n, nf, num_basis = 30, 8, 6
    nl, d = graph(rng, n)
    pairs, a = nl.mirror_pairs, (nl.i, nl.j, nl.ptr, nl.reverse)
    p = params(num_basis, nf, grad=True)
    x = torch.randn(n, nf, dtype=torch.float64, requires_grad=True)
    d = d.requires_grad_(True)
    filt = (2.0, "gaussian", "cosine", "shifted_softplus")
    exact = pairs.shape[1] * nf * x.element_size()
    want = None
    for keep, budget, rows in ((False, exact, 0), (True, exact - 1, 0), (True, 0, 0),
                               (True, exact, pairs.shape[1])):
        out, kept = op.cfconv(x, d, *a, pairs, *p, *filt, keep, budget, "numba")
        assert kept.shape == (rows, nf) and not kept.requires_grad
        grads = torch.autograd.grad((out * torch.cos(out)).sum(), (x, d, *p))
        want = grads if want is None else want
        for got_g, want_g in zip(grads, want, strict=True):
            _close(got_g, want_g, torch.float64)
    # every backend keeps the same way (the reference's are its mirror mean's rows)
    detached = [t.detach() for t in (x, d, *p)]
    for backend in BACKENDS:
        _, kept = op.cfconv(*detached[:2], *a, pairs, *detached[2:], *filt, True, exact,
                            backend)
        assert kept.shape == (pairs.shape[1], nf)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cfconv_one_pair_with_unequal_mirrored_distances(rng, dtype):
    """One pair whose two distances differ makes every pair take the mean of its two filters
    (one check per call): forward, both backwards and the kept filters and products against
    the float64 reference."""
    n, nf, num_basis = 40, 24, 10
    nl, d = graph(rng, n, dtype=dtype)
    d = d.clone()
    d[3] = d[3] * 1.01
    i, j, ptr, rev, pairs = nl.i, nl.j, nl.ptr, nl.reverse, nl.mirror_pairs
    x, g = torch.randn(n, nf, dtype=dtype), torch.randn(n, nf, dtype=dtype)
    v = torch.randn(len(nl), dtype=dtype)
    p = params(num_basis, nf, dtype)
    p64 = [t.double() for t in p]
    x64, g64, d64 = x.double(), g.double(), d.double()
    for kind, env, act in (("gaussian", "cosine", "shifted_softplus"),
                           ("bessel", "polynomial", "silu")):
        args = (2.0, kind, env, act)
        out, kept = cpu_numba.cfconv(x, d, i, j, ptr, rev, pairs, *p, *args, True, BUDGET)
        want_out, want_kept = reference.cfconv(x64, d64, i, j, ptr, rev, pairs, *p64, *args,
                                               True, BUDGET)
        _close(out, want_out, dtype)
        _close(kept, want_kept, dtype)
        got = cpu_numba.cfconv_vjp(g, x, d, i, j, ptr, rev, pairs, kept, *p, *args, True, True,
                                   True, BUDGET)
        want = reference.cfconv_vjp(g64, x64, d64, i, j, ptr, rev, pairs, want_kept, *p64,
                                    *args, True, True, True, BUDGET)
        for a, b in zip(got, want, strict=True):
            _close(a, b, dtype)
        products = got[-1]
        got = cpu_numba.cfconv_vjp_vjp(v, g, x, d, i, j, ptr, rev, pairs, products, *p, *args,
                                       True, True, True, True)
        want = reference.cfconv_vjp_vjp(v.double(), g64, x64, d64, i, j, ptr, rev, pairs,
                                        products[:0].double(), *p64, *args, True, True, True,
                                        True)
        for a, b in zip(got, want, strict=True):
            _close(a, b, dtype)
