"""fastff.nn modules: every path against a float64 reference written with plain torch autograd
(materialised filter, index_add), forces and force-matching training, determinism, rotation
equivariance, the make_fx + torch.compile training route, the tabulated filter, and bad input."""

import warnings

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fastff
import fastff.nn as fnn
from fastff.kernels.message import cpu_numba, gpu_triton
from fastff.kernels.message import reference as message_reference
from fastff.testing import tolerance

warnings.filterwarnings("ignore", message="fastff: neighbor_list falls back")


def system(n, cutoff=2.5, density=0.6, dtype=torch.float64):
    box = (n / density) ** (1 / 3)
    pos = torch.rand(n, 3, dtype=torch.float64) * box
    cell = (torch.eye(3, dtype=torch.float64) * box
            + 0.2 * torch.rand(3, 3, dtype=torch.float64)).to(dtype)
    pos = pos.to(dtype)
    return pos, cell, fastff.neighbor_list(pos, cutoff, cell)


def reference_cfconv(m, x, pos, nl, cell):
    """out_i = sum_j x_j W(r_ij) with torch autograd only (no fastff backward formula)."""
    d = torch.linalg.vector_norm(pos[nl.j] - pos[nl.i] + nl.shifts.to(pos.dtype) @ cell, dim=1)
    w = m.filter(d, backend="reference")
    return torch.zeros_like(x).index_add(0, nl.i, x[nl.j] * w)


def chain(fn, m, x, pos, cell, target):
    """(outputs, forces, d sum(out)/d params, force-loss, d loss / d params)."""
    p = pos.clone().requires_grad_(True)
    out = fn(x, p, cell)
    (grad,) = torch.autograd.grad(out.sum(), p, create_graph=True)
    forces = -grad
    gp = torch.autograd.grad(out.sum(), list(m.parameters()), retain_graph=True)
    loss = (forces - target).pow(2).sum()
    gl = torch.autograd.grad(loss, list(m.parameters()))
    return [out, forces, *gp, loss, *gl]


def _close(got, want, kind, dtype):
    scale = want.detach().abs().max().clamp_min(1e-30)
    torch.testing.assert_close(got.detach().double() / scale, want.detach().double() / scale,
                               **tolerance(kind, dtype))


@pytest.mark.parametrize("backend", ["numba", "triton", "reference"])
@pytest.mark.parametrize("filt", [("gaussian", "cosine", "shifted_softplus"),
                                  ("bessel", "polynomial", "silu")])
def test_cfconv_training_chain_float64(rng, backend, filt, monkeypatch):
    monkeypatch.setattr(cpu_numba, "BLOCK_FEATURES", 90)
    monkeypatch.setattr(cpu_numba, "SMALL_F_GROWTH", 1.0)
    monkeypatch.setattr(gpu_triton, "BLOCK", 11)
    n, nf, nb = (6, 3, 4) if backend == "triton" else (24, 8, 6)
    kind, env, act = filt
    pos, cell, nl = system(n)
    m = fnn.CFConv(nf, nb, 2.5, kind=kind, envelope=env, activation=act, backend=backend).double()
    x = torch.randn(n, nf, dtype=torch.float64)
    target = torch.randn(n, 3, dtype=torch.float64)
    got = chain(lambda x, p, c: m(x, p, nl, c), m, x, pos, cell, target)
    want = chain(lambda x, p, c: reference_cfconv(m, x, p, nl, c), m, x, pos, cell, target)
    for a, b in zip(got, want, strict=True):
        _close(a, b, "training", torch.float64)


def test_cfconv_float32_numba(rng):
    pos, cell, nl = system(60)
    m = fnn.CFConv(32, 12, 2.5)
    x = torch.randn(60, 32)
    target = torch.randn(60, 3)
    got = chain(lambda x, p, c: m(x, p, nl, c), m, x, pos.float(), cell.float(), target)
    m64 = fnn.CFConv(32, 12, 2.5).double()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    want = chain(lambda x, p, c: reference_cfconv(m64, x, p, nl, c), m64, x.double(), pos, cell,
                 target.double())
    for a, b in zip(got, want, strict=True):
        _close(a, b, "message", torch.float32)


