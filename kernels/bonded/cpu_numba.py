"""Fused bonded kernels for CPU (numba): one pass over the terms computes each term's energy,
its gradient with respect to the term's atoms, the cell (minimum-image virial) and the term's
parameters.

Algorithm: the analytic derivatives of OpenMM's reference bonded forces (bond length,
atan2-based angle, Blondel-Karplus dihedral gradient, which stays finite for nearly linear
neighbours of the central bond). Terms are evaluated in parallel into per-term slots, then a
short serial pass adds the slots to atoms and systems in term order: deterministic, no
atomics, at the price of O(terms) scratch memory (terms are O(atoms)). kernels/bonded/README.md
gives the maths and the "Tuning" table.
"""

from __future__ import annotations

import contextlib
import math

import numba
import numpy as np
import torch
from numba import njit, prange

import fastff.kernels.cpu_threads  # noqa: F401  (numba's OpenMP layer first)

# Below this many terms (all kinds of one call together) the kernels run on the calling thread
# only: a parallel region waits for its slowest thread, which on a busy machine costs far more
# than the work of a few thousand terms (README, Tuning).
SERIAL_BELOW = 32768


@njit(inline="always")
def _mic(rx, ry, rz, cells, inv, s, periodic):
    """Minimum image by rounded fractional coordinates; returns the vector and the integer
    lattice translation n subtracted (r <- r - n @ cell)."""
    if not periodic:
        return rx, ry, rz, 0.0, 0.0, 0.0
    n0 = np.round(rx * inv[s, 0, 0] + ry * inv[s, 1, 0] + rz * inv[s, 2, 0])
    n1 = np.round(rx * inv[s, 0, 1] + ry * inv[s, 1, 1] + rz * inv[s, 2, 1])
    n2 = np.round(rx * inv[s, 0, 2] + ry * inv[s, 1, 2] + rz * inv[s, 2, 2])
    rx = rx - (n0 * cells[s, 0, 0] + n1 * cells[s, 1, 0] + n2 * cells[s, 2, 0])
    ry = ry - (n0 * cells[s, 0, 1] + n1 * cells[s, 1, 1] + n2 * cells[s, 2, 1])
    rz = rz - (n0 * cells[s, 0, 2] + n1 * cells[s, 1, 2] + n2 * cells[s, 2, 2])
    return rx, ry, rz, n0, n1, n2


@njit(inline="always")
def _vec(pos, a, b, cells, inv, s, periodic):
    return _mic(pos[b, 0] - pos[a, 0], pos[b, 1] - pos[a, 1], pos[b, 2] - pos[a, 2],
                cells, inv, s, periodic)


@njit(inline="always")
def _virial(vir, t, n0, n1, n2, gx, gy, gz):
    """vir[t] += -n (outer) dE/dr for a minimum-image vector r = x_b - x_a - n @ cell."""
    vir[t, 0, 0] -= n0 * gx
    vir[t, 0, 1] -= n0 * gy
    vir[t, 0, 2] -= n0 * gz
    vir[t, 1, 0] -= n1 * gx
    vir[t, 1, 1] -= n1 * gy
    vir[t, 1, 2] -= n1 * gz
    vir[t, 2, 0] -= n2 * gx
    vir[t, 2, 1] -= n2 * gy
    vir[t, 2, 2] -= n2 * gz


@njit(cache=True, inline="always")
def _pair_gradient(g_t, vir, t, gx, gy, gz, periodic, n0, n1, n2):
    """dE/dx of a two-atom term with dE/dr_01 = (gx, gy, gz): +g on atom 1, -g on atom 0."""
    g_t[t, 1, 0] = gx
    g_t[t, 1, 1] = gy
    g_t[t, 1, 2] = gz
    g_t[t, 0, 0] = -gx
    g_t[t, 0, 1] = -gy
    g_t[t, 0, 2] = -gz
    if periodic:
        _virial(vir, t, n0, n1, n2, gx, gy, gz)


