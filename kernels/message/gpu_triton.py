"""Message passing on CUDA with Triton: receiver-row segment sums, edge products, spline tables.

Algorithms (as cpu_numba.py, so both backends give the same sums in the same order):
* ``_gms_rows_kernel``: one program per (receiver row, block of features) walks the row's edges
  and accumulates in registers; each output row has one writer, so no atomics are needed and the
  result is deterministic (at the price of load imbalance for very uneven rows, which MLFF
  graphs at liquid density do not have).
* ``_ggm_kernel``: one program per block of edges x features.
* ``cfconv`` / ``cfconv_vjp``: the filter network fused into row and edge-block kernels
  (gpu_triton_filter.py: basis, both layers with tl.dot, activation and message in registers).
* ``_pair_product_kernel`` / ``_pair_scatter_kernel``: the pair kernels of cfconv's second
  backward (force training, ``dense.blocked_vjp_vjp``), one program per block of pairs x
  features; the scatter writes both ends of a pair with relaxed atomic adds, so its sums are
  not bitwise reproducible.
* ``_spline_conv_kernel`` / ``_spline_edge_dot_kernel``: the cubic table evaluated inside the
  edge loop. ``_spline_conv_vjp_kernel``: spline_conv's backward, both halves in one walk of a
  row (one program per row and block of features; the table interval is read once when the
  mirrored distance equals the distance, and each block's partial dot products go to their own
  row of a [blocks, E] buffer, summed afterwards: still one writer per value, no atomics).
* ``_spline_conv_positions_kernel`` / ``_spline_conv_positions_vjp_kernel``: the same with each
  distance computed from positions in the kernel; the backward's position and cell gradients of
  each feature block go to their own row of a [blocks, N, 3 | 9] buffer, summed afterwards.
* ``painn_message`` / ``painn_message_vjp``: PaiNN's message and its backward with the filter
  fused in (gpu_triton_painn.py), one program per (row, block of features); the per-edge
  d/d unit and d/d distance of each feature block go to their own rows of [blocks, E, .]
  buffers, summed afterwards.
The filter network of ``cfconv_vjp_vjp`` runs as cuBLAS GEMMs on blocks of pairs
(kernels/message/dense.py). Sizes, cutoffs and counts are run-time arguments;
only block sizes are constexpr. Block sizes: 64 features (F = 64..256 in one to four programs
per row) for the row kernels, 32 x 32 for the 2-D ones, chosen to keep register use low
(``python -m fastff.aot`` reports it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastff.kernels.message import dense
from fastff.kernels.message import gpu_triton_filter as _fused
from fastff.kernels.message import gpu_triton_painn as _painn
from fastff.kernels.radial.gpu_triton import radial_basis as _radial_basis

_radial = dense.each_order(_radial_basis)  # orders 0..n for the blocked functions

BLOCK_F = 64
# 32 edges x 32 features for the 2-D kernels: 64 x 64 spilled ~2 KB per thread in
# _spline_edge_dot_kernel and needed 168 registers in _ggm_kernel (ptxas, sm_80 / sm_90).
BLOCK_E = 32
BLOCK_F2 = 32
# Pairs per block of cfconv_vjp_vjp's filter GEMMs (GPU memory is not the limit here, launch
# count is).
BLOCK = 65536
# Warps of the _spline_conv* backward kernels: 64 threads for their 64
# features. With the default 4, half the lanes hold copies (_spline_conv_vjp_kernel: same 40
# registers, same 8 B of shared memory for the per-edge dot: ptxas, sm_80 / sm_90); not timed
# on a GPU yet.
VJP_WARPS = 2


@triton.jit
def _row_edges(ptr_ptr, a, e0, e1):
    """The edges of receiver row a inside the block [e0, e1)."""
    return tl.maximum(tl.load(ptr_ptr + a), e0), tl.minimum(tl.load(ptr_ptr + a + 1), e1)


@triton.jit
def _gms_rows_kernel(out_ptr, h_ptr, w_ptr, j_ptr, ptr_ptr, e0, e1, a0, n_h, nf,
                     BLOCK_F: tl.constexpr):
    a = a0 + tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs < nf
    lo, hi = _row_edges(ptr_ptr, a, e0, e1)
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32).to(out_ptr.dtype.element_ty)
    for e in range(lo, hi):
        src = tl.load(j_ptr + e)
        ok = (src >= 0) & (src < n_h)
        src = tl.where(ok, src, 0)
        hv = tl.load(h_ptr + src * nf + offs, mask=fmask & ok, other=0.0)
        wv = tl.load(w_ptr + (e - e0) * nf + offs, mask=fmask, other=0.0)
        acc += hv * wv
    row = out_ptr + a * nf + offs
    tl.store(row, tl.load(row, mask=fmask, other=0.0) + acc, mask=fmask)


@triton.jit
def _ggm_kernel(out_ptr, a_ptr, b_ptr, i_ptr, j_ptr, e0, num, n_a, n_b, nf,
                BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    emask = k < num
    ia = tl.load(i_ptr + e0 + k, mask=emask, other=0)
    jb = tl.load(j_ptr + e0 + k, mask=emask, other=0)
    ok = emask & (ia >= 0) & (ia < n_a) & (jb >= 0) & (jb < n_b)
    ia = tl.where(ok, ia, 0)
    jb = tl.where(ok, jb, 0)
    m = ok[:, None] & (offs[None, :] < nf)
    av = tl.load(a_ptr + ia[:, None] * nf + offs[None, :], mask=m, other=0.0)
    bv = tl.load(b_ptr + jb[:, None] * nf + offs[None, :], mask=m, other=0.0)
    tl.store(out_ptr + k[:, None] * nf + offs[None, :], av * bv,
             mask=emask[:, None] & (offs[None, :] < nf))


@triton.jit
def _pair_ends(a_ptr, b_ptr, p0, num, n, BLOCK_E: tl.constexpr):
    """Ends (a, b) of the pairs p0 + k, k < BLOCK_E, with the mask of those in range."""
    k = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    pmask = k < num
    pa = tl.load(a_ptr + p0 + k, mask=pmask, other=0)
    pb = tl.load(b_ptr + p0 + k, mask=pmask, other=0)
    ok = pmask & (pa >= 0) & (pa < n) & (pb >= 0) & (pb < n)
    return k, pmask, tl.where(ok, pa, 0), tl.where(ok, pb, 0), ok


@triton.jit
def _pair_product_kernel(out_ptr, g_ptr, x_ptr, a_ptr, b_ptr, p0, num, n, nf,
                         BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    """out[k] = g[a] * x[b] + g[b] * x[a] for the pairs p0 + k (0 for out-of-range ends)."""
    k, pmask, pa, pb, ok = _pair_ends(a_ptr, b_ptr, p0, num, n, BLOCK_E)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = offs[None, :] < nf
    m = ok[:, None] & fm
    ga = tl.load(g_ptr + pa[:, None] * nf + offs[None, :], mask=m, other=0.0)
    gb = tl.load(g_ptr + pb[:, None] * nf + offs[None, :], mask=m, other=0.0)
    xa = tl.load(x_ptr + pa[:, None] * nf + offs[None, :], mask=m, other=0.0)
    xb = tl.load(x_ptr + pb[:, None] * nf + offs[None, :], mask=m, other=0.0)
    tl.store(out_ptr + k[:, None] * nf + offs[None, :], ga * xb + gb * xa,
             mask=pmask[:, None] & fm)


@triton.jit
def _pair_scatter_kernel(out_ptr, h_ptr, w_ptr, a_ptr, b_ptr, p0, num, n, nf,
                         BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    """out[a] += h[b] * w_k and out[b] += h[a] * w_k for the pairs p0 + k. Both ends of a pair
    are written, so rows have many writers: atomic adds (the sums' order, and so their last
    bits, vary from run to run on a GPU)."""
    k, pmask, pa, pb, ok = _pair_ends(a_ptr, b_ptr, p0, num, n, BLOCK_E)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    m = ok[:, None] & (offs[None, :] < nf)
    w = tl.load(w_ptr + k[:, None] * nf + offs[None, :], mask=m, other=0.0)
    ha = tl.load(h_ptr + pa[:, None] * nf + offs[None, :], mask=m, other=0.0)
    hb = tl.load(h_ptr + pb[:, None] * nf + offs[None, :], mask=m, other=0.0)
    tl.atomic_add(out_ptr + pa[:, None] * nf + offs[None, :], hb * w, mask=m, sem="relaxed")
    tl.atomic_add(out_ptr + pb[:, None] * nf + offs[None, :], ha * w, mask=m, sem="relaxed")


@triton.jit
def _spline_weights(r, cutoff, nint, order):
    inv_h = nint / cutoff
    s = r * inv_h
    k = tl.minimum(tl.maximum(s.to(tl.int32), 0), nint - 1).to(tl.int64)  # rows of 4 * nf
    t = s - k
    one = t * 0.0 + 1.0
    zero = t * 0.0
    p0 = tl.where(order == 0, one, zero)
    p1 = tl.where(order == 0, t, tl.where(order == 1, inv_h * one, zero))
    p2 = tl.where(order == 0, t * t, tl.where(order == 1, 2.0 * t * inv_h,
                  tl.where(order == 2, 2.0 * inv_h * inv_h * one, zero)))
    p3 = tl.where(order == 0, t * t * t, tl.where(order == 1, 3.0 * t * t * inv_h,
                  tl.where(order == 2, 6.0 * t * inv_h * inv_h,
                           tl.where(order == 3, 6.0 * inv_h * inv_h * inv_h * one, zero))))
    inside = r < cutoff
    return (k, tl.where(inside, p0, 0.0), tl.where(inside, p1, 0.0), tl.where(inside, p2, 0.0),
            tl.where(inside, p3, 0.0))


@triton.jit
def _spline_conv_kernel(out_ptr, x_ptr, d_ptr, scale_ptr, coeffs_ptr, j_ptr, ptr_ptr, cutoff_ptr,
                        has_scale, n_x, nf, nint, order, BLOCK_F: tl.constexpr):
    nf = nf.to(tl.int64)  # row strides: 3 * nf * rows passes 2^31
    a = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs < nf
    cutoff = tl.load(cutoff_ptr)
    lo = tl.load(ptr_ptr + a)
    hi = tl.load(ptr_ptr + a + 1)
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32).to(out_ptr.dtype.element_ty)
    for e in range(lo, hi):
        r = tl.load(d_ptr + e)
        src = tl.load(j_ptr + e)
        ok = (src >= 0) & (src < n_x)
        src = tl.where(ok, src, 0)
        k, p0, p1, p2, p3 = _spline_weights(r, cutoff, nint, order)
        sc = tl.load(scale_ptr + e * has_scale)
        sc = tl.where(has_scale != 0, sc, 1.0)
        base = coeffs_ptr + k * 4 * nf + offs
        w = (p0 * tl.load(base, mask=fmask, other=0.0)
             + p1 * tl.load(base + nf, mask=fmask, other=0.0)
             + p2 * tl.load(base + 2 * nf, mask=fmask, other=0.0)
             + p3 * tl.load(base + 3 * nf, mask=fmask, other=0.0))
        xv = tl.load(x_ptr + src * nf + offs, mask=fmask & ok, other=0.0)
        acc += xv * w * sc
    tl.store(out_ptr + a * nf + offs, acc, mask=fmask)


@triton.jit
def _spline_edge_dot_kernel(out_ptr, g_ptr, x_ptr, d_ptr, coeffs_ptr, i_ptr, j_ptr, cutoff_ptr,
                            num_edges, n_g, n_x, nf, nint, order,
                            BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < num_edges
    cutoff = tl.load(cutoff_ptr)
    r = tl.load(d_ptr + e, mask=emask, other=0.0)
    dst = tl.load(i_ptr + e, mask=emask, other=0)
    src = tl.load(j_ptr + e, mask=emask, other=0)
    ok = emask & (dst >= 0) & (dst < n_g) & (src >= 0) & (src < n_x)
    dst = tl.where(ok, dst, 0)
    src = tl.where(ok, src, 0)
    k, p0, p1, p2, p3 = _spline_weights(r, cutoff, nint, order)
    nf64 = nf.to(tl.int64)
    crow = coeffs_ptr + k * 4 * nf64
    grow = g_ptr + dst * nf64
    xrow = x_ptr + src * nf64
    acc = r * 0.0
    # half-width feature blocks, each product summed as soon as it is loaded: a 32 x 32 tile
    # of six gathered loads needed 168 registers (254 in float64); this stays below 128
    for f0 in range(0, nf, BLOCK_F // 2):
        offs = f0 + tl.arange(0, BLOCK_F // 2)
        m = ok[:, None] & (offs[None, :] < nf)
        c = crow[:, None] + offs[None, :]
        w = p0[:, None] * tl.load(c, mask=m, other=0.0)
        w += p1[:, None] * tl.load(c + nf64, mask=m, other=0.0)
        w += p2[:, None] * tl.load(c + 2 * nf64, mask=m, other=0.0)
        w += p3[:, None] * tl.load(c + 3 * nf64, mask=m, other=0.0)
        gx = (tl.load(grow[:, None] + offs[None, :], mask=m, other=0.0)
              * tl.load(xrow[:, None] + offs[None, :], mask=m, other=0.0))
        acc += tl.sum(gx * w, axis=1)
    tl.store(out_ptr + e, acc, mask=emask)


@triton.jit
def _interval_rows(coeffs_ptr, k, nf, offs, fmask):
    """The four coefficient rows of table interval k (one block of features)."""
    nf64 = nf.to(tl.int64)
    base = coeffs_ptr + k * 4 * nf64 + offs
    return (tl.load(base, mask=fmask, other=0.0), tl.load(base + nf64, mask=fmask, other=0.0),
            tl.load(base + 2 * nf64, mask=fmask, other=0.0),
            tl.load(base + 3 * nf64, mask=fmask, other=0.0))


@triton.jit
def _spline_conv_vjp_kernel(gx_ptr, gd_part_ptr, g_ptr, x_ptr, d_ptr, d_rev_ptr, coeffs_ptr,
                            j_ptr, ptr_ptr, cutoff_ptr, num_edges, n_g, n_x, nf, nint, order,
                            BLOCK_F: tl.constexpr):
    a = tl.program_id(0).to(tl.int64)
    fb = tl.program_id(1).to(tl.int64)
    offs = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs < nf
    cutoff = tl.load(cutoff_ptr)
    lo = tl.load(ptr_ptr + a)
    hi = tl.load(ptr_ptr + a + 1)
    row_ok = a < n_g
    ga = tl.load(g_ptr + a * nf + offs, mask=fmask & row_ok, other=0.0)
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32).to(gx_ptr.dtype.element_ty)
    for e in range(lo, hi):
        r = tl.load(d_ptr + e)
        r_rev = tl.load(d_rev_ptr + e)
        src = tl.load(j_ptr + e)
        conv_ok = (src >= 0) & (src < n_g)
        dot_ok = (src >= 0) & (src < n_x) & row_ok
        k, p0, p1, p2, p3 = _spline_weights(r_rev, cutoff, nint, order)
        k2, q0, q1, q2, q3 = _spline_weights(r, cutoff, nint, order + 1)
        c0, c1, c2, c3 = _interval_rows(coeffs_ptr, k, nf, offs, fmask)
        # a second interval only for a pair whose mirror has another distance (masked off,
        # the load reads nothing); tl.where, not `fmask & (r_rev != r)`: the interpreter
        # cannot `&` a block with a scalar float comparison
        same = r_rev == r
        b0, b1, b2, b3 = _interval_rows(coeffs_ptr, k2, nf, offs, tl.where(same, False, fmask))
        b0 = tl.where(same, c0, b0)
        b1 = tl.where(same, c1, b1)
        b2 = tl.where(same, c2, b2)
        b3 = tl.where(same, c3, b3)
        gs = tl.load(g_ptr + tl.where(conv_ok, src, 0) * nf + offs, mask=fmask & conv_ok,
                     other=0.0)
        xs = tl.load(x_ptr + tl.where(dot_ok, src, 0) * nf + offs, mask=fmask & dot_ok,
                     other=0.0)
        acc += gs * (p0 * c0 + p1 * c1 + p2 * c2 + p3 * c3)
        dot = tl.sum(ga * xs * (q0 * b0 + q1 * b1 + q2 * b2 + q3 * b3), axis=0)
        tl.store(gd_part_ptr + fb * num_edges + e, dot)
    tl.store(gx_ptr + a * nf + offs, acc, mask=fmask)


@triton.jit
def _sender(j_ptr, e, n, fmask):
    """The sender of edge e (0 when out of range, read nothing) and its loads' feature mask."""
    src = tl.load(j_ptr + e)
    ok = (src >= 0) & (src < n)
    return tl.where(ok, src, 0), fmask & ok


