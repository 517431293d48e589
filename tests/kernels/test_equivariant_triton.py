"""The equivariant family's Triton kernels (kernels/equivariant/gpu_triton.py) against the float64
torch reference: harmonics, the tensor-product convolution (exact weights per edge or in rows
shared by mirror pairs of edges, tabulated weights) and the symmetric contraction, every
gradient output, float64 and float32, several channel counts, atoms without neighbours; the ops'
autograd on the triton backend (ops without a Triton kernel run the reference); an accelerated
mace-torch model on the triton backend against the original.
On CPU the kernels run under the Triton interpreter (tests/conftest.py), so sizes are tiny."""

import copy
import io
import itertools
import os

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # e3nn's torch.load (mace)

import pytest  # noqa: E402
import torch  # noqa: E402
from test_equivariant import _coupling, _tuples  # noqa: E402
from test_equivariant import _tp_case as _tp_inputs  # noqa: E402

import fastff  # noqa: E402
from fastff.kernels._runtime import registry  # noqa: E402
from fastff.kernels.equivariant import cpu_numba, gpu_triton, op, reference  # noqa: E402
from fastff.testing import assert_close_scaled, count_host_syncs  # noqa: E402

DTYPES = [torch.float64, torch.float32]


def _same(got, want, dtype, what):
    assert_close_scaled(got, want, "message", dtype, what)


def _d64(*tensors):
    return [t.double() for t in tensors]


