"""Fused nonbonded kernel for CUDA (Triton): one pass over the pairs of a full neighbor list
computes the energy and its gradients with respect to positions, cell and per-atom parameters.

Algorithm: one lane per pair (the pair-parallel layout of GPU MD codes' simplest kernels), each
lane adding its receiver's share into per-atom accumulators with atomics; per-system energies
and virials are summed from those per-atom values afterwards. The trade-off: atomics make the
sums order-dependent in the last bits (not bitwise reproducible), in exchange for a kernel
without a per-row loop whose length varies (rows of a full list differ by 2x at interfaces).
Float scalars travel in a small tensor of the positions' dtype, so float64 runs stay exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 128  # pairs per program: a full warp-multiple; larger blocks only raise register use


@triton.jit
def _ld(ptr, mask):
    """Masked float load, 0 where masked."""
    return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _nonbonded_pairs(pos_ptr, cells_ptr, sys_ptr, i_ptr, j_ptr, shifts_ptr, excl_ptr_ptr,
                     excl_j_ptr, q_ptr, sig_ptr, eps_ptr, scal_ptr, e_ptr, gpos_ptr, vir_ptr,
                     gq_ptr, gs_ptr, ge_ptr, n_pairs, max_excl, coulomb, lj, param_grads,
                     use_switch, half, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n_pairs
    a = tl.load(i_ptr + offs, mask=valid, other=0)
    b = tl.load(j_ptr + offs, mask=valid, other=0)
    s = tl.load(sys_ptr + a, mask=valid, other=0)
    cutoff = tl.load(scal_ptr + 0)
    switch_distance = tl.load(scal_ptr + 1)
    k_rf = tl.load(scal_ptr + 2)
    c_rf = tl.load(scal_ptr + 3)
    alpha = tl.load(scal_ptr + 4)
    kc = tl.load(scal_ptr + 5)
    s0 = tl.load(shifts_ptr + offs * 3 + 0, mask=valid, other=0).to(cutoff.dtype)
    s1 = tl.load(shifts_ptr + offs * 3 + 1, mask=valid, other=0).to(cutoff.dtype)
    s2 = tl.load(shifts_ptr + offs * 3 + 2, mask=valid, other=0).to(cutoff.dtype)
    cb = cells_ptr + s * 9
    rx = (_ld(pos_ptr + b * 3 + 0, valid)
          - _ld(pos_ptr + a * 3 + 0, valid)
          + s0 * _ld(cb + 0, valid) + s1 * _ld(cb + 3, valid)
          + s2 * _ld(cb + 6, valid))
    ry = (_ld(pos_ptr + b * 3 + 1, valid)
          - _ld(pos_ptr + a * 3 + 1, valid)
          + s0 * _ld(cb + 1, valid) + s1 * _ld(cb + 4, valid)
          + s2 * _ld(cb + 7, valid))
    rz = (_ld(pos_ptr + b * 3 + 2, valid)
          - _ld(pos_ptr + a * 3 + 2, valid)
          + s0 * _ld(cb + 2, valid) + s1 * _ld(cb + 5, valid)
          + s2 * _ld(cb + 8, valid))
    d2 = rx * rx + ry * ry + rz * rz
    m = valid & (d2 < cutoff * cutoff)
    e0 = tl.load(excl_ptr_ptr + a, mask=m, other=0)
    e1 = tl.load(excl_ptr_ptr + a + 1, mask=m, other=0)
    excluded = offs < 0
    for k in range(0, max_excl):
        inside = m & (e0 + k < e1)
        other = tl.load(excl_j_ptr + e0 + k, mask=inside, other=-1)
        excluded = excluded | (inside & (other == b))
    m = m & (excluded == 0)
    d2 = tl.where(m, d2, 1.0)
    inv = 1.0 / tl.sqrt(d2)
    d = d2 * inv
    energy = tl.zeros_like(d)
    dedd = tl.zeros_like(d)
    if coulomb != 0:
        qa = _ld(q_ptr + a, m)
        qb = kc * _ld(q_ptr + b, m)
        if coulomb == 1:
            f = inv
            df = -inv * inv
        elif coulomb == 2:
            f = inv + k_rf * d2 - c_rf
            df = -inv * inv + 2.0 * k_rf * d
        else:
            f = (1.0 - tl.math.erf(alpha * d)) * inv
            df = -(f + 1.1283791670955126 * alpha * tl.exp(-alpha * alpha * d2)) * inv
        energy += qa * qb * f
        dedd += qa * qb * df
        if param_grads != 0:
            tl.atomic_add(gq_ptr + a, qb * f, mask=m)
            if half != 0:
                tl.atomic_add(gq_ptr + b, kc * qa * f, mask=m)
    if lj != 0:
        sg = 0.5 * (_ld(sig_ptr + a, m) + _ld(sig_ptr + b, m))
        eb = _ld(eps_ptr + b, m)
        ea = _ld(eps_ptr + a, m)
        ep = tl.sqrt(ea * eb)
        x2 = sg * sg * inv * inv
        x6 = x2 * x2 * x2
        w = 4.0 * (x6 * x6 - x6)
        dudd = ep * 4.0 * (-12.0 * x6 * x6 + 6.0 * x6) * inv
        duds = tl.where(sg != 0.0, ep * 4.0 * (12.0 * x6 * x6 - 6.0 * x6) / sg, 0.0)
        if use_switch != 0:
            width = cutoff - switch_distance
            x = tl.maximum(d - switch_distance, 0.0) / width
            sw = 1.0 - x * x * x * (10.0 - 15.0 * x + 6.0 * x * x)
            dsw = -30.0 * x * x * (1.0 - x) * (1.0 - x) / width
            dudd = dudd * sw + ep * w * dsw
            duds = duds * sw
            w = w * sw
        energy += ep * w
        dedd += dudd
        if param_grads != 0:
            tl.atomic_add(gs_ptr + a, 0.5 * duds, mask=m)
            tl.atomic_add(ge_ptr + a, w * 0.5 * eb / ep, mask=m)
            if half != 0:
                tl.atomic_add(gs_ptr + b, 0.5 * duds, mask=m)
                tl.atomic_add(ge_ptr + b, w * 0.5 * ea / ep, mask=m)
    g = dedd * inv
    fx = g * rx
    fy = g * ry
    fz = g * rz
    share = tl.where(half != 0, 1.0, 0.5)  # a full list holds each pair twice
    tl.atomic_add(e_ptr + a, share * energy, mask=m)
    tl.atomic_add(gpos_ptr + a * 3 + 0, -fx, mask=m)
    tl.atomic_add(gpos_ptr + a * 3 + 1, -fy, mask=m)
    tl.atomic_add(gpos_ptr + a * 3 + 2, -fz, mask=m)
    mh = m & (half != 0)
    tl.atomic_add(gpos_ptr + b * 3 + 0, fx, mask=mh)
    tl.atomic_add(gpos_ptr + b * 3 + 1, fy, mask=mh)
    tl.atomic_add(gpos_ptr + b * 3 + 2, fz, mask=mh)
    mv = m & ((s0 != 0.0) | (s1 != 0.0) | (s2 != 0.0))
    vb = vir_ptr + a * 9
    tl.atomic_add(vb + 0, share * s0 * fx, mask=mv)
    tl.atomic_add(vb + 1, share * s0 * fy, mask=mv)
    tl.atomic_add(vb + 2, share * s0 * fz, mask=mv)
    tl.atomic_add(vb + 3, share * s1 * fx, mask=mv)
    tl.atomic_add(vb + 4, share * s1 * fy, mask=mv)
    tl.atomic_add(vb + 5, share * s1 * fz, mask=mv)
    tl.atomic_add(vb + 6, share * s2 * fx, mask=mv)
    tl.atomic_add(vb + 7, share * s2 * fy, mask=mv)
    tl.atomic_add(vb + 8, share * s2 * fz, mask=mv)


def _signature(ft: str) -> dict:
    ptrs = ["pos_ptr", "cells_ptr", "sys_ptr", "i_ptr", "j_ptr", "shifts_ptr", "excl_ptr_ptr",
            "excl_j_ptr", "q_ptr", "sig_ptr", "eps_ptr", "scal_ptr", "e_ptr", "gpos_ptr",
            "vir_ptr", "gq_ptr", "gs_ptr", "ge_ptr"]
    types = {"sys_ptr": "*i64", "i_ptr": "*i64", "j_ptr": "*i64", "shifts_ptr": "*i32",
             "excl_ptr_ptr": "*i64", "excl_j_ptr": "*i64"}
    sig = {p: types.get(p, f"*{ft}") for p in ptrs}
    sig.update({"n_pairs": "i32", "max_excl": "i32", "coulomb": "i32", "lj": "i32",
                "param_grads": "i32", "use_switch": "i32", "half": "i32", "BLOCK": "constexpr"})
    return sig


AOT_SPECS = [
    {"kernel": _nonbonded_pairs, "signature": _signature("fp32"), "constexprs": {"BLOCK": _BLOCK}},
    {"kernel": _nonbonded_pairs, "signature": _signature("fp64"), "constexprs": {"BLOCK": _BLOCK}},
]


def nonbonded(positions, cells, atom_system, i, j, shifts, ptr, excl_ptr, excl_j, charges,
              sigma, epsilon, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha,
              coulomb_constant, param_grads, half):
    """Launcher; see README.md for the signature. Not bitwise deterministic (atomics)."""
    n, nsys, e = positions.shape[0], cells.shape[0], i.shape[0]
    dtype, dev = positions.dtype, positions.device
    big = 3.0e38 if dtype == torch.float32 else 1.0e300  # "no cutoff" in the kernel's dtype
    scal = torch.tensor([min(cutoff, big), switch_distance, k_rf, c_rf, alpha, coulomb_constant],
                        dtype=dtype, device=dev)
    e_atom = torch.zeros(n, dtype=dtype, device=dev)
    g_pos = torch.zeros(n, 3, dtype=dtype, device=dev)
    vir = torch.zeros(n, 9, dtype=dtype, device=dev)
    g_q, g_s, g_e = (torch.zeros(n, dtype=dtype, device=dev) for _ in range(3))
    if e and n:
        counts = excl_ptr[1:] - excl_ptr[:-1]
        max_excl = int(counts.max()) if counts.numel() else 0
        grid = (triton.cdiv(e, _BLOCK),)
        _nonbonded_pairs[grid](
            positions.detach().contiguous(), cells.detach().contiguous(),
            atom_system.contiguous(), i.contiguous(), j.contiguous(), shifts.contiguous(),
            excl_ptr.contiguous(), excl_j.contiguous(), charges.detach().contiguous(),
            sigma.detach().contiguous(), epsilon.detach().contiguous(), scal, e_atom, g_pos, vir,
            g_q, g_s, g_e, e, max_excl, int(coulomb), int(bool(lj)), int(bool(param_grads)),
            int(switch_distance >= 0.0), int(bool(half)), BLOCK=_BLOCK)
    energy = torch.zeros(nsys, dtype=dtype, device=dev).index_add_(0, atom_system, e_atom)
    g_cells = torch.zeros(nsys, 9, dtype=dtype, device=dev).index_add_(0, atom_system, vir)
    return energy, g_pos, g_cells.view(nsys, 3, 3), g_q, g_s, g_e