@njit(parallel=True, cache=True, error_model="numpy")
def _bonds(pos, cells, inv, atom_system, periodic, index, k, r0, e_t, g_t, vir, gp0, gp1):
    for t in prange(index.shape[0]):
        a = index[t, 0]
        b = index[t, 1]
        s = atom_system[a]
        rx, ry, rz, n0, n1, n2 = _vec(pos, a, b, cells, inv, s, periodic)
        d = math.sqrt(rx * rx + ry * ry + rz * rz)
        dev = d - r0[t]
        e_t[t] = 0.5 * k[t] * dev * dev
        f = k[t] * dev / d
        _pair_gradient(g_t, vir, t, f * rx, f * ry, f * rz, periodic, n0, n1, n2)
        gp0[t] = 0.5 * dev * dev
        gp1[t] = -k[t] * dev


@njit(parallel=True, cache=True, error_model="numpy")
def _angles(pos, cells, inv, atom_system, periodic, index, k, theta0, e_t, g_t, vir, gp0, gp1):
    for t in prange(index.shape[0]):
        a = index[t, 0]
        c = index[t, 1]
        b = index[t, 2]
        s = atom_system[a]
        ux, uy, uz, m0, m1, m2 = _vec(pos, c, a, cells, inv, s, periodic)
        vx, vy, vz, n0, n1, n2 = _vec(pos, c, b, cells, inv, s, periodic)
        cx = uy * vz - uz * vy
        cy = uz * vx - ux * vz
        cz = ux * vy - uy * vx
        cross = math.sqrt(cx * cx + cy * cy + cz * cz)
        dot = ux * vx + uy * vy + uz * vz
        theta = math.atan2(cross, dot)
        dev = theta - theta0[t]
        e_t[t] = 0.5 * k[t] * dev * dev
        dedt = k[t] * dev
        lu2 = ux * ux + uy * uy + uz * uz
        lv2 = vx * vx + vy * vy + vz * vz
        # dtheta/du = (cos u/|u|^2 |u||v| - v) / |u x v| ... in the form (dot u/|u|^2 - v)/|u x v|
        fu = dedt / cross
        gux = fu * (dot * ux / lu2 - vx)
        guy = fu * (dot * uy / lu2 - vy)
        guz = fu * (dot * uz / lu2 - vz)
        gvx = fu * (dot * vx / lv2 - ux)
        gvy = fu * (dot * vy / lv2 - uy)
        gvz = fu * (dot * vz / lv2 - uz)
        g_t[t, 0, 0] = gux
        g_t[t, 0, 1] = guy
        g_t[t, 0, 2] = guz
        g_t[t, 2, 0] = gvx
        g_t[t, 2, 1] = gvy
        g_t[t, 2, 2] = gvz
        g_t[t, 1, 0] = -gux - gvx
        g_t[t, 1, 1] = -guy - gvy
        g_t[t, 1, 2] = -guz - gvz
        if periodic:
            _virial(vir, t, m0, m1, m2, gux, guy, guz)
            _virial(vir, t, n0, n1, n2, gvx, gvy, gvz)
        gp0[t] = 0.5 * dev * dev
        gp1[t] = -dedt