def _here(t):
    """t on the default device (the GPU when the Triton tests run compiled; numpy-made tensors
    start on the CPU)."""
    return t.to(torch.empty(0).device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_harmonics_match_reference(rng, dtype):
    """Y, its vjp and jvp for lmax 0..3; vectors of every length, a zero vector (e3nn's
    normalize: Y = [1, 0, ...], gradients through the I / eps branch) and a tiny one."""
    vectors = _here(torch.from_numpy(rng.standard_normal((37, 3))
                                     * rng.uniform(0.1, 5, (37, 1))))
    vectors[3] = 0.0
    vectors[5] = torch.tensor([1e-7, -2e-7, 0.5e-7])
    vectors = vectors.to(dtype)
    for lmax in range(4):
        width = (lmax + 1) ** 2
        gy = torch.randn(37, width, dtype=dtype)
        tangent = torch.randn(37, 3, dtype=dtype)
        v64 = vectors.double()
        _same(gpu_triton.spherical_harmonics(vectors, lmax),
              reference.spherical_harmonics(v64, lmax), dtype, f"Y l<={lmax}")
        # the origin's I / eps branch scales by 1e12: compared on the other rows
        keep = torch.arange(37) != 3
        got = gpu_triton.spherical_harmonics_vjp(gy, vectors, lmax)
        _same(got[keep], reference.spherical_harmonics_vjp(gy.double(), v64, lmax)[keep], dtype,
              f"Y vjp l<={lmax}")
        got = gpu_triton.spherical_harmonics_jvp(tangent, vectors, lmax)
        _same(got[keep], reference.spherical_harmonics_jvp(tangent.double(), v64, lmax)[keep],
              dtype, f"Y jvp l<={lmax}")
    if dtype == torch.float64:  # at the origin itself, in float64
        origin = torch.zeros(1, 3, dtype=dtype)
        g = torch.randn(1, 16, dtype=dtype)
        _same(gpu_triton.spherical_harmonics_vjp(g, origin, 3),
              reference.spherical_harmonics_vjp(g, origin, 3), dtype, "Y vjp at the origin")
    assert gpu_triton.spherical_harmonics(vectors[:0], 2).shape == (0, 9)
    with pytest.raises(ValueError, match="lmax"):
        gpu_triton.spherical_harmonics(vectors, 4)


def _tp_case(rng, dtype, n, num_edges, channels, d_in, lmax, d_out, paths, shared=False):
    """test_equivariant's tp inputs on the default device: ``graph`` is the 6 structure tensors
    and w_row, w_partner (empty unless ``shared``; the tabulated ops take ``graph[:6]``)."""
    x, y, w, g, graph, coupling, out_path = _tp_inputs(
        rng, dtype, n=n, num_edges=num_edges, channels=channels, d_in=d_in, lmax=lmax,
        d_out=d_out, paths=paths, shared=shared)
    return (*map(_here, (x, y, w, g)), tuple(map(_here, graph)), _here(coupling),
            _here(out_path))


# (channels, tile): several channel blocks per row (tile 32 with Dout 16: 2 channels a block)
# and channel counts that are not powers of two
TP_SHAPES = [(1, None), (7, 32), (20, None)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels,tile", TP_SHAPES)
def test_tp_conv_matches_reference(rng, monkeypatch, dtype, channels, tile):
    if tile is not None:
        monkeypatch.setattr(gpu_triton, "TILE", tile)
        monkeypatch.setattr(gpu_triton, "EDGE_TILE", tile)
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, dtype, n=6, num_edges=14,
                                                     channels=channels, d_in=4, lmax=3,
                                                     d_out=11, paths=4)
    _tp_ops_match(x, y, w, g, graph, coupling, out_path, dtype,
                  ((True, True, True), (False, True, False), (False, False, True)))


def _tp_ops_match(x, y, w, g, graph, coupling, out_path, dtype, needs_list):
    """The three tp launchers against the float64 reference, every output of the vjp for each
    combination of need flags."""
    x64, y64, w64, g64 = _d64(x, y, w, g)
    c = coupling.to(dtype)
    _same(gpu_triton.tp_conv(x, y, w, *graph, c, out_path),
          reference.tp_conv(x64, y64, w64, *graph, coupling, out_path), dtype, "tp_conv")
    _same(gpu_triton.tp_conv_sender(g, y, w, *graph, c, out_path),
          reference.tp_conv_sender(g64, y64, w64, *graph, coupling, out_path), dtype,
          "tp_conv_sender")
    for needs in needs_list:
        got = gpu_triton.tp_conv_vjp(g, x, y, w, *graph, c, out_path, *needs)
        want = reference.tp_conv_vjp(g64, x64, y64, w64, *graph, coupling, out_path, *needs)
        for a, b, name in zip(got, want, ("x", "y", "w"), strict=True):
            assert a.shape == b.shape, (name, needs)
            _same(a, b, dtype, f"tp_conv_vjp {name} {needs}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_tp_conv_shared_rows_match_reference(rng, monkeypatch, dtype):
    """Rows of w shared by mirror pairs of edges (w [R, P, C], R < E): each row's w-gradient
    sums its two edges, stored by one of them; every combination of outputs, several channel
    blocks per program (tile 32: 2 channels a block)."""
    monkeypatch.setattr(gpu_triton, "TILE", 32)
    monkeypatch.setattr(gpu_triton, "EDGE_TILE", 32)
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, dtype, n=6, num_edges=14, channels=7,
                                                     d_in=3, lmax=2, d_out=11, paths=4,
                                                     shared=True)
    assert w.shape[0] < y.shape[0]
    _tp_ops_match(x, y, w, g, graph, coupling, out_path, dtype,
                  itertools.product((True, False), repeat=3))
    c = coupling.to(dtype)
    # a single edge's row out of range: that edge adds nothing (as in the numba kernels) and
    # its former row, read by no edge, has a zero gradient
    w_row = graph[6].clone()
    w_row[int(torch.nonzero(graph[7] < 0)[0, 0])] = w.shape[0]
    bad = (*graph[:6], w_row, graph[7])
    cpu = [t.cpu() for t in (g, x, y, w, *bad, c, out_path)]
    got = gpu_triton.tp_conv_vjp(g, x, y, w, *bad, c, out_path, True, True, True)
    want = cpu_numba.tp_conv_vjp(*cpu, True, True, True)
    for a, b, name in zip(got, want, ("x", "y", "w"), strict=True):
        _same(a.cpu(), b, dtype, f"tp_conv_vjp, a row out of range: {name}")
    _same(gpu_triton.tp_conv(x, y, w, *bad, c, out_path).cpu(),
          cpu_numba.tp_conv(*cpu[1:]), dtype, "tp_conv, a row out of range")


@pytest.mark.parametrize("dtype", DTYPES)
def test_tp_conv_spline_matches_reference(rng, dtype):
    """Weights read from the cubic table inside the kernels; some distances beyond the table
    (and one negative) give zero weights."""
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, dtype, n=5, num_edges=12, channels=3,
                                                     d_in=4, lmax=2, d_out=7, paths=3)
    coeffs = torch.randn(20, 4, 3 * 3, dtype=dtype)
    step = 0.1
    d = _here(torch.from_numpy(rng.random(12) * 2.4)).to(dtype)
    d[0] = -0.05
    x64, y64, g64, d64, c64 = _d64(x, y, g, d, coeffs)
    c = coupling.to(dtype)
    table = graph[:6]
    _same(gpu_triton.tp_conv_spline(x, y, d, coeffs, step, *table, c, out_path),
          reference.tp_conv_spline(x64, y64, d64, c64, step, *table, coupling, out_path), dtype,
          "tp_conv_spline")
    for needs in ((True, True, True), (False, False, True)):
        got = gpu_triton.tp_conv_spline_vjp(g, x, y, d, coeffs, step, *table, c, out_path,
                                            *needs)
        want = reference.tp_conv_spline_vjp(g64, x64, y64, d64, c64, step, *table, coupling,
                                            out_path, *needs)
        for a, b, name in zip(got, want, ("x", "y", "d"), strict=True):
            _same(a, b, dtype, f"tp_conv_spline_vjp {name} {needs}")


