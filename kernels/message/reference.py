"""Message passing in pure torch: the float64-safe definition of "correct" for every op of
kernels/message (README.md beside this file). Materialises [E, F] tensors; meant for tests and
small systems.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastff.kernels.message import dense
from fastff.kernels.neighbors.reference import pair_vectors as _pair_vectors
from fastff.kernels.neighbors.reference import pair_vectors_transpose as _pair_vectors_transpose
from fastff.kernels.radial.reference import radial_basis as _basis


def gms(h: Tensor, w: Tensor, i: Tensor, j: Tensor, ptr: Tensor, rev: Tensor) -> Tensor:
    """out[a] = sum_{e in row a} h[j_e] * w_e, [N, F]."""
    out = h.new_zeros(ptr.shape[0] - 1, h.shape[1])
    return out.index_add_(0, i, h.index_select(0, j) * w)


def ggm(a: Tensor, b: Tensor, i: Tensor, j: Tensor, ptr: Tensor, rev: Tensor) -> Tensor:
    """out[e] = a[i_e] * b[j_e], [E, F]."""
    return a.index_select(0, i) * b.index_select(0, j)


def mirror_pairs(i: Tensor, j: Tensor, rev: Tensor) -> Tensor:
    """The unordered pairs of a full list as rows (c, m, a, b), int64 [4, P]
    (``dense.mirror_pairs``; every backend uses this one)."""
    return dense.mirror_pairs(i, j, rev)


def filter_matrix(d: Tensor, w1, b1, w2, b2, settings: dense.FilterSettings) -> Tensor:
    """W(d) [E, F]: SchNet's filter network times the envelope."""
    basis = _basis(d, w1.shape[1], settings.cutoff, settings.kind, "none", 0)
    (env,) = dense.envelope(d, settings.cutoff, settings.envelope, 0)
    return dense.filter_values(basis, env, w1, b1, w2, b2, settings.activation)


def mirror_mean(w: Tensor, rev: Tensor) -> Tensor:
    """(w_e + w_rev(e)) / 2: the filter a pair shares between its two edges."""
    return 0.5 * (w + w.index_select(0, rev))


def cfconv(x, d, i, j, ptr, rev, pairs, w1, b1, w2, b2, cutoff, kind, envelope, activation,
           keep_filters, keep_budget):
    """(out, filters): out = gms(x, mirror mean of W); filters the pair filters [P, F] (rows
    ``pairs[0]`` of the mirror mean) when kept (as the other backends decide), else [0, F]."""
    settings = dense.FilterSettings(cutoff, kind, envelope, activation)
    w = mirror_mean(filter_matrix(d, w1, b1, w2, b2, settings), rev)
    out = gms(x, w, i, j, ptr, rev)
    if keep_filters and dense.keeps(pairs.shape[1], x.shape[1], x, keep_budget):
        return out, w.index_select(0, dense.MirrorPairs(pairs).c)
    return out, x.new_empty(0, x.shape[1])


def cfconv_vjp(g, x, d, i, j, ptr, rev, pairs, filters, w1, b1, w2, b2, cutoff, kind, envelope,
               activation, need_params, need_x, need_d, keep_budget):
    """The gradients, edge by edge (``filters`` are not read: recomputed); products t = u w2 of
    each pair when kept (as the other backends decide), else [0, F]."""
    # sum_e <u_e, (W(d_e) + W(d_rev e)) / 2> = sum_e <(u_e + u_rev(e)) / 2, W(d_e)>
    settings = dense.FilterSettings(cutoff, kind, envelope, activation)
    num_basis = w1.shape[1]
    basis = _basis(d, num_basis, cutoff, kind, "none", 0)
    slope = _basis(d, num_basis, cutoff, kind, "none", 1)
    env, env_slope = dense.envelope(d, cutoff, envelope, 1)
    u = mirror_mean(ggm(g, x, i, j, ptr, rev), rev)
    out = dense.filter_vjp(u, basis, slope, env, env_slope, w1, b1, w2, b2, activation,
                           need_params)[:5]
    # the shared filter is symmetric, so the sender-side sum is the op itself on g
    grad_x = cfconv(g, d, i, j, ptr, rev, pairs, w1, b1, w2, b2, *settings, False,
                    0)[0] if need_x else None
    grad_d = out[0] if need_d else None
    products = g.new_empty(0, g.shape[1])
    if dense.keeps(pairs.shape[1], g.shape[1], g, keep_budget):  # u_p = 2 u_c of the pair
        products = 2 * u.index_select(0, dense.MirrorPairs(pairs).c) @ w2
    return dense.params_or_empty((grad_x, grad_d, *out[1:], products), d)