def test_cfconv_deterministic(rng):
    pos, cell, nl = system(300, density=1.0)
    pos, cell = pos.float(), cell.float()
    m = fnn.CFConv(32, 10, 2.5)
    x = torch.randn(300, 32)
    target = torch.randn(300, 3)
    runs = [chain(lambda x, p, c: m(x, p, nl, c), m, x, pos, cell, target) for _ in range(2)]
    mt = fnn.CFConv(32, 10, 2.5, tabulate=True)
    mt.load_state_dict(m.state_dict())
    tab = []
    for _ in range(2):
        p = pos.clone().requires_grad_(True)
        out = mt(x, p, nl, cell)
        tab.append([out, torch.autograd.grad(out.sum(), p)[0]])
    for a, b in [*zip(*runs, strict=True), *zip(*tab, strict=True)]:
        assert torch.equal(a, b)


def test_compiled_training_matches_eager(rng):
    pos, cell, nl = system(16)
    m = fnn.CFConv(6, 5, 2.5).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    target = torch.randn(16, 3, dtype=torch.float64)
    names = [k for k, _ in m.named_parameters()]

    def step(pos, *params):
        state = dict(zip(names, params, strict=True))
        p = pos.requires_grad_(True)
        out = torch.func.functional_call(m, state, (x, p, nl, cell))
        (grad,) = torch.autograd.grad(out.sum(), p, create_graph=True)
        loss = (-grad - target).pow(2).sum()
        return (loss.detach(), *torch.autograd.grad(loss, params))

    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    # computed once, eagerly: the lazy properties must not be filled by fake tensors (and this
    # trace has no symbolic sizes for the data-dependent pair count)
    _ = nl.reverse, nl.mirror_pairs
    with fastff.no_checks():  # value checks read data, which fake tensors do not have
        graph = make_fx(step, tracing_mode="fake", _allow_non_fake_inputs=True)(
            pos.clone(), *params)
    assert any("cfconv" in str(node.target) for node in graph.graph.nodes)
    compiled = torch.compile(graph, fullgraph=True)
    got = compiled(pos.clone(), *[p.detach().clone().requires_grad_(True) for p in params])
    want = step(pos.clone(), *params)
    for a, b in zip(got, want, strict=True):
        _close(a, b, "training", torch.float64)


def test_tabulated_filter_error_at_default_size(rng):
    """K = 50 gaussians (width 0.1 A over 5 A), F = 32: the default table is within 1e-5."""
    f = fnn.RadialFilter(50, 32, 5.0)
    table = f.tabulate()
    assert table.max_rel_error <= 1e-5
    r = torch.rand(2000, dtype=torch.float64) * 5.5
    want = f.double()(r)
    _close(table(r), want, "message", torch.float32)


def test_table_follows_num_points(rng):
    """Changing a module's num_points rebuilds its table (the cache keys on it)."""
    for m in (fnn.CFConv(4, 3, 2.5, tabulate=True), fnn.PaiNNMessage(4, 3, 2.5, tabulate=True)):
        first = m.table()
        assert m.table() is first and first.coeffs.shape[0] == 999
        m.num_points = 120
        assert m.table().coeffs.shape[0] == 119


@pytest.mark.parametrize("backend", ["numba", "triton", "reference"])
def test_tabulated_cfconv_matches_mlp(rng, backend):
    n, nf = (6, 3) if backend == "triton" else (30, 16)
    pos, cell, nl = system(n)
    m = fnn.CFConv(nf, 8, 2.5, backend=backend).double()
    mt = fnn.CFConv(nf, 8, 2.5, tabulate=True, num_points=2000, backend=backend).double()
    mt.load_state_dict(m.state_dict())
    x = torch.randn(n, nf, dtype=torch.float64, requires_grad=True)
    results = []
    for mod in (m, mt):
        p = pos.clone().requires_grad_(True)
        out = mod(x, p, nl, cell)
        results.append([out, *torch.autograd.grad(out.pow(2).sum(), (p, x))])
    for a, b in zip(*results, strict=True):
        _close(a, b, "message", torch.float32)
    # the table follows parameter updates
    with torch.no_grad():
        m.filter.dense2.bias.add_(1.0)
    mt.load_state_dict(m.state_dict())
    _close(mt(x, pos, nl, cell), m(x, pos, nl, cell), "message", torch.float32)