def test_tp_conv_without_edges(rng):
    n = 3
    empty = torch.zeros(0, dtype=torch.int64)
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    graph = (empty, empty, empty, ptr, empty, ptr, empty, empty)
    coupling, out_path = map(_here, _coupling(rng, 4, 16, 9, 3))
    x = torch.randn(n, 4, 2, dtype=torch.float64)
    y, w = torch.zeros(0, 16, dtype=torch.float64), torch.zeros(0, 3, 2, dtype=torch.float64)
    out = gpu_triton.tp_conv(x, y, w, *graph, coupling, out_path)
    assert out.shape == (n, 9, 2) and not out.any()
    gx, gy, gw = gpu_triton.tp_conv_vjp(torch.randn(n, 9, 2, dtype=torch.float64), x, y, w,
                                        *graph, coupling, out_path, True, True, True)
    assert gx.shape == x.shape and not gx.any() and gy.shape == y.shape and gw.shape == w.shape


def _sc_case(rng, dtype, n, dim, count, num_m, channels, num_z):
    tuples = _tuples(rng, dim, count)
    elements = _here(torch.from_numpy(rng.integers(0, num_z, n)))
    x = torch.randn(n, dim, channels, dtype=dtype)
    weights = torch.randn(num_z, tuples.shape[0], num_m, channels, dtype=dtype)
    g = torch.randn(n, num_m, channels, dtype=dtype)
    v = torch.randn(n, dim, channels, dtype=dtype)
    return x, elements, weights, tuples, g, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels,num_m", [(1, 1), (6, 3), (37, 1)])
def test_symmetric_contraction_matches_reference(rng, dtype, channels, num_m):
    """The polynomial, its vjp and vjp_vjp (every output); one element has no atom."""
    x, elements, weights, tuples, g, v = _sc_case(rng, dtype, n=7, dim=9, count=14, num_m=num_m,
                                                  channels=channels, num_z=3)
    elements = torch.where(elements == 2, 1, elements)  # element 2 has no atom
    x64, w64, g64, v64 = _d64(x, weights, g, v)
    _same(gpu_triton.symmetric_contraction(x, elements, weights, tuples),
          reference.symmetric_contraction(x64, elements, w64, tuples), dtype, "symc")
    got = gpu_triton.symmetric_contraction_vjp(g, x, elements, weights, tuples, True, True)
    want = reference.symmetric_contraction_vjp(g64, x64, elements, w64, tuples, True, True)
    for a, b, name in zip(got, want, ("x", "weights"), strict=True):
        _same(a, b, dtype, f"symc_vjp {name}")
    got = gpu_triton.symmetric_contraction_vjp_vjp(v, g, x, elements, weights, tuples, True,
                                                   True, True)
    want = reference.symmetric_contraction_vjp_vjp(v64, g64, x64, elements, w64, tuples, True,
                                                   True, True)
    for a, b, name in zip(got, want, ("g", "x", "weights"), strict=True):
        _same(a, b, dtype, f"symc_vjp_vjp {name}")
    gx, gw = gpu_triton.symmetric_contraction_vjp(g, x, elements, weights, tuples, False, True)
    assert gx.numel() == 0 and gw.shape == weights.shape


