"""Equivariant-message primitives: every backend against the float64 torch reference, the
reference's explicit gradient formulas against torch autograd of its forward, e3nn's spherical
harmonics, gradcheck / gradgradcheck (third order too) and opcheck of every op."""

import itertools
import os

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # e3nn's torch.load (see below)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fastff.kernels.equivariant import cpu_numba, op, reference  # noqa: E402
from fastff.testing import assert_close_scaled  # noqa: E402

MODULES = {"numba": cpu_numba, "reference": reference}


def _graph(rng, n, num_edges):
    """Random edges in random order (rows of every length, empty ones included) and their
    receiver / sender CSR orders."""
    senders = torch.from_numpy(rng.integers(0, n, num_edges))
    receivers = torch.from_numpy(rng.integers(0, max(n - 1, 1), num_edges))  # last row empty

    def csr(index):
        ptr = torch.zeros(n + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(torch.bincount(index, minlength=n), 0)
        return torch.argsort(index, stable=True), ptr

    by_receiver, receiver_ptr = csr(receivers)
    by_sender, sender_ptr = csr(senders)
    return senders, receivers, by_receiver, receiver_ptr, by_sender, sender_ptr


def _shared_rows(rng, n, num_pairs, num_single):
    """Edges in mirror pairs (a -> b and b -> a) and single edges, in random order; each pair
    reads one row of w, each single edge its own: (senders, receivers, w_row, w_partner)."""
    a = rng.integers(0, n, num_pairs)
    b = rng.integers(0, n, num_pairs)
    senders = np.concatenate([a, b, rng.integers(0, n, num_single)])
    receivers = np.concatenate([b, a, rng.integers(0, n, num_single)])
    rows = np.concatenate([np.arange(num_pairs)] * 2 + [num_pairs + np.arange(num_single)])
    partner = np.concatenate([np.arange(num_pairs, 2 * num_pairs), np.arange(num_pairs),
                              np.full(num_single, -1)])
    order = rng.permutation(len(senders))
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    partner = np.where(partner[order] >= 0, position[np.maximum(partner[order], 0)], -1)
    return tuple(torch.from_numpy(np.ascontiguousarray(t)).long()
                 for t in (senders[order], receivers[order], rows[order], partner))


def _csr(index, n):
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(index, minlength=n), 0)
    return torch.argsort(index, stable=True), ptr


def _coupling(rng, d_in, num_y, d_out, paths):
    """A sparse random coupling [Din, nY, Dout] and the path of each output component."""
    dense = torch.from_numpy(rng.standard_normal((d_in, num_y, d_out)))
    mask = torch.from_numpy(rng.random((d_in, num_y, d_out)) < 0.35)
    out_path = torch.from_numpy(rng.integers(0, paths, d_out))
    return dense * mask, out_path


def _tuples(rng, dim, count):
    """``count`` distinct sorted index tuples of degree 1..3, padded with -1."""
    pool = [t + (-1,) * (3 - len(t)) for nu in (1, 2, 3)
            for t in itertools.combinations_with_replacement(range(dim), nu)]
    pick = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return torch.tensor(sorted(pool[k] for k in pick), dtype=torch.int64)