_F = {"BLOCK_F": BLOCK_F}
_EF = {"BLOCK_E": BLOCK_E, "BLOCK_F": BLOCK_F2}
@triton.jit
def _pair_geometry(pos_ptr, cells_ptr, system_ptr, batched, a, b, shifts_ptr, e):
    """r_ab = (x_b - x_a) + S @ cell and |r_ab|: the mirror pair computes exactly the negated
    vector (every step is sign-symmetric, fused or not) and so the same distance."""
    s = tl.load(system_ptr + a * batched)
    cb = cells_ptr + s * 9
    ty = pos_ptr.dtype.element_ty
    sh0 = tl.load(shifts_ptr + e * 3).to(ty)
    sh1 = tl.load(shifts_ptr + e * 3 + 1).to(ty)
    sh2 = tl.load(shifts_ptr + e * 3 + 2).to(ty)
    v0 = (tl.load(pos_ptr + b * 3) - tl.load(pos_ptr + a * 3)) + (
        (sh0 * tl.load(cb) + sh1 * tl.load(cb + 3)) + sh2 * tl.load(cb + 6))
    v1 = (tl.load(pos_ptr + b * 3 + 1) - tl.load(pos_ptr + a * 3 + 1)) + (
        (sh0 * tl.load(cb + 1) + sh1 * tl.load(cb + 4)) + sh2 * tl.load(cb + 7))
    v2 = (tl.load(pos_ptr + b * 3 + 2) - tl.load(pos_ptr + a * 3 + 2)) + (
        (sh0 * tl.load(cb + 2) + sh1 * tl.load(cb + 5)) + sh2 * tl.load(cb + 8))
    return v0, v1, v2, tl.sqrt((v0 * v0 + v1 * v1) + v2 * v2)


