"""SchNet's continuous-filter convolution fused into Triton kernels: basis, both layers of the
filter network (``tl.dot``), activation, envelope and message in registers, no [E, F] tensor.

Algorithm (README.md beside this file: "Fused CFConv on GPU"). The forward gives each receiver
row (CSR ``ptr``) to one program per block of output features, which walks the row's edges
``BLOCK_E`` at a time: the basis of the edges' distances [BLOCK_E, K], ``h = b w1^T + b1`` and
``W = u (act(h) w2^T + b2)`` as two ``tl.dot``, then ``sum_e x[j_e] W_e`` in registers. One
writer per output row: no atomics, deterministic. The trade-off against the CPU's one filter
per unordered pair: each edge evaluates its own filter (twice the GEMM work) to keep row
ownership; the mirror mean ``(W(d_e) + W(d_rev e)) / 2`` takes a second evaluation only in a
block where some mirrored distance differs (a branch per block, no host check). The backward
recomputes the network per block of edges and output features: ``_cfconv_vjp_kernel``'s
distance pass writes the per-edge distance gradient as [feature blocks, E] partial sums, its
parameter pass and ``_cfconv_gw2_kernel`` reduce the parameter gradients in registers over a
chunk of edges into [chunks, ...] buffers summed after (deterministic, no atomics). Float32
GEMMs use TF32 tensor cores unless ``TF32`` is off (``FASTFF_TF32=0``); float64 GEMMs are IEEE
(DMMA on sm_80+).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastff.kernels import gpu_common
from fastff.kernels.radial.gpu_triton import (
    ENVELOPES,
    KINDS,
    _bessel_deriv,
    _envelope_deriv,
    _gaussian_deriv,
)

ACTIVATIONS = {"shifted_softplus": 0, "silu": 1}
# float32 filter GEMMs on TF32 tensor cores (10-bit mantissa, ~1e-3 relative); FASTFF_TF32=0 or
# ``TF32 = False`` here gives IEEE float32 (read at each launch)
TF32 = os.environ.get("FASTFF_TF32", "1") != "0"
# Block sizes by dtype: edges per tl.dot (M >= 16), output features per program, hidden units
# per step of the hidden-layer loop (the inner dimension of the second GEMM), warps, one
# pipeline stage (the default 3 multi-buffers the weight tiles: 172 KB of shared memory and
# spills); sm_90 registers and spills of each in README.md "Tuning" (python -m fastff.aot)
CONFIG = {
    torch.float32: {"BLOCK_E": 16, "BLOCK_F": 64, "BLOCK_C": 32, "num_warps": 8, "num_stages": 1},
    torch.float64: {"BLOCK_E": 16, "BLOCK_F": 16, "BLOCK_C": 32, "BLOCK_KC": 16, "num_warps": 8,
                    "num_stages": 1},
}
# the backward in two passes when it wants both: the distance gradients (and kept products),
# one block of edges per program; the first layer's gradients, a chunk of edges per program
VJP_CONFIG = {
    torch.float32: {"BLOCK_E": 16, "BLOCK_F": 16, "BLOCK_C": 16, "num_warps": 8, "num_stages": 1},
    torch.float64: {"BLOCK_E": 16, "BLOCK_F": 16, "BLOCK_C": 16, "BLOCK_KC": 16, "num_warps": 8,
                    "num_stages": 1},
}
PARAM_CONFIG = {
    torch.float32: {"BLOCK_E": 16, "BLOCK_F": 16, "BLOCK_C": 16, "num_warps": 4, "num_stages": 1},
    torch.float64: {"BLOCK_E": 16, "BLOCK_F": 16, "BLOCK_C": 16, "BLOCK_KC": 16, "num_warps": 8,
                    "num_stages": 1},
}
GW2_CONFIG = {
    torch.float32: {"BLOCK_E": 16, "BLOCK_F": 16, "BLOCK_C": 32, "num_warps": 4, "num_stages": 1},
    torch.float64: {"BLOCK_E": 16, "BLOCK_F": 16, "BLOCK_C": 16, "BLOCK_KC": 16, "num_warps": 4,
                    "num_stages": 1},
}
# Chunks of edges whose parameter gradients one program reduces (the partial buffer holds
# PARAM_CHUNKS x F x (F + K + 2) values: 12 MB at F = 128, K = 50 in float32)
PARAM_CHUNKS = 128


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for the filter GEMMs of a dtype."""
    return "tf32" if dtype == torch.float32 and TF32 else "ieee"


