"""Fused nonbonded kernel for CUDA (Triton): one pass over the rows of a neighbor list computes
the energy and its gradients with respect to positions, cell and per-atom parameters.

Algorithm: row ownership, as GPU MD codes do for sorted lists: one program per receiver atom
walks its row of the CSR list (``ptr``) BLOCK pairs at a time and keeps the receiver's sums
(energy, gradient, virial, parameter gradients) in registers; each is written once, by its
owner. A full list (every pair stored from both ends) needs no atomics at all and is bitwise
deterministic. A half list adds each pair's sender share with relaxed atomics (``RED``
instructions, no memory barriers), and the receiver's own sum with one atomic per component;
in deterministic mode (``torch.use_deterministic_algorithms(True)``) those atomics add 64-bit
fixed point (kernels/gpu_common.py), so half lists are deterministic too. Per-system energies
and virials are summed from per-atom rows in atom order (deterministic). Only pairs with a
nonzero image shift add to the virial.

Capacity-mode lists (``fastff.neighbor_list(..., capacity=...)``) work unchanged: rows are read
through ``ptr`` and clamped to the list's length, so padding is never read. Float scalars travel
in a cached device tensor of the positions' dtype, so float64 stays exact and a steady MD step
uploads nothing. In float32, ``sqrt``, division and ``exp`` compile to approximate instructions
(a few ulp), well inside the 1e-4 float32 tolerance of MM energies; float64 is IEEE throughout.
The cluster-pair layout (kernels/nonbonded/gpu_clusters.py) serves MD without parameter
gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastff.kernels import gpu_common as common
from fastff.kernels.nonbonded.gpu_clusters import AOT_SPECS as _CLUSTER_SPECS
from fastff.kernels.nonbonded.gpu_clusters import (  # noqa: F401  (launchers of op.py)
    cluster_list_into,
    nonbonded_tiles,
)
from fastff.kernels.nonbonded.gpu_physics import pair_terms

# Pairs per step of a row: rows of liquid-density lists hold 50-300 pairs; 64 lanes on two
# warps keep the sixteen per-row accumulators at one element per thread (ptxas: see README
# "Tuning").
_BLOCK = 64
_WARPS = 2


@triton.jit
def _add_virial(vb, s0, s1, s2, gx, gy, gz, HALF: tl.constexpr):
    """vir[a] += share * sum_k S_k (x) g_k for one block of row a: only its owner writes the
    row, so a read-modify-write (no atomics), and only for blocks holding image pairs (the
    nine running sums would cost ~30 registers for the whole row)."""
    if HALF:
        share = 1.0
    else:
        share = 0.5  # a full list holds each pair twice
    tl.store(vb + 0, tl.load(vb + 0) + share * tl.sum(s0 * gx, 0))
    tl.store(vb + 1, tl.load(vb + 1) + share * tl.sum(s0 * gy, 0))
    tl.store(vb + 2, tl.load(vb + 2) + share * tl.sum(s0 * gz, 0))
    tl.store(vb + 3, tl.load(vb + 3) + share * tl.sum(s1 * gx, 0))
    tl.store(vb + 4, tl.load(vb + 4) + share * tl.sum(s1 * gy, 0))
    tl.store(vb + 5, tl.load(vb + 5) + share * tl.sum(s1 * gz, 0))
    tl.store(vb + 6, tl.load(vb + 6) + share * tl.sum(s2 * gx, 0))
    tl.store(vb + 7, tl.load(vb + 7) + share * tl.sum(s2 * gy, 0))
    tl.store(vb + 8, tl.load(vb + 8) + share * tl.sum(s2 * gz, 0))


@triton.jit(do_not_specialize=["n_atoms", "n_pairs", "coulomb", "lj", "param_grads",
                               "use_switch"])
def _nonbonded_rows(pos_ptr, cells_ptr, sys_ptr, j_ptr, shifts_ptr, row_ptr, excl_ptr_ptr,
                    excl_j_ptr, q_ptr, sig_ptr, eps_ptr, scal_ptr, e_ptr, gpos_ptr, vir_ptr,
                    gq_ptr, gs_ptr, ge_ptr, n_atoms, n_pairs, coulomb, lj, param_grads,
                    use_switch, HALF: tl.constexpr, DET: tl.constexpr, BLOCK: tl.constexpr):
    """Row a: e[a], vir[a] (owned, zero on entry), dE/dx (owned for a full list; relaxed or
    fixed-point atomics for a half list, which also adds the senders' shares), parameter
    gradients likewise."""
    a = tl.program_id(0).to(tl.int64)
    lo = tl.minimum(tl.load(row_ptr + a), n_pairs)
    hi = tl.minimum(tl.load(row_ptr + a + 1), n_pairs)
    s = tl.load(sys_ptr + a)
    cutoff = tl.load(scal_ptr + 0)
    ty = cutoff.dtype
    xa = tl.load(pos_ptr + a * 3 + 0)
    ya = tl.load(pos_ptr + a * 3 + 1)
    za = tl.load(pos_ptr + a * 3 + 2)
    qa = tl.load(q_ptr + a)
    sa = tl.load(sig_ptr + a)
    ea = tl.load(eps_ptr + a)
    cb = cells_ptr + s * 9
    c00 = tl.load(cb + 0)
    c01 = tl.load(cb + 1)
    c02 = tl.load(cb + 2)
    c10 = tl.load(cb + 3)
    c11 = tl.load(cb + 4)
    c12 = tl.load(cb + 5)
    c20 = tl.load(cb + 6)
    c21 = tl.load(cb + 7)
    c22 = tl.load(cb + 8)
    x0 = tl.load(excl_ptr_ptr + a)
    x1 = tl.load(excl_ptr_ptr + a + 1)
    zero = tl.zeros([BLOCK], dtype=ty)
    en = zero
    fx = zero
    fy = zero
    fz = zero
    gqa = zero
    gsa = zero
    gea = zero
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    for k0 in range(lo, hi, BLOCK):
        k = k0 + lanes
        mk = k < hi
        b = tl.load(j_ptr + k, mask=mk, other=0)
        b = tl.minimum(tl.maximum(b, 0), n_atoms - 1)
        s0 = tl.load(shifts_ptr + k * 3 + 0, mask=mk, other=0).to(ty)
        s1 = tl.load(shifts_ptr + k * 3 + 1, mask=mk, other=0).to(ty)
        s2 = tl.load(shifts_ptr + k * 3 + 2, mask=mk, other=0).to(ty)
        rx = tl.load(pos_ptr + b * 3 + 0, mask=mk, other=0.0) - xa + (
            s0 * c00 + s1 * c10 + s2 * c20)
        ry = tl.load(pos_ptr + b * 3 + 1, mask=mk, other=0.0) - ya + (
            s0 * c01 + s1 * c11 + s2 * c21)
        rz = tl.load(pos_ptr + b * 3 + 2, mask=mk, other=0.0) - za + (
            s0 * c02 + s1 * c12 + s2 * c22)
        d2 = rx * rx + ry * ry + rz * rz
        m = mk & (d2 < cutoff * cutoff)
        excluded = lanes < 0
        for x in range(x0, x1):  # the receiver's exclusions: one scalar load each
            excluded = excluded | (b == tl.load(excl_j_ptr + x))
        m = m & (excluded == 0)
        qb = tl.load(q_ptr + b, mask=m, other=0.0)
        sb = tl.load(sig_ptr + b, mask=m, other=0.0)
        eb = tl.load(eps_ptr + b, mask=m, other=0.0)
        energy, g, f, duds, w, ep = pair_terms(d2, m, qa, qb, sa, sb, ea, eb, scal_ptr,
                                               coulomb, lj, use_switch)
        gx = g * rx
        gy = g * ry
        gz = g * rz
        en += energy
        fx += gx
        fy += gy
        fz += gz
        shifted = m & ((s0 != 0.0) | (s1 != 0.0) | (s2 != 0.0))
        if tl.max(shifted.to(tl.int32), 0) != 0:  # only image pairs add to the virial
            _add_virial(vir_ptr + a * 9, s0, s1, s2, tl.where(shifted, gx, 0.0),
                        tl.where(shifted, gy, 0.0), tl.where(shifted, gz, 0.0), HALF)
        if param_grads != 0:
            kc = tl.load(scal_ptr + 5)
            gqa += kc * qb * f
            gsa += 0.5 * duds
            gea += tl.where(m, w * 0.5 * eb / tl.where(m, ep, 1.0), 0.0)
        if HALF:  # the sender's share: + g to b, and its parameter derivatives
            common.atomic_add_to(gpos_ptr + b * 3 + 0, gx, m, DET)
            common.atomic_add_to(gpos_ptr + b * 3 + 1, gy, m, DET)
            common.atomic_add_to(gpos_ptr + b * 3 + 2, gz, m, DET)
            if param_grads != 0:
                kc = tl.load(scal_ptr + 5)
                common.atomic_add_to(gq_ptr + b, kc * qa * f, m, DET)
                common.atomic_add_to(gs_ptr + b, 0.5 * duds, m, DET)
                common.atomic_add_to(ge_ptr + b, tl.where(m, w * 0.5 * ea / tl.where(m, ep, 1.0),
                                                          0.0), m, DET)
    if HALF:
        share = 1.0
    else:
        share = 0.5  # a full list holds each pair twice
    tl.store(e_ptr + a, (share * tl.sum(en, 0)).to(ty))
    if HALF:  # other rows add to this atom too: one atomic per component
        one = a >= 0
        common.atomic_add_to(gpos_ptr + a * 3 + 0, -tl.sum(fx, 0), one, DET)
        common.atomic_add_to(gpos_ptr + a * 3 + 1, -tl.sum(fy, 0), one, DET)
        common.atomic_add_to(gpos_ptr + a * 3 + 2, -tl.sum(fz, 0), one, DET)
        if param_grads != 0:
            common.atomic_add_to(gq_ptr + a, tl.sum(gqa, 0), one, DET)
            common.atomic_add_to(gs_ptr + a, tl.sum(gsa, 0), one, DET)
            common.atomic_add_to(ge_ptr + a, tl.sum(gea, 0), one, DET)
    else:
        tl.store(gpos_ptr + a * 3 + 0, -tl.sum(fx, 0))
        tl.store(gpos_ptr + a * 3 + 1, -tl.sum(fy, 0))
        tl.store(gpos_ptr + a * 3 + 2, -tl.sum(fz, 0))
        if param_grads != 0:
            tl.store(gq_ptr + a, tl.sum(gqa, 0))
            tl.store(gs_ptr + a, tl.sum(gsa, 0))
            tl.store(ge_ptr + a, tl.sum(gea, 0))


def _signature(ft: str, half: bool, det: bool) -> dict:
    acc = "i64" if det else ft  # fixed-point accumulators in deterministic mode
    sig = {"pos_ptr": f"*{ft}", "cells_ptr": f"*{ft}", "sys_ptr": "*i64", "j_ptr": "*i64",
           "shifts_ptr": "*i32", "row_ptr": "*i64", "excl_ptr_ptr": "*i64",
           "excl_j_ptr": "*i64", "q_ptr": f"*{ft}", "sig_ptr": f"*{ft}", "eps_ptr": f"*{ft}",
           "scal_ptr": f"*{ft}", "e_ptr": f"*{ft}", "gpos_ptr": f"*{acc}", "vir_ptr": f"*{ft}",
           "gq_ptr": f"*{acc}", "gs_ptr": f"*{acc}", "ge_ptr": f"*{acc}"}
    sig.update({"n_atoms": "i32", "n_pairs": "i32", "coulomb": "i32", "lj": "i32",
                "param_grads": "i32", "use_switch": "i32", "HALF": "constexpr",
                "DET": "constexpr", "BLOCK": "constexpr"})
    return sig


AOT_SPECS = [
    *({"kernel": _nonbonded_rows, "signature": _signature(ft, half, det),
       "name": f"_nonbonded_rows[{'half' if half else 'full'}{',det' if det else ''},{ft}]",
       "constexprs": {"HALF": half, "DET": det, "BLOCK": _BLOCK},
       "options": {"num_warps": _WARPS}}
      for ft in ("fp32", "fp64") for half, det in ((False, False), (True, False), (True, True))),
    *_CLUSTER_SPECS,
]


def scalars(cutoff, switch_distance, k_rf, c_rf, alpha, coulomb_constant, dtype, device):
    """The kernels' float settings as a cached device tensor (see gpu_common.constants)."""
    big = 3.0e38 if dtype == torch.float32 else 1.0e300  # "no cutoff" in the kernel's dtype
    return common.constants((min(cutoff, big), switch_distance, k_rf, c_rf, alpha,
                             coulomb_constant), dtype, device)


def nonbonded(positions, cells, atom_system, i, j, shifts, ptr, excl_ptr, excl_j, charges,
              sigma, epsilon, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha,
              coulomb_constant, param_grads, half):
    """Launcher; see README.md for the signature. Deterministic for full lists; for half lists
    in torch's deterministic mode (fixed-point atomics), else not bitwise."""
    n, nsys, e = positions.shape[0], cells.shape[0], j.shape[0]
    dtype, dev = positions.dtype, positions.device
    det = bool(half) and common.deterministic()
    acc = torch.int64 if det else dtype
    scal = scalars(cutoff, switch_distance, k_rf, c_rf, alpha, coulomb_constant, dtype, dev)
    e_atom = torch.zeros(n, dtype=dtype, device=dev)
    vir = torch.zeros(n, 9, dtype=dtype, device=dev)
    g_pos = torch.zeros(n, 3, dtype=acc, device=dev)
    g_q, g_s, g_e = (torch.zeros(n, dtype=acc, device=dev) for _ in range(3))
    if e and n:
        _nonbonded_rows[(n,)](
            positions.detach().contiguous(), cells.detach().contiguous(),
            atom_system.contiguous(), j.contiguous(), shifts.contiguous(), ptr.contiguous(),
            excl_ptr.contiguous(), excl_j.contiguous(), charges.detach().contiguous(),
            sigma.detach().contiguous(), epsilon.detach().contiguous(), scal, e_atom, g_pos, vir,
            g_q, g_s, g_e, n, e, int(coulomb), int(bool(lj)), int(bool(param_grads)),
            int(switch_distance >= 0.0), HALF=bool(half), DET=det, BLOCK=_BLOCK,
            num_warps=_WARPS)
    if det:
        g_pos, g_q, g_s, g_e = (common.from_fixed(t, dtype) for t in (g_pos, g_q, g_s, g_e))
    sys_ptr = common.system_ptr(atom_system, nsys)
    energy = common.segment_sum(e_atom, sys_ptr)
    g_cells = common.segment_sum(vir, sys_ptr)
    return energy, g_pos, g_cells.view(nsys, 3, 3), g_q, g_s, g_e