@triton.jit
def _spline_conv_positions_kernel(out_ptr, x_ptr, pos_ptr, cells_ptr, system_ptr, coeffs_ptr,
                                  j_ptr, shifts_ptr, ptr_ptr, cutoff_ptr, batched, n, nf, nint,
                                  BLOCK_F: tl.constexpr):
    a = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs < nf
    cutoff = tl.load(cutoff_ptr)
    lo, hi = _row_edges(ptr_ptr, a, 0, tl.load(ptr_ptr + a + 1))
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32).to(out_ptr.dtype.element_ty)
    for e in range(lo, hi):
        b, m = _sender(j_ptr, e, n, fmask)
        _, _, _, r = _pair_geometry(pos_ptr, cells_ptr, system_ptr, batched, a, b, shifts_ptr, e)
        k, p0, p1, p2, p3 = _spline_weights(r, cutoff, nint, 0)
        c0, c1, c2, c3 = _interval_rows(coeffs_ptr, k, nf, offs, fmask)
        xv = tl.load(x_ptr + b * nf + offs, mask=m, other=0.0)
        acc += xv * (p0 * c0 + p1 * c1 + p2 * c2 + p3 * c3)
    tl.store(out_ptr + a * nf + offs, acc, mask=fmask)


@triton.jit
def _spline_conv_positions_vjp_kernel(gx_ptr, gpos_part_ptr, cell_part_ptr, g_ptr, x_ptr, pos_ptr,
                                      cells_ptr, system_ptr, coeffs_ptr, j_ptr, shifts_ptr,
                                      ptr_ptr, cutoff_ptr, batched, need_x, need_cell, n, rows,
                                      nf, nint, BLOCK_F: tl.constexpr):
    """Row a, one block of features: grad_x[a] (need_x) and this block's share of
    grad_pos[a] and of the row's cell gradient, each in its own row of a [blocks, N, .] buffer."""
    a = tl.program_id(0).to(tl.int64)
    fb = tl.program_id(1).to(tl.int64)
    offs = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs < nf
    cutoff = tl.load(cutoff_ptr)
    lo, hi = _row_edges(ptr_ptr, a, 0, tl.load(ptr_ptr + a + 1))
    ga = tl.load(g_ptr + a * nf + offs, mask=fmask, other=0.0)
    xa = tl.load(x_ptr + a * nf + offs, mask=fmask, other=0.0)
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32).to(gx_ptr.dtype.element_ty)
    zero = cutoff * 0.0
    f0, f1, f2 = zero, zero, zero
    c00, c01, c02, c10, c11, c12, c20, c21, c22 = (zero, zero, zero, zero, zero, zero, zero,
                                                   zero, zero)
    for e in range(lo, hi):
        b, m = _sender(j_ptr, e, n, fmask)
        v0, v1, v2, r = _pair_geometry(pos_ptr, cells_ptr, system_ptr, batched, a, b,
                                       shifts_ptr, e)
        k, p0, p1, p2, p3 = _spline_weights(r, cutoff, nint, 0)
        _, q0, q1, q2, q3 = _spline_weights(r, cutoff, nint, 1)
        c0, c1, c2, c3 = _interval_rows(coeffs_ptr, k, nf, offs, fmask)
        xb = tl.load(x_ptr + b * nf + offs, mask=m, other=0.0)
        gb = tl.load(g_ptr + b * nf + offs, mask=m, other=0.0)
        acc += gb * (p0 * c0 + p1 * c1 + p2 * c2 + p3 * c3)
        # t_e + t'_e: this pair's slope seen from both ends (README.md)
        dot = tl.sum((ga * xb + gb * xa) * (q1 * c1 + q2 * c2 + q3 * c3), axis=0)
        w = tl.where(r > 0.0, dot / tl.where(r > 0.0, r, 1.0), 0.0)
        f0 -= w * v0
        f1 -= w * v1
        f2 -= w * v2
        h = 0.5 * w
        sh0 = tl.load(shifts_ptr + e * 3).to(zero.dtype) * h
        sh1 = tl.load(shifts_ptr + e * 3 + 1).to(zero.dtype) * h
        sh2 = tl.load(shifts_ptr + e * 3 + 2).to(zero.dtype) * h
        c00 += sh0 * v0
        c01 += sh0 * v1
        c02 += sh0 * v2
        c10 += sh1 * v0
        c11 += sh1 * v1
        c12 += sh1 * v2
        c20 += sh2 * v0
        c21 += sh2 * v1
        c22 += sh2 * v2
    tl.store(gx_ptr + a * nf + offs, acc, mask=fmask & (need_x != 0))
    part = gpos_part_ptr + (fb * rows + a) * 3
    tl.store(part, f0)
    tl.store(part + 1, f1)
    tl.store(part + 2, f2)
    if need_cell != 0:
        cp = cell_part_ptr + (fb * rows + a) * 9
        tl.store(cp, c00)
        tl.store(cp + 1, c01)
        tl.store(cp + 2, c02)
        tl.store(cp + 3, c10)
        tl.store(cp + 4, c11)
        tl.store(cp + 5, c12)
        tl.store(cp + 6, c20)
        tl.store(cp + 7, c21)
        tl.store(cp + 8, c22)