def table_reference(nl, coeffs, cutoff):
    """CFConv through a spline table with plain torch autograd: W(d) [E, F] materialised."""
    def conv(x, p, cell):
        d = torch.linalg.vector_norm(p[nl.j] - p[nl.i] + nl.shifts.to(p.dtype) @ cell, dim=1)
        w = message_reference.spline_matrix(d, coeffs, cutoff, 0)
        return torch.zeros_like(x).index_add(0, nl.i, x[nl.j] * w)
    return conv


@pytest.mark.parametrize("backend,dtype", [("numba", torch.float64), ("numba", torch.float32),
                                           ("triton", torch.float64),
                                           ("reference", torch.float64)])
def test_tabulated_cfconv_forces(rng, backend, dtype):
    """CFConv(tabulate=True) computes distances inside spline_conv_positions. First order: its
    fused row-owned backward (x, position and cell gradients) without ever building the mirror
    index. With create_graph=True: the composite backward (spline_conv and its fused
    spline_conv_vjp). Both against plain torch autograd through the same table in float64."""
    n, nf = (6, 3) if backend == "triton" else (40, 16)
    pos, cell, nl = system(n)
    mt = fnn.CFConv(nf, 8, 2.5, tabulate=True, backend=backend).to(dtype)
    reference = table_reference(nl, mt.table().coeffs.double(), mt.cutoff)
    x = torch.randn(n, nf, dtype=torch.float64)
    weights = torch.randn(n, nf, dtype=torch.float64)
    for create_graph in (False, True):
        results = []
        for fn, dt in ((lambda x, p, c: mt(x, p, nl, c), dtype), (reference, torch.float64)):
            inputs = [t.to(dt).requires_grad_(True) for t in (x, pos, cell)]
            out = fn(*inputs)
            results.append([out, *torch.autograd.grad((out * weights.to(dt)).sum(), inputs,
                                                      create_graph=create_graph)])
        assert "spline_conv_positions" in results[0][0].grad_fn.name()
        if create_graph:
            assert "spline_conv_vjp" in results[0][1].grad_fn.name()
        else:
            assert nl._reverse is None  # the mirror index was never needed
        for a, b in zip(*results, strict=True):
            _close(a, b, "message", dtype)


def test_unverified_neighbor_list_is_checked_for_mirrors(rng):
    """A NeighborList not built by fastff.neighbor_list is checked for mirror pairs (the
    row-owned backwards rely on them): a list missing one is refused."""
    pos, cell, nl = system(12)
    keep = torch.arange(len(nl)) != 3
    ptr = torch.zeros(13, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(nl.i[keep], minlength=12), 0)
    broken = fastff.NeighborList(nl.i[keep], nl.j[keep], nl.shifts[keep], ptr, cutoff=nl.cutoff,
                                 half=False, num_atoms=12, batch=None, cells=nl._cells,
                                 pbc=nl.pbc, cell=cell, backend=nl.backend)
    assert not broken.symmetric
    m = fnn.CFConv(4, 8, 2.5, tabulate=True).double()
    with pytest.raises(ValueError, match="mirror"):
        m(torch.randn(12, 4, dtype=torch.float64), pos, broken, cell)


def reference_painn(m, s, v, pos, nl, cell):
    vec = pos[nl.j] - pos[nl.i] + nl.shifts.to(pos.dtype) @ cell
    d = torch.linalg.vector_norm(vec, dim=1)
    basis = fastff.mp.radial_basis(d, num_basis=m.num_basis, cutoff=m.cutoff, kind="bessel",
                                   envelope="cosine", backend="reference")
    w = basis @ m.filter.weight.t() + torch.where(d < m.cutoff, 0.5 * torch.cos(
        torch.pi * d / m.cutoff) + 0.5, torch.zeros_like(d)).unsqueeze(1) * m.filter.bias
    x = m.context(s)[nl.j] * w
    nf = m.num_features
    ds = torch.zeros_like(s).index_add(0, nl.i, x[:, :nf])
    msg = x[:, nf:2 * nf].unsqueeze(1) * (vec / d.unsqueeze(1)).unsqueeze(2) \
        + x[:, 2 * nf:].unsqueeze(1) * v[nl.j]
    return ds, torch.zeros_like(v).index_add(0, nl.i, msg)