def test_autograd_on_the_triton_backend(rng):
    """A scalar built from every op, its gradients and a force-training second derivative on
    backend='triton' equal the reference backend's (float64); ops without a Triton kernel
    (radial_spline under tp_conv_spline's differentiable backward) run the reference."""
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, torch.float64, n=4, num_edges=8,
                                                     channels=2, d_in=4, lmax=1, d_out=6,
                                                     paths=3)
    vectors = torch.randn(8, 3, dtype=torch.float64)
    coeffs = torch.randn(12, 4, 3 * 2, dtype=torch.float64)
    _, elements, weights, tuples, _, _ = _sc_case(rng, torch.float64, n=4, dim=6, count=8,
                                                  num_m=1, channels=2, num_z=2)

    def energy_and_grads(backend):
        leaves = [t.clone().requires_grad_(True) for t in (vectors, x, w, weights)]
        v, xl, wl, wt = leaves
        ys = op.spherical_harmonics(v, 1, backend)
        d = torch.linalg.vector_norm(v, dim=1)
        h = op.tp_conv(xl, ys, wl, *graph, coupling, out_path, backend)
        h = h + op.tp_conv_spline(xl, ys, d, coeffs, 0.1, *graph[:6], coupling, out_path,
                                  backend)
        b = op.symmetric_contraction(h, elements, wt, tuples, backend)
        e = (b ** 2).sum()
        grads = torch.autograd.grad(e, leaves, create_graph=True)
        second = torch.autograd.grad((grads[0] ** 2).sum(), leaves[1:])  # force matching
        return (e, *grads, *second)

    for got, want in zip(energy_and_grads("triton"), energy_and_grads("reference"), strict=True):
        _same(got, want, torch.float64, "autograd")


def test_shared_rows_autograd_on_the_triton_backend(rng):
    """The tp ops with rows of w shared by mirror pairs of edges on backend='triton': tp_conv's
    gradients and a second derivative of every input (tp_conv_vjp's backward: tp_conv,
    tp_conv_sender and tp_conv_vjp with cotangents in each place), and tp_conv_sender's
    gradients, equal the reference backend's (float64; gradcheck'd in test_equivariant);
    tp_conv passes gradcheck."""
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, torch.float64, n=4, num_edges=8,
                                                     channels=2, d_in=2, lmax=1, d_out=4,
                                                     paths=2, shared=True)
    assert w.shape[0] < y.shape[0]

    def derivatives(backend):
        leaves = [t.clone().requires_grad_(True) for t in (x, y, w, g)]
        xl, yl, wl, gl = leaves
        out = op.tp_conv(xl, yl, wl, *graph, coupling, out_path, backend)
        grads = torch.autograd.grad((out ** 2).sum(), leaves[:3], create_graph=True)
        second = torch.autograd.grad(sum((t ** 2).sum() for t in grads), leaves[:3])
        sender = op.tp_conv_sender(gl, yl, wl, *graph, coupling, out_path, backend)
        return (out, *grads, *second, *torch.autograd.grad((sender ** 2).sum(), (gl, yl, wl)))

    for got, want in zip(derivatives("triton"), derivatives("reference"), strict=True):
        _same(got, want, torch.float64, "shared rows autograd")
    leaves = tuple(t.clone().requires_grad_(True) for t in (x, y, w))
    assert torch.autograd.gradcheck(
        lambda x, y, w: op.tp_conv(x, y, w, *graph, coupling, out_path, "triton"), leaves)


def test_opcheck_on_the_triton_backend(rng):
    """torch.library.opcheck of the ops with a Triton kernel, run on it: every check for
    tp_conv and the harmonics, the schema and fake impls for the rest (their autograd is
    compared with the reference backend above; the interpreter is slow)."""
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, torch.float64, n=4, num_edges=7,
                                                     channels=2, d_in=2, lmax=1, d_out=4,
                                                     paths=2)
    torch.library.opcheck(op.tp_conv, (x, y, w, *graph, coupling, out_path, "triton"))
    cheap = ("test_schema", "test_faketensor")
    torch.library.opcheck(op.tp_conv_vjp, (g, x, y, w, *graph, coupling, out_path, True, False,
                                           True, "triton"), test_utils=cheap)
    xr, yr, wr, gr, rows, cr, pr = _tp_case(rng, torch.float64, n=4, num_edges=7, channels=2,
                                            d_in=2, lmax=1, d_out=4, paths=2, shared=True)
    torch.library.opcheck(op.tp_conv_vjp, (gr, xr, yr, wr, *rows, cr, pr, True, True, True,
                                           "triton"), test_utils=cheap)
    coeffs = torch.randn(8, 4, 2 * 2, dtype=torch.float64)
    d = torch.rand(7, dtype=torch.float64)
    torch.library.opcheck(op.tp_conv_spline_vjp, (g, x, y, d, coeffs, 0.1, *graph[:6],
                                                  coupling, out_path, True, True, True,
                                                  "triton"),
                          test_utils=cheap)
    xs, elements, weights, tuples, gs, v = _sc_case(rng, torch.float64, n=3, dim=3, count=5,
                                                    num_m=2, channels=2, num_z=2)
    torch.library.opcheck(op.symmetric_contraction_vjp_vjp, (v, gs, xs, elements, weights,
                                                             tuples, True, True, True, "triton"),
                          test_utils=cheap)
    vectors = torch.randn(5, 3, dtype=torch.float64)
    torch.library.opcheck(op.spherical_harmonics_vjp, (torch.randn(5, 16, dtype=torch.float64),
                                                       vectors, 3, "triton"))


