"""The dense part of the continuous-filter convolution, in pure torch, shared by every backend.

SchNet's filter network ``W(r) = u(r) (act(b(r) W1^T + b1) W2^T + b2)`` costs K*F + F*F
multiply-adds per edge: that is GEMM work, so every backend runs it as small GEMMs (BLAS on CPU,
cuBLAS on CUDA) over blocks of edges that stay in cache, and fuses only the gathers and the
receiver-sorted segment sums into its own kernels. ``blocked_forward`` and ``blocked_vjp`` are
those drivers: they never hold more than ``block`` edges x F features, and the backward
recomputes the filter instead of storing it.

The formulas (README.md beside this file) are plain torch ops, so ``filter_vjp`` on tensors that
require grad is itself differentiable to any order: the custom ops use it that way when a
backward must build a graph (force training).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as tf
from torch import Tensor

from fastff.kernels.radial.reference import envelope_derivatives

ACTIVATIONS = ("shifted_softplus", "silu")
LOG2 = math.log(2.0)


def activation(h: Tensor, kind: str) -> Tensor:
    if kind == "shifted_softplus":
        # in place on softplus' fresh output (its backward reads only h): one [N, F] tensor less
        return tf.softplus(h).sub_(LOG2)
    if kind == "silu":
        return tf.silu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


def activation_slope(h: Tensor, kind: str) -> Tensor:
    s = torch.sigmoid(h)
    if kind == "shifted_softplus":
        return s
    return s * (1 + h * (1 - s))


def envelope(d: Tensor, cutoff: float, kind: str, order: int) -> list[Tensor]:
    return envelope_derivatives(d, cutoff, kind, order)


def filter_values(basis: Tensor, env: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                  act: str) -> Tensor:
    """W [b, F] for basis [b, K], env [b]; w1 [F, K], w2 [F, F] (torch Linear layout)."""
    a = activation(torch.addmm(b1, basis, w1.t()), act)
    return torch.addmm(b2, a, w2.t()) * env.unsqueeze(1)


def filter_vjp(u: Tensor, basis: Tensor, basis_slope: Tensor, env: Tensor, env_slope: Tensor,
               w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, act: str, need_params: bool,
               need_values: bool = False):
    """Gradients of sum_e <u_e, W(d_e)> for u [b, F].

    Returns (grad_d [b], grad_w1 [F, K], grad_b1 [F], grad_w2 [F, F], grad_b2 [F], W [b, F]);
    the four parameter gradients are None unless ``need_params``, and W (from the same hidden
    layer, computed once for both) is None unless ``need_values``.
    """
    h = torch.addmm(b1, basis, w1.t())
    a = activation(h, act)
    t = u @ w2  # d<u, a w2^T>/da
    uy = (t * a).sum(1) + u @ b2
    g = t * activation_slope(h, act) * env.unsqueeze(1)  # dL/dh
    grad_d = env_slope * uy + ((g @ w1) * basis_slope).sum(1)
    values = torch.addmm(b2, a, w2.t()) * env.unsqueeze(1) if need_values else None
    if not need_params:
        return grad_d, None, None, None, None, values
    eu = u * env.unsqueeze(1)
    return grad_d, g.t() @ basis, g.sum(0), eu.t() @ a, eu.sum(0), values


def blocked_forward(x: Tensor, d: Tensor, i: Tensor, ptr: Tensor, params, cutoff: float,
                    kind: str, env_kind: str, act: str, basis_fn, rows_fn, block: int) -> Tensor:
    """out_a = sum_{e in row a} x[j_e] W(d_e), a block of edges at a time.

    ``basis_fn(d_block, K, cutoff, kind, "none", order)`` is the backend's radial kernel and
    ``rows_fn(out, x, w_block, e0, a0, a1)`` its in-place gather-multiply-segment-sum over the
    rows a0..a1 touched by edges e0..e0+len(w_block).
    """
    w1, b1, w2, b2 = params
    num_basis = w1.shape[1]
    out = x.new_zeros(ptr.shape[0] - 1, x.shape[1])
    for e0 in range(0, d.shape[0], block):
        e1 = min(e0 + block, d.shape[0])
        db = d[e0:e1]
        basis = basis_fn(db, num_basis, cutoff, kind, "none", 0)
        (env,) = envelope(db, cutoff, env_kind, 0)
        wb = filter_values(basis, env, w1, b1, w2, b2, act)
        rows_fn(out, x, wb, e0, int(i[e0]), int(i[e1 - 1]))
    return out


def blocked_vjp(g: Tensor, x: Tensor, d: Tensor, d_rev: Tensor, i: Tensor, j: Tensor, params,
                cutoff: float, kind: str, env_kind: str, act: str, need_params: bool,
                need_x: bool, basis_fn, product_fn, rows_fn, block: int):
    """Gradients of sum_a <g_a, out_a> in x, d and the filter parameters, a block at a time.

    ``product_fn(g, x, e0, e1)`` returns g[i_e] * x[j_e] for the block; ``rows_fn`` is the
    forward's segment sum, which gives the x-gradient ``sum_{e in row a} g[j_e] W(d_rev_e)``
    (sender side, over the mirrored edges) from the filter the block already has: its hidden
    layer is shared with the d-gradient, and mirrored pairs have bitwise equal distances (a
    block whose d_rev differs gets its own filter). Parameter gradients are summed over blocks
    in a fixed order: deterministic.

    Returns (grad_x [N, F] or None, grad_d [E], grad_w1, grad_b1, grad_w2, grad_b2), the
    parameter gradients None unless ``need_params``.
    """
    w1, b1, w2, b2 = params
    num_basis = w1.shape[1]
    grad_d = d.new_zeros(d.shape[0])
    grad_x = torch.zeros_like(x) if need_x else None
    sums = [torch.zeros_like(p) for p in params] if need_params else None
    for e0 in range(0, d.shape[0], block):
        e1 = min(e0 + block, d.shape[0])
        db = d[e0:e1]
        basis = basis_fn(db, num_basis, cutoff, kind, "none", 0)
        slope = basis_fn(db, num_basis, cutoff, kind, "none", 1)
        env, env_slope = envelope(db, cutoff, env_kind, 1)
        u = product_fn(g, x, e0, e1)
        shared = need_x and torch.equal(db, d_rev[e0:e1])
        gd, *gp, w = filter_vjp(u, basis, slope, env, env_slope, w1, b1, w2, b2, act,
                                need_params, shared)
        grad_d[e0:e1] = gd
        if need_x:
            if not shared:
                drb = d_rev[e0:e1]
                (env_rev,) = envelope(drb, cutoff, env_kind, 0)
                w = filter_values(basis_fn(drb, num_basis, cutoff, kind, "none", 0), env_rev,
                                  w1, b1, w2, b2, act)
            rows_fn(grad_x, g, w, e0, int(i[e0]), int(i[e1 - 1]))
        if sums is not None:
            for s, p in zip(sums, gp, strict=True):
                s += p
    return (grad_x, grad_d, *(sums if sums is not None else [None] * 4))


# ---------------------------------------------------------------- PaiNN message (README.md)
# PaiNN's filter is linear in the basis: W = u (wf b + bf) = [u b, u] [wf, bf]^T. One GEMM with
# K + 1 inner columns then gives W without a pass over [b, 3F] for the envelope, and in the
# backward gw [wf, bf] gives both <gw, wf b'>-type dots and <gw, bf>. Measured at F = 128,
# K = 20, 52k edges (2 cores): the addmm with a transposed weight plus the envelope pass took
# 2.4x the time of this GEMM.
def painn_filter(basis: Tensor, env: Tensor, wf: Tensor, bf: Tensor) -> Tensor:
    """W [b, 3F] = env * (basis wf^T + bf) for basis [b, K], env [b]; wf [3F, K]."""
    return torch.addmm(bf, basis, wf.t()) * env.unsqueeze(1)


def _augmented_basis(d: Tensor, cutoff: float, kind: str, env_kind: str, num_basis: int,
                     basis_fn, order: int):
    """([u b, u] [b, K + 1], b, b' or None, u, u' or None) of the distances d [b]."""
    basis = basis_fn(d, num_basis, cutoff, kind, "none", 0)
    slope = basis_fn(d, num_basis, cutoff, kind, "none", 1) if order else None
    env, *env_slope = envelope(d, cutoff, env_kind, order)
    aug = torch.cat([basis * env.unsqueeze(1), env.unsqueeze(1)], 1)
    return aug, basis, slope, env, (env_slope[0] if order else None)


@torch.no_grad()
def blocked_painn_forward(phi: Tensor, v: Tensor, d: Tensor, i: Tensor, ptr: Tensor, wf: Tensor,
                          bf: Tensor, cutoff: float, kind: str, env_kind: str, basis_fn,
                          rows_fn, block: int) -> tuple[Tensor, Tensor]:
    """(ds [N, F], dv [N, 3, F]) of the PaiNN message, a block of edges at a time.

    ``rows_fn(ds, dv, w_block, e0, a0, a1)`` is the backend's in-place message sum over the rows
    a0..a1 touched by edges e0..e0+len(w_block) (gathers of phi, v and the unit vectors inside).
    """
    n, nf = ptr.shape[0] - 1, v.shape[2]
    ds, dv = phi.new_zeros(n, nf), phi.new_zeros(n, 3, nf)
    d = d.detach()
    weight = torch.cat([wf.detach(), bf.detach().unsqueeze(1)], 1).t().contiguous()  # [K+1, 3F]
    for e0 in range(0, d.shape[0], block):
        e1 = min(e0 + block, d.shape[0])
        aug, *_ = _augmented_basis(d[e0:e1], cutoff, kind, env_kind, wf.shape[1], basis_fn, 0)
        rows_fn(ds, dv, aug @ weight, e0, int(i[e0]), int(i[e1 - 1]))
    return ds, dv


@torch.no_grad()
def blocked_painn_vjp(phi: Tensor, v: Tensor, d: Tensor, d_rev: Tensor, i: Tensor, ptr: Tensor,
                      wf: Tensor, bf: Tensor, cutoff: float, kind: str, env_kind: str,
                      need_params: bool, basis_fn, rows_fn, block: int):
    """Gradients of <gs, ds> + <gv, dv> of the PaiNN message, a block of edges at a time.

    ``rows_fn(gphi, r, gunit, w, w_rev, e0, a0, a1) -> gw`` is the backend's pass over the rows
    a0..a1 (with gs, gv bound): it adds the sender-side gradients of each row's atom (through the
    mirrored edges, whose filter is ``w_rev``) into ``gphi`` [N, 3F] and ``r`` [N, 3, F]
    (``r[a, k] = sum_e gv[j_e, k] W_vv(d_rev_e)``), writes ``gunit`` [E, 3] and returns the
    filter gradient ``gw`` [b, 3F] of the block's edges. Mirrored pairs have bitwise equal
    distances, so ``w_rev`` is ``w`` unless the caller's distances say otherwise.

    Returns (grad_phi [N, 3F], grad_v [N, 3, F], grad_d [E], grad_unit [E, 3], grad_wf [3F, K],
    grad_bf [3F]); the last two are None unless ``need_params``.
    """
    n, nf, num_basis = ptr.shape[0] - 1, v.shape[2], wf.shape[1]
    phi, v, d, d_rev = phi.detach(), v.detach(), d.detach(), d_rev.detach()
    gphi, r = phi.new_zeros(n, 3 * nf), phi.new_zeros(n, 3, nf)
    grad_d, gunit = d.new_zeros(d.shape[0]), d.new_zeros(d.shape[0], 3)
    weight_t = torch.cat([wf.detach(), bf.detach().unsqueeze(1)], 1)  # [3F, K + 1]
    weight = weight_t.t().contiguous()
    gweight = torch.zeros_like(weight_t) if need_params else None
    for e0 in range(0, d.shape[0], block):
        e1 = min(e0 + block, d.shape[0])
        db, drb = d[e0:e1], d_rev[e0:e1]
        aug, basis, slope, env, env_slope = _augmented_basis(db, cutoff, kind, env_kind,
                                                             num_basis, basis_fn, 1)
        w = aug @ weight
        w_rev = w
        if not torch.equal(db, drb):
            aug_rev, *_ = _augmented_basis(drb, cutoff, kind, env_kind, num_basis, basis_fn, 0)
            w_rev = aug_rev @ weight
        gw = rows_fn(gphi, r, gunit, w, w_rev, e0, int(i[e0]), int(i[e1 - 1]))
        # <gw, dW/dd> with W = u (wf b + bf): u' (<gw wf, b> + <gw, bf>) + u <gw wf, b'>
        gz = gw @ weight_t  # [b, K + 1]: (gw wf | gw bf)
        gzb = gz[:, :num_basis]
        grad_d[e0:e1] = env_slope * ((gzb * basis).sum(1) + gz[:, num_basis]) + env * (
            gzb * slope).sum(1)
        if gweight is not None:
            gweight += gw.t() @ aug  # sum_e u gw b^T | sum_e u gw
    gphi[:, 2 * nf:] = (v * r).sum(1)
    gwf, gbf = (None, None) if gweight is None else (gweight[:, :num_basis].contiguous(),
                                                      gweight[:, num_basis].contiguous())
    return gphi, phi[:, 2 * nf:].unsqueeze(1) * r, grad_d, gunit, gwf, gbf


def params_or_empty(grads: tuple, like: Tensor) -> tuple:
    """The launchers' return convention: parameter gradients not asked for (None) become
    empty [0] tensors."""
    return tuple(like.new_empty(0) if t is None else t for t in grads)


def cell_sums(cell_rows: Tensor, atom_system: Tensor | None, cells: Tensor) -> Tensor:
    """[B, 3, 3] cell gradients from per-atom rows [N, 9], summed over each system's atoms
    (in atom order on CPU: deterministic)."""
    num_systems = cells.shape[0]
    if atom_system is None:
        sums = cell_rows.sum(0, keepdim=True)
    else:
        sums = cell_rows.new_zeros(num_systems, 9).index_add_(0, atom_system, cell_rows)
    return sums.view(num_systems, 3, 3)