@pytest.mark.parametrize("backend", ["numba", "triton", "reference"])
def test_painn_matches_reference_and_trains(rng, backend):
    n, nf = (6, 2) if backend == "triton" else (20, 6)
    pos, cell, nl = system(n)
    m = fnn.PaiNNMessage(nf, 5, 2.5, backend=backend).double()
    s = torch.randn(n, nf, dtype=torch.float64)
    v = torch.randn(n, 3, nf, dtype=torch.float64)
    target = torch.randn(n, 3, dtype=torch.float64)

    def energy(fn):
        def f(x, p, c):
            ds, dv = fn(s, v, p, c)
            return ds.pow(2) + dv.pow(2).sum(1)
        return f

    got = chain(energy(lambda s, v, p, c: m(s, v, p, nl, c)), m, s, pos, cell, target)
    want = chain(energy(lambda s, v, p, c: reference_painn(m, s, v, p, nl, c)), m, s, pos, cell,
                 target)
    for a, b in zip(got, want, strict=True):
        _close(a, b, "training", torch.float64)


def record_launches(monkeypatch) -> list:
    """(launcher name, its inputs by name, its output) of every fastff launch from now on."""
    from fastff.kernels._runtime import registry

    calls = []
    plain_launcher = registry.launcher

    def recording_launcher(name, backend):
        fn = plain_launcher(name, backend)

        def record(**inputs):
            output = fn(**inputs)
            calls.append((name, inputs, output))
            return output
        return record

    monkeypatch.setattr(registry, "launcher", recording_launcher)
    return calls


def launched(calls, name, *flags) -> list:
    """The values of ``flags`` of every launch of ``name`` in ``calls``, in order."""
    return [tuple(inputs[f] for f in flags) for n, inputs, _ in calls if n == name]


def test_backward_computes_only_the_gradients_asked_for(rng, monkeypatch):
    """Forces of trainable CFConv and PaiNNMessage layers (autograd.grad(E, positions)) do not
    compute weight gradients, nor CFConv's gradient in x when x depends only on weights; asking
    for a weight, or calling backward(), does, and every result matches the reference."""
    calls = record_launches(monkeypatch)
    n, nf = 20, 6
    pos, cell, nl = system(n)
    lin = torch.nn.Linear(nf, nf).double()
    conv = fnn.CFConv(nf, 5, 2.5, backend="numba").double()
    painn = fnn.PaiNNMessage(nf, 5, 2.5, backend="numba").double()
    h = torch.randn(n, nf, dtype=torch.float64)
    v = torch.randn(n, 3, nf, dtype=torch.float64)

    def energy(p, reference=False):
        x = lin(h)
        out = reference_cfconv(conv, x, p, nl, cell) if reference else conv(x, p, nl, cell)
        ds, dv = (reference_painn if reference else lambda *a: painn(*a[1:]))(
            painn, out, v, p, nl, cell)
        return ds.pow(2).sum() + dv.pow(2).sum()

    p = pos.clone().requires_grad_(True)
    calls.clear()
    (forces,) = torch.autograd.grad(energy(p), p)
    vjp_flags = ("need_params", "need_x", "need_d")
    assert launched(calls, "cfconv_vjp", *vjp_flags) == [(False, False, True)]
    assert launched(calls, "painn_message_vjp", "need_params") == [(False,)]
    assert len(launched(calls, "cfconv")) == 1  # the forward only: no grad_x
    weights = [conv.filter.dense1.weight, painn.filter.weight]
    want = torch.autograd.grad(energy(p, reference=True), [p, *weights])
    _close(forces, want[0], "training", torch.float64)

    calls.clear()
    got = torch.autograd.grad(energy(p), [p, *weights])
    assert launched(calls, "cfconv_vjp", *vjp_flags) == [(True, False, True)]
    assert launched(calls, "painn_message_vjp", "need_params") == [(True,)]
    for a, b in zip(got, want, strict=True):
        _close(a, b, "training", torch.float64)

    energy(p).backward()
    for w, b in zip(weights, want[1:], strict=True):
        _close(w.grad, b, "training", torch.float64)
    assert lin.weight.grad is not None


