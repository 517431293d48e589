"""The fused Triton CFConv and PaiNN kernels (kernels/message/gpu_triton_filter.py,
gpu_triton_painn.py) against the float64 reference: forward, kept pair filters, the backward's
x-, distance- and every parameter gradient and kept products, over filter settings, sizes that
are not powers of two (padded tl.dot operands), atoms without neighbours, a batch of systems,
several edge chunks of the parameter reduction; float32 with IEEE and with TF32 GEMMs;
force-matching training through fastff.nn.CFConv; PaiNN's message and its backward alike.
Interpreted on CPU (TRITON_INTERPRET=1), compiled where a GPU exists."""

from types import SimpleNamespace

import pytest
import torch

import fastff
import fastff.nn as fnn
from fastff.kernels.message import dense, gpu_triton, reference
from fastff.kernels.message import gpu_triton_filter as fused
from fastff.testing import tolerance

BUDGET = 256 * 2**20
FILTERS = [("gaussian", "cosine", "shifted_softplus"), ("bessel", "polynomial", "silu"),
           ("gaussian", "none", "silu")]


@pytest.fixture(autouse=True)
def ieee(monkeypatch):
    monkeypatch.setattr(fused, "TF32", False)  # float32 at 1e-5 needs IEEE GEMMs
    monkeypatch.setattr(fused, "PARAM_CHUNKS", 3)  # several partial rows summed


def system(n, cutoff=2.0, box=None, batch=False, dtype=torch.float64):
    """Random atoms (~10 neighbours each, fewer with a larger ``box``), optionally two systems
    of n atoms each; the full list and its distances."""
    box = box or (n / 0.6) ** (1 / 3) * cutoff / 2.0
    systems = 2 if batch else 1
    pos = torch.rand(systems * n, 3, dtype=torch.float64) * box
    cell = torch.eye(3, dtype=torch.float64) * box + 0.1 * torch.rand(3, 3, dtype=torch.float64)
    index = None
    if batch:
        cell = torch.stack([cell, cell * 1.1])
        index = torch.arange(systems).repeat_interleave(n)
    nl = fastff.neighbor_list(pos, cutoff, cell, batch=index, backend="reference")
    return nl, nl.distances(pos, cell).to(dtype)


def isolate(nl, d, atom):
    """The list without the pairs of ``atom``: its row (and its column) left empty."""
    keep = (nl.i != atom) & (nl.j != atom)
    new_index = torch.cumsum(keep.long(), 0) - 1
    n = nl.num_atoms
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(nl.i[keep], minlength=n), 0)
    i, j, rev = nl.i[keep], nl.j[keep], new_index[nl.reverse[keep]]
    graph = SimpleNamespace(num_atoms=n, i=i, j=j, ptr=ptr, reverse=rev,
                            mirror_pairs=dense.mirror_pairs(i, j, rev))
    return graph, d[keep]


def weights(num_basis, nf, dtype):
    ps = [torch.randn(nf, num_basis), torch.randn(nf), torch.randn(nf, nf) / nf**0.5,
          torch.randn(nf)]
    return [p.to(dtype) for p in ps]


def close(got, want, dtype, bound=None):
    assert got.shape == want.shape and got.dtype == dtype
    scale = want.abs().max().clamp_min(1e-30)
    tol = tolerance("message", dtype) if bound is None else {"rtol": bound, "atol": bound}
    torch.testing.assert_close(got.double() / scale, want.double() / scale, **tol)


def check(nl, d, nf, num_basis, filt, dtype, bound=None, skew=False):
    """Forward and backward of the Triton launchers against the reference in float64."""
    n = nl.num_atoms
    a = (nl.i, nl.j, nl.ptr, nl.reverse, nl.mirror_pairs)
    if skew:  # mirrored distances that differ: the mirror mean takes two filters
        d = d * (1 + 0.05 * torch.rand(d.shape[0], dtype=dtype))
    x, g = torch.randn(n, nf, dtype=dtype), torch.randn(n, nf, dtype=dtype)
    p = weights(num_basis, nf, dtype)
    wide = [t.double() for t in (x, g, d, *p)]
    args = (2.0, *filt)
    out, kept = gpu_triton.cfconv(x, d, *a, *p, *args, True, BUDGET)
    want_out, want_kept = reference.cfconv(wide[0], wide[2], *a, *wide[3:], *args, True, BUDGET)
    close(out, want_out, dtype, bound)
    close(kept, want_kept, dtype, bound)
    got = gpu_triton.cfconv_vjp(g, x, d, *a, kept, *p, *args, True, True, True, BUDGET)
    want = reference.cfconv_vjp(wide[1], wide[0], wide[2], *a, want_kept, *wide[3:], *args,
                                True, True, True, BUDGET)
    for name, u, w in zip(("x", "d", "w1", "b1", "w2", "b2", "products"), got, want,
                          strict=True):
        assert u.shape == w.shape, name
        close(u, w, dtype, bound)
    return out