@njit(parallel=True, cache=True, error_model="numpy")
def _torsions(pos, cells, inv, atom_system, periodic, index, k, periodicity, phase, e_t, g_t,
              vir, gp0, gp1):
    for t in prange(index.shape[0]):
        i0 = index[t, 0]
        i1 = index[t, 1]
        i2 = index[t, 2]
        i3 = index[t, 3]
        s = atom_system[i0]
        ax, ay, az, l0, l1, l2 = _vec(pos, i0, i1, cells, inv, s, periodic)
        bx, by, bz, m0, m1, m2 = _vec(pos, i1, i2, cells, inv, s, periodic)
        cx, cy, cz, n0, n1, n2 = _vec(pos, i2, i3, cells, inv, s, periodic)
        # n1 = b1 x b2, n2 = b2 x b3
        px = ay * bz - az * by
        py = az * bx - ax * bz
        pz = ax * by - ay * bx
        qx = by * cz - bz * cy
        qy = bz * cx - bx * cz
        qz = bx * cy - by * cx
        lb2 = bx * bx + by * by + bz * bz
        lb = math.sqrt(lb2)
        y = lb * (ax * qx + ay * qy + az * qz)
        x = px * qx + py * qy + pz * qz
        phi = math.atan2(y, x)
        per = periodicity[t]
        arg = per * phi - phase[t]
        e_t[t] = k[t] * (1.0 + math.cos(arg))
        dedphi = -k[t] * per * math.sin(arg)
        pp = px * px + py * py + pz * pz
        qq = qx * qx + qy * qy + qz * qz
        fi = -dedphi * lb / pp
        fl = dedphi * lb / qq
        gix = fi * px
        giy = fi * py
        giz = fi * pz
        glx = fl * qx
        gly = fl * qy
        glz = fl * qz
        # with b1 = x_j - x_i and b3 = x_l - x_k the usual (b1.b2) factors change sign
        p = -(ax * bx + ay * by + az * bz) / lb2
        q = -(cx * bx + cy * by + cz * bz) / lb2
        gjx = (p - 1.0) * gix - q * glx
        gjy = (p - 1.0) * giy - q * gly
        gjz = (p - 1.0) * giz - q * glz
        gkx = (q - 1.0) * glx - p * gix
        gky = (q - 1.0) * gly - p * giy
        gkz = (q - 1.0) * glz - p * giz
        g_t[t, 0, 0] = gix
        g_t[t, 0, 1] = giy
        g_t[t, 0, 2] = giz
        g_t[t, 1, 0] = gjx
        g_t[t, 1, 1] = gjy
        g_t[t, 1, 2] = gjz
        g_t[t, 2, 0] = gkx
        g_t[t, 2, 1] = gky
        g_t[t, 2, 2] = gkz
        g_t[t, 3, 0] = glx
        g_t[t, 3, 1] = gly
        g_t[t, 3, 2] = glz
        if periodic:
            # dE/db1 = -dE/dx_i, dE/db3 = dE/dx_l, dE/db2 = dE/dx_k + dE/dx_l
            _virial(vir, t, l0, l1, l2, -gix, -giy, -giz)
            _virial(vir, t, m0, m1, m2, gkx + glx, gky + gly, gkz + glz)
            _virial(vir, t, n0, n1, n2, glx, gly, glz)
        gp0[t] = 1.0 + math.cos(arg)
        gp1[t] = k[t] * math.sin(arg)


@njit(parallel=True, cache=True, error_model="numpy")
def _pairs(pos, cells, inv, atom_system, periodic, index, qq, sig, eps, kc, e_t, g_t, vir, gp0,
           gp1, gp2):
    for t in prange(index.shape[0]):
        a = index[t, 0]
        b = index[t, 1]
        s = atom_system[a]
        rx, ry, rz, n0, n1, n2 = _vec(pos, a, b, cells, inv, s, periodic)
        d2 = rx * rx + ry * ry + rz * rz
        inv_d = 1.0 / math.sqrt(d2)
        x2 = sig[t] * sig[t] * inv_d * inv_d
        x6 = x2 * x2 * x2
        w = 4.0 * (x6 * x6 - x6)
        ec = kc * qq[t] * inv_d
        e_t[t] = ec + eps[t] * w
        dedd = -ec * inv_d + eps[t] * 4.0 * (-12.0 * x6 * x6 + 6.0 * x6) * inv_d
        f = dedd * inv_d
        _pair_gradient(g_t, vir, t, f * rx, f * ry, f * rz, periodic, n0, n1, n2)
        gp0[t] = kc * inv_d
        gp1[t] = eps[t] * 4.0 * (12.0 * x6 * x6 - 6.0 * x6) / sig[t] if sig[t] != 0.0 else 0.0
        gp2[t] = w


@njit(cache=True)
def _scatter(index, atom_system, e_t, g_t, vir, periodic, energy, g_pos, g_cells):
    """Serial, ordered sums of the per-term slots into atoms and systems: deterministic."""
    for t in range(index.shape[0]):
        s = atom_system[index[t, 0]]
        energy[s] += e_t[t]
        for m in range(index.shape[1]):
            a = index[t, m]
            for c in range(3):
                g_pos[a, c] += g_t[t, m, c]
        if periodic:
            for u in range(3):
                for v in range(3):
                    g_cells[s, u, v] += vir[t, u, v]


def _np(x):
    return x.detach().contiguous().numpy()


def _slots(kernel, pos, c, inv, systems, periodic, index, params, extra, num_param_grads):
    """One kernel's per-term slots: (energy [T], gradient [T, M, 3], virial [T or 0, 3, 3],
    parameter gradients [T] each). The kernel writes every other slot."""
    dt = pos.dtype
    t, m = index.shape[0], index.shape[1]
    e_t = np.empty(t, dt)
    g_t = np.empty((t, m, 3), dt)
    vir = np.zeros((t if periodic else 0, 3, 3), dt)  # accumulated over the term's vectors
    gp = [np.empty(t, dt) for _ in range(num_param_grads)]
    if t:
        kernel(pos, c, inv, systems, bool(periodic), index, *params, *extra, e_t, g_t, vir, *gp)
    return e_t, g_t, vir, gp