def test_tabulated_forces_skip_the_x_gradient(rng, monkeypatch):
    """Forces of a tabulated CFConv whose input x depends on trainable weights only do not
    compute the x-gradient; asking for a weight's gradient does, and matches the reference
    backend's tabulated path."""
    calls = record_launches(monkeypatch)
    n, nf = 20, 6
    pos, cell, nl = system(n)
    lin = torch.nn.Linear(nf, nf).double()
    convs = [fnn.CFConv(nf, 5, 2.5, tabulate=True, backend=b).double()
             for b in ("numba", "reference")]
    convs[1].filter.load_state_dict(convs[0].filter.state_dict())
    h = torch.randn(n, nf, dtype=torch.float64)
    p = pos.clone().requires_grad_(True)

    def energy(conv):
        return conv(lin(h), p, nl, cell).pow(2).sum()

    calls.clear()
    (forces,) = torch.autograd.grad(energy(convs[0]), p)
    flags = ("need_x", "need_cell")
    assert launched(calls, "spline_conv_positions_vjp", *flags) == [(False, False)]
    want = torch.autograd.grad(energy(convs[1]), [p, lin.weight])
    _close(forces, want[0], "training", torch.float64)
    calls.clear()
    got = torch.autograd.grad(energy(convs[0]), [p, lin.weight])
    assert launched(calls, "spline_conv_positions_vjp", *flags) == [(True, False)]
    for a, b in zip(got, want, strict=True):
        _close(a, b, "training", torch.float64)


@pytest.mark.parametrize("backend", ["numba", "triton", "reference"])
def test_tabulated_painn_matches_mlp(rng, backend):
    n, nf = (6, 2) if backend == "triton" else (30, 8)
    pos, cell, nl = system(n)
    m = fnn.PaiNNMessage(nf, 6, 2.5, backend=backend).double()
    mt = fnn.PaiNNMessage(nf, 6, 2.5, tabulate=True, backend=backend).double()
    mt.load_state_dict(m.state_dict())
    assert mt.table().max_rel_error <= 1e-5
    s = torch.randn(n, nf, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n, 3, nf, dtype=torch.float64, requires_grad=True)
    results = []
    for mod in (m, mt):
        p = pos.clone().requires_grad_(True)
        ds, dv = mod(s, v, p, nl, cell)
        loss = ds.pow(2).sum() + dv.pow(3).sum()
        results.append([ds, dv, *torch.autograd.grad(loss, (p, s, v))])
    for a, b in zip(*results, strict=True):
        _close(a, b, "message", torch.float32)
    # the table follows parameter updates; the filter parameters get no gradient from it
    with torch.no_grad():
        m.filter.bias.add_(0.5)
    mt.load_state_dict(m.state_dict())
    ds_t, dv_t = mt(s, v, pos, nl, cell)
    ds, dv = m(s, v, pos, nl, cell)
    _close(ds_t, ds, "message", torch.float32)
    _close(dv_t, dv, "message", torch.float32)
    assert torch.autograd.grad(ds_t.sum(), mt.filter.weight, allow_unused=True)[0] is None


