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
        return tf.softplus(h) - LOG2
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
               w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, act: str, need_params: bool):
    """Gradients of sum_e <u_e, W(d_e)> for u [b, F].

    Returns (grad_d [b], grad_w1 [F, K], grad_b1 [F], grad_w2 [F, F], grad_b2 [F]); the four
    parameter gradients are None unless ``need_params``.
    """
    h = torch.addmm(b1, basis, w1.t())
    a = activation(h, act)
    t = u @ w2  # d<u, a w2^T>/da
    uy = (t * a).sum(1) + u @ b2
    g = t * activation_slope(h, act) * env.unsqueeze(1)  # dL/dh
    grad_d = env_slope * uy + ((g @ w1) * basis_slope).sum(1)
    if not need_params:
        return grad_d, None, None, None, None
    eu = u * env.unsqueeze(1)
    return grad_d, g.t() @ basis, g.sum(0), eu.t() @ a, eu.sum(0)


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


def blocked_vjp(g: Tensor, x: Tensor, d: Tensor, i: Tensor, j: Tensor, params, cutoff: float,
                kind: str, env_kind: str, act: str, need_params: bool, basis_fn, product_fn,
                block: int):
    """Gradients of sum_a <g_a, out_a> in d and the filter parameters, a block at a time.

    ``product_fn(g, x, e0, e1)`` returns g[i_e] * x[j_e] for the block. Parameter gradients are
    summed over blocks in a fixed order: deterministic.
    """
    w1, b1, w2, b2 = params
    num_basis = w1.shape[1]
    grad_d = d.new_zeros(d.shape[0])
    sums = [torch.zeros_like(p) for p in params] if need_params else None
    for e0 in range(0, d.shape[0], block):
        e1 = min(e0 + block, d.shape[0])
        db = d[e0:e1]
        basis = basis_fn(db, num_basis, cutoff, kind, "none", 0)
        slope = basis_fn(db, num_basis, cutoff, kind, "none", 1)
        env, env_slope = envelope(db, cutoff, env_kind, 1)
        u = product_fn(g, x, e0, e1)
        gd, *gp = filter_vjp(u, basis, slope, env, env_slope, w1, b1, w2, b2, act, need_params)
        grad_d[e0:e1] = gd
        if sums is not None:
            for s, p in zip(sums, gp, strict=True):
                s += p
    if sums is None:
        return (grad_d, *(d.new_empty(0) for _ in range(4)))
    return (grad_d, *sums)
