"""spline_conv_positions (the tabulated filter with distances computed from positions inside the
kernel) and its row-owned backward: every backend against the float64 reference, single and
batched triclinic cells (including cells smaller than twice the cutoff, where an atom meets its
own images), gradcheck / gradgradcheck / opcheck, and bad or empty inputs."""

import pytest
import torch

import fastff
from fastff.kernels.message import cpu_numba, gpu_triton, op, reference
from fastff.testing import tolerance

BACKENDS = ["numba", "triton", "reference"]
MODULES = {"numba": cpu_numba, "triton": gpu_triton, "reference": reference}
CUTOFF = 2.0


def system(n, *, batched=False, box=None, dtype=torch.float64):
    """Random atoms in one or two triclinic cells and their full neighbor list. ``box`` below
    2 * CUTOFF puts atoms next to their own periodic images."""
    box = box or (n / 0.6) ** (1 / 3) * CUTOFF / 2.0
    cells = [torch.eye(3, dtype=torch.float64) * box + 0.2 * torch.rand(3, 3, dtype=torch.float64)
             for _ in range(2 if batched else 1)]
    sizes = [n - n // 2, n // 2] if batched else [n]
    pos = torch.cat([torch.rand(k, 3, dtype=torch.float64) @ c
                     for k, c in zip(sizes, cells, strict=True)])
    batch = (torch.repeat_interleave(torch.arange(2), torch.tensor(sizes)) if batched else None)
    cell = torch.stack(cells) if batched else cells[0]
    nl = fastff.neighbor_list(pos, CUTOFF, cell, batch=batch, backend="reference")
    assert nl.symmetric and bool((nl.reverse >= 0).all())
    pos = pos.to(dtype)
    return nl, pos, nl._cell_for(pos, cell.to(dtype))


def geometry(nl):
    return nl.batch, nl.i, nl.j, nl.shifts, nl.ptr


def _close(got, want, dtype):
    scale = want.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(got.double() / scale, want.double() / scale,
                               **tolerance("message", dtype))


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["single", "batched", "small_cell"])
def test_launchers_match_reference(rng, backend, dtype, layout):
    """Forward and the three gradients against the float64 reference; on Triton, F = 70 makes two
    feature blocks (their partial position and cell gradients are summed)."""
    # Triton, interpreted: small; F = 70 is two feature blocks
    n, nf = (40, 24) if backend == "numba" else (8, 70 if dtype == torch.float64 else 5)
    if layout == "small_cell":
        n = 6 if backend == "numba" else 3
    nl, pos, cells = system(n, batched=layout == "batched",
                            box=0.8 * CUTOFF if layout == "small_cell" else None, dtype=dtype)
    if layout == "small_cell":
        assert bool(((nl.i == nl.j) & nl.shifts.any(1)).any())  # an atom and its own image
    m = MODULES[backend]
    x, g = torch.randn(n, nf, dtype=dtype), torch.randn(n, nf, dtype=dtype)
    coeffs = torch.randn(9, 4, nf, dtype=dtype)
    wide = [t.double() for t in (pos, cells, coeffs)]
    out = m.spline_conv_positions(x, pos, cells, *geometry(nl), coeffs, CUTOFF)
    want = reference.spline_conv_positions(x.double(), wide[0], wide[1], *geometry(nl), wide[2],
                                           CUTOFF)
    assert out.dtype == dtype
    _close(out, want, dtype)
    wanted = reference.spline_conv_positions_vjp(g.double(), x.double(), wide[0], wide[1],
                                                 *geometry(nl), wide[2], CUTOFF, True, True)
    for need_x, need_cell in ((True, True), (False, False)):
        grads = m.spline_conv_positions_vjp(g, x, pos, cells, *geometry(nl), coeffs, CUTOFF,
                                            need_x, need_cell)
        for got, exp, need in zip(grads, wanted, (need_x, True, need_cell), strict=True):
            if need:
                assert got.dtype == dtype and got.shape == exp.shape
                _close(got, exp, dtype)
            else:
                assert got.numel() == 0


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_out_of_range_sender_is_skipped(rng, backend):
    """An out-of-range sender (possible only with value checks off) contributes nothing and is
    never read: the forward equals the reference without that edge."""
    n, nf = 9, 3
    nl, pos, cells = system(n)
    x = torch.randn(n, nf, dtype=torch.float64)
    coeffs = torch.randn(6, 4, nf, dtype=torch.float64)
    bad_j = nl.j.clone()
    bad_j[5] = n + 3
    keep = torch.arange(len(nl)) != 5
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(nl.i[keep], minlength=n), 0)
    m = MODULES[backend]
    got = m.spline_conv_positions(x, pos, cells, None, nl.i, bad_j, nl.shifts, nl.ptr, coeffs,
                                  CUTOFF)
    want = reference.spline_conv_positions(x, pos, cells, None, nl.i[keep], nl.j[keep],
                                           nl.shifts[keep], ptr, coeffs, CUTOFF)
    _close(got, want, torch.float64)
    grads = m.spline_conv_positions_vjp(x, x, pos, cells, None, nl.i, bad_j, nl.shifts, nl.ptr,
                                        coeffs, CUTOFF, True, True)
    assert all(bool(torch.isfinite(t).all()) for t in grads)