@triton.jit
def _activation(h, ACT: tl.constexpr):
    """(act(h), act'(h)) from one exp: shifted softplus ln(1 + e^h) - ln 2, or SiLU."""
    e = tl.exp(-tl.abs(h))
    s = tl.where(h >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # sigmoid(h), no overflow
    if ACT == 0:
        val = tl.maximum(h, 0.0) + tl.log(1.0 + e) - 0.6931471805599453
        slope = s
    else:
        val = h * s
        slope = s * (1.0 + h * (1.0 - s))
    return val, slope


@triton.jit
def _basis(r, k0, num_basis, cutoff, KIND: tl.constexpr, Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """b_k^(Q)(r) for k = k0 .. k0 + BLOCK_K - 1, [BLOCK_E, BLOCK_K], the bare radial basis
    (zero in the padding k >= K)."""
    k = k0 + tl.arange(0, BLOCK_K)[None, :]
    rr = r[:, None]
    if KIND == 0:
        b = _gaussian_deriv(rr, k, num_basis, cutoff, Q)
    else:
        b = _bessel_deriv(rr, k, cutoff, Q)
    return tl.where(k < num_basis, b, 0.0)


@triton.jit
def _tile(ptr, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_H: tl.constexpr):
    """The [ROWS, COLS] tile at ``ptr`` of a zero-padded [., BLOCK_H] weight (``padded``; the
    caller offsets the scalar pointer): no masks, offsets with compile-time strides."""
    rows = tl.arange(0, ROWS).to(tl.int64)  # 64-bit: no 32-bit offset however it is hoisted
    return tl.load(ptr + rows[:, None] * BLOCK_H + tl.arange(0, COLS)[None, :])


@triton.jit
def _first_layer(r, basis, w1t_ptr, num_basis, cutoff, KIND: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr, COLS: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """b(r) w1^T for the COLS hidden units at ``w1t_ptr`` (a column of the padded w1^T),
    [BLOCK_E, COLS]: from the whole ``basis`` when BLOCK_KC == BLOCK_K, else BLOCK_KC bases
    at a time, recomputed (a [BLOCK_E, BLOCK_K] float64 dot operand alone is 64 registers)."""
    if BLOCK_KC == BLOCK_K:
        h = tl.dot(basis, _tile(w1t_ptr, BLOCK_K, COLS, BLOCK_H), input_precision=PREC)
    else:
        h = tl.zeros((r.shape[0], COLS), dtype=w1t_ptr.dtype.element_ty)
        for k0 in range(0, num_basis, BLOCK_KC):
            h += tl.dot(_basis(r, k0, num_basis, cutoff, KIND, 0, BLOCK_KC),
                        _tile(w1t_ptr + tl.cast(k0, tl.int64) * BLOCK_H, BLOCK_KC, COLS,
                              BLOCK_H), input_precision=PREC)
    return h


@triton.jit
def _filter(r, cutoff, f0, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr, nf, num_basis,
            KIND: tl.constexpr, ENV: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
            BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr):
    """W(r)[:, f0:f0 + BLOCK_F] = u(r) (act(b(r) w1^T + b1) w2^T + b2), [BLOCK_E, BLOCK_F], from
    the padded w1^T [BLOCK_K, BLOCK_H], w2^T [BLOCK_H, BLOCK_H]: the hidden layer BLOCK_C units
    at a time (the second GEMM's inner dimension), so no operand tile is larger than
    [max(BLOCK_K, BLOCK_C), BLOCK_F]."""
    basis = _basis(r, 0, num_basis, cutoff, KIND, 0, BLOCK_K)  # unused if BLOCK_KC < BLOCK_K
    w = tl.zeros((r.shape[0], BLOCK_F), dtype=w2t_ptr.dtype.element_ty)
    for h0 in range(0, nf, BLOCK_C):  # run-time bound: not unrolled (registers)
        h = _first_layer(r, basis, w1t_ptr + h0, num_basis, cutoff, KIND, PREC, BLOCK_K,
                         BLOCK_KC, BLOCK_C, BLOCK_H)
        h += tl.load(b1_ptr + h0 + tl.arange(0, BLOCK_C))[None, :]
        act, _ = _activation(h, ACT)
        w += tl.dot(act, _tile(w2t_ptr + f0 + tl.cast(h0, tl.int64) * BLOCK_H, BLOCK_C,
                          BLOCK_F, BLOCK_H),
                    input_precision=PREC)
    w += tl.load(b2_ptr + f0 + tl.arange(0, BLOCK_F))[None, :]
    return w * _envelope_deriv(r, cutoff, ENV, 0)[:, None]


@triton.jit
def _edges(i_ptr, j_ptr, rev_ptr, e, em, n, num_edges):
    """(a = i[e], b = j[e], m = rev[e], valid): an edge counts when its mirror exists and both
    of its ends and its mirror's sender are atoms (out-of-range values are skipped as the pair
    kernels skip them: only with value checks off). Invalid entries read index 0."""
    a = tl.load(i_ptr + e, mask=em, other=0)
    b = tl.load(j_ptr + e, mask=em, other=0)
    m = tl.load(rev_ptr + e, mask=em, other=0)
    okm = em & (m >= 0) & (m < num_edges) & (m != e)
    m = tl.where(okm, m, 0)
    bm = tl.load(j_ptr + m, mask=okm, other=-1)
    ok = okm & (a >= 0) & (a < n) & (b >= 0) & (b < n) & (bm >= 0) & (bm < n)
    return tl.where(ok, a, 0), tl.where(ok, b, 0), m, okm, ok


@triton.jit
def _cfconv_rows_kernel(out_ptr, kept_ptr, x_ptr, d_ptr, i_ptr, j_ptr, ptr_ptr, rev_ptr,
                        slot_ptr, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr, cutoff_ptr, n, num_edges, nf,
                        num_basis, KIND: tl.constexpr, ENV: tl.constexpr, ACT: tl.constexpr,
                        KEEP: tl.constexpr, PREC: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr):
    """out[a, fo] = sum_{e in row a} x[j_e, fo] (W(d_e) + W(d_rev e))[fo] / 2; with KEEP the
    pair filter of each canonical edge (e < rev[e]) also goes to kept[slot[e]]."""
    row = tl.program_id(0).to(tl.int64)
    f0 = tl.program_id(1).to(tl.int64) * BLOCK_F
    nf64 = nf.to(tl.int64)
    fo = f0 + tl.arange(0, BLOCK_F)
    fmask = fo < nf64
    cutoff = tl.load(cutoff_ptr)
    lo = tl.load(ptr_ptr + row)
    hi = tl.load(ptr_ptr + row + 1)
    acc = tl.zeros((BLOCK_F,), dtype=out_ptr.dtype.element_ty)
    for e0 in range(lo, hi, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
        em = e < hi
        _, b, m, okm, ok = _edges(i_ptr, j_ptr, rev_ptr, e, em, n, num_edges)
        r = tl.load(d_ptr + e, mask=em, other=0.0)
        r_m = tl.load(d_ptr + m, mask=okm, other=0.0)
        w = _filter(r, cutoff, f0, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr, nf, num_basis, KIND, ENV,
                    ACT, PREC, BLOCK_K, BLOCK_KC, BLOCK_H, BLOCK_C, BLOCK_F)
        if tl.max(tl.where(okm & (r_m != r), 1, 0), axis=0) > 0:  # the mirror mean
            w = 0.5 * (w + _filter(r_m, cutoff, f0, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr, nf,
                                   num_basis, KIND, ENV, ACT, PREC, BLOCK_K, BLOCK_KC, BLOCK_H,
                                   BLOCK_C, BLOCK_F))
        xm = ok[:, None] & fmask[None, :]
        xv = tl.load(x_ptr + b[:, None] * nf64 + fo[None, :], mask=xm, other=0.0)
        acc += tl.sum(tl.where(xm, xv * w, 0.0), axis=0)
        if KEEP:
            canon = okm & (m > e)
            p = tl.load(slot_ptr + e, mask=canon, other=-1)
            pm = (canon & (p >= 0))[:, None] & fmask[None, :]
            tl.store(kept_ptr + tl.where(p >= 0, p, 0)[:, None] * nf64 + fo[None, :], w,
                     mask=pm)
    tl.store(out_ptr + row * nf64 + fo, acc, mask=fmask)


@triton.jit
def _pair_products(g_ptr, x_ptr, a, b, cols, nf, ok):
    """ū[:, cols] = (g[a] x[b] + g[b] x[a]) / 2 of a block of edges (0 where not ok)."""
    m = ok[:, None] & (cols < nf)[None, :]
    ia = a[:, None] * nf + cols[None, :]
    ib = b[:, None] * nf + cols[None, :]
    return 0.5 * (tl.load(g_ptr + ia, mask=m, other=0.0) * tl.load(x_ptr + ib, mask=m, other=0.0)
                  + tl.load(g_ptr + ib, mask=m, other=0.0) * tl.load(x_ptr + ia, mask=m,
                                                                      other=0.0))


@triton.jit
def _cfconv_vjp_kernel(gd_part_ptr, gw1_part_ptr, gb1_part_ptr, gb2_part_ptr, products_ptr,
                       g_ptr, x_ptr, d_ptr, i_ptr, j_ptr, rev_ptr, slot_ptr, w1t_ptr, b1_ptr,
                       w2_ptr, b2_ptr, cutoff_ptr, n, num_edges, chunk, nf, num_basis,
                       KIND: tl.constexpr, ENV: tl.constexpr, ACT: tl.constexpr,
                       NEED_D: tl.constexpr, NEED_P: tl.constexpr, KEEP: tl.constexpr,
                       PREC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_KC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_F: tl.constexpr):
    """Gradients of L = sum_e <ū_e, W(d_e)>, ū_e = (g[a] x[b] + g[b] x[a]) / 2, for the edges
    of one chunk and the output features fo of one block (README.md): this block's share of
    dL/dd_e (row fb of gd_part [blocks, E]), of the first layer's (bases k0 .. k0 + BLOCK_KC
    of w1's: the third grid axis) and b2's gradients (rows fo of this chunk's partials
    [chunks, F, .]; w2's: ``_cfconv_gw2_kernel``), and with KEEP the products t = 2 ū w2 of
    canonical edges. Weights padded (``padded``): w1^T, w2."""
    nf64 = nf.to(tl.int64)
    c = tl.program_id(0).to(tl.int64)
    fb = tl.program_id(1).to(tl.int64)
    f0 = fb * BLOCK_F
    fo = f0 + tl.arange(0, BLOCK_F)
    fmask = fo < nf64
    cutoff = tl.load(cutoff_ptr)
    c0 = c * chunk
    c1 = tl.minimum(c0 + chunk, num_edges)
    dt = g_ptr.dtype.element_ty
    kb0 = tl.program_id(2).to(tl.int64) * BLOCK_KC  # this program's bases of w1's gradient
    gw1 = tl.zeros((BLOCK_F, BLOCK_KC), dtype=dt)
    gb1 = tl.zeros((BLOCK_F,), dtype=dt)
    gb2 = tl.zeros((BLOCK_F,), dtype=dt)
    cols = tl.arange(0, BLOCK_F)
    b1 = tl.load(b1_ptr + f0 + cols)
    b2 = tl.load(b2_ptr + f0 + cols)
    for e0 in range(c0, c1, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
        em = e < c1
        a, b, m, okm, ok = _edges(i_ptr, j_ptr, rev_ptr, e, em, n, num_edges)
        r = tl.load(d_ptr + e, mask=em, other=0.0)
        t = tl.zeros((BLOCK_E, BLOCK_F), dtype=dt)  # (ū w2)[:, fo], BLOCK_C hidden at a time
        for h0 in range(0, nf, BLOCK_C):  # run-time bound: not unrolled (registers)
            hid = h0 + tl.arange(0, BLOCK_C).to(tl.int64)
            t += tl.dot(_pair_products(g_ptr, x_ptr, a, b, hid, nf64, ok),
                        _tile(w2_ptr + f0 + tl.cast(h0, tl.int64) * BLOCK_H, BLOCK_C, BLOCK_F,
                              BLOCK_H),
                        input_precision=PREC)
        if KEEP:  # the pair's products u_p w2 = 2 ū w2
            canon = okm & (m > e)
            p = tl.load(slot_ptr + e, mask=canon, other=-1)
            pm = (canon & (p >= 0))[:, None] & fmask[None, :]
            tl.store(products_ptr + tl.where(p >= 0, p, 0)[:, None] * nf64 + fo[None, :],
                     2.0 * t, mask=pm)
        if NEED_D or NEED_P:
            fm = ok[:, None] & fmask[None, :]
            ubar = _pair_products(g_ptr, x_ptr, a, b, fo, nf64, ok)
            basis = _basis(r, 0, num_basis, cutoff, KIND, 0, BLOCK_K)
            hf = _first_layer(r, basis, w1t_ptr + f0, num_basis, cutoff, KIND, PREC, BLOCK_K,
                              BLOCK_KC, BLOCK_F, BLOCK_H)
            af, sf = _activation(hf + b1[None, :], ACT)
            env = _envelope_deriv(r, cutoff, ENV, 0)
            big = tl.where(fm, env[:, None] * t * sf, 0.0)  # G = u t act'(h)
            if NEED_D:
                # <G, h'> = <G w1, b'>: the slopes of the basis never enter a GEMM
                env1 = _envelope_deriv(r, cutoff, ENV, 1)
                part = env1 * tl.sum(tl.where(fm, t * af + ubar * b2[None, :], 0.0), axis=1)
                for k0 in range(0, num_basis, BLOCK_KC):
                    w1k = _tile(w1t_ptr + f0 + tl.cast(k0, tl.int64) * BLOCK_H, BLOCK_KC,
                                BLOCK_F, BLOCK_H)  # w1^T [K chunk, F block]
                    gw = tl.dot(big.to(dt), tl.trans(w1k), input_precision=PREC)
                    part += tl.sum(gw * _basis(r, k0, num_basis, cutoff, KIND, 1, BLOCK_KC),
                                   axis=1)
                tl.store(gd_part_ptr + fb * num_edges + e, part, mask=em)
            if NEED_P:
                gb2 += tl.sum(env[:, None] * ubar, axis=0)
                if BLOCK_KC == BLOCK_K:
                    bk = basis
                else:
                    bk = _basis(r, kb0, num_basis, cutoff, KIND, 0, BLOCK_KC)
                gw1 += tl.dot(tl.trans(big.to(dt)), bk.to(dt), input_precision=PREC)
                gb1 += tl.sum(big, axis=0)
    if NEED_P:
        nb64 = num_basis.to(tl.int64)
        kk = kb0 + tl.arange(0, BLOCK_KC)
        km = fmask[:, None] & (kk < num_basis)[None, :]
        tl.store(gw1_part_ptr + (c * nf64 + fo[:, None]) * nb64 + kk[None, :], gw1, mask=km)
        first = fmask & (kb0 == 0)  # the biases' gradients: once per chunk and feature
        tl.store(gb1_part_ptr + c * nf64 + fo, gb1, mask=first)
        tl.store(gb2_part_ptr + c * nf64 + fo, gb2, mask=first)


@triton.jit
def _cfconv_gw2_kernel(gw2_part_ptr, g_ptr, x_ptr, d_ptr, i_ptr, j_ptr, rev_ptr, w1t_ptr,
                       b1_ptr, cutoff_ptr, n, num_edges, chunk, nf, num_basis,
                       KIND: tl.constexpr, ENV: tl.constexpr, ACT: tl.constexpr,
                       PREC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_KC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """dL/dw2[fo, hid] = sum_e u(d_e) ū_e[fo] act(h_e)[hid] over one chunk of edges: one block
    of output features x hidden units per program, into this chunk's partial [chunks, F, F]."""
    nf64 = nf.to(tl.int64)
    c = tl.program_id(0).to(tl.int64)
    fo = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    h0 = tl.program_id(2).to(tl.int64) * BLOCK_C
    hid = h0 + tl.arange(0, BLOCK_C)
    cutoff = tl.load(cutoff_ptr)
    c0 = c * chunk
    c1 = tl.minimum(c0 + chunk, num_edges)
    dt = g_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_F, BLOCK_C), dtype=dt)
    b1h = tl.load(b1_ptr + h0 + tl.arange(0, BLOCK_C))
    for e0 in range(c0, c1, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
        em = e < c1
        a, b, _, _, ok = _edges(i_ptr, j_ptr, rev_ptr, e, em, n, num_edges)
        r = tl.load(d_ptr + e, mask=em, other=0.0)
        basis = _basis(r, 0, num_basis, cutoff, KIND, 0, BLOCK_K)
        h = _first_layer(r, basis, w1t_ptr + h0, num_basis, cutoff, KIND, PREC, BLOCK_K, BLOCK_KC,
                         BLOCK_C, BLOCK_H)
        act, _ = _activation(h + b1h[None, :], ACT)
        eu = _envelope_deriv(r, cutoff, ENV, 0)[:, None] * _pair_products(
            g_ptr, x_ptr, a, b, fo, nf64, ok)
        acc += tl.dot(tl.trans(eu.to(dt)), act.to(dt), input_precision=PREC)
    m = (fo < nf64)[:, None] & (hid < nf64)[None, :]
    tl.store(gw2_part_ptr + (c * nf64 + fo[:, None]) * nf64 + hid[None, :], acc, mask=m)


def padded(w1, b1, w2, b2, sizes: dict, transpose_w2: bool):
    """The weights as the kernels read them, zero-padded to the block sizes: w1^T [BLOCK_K,
    BLOCK_H], b1 [BLOCK_H], w2^T (forward) or w2 (backward) [BLOCK_H, BLOCK_H], b2 [BLOCK_H]
    (F x F values: small copies, and no masks or run-time strides in the kernels)."""
    nf, num_basis = w1.shape
    bk, bh = sizes["BLOCK_K"], sizes["BLOCK_H"]
    w1t = w1.new_zeros(bk, bh)
    w1t[:num_basis, :nf] = w1.detach().t()
    w2p = w2.new_zeros(bh, bh)
    w2p[:nf, :nf] = w2.detach().t() if transpose_w2 else w2.detach()
    b1p, b2p = b1.new_zeros(bh), b2.new_zeros(bh)
    b1p[:nf] = b1.detach()
    b2p[:nf] = b2.detach()
    return w1t, b1p, w2p, b2p


def _blocks(nf: int, num_basis: int, cfg: dict) -> dict:
    """The size constexprs of a call: K and F padded to powers of two >= 16 (tl.dot's least
    inner dimension), and the blocks of output features and hidden units."""
    hidden = max(16, triton.next_power_of_2(nf))
    bases = max(16, triton.next_power_of_2(num_basis))
    return {"BLOCK_K": bases, "BLOCK_KC": min(bases, cfg.get("BLOCK_KC", bases)),
            "BLOCK_H": hidden, "BLOCK_F": min(hidden, cfg["BLOCK_F"]),
            "BLOCK_C": min(hidden, cfg["BLOCK_C"])}


def _settings(kind: str, envelope: str, activation: str) -> dict:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    if envelope not in ENVELOPES:
        raise ValueError(f"envelope must be one of {tuple(ENVELOPES)}, got {envelope!r}")
    return {"KIND": KINDS[kind], "ENV": ENVELOPES[envelope], "ACT": ACTIVATIONS[activation]}


def _config(table: dict, dtype: torch.dtype) -> dict:
    return table[torch.float64 if dtype == torch.float64 else torch.float32]


def pair_slots(pairs: torch.Tensor, num_edges: int) -> torch.Tensor:
    """int64 [E]: the pair index of each canonical edge (the row of a kept [P, F] tensor it
    writes), -1 elsewhere; device ops only (no host synchronisation)."""
    c = pairs[0]
    slots = torch.full((num_edges,), -1, dtype=torch.int64, device=c.device)
    return slots.index_copy_(0, c, torch.arange(c.shape[0], device=c.device))


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous()


def conv(x, d, i, j, ptr, rev, pairs, w1, b1, w2, b2, cutoff, kind, envelope, activation,
         keep: bool):
    """(out [N, F], kept [P, F] or [0, F]): the fused forward (module docstring)."""
    n, nf, num_edges = ptr.shape[0] - 1, x.shape[1], d.shape[0]
    num_basis = w1.shape[1]
    out = x.new_zeros(n, nf)
    kept = x.new_zeros(pairs.shape[1] if keep else 0, nf)
    if n == 0 or nf == 0:
        return out, kept
    cfg = _config(CONFIG, x.dtype)
    sizes = _blocks(nf, num_basis, cfg)
    slots = pair_slots(pairs, num_edges) if keep else ptr
    cut = gpu_common.constants((cutoff,), d.dtype, d.device)
    grid = (n, triton.cdiv(nf, sizes["BLOCK_F"]))
    _cfconv_rows_kernel[grid](
        out, kept if keep else out, _c(x), _c(d), _c(i), _c(j), _c(ptr), _c(rev), slots,
        *padded(w1, b1, w2, b2, sizes, True), cut, min(n, x.shape[0]), num_edges, nf, num_basis,
        **_settings(kind, envelope, activation), KEEP=bool(keep), PREC=precision(x.dtype),
        BLOCK_E=cfg["BLOCK_E"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **sizes)
    return out, kept


def _vjp_pass(g, x, d, i, j, rev, slots, w1, b1, w2, b2, cut, valid, settings, cfg,
              need_d: bool, need_params: bool, keep: bool, products):
    """One launch of ``_cfconv_vjp_kernel``: (gd_part [blocks, E] or None, (gw1, gb1, gb2)
    partials [chunks, F, .] or None, chunks)."""
    nf, num_edges, num_basis = g.shape[1], d.shape[0], w1.shape[1]
    sizes = _blocks(nf, num_basis, cfg)
    blocks = triton.cdiv(nf, sizes["BLOCK_F"])
    block_e = cfg["BLOCK_E"]
    # one block of edges per program, or PARAM_CHUNKS chunks when parameter gradients are
    # reduced (their partial buffers are [chunks, F, .])
    chunk = block_e
    if need_params:
        chunk = max(block_e, triton.cdiv(triton.cdiv(num_edges, PARAM_CHUNKS), block_e) * block_e)
    chunks = triton.cdiv(num_edges, chunk)
    gd_part = d.new_empty(blocks, num_edges) if need_d else None
    parts = (w1.new_empty(chunks, nf, num_basis), b1.new_empty(chunks, nf),
             b2.new_empty(chunks, nf)) if need_params else None
    dummy = g if gd_part is None else gd_part  # a valid pointer for the outputs not written
    # parameter gradients: one program per BLOCK_KC bases of w1's (each recomputes t)
    kblocks = sizes["BLOCK_K"] // sizes["BLOCK_KC"] if need_params else 1
    _cfconv_vjp_kernel[(chunks, blocks, kblocks)](
        dummy, *(parts if parts is not None else (dummy,) * 3),
        products if keep else dummy, g, x, d, i, j, rev, slots,
        *padded(w1, b1, w2, b2, sizes, False), cut, valid, num_edges, chunk, nf, num_basis,
        **settings, NEED_D=need_d, NEED_P=need_params, KEEP=keep, PREC=precision(g.dtype),
        BLOCK_E=block_e, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **sizes)
    return gd_part, parts, chunk


def conv_vjp(g, x, d, i, j, ptr, rev, pairs, w1, b1, w2, b2, cutoff, kind, envelope,
             activation, need_params: bool, need_d: bool, keep: bool):
    """(grad_d [E] or None, grad_w1, grad_b1, grad_w2, grad_b2 (None unless need_params),
    products [P, F] or [0, F]) of sum <g, cfconv(x, d)>: the fused backward (module
    docstring). The x-gradient is the forward on g (``conv``)."""
    n, nf, num_edges, num_basis = ptr.shape[0] - 1, g.shape[1], d.shape[0], w1.shape[1]
    products = g.new_zeros(pairs.shape[1] if keep else 0, nf)
    grad_d = d.new_zeros(num_edges) if need_d else None
    grads = None
    if need_params:
        grads = [w1.new_zeros(w1.shape), b1.new_zeros(b1.shape), w2.new_zeros(w2.shape),
                 b2.new_zeros(b2.shape)]
    valid = min(n, g.shape[0], x.shape[0])
    if num_edges and n and nf and (need_d or need_params or keep):
        slots = pair_slots(pairs, num_edges) if keep else ptr
        cut = gpu_common.constants((cutoff,), d.dtype, d.device)
        settings = _settings(kind, envelope, activation)
        tensors = (_c(g), _c(x), _c(d), _c(i), _c(j), _c(rev))
        if need_d or keep:
            gd_part, _, _ = _vjp_pass(*tensors, slots, w1, b1, w2, b2, cut, valid, settings,
                                      _config(VJP_CONFIG, g.dtype), bool(need_d), False,
                                      bool(keep), products)
            if need_d:
                grad_d = gd_part[0] if gd_part.shape[0] == 1 else gd_part.sum(0)
        if need_params:
            _, (gw1, gb1, gb2), chunk = _vjp_pass(
                *tensors, slots, w1, b1, w2, b2, cut, valid, settings,
                _config(PARAM_CONFIG, g.dtype), False, True, False, products)
            cfg = _config(GW2_CONFIG, g.dtype)
            sizes = _blocks(nf, num_basis, cfg)
            gw2 = w2.new_empty(gw1.shape[0], nf, nf)
            grid = (gw1.shape[0], triton.cdiv(nf, sizes["BLOCK_F"]),
                    triton.cdiv(nf, sizes["BLOCK_C"]))
            w1t, b1p, _, _ = padded(w1, b1, w2, b2, sizes, False)
            _cfconv_gw2_kernel[grid](
                gw2, *tensors, w1t, b1p, cut, valid, num_edges, chunk, nf, num_basis,
                **settings, PREC=precision(g.dtype), BLOCK_E=cfg["BLOCK_E"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **sizes)
            grads = [gw1.sum(0), gb1.sum(0), gw2.sum(0), gb2.sum(0)]
    return (grad_d, *(grads or (None,) * 4), products)


def _spec(kernel, signature: dict, constexprs: dict, name: str, dtype: torch.dtype,
          cfg: dict) -> dict:
    return {"kernel": kernel, "name": name, "signature": signature, "constexprs": constexprs,
            "dtypes": (_DT[dtype],),
            "options": {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}}


def _signature(names: str, ints: str, constexprs: str) -> dict:
    """A kernel's AOT signature: float pointers (``*_ptr``, int64 index pointers listed in
    _INDEX), int64 / int32 scalars, constexprs."""
    sig = {name: "*i64" if name in _INDEX else "*fp32" for name in names.split()}
    sig.update({name: "i32" if name in ("nf", "num_basis") else "i64" for name in ints.split()})
    sig.update(dict.fromkeys(constexprs.split(), "constexpr"))
    return sig


_INDEX = ("i_ptr", "j_ptr", "ptr_ptr", "rev_ptr", "slot_ptr")
_DT = {torch.float32: "fp32", torch.float64: "fp64"}
_ROWS_SIG = _signature(
    "out_ptr kept_ptr x_ptr d_ptr i_ptr j_ptr ptr_ptr rev_ptr slot_ptr w1t_ptr b1_ptr w2t_ptr "
    "b2_ptr cutoff_ptr", "n num_edges nf num_basis",
    "KIND ENV ACT KEEP PREC BLOCK_E BLOCK_K BLOCK_KC BLOCK_H BLOCK_C BLOCK_F")
_VJP_SIG = _signature(
    "gd_part_ptr gw1_part_ptr gb1_part_ptr gb2_part_ptr products_ptr g_ptr x_ptr d_ptr i_ptr "
    "j_ptr rev_ptr slot_ptr w1t_ptr b1_ptr w2_ptr b2_ptr cutoff_ptr",
    "n num_edges chunk nf num_basis",
    "KIND ENV ACT NEED_D NEED_P KEEP PREC BLOCK_E BLOCK_K BLOCK_KC BLOCK_H BLOCK_C BLOCK_F")
_GW2_SIG = _signature(
    "gw2_part_ptr g_ptr x_ptr d_ptr i_ptr j_ptr rev_ptr w1t_ptr b1_ptr cutoff_ptr",
    "n num_edges chunk nf num_basis",
    "KIND ENV ACT PREC BLOCK_E BLOCK_K BLOCK_KC BLOCK_H BLOCK_F BLOCK_C")
# SchNet's sizes: F = 128 hidden units with K = 50 bases (padded to 64), and F = 64, K = 32;
# gaussian + cosine + shifted softplus and bessel + polynomial + SiLU (the costliest basis)
_SIZES = ((128, 50), (64, 32))
_FILTERS = (("gaussian", "cosine", "shifted_softplus"), ("bessel", "polynomial", "silu"))


def _aot_specs() -> list[dict]:
    specs = []
    for (nf, nb), filt, dtype in ((s, f, t) for s in _SIZES for f in _FILTERS for t in _DT):
        prec = "ieee" if dtype == torch.float64 else "tf32"
        label = f"F={nf},K={nb},{filt[0]}"
        common = {**_settings(*filt), "PREC": prec}
        cfg = CONFIG[dtype]
        specs.append(_spec(_cfconv_rows_kernel, _ROWS_SIG,
                           {**common, "KEEP": True, "BLOCK_E": cfg["BLOCK_E"],
                            **_blocks(nf, nb, cfg)},
                           f"_cfconv_rows_kernel[{label}]", dtype, cfg))
        for need_p, cfg in ((False, VJP_CONFIG[dtype]), (True, PARAM_CONFIG[dtype])):
            specs.append(_spec(_cfconv_vjp_kernel, _VJP_SIG,
                               {**common, "NEED_D": not need_p, "NEED_P": need_p,
                                "KEEP": not need_p, "BLOCK_E": cfg["BLOCK_E"],
                                **_blocks(nf, nb, cfg)},
                               f"_cfconv_vjp_kernel[{label},{'params' if need_p else 'd'}]",
                               dtype, cfg))
        cfg = GW2_CONFIG[dtype]
        sizes = _blocks(nf, nb, cfg)
        specs.append(_spec(_cfconv_gw2_kernel, _GW2_SIG,
                           {**common, "BLOCK_E": cfg["BLOCK_E"], **sizes},
                           f"_cfconv_gw2_kernel[{label}]", dtype, cfg))
    return specs


AOT_SPECS = _aot_specs()