def test_painn_rotation_equivariant(rng):
    pos, cell, nl = system(30)
    m = fnn.PaiNNMessage(8, 6, 2.5).double()
    s = torch.randn(30, 8, dtype=torch.float64)
    v = torch.randn(30, 3, 8, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    for tabulate in (False, True):
        m.tabulate = tabulate
        ds, dv = m(s, v, pos, nl, cell)
        ds_r, dv_r = m(s, torch.einsum("ab,nbf->naf", q, v), pos @ q.T, nl, cell @ q.T)
        torch.testing.assert_close(ds_r, ds, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dv_r, torch.einsum("ab,nbf->naf", q, dv), rtol=1e-10,
                                   atol=1e-12)


def test_bad_input():
    pos, cell, nl = system(12)
    m = fnn.CFConv(4, 3, 2.5).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="x must have shape"):
        m(x[:11], pos, nl, cell)
    with pytest.raises(ValueError, match="x must have shape"):
        m(x[:, :3], pos, nl, cell)
    with pytest.raises(ValueError, match="nl was built for 12 atoms"):
        m(x[:10], pos[:10], nl, cell)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="num_basis"):
            fnn.CFConv(4, bad, 2.5)
        with pytest.raises(ValueError, match="num_features"):
            fnn.CFConv(bad, 3, 2.5)
        with pytest.raises(ValueError, match="num_features"):
            fnn.PaiNNMessage(bad, 3, 2.5)
        with pytest.raises(ValueError, match="num_basis"):
            fnn.RadialFilter(bad, 3, 2.5)
    with pytest.raises(ValueError, match="cutoff 3.0 is larger than the neighbor list's"):
        fnn.CFConv(4, 3, 3.0).double()(x, pos, nl, cell)
    with pytest.raises(TypeError, match="x has dtype torch.float32"):
        m(x.float(), pos, nl, cell)
    with pytest.raises(TypeError, match="parameter filter.dense1.weight is torch.float32"):
        fnn.CFConv(4, 3, 2.5)(x, pos, nl, cell)
    with pytest.raises(ValueError, match="x is on meta"):
        m(x.to("meta"), pos, nl, cell)
    with pytest.raises(ValueError, match="full neighbor list"):
        m(x, pos, fastff.neighbor_list(pos, 2.5, cell, half=True), cell)
    p = fnn.PaiNNMessage(4, 3, 2.5).double()
    with pytest.raises(ValueError, match="v must have shape"):
        p(x, x, pos, nl, cell)
    with pytest.raises(ValueError, match="s must have shape"):
        p(x[:5], torch.zeros(12, 3, 4, dtype=torch.float64), pos, nl, cell)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cfconv_force_training_reads_kept_blocks(rng, dtype, monkeypatch):
    """Force training of a CFConv whose x depends on trainable weights (a model's later
    interactions): the forward keeps its pair filters, the first backward (create_graph) keeps
    its products t = u w2, and the second backward reads both (passed through the autograd
    context, not recomputed); it computes no distance gradients (the loss's gradient in the
    positions is not asked for); and the gradients of a force loss in every weight match torch
    autograd through the float64 reference filter. With ``keep_budget=0`` nothing is kept and
    the gradients are the same."""
    monkeypatch.setattr(cpu_numba, "BLOCK_FEATURES", 90)  # many blocks
    monkeypatch.setattr(cpu_numba, "SMALL_F_GROWTH", 1.0)
    n, nf, nb = 40, 16, 12
    pos, cell, nl = system(n)
    m64, lin64 = fnn.CFConv(nf, nb, 2.5).double(), torch.nn.Linear(nf, nf).double()
    lin = torch.nn.Linear(nf, nf).to(dtype)
    lin.load_state_dict(lin64.state_dict())
    h, target = torch.randn(n, nf, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)

    def loss_gradients(conv, m, lin, dtype):
        p = pos.to(dtype).clone().requires_grad_(True)
        energy = conv(lin(h.to(dtype)), p, cell.to(dtype)).tanh().sum()
        (grad,) = torch.autograd.grad(energy, p, create_graph=True)
        loss = (-grad - target.to(dtype)).pow(2).sum()
        return torch.autograd.grad(loss, [*m.parameters(), *lin.parameters()])

    want = loss_gradients(lambda x, p, c: reference_cfconv(m64, x, p, nl, c), m64, lin64,
                          torch.float64)
    pairs = nl.mirror_pairs.shape[1]
    for budget, kept in ((None, pairs), (0, 0)):
        m = fnn.CFConv(nf, nb, 2.5, keep_budget=budget).to(dtype)
        m.load_state_dict(m64.state_dict())
        calls = record_launches(monkeypatch)
        got = loss_gradients(lambda x, p, c, m=m: m(x, p, nl, c), m, lin, dtype)
        monkeypatch.undo()
        second = [(name, inputs) for name, inputs, _ in calls
                  if name in ("cfconv_vjp", "cfconv_vjp_vjp")][1:]
        assert [name for name, _ in second] == ["cfconv_vjp_vjp", "cfconv_vjp"]
        (_, vjp_vjp), (_, vjp) = second
        assert (vjp_vjp["need_g"], vjp_vjp["need_x"], vjp_vjp["need_params"],
                vjp_vjp["need_d"]) == (True, True, True, False)
        assert (vjp["need_params"], vjp["need_x"], vjp["need_d"]) == (True, True, False)
        assert vjp_vjp["products"].shape == (kept, nf)  # the first backward's t = u w2
        assert vjp["filters"].shape == (kept, nf)  # the forward's W, for the x-gradient
        for a, b in zip(got, want, strict=True):
            _close(a, b, "training" if dtype == torch.float64 else "message", dtype)


