"""PaiNN's message fused into Triton kernels: basis, the linear filter ``W = u (wf b + bf)``
(``tl.dot``), envelope and message in registers, no [E, 3F] tensor.

Algorithm (README.md beside this file: "PaiNN message"). The forward gives each receiver row to
one program per block of features, which walks the row's edges ``BLOCK_E`` at a time: the basis
[BLOCK_E, K], the three filter blocks (s, vs, vv) as three ``tl.dot`` with the padded
``wf^T``, and ``ds``, ``dv`` summed in registers (one writer per row: no atomics,
deterministic). The backward's row kernel recomputes the filter of each mirrored edge for the
sender side (``phi``, ``v``: the row's atom sends along the mirrors of its edges), an edge-block
kernel writes each edge's distance and unit-vector gradients per feature block ([blocks, E]
partials, summed after), and the parameter gradients are reduced per chunk of edges into
[chunks, 3F, .] partials. Same block machinery, precision setting (``gpu_triton_filter.TF32``)
and padding as the CFConv kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastff.kernels import gpu_common
from fastff.kernels.message import gpu_triton_filter as _f
from fastff.kernels.message.gpu_triton_filter import _basis, _first_layer, _tile
from fastff.kernels.radial.gpu_triton import ENVELOPES, KINDS, _envelope_deriv

# edges per tl.dot, features per program, bases per step of the first layer (float64: a whole
# [16, 64] dot operand is 64 registers), warps; sm_90 registers in README.md "Tuning"
CONFIG = {
    torch.float32: {"BLOCK_E": 16, "BLOCK_F": 32, "num_warps": 4, "num_stages": 1},
    torch.float64: {"BLOCK_E": 16, "BLOCK_F": 16, "BLOCK_KC": 16, "num_warps": 4,
                    "num_stages": 1},
}
VJP_CONFIG = {
    torch.float32: {"BLOCK_E": 16, "BLOCK_F": 16, "num_warps": 4, "num_stages": 1},
    torch.float64: {"BLOCK_E": 16, "BLOCK_F": 16, "BLOCK_KC": 16, "num_warps": 4,
                    "num_stages": 1},
}
EDGE_CONFIG = {
    torch.float32: {"BLOCK_E": 16, "BLOCK_F": 16, "BLOCK_KC": 16, "num_warps": 8,
                    "num_stages": 1},
    torch.float64: {"BLOCK_E": 16, "BLOCK_F": 16, "BLOCK_KC": 16, "num_warps": 4,
                    "num_stages": 1},
}
PARAM_CONFIG = {
    torch.float32: {"BLOCK_E": 16, "BLOCK_F": 16, "num_warps": 4, "num_stages": 1},
    torch.float64: {"BLOCK_E": 16, "BLOCK_F": 16, "BLOCK_KC": 16, "num_warps": 4,
                    "num_stages": 1},
}


@triton.jit
def _painn_filter(r, basis, wft_ptr, bf_ptr, env, num_basis, cutoff, KIND: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr,
                  BLOCK_F: tl.constexpr, STRIDE: tl.constexpr):
    """One block of W = u (wf b + bf): the BLOCK_F columns at ``wft_ptr`` / ``bf_ptr``
    ([BLOCK_E, BLOCK_F]) and the bare y = wf b + bf."""
    y = _first_layer(r, basis, wft_ptr, num_basis, cutoff, KIND, PREC, BLOCK_K, BLOCK_KC,
                     BLOCK_F, STRIDE)
    y += tl.load(bf_ptr + tl.arange(0, BLOCK_F))[None, :]
    return env[:, None] * y, y


@triton.jit
def _painn_rows_kernel(ds_ptr, dv_ptr, phi_ptr, v_ptr, unit_ptr, d_ptr, j_ptr, ptr_ptr,
                       wft_ptr, bf_ptr, cutoff_ptr, n_phi, nf, num_basis, KIND: tl.constexpr,
                       ENV: tl.constexpr, PREC: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_F: tl.constexpr):
    """ds[a, fo] = sum_e phi_s[j] W_s, dv[a, c, fo] = sum_e phi_vs[j] W_vs unit[e, c]
    + phi_vv[j] W_vv v[j, c] over row a's edges; padded wf^T [BLOCK_K, 3 BLOCK_H]."""
    row = tl.program_id(0).to(tl.int64)
    f0 = tl.program_id(1).to(tl.int64) * BLOCK_F
    nf64 = nf.to(tl.int64)
    fo = f0 + tl.arange(0, BLOCK_F)
    fmask = fo < nf64
    cutoff = tl.load(cutoff_ptr)
    lo = tl.load(ptr_ptr + row)
    hi = tl.load(ptr_ptr + row + 1)
    dt = ds_ptr.dtype.element_ty
    acc_s = tl.zeros((BLOCK_F,), dtype=dt)
    acc_x = tl.zeros((BLOCK_F,), dtype=dt)
    acc_y = tl.zeros((BLOCK_F,), dtype=dt)
    acc_z = tl.zeros((BLOCK_F,), dtype=dt)
    for e0 in range(lo, hi, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
        em = e < hi
        src = tl.load(j_ptr + e, mask=em, other=0)
        ok = em & (src >= 0) & (src < n_phi)
        src = tl.where(ok, src, 0)
        r = tl.load(d_ptr + e, mask=em, other=0.0)
        basis = _basis(r, 0, num_basis, cutoff, KIND, 0, BLOCK_K)
        env = _envelope_deriv(r, cutoff, ENV, 0)
        m = ok[:, None] & fmask[None, :]
        prow = phi_ptr + src[:, None] * (3 * nf64) + fo[None, :]
        w, _ = _painn_filter(r, basis, wft_ptr + f0, bf_ptr + f0, env, num_basis, cutoff, KIND,
                             PREC, BLOCK_K, BLOCK_KC, BLOCK_F, 3 * BLOCK_H)
        acc_s += tl.sum(tl.load(prow, mask=m, other=0.0) * w, axis=0)
        w, _ = _painn_filter(r, basis, wft_ptr + BLOCK_H + f0, bf_ptr + BLOCK_H + f0, env,
                             num_basis, cutoff, KIND, PREC, BLOCK_K, BLOCK_KC, BLOCK_F,
                             3 * BLOCK_H)
        pvs = tl.load(prow + nf64, mask=m, other=0.0) * w
        w, _ = _painn_filter(r, basis, wft_ptr + 2 * BLOCK_H + f0, bf_ptr + 2 * BLOCK_H + f0,
                             env, num_basis, cutoff, KIND, PREC, BLOCK_K, BLOCK_KC, BLOCK_F,
                             3 * BLOCK_H)
        pvv = tl.load(prow + 2 * nf64, mask=m, other=0.0) * w
        vrow = v_ptr + src[:, None] * (3 * nf64) + fo[None, :]
        ux = tl.load(unit_ptr + e * 3, mask=ok, other=0.0)[:, None]
        uy = tl.load(unit_ptr + e * 3 + 1, mask=ok, other=0.0)[:, None]
        uz = tl.load(unit_ptr + e * 3 + 2, mask=ok, other=0.0)[:, None]
        acc_x += tl.sum(pvs * ux + pvv * tl.load(vrow, mask=m, other=0.0), axis=0)
        acc_y += tl.sum(pvs * uy + pvv * tl.load(vrow + nf64, mask=m, other=0.0), axis=0)
        acc_z += tl.sum(pvs * uz + pvv * tl.load(vrow + 2 * nf64, mask=m, other=0.0), axis=0)
    tl.store(ds_ptr + row * nf64 + fo, acc_s, mask=fmask)
    out = dv_ptr + row * (3 * nf64) + fo
    tl.store(out, acc_x, mask=fmask)
    tl.store(out + nf64, acc_y, mask=fmask)
    tl.store(out + 2 * nf64, acc_z, mask=fmask)


@triton.jit
def _receiver_terms(gs_ptr, gv_ptr, phi_ptr, v_ptr, unit_ptr, a, b, e, fo, nf64, ok):
    """gw = gx * phi[b] per block (s, vs, vv) of edges e = (a, b): gx = (gs[a],
    sum_c gv[a, c] unit[e, c], sum_c gv[a, c] v[b, c]), and gv[a, c] * phi_vs[b] per axis."""
    m = ok[:, None] & (fo < nf64)[None, :]
    prow = phi_ptr + b[:, None] * (3 * nf64) + fo[None, :]
    grow = gv_ptr + a[:, None] * (3 * nf64) + fo[None, :]
    vrow = v_ptr + b[:, None] * (3 * nf64) + fo[None, :]
    g0 = tl.load(grow, mask=m, other=0.0)
    g1 = tl.load(grow + nf64, mask=m, other=0.0)
    g2 = tl.load(grow + 2 * nf64, mask=m, other=0.0)
    ux = tl.load(unit_ptr + e * 3, mask=ok, other=0.0)[:, None]
    uy = tl.load(unit_ptr + e * 3 + 1, mask=ok, other=0.0)[:, None]
    uz = tl.load(unit_ptr + e * 3 + 2, mask=ok, other=0.0)[:, None]
    p_vs = tl.load(prow + nf64, mask=m, other=0.0)
    gw_s = tl.load(gs_ptr + a[:, None] * nf64 + fo[None, :], mask=m, other=0.0) * tl.load(
        prow, mask=m, other=0.0)
    gw_vs = (g0 * ux + g1 * uy + g2 * uz) * p_vs
    dot_v = (g0 * tl.load(vrow, mask=m, other=0.0) + g1 * tl.load(vrow + nf64, mask=m, other=0.0)
             + g2 * tl.load(vrow + 2 * nf64, mask=m, other=0.0))
    gw_vv = dot_v * tl.load(prow + 2 * nf64, mask=m, other=0.0)
    return gw_s, gw_vs, gw_vv, g0 * p_vs, g1 * p_vs, g2 * p_vs


@triton.jit
def _slope_dot(gw, wft_ptr, r, num_basis, cutoff, KIND: tl.constexpr, PREC: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr, BLOCK_F: tl.constexpr,
               STRIDE: tl.constexpr):
    """<gw wf_block, b'(r)> per edge [BLOCK_E], BLOCK_KC bases at a time."""
    acc = r * 0.0
    for k0 in range(0, num_basis, BLOCK_KC):
        wk = _tile(wft_ptr + tl.cast(k0, tl.int64) * STRIDE, BLOCK_KC, BLOCK_F, STRIDE)
        gk = tl.dot(gw, tl.trans(wk), input_precision=PREC)  # [BLOCK_E, BLOCK_KC]
        acc += tl.sum(gk * _basis(r, k0, num_basis, cutoff, KIND, 1, BLOCK_KC), axis=1)
    return acc


@triton.jit
def _painn_vjp_edges_kernel(gd_part_ptr, gunit_part_ptr, gs_ptr, gv_ptr, phi_ptr, v_ptr,
                            unit_ptr, d_ptr, i_ptr, j_ptr, wft_ptr, bf_ptr, cutoff_ptr, n_phi,
                            num_edges, nf, num_basis, KIND: tl.constexpr, ENV: tl.constexpr,
                            PREC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_KC: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_F: tl.constexpr):
    """The receiver side, one block of edges x features per program: each edge's share of
    dL/dd = u' <gw, y> + u <gw wf, b'> and of dL/dunit from this feature block (rows fb of
    [blocks, E] and [blocks, E, 3])."""
    fb = tl.program_id(1).to(tl.int64)
    f0 = fb * BLOCK_F
    nf64 = nf.to(tl.int64)
    fo = f0 + tl.arange(0, BLOCK_F)
    cutoff = tl.load(cutoff_ptr)
    dt = gs_ptr.dtype.element_ty
    ST: tl.constexpr = 3 * BLOCK_H
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    em = e < num_edges
    a = tl.load(i_ptr + e, mask=em, other=0)
    b = tl.load(j_ptr + e, mask=em, other=0)
    ok = em & (a >= 0) & (a < n_phi) & (b >= 0) & (b < n_phi)
    a = tl.where(ok, a, 0)
    b = tl.where(ok, b, 0)
    r = tl.load(d_ptr + e, mask=em, other=0.0)
    basis = _basis(r, 0, num_basis, cutoff, KIND, 0, BLOCK_K)
    env = _envelope_deriv(r, cutoff, ENV, 0)
    gw_s, gw_vs, gw_vv, q0, q1, q2 = _receiver_terms(gs_ptr, gv_ptr, phi_ptr, v_ptr, unit_ptr,
                                                     a, b, e, fo, nf64, ok)
    wvs, yvs = _painn_filter(r, basis, wft_ptr + BLOCK_H + f0, bf_ptr + BLOCK_H + f0, env,
                             num_basis, cutoff, KIND, PREC, BLOCK_K, BLOCK_KC, BLOCK_F, ST)
    gpart = gunit_part_ptr + (fb * num_edges + e) * 3
    tl.store(gpart, tl.sum(q0 * wvs, axis=1), mask=em)
    tl.store(gpart + 1, tl.sum(q1 * wvs, axis=1), mask=em)
    tl.store(gpart + 2, tl.sum(q2 * wvs, axis=1), mask=em)
    dot = tl.sum(gw_vs * yvs, axis=1)
    _, y = _painn_filter(r, basis, wft_ptr + f0, bf_ptr + f0, env, num_basis, cutoff, KIND,
                         PREC, BLOCK_K, BLOCK_KC, BLOCK_F, ST)
    dot += tl.sum(gw_s * y, axis=1)
    _, y = _painn_filter(r, basis, wft_ptr + 2 * BLOCK_H + f0, bf_ptr + 2 * BLOCK_H + f0, env,
                         num_basis, cutoff, KIND, PREC, BLOCK_K, BLOCK_KC, BLOCK_F, ST)
    dot += tl.sum(gw_vv * y, axis=1)
    slope = _slope_dot(gw_s.to(dt), wft_ptr + f0, r, num_basis, cutoff, KIND, PREC, BLOCK_K,
                       BLOCK_KC, BLOCK_F, ST)
    slope += _slope_dot(gw_vs.to(dt), wft_ptr + BLOCK_H + f0, r, num_basis, cutoff, KIND, PREC,
                        BLOCK_K, BLOCK_KC, BLOCK_F, ST)
    slope += _slope_dot(gw_vv.to(dt), wft_ptr + 2 * BLOCK_H + f0, r, num_basis, cutoff, KIND,
                        PREC, BLOCK_K, BLOCK_KC, BLOCK_F, ST)
    part = _envelope_deriv(r, cutoff, ENV, 1) * dot + env * slope
    tl.store(gd_part_ptr + fb * num_edges + e, tl.where(ok, part, 0.0), mask=em)


@triton.jit
def _painn_vjp_rows_kernel(gphi_ptr, gv_out_ptr, gs_ptr, gv_ptr, phi_ptr, v_ptr, unit_ptr,
                           d_ptr, j_ptr, ptr_ptr, rev_ptr, wft_ptr, bf_ptr, cutoff_ptr, n_phi,
                           num_edges, nf, num_basis, KIND: tl.constexpr, ENV: tl.constexpr,
                           PREC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_KC: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_F: tl.constexpr, PART: tl.constexpr):
    """The sender side, row a and one feature block per program: atom a sends along the mirror
    (b <- a) of each of its edges, whose filter is W(d[rev e]): PART 0 gphi[a]'s s and vs
    blocks, PART 1 its vv block and grad_v[a] (two launches: half the live state each)."""
    row = tl.program_id(0).to(tl.int64)
    f0 = tl.program_id(1).to(tl.int64) * BLOCK_F
    nf64 = nf.to(tl.int64)
    fo = f0 + tl.arange(0, BLOCK_F)
    fmask = fo < nf64
    cutoff = tl.load(cutoff_ptr)
    lo = tl.load(ptr_ptr + row)
    hi = tl.load(ptr_ptr + row + 1)
    dt = gphi_ptr.dtype.element_ty
    acc_s = tl.zeros((BLOCK_F,), dtype=dt)
    acc_vs = tl.zeros((BLOCK_F,), dtype=dt)
    r_x = tl.zeros((BLOCK_F,), dtype=dt)
    r_y = tl.zeros((BLOCK_F,), dtype=dt)
    r_z = tl.zeros((BLOCK_F,), dtype=dt)
    row_ok = row < n_phi
    ST: tl.constexpr = 3 * BLOCK_H
    for e0 in range(lo, hi, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
        em = e < hi
        b = tl.load(j_ptr + e, mask=em, other=0)
        mi = tl.load(rev_ptr + e, mask=em, other=0)
        okm = em & (b >= 0) & (b < n_phi) & row_ok & (mi >= 0) & (mi < num_edges)
        b = tl.where(okm, b, 0)
        mi = tl.where(okm, mi, 0)
        r_m = tl.load(d_ptr + mi, mask=okm, other=0.0)
        basis = _basis(r_m, 0, num_basis, cutoff, KIND, 0, BLOCK_K)
        env = _envelope_deriv(r_m, cutoff, ENV, 0)
        m = okm[:, None] & fmask[None, :]
        hrow = gv_ptr + b[:, None] * (3 * nf64) + fo[None, :]
        if PART == 0:
            ws, _ = _painn_filter(r_m, basis, wft_ptr + f0, bf_ptr + f0, env, num_basis, cutoff,
                                  KIND, PREC, BLOCK_K, BLOCK_KC, BLOCK_F, ST)
            acc_s += tl.sum(tl.load(gs_ptr + b[:, None] * nf64 + fo[None, :], mask=m,
                                    other=0.0) * ws, axis=0)
            w, _ = _painn_filter(r_m, basis, wft_ptr + BLOCK_H + f0, bf_ptr + BLOCK_H + f0, env,
                                 num_basis, cutoff, KIND, PREC, BLOCK_K, BLOCK_KC, BLOCK_F, ST)
            h = (tl.load(hrow, mask=m, other=0.0)
                 * tl.load(unit_ptr + mi * 3, mask=okm, other=0.0)[:, None]
                 + tl.load(hrow + nf64, mask=m, other=0.0)
                 * tl.load(unit_ptr + mi * 3 + 1, mask=okm, other=0.0)[:, None]
                 + tl.load(hrow + 2 * nf64, mask=m, other=0.0)
                 * tl.load(unit_ptr + mi * 3 + 2, mask=okm, other=0.0)[:, None])
            acc_vs += tl.sum(h * w, axis=0)
        else:
            w, _ = _painn_filter(r_m, basis, wft_ptr + 2 * BLOCK_H + f0,
                                 bf_ptr + 2 * BLOCK_H + f0, env, num_basis, cutoff, KIND, PREC,
                                 BLOCK_K, BLOCK_KC, BLOCK_F, ST)
            r_x += tl.sum(tl.load(hrow, mask=m, other=0.0) * w, axis=0)
            r_y += tl.sum(tl.load(hrow + nf64, mask=m, other=0.0) * w, axis=0)
            r_z += tl.sum(tl.load(hrow + 2 * nf64, mask=m, other=0.0) * w, axis=0)
    am = fmask & row_ok
    ar = tl.where(row_ok, row, 0)
    out = gphi_ptr + ar * (3 * nf64) + fo
    if PART == 0:
        tl.store(out, acc_s, mask=am)
        tl.store(out + nf64, acc_vs, mask=am)
    else:
        vrow = v_ptr + ar * (3 * nf64) + fo
        tl.store(out + 2 * nf64, tl.load(vrow, mask=am, other=0.0) * r_x
                 + tl.load(vrow + nf64, mask=am, other=0.0) * r_y
                 + tl.load(vrow + 2 * nf64, mask=am, other=0.0) * r_z, mask=am)
        pvv = tl.load(phi_ptr + ar * (3 * nf64) + 2 * nf64 + fo, mask=am, other=0.0)
        gvo = gv_out_ptr + ar * (3 * nf64) + fo
        tl.store(gvo, pvv * r_x, mask=am)
        tl.store(gvo + nf64, pvv * r_y, mask=am)
        tl.store(gvo + 2 * nf64, pvv * r_z, mask=am)


@triton.jit
def _painn_params_kernel(gwf_part_ptr, gbf_part_ptr, gs_ptr, gv_ptr, phi_ptr, v_ptr, unit_ptr,
                         d_ptr, i_ptr, j_ptr, cutoff_ptr, n_phi, num_edges, chunk, nf,
                         num_basis, KIND: tl.constexpr, ENV: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr,
                         BLOCK_F: tl.constexpr):
    """dL/dwf[blk F + fo, k] = sum_e u gw_e[blk, fo] b_k(d_e) (bases kb0 .. kb0 + BLOCK_KC: the
    third grid axis) and dL/dbf = sum_e u gw_e over one chunk of edges, into this chunk's
    partials [chunks, 3F, K] and [chunks, 3F]."""
    c = tl.program_id(0).to(tl.int64)
    fo = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    kb0 = tl.program_id(2).to(tl.int64) * BLOCK_KC
    nf64 = nf.to(tl.int64)
    cutoff = tl.load(cutoff_ptr)
    c0 = c * chunk
    c1 = tl.minimum(c0 + chunk, num_edges)
    dt = gs_ptr.dtype.element_ty
    acc_s = tl.zeros((BLOCK_F, BLOCK_KC), dtype=dt)
    acc_vs = tl.zeros((BLOCK_F, BLOCK_KC), dtype=dt)
    acc_vv = tl.zeros((BLOCK_F, BLOCK_KC), dtype=dt)
    bs = tl.zeros((BLOCK_F,), dtype=dt)
    bvs = tl.zeros((BLOCK_F,), dtype=dt)
    bvv = tl.zeros((BLOCK_F,), dtype=dt)
    for e0 in range(c0, c1, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
        em = e < c1
        a = tl.load(i_ptr + e, mask=em, other=0)
        b = tl.load(j_ptr + e, mask=em, other=0)
        ok = em & (a >= 0) & (a < n_phi) & (b >= 0) & (b < n_phi)
        a = tl.where(ok, a, 0)
        b = tl.where(ok, b, 0)
        r = tl.load(d_ptr + e, mask=em, other=0.0)
        env = _envelope_deriv(r, cutoff, ENV, 0)[:, None]
        gw_s, gw_vs, gw_vv, _, _, _ = _receiver_terms(gs_ptr, gv_ptr, phi_ptr, v_ptr, unit_ptr,
                                                      a, b, e, fo, nf64, ok)
        gw_s = env * gw_s
        gw_vs = env * gw_vs
        gw_vv = env * gw_vv
        bk = _basis(r, kb0, num_basis, cutoff, KIND, 0, BLOCK_KC).to(dt)
        acc_s += tl.dot(tl.trans(gw_s.to(dt)), bk, input_precision=PREC)
        acc_vs += tl.dot(tl.trans(gw_vs.to(dt)), bk, input_precision=PREC)
        acc_vv += tl.dot(tl.trans(gw_vv.to(dt)), bk, input_precision=PREC)
        bs += tl.sum(gw_s, axis=0)
        bvs += tl.sum(gw_vs, axis=0)
        bvv += tl.sum(gw_vv, axis=0)
    nb64 = num_basis.to(tl.int64)
    kk = kb0 + tl.arange(0, BLOCK_KC)
    fmask = fo < nf64
    km = fmask[:, None] & (kk < nb64)[None, :]
    base = gwf_part_ptr + (c * 3 * nf64 + fo[:, None]) * nb64 + kk[None, :]
    tl.store(base, acc_s, mask=km)
    tl.store(base + nf64 * nb64, acc_vs, mask=km)
    tl.store(base + 2 * nf64 * nb64, acc_vv, mask=km)
    first = fmask & (kb0 == 0)
    bb = gbf_part_ptr + c * 3 * nf64 + fo
    tl.store(bb, bs, mask=first)
    tl.store(bb + nf64, bvs, mask=first)
    tl.store(bb + 2 * nf64, bvv, mask=first)


def _blocks(nf: int, num_basis: int, cfg: dict) -> dict:
    sizes = _f._blocks(nf, num_basis, {"BLOCK_C": 16, **cfg})
    del sizes["BLOCK_C"]
    return sizes


def padded(wf, bf, sizes: dict, nf: int):
    """wf^T [BLOCK_K, 3 BLOCK_H] and bf [3 BLOCK_H], zero-padded per block (s, vs, vv)."""
    num_basis = wf.shape[1]
    bk, bh = sizes["BLOCK_K"], sizes["BLOCK_H"]
    wft = wf.new_zeros(bk, 3, bh)
    wft[:num_basis, :, :nf] = wf.detach().view(3, nf, num_basis).permute(2, 0, 1)
    bfp = bf.new_zeros(3, bh)
    bfp[:, :nf] = bf.detach().view(3, nf)
    return wft.view(bk, 3 * bh), bfp.view(3 * bh)


def _settings(kind: str, envelope: str) -> dict:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    if envelope not in ENVELOPES:
        raise ValueError(f"envelope must be one of {tuple(ENVELOPES)}, got {envelope!r}")
    return {"KIND": KINDS[kind], "ENV": ENVELOPES[envelope]}


def message(phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope):
    """(ds [N, F], dv [N, 3, F]): the fused forward (module docstring)."""
    n, nf = ptr.shape[0] - 1, v.shape[2]
    ds, dv = phi.new_zeros(n, nf), phi.new_zeros(n, 3, nf)
    if n == 0 or nf == 0:
        return ds, dv
    cfg = _f._config(CONFIG, phi.dtype)
    sizes = _blocks(nf, wf.shape[1], cfg)
    wft, bfp = padded(wf, bf, sizes, nf)
    _painn_rows_kernel[(n, triton.cdiv(nf, sizes["BLOCK_F"]))](
        ds, dv, _f._c(phi), _f._c(v), _f._c(unit), _f._c(d), _f._c(j), _f._c(ptr), wft, bfp,
        gpu_common.constants((cutoff,), d.dtype, d.device), min(n, phi.shape[0], v.shape[0]),
        nf, wf.shape[1], **_settings(kind, envelope), PREC=_f.precision(phi.dtype),
        BLOCK_E=cfg["BLOCK_E"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **sizes)
    return ds, dv


def message_vjp(gs, gv, phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope,
                need_params: bool):
    """Gradients (phi, v, d, unit, wf or None, bf or None) of <gs, ds> + <gv, dv>: the fused
    backward (module docstring)."""
    n, nf, num_edges, num_basis = ptr.shape[0] - 1, v.shape[2], d.shape[0], wf.shape[1]
    gphi, grad_v = torch.zeros_like(phi), torch.zeros_like(v)
    grad_d, gunit = d.new_zeros(num_edges), d.new_zeros(num_edges, 3)
    gwf = wf.new_zeros(wf.shape) if need_params else None
    gbf = bf.new_zeros(bf.shape) if need_params else None
    if not (n and nf and num_edges):
        return gphi, grad_v, grad_d, gunit, gwf, gbf
    valid = min(n, phi.shape[0], v.shape[0], gs.shape[0], gv.shape[0])
    settings = _settings(kind, envelope)
    cut = gpu_common.constants((cutoff,), d.dtype, d.device)
    prec = _f.precision(phi.dtype)
    tensors = [_f._c(t) for t in (gs, gv, phi, v, unit, d)]
    cfg = _f._config(VJP_CONFIG, phi.dtype)
    sizes = _blocks(nf, num_basis, cfg)
    blocks = triton.cdiv(nf, sizes["BLOCK_F"])
    wft, bfp = padded(wf, bf, sizes, nf)
    common = dict(**settings, PREC=prec, BLOCK_E=cfg["BLOCK_E"], num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"], **sizes)
    for part in (0, 1):
        _painn_vjp_rows_kernel[(n, blocks)](
            gphi, grad_v, *tensors, _f._c(j), _f._c(ptr), _f._c(rev), wft, bfp, cut, valid,
            num_edges, nf, num_basis, PART=part, **common)
    cfg = _f._config(EDGE_CONFIG, phi.dtype)
    sizes = _blocks(nf, num_basis, cfg)
    blocks = triton.cdiv(nf, sizes["BLOCK_F"])
    wft, bfp = padded(wf, bf, sizes, nf)
    gd_part = d.new_empty(blocks, num_edges)
    gunit_part = d.new_empty(blocks, num_edges, 3)
    _painn_vjp_edges_kernel[(triton.cdiv(num_edges, cfg["BLOCK_E"]), blocks)](
        gd_part, gunit_part, *tensors, _f._c(i), _f._c(j), wft, bfp, cut, valid, num_edges, nf,
        num_basis, **settings, PREC=prec, BLOCK_E=cfg["BLOCK_E"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **sizes)
    grad_d = gd_part[0] if blocks == 1 else gd_part.sum(0)
    gunit = gunit_part[0] if blocks == 1 else gunit_part.sum(0)
    if need_params:
        cfg = _f._config(PARAM_CONFIG, phi.dtype)
        sizes = _blocks(nf, num_basis, cfg)
        block_e = cfg["BLOCK_E"]
        chunk = max(block_e, triton.cdiv(triton.cdiv(num_edges, _f.PARAM_CHUNKS), block_e)
                    * block_e)
        chunks = triton.cdiv(num_edges, chunk)
        gwf_part = wf.new_empty(chunks, 3 * nf, num_basis)
        gbf_part = bf.new_empty(chunks, 3 * nf)
        grid = (chunks, triton.cdiv(nf, sizes["BLOCK_F"]), sizes["BLOCK_K"] // sizes["BLOCK_KC"])
        _painn_params_kernel[grid](
            gwf_part, gbf_part, *tensors, _f._c(i), _f._c(j), cut, valid, num_edges, chunk, nf,
            num_basis, **settings, PREC=prec, BLOCK_E=block_e, BLOCK_K=sizes["BLOCK_K"],
            BLOCK_KC=sizes["BLOCK_KC"], BLOCK_F=sizes["BLOCK_F"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
        gwf, gbf = gwf_part.sum(0), gbf_part.sum(0)
    return gphi, grad_v, grad_d, gunit, gwf, gbf


def _aot_specs() -> list[dict]:
    sig = _f._signature
    rows = sig("ds_ptr dv_ptr phi_ptr v_ptr unit_ptr d_ptr j_ptr ptr_ptr wft_ptr bf_ptr cutoff_ptr",
               "n_phi nf num_basis",
               "KIND ENV PREC BLOCK_E BLOCK_K BLOCK_KC BLOCK_H BLOCK_F")
    vjp = sig("gphi_ptr gv_out_ptr gs_ptr gv_ptr phi_ptr v_ptr unit_ptr d_ptr j_ptr ptr_ptr "
              "rev_ptr wft_ptr bf_ptr cutoff_ptr", "n_phi num_edges nf num_basis",
              "KIND ENV PREC BLOCK_E BLOCK_K BLOCK_KC BLOCK_H BLOCK_F PART")
    edges = sig("gd_part_ptr gunit_part_ptr gs_ptr gv_ptr phi_ptr v_ptr unit_ptr d_ptr i_ptr "
                "j_ptr wft_ptr bf_ptr cutoff_ptr", "n_phi num_edges nf num_basis",
                "KIND ENV PREC BLOCK_E BLOCK_K BLOCK_KC BLOCK_H BLOCK_F")
    params = sig("gwf_part_ptr gbf_part_ptr gs_ptr gv_ptr phi_ptr v_ptr unit_ptr d_ptr i_ptr "
                 "j_ptr cutoff_ptr", "n_phi num_edges chunk nf num_basis",
                 "KIND ENV PREC BLOCK_E BLOCK_K BLOCK_KC BLOCK_F")
    specs = []
    # PaiNN's sizes: F = 128, K = 20 Bessel functions (padded to 32) with a cosine envelope
    for dtype in _f._DT:
        common = {**_settings("bessel", "cosine"),
                  "PREC": "ieee" if dtype == torch.float64 else "tf32"}
        for kernel, signature, table in ((_painn_rows_kernel, rows, CONFIG),
                                         (_painn_vjp_rows_kernel, vjp, VJP_CONFIG),
                                         (_painn_vjp_edges_kernel, edges, EDGE_CONFIG),
                                         (_painn_params_kernel, params, PARAM_CONFIG)):
            cfg = table[dtype]
            sizes = _blocks(128, 20, cfg)
            if kernel is _painn_params_kernel:
                del sizes["BLOCK_H"]
            for part in (0, 1) if kernel is _painn_vjp_rows_kernel else (None,):
                extra, label = ({}, "") if part is None else ({"PART": part}, f",part={part}")
                specs.append(_f._spec(kernel, signature, {**common, "BLOCK_E": cfg["BLOCK_E"],
                                                          **sizes, **extra},
                                      f"{kernel.__name__}[F=128,K=20,bessel{label}]", dtype,
                                      cfg))
    return specs


AOT_SPECS = _aot_specs()