def cfconv_vjp_vjp(v, g, x, d, i, j, ptr, rev, pairs, products, w1, b1, w2, b2, cutoff, kind,
                   envelope, activation, need_g, need_x, need_params, need_d):
    """Gradients of sum_e v_e grad_d_e, grad_d = cfconv_vjp(...)[1] = s(u_e, d_e) with
    u_e = (g[i] x[j] + g[j] x[i]) / 2: one filter per edge (``products`` are not read)."""
    settings = dense.FilterSettings(cutoff, kind, envelope, activation)
    u = 0.5 * (ggm(g, x, i, j, ptr, rev) + ggm(x, g, i, j, ptr, rev))
    slope, w, *gp = dense.filter_vjp_vjp(u, v, d, (w1, b1, w2, b2), settings, activation,
                                         need_params, dense.each_order(_basis))
    # d<w, u>/d(one factor): both ends of every edge, halved, is gms over the mirror mean of w
    w = mirror_mean(w, rev)
    out = (gms(x, w, i, j, ptr, rev) if need_g else None,
           gms(g, w, i, j, ptr, rev) if need_x else None, v * slope if need_d else None, *gp)
    return dense.params_or_empty(out, d)


def spline_weights(d: Tensor, num_intervals: int, cutoff: float, order: int):
    """(interval k [E], weights p [E, 4]) with W^(order)(d) = sum_q p_q coeffs[k, q]."""
    h = cutoff / num_intervals
    s = d / h
    k = torch.clamp(s.floor(), 0, num_intervals - 1)
    t = s - k
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    rows = {0: (one, t, t * t, t * t * t), 1: (zero, one, 2 * t, 3 * t * t),
            2: (zero, zero, 2 * one, 6 * t), 3: (zero, zero, zero, 6 * one)}
    p = torch.stack(rows.get(order, (zero,) * 4), 1) / h**order
    p = torch.where((d < cutoff).unsqueeze(1), p, torch.zeros_like(p))
    return k.long(), p


def spline_matrix(d: Tensor, coeffs: Tensor, cutoff: float, order: int) -> Tensor:
    """W^(order)(d) [E, F] from a cubic table coeffs [P-1, 4, F]."""
    k, p = spline_weights(d, coeffs.shape[0], cutoff, order)
    return torch.einsum("eq,eqf->ef", p, coeffs[k])


def spline_conv(x, d, scale, coeffs, i, j, ptr, rev, cutoff, order):
    w = spline_matrix(d, coeffs, cutoff, order)
    if scale is not None:
        w = w * scale.unsqueeze(1)
    return gms(x, w, i, j, ptr, rev)


def spline_edge_dot(g, x, d, coeffs, i, j, ptr, rev, cutoff, order):
    return (ggm(g, x, i, j, ptr, rev) * spline_matrix(d, coeffs, cutoff, order)).sum(1)


def spline_conv_vjp(grad, x, d, d_rev, coeffs, i, j, ptr, rev, cutoff, order):
    """(grad_x, grad_d) of spline_conv without scale: the two unfused expressions."""
    return (spline_conv(grad, d_rev, None, coeffs, i, j, ptr, rev, cutoff, order),
            spline_edge_dot(grad, x, d, coeffs, i, j, ptr, rev, cutoff, order + 1))


def spline_conv_positions(x, positions, cells, atom_system, i, j, shifts, ptr, coeffs, cutoff):
    """spline_conv of the distances |r_ij| computed from positions."""
    vectors = _pair_vectors(positions, cells, atom_system, i, j, shifts)
    d = torch.linalg.vector_norm(vectors, dim=1)
    # a sum over receiver rows (gms): the mirror index is not needed
    return x.new_zeros(ptr.shape[0] - 1, x.shape[1]).index_add_(
        0, i, x.index_select(0, j) * spline_matrix(d, coeffs, cutoff, 0))