def _pair_kernel_spec(kernel, inputs: tuple[str, str]) -> dict:
    """The AOT spec of a pair kernel: (out, two float inputs, ends a and b, p0, num, n, nf)."""
    return {"kernel": kernel,
            "signature": {"out_ptr": "*fp32", **dict.fromkeys(inputs, "*fp32"), "a_ptr": "*i64",
                          "b_ptr": "*i64", "p0": "i64", "num": "i32", "n": "i64", "nf": "i32",
                          "BLOCK_E": "constexpr", "BLOCK_F": "constexpr"},
            "constexprs": _EF}


AOT_SPECS = [
    {"kernel": _gms_rows_kernel,
     "signature": {"out_ptr": "*fp32", "h_ptr": "*fp32", "w_ptr": "*fp32", "j_ptr": "*i64",
                   "ptr_ptr": "*i64", "e0": "i64", "e1": "i64", "a0": "i64", "n_h": "i64",
                   "nf": "i32", "BLOCK_F": "constexpr"},
     "constexprs": _F},
    {"kernel": _ggm_kernel,
     "signature": {"out_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", "i_ptr": "*i64",
                   "j_ptr": "*i64", "e0": "i64", "num": "i32", "n_a": "i64", "n_b": "i64",
                   "nf": "i32", "BLOCK_E": "constexpr", "BLOCK_F": "constexpr"},
     "constexprs": _EF},
    *(_pair_kernel_spec(kernel, inputs) for kernel, inputs in (
        (_pair_product_kernel, ("g_ptr", "x_ptr")), (_pair_scatter_kernel, ("h_ptr", "w_ptr")))),
    {"kernel": _spline_conv_kernel,
     "signature": {"out_ptr": "*fp32", "x_ptr": "*fp32", "d_ptr": "*fp32", "scale_ptr": "*fp32",
                   "coeffs_ptr": "*fp32", "j_ptr": "*i64", "ptr_ptr": "*i64",
                   "cutoff_ptr": "*fp32", "has_scale": "i32", "n_x": "i64", "nf": "i32",
                   "nint": "i32", "order": "i32", "BLOCK_F": "constexpr"},
     "constexprs": _F},
    {"kernel": _spline_edge_dot_kernel,
     "signature": {"out_ptr": "*fp32", "g_ptr": "*fp32", "x_ptr": "*fp32", "d_ptr": "*fp32",
                   "coeffs_ptr": "*fp32", "i_ptr": "*i64", "j_ptr": "*i64",
                   "cutoff_ptr": "*fp32", "num_edges": "i32", "n_g": "i64", "n_x": "i64",
                   "nf": "i32", "nint": "i32", "order": "i32", "BLOCK_E": "constexpr",
                   "BLOCK_F": "constexpr"},
     "constexprs": _EF},
    {"kernel": _spline_conv_vjp_kernel,
     "signature": {"gx_ptr": "*fp32", "gd_part_ptr": "*fp32", "g_ptr": "*fp32", "x_ptr": "*fp32",
                   "d_ptr": "*fp32", "d_rev_ptr": "*fp32", "coeffs_ptr": "*fp32",
                   "j_ptr": "*i64", "ptr_ptr": "*i64", "cutoff_ptr": "*fp32", "num_edges": "i64",
                   "n_g": "i64", "n_x": "i64", "nf": "i32", "nint": "i32", "order": "i32",
                   "BLOCK_F": "constexpr"},
     "constexprs": _F, "options": {"num_warps": VJP_WARPS}},
    {"kernel": _spline_conv_positions_kernel,
     "signature": {"out_ptr": "*fp32", "x_ptr": "*fp32", "pos_ptr": "*fp32", "cells_ptr": "*fp32",
                   "system_ptr": "*i64", "coeffs_ptr": "*fp32", "j_ptr": "*i64",
                   "shifts_ptr": "*i32", "ptr_ptr": "*i64", "cutoff_ptr": "*fp32",
                   "batched": "i32", "n": "i64", "nf": "i32", "nint": "i32",
                   "BLOCK_F": "constexpr"},
     "constexprs": _F},
    {"kernel": _spline_conv_positions_vjp_kernel,
     "signature": {"gx_ptr": "*fp32", "gpos_part_ptr": "*fp32", "cell_part_ptr": "*fp32",
                   "g_ptr": "*fp32", "x_ptr": "*fp32", "pos_ptr": "*fp32", "cells_ptr": "*fp32",
                   "system_ptr": "*i64", "coeffs_ptr": "*fp32", "j_ptr": "*i64",
                   "shifts_ptr": "*i32", "ptr_ptr": "*i64", "cutoff_ptr": "*fp32",
                   "batched": "i32", "need_x": "i32", "need_cell": "i32", "n": "i64",
                   "rows": "i64", "nf": "i32", "nint": "i32", "BLOCK_F": "constexpr"},
     "constexprs": _F, "options": {"num_warps": VJP_WARPS}},
]


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous()