def _small(backend, batched=False):
    n, nf = (4, 2) if backend == "triton" else (7, 3)
    nl, pos, cells = system(n, batched=batched, box=4.0)  # few neighbours: cheap Jacobians
    x = torch.randn(n, nf, dtype=torch.float64, requires_grad=True)
    coeffs = torch.randn(6, 4, nf, dtype=torch.float64)
    return nl, pos.requires_grad_(True), cells.clone().requires_grad_(True), x, coeffs


def _conv(nl, coeffs, backend):
    def f(x, pos, cells):
        return op.spline_conv_positions(x, pos, cells, *geometry(nl), coeffs, CUTOFF, backend)
    return f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batched", [False, True])
def test_gradcheck_and_opcheck(rng, backend, batched, monkeypatch):
    """First order runs the fused row-owned vjp, second order the composite (pair_vectors, norm,
    spline_conv), so every order works."""
    nl, pos, cells, x, coeffs = _small(backend, batched)
    f = _conv(nl, coeffs, backend)
    calls = []
    fused = op.spline_conv_positions_vjp
    monkeypatch.setattr(op, "spline_conv_positions_vjp",
                        lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
    torch.autograd.grad(f(x, pos, cells).pow(2).sum(), (x, pos, cells))
    assert calls  # no graph asked for: the fused op
    calls.clear()
    torch.autograd.grad(f(x, pos, cells).pow(2).sum(), (x, pos), create_graph=True)
    assert not calls  # a graph: the composite backward
    monkeypatch.undo()
    inputs = (x, pos, cells)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=backend == "triton")
    assert torch.autograd.gradcheck(lambda x: f(x, pos.detach(), cells.detach()), (x,),
                                    fast_mode=backend == "triton")  # x alone: the same op
    detached = [t.detach() for t in inputs]
    torch.library.opcheck(op.spline_conv_positions,
                          (*inputs, *geometry(nl), coeffs, CUTOFF, backend))
    g = torch.randn_like(detached[0])
    for need in (False, True):
        torch.library.opcheck(op.spline_conv_positions_vjp,
                              (g, *detached, *geometry(nl), coeffs, CUTOFF, need, need, backend))
    if backend == "triton":  # interpreted; the composite is made of ops gradgradchecked elsewhere
        return
    assert torch.autograd.gradgradcheck(f, inputs)


def test_vjp_refuses_differentiation_and_table_gradient(rng):
    nl, pos, cells, x, coeffs = _small("numba")
    out = op.spline_conv_positions_vjp(x, x, pos, cells, *geometry(nl), coeffs, CUTOFF, True,
                                       False, "numba")
    with pytest.raises(RuntimeError, match="no derivative"):
        out[1].sum().backward()
    y = _conv(nl, coeffs.clone().requires_grad_(True), "numba")(x, pos, cells)
    with pytest.raises(RuntimeError, match="tabulated"):
        y.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_edge_set(backend):
    n, nf = 5, 3
    empty = torch.zeros(0, dtype=torch.int64)
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    pos = torch.rand(n, 3, dtype=torch.float64, requires_grad=True)
    cells = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    x = torch.randn(n, nf, dtype=torch.float64, requires_grad=True)
    coeffs = torch.randn(6, 4, nf, dtype=torch.float64)
    out = op.spline_conv_positions(x, pos, cells, None, empty, empty,
                                   torch.zeros(0, 3, dtype=torch.int32), ptr, coeffs, CUTOFF,
                                   backend)
    assert out.shape == (n, nf) and not out.any()
    gx, gpos = torch.autograd.grad(out.sum(), (x, pos))
    assert not gx.any() and not gpos.any()


def test_deterministic_run_to_run(rng):
    nl, pos, cells = system(60)
    x, g = torch.randn(60, 16, dtype=torch.float64), torch.randn(60, 16, dtype=torch.float64)
    coeffs = torch.randn(9, 4, 16, dtype=torch.float64)
    args = (g, x, pos, cells, *geometry(nl), coeffs, CUTOFF, True, True)
    first = cpu_numba.spline_conv_positions_vjp(*args)
    for got, want in zip(cpu_numba.spline_conv_positions_vjp(*args), first, strict=True):
        assert torch.equal(got, want)