@contextlib.contextmanager
def _threads_for(num_terms):
    """Run small workloads on the calling thread only (see SERIAL_BELOW)."""
    threads = numba.get_num_threads()
    if num_terms < SERIAL_BELOW:
        numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(threads)


def _run_kinds(positions, cells, inv_cells, atom_system, kinds):
    """Evaluate several term kinds, then add all their slots to atoms and systems in order
    (kind after kind, term after term): one output, deterministic.

    ``kinds``: (kernel, index, params, extra, num_param_grads, periodic) per kind. Returns
    (energy [B], grad_positions [N, 3], grad_cells [B, 3, 3], parameter gradients of every
    kind in order)."""
    dtype = positions.dtype
    pos, c, inv, systems = _np(positions), _np(cells), _np(inv_cells), _np(atom_system)
    indices = [_np(index) for _, index, *_ in kinds]
    with _threads_for(sum(i.shape[0] for i in indices)):
        slots = [_slots(kernel, pos, c, inv, systems, periodic, idx, [_np(p) for p in params],
                        extra, num_grads)
                 for (kernel, _, params, extra, num_grads, periodic), idx
                 in zip(kinds, indices, strict=True)]
    energy = np.zeros(cells.shape[0], pos.dtype)
    g_pos = np.zeros(pos.shape, pos.dtype)
    g_cells = np.zeros((cells.shape[0], 3, 3), pos.dtype)
    for (*_, periodic), idx, (e_t, g_t, vir, _) in zip(kinds, indices, slots, strict=True):
        _scatter(idx, systems, e_t, g_t, vir, bool(periodic), energy, g_pos, g_cells)
    grads = [g for *_, gp in slots for g in gp]
    return tuple(torch.from_numpy(x).to(dtype) for x in (energy, g_pos, g_cells, *grads))


def _run(kernel, positions, cells, inv_cells, atom_system, periodic, index, params, extra,
         num_param_grads):
    return _run_kinds(positions, cells, inv_cells, atom_system,
                      [(kernel, index, params, extra, num_param_grads, periodic)])


def harmonic_bonds(positions, cells, inv_cells, atom_system, periodic, index, k, r0, param_grads):
    return _run(_bonds, positions, cells, inv_cells, atom_system, periodic, index, (k, r0), (), 2)


def harmonic_angles(positions, cells, inv_cells, atom_system, periodic, index, k, theta0,
                    param_grads):
    return _run(_angles, positions, cells, inv_cells, atom_system, periodic, index, (k, theta0),
                (), 2)


def periodic_torsions(positions, cells, inv_cells, atom_system, periodic, index, k, periodicity,
                      phase, param_grads):
    return _run(_torsions, positions, cells, inv_cells, atom_system, periodic, index,
                (k, periodicity, phase), (), 2)


def lj_coulomb_pairs(positions, cells, inv_cells, atom_system, periodic, index, charge_prod,
                     sigma, epsilon, coulomb_constant, param_grads):
    dt = positions.detach().numpy().dtype
    return _run(_pairs, positions, cells, inv_cells, atom_system, periodic, index,
                (charge_prod, sigma, epsilon), (dt.type(coulomb_constant),), 3)


def bonded_terms(positions, cells, inv_cells, atom_system, bond_index, bond_k, bond_r0,
                 bonds_periodic, angle_index, angle_k, angle_theta0, angles_periodic,
                 torsion_index, torsion_k, torsion_periodicity, torsion_phase, torsions_periodic,
                 param_grads):
    """Bonds, angles and torsions in one launch: one thread decision for all terms together
    and one set of outputs (fastff.mm.bonded, ForceField)."""
    return _run_kinds(positions, cells, inv_cells, atom_system, [
        (_bonds, bond_index, (bond_k, bond_r0), (), 2, bonds_periodic),
        (_angles, angle_index, (angle_k, angle_theta0), (), 2, angles_periodic),
        (_torsions, torsion_index, (torsion_k, torsion_periodicity, torsion_phase), (), 2,
         torsions_periodic)])