def _rows(out, h, w, e0, a0, a1, j, ptr):
    nf = h.shape[1]
    if a1 < a0 or nf == 0:
        return
    grid = (a1 - a0 + 1, triton.cdiv(nf, BLOCK_F))
    _gms_rows_kernel[grid](out, _c(h), _c(w), j, ptr, e0, e0 + w.shape[0], a0, h.shape[0], nf,
                           BLOCK_F=BLOCK_F)


def _ggm_block(a, b, i, j, e0, e1):
    out = torch.empty(e1 - e0, a.shape[1], dtype=a.dtype, device=a.device)
    if e1 > e0 and a.shape[1]:
        grid = (triton.cdiv(e1 - e0, BLOCK_E), triton.cdiv(a.shape[1], BLOCK_F2))
        _ggm_kernel[grid](out, _c(a), _c(b), i, j, e0, e1 - e0, a.shape[0], b.shape[0],
                          a.shape[1], **_EF)
    return out


def gms(h, w, i, j, ptr, rev):
    """Launcher: out[a] = sum_{e in row a} h[j_e] * w_e, [N, F]."""
    out = h.new_zeros(ptr.shape[0] - 1, h.shape[1])
    if w.shape[0]:
        _rows(out, h, w, 0, 0, ptr.shape[0] - 2, _c(j), _c(ptr))
    return out