def _tp_case(rng, dtype, n=9, num_edges=60, channels=5, d_in=4, lmax=3, d_out=12, paths=5,
             shared=False):
    """Inputs of the tp ops; ``graph`` is the edge structure and the weight rows (empty, or
    with ``shared`` rows each read by a mirror pair of edges): ``graph[:6]`` for the tabulated
    ops."""
    none = torch.zeros(0, dtype=torch.int64)
    if shared:
        senders, receivers, w_row, w_partner = _shared_rows(rng, n, num_edges // 3,
                                                            num_edges - 2 * (num_edges // 3))
        graph = (senders, receivers, *_csr(receivers, n), *_csr(senders, n), w_row, w_partner)
        num_rows = int(w_row.max()) + 1
    else:
        graph = (*_graph(rng, n, num_edges), none, none)
        num_rows = num_edges
    coupling, out_path = _coupling(rng, d_in, (lmax + 1) ** 2, d_out, paths)
    x = torch.randn(n, d_in, channels, dtype=dtype)
    y = torch.randn(num_edges, (lmax + 1) ** 2, dtype=dtype)
    w = torch.randn(num_rows, paths, channels, dtype=dtype)
    g = torch.randn(n, d_out, channels, dtype=dtype)
    return x, y, w, g, graph, coupling, out_path


def _sc_case(rng, dtype, n=11, dim=6, count=30, num_m=3, channels=5, num_z=3):
    tuples = _tuples(rng, dim, count)
    elements = torch.from_numpy(rng.integers(0, num_z, n))
    x = torch.randn(n, dim, channels, dtype=dtype)
    weights = torch.randn(num_z, tuples.shape[0], num_m, channels, dtype=dtype)
    g = torch.randn(n, num_m, channels, dtype=dtype)
    v = torch.randn(n, dim, channels, dtype=dtype)
    return x, elements, weights, tuples, g, v


def _same(got, want, dtype, what):
    kind = "message"
    assert_close_scaled(got, want, kind, dtype, what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [False, True], ids=["rows_per_edge", "shared_rows"])
def test_numba_matches_reference(rng, dtype, shared):
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, dtype, shared=shared)
    d64 = [t.double() for t in (x, y, w, g)]
    c = coupling.to(dtype)
    _same(cpu_numba.tp_conv(x, y, w, *graph, c, out_path),
          reference.tp_conv(d64[0], d64[1], d64[2], *graph, coupling, out_path), dtype, "tp_conv")
    _same(cpu_numba.tp_conv_sender(g, y, w, *graph, c, out_path),
          reference.tp_conv_sender(d64[3], d64[1], d64[2], *graph, coupling, out_path), dtype,
          "tp_conv_sender")
    for needs in itertools.product((True, False), repeat=3):
        got = cpu_numba.tp_conv_vjp(g, x, y, w, *graph, c, out_path, *needs)
        want = reference.tp_conv_vjp(d64[3], d64[0], d64[1], d64[2], *graph, coupling,
                                     out_path, *needs)
        for a, b, name in zip(got, want, ("x", "y", "w"), strict=True):
            _same(a, b, dtype, f"tp_conv_vjp {name} {needs}")
    x, elements, weights, tuples, g, v = _sc_case(rng, dtype)
    x64, w64, g64, v64 = x.double(), weights.double(), g.double(), v.double()
    _same(cpu_numba.symmetric_contraction(x, elements, weights, tuples),
          reference.symmetric_contraction(x64, elements, w64, tuples), dtype, "symc")
    got = cpu_numba.symmetric_contraction_vjp(g, x, elements, weights, tuples, True, True)
    want = reference.symmetric_contraction_vjp(g64, x64, elements, w64, tuples, True, True)
    for a, b, name in zip(got, want, ("x", "weights"), strict=True):
        _same(a, b, dtype, f"symc_vjp {name}")
    got = cpu_numba.symmetric_contraction_vjp_vjp(v, g, x, elements, weights, tuples, True, True,
                                                  True)
    want = reference.symmetric_contraction_vjp_vjp(v64, g64, x64, elements, w64, tuples, True,
                                                   True, True)
    for a, b, name in zip(got, want, ("g", "x", "weights"), strict=True):
        _same(a, b, dtype, f"symc_vjp_vjp {name}")
    vectors = torch.randn(50, 3, dtype=dtype)
    for lmax in range(4):
        gy = torch.randn(50, (lmax + 1) ** 2, dtype=dtype)
        t = torch.randn(50, 3, dtype=dtype)
        v64 = vectors.double()
        _same(cpu_numba.spherical_harmonics(vectors, lmax),
              reference.spherical_harmonics(v64, lmax), dtype, f"Y l<={lmax}")
        _same(cpu_numba.spherical_harmonics_vjp(gy, vectors, lmax),
              reference.spherical_harmonics_vjp(gy.double(), v64, lmax), dtype, "Y vjp")
        _same(cpu_numba.spherical_harmonics_jvp(t, vectors, lmax),
              reference.spherical_harmonics_jvp(t.double(), v64, lmax), dtype, "Y jvp")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tabulated_weights_match_reference(rng, dtype):
    """radial_spline at every order, and tp_conv with the weights read from the table inside the
    kernels (forward and the fused backward, every combination of wanted gradients)."""
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, dtype)
    paths, channels = w.shape[1], w.shape[2]
    coeffs = torch.randn(30, 4, paths * channels, dtype=dtype)
    step = 0.1
    d = torch.from_numpy(rng.random(y.shape[0]) * 3.3).to(dtype)  # some beyond the table
    d64, c64 = d.double(), coeffs.double()
    for order in range(5):
        _same(cpu_numba.radial_spline(d, coeffs, step, order),
              reference.radial_spline(d64, c64, step, order), dtype, f"spline order {order}")
        gf = torch.randn(d.shape[0], coeffs.shape[2], dtype=dtype)
        _same(cpu_numba.radial_spline_vjp(gf, d, coeffs, step, order),
              reference.radial_spline_vjp(gf.double(), d64, c64, step, order), dtype,
              f"spline vjp order {order}")
    c = coupling.to(dtype)
    x64, y64, g64 = x.double(), y.double(), g.double()
    _same(cpu_numba.tp_conv_spline(x, y, d, coeffs, step, *graph[:6], c, out_path),
          reference.tp_conv_spline(x64, y64, d64, c64, step, *graph[:6], coupling, out_path), dtype,
          "tp_conv_spline")
    for needs in itertools.product((True, False), repeat=3):
        got = cpu_numba.tp_conv_spline_vjp(g, x, y, d, coeffs, step, *graph[:6], c, out_path,
                                           *needs)
        want = reference.tp_conv_spline_vjp(g64, x64, y64, d64, c64, step, *graph[:6], coupling,
                                            out_path, *needs)
        for a, b, name in zip(got, want, ("x", "y", "d"), strict=True):
            _same(a, b, dtype, f"tp_conv_spline_vjp {name} {needs}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_silu_terms_match_reference_and_autograd(rng, dtype):
    """a * b * silu^(n)(x) for n = 0..4 and 0..2 factors against the reference, whose closed
    forms are checked against torch's autograd of SiLU (float64)."""
    x = torch.from_numpy(rng.standard_normal((300, 5)) * 4)
    a, b = torch.randn_like(x), torch.randn_like(x)
    leaf = x.clone().requires_grad_(True)
    derivative = torch.nn.functional.silu(leaf)
    for order in range(5):
        _same(reference.silu_term(x, order, None, None), derivative.detach(), torch.float64,
              f"silu^({order})")
        (derivative,) = torch.autograd.grad(derivative.sum(), leaf, create_graph=True)
        for factors in ((None, None), (a, None), (None, b), (a, b)):
            got = cpu_numba.silu_term(x.to(dtype), order,
                                      *(f if f is None else f.to(dtype) for f in factors))
            _same(got, reference.silu_term(x, order, *factors), dtype, f"order {order}")


@pytest.mark.parametrize("shared", [False, True], ids=["rows_per_edge", "shared_rows"])
def test_reference_gradients_are_autograd_of_the_forward(rng, shared):
    """The explicit vjp / vjp-of-vjp formulas of reference.py against torch autograd of its
    forward definitions (which the numba kernels are compared with above)."""
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, torch.float64, shared=shared)
    leaves = [t.requires_grad_(True) for t in (x, y, w)]
    out = reference.tp_conv(*leaves, *graph, coupling, out_path)
    gx, gy, gw = torch.autograd.grad(out, leaves, g)
    _same(reference.tp_conv_sender(g, y, w, *graph, coupling, out_path), gx, torch.float64, "x")
    ex, ey, ew = reference.tp_conv_vjp(g, x, y, w, *graph, coupling, out_path, True, True,
                                       True)
    _same(ex, gx, torch.float64, "x")
    _same(ey, gy, torch.float64, "y")
    _same(ew, gw, torch.float64, "w")

    x, elements, weights, tuples, g, v = _sc_case(rng, torch.float64)
    x.requires_grad_(True)
    weights.requires_grad_(True)
    g.requires_grad_(True)
    out = reference.symmetric_contraction(x, elements, weights, tuples)
    gx, gw = torch.autograd.grad(out, (x, weights), g, create_graph=True)
    fx, fw = reference.symmetric_contraction_vjp(g, x, elements, weights, tuples, True, True)
    _same(fx, gx, torch.float64, "symc x")
    _same(fw, gw, torch.float64, "symc weights")
    second = torch.autograd.grad((gx * v).sum(), (g, x, weights))
    formulas = reference.symmetric_contraction_vjp_vjp(v, g, x, elements, weights, tuples, True,
                                                       True, True)
    for a, b, name in zip(formulas, second, ("g", "x", "weights"), strict=True):
        _same(a, b, torch.float64, f"symc second {name}")

    vectors = torch.randn(40, 3, dtype=torch.float64, requires_grad=True)
    for lmax in range(1, 4):
        out = reference.spherical_harmonics(vectors, lmax)
        gy = torch.randn_like(out)
        (gv,) = torch.autograd.grad(out, vectors, gy)
        _same(reference.spherical_harmonics_vjp(gy, vectors, lmax), gv, torch.float64, "Y vjp")
        t = torch.randn(40, 3, dtype=torch.float64)
        jvp = torch.func.jvp(lambda v, lm=lmax: reference.spherical_harmonics(v, lm),
                             (vectors.detach(),), (t,))[1]
        _same(reference.spherical_harmonics_jvp(t, vectors, lmax), jvp, torch.float64, "Y jvp")