def spline_conv_positions_vjp(grad, x, positions, cells, atom_system, i, j, shifts, ptr, coeffs,
                              cutoff, need_x, need_cell):
    """(grad_x or [0], grad_positions, grad_cells or [0]): the chain rule through the
    distances, written out (custom ops run below autograd)."""
    vectors = _pair_vectors(positions, cells, atom_system, i, j, shifts)
    d = torch.linalg.vector_norm(vectors, dim=1)
    slope = (grad.index_select(0, i) * x.index_select(0, j)
             * spline_matrix(d, coeffs, cutoff, 1)).sum(1)  # dL/dd_e
    unit = torch.where((d > 0).unsqueeze(1), vectors / d.unsqueeze(1), torch.zeros_like(vectors))
    grad_pos, grad_cells = _pair_vectors_transpose(slope.unsqueeze(1) * unit,
                                                   positions.shape[0], cells, atom_system, i, j,
                                                   shifts)
    grad_x = None
    if need_x:  # sender side: sum over the edges that read x[b]
        w = spline_matrix(d, coeffs, cutoff, 0)
        grad_x = x.new_zeros(x.shape).index_add_(0, j, grad.index_select(0, i) * w)
    return dense.params_or_empty((grad_x, grad_pos, grad_cells if need_cell else None),
                                 positions)


def painn_filter_matrix(d: Tensor, wf: Tensor, bf: Tensor, cutoff: float, kind: str,
                        envelope: str) -> Tensor:
    """PaiNN's filter W(d) = u(d) (wf b(d) + bf), [E, 3F]."""
    (env,) = dense.envelope(d, cutoff, envelope, 0)
    return dense.painn_filter(_basis(d, wf.shape[1], cutoff, kind, "none", 0), env, wf, bf)


def painn_message(phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope):
    """(ds [N, F], dv [N, 3, F]): ds_a = sum_e (phi_j W_e)_s,
    dv_a = sum_e (phi_j W_e)_vs unit_e + (phi_j W_e)_vv v_j."""
    nf, n = v.shape[2], ptr.shape[0] - 1
    x = phi.index_select(0, j) * painn_filter_matrix(d, wf, bf, cutoff, kind, envelope)
    ds = phi.new_zeros(n, nf).index_add_(0, i, x[:, :nf])
    msg = (x[:, nf:2 * nf].unsqueeze(1) * unit.unsqueeze(2)
           + x[:, 2 * nf:].unsqueeze(1) * v.index_select(0, j))
    return ds, v.new_zeros(n, 3, nf).index_add_(0, i, msg)


def painn_message_vjp(gs, gv, phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope,
                      need_params):
    """Gradients (phi, v, d, unit, wf, bf) of <gs, ds> + <gv, dv>, edge by edge (sender sums by
    index_add over j; ``rev`` is not used)."""
    nf, num_basis = v.shape[2], wf.shape[1]
    basis = _basis(d, num_basis, cutoff, kind, "none", 0)
    slope = _basis(d, num_basis, cutoff, kind, "none", 1)
    env, env_slope = dense.envelope(d, cutoff, envelope, 1)
    y = torch.addmm(bf, basis, wf.t())  # W = env * y
    w = y * env.unsqueeze(1)
    p, vj = phi.index_select(0, j), v.index_select(0, j)
    gvi = gv.index_select(0, i)
    x_vs, x_vv = p[:, nf:2 * nf] * w[:, nf:2 * nf], p[:, 2 * nf:] * w[:, 2 * nf:]
    gx = torch.cat([gs.index_select(0, i), (gvi * unit.unsqueeze(2)).sum(1), (gvi * vj).sum(1)],
                   1)  # d<g, message>/d(phi_j W) per edge, [E, 3F]
    grad_phi = torch.zeros_like(phi).index_add_(0, j, gx * w)
    grad_v = torch.zeros_like(v).index_add_(0, j, gvi * x_vv.unsqueeze(1))
    grad_unit = (gvi * x_vs.unsqueeze(1)).sum(2)
    gw = gx * p
    grad_d = env_slope * (gw * y).sum(1) + env * (gw * (slope @ wf.t())).sum(1)
    grads = (grad_phi, grad_v, grad_d, grad_unit)
    if not need_params:
        return dense.params_or_empty((*grads, None, None), d)
    ge = gw * env.unsqueeze(1)
    return (*grads, ge.t() @ basis, ge.sum(0))