def ggm(a, b, i, j, ptr, rev):
    """Launcher: out[e] = a[i_e] * b[j_e], [E, F]."""
    return _ggm_block(a, b, _c(i), _c(j), 0, i.shape[0])


def _pair_grid(num, nf):
    return (triton.cdiv(num, BLOCK_E), triton.cdiv(nf, BLOCK_F2))


def _scatter_fn(pairs):
    a, b = _c(pairs.a), _c(pairs.b)

    def scatter(out, h, w, p0):
        num, nf = w.shape
        if num and nf:
            _pair_scatter_kernel[_pair_grid(num, nf)](out, _c(h), _c(w), a, b, p0, num,
                                                      min(out.shape[0], h.shape[0]), nf, **_EF)

    return scatter


def _params(w1, b1, w2, b2):
    return w1.detach(), b1.detach(), w2.detach(), b2.detach()


def cfconv(x, d, i, j, ptr, rev, pairs, w1, b1, w2, b2, cutoff, kind, envelope, activation,
           keep_filters, keep_budget):
    """Launcher: (out [N, F], filters): out[a] = sum_{e in row a} x[j_e] (W(d_e) + W(d_rev e))
    / 2, the filter network fused into one kernel per receiver row (gpu_triton_filter.py);
    filters are the pair filters [P, F] if ``keep_filters`` and they fit in ``keep_budget``
    bytes, else an empty [0, F]."""
    keep = keep_filters and dense.keeps(pairs.shape[1], x.shape[1], x, keep_budget)
    return _fused.conv(x, d, i, j, ptr, rev, pairs, w1, b1, w2, b2, cutoff, kind, envelope,
                       activation, keep)