def test_spherical_harmonics_match_e3nn(rng):
    """e3nn's SphericalHarmonics(normalize=True, normalization="component"), mace's setting."""
    o3 = pytest.importorskip("e3nn.o3")
    vectors = torch.randn(64, 3, dtype=torch.float64) * 3
    vectors[0] = torch.tensor([0.0, 0.0, 2.0])
    for lmax in range(4):
        sh = o3.SphericalHarmonics(o3.Irreps.spherical_harmonics(lmax), normalize=True,
                                   normalization="component")
        for backend in ("reference", "numba"):
            _same(op.spherical_harmonics(vectors, lmax, backend), sh(vectors), torch.float64,
                  f"{backend} l<={lmax}")


BACKENDS = ["reference", "numba"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_every_op(rng, backend):
    """First and second derivatives of every op in float64 (finite differences)."""
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, torch.float64, n=4, num_edges=9,
                                                     channels=2, d_in=2, lmax=1, d_out=5,
                                                     paths=2)
    x, y, w, g = (t.requires_grad_(True) for t in (x, y, w, g))
    cases = [
        ("tp_conv", lambda x, y, w: op.tp_conv(x, y, w, *graph, coupling, out_path, backend),
         (x, y, w)),
        ("tp_conv_sender", lambda g, y, w: op.tp_conv_sender(g, y, w, *graph, coupling, out_path,
                                                             backend), (g, y, w)),
        ("tp_conv_vjp", lambda g, x, y, w: op.tp_conv_vjp(g, x, y, w, *graph, coupling,
                                                          out_path, True, True, True, backend),
         (g, x, y, w)),
    ]
    xs, elements, weights, tuples, gs, v = _sc_case(rng, torch.float64, n=4, dim=3, count=8,
                                                    num_m=2, channels=2, num_z=2)
    xs, weights, gs, v = (t.requires_grad_(True) for t in (xs, weights, gs, v))
    cases += [
        ("symc", lambda x, w: op.symmetric_contraction(x, elements, w, tuples, backend),
         (xs, weights)),
        ("symc_vjp", lambda g, x, w: op.symmetric_contraction_vjp(g, x, elements, w, tuples,
                                                                  True, True, backend),
         (gs, xs, weights)),
        ("symc_vjp_vjp", lambda v, g, x, w: op.symmetric_contraction_vjp_vjp(
            v, g, x, elements, w, tuples, True, True, True, backend), (v, gs, xs, weights)),
    ]
    coeffs = torch.randn(12, 4, 4, dtype=torch.float64)
    d = torch.from_numpy(rng.random(9) * 1.1).requires_grad_(True)
    gd = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    cases += [
        ("radial_spline", lambda d: op.radial_spline(d, coeffs, 0.1, 1, backend), (d,)),
        ("radial_spline_vjp", lambda g, d: op.radial_spline_vjp(g, d, coeffs, 0.1, 0, backend),
         (gd, d)),
        ("tp_conv_spline", lambda x, y, d: op.tp_conv_spline(x, y, d, coeffs, 0.1, *graph[:6],
                                                             coupling, out_path, backend),
         (x, y, d)),
    ]
    xa, fa, fb = (torch.randn(5, 3, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    cases += [
        ("silu", lambda x: op.silu_term(x, 0, None, None, backend), (xa,)),
        ("silu slope", lambda x, a: op.silu_term(x, 1, a, None, backend), (xa, fa)),
        ("silu curvature", lambda x, a, b: op.silu_term(x, 2, a, b, backend), (xa, fa, fb)),
    ]
    vectors = (torch.randn(6, 3, dtype=torch.float64) * 2).requires_grad_(True)
    gy = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    cases += [
        ("Y", lambda v: op.spherical_harmonics(v, 3, backend), (vectors,)),
        ("Y vjp", lambda g, v: op.spherical_harmonics_vjp(g, v, 3, backend), (gy, vectors)),
        ("Y jvp", lambda t, v: op.spherical_harmonics_jvp(t, v, 3, backend), (t, vectors)),
    ]
    for name, f, inputs in cases:
        assert torch.autograd.gradcheck(f, inputs), name
        assert torch.autograd.gradgradcheck(f, inputs), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_shared_weight_rows(rng, backend):
    """The tp ops with rows of w shared by mirror pairs of edges: first and second derivatives
    (the w-gradient sums a row's two edges, written by one of them in the numba kernels)."""
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, torch.float64, n=4, num_edges=10,
                                                     channels=2, d_in=2, lmax=1, d_out=5,
                                                     paths=2, shared=True)
    assert w.shape[0] < y.shape[0]
    x, y, w, g = (t.requires_grad_(True) for t in (x, y, w, g))
    cases = [
        (lambda x, y, w: op.tp_conv(x, y, w, *graph, coupling, out_path, backend), (x, y, w)),
        (lambda g, y, w: op.tp_conv_sender(g, y, w, *graph, coupling, out_path, backend),
         (g, y, w)),
        (lambda g, x, y, w: op.tp_conv_vjp(g, x, y, w, *graph, coupling, out_path, True, True,
                                           True, backend), (g, x, y, w)),
    ]
    for f, inputs in cases:
        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck(f, inputs)


def test_third_order(rng):
    """The chains end in differentiable formulas: a third derivative of the force-training
    backwards (the symmetric contraction's composite path) is finite-difference exact."""
    xs, elements, weights, tuples, gs, v = _sc_case(rng, torch.float64, n=3, dim=3, count=6,
                                                    num_m=1, channels=2, num_z=2)
    xs, weights, gs, v = (t.requires_grad_(True) for t in (xs, weights, gs, v))

    def f(v, g, x, w):
        return op.symmetric_contraction_vjp_vjp(v, g, x, elements, w, tuples, True, True, True,
                                                "numba")

    assert torch.autograd.gradgradcheck(f, (v, gs, xs, weights))
    vectors = (torch.randn(5, 3, dtype=torch.float64) * 2).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda v: op.spherical_harmonics_vjp(
        torch.ones(5, 9, dtype=torch.float64), v, 2, "numba"), (vectors,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_op(rng, backend):
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, torch.float64, n=5, num_edges=12,
                                                     channels=3, d_in=2, lmax=2, d_out=6,
                                                     paths=3)
    torch.library.opcheck(op.tp_conv, (x, y, w, *graph, coupling, out_path, backend))
    torch.library.opcheck(op.tp_conv_sender, (g, y, w, *graph, coupling, out_path, backend))
    for needs in ((True, True, True), (False, False, True)):
        torch.library.opcheck(op.tp_conv_vjp, (g, x, y, w, *graph, coupling, out_path, *needs,
                                               backend))
    xs, elements, weights, tuples, gs, v = _sc_case(rng, torch.float64, n=5, dim=4, count=10)
    torch.library.opcheck(op.symmetric_contraction, (xs, elements, weights, tuples, backend))
    torch.library.opcheck(op.symmetric_contraction_vjp, (gs, xs, elements, weights, tuples,
                                                         True, True, backend))
    torch.library.opcheck(op.symmetric_contraction_vjp_vjp, (v, gs, xs, elements, weights,
                                                             tuples, True, False, True, backend))
    coeffs = torch.randn(10, 4, 3 * w.shape[2], dtype=torch.float64)
    d = torch.rand(y.shape[0], dtype=torch.float64)
    torch.library.opcheck(op.radial_spline, (d, coeffs, 0.1, 1, backend))
    torch.library.opcheck(op.radial_spline_vjp, (torch.randn(d.shape[0], coeffs.shape[2],
                                                             dtype=torch.float64), d, coeffs,
                                                 0.1, 0, backend))
    torch.library.opcheck(op.tp_conv_spline, (x, y, d, coeffs, 0.1, *graph[:6], coupling, out_path,
                                              backend))
    torch.library.opcheck(op.tp_conv_spline_vjp, (g, x, y, d, coeffs, 0.1, *graph[:6], coupling,
                                                  out_path, True, True, True, backend),
                          test_utils=("test_schema", "test_faketensor"))
    xs = torch.randn(6, 4, dtype=torch.float64)
    torch.library.opcheck(op.silu_term, (xs, 0, None, None, backend))
    torch.library.opcheck(op.silu_term, (xs, 2, torch.randn_like(xs), torch.randn_like(xs),
                                         backend))
    vectors = torch.randn(7, 3, dtype=torch.float64)
    torch.library.opcheck(op.spherical_harmonics, (vectors, 3, backend))
    torch.library.opcheck(op.spherical_harmonics_vjp, (torch.randn(7, 16, dtype=torch.float64),
                                                       vectors, 3, backend))
    torch.library.opcheck(op.spherical_harmonics_jvp, (torch.randn(7, 3, dtype=torch.float64),
                                                       vectors, 3, backend))


def test_constant_inputs_refuse_gradients(rng):
    """Constants have no gradient (asking raises), and the no-graph fused backward of the
    tabulated convolution refuses a derivative: it never returns zeros."""
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, torch.float64, n=4, num_edges=8)
    coupling.requires_grad_(True)
    out = op.tp_conv(x.requires_grad_(True), y, w, *graph, coupling, out_path, "numba")
    with pytest.raises(RuntimeError, match="coupling"):
        out.sum().backward()
    coupling.requires_grad_(False)
    coeffs = torch.randn(10, 4, w.shape[1] * w.shape[2], dtype=torch.float64,
                         requires_grad=True)
    d = torch.rand(y.shape[0], dtype=torch.float64)
    out = op.tp_conv_spline(x, y, d, coeffs, 0.1, *graph[:6], coupling, out_path, "numba")
    with pytest.raises(RuntimeError, match="table"):
        out.sum().backward()
    grads = op.tp_conv_spline_vjp(g.requires_grad_(True), x, y, d.requires_grad_(True),
                                  coeffs.detach(), 0.1, *graph[:6], coupling, out_path, True, True,
                                  True, "numba")
    with pytest.raises(RuntimeError, match="no derivative"):
        grads[2].sum().backward()


def test_empty_graph_and_zero_vectors():
    """No edges: zero messages; a zero vector: e3nn's normalize (Y = [1, 0, ...]) without NaN."""
    n, channels = 3, 2
    empty = torch.zeros(0, dtype=torch.int64)
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    graph = (empty, empty, empty, ptr, empty, ptr, empty, empty)
    coupling = torch.ones(1, 4, 4, dtype=torch.float64)
    out_path = torch.zeros(4, dtype=torch.int64)
    x = torch.randn(n, 1, channels, dtype=torch.float64)
    for backend in BACKENDS:
        out = op.tp_conv(x, torch.zeros(0, 4, dtype=torch.float64),
                         torch.zeros(0, 1, channels, dtype=torch.float64), *graph, coupling,
                         out_path, backend)
        assert out.shape == (n, 4, channels) and not out.any()
        y = op.spherical_harmonics(torch.zeros(2, 3, dtype=torch.float64), 3, backend)
        assert torch.equal(y[:, 0], torch.ones(2)) and not y[:, 1:].any()