@pytest.mark.parametrize(("nf", "num_basis", "filt"), [(5, 4, FILTERS[1]), (20, 17, FILTERS[0]),
                                                       (33, 12, FILTERS[2])])
def test_fused_cfconv_float64(rng, nf, num_basis, filt):
    """Sizes below, at and above tl.dot's 16 (padded K and F; F = 33 is three hidden chunks),
    each filter setting."""
    nl, d = system(8)
    check(nl, d, nf, num_basis, filt, torch.float64)


def test_fused_cfconv_mirrored_distances_differ(rng):
    nl, d = system(8)
    check(nl, d, 6, 5, FILTERS[1], torch.float64, skew=True)


def test_fused_cfconv_empty_rows_and_batch(rng):
    """Atoms with no neighbours (a dilute box: zero rows of the output), and a batch of two
    systems (rows of the second follow the first)."""
    nl, d = isolate(*system(10), atom=3)
    assert (nl.ptr[1:] == nl.ptr[:-1]).any()  # atom 3 has no neighbour
    out = check(nl, d, 7, 6, FILTERS[0], torch.float64)
    empty = nl.ptr[1:] == nl.ptr[:-1]
    assert not out[empty].any()
    nl, d = system(5, batch=True)
    check(nl, d, 7, 6, FILTERS[1], torch.float64)


@pytest.mark.parametrize("filt", FILTERS[:2])
def test_fused_cfconv_float32_ieee(rng, filt):
    nl, d = system(8, dtype=torch.float32)
    assert fused.precision(torch.float32) == "ieee"
    check(nl, d, 20, 9, filt, torch.float32)


def test_fused_cfconv_float32_tf32(rng, monkeypatch):
    """TF32 GEMMs (the float32 default): the operands keep a 10-bit mantissa, so each product
    carries ~2^-11 = 4.9e-4 relative error, partly cancelling over the K + F terms of the two
    layers and the ~10-50 edges of a row: 5e-3 of the largest value bounds it with margin (the
    interpreter computes float32 GEMMs exactly, where this is the IEEE result)."""
    monkeypatch.setattr(fused, "TF32", True)
    assert fused.precision(torch.float32) == "tf32" and fused.precision(torch.float64) == "ieee"
    nl, d = system(8, dtype=torch.float32)
    check(nl, d, 20, 9, FILTERS[0], torch.float32, bound=5e-3)


def test_fused_cfconv_needs_only_what_is_asked(rng):
    """Each combination of wanted gradients gives exactly those (empty [0] tensors for the
    rest), equal to the all-gradients call; products only within the budget."""
    nl, d = system(6)
    a = (nl.i, nl.j, nl.ptr, nl.reverse, nl.mirror_pairs)
    x, g = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    p = weights(3, 4, torch.float64)
    args = (2.0, *FILTERS[0])
    none = x.new_empty(0, 4)
    full = gpu_triton.cfconv_vjp(g, x, d, *a, none, *p, *args, True, True, True, BUDGET)
    for need_p, need_x, need_d, budget in ((False, False, True, 0), (True, False, False, 0),
                                           (False, True, False, BUDGET)):
        got = gpu_triton.cfconv_vjp(g, x, d, *a, none, *p, *args, need_p, need_x, need_d,
                                    budget)
        wanted = (need_x, need_d, need_p, need_p, need_p, need_p, budget > 0)
        for u, w, want in zip(got, full, wanted, strict=True):
            if want:
                torch.testing.assert_close(u, w, rtol=1e-13, atol=1e-13)
            else:
                assert u.shape[0] == 0


def test_force_training_through_cfconv_module(rng, monkeypatch):
    """Force matching with backend="triton": the parameter gradients of a force loss (double
    backward: the fused first backward, its composite derivative) against the reference
    backend, and gradcheck of the forces in the filter weights."""
    monkeypatch.setattr(gpu_triton, "BLOCK", 5)
    n, nf, nb = 5, 3, 4
    pos = torch.rand(n, 3, dtype=torch.float64) * 2.2
    cell = torch.eye(3, dtype=torch.float64) * 2.2
    nl = fastff.neighbor_list(pos, 2.0, cell, backend="reference")
    x = torch.randn(n, nf, dtype=torch.float64)
    target = torch.randn(n, 3, dtype=torch.float64)
    grads = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(1)
        m = fnn.CFConv(nf, nb, 2.0, backend=backend).double()
        p = pos.clone().requires_grad_(True)
        (forces,) = torch.autograd.grad(m(x, p, nl, cell).sum(), p, create_graph=True)
        loss = (forces + target).pow(2).sum()
        grads[backend] = torch.autograd.grad(loss, list(m.parameters()))
    for u, w in zip(grads["triton"], grads["reference"], strict=True):
        close(u, w, torch.float64)