def cfconv_vjp(g, x, d, i, j, ptr, rev, pairs, filters, w1, b1, w2, b2, cutoff, kind, envelope,
               activation, need_params, need_x, need_d, keep_budget):
    """Launcher: (grad_x, grad_d [E], grad_w1, grad_b1, grad_w2, grad_b2, products) of
    sum <g, out>, the filter network recomputed in the fused kernels (``filters`` are not read:
    the x-gradient is the fused forward on g); products (t = u w2 [P, F]) are kept within
    ``keep_budget`` bytes, else empty [0, F]."""
    keep = dense.keeps(pairs.shape[1], g.shape[1], g, keep_budget)
    grad_d, *grads, products = _fused.conv_vjp(g, x, d, i, j, ptr, rev, pairs, w1, b1, w2, b2,
                                               cutoff, kind, envelope, activation, need_params,
                                               need_d, keep)
    grad_x = None
    if need_x:  # the pair filter is symmetric: the sender-side sum is the op itself on g
        grad_x, _ = _fused.conv(g, d, i, j, ptr, rev, pairs, w1, b1, w2, b2, cutoff, kind,
                                envelope, activation, False)
    return dense.params_or_empty((grad_x, grad_d, *grads, products), d)


def _product_fn(pairs, g, x):
    """product_fn of dense.blocked_vjp_vjp: u_p = g[a_p] x[b_p] + g[b_p] x[a_p] for a block."""
    gc, xc, a, b = _c(g), _c(x), _c(pairs.a), _c(pairs.b)

    def product(g_, x_, p0, p1):
        out = torch.empty(p1 - p0, gc.shape[1], dtype=gc.dtype, device=gc.device)
        if p1 > p0 and gc.shape[1]:
            _pair_product_kernel[_pair_grid(p1 - p0, gc.shape[1])](
                out, gc, xc, a, b, p0, p1 - p0, min(gc.shape[0], xc.shape[0]), gc.shape[1],
                **_EF)
        return out

    return product


def cfconv_vjp_vjp(v, g, x, d, i, j, ptr, rev, pairs, products, w1, b1, w2, b2, cutoff, kind,
                   envelope, activation, need_g, need_x, need_params, need_d):
    """Launcher: (grad_g, grad_x, grad_d [E], grad_w1, grad_b1, grad_w2, grad_b2) of
    sum_e v_e grad_d_e, grad_d = cfconv_vjp(g, x, d, ...)[1]; empty [0] where not asked for.
    Reads the ``products`` t that cfconv_vjp of the same g and x kept, if it did."""
    with torch.no_grad():
        pairs = dense.MirrorPairs(pairs)
        kept = products.detach() if products.shape[0] == len(pairs) else None
        out = dense.blocked_vjp_vjp(
            v.detach(), _c(g), _c(x), d.detach(), pairs, _params(w1, b1, w2, b2),
            dense.FilterSettings(cutoff, kind, envelope, activation), activation, need_g,
            need_x, need_params, need_d, _radial, _product_fn(pairs, g, x), _scatter_fn(pairs),
            BLOCK, kept)
    return dense.params_or_empty(out, d)


def _cut(cutoff, like):
    return torch.full((1,), float(cutoff), dtype=like.dtype, device=like.device)


def spline_conv(x, d, scale, coeffs, i, j, ptr, rev, cutoff, order):
    """Launcher: out[a] = sum_{e in row a} scale_e x[j_e] W^(order)(d_e), [N, F]."""
    n = ptr.shape[0] - 1
    out = x.new_zeros(n, x.shape[1])
    if d.shape[0] and n and x.shape[1]:
        sc = _c(scale) if scale is not None else d.new_zeros(1)
        grid = (n, triton.cdiv(x.shape[1], BLOCK_F))
        _spline_conv_kernel[grid](out, _c(x), _c(d), sc, _c(coeffs), _c(j), _c(ptr),
                                  _cut(cutoff, d), int(scale is not None), x.shape[0],
                                  x.shape[1], coeffs.shape[0], int(order), BLOCK_F=BLOCK_F)
    return out


