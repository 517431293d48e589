"""Fused bonded kernels for CUDA (Triton): one lane per term computes the term's energy, its
gradients with respect to the term's atoms, the cell (minimum-image virial) and its parameters.

Algorithm: the same analytic derivatives as cpu_numba.py (atan2 angle, Blondel-Karplus
dihedral gradient). A term touches 2-4 atoms anywhere in the system, so per-atom gradients are
added with relaxed atomics (``RED`` instructions, no memory barriers); per-system energies and
virials are first summed over the program's block of terms and added with one atomic per
value (terms of one block belonging to several systems, at batch boundaries, add one by one),
and only minimum-image shifts that are nonzero add to the virial. In torch's deterministic
mode every accumulator is 64-bit fixed point (kernels/gpu_common.py): bitwise reproducible,
at a resolution of 2^-32 kJ/mol (nm). Otherwise sums are not bitwise reproducible. Offsets are
64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastff.kernels import gpu_common as common
from fastff.kernels.bonded.reference import bonded_terms_by_kind

# Terms per program on two warps: the only shape without spills for every kernel, dtype and
# mode (sm_90 ptxas spilled 8-16 bytes in a deterministic variant at 128 terms on 4 or 8 warps).
_BLOCK = 64
_WARPS = 2


@triton.jit
def _ld(ptr, mask):
    """Masked float load, 0 where masked."""
    return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _load_vec(pos_ptr, cells_ptr, inv_ptr, s, a, b, m, periodic):
    """x_b - x_a and, if periodic, its minimum image; returns (r, lattice translation n)."""
    rx = _ld(pos_ptr + b * 3 + 0, m) - _ld(pos_ptr + a * 3 + 0, m)
    ry = _ld(pos_ptr + b * 3 + 1, m) - _ld(pos_ptr + a * 3 + 1, m)
    rz = _ld(pos_ptr + b * 3 + 2, m) - _ld(pos_ptr + a * 3 + 2, m)
    n0 = tl.zeros_like(rx)
    n1 = tl.zeros_like(rx)
    n2 = tl.zeros_like(rx)
    if periodic != 0:
        ib = inv_ptr + s * 9
        cb = cells_ptr + s * 9
        n0 = tl.floor(rx * _ld(ib + 0, m) + ry * _ld(ib + 3, m)
                      + rz * _ld(ib + 6, m) + 0.5)
        n1 = tl.floor(rx * _ld(ib + 1, m) + ry * _ld(ib + 4, m)
                      + rz * _ld(ib + 7, m) + 0.5)
        n2 = tl.floor(rx * _ld(ib + 2, m) + ry * _ld(ib + 5, m)
                      + rz * _ld(ib + 8, m) + 0.5)
        rx = rx - (n0 * _ld(cb + 0, m) + n1 * _ld(cb + 3, m)
                   + n2 * _ld(cb + 6, m))
        ry = ry - (n0 * _ld(cb + 1, m) + n1 * _ld(cb + 4, m)
                   + n2 * _ld(cb + 7, m))
        rz = rz - (n0 * _ld(cb + 2, m) + n1 * _ld(cb + 5, m)
                   + n2 * _ld(cb + 8, m))
    return rx, ry, rz, n0, n1, n2


@triton.jit
def _add_grad(gpos_ptr, a, gx, gy, gz, m, DET: tl.constexpr):
    common.atomic_add_to(gpos_ptr + a * 3 + 0, gx, m, DET)
    common.atomic_add_to(gpos_ptr + a * 3 + 1, gy, m, DET)
    common.atomic_add_to(gpos_ptr + a * 3 + 2, gz, m, DET)


@triton.jit
def _system_add(ptr, stride, c, s, value, m, DET: tl.constexpr):
    """ptr[s * stride + c] += value per lane: the block's first system takes one atomic with its
    lanes' sum, lanes of other systems (batch boundaries) add one by one."""
    s0 = tl.min(tl.where(m, s, 2147483647), 0)
    first = m & (s == s0)
    total = tl.sum(tl.where(first, value, 0.0), 0)
    common.atomic_add_to(ptr + s0 * stride + c, total, tl.max(first.to(tl.int32), 0) != 0, DET)
    rest = m & (s != s0)
    if tl.max(rest.to(tl.int32), 0) != 0:
        common.atomic_add_to(ptr + s * stride + c, value, rest, DET)