def check_painn(nl, d, nf, num_basis, filt, dtype, bound=None):
    """PaiNN's message and its backward (every gradient, parameters included) against the
    reference in float64."""
    n = nl.num_atoms
    a = (nl.i, nl.j, nl.ptr, nl.reverse)
    phi, v = torch.randn(n, 3 * nf, dtype=dtype), torch.randn(n, 3, nf, dtype=dtype)
    wf, bf = torch.randn(3 * nf, num_basis, dtype=dtype), torch.randn(3 * nf, dtype=dtype)
    unit = torch.nn.functional.normalize(torch.randn(nl.i.shape[0], 3, dtype=dtype), dim=1)
    upper = torch.arange(nl.i.shape[0]) < nl.reverse
    unit[nl.reverse[upper]] = -unit[upper]  # mirrored edges: negated unit vectors
    gs, gv = torch.randn(n, nf, dtype=dtype), torch.randn(n, 3, nf, dtype=dtype)
    wide = [t.double() for t in (gs, gv, phi, v, d, unit, wf, bf)]
    got = gpu_triton.painn_message(phi, v, d, unit, *a, wf, bf, 2.0, *filt)
    want = reference.painn_message(*wide[2:6], *a, *wide[6:], 2.0, *filt)
    for u, w in zip(got, want, strict=True):
        close(u, w, dtype, bound)
    got = gpu_triton.painn_message_vjp(gs, gv, phi, v, d, unit, *a, wf, bf, 2.0, *filt, True)
    want = reference.painn_message_vjp(*wide[:6], *a, *wide[6:], 2.0, *filt, True)
    for name, u, w in zip(("phi", "v", "d", "unit", "wf", "bf"), got, want, strict=True):
        assert u.shape == w.shape, name
        close(u, w, dtype, bound)


@pytest.mark.parametrize(("nf", "num_basis", "filt"), [(5, 4, ("bessel", "cosine")),
                                                       (20, 20, ("gaussian", "polynomial")),
                                                       (9, 33, ("bessel", "none"))])
def test_fused_painn_float64(rng, nf, num_basis, filt):
    """Sizes around tl.dot's 16, K = 20 and 33 (in float64 16 bases at a time: two and three
    steps), mirrored distances that differ (the sender side's own filter evaluation)."""
    nl, d = system(7)
    d = d * (1 + 0.05 * torch.rand(d.shape[0], dtype=d.dtype))
    check_painn(nl, d, nf, num_basis, filt, torch.float64)


def test_fused_painn_float32_empty_rows_and_batch(rng, monkeypatch):
    """float32 with IEEE and with TF32 GEMMs (the bound of test_fused_cfconv_float32_tf32),
    atoms without neighbours, a batch of two systems."""
    nl, d = isolate(*system(9, dtype=torch.float32), atom=0)
    assert nl.ptr[1] == 0  # atom 0 has no neighbour
    check_painn(nl, d, 12, 20, ("bessel", "cosine"), torch.float32)
    monkeypatch.setattr(fused, "TF32", True)
    nl, d = system(5, batch=True, dtype=torch.float32)
    check_painn(nl, d, 12, 20, ("bessel", "cosine"), torch.float32, bound=5e-3)


@pytest.mark.gpu
def test_fused_cfconv_is_sync_free():
    """The launchers synchronise nothing with the host (CUDA graphs, a steady MD step)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fastff.testing import count_host_syncs

    nl, d = system(30)
    d = d.cuda()
    a = tuple(t.cuda() for t in (nl.i, nl.j, nl.ptr, nl.reverse, nl.mirror_pairs))
    x = torch.randn(30, 16, device="cuda", dtype=torch.float64)
    p = [t.cuda() for t in weights(8, 16, torch.float64)]
    args = (2.0, *FILTERS[0])
    gpu_triton.cfconv(x, d, *a, *p, *args, True, BUDGET)  # compile outside the count
    gpu_triton.cfconv_vjp(x, x, d, *a, x[:0], *p, *args, True, True, True, BUDGET)
    with count_host_syncs() as syncs:
        gpu_triton.cfconv(x, d, *a, *p, *args, True, BUDGET)
        gpu_triton.cfconv_vjp(x, x, d, *a, x[:0], *p, *args, True, True, True, BUDGET)
    assert int(syncs) == 0, syncs