def spline_edge_dot(g, x, d, coeffs, i, j, ptr, rev, cutoff, order):
    """Launcher: out[e] = <g[i_e] * x[j_e], W^(order)(d_e)>, [E]."""
    out = d.new_zeros(d.shape[0])
    if d.shape[0]:
        grid = (triton.cdiv(d.shape[0], BLOCK_E),)
        _spline_edge_dot_kernel[grid](out, _c(g), _c(x), _c(d), _c(coeffs), _c(i), _c(j),
                                      _cut(cutoff, d), d.shape[0], g.shape[0], x.shape[0],
                                      x.shape[1], coeffs.shape[0], int(order), **_EF)
    return out


def spline_conv_vjp(grad, x, d, d_rev, coeffs, i, j, ptr, rev, cutoff, order):
    """Launcher: (grad_x [N, F], grad_d [E]) = (spline_conv(grad, d_rev, order),
    spline_edge_dot(grad, x, d, order + 1)) in one pass over the rows."""
    n, nf, num_edges = ptr.shape[0] - 1, grad.shape[1], d.shape[0]
    grad_x = grad.new_zeros(n, nf)
    blocks = triton.cdiv(nf, BLOCK_F)
    parts = d.new_zeros(max(blocks, 1), num_edges)
    if num_edges and n and nf:
        _spline_conv_vjp_kernel[(n, blocks)](
            grad_x, parts, _c(grad), _c(x), _c(d), _c(d_rev), _c(coeffs), _c(j), _c(ptr),
            _cut(cutoff, d), num_edges, grad.shape[0], x.shape[0], nf, coeffs.shape[0],
            int(order), BLOCK_F=BLOCK_F, num_warps=VJP_WARPS)
    return grad_x, parts[0] if blocks == 1 else parts.sum(0)


def _system(atom_system, like):
    """(system index per atom, batched flag): a one-element zero for a single system."""
    if atom_system is None:
        return torch.zeros(1, dtype=torch.int64, device=like.device), 0
    return _c(atom_system), 1


def spline_conv_positions(x, positions, cells, atom_system, i, j, shifts, ptr, coeffs, cutoff):
    """Launcher: out[a] = sum_{e in row a} x[j_e] W(|r_e|), r_e from positions, [N, F]."""
    n, nf = ptr.shape[0] - 1, x.shape[1]
    out = x.new_zeros(n, nf)
    valid = min(n, positions.shape[0])  # rows whose atom exists (all, for checked inputs)
    if j.shape[0] and valid and nf:
        system, batched = _system(atom_system, positions)
        _spline_conv_positions_kernel[(valid, triton.cdiv(nf, BLOCK_F))](
            out, _c(x), _c(positions), _c(cells.to(positions.dtype)), system, _c(coeffs), _c(j),
            _c(shifts), _c(ptr), _cut(cutoff, positions), batched,
            min(x.shape[0], positions.shape[0]), nf, coeffs.shape[0], BLOCK_F=BLOCK_F)
    return out


def spline_conv_positions_vjp(grad, x, positions, cells, atom_system, i, j, shifts, ptr, coeffs,
                              cutoff, need_x, need_cell):
    """Launcher: (grad_x [N, F] or [0], grad_positions [N, 3], grad_cells [B, 3, 3] or [0]) of
    sum <grad, spline_conv_positions(...)> over a mirror-symmetric full list."""
    n, nf = ptr.shape[0] - 1, grad.shape[1]
    blocks = max(triton.cdiv(nf, BLOCK_F), 1)
    grad_x = grad.new_zeros(n, nf)
    gpos = positions.new_zeros(blocks, n, 3)
    cell_rows = positions.new_zeros(blocks, n if need_cell else 0, 9)
    valid = min(n, grad.shape[0], x.shape[0], positions.shape[0])
    if j.shape[0] and valid and nf:
        system, batched = _system(atom_system, positions)
        _spline_conv_positions_vjp_kernel[(valid, blocks)](
            grad_x, gpos, cell_rows if need_cell else gpos, _c(grad), _c(x), _c(positions),
            _c(cells.to(positions.dtype)), system, _c(coeffs), _c(j), _c(shifts), _c(ptr),
            _cut(cutoff, positions), batched, int(bool(need_x)), int(bool(need_cell)),
            valid, n, nf, coeffs.shape[0], BLOCK_F=BLOCK_F, num_warps=VJP_WARPS)
    cell = dense.cell_sums(cell_rows.sum(0), atom_system, cells) if need_cell else None
    return dense.params_or_empty((grad_x if need_x else None, gpos.sum(0), cell), positions)


def painn_message(phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope):
    """Launcher: (ds [N, F], dv [N, 3, F]) of the PaiNN message, the filter fused into one
    kernel per receiver row (gpu_triton_painn.py); see README.md."""
    return _painn.message(phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope)


def painn_message_vjp(gs, gv, phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope,
                      need_params):
    """Launcher: gradients (phi, v, d, unit, wf, bf) of <gs, ds> + <gv, dv>; see README.md."""
    return dense.params_or_empty(_painn.message_vjp(gs, gv, phi, v, d, unit, i, j, ptr, rev, wf,
                                                    bf, cutoff, kind, envelope, need_params), d)


for _spec in AOT_SPECS:  # every kernel runs in the dtype of its inputs: float32 or float64
    _spec["dtypes"] = ("fp32", "fp64")
AOT_SPECS += _fused.AOT_SPECS + _painn.AOT_SPECS  # one per dtype, the launchers' block sizes