@triton.jit
def _add_virial(vir_ptr, s, n0, n1, n2, gx, gy, gz, m, periodic, DET: tl.constexpr):
    """virial[s] += -n (outer) dE/dr, for lanes with a nonzero image shift only."""
    if periodic != 0:
        shifted = m & ((n0 != 0.0) | (n1 != 0.0) | (n2 != 0.0))
        if tl.max(shifted.to(tl.int32), 0) != 0:
            _system_add(vir_ptr, 9, 0, s, -n0 * gx, shifted, DET)
            _system_add(vir_ptr, 9, 1, s, -n0 * gy, shifted, DET)
            _system_add(vir_ptr, 9, 2, s, -n0 * gz, shifted, DET)
            _system_add(vir_ptr, 9, 3, s, -n1 * gx, shifted, DET)
            _system_add(vir_ptr, 9, 4, s, -n1 * gy, shifted, DET)
            _system_add(vir_ptr, 9, 5, s, -n1 * gz, shifted, DET)
            _system_add(vir_ptr, 9, 6, s, -n2 * gx, shifted, DET)
            _system_add(vir_ptr, 9, 7, s, -n2 * gy, shifted, DET)
            _system_add(vir_ptr, 9, 8, s, -n2 * gz, shifted, DET)


@triton.jit
def _bonds_kernel(pos_ptr, cells_ptr, inv_ptr, sys_ptr, idx_ptr, k_ptr, r0_ptr, e_ptr, gpos_ptr,
                  vir_ptr, gp0_ptr, gp1_ptr, n_terms, periodic, BLOCK: tl.constexpr,
                  DET: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = t < n_terms
    a = tl.load(idx_ptr + t * 2 + 0, mask=m, other=0)
    b = tl.load(idx_ptr + t * 2 + 1, mask=m, other=0)
    s = tl.load(sys_ptr + a, mask=m, other=0)
    rx, ry, rz, n0, n1, n2 = _load_vec(pos_ptr, cells_ptr, inv_ptr, s, a, b, m, periodic)
    k = _ld(k_ptr + t, m)
    r0 = _ld(r0_ptr + t, m)
    d = tl.sqrt(tl.where(m, rx * rx + ry * ry + rz * rz, 1.0))
    dev = d - r0
    f = k * dev / d
    _system_add(e_ptr, 1, 0, s, 0.5 * k * dev * dev, m, DET)
    _add_grad(gpos_ptr, b, f * rx, f * ry, f * rz, m, DET)
    _add_grad(gpos_ptr, a, -f * rx, -f * ry, -f * rz, m, DET)
    _add_virial(vir_ptr, s, n0, n1, n2, f * rx, f * ry, f * rz, m, periodic, DET)
    tl.store(gp0_ptr + t, 0.5 * dev * dev, mask=m)
    tl.store(gp1_ptr + t, -k * dev, mask=m)


@triton.jit
def _angles_kernel(pos_ptr, cells_ptr, inv_ptr, sys_ptr, idx_ptr, k_ptr, t0_ptr, e_ptr, gpos_ptr,
                   vir_ptr, gp0_ptr, gp1_ptr, n_terms, periodic, BLOCK: tl.constexpr,
                  DET: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = t < n_terms
    a = tl.load(idx_ptr + t * 3 + 0, mask=m, other=0)
    c = tl.load(idx_ptr + t * 3 + 1, mask=m, other=0)
    b = tl.load(idx_ptr + t * 3 + 2, mask=m, other=0)
    s = tl.load(sys_ptr + a, mask=m, other=0)
    ux, uy, uz, m0, m1, m2 = _load_vec(pos_ptr, cells_ptr, inv_ptr, s, c, a, m, periodic)
    vx, vy, vz, n0, n1, n2 = _load_vec(pos_ptr, cells_ptr, inv_ptr, s, c, b, m, periodic)
    cx = uy * vz - uz * vy
    cy = uz * vx - ux * vz
    cz = ux * vy - uy * vx
    cross = tl.sqrt(tl.where(m, cx * cx + cy * cy + cz * cz, 1.0))
    dot = ux * vx + uy * vy + uz * vz
    theta = _atan2(cross, dot)
    k = _ld(k_ptr + t, m)
    dev = theta - _ld(t0_ptr + t, m)
    dedt = k * dev
    lu2 = tl.where(m, ux * ux + uy * uy + uz * uz, 1.0)
    lv2 = tl.where(m, vx * vx + vy * vy + vz * vz, 1.0)
    fu = dedt / cross
    gux = fu * (dot * ux / lu2 - vx)
    guy = fu * (dot * uy / lu2 - vy)
    guz = fu * (dot * uz / lu2 - vz)
    gvx = fu * (dot * vx / lv2 - ux)
    gvy = fu * (dot * vy / lv2 - uy)
    gvz = fu * (dot * vz / lv2 - uz)
    _system_add(e_ptr, 1, 0, s, 0.5 * k * dev * dev, m, DET)
    _add_grad(gpos_ptr, a, gux, guy, guz, m, DET)
    _add_grad(gpos_ptr, b, gvx, gvy, gvz, m, DET)
    _add_grad(gpos_ptr, c, -gux - gvx, -guy - gvy, -guz - gvz, m, DET)
    _add_virial(vir_ptr, s, m0, m1, m2, gux, guy, guz, m, periodic, DET)
    _add_virial(vir_ptr, s, n0, n1, n2, gvx, gvy, gvz, m, periodic, DET)
    tl.store(gp0_ptr + t, 0.5 * dev * dev, mask=m)
    tl.store(gp1_ptr + t, -dedt, mask=m)


@triton.jit
def _atan2(y, x):
    """atan2 from atan (Triton has no atan2): quadrant fix-up of atan(y/x)."""
    safe_x = tl.where(x == 0.0, 1.0, x)
    base = _atan(y / safe_x)
    # literals stay inline: a Python float bound to a name becomes a float32 scalar
    res = tl.where(x > 0.0, base,
                   tl.where(y >= 0.0, base + 3.141592653589793, base - 3.141592653589793))
    return tl.where(x == 0.0, tl.where(y >= 0.0, 1.5707963267948966, -1.5707963267948966), res)


@triton.jit
def _atan(z):
    """atan via range reduction to |z| <= tan(pi/12) and its odd series (float64-accurate)."""
    sign = tl.where(z < 0.0, -1.0, 1.0)
    z = tl.abs(z)
    big = z > 1.0
    z = tl.where(big, 1.0 / tl.where(big, z, 1.0), z)
    # atan(z) = pi/6 + atan((z - 1/sqrt3) / (1 + z/sqrt3)) for z > tan(pi/12)
    red = z > 0.2679491924311227
    z = tl.where(red, (z - 0.5773502691896258) / (1.0 + z * 0.5773502691896258), z)
    z2 = z * z
    poly = 1.0 / 25.0
    poly = 1.0 / 23.0 - z2 * poly
    poly = 1.0 / 21.0 - z2 * poly
    poly = 1.0 / 19.0 - z2 * poly
    poly = 1.0 / 17.0 - z2 * poly
    poly = 1.0 / 15.0 - z2 * poly
    poly = 1.0 / 13.0 - z2 * poly
    poly = 1.0 / 11.0 - z2 * poly
    poly = 1.0 / 9.0 - z2 * poly
    poly = 1.0 / 7.0 - z2 * poly
    poly = 1.0 / 5.0 - z2 * poly
    poly = 1.0 / 3.0 - z2 * poly
    r = z * (1.0 - z2 * poly)
    r = tl.where(red, r + 0.5235987755982988, r)
    r = tl.where(big, 1.5707963267948966 - r, r)
    return sign * r


@triton.jit
def _torsions_kernel(pos_ptr, cells_ptr, inv_ptr, sys_ptr, idx_ptr, k_ptr, n_ptr, ph_ptr, e_ptr,
                     gpos_ptr, vir_ptr, gp0_ptr, gp1_ptr, n_terms, periodic,
                     BLOCK: tl.constexpr, DET: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = t < n_terms
    i0 = tl.load(idx_ptr + t * 4 + 0, mask=m, other=0)
    i1 = tl.load(idx_ptr + t * 4 + 1, mask=m, other=0)
    i2 = tl.load(idx_ptr + t * 4 + 2, mask=m, other=0)
    i3 = tl.load(idx_ptr + t * 4 + 3, mask=m, other=0)
    s = tl.load(sys_ptr + i0, mask=m, other=0)
    ax, ay, az, l0, l1, l2 = _load_vec(pos_ptr, cells_ptr, inv_ptr, s, i0, i1, m, periodic)
    bx, by, bz, m0, m1, m2 = _load_vec(pos_ptr, cells_ptr, inv_ptr, s, i1, i2, m, periodic)
    cx, cy, cz, n0, n1, n2 = _load_vec(pos_ptr, cells_ptr, inv_ptr, s, i2, i3, m, periodic)
    px = ay * bz - az * by
    py = az * bx - ax * bz
    pz = ax * by - ay * bx
    qx = by * cz - bz * cy
    qy = bz * cx - bx * cz
    qz = bx * cy - by * cx
    lb2 = tl.where(m, bx * bx + by * by + bz * bz, 1.0)
    lb = tl.sqrt(lb2)
    phi = _atan2(lb * (ax * qx + ay * qy + az * qz), px * qx + py * qy + pz * qz)
    k = _ld(k_ptr + t, m)
    per = tl.load(n_ptr + t, mask=m, other=0).to(phi.dtype)
    arg = per * phi - _ld(ph_ptr + t, m)
    cos_arg = tl.cos(arg)
    sin_arg = tl.sin(arg)
    dedphi = -k * per * sin_arg
    pp = tl.where(m, px * px + py * py + pz * pz, 1.0)
    qq = tl.where(m, qx * qx + qy * qy + qz * qz, 1.0)
    fi = -dedphi * lb / pp
    fl = dedphi * lb / qq
    gix = fi * px
    giy = fi * py
    giz = fi * pz
    glx = fl * qx
    gly = fl * qy
    glz = fl * qz
    p = -(ax * bx + ay * by + az * bz) / lb2
    q = -(cx * bx + cy * by + cz * bz) / lb2
    gjx = (p - 1.0) * gix - q * glx
    gjy = (p - 1.0) * giy - q * gly
    gjz = (p - 1.0) * giz - q * glz
    gkx = (q - 1.0) * glx - p * gix
    gky = (q - 1.0) * gly - p * giy
    gkz = (q - 1.0) * glz - p * giz
    _system_add(e_ptr, 1, 0, s, k * (1.0 + cos_arg), m, DET)
    _add_grad(gpos_ptr, i0, gix, giy, giz, m, DET)
    _add_grad(gpos_ptr, i1, gjx, gjy, gjz, m, DET)
    _add_grad(gpos_ptr, i2, gkx, gky, gkz, m, DET)
    _add_grad(gpos_ptr, i3, glx, gly, glz, m, DET)
    _add_virial(vir_ptr, s, l0, l1, l2, -gix, -giy, -giz, m, periodic, DET)
    _add_virial(vir_ptr, s, m0, m1, m2, gkx + glx, gky + gly, gkz + glz, m, periodic, DET)
    _add_virial(vir_ptr, s, n0, n1, n2, glx, gly, glz, m, periodic, DET)
    tl.store(gp0_ptr + t, 1.0 + cos_arg, mask=m)
    tl.store(gp1_ptr + t, k * sin_arg, mask=m)


@triton.jit
def _pairs_kernel(pos_ptr, cells_ptr, inv_ptr, sys_ptr, idx_ptr, qq_ptr, sig_ptr, eps_ptr,
                  kc_ptr, e_ptr, gpos_ptr, vir_ptr, gp0_ptr, gp1_ptr, gp2_ptr, n_terms, periodic,
                  BLOCK: tl.constexpr, DET: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = t < n_terms
    a = tl.load(idx_ptr + t * 2 + 0, mask=m, other=0)
    b = tl.load(idx_ptr + t * 2 + 1, mask=m, other=0)
    s = tl.load(sys_ptr + a, mask=m, other=0)
    rx, ry, rz, n0, n1, n2 = _load_vec(pos_ptr, cells_ptr, inv_ptr, s, a, b, m, periodic)
    kc = tl.load(kc_ptr)
    inv_d = 1.0 / tl.sqrt(tl.where(m, rx * rx + ry * ry + rz * rz, 1.0))
    sg = _ld(sig_ptr + t, m)
    ep = _ld(eps_ptr + t, m)
    x2 = sg * sg * inv_d * inv_d
    x6 = x2 * x2 * x2
    w = 4.0 * (x6 * x6 - x6)
    ec = kc * _ld(qq_ptr + t, m) * inv_d
    dedd = -ec * inv_d + ep * 4.0 * (-12.0 * x6 * x6 + 6.0 * x6) * inv_d
    f = dedd * inv_d
    _system_add(e_ptr, 1, 0, s, ec + ep * w, m, DET)
    _add_grad(gpos_ptr, b, f * rx, f * ry, f * rz, m, DET)
    _add_grad(gpos_ptr, a, -f * rx, -f * ry, -f * rz, m, DET)
    _add_virial(vir_ptr, s, n0, n1, n2, f * rx, f * ry, f * rz, m, periodic, DET)
    tl.store(gp0_ptr + t, kc * inv_d, mask=m)
    tl.store(gp1_ptr + t, tl.where(sg != 0.0, ep * 4.0 * (12.0 * x6 * x6 - 6.0 * x6) / sg, 0.0),
             mask=m)
    tl.store(gp2_ptr + t, w, mask=m)


def _sig(ft: str, names: list[str], ints: dict[str, str], det: bool) -> dict:
    acc = {n: "*i64" for n in ("e_ptr", "gpos_ptr", "vir_ptr")} if det else {}
    sig = {n: acc.get(n, ints.get(n, f"*{ft}")) for n in names}
    sig.update({"n_terms": "i32", "periodic": "i32", "BLOCK": "constexpr", "DET": "constexpr"})
    return sig


_COMMON = ["pos_ptr", "cells_ptr", "inv_ptr", "sys_ptr", "idx_ptr"]
_INTS = {"sys_ptr": "*i64", "idx_ptr": "*i64", "n_ptr": "*i64"}
_KERNELS = {
    "bonds": (_bonds_kernel, ["k_ptr", "r0_ptr", "e_ptr", "gpos_ptr", "vir_ptr", "gp0_ptr",
                              "gp1_ptr"]),
    "angles": (_angles_kernel, ["k_ptr", "t0_ptr", "e_ptr", "gpos_ptr", "vir_ptr", "gp0_ptr",
                                "gp1_ptr"]),
    "torsions": (_torsions_kernel, ["k_ptr", "n_ptr", "ph_ptr", "e_ptr", "gpos_ptr", "vir_ptr",
                                    "gp0_ptr", "gp1_ptr"]),
    "pairs": (_pairs_kernel, ["qq_ptr", "sig_ptr", "eps_ptr", "kc_ptr", "e_ptr", "gpos_ptr",
                              "vir_ptr", "gp0_ptr", "gp1_ptr", "gp2_ptr"]),
}

AOT_SPECS = [
    {"kernel": fn, "signature": _sig(ft, _COMMON + names, _INTS, det),
     "name": f"{fn.__name__}[{'det,' if det else ''}{ft}]",
     "constexprs": {"BLOCK": _BLOCK, "DET": det}, "options": {"num_warps": _WARPS}}
    for fn, names in _KERNELS.values() for det in (False, True) for ft in ("fp32", "fp64")
]


def _run(kernel, positions, cells, inv_cells, atom_system, periodic, index, params, num_grads):
    dtype, dev = positions.dtype, positions.device
    n, t, nsys = positions.shape[0], index.shape[0], cells.shape[0]
    det = common.deterministic()
    acc = torch.int64 if det else dtype  # fixed point in deterministic mode
    energy = torch.zeros(nsys, dtype=acc, device=dev)
    g_pos = torch.zeros(n, 3, dtype=acc, device=dev)
    vir = torch.zeros(nsys, 9, dtype=acc, device=dev)
    gp = [torch.zeros(t, dtype=dtype, device=dev) for _ in range(num_grads)]
    if t:
        kernel[(triton.cdiv(t, _BLOCK),)](
            positions.detach().contiguous(), cells.detach().contiguous(),
            inv_cells.detach().contiguous(), atom_system.contiguous(), index.contiguous(),
            *(p.detach().contiguous() for p in params), energy, g_pos, vir, *gp, t,
            int(bool(periodic)), BLOCK=_BLOCK, DET=det, num_warps=_WARPS)
    if det:
        energy, g_pos, vir = (common.from_fixed(x, dtype) for x in (energy, g_pos, vir))
    return (energy, g_pos, vir.view(nsys, 3, 3), *gp)


def harmonic_bonds(positions, cells, inv_cells, atom_system, periodic, index, k, r0, param_grads):
    return _run(_bonds_kernel, positions, cells, inv_cells, atom_system, periodic, index,
                (k, r0), 2)


def harmonic_angles(positions, cells, inv_cells, atom_system, periodic, index, k, theta0,
                    param_grads):
    return _run(_angles_kernel, positions, cells, inv_cells, atom_system, periodic, index,
                (k, theta0), 2)


def periodic_torsions(positions, cells, inv_cells, atom_system, periodic, index, k, periodicity,
                      phase, param_grads):
    return _run(_torsions_kernel, positions, cells, inv_cells, atom_system, periodic, index,
                (k, periodicity, phase), 2)


def lj_coulomb_pairs(positions, cells, inv_cells, atom_system, periodic, index, charge_prod,
                     sigma, epsilon, coulomb_constant, param_grads):
    kc = common.constants((coulomb_constant,), positions.dtype, positions.device)
    return _run(_pairs_kernel, positions, cells, inv_cells, atom_system, periodic, index,
                (charge_prod, sigma, epsilon, kc), 3)


def bonded_terms(positions, cells, inv_cells, atom_system, bond_index, bond_k, bond_r0,
                 bonds_periodic, angle_index, angle_k, angle_theta0, angles_periodic,
                 torsion_index, torsion_k, torsion_periodicity, torsion_phase, torsions_periodic,
                 param_grads):
    """The three kernels back to back: on a GPU a launch costs microseconds, so fusing the
    kinds into one kernel would save little next to the host-side overhead it shares."""
    return bonded_terms_by_kind(
        harmonic_bonds, harmonic_angles, periodic_torsions, positions, cells, inv_cells,
        atom_system, bond_index, bond_k, bond_r0, bonds_periodic, angle_index, angle_k,
        angle_theta0, angles_periodic, torsion_index, torsion_k, torsion_periodicity,
        torsion_phase, torsions_periodic, param_grads)