def test_keep_budget_setting(rng, monkeypatch):
    """CFConv keeps within its keep_budget, or fastff.nn.KEEP_BUDGET read at each call when it
    is None; a bad budget is refused."""
    n, nf = 20, 6
    pos, cell, nl = system(n)
    x = torch.randn(n, nf, dtype=torch.float64, requires_grad=True)
    pairs = nl.mirror_pairs.shape[1]
    for budget, setting, rows in ((None, fnn.KEEP_BUDGET, pairs), (None, 0, 0), (0, None, 0),
                                  (pairs * nf * 8, 0, pairs), (pairs * nf * 8 - 1, None, 0)):
        if setting is not None:
            monkeypatch.setattr(fnn, "KEEP_BUDGET", setting)
        conv = fnn.CFConv(nf, 5, 2.5, keep_budget=budget).double()
        calls = record_launches(monkeypatch)
        conv(x, pos, nl, cell)
        monkeypatch.undo()
        ((inputs, (_, filters)),) = [(i, out) for name, i, out in calls if name == "cfconv"]
        assert inputs["keep_filters"]  # x requires grad
        assert filters.shape == (rows, nf), (budget, setting)
    with torch.no_grad():  # no graph: nothing to keep for
        calls = record_launches(monkeypatch)
        conv(x, pos, nl, cell)
        monkeypatch.undo()
        assert launched(calls, "cfconv", "keep_filters") == [(False,)]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="keep_budget"):
            fnn.CFConv(nf, 5, 2.5, keep_budget=bad)


def test_backend_resolved_when_built_set_or_moved(rng, monkeypatch):
    """A module resolves its backend when built, when ``backend`` is set and when it moves
    (``_apply``), for its parameters' device; its calls do not (FASTFF_BACKEND is read then, not
    per call). A bad name is refused."""
    from fastff.kernels._runtime import registry

    pos, cell, nl = system(12)
    resolved = []
    plain_resolve = registry.resolve

    def counting_resolve(name, device, backend=None):
        resolved.append(name)
        return plain_resolve(name, device, backend)

    monkeypatch.setattr(registry, "resolve", counting_resolve)
    x = torch.randn(12, 4, dtype=torch.float64)
    s, v = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 3, 4, dtype=torch.float64)
    conv, painn = fnn.CFConv(4, 3, 2.5), fnn.PaiNNMessage(4, 3, 2.5)
    assert {"cfconv", "spline_conv_positions", "painn_message"} <= set(resolved)
    resolved.clear()
    conv, painn = conv.double(), painn.double()  # moved (here: converted) -> resolved again
    assert {"cfconv", "painn_message", "radial_basis"} <= set(resolved)
    _ = nl.mirror_pairs
    resolved.clear()
    monkeypatch.setenv("FASTFF_BACKEND", "reference")
    for _ in range(3):
        conv(x, pos, nl, cell)
        painn(s, v, pos, nl, cell)
    assert not {"cfconv", "painn_message"} & set(resolved)  # calls only look it up
    assert conv._backend_for("cfconv", x.device) == "numba"
    conv.backend = None  # setting it resolves again (now under FASTFF_BACKEND)
    assert conv._backend_for("cfconv", x.device) == "reference"
    assert conv.filter._backend_for("radial_basis", x.device) == "reference"
    conv.backend = "numba"
    assert conv.backend == "numba" and conv.filter.backend == "numba"
    with pytest.raises(ValueError, match="backend must be one of"):
        conv.backend = "fortran"
    # a backend the parameters' device cannot run is an error only when called there
    monkeypatch.delenv("TRITON_INTERPRET")
    later = fnn.CFConv(4, 3, 2.5, backend="triton").double()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        later(x, pos, nl, cell)


def tabulated(conv, x, pos, nl, cell):
    """The tabulated conv's output, and the exact path's (its filter network) for comparison."""
    table = conv(x, pos, nl, cell)
    conv.tabulate = False
    exact = conv(x, pos, nl, cell)
    conv.tabulate = True
    return table, exact


def test_table_follows_a_data_edit(rng):
    """A ``.data`` edit of a filter weight (no new ``_version``) rebuilds the table: the
    tabulated output stays the exact path's (it drifted by 0.58 with an address-keyed cache)."""
    pos, cell, nl = system(30)
    conv = fnn.CFConv(8, 6, 2.5, tabulate=True).double()
    x = torch.randn(30, 8, dtype=torch.float64)
    _close(*tabulated(conv, x, pos, nl, cell), "message", torch.float32)
    conv.filter.dense2.weight.data.mul_(2)
    _close(*tabulated(conv, x, pos, nl, cell), "message", torch.float32)
    painn = fnn.PaiNNMessage(4, 5, 2.5, tabulate=True).double()
    first = painn.table()
    painn.filter.bias.data.add_(1.0)
    assert painn.table() is not first
    assert painn.table() is painn.table()  # unchanged: kept


