"""The pair potential of the nonbonded kernels, shared by the row kernel (gpu_triton.py) and the
cluster-tile kernel (gpu_clusters.py): Lennard-Jones with Lorentz-Berthelot combining and
OpenMM's switch, Coulomb plain / reaction field / real-space Ewald (README.md)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pair_terms(d2, m, qa, qb, sa, sb, ea, eb, scal_ptr, coulomb, lj, use_switch):
    """Pairs at squared distance d2 (lanes outside m give zeros everywhere).

    ``scal_ptr`` holds (cutoff, switch_distance, k_rf, c_rf, alpha, coulomb_constant).

    Returns:
        energy U, g = (dU/dd) / d, the Coulomb shape f (U_C = k_c q_a q_b f), dU_LJ/ds for
        s = (s_a + s_b) / 2, the LJ shape w (U_LJ = e w), and e = sqrt(e_a e_b).
    """
    cutoff = tl.load(scal_ptr + 0)
    d2 = tl.where(m, d2, 1.0)
    inv = 1.0 / tl.sqrt(d2)
    d = d2 * inv
    zero = tl.zeros_like(d)
    energy = zero
    dedd = zero
    f = zero
    duds = zero
    w = zero
    ep = zero + 1.0
    if coulomb != 0:
        kc = tl.load(scal_ptr + 5)
        qq = kc * qa * qb
        if coulomb == 1:
            f = inv
            df = -inv * inv
        elif coulomb == 2:
            k_rf = tl.load(scal_ptr + 2)
            c_rf = tl.load(scal_ptr + 3)
            f = inv + k_rf * d2 - c_rf
            df = -inv * inv + 2.0 * k_rf * d
        else:
            alpha = tl.load(scal_ptr + 4)
            f = (1.0 - tl.math.erf(alpha * d)) * inv
            df = -(f + 1.1283791670955126 * alpha * tl.exp(-alpha * alpha * d2)) * inv
        energy += qq * f
        dedd += qq * df
    if lj != 0:
        sg = 0.5 * (sa + sb)
        ep = tl.sqrt(ea * eb)
        x2 = sg * sg * inv * inv
        x6 = x2 * x2 * x2
        w = 4.0 * (x6 * x6 - x6)
        dudd = ep * 4.0 * (-12.0 * x6 * x6 + 6.0 * x6) * inv
        duds = tl.where(sg != 0.0, ep * 4.0 * (12.0 * x6 * x6 - 6.0 * x6)
                        / tl.where(sg != 0.0, sg, 1.0), 0.0)
        if use_switch != 0:
            switch_distance = tl.load(scal_ptr + 1)
            width = cutoff - switch_distance
            x = tl.maximum(d - switch_distance, 0.0) / width
            sw = 1.0 - x * x * x * (10.0 - 15.0 * x + 6.0 * x * x)
            dsw = -30.0 * x * x * (1.0 - x) * (1.0 - x) / width
            dudd = dudd * sw + ep * w * dsw
            duds = duds * sw
            w = w * sw
        energy += ep * w
        dedd += dudd
    return (tl.where(m, energy, 0.0), tl.where(m, dedd * inv, 0.0), tl.where(m, f, 0.0),
            tl.where(m, duds, 0.0), tl.where(m, w, 0.0), ep)