def test_launchers_do_not_synchronise(rng):
    """A steady step of every Triton launcher reads nothing back from the device (sizes from
    shapes, the table's step from a cached device scalar, atoms sorted by element on the
    device): the GPU path can be captured in a CUDA graph."""
    x, y, w, g, graph, coupling, out_path = _tp_case(rng, torch.float64, n=4, num_edges=7,
                                                     channels=2, d_in=4, lmax=2, d_out=5,
                                                     paths=2)
    coeffs = torch.randn(8, 4, 2 * 2, dtype=torch.float64)
    d = torch.rand(7, dtype=torch.float64)
    vectors = torch.randn(7, 3, dtype=torch.float64)
    xs, elements, weights, tuples, gs, v = _sc_case(rng, torch.float64, n=3, dim=3, count=5,
                                                    num_m=2, channels=2, num_z=2)
    xr, yr, wr, gr, rows, cr, pr = _tp_case(rng, torch.float64, n=4, num_edges=7, channels=2,
                                            d_in=4, lmax=2, d_out=5, paths=2, shared=True)

    def step():
        gpu_triton.spherical_harmonics_vjp(y, vectors, 2)
        gpu_triton.tp_conv(x, y, w, *graph, coupling, out_path)
        gpu_triton.tp_conv_vjp(g, x, y, w, *graph, coupling, out_path, True, True, True)
        gpu_triton.tp_conv(xr, yr, wr, *rows, cr, pr)
        gpu_triton.tp_conv_vjp(gr, xr, yr, wr, *rows, cr, pr, True, True, True)
        gpu_triton.tp_conv_spline(x, y, d, coeffs, 0.1, *graph[:6], coupling, out_path)
        gpu_triton.tp_conv_spline_vjp(g, x, y, d, coeffs, 0.1, *graph[:6], coupling, out_path,
                                      True, True, True)
        gpu_triton.symmetric_contraction_vjp_vjp(v, gs, xs, elements, weights, tuples, True,
                                                 True, True)

    step()  # the first call caches the table's step on the device
    with count_host_syncs() as syncs:
        step()
    assert int(syncs) == 0, syncs.report()


def test_backends_report_the_triton_ops(monkeypatch):
    """fastff.backends(): the ops with a Triton kernel take it, the others name the fallback."""
    device = torch.empty(0).device  # cuda when the Triton tests run compiled
    monkeypatch.setenv("FASTFF_BACKEND", "triton")
    table = registry.backends(device, file=io.StringIO())
    key = str(device)
    for name in op._TRITON:
        assert table[name][key][0] == "triton", name
    for name in ("radial_spline", "radial_spline_vjp", "silu_term"):
        assert table[name][key] == ("reference", f"{name} has no triton kernel"), name
        assert registry.launcher(name, "triton") is getattr(reference, name)
    assert registry.launcher("tp_conv", "triton") is gpu_triton.tp_conv


def test_mace_model_on_the_triton_backend(rng):
    """fastff.interop.mace.accelerate(model, backend='triton') gives the unmodified model's
    energy and forces (float64): l <= 1 features into the second interaction, l <= 2
    harmonics, correlation 2; four atoms within the cutoff of one another (tiny: the
    interpreter runs every kernel)."""
    pytest.importorskip("mace.modules")
    import test_interop_mace as t

    from fastff.interop import mace as fm

    model = _here(t.build(hidden="2x0e+2x1o", max_ell=2, correlation=2, num_interactions=2))
    fast = fm.accelerate(copy.deepcopy(model), backend="triton")
    pos = _here(torch.from_numpy(rng.random((4, 3)) * 2.0))  # pairs closer than 2 sqrt(3) < 3.5
    z = _here(torch.from_numpy(rng.choice([1, 6, 8], 4)))
    nl, cell = fastff.neighbor_list(pos, t.CUTOFF), None
    assert nl.i.shape[0] == 12
    want = t.outputs(model, pos, z, nl, cell)
    got = t.outputs(fast, pos, z, nl, cell)
    for key in ("energy", "forces"):
        assert_close_scaled(got[key], want[key], "mace", torch.float64, key)
    for name in ("spherical_harmonics", "tp_conv", "symmetric_contraction"):
        assert fm._backend(fast._fastff_shared, name, pos.device) == "triton", name