def test_table_load_state_dict_and_optimizer_step(rng):
    """load_state_dict and an optimizer step (in-place updates) rebuild the table."""
    pos, cell, nl = system(30)
    conv = fnn.CFConv(8, 6, 2.5, tabulate=True).double()
    x = torch.randn(30, 8, dtype=torch.float64)
    first = conv.table()
    other = fnn.CFConv(8, 6, 2.5).double()
    conv.load_state_dict(other.state_dict())
    assert conv.table() is not first
    _close(*tabulated(conv, x, pos, nl, cell), "message", torch.float32)
    loaded = conv.table()
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    for p in conv.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert conv.table() is not loaded
    _close(*tabulated(conv, x, pos, nl, cell), "message", torch.float32)


def _random(shape, dtype=torch.float64):
    """A new tensor of normal values over the memory block that every tensor of its shape and
    dtype made here shares, at the same ``_version`` each time: what the allocator does when it
    hands a freed block back, made deterministic."""
    block = _BLOCKS.setdefault((tuple(shape), dtype), torch.empty(shape, dtype=dtype))
    fresh = torch.empty(0, dtype=dtype).set_(block.untyped_storage(), 0, block.shape,
                                             block.stride())
    return fresh.normal_()


_BLOCKS: dict = {}


def _reused_address(cache_one, tries: int = 3):
    """Repeat ``cache_one()`` (which makes a tensor, lets a cache take an entry for it, frees
    it and returns its address) until a new tensor of the same size and version lands at that
    address (at once, with :func:`_random`'s shared blocks); returns the new tensor, or None."""
    for _ in range(tries):
        old_ptr, shape, dtype = cache_one()
        new = _random(shape, dtype)
        if new.data_ptr() == old_ptr:
            return new
        del new
    return None


def test_caches_never_match_a_new_tensor_at_a_freed_address(rng):
    """A parameter, a table's coeffs and a fused layout's weight are freed and a new tensor
    with other values lands at the same address, at the same ``_version``: no cache returns the
    old entry (an address + version key would)."""
    from fastff.kernels.message.cpu_numba_activation import FusedActivation

    pos, cell, nl = system(30)
    x = torch.randn(30, 8, dtype=torch.float64)
    conv = fnn.CFConv(8, 6, 2.5, tabulate=True).double()
    shape = conv.filter.dense2.weight.shape

    def cache_weight():
        conv.filter.dense2.weight = torch.nn.Parameter(_random(shape))
        conv(x, pos, nl, cell)  # the table of this weight
        old = conv.filter.dense2.weight.data_ptr()
        del conv.filter.dense2.weight
        return old, shape, torch.float64

    new = _reused_address(cache_weight)
    assert new is not None, "the allocator never reused the address"
    conv.filter.dense2.weight = torch.nn.Parameter(new)
    _close(*tabulated(conv, x, pos, nl, cell), "message", torch.float32)

    table = fnn.RadialFilter(6, 8, 2.5).double().tabulate(50)
    r = torch.rand(40, dtype=torch.float64) * 2.5
    coeffs_shape = table.coeffs.shape

    def cache_coeffs():
        table.coeffs = _random(coeffs_shape)
        table(r.float())  # converted to float32 and kept
        old = table.coeffs.data_ptr()
        del table.coeffs
        return old, coeffs_shape, torch.float64

    new = _reused_address(cache_coeffs)
    assert new is not None, "the allocator never reused the address"
    table.coeffs = new
    want = message_reference.spline_matrix(r.float(), new.float(), table.cutoff, 0)
    torch.testing.assert_close(table(r.float()), want, rtol=0, atol=0)

    act = FusedActivation("shifted_softplus")
    b2 = torch.randn(16)

    def cache_layout():
        w2 = _random((16, 16), torch.float32)
        act._second_layer(w2, b2)
        return w2.data_ptr(), (16, 16), torch.float32

    w2 = _reused_address(cache_layout)
    assert w2 is not None, "the allocator never reused the address"
    torch.testing.assert_close(act._second_layer(w2, b2), torch.cat([w2.t(), b2[None]]),
                               rtol=0, atol=0)
