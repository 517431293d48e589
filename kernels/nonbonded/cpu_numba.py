"""Fused nonbonded kernel for CPU (numba): one pass over a full neighbor list computes the
energy and its gradients with respect to positions, cell and per-atom parameters.

Algorithm: receiver rows of a CSR list, split into a fixed number of chunks of equal pair
counts. With a full list each row alone gives its atom's gradient (every pair is evaluated from
both sides); with a half list each pair is evaluated once and the sender's share goes to a
private [N, 3] buffer of the row's chunk, the buffers being added in chunk order afterwards
(the scheme of per-thread force buffers in GROMACS and OpenMM's CPU kernels). Either way no
atomics, bitwise deterministic for any thread count, and no per-pair temporaries: memory beyond
the list is O(N) (O(16 N) with a half list). Half lists do about half the work.

Each row runs in three loops: a gather of the partners' records (position, charge, sigma,
epsilon: one packed 32-byte record per atom) and shifts into contiguous per-chunk scratch, a
branch-free arithmetic loop over that scratch which LLVM vectorizes (it does not vectorize the
gathers themselves), and the senders' scatter. Meant for liquid-density rows (a few hundred
pairs per row at a 1 nm cutoff). kernels/nonbonded/README.md gives the maths and the "Tuning"
table behind these choices.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

import fastff.kernels.cpu_threads  # noqa: F401  (numba's OpenMP layer first)

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


# fastmath without nnan/ninf: NaN and inf keep their meaning (epsilon = 0 derivatives), while
# contraction and reassociation let LLVM fuse, reorder and vectorize the per-pair arithmetic
# (still deterministic: the order is fixed at compile time).
_FAST = {"contract", "arcp", "afn", "reassoc"}

# Rows of per-chunk scratch (each max_row long): what one row gathers, then its pair forces and
# the sender's parameter shares.
_XB, _YB, _ZB, _OK, _QB, _SB, _EB, _FX, _FY, _FZ, _SX, _SY, _SZ, _PQ, _PS, _PE = range(16)
_SCRATCH_ROWS = 16


@njit(inline="always")
def _gather(atoms, j, shifts, p0, m, excl_j, e0, e1, w):
    """Copy what the pairs of one row read at random (the partner's record, the shift) into
    contiguous scratch, and mark excluded partners (skipped in every image). On this data the
    arithmetic loop vectorizes: LLVM does not vectorize gathers on x86 CPUs."""
    for k in range(m):
        p = p0 + k
        b = j[p]
        w[_XB, k] = atoms[b, 0]
        w[_YB, k] = atoms[b, 1]
        w[_ZB, k] = atoms[b, 2]
        w[_QB, k] = atoms[b, 3]
        w[_SB, k] = atoms[b, 4]
        w[_EB, k] = atoms[b, 5]
        w[_SX, k] = shifts[p, 0]
        w[_SY, k] = shifts[p, 1]
        w[_SZ, k] = shifts[p, 2]
        w[_OK, k] = 1.0
    for e in range(e0, e1):
        eb = excl_j[e]
        for k in range(m):  # a select, so that it vectorizes
            w[_OK, k] = 0.0 if j[p0 + k] == eb else w[_OK, k]


@njit(parallel=True, cache=True)
def _pack_atoms(pos, q, sig, eps, atoms):
    """One 32-byte record per atom (x, y, z, q, sigma, epsilon): a partner costs one cache
    line instead of four."""
    for a in prange(pos.shape[0]):
        atoms[a, 0] = pos[a, 0]
        atoms[a, 1] = pos[a, 1]
        atoms[a, 2] = pos[a, 2]
        atoms[a, 3] = q[a]
        atoms[a, 4] = sig[a]
        atoms[a, 5] = eps[a]


@njit(inline="always", fastmath=_FAST)
def _coulomb_polynomial(d, d2, inv, krf, crf, unused):
    """Plain (krf = crf = 0) and reaction-field Coulomb: f(d) and f'(d)."""
    return inv + krf * d2 - crf, (krf + krf) * d - inv * inv


@njit(inline="always", fastmath=_FAST)
def _coulomb_ewald_real(d, d2, inv, alpha, alpha2, two_alpha_over_sqrt_pi):
    """erfc-screened Coulomb (direct-space Ewald): f(d) and f'(d)."""
    f = math.erfc(alpha * d) * inv
    return f, -(f + two_alpha_over_sqrt_pi * math.exp(-alpha2 * d2)) * inv


@njit(inline="always")
def _constants(dt):
    """The literals of :func:`_pair_energy` in float type ``dt`` (Python literals are float64
    in numba and would promote float32 arithmetic)."""
    return (dt.type(0.0), dt.type(1.0), dt.type(4.0), dt.type(6.0), dt.type(10.0),
            dt.type(12.0), dt.type(15.0), dt.type(30.0))


@njit(inline="always", fastmath=_FAST)
def _masked_distance(d2, inside, masked_d2, one, zero):
    """(ok, 1/d, d) of a pair that counts when ``inside``; one that does not is evaluated at
    d^2 = masked_d2 (finite) with weight ok = 0, so the loops stay branch-free."""
    ok = one if inside else zero
    d2 = d2 if inside else masked_d2
    inv = one / math.sqrt(d2)
    return ok, inv, d2 * inv


@njit(inline="always", fastmath=_FAST)
def _pair_energy(ok, qq, sg, ep, f, df, inv, d, rs, inv_width, k):
    """One pair's energy and g = (dE/dd) / d (so dE/dr_ij = g r_ij), weighted by ok (0 or 1):
    Coulomb ``qq f(d)`` plus switched Lennard-Jones with combined sigma ``sg`` and epsilon
    ``ep``. Also returns (s/d)^6, (s/d)^12 and the switch for parameter derivatives. Shared
    by the pair-list and cluster loops; straight-line code, so their loops vectorize. ``k``:
    the constants (0, 1, 4, 6, 10, 12, 15, 30) in the kernel's float type (:func:`_constants`)."""
    zero, one, four, six, ten, twelve, fifteen, thirty = k
    x2 = sg * sg * inv * inv
    x6 = x2 * x2 * x2
    x12 = x6 * x6
    x = min(max(d - rs, zero) * inv_width, one)  # switch (inv_width = 0: none)
    sw = one - x * x * x * (ten - fifteen * x + six * x * x)
    dsw = -thirty * x * x * (one - x) * (one - x) * inv_width
    u = ep * four * (x12 - x6)
    energy = ok * (qq * f + u * sw)
    dudd = ep * four * (six * x6 - twelve * x12) * inv * sw + u * dsw
    return energy, ok * (qq * df + dudd) * inv, x6, x12, sw


def _make_pair_loop(coulomb_terms):
    """The arithmetic of one row over gathered scratch, for one Coulomb form
    (``coulomb_terms(d, d2, inv, c1, c2, c3)`` -> f(d), f'(d), from the method's constants
    c1-c3), compiled into the loop so that it vectorizes."""

    @njit(fastmath=_FAST, error_model="numpy")
    def pair_loop(w, m, cell, xa, ya, za, qa, sa, ea, cut2, masked_d2, kq, kc, c1, c2, c3, rs,
                  inv_width, lj, param_grads):
        """Branch-free (masked pairs are computed at d^2 = masked_d2 with weight 0). Writes each
        pair's force (and parameter shares) for the sender; returns the row's sums."""
        dt = w.dtype
        lit = _constants(dt)
        zero, one, four, six, twelve = lit[0], lit[1], lit[2], lit[3], lit[5]
        half = dt.type(0.5)
        lj_on = one if lj else zero  # no LJ: epsilon counts as 0
        c00, c01, c02 = cell[0, 0], cell[0, 1], cell[0, 2]
        c10, c11, c12 = cell[1, 0], cell[1, 1], cell[1, 2]
        c20, c21, c22 = cell[2, 0], cell[2, 1], cell[2, 2]
        acc_e = gx = gy = gz = zero
        v00 = v01 = v02 = v10 = v11 = v12 = v20 = v21 = v22 = zero
        acc_q = acc_s = acc_eps = zero
        for k in range(m):
            s0 = w[_SX, k]
            s1 = w[_SY, k]
            s2 = w[_SZ, k]
            rx = w[_XB, k] - xa + s0 * c00 + s1 * c10 + s2 * c20
            ry = w[_YB, k] - ya + s0 * c01 + s1 * c11 + s2 * c21
            rz = w[_ZB, k] - za + s0 * c02 + s1 * c12 + s2 * c22
            d2 = rx * rx + ry * ry + rz * rz
            inside = d2 < cut2 and w[_OK, k] != zero
            ok, inv, d = _masked_distance(d2, inside, masked_d2, one, zero)
            qb = kq * w[_QB, k]
            f, df = coulomb_terms(d, d2, inv, c1, c2, c3)
            sg = half * (sa + w[_SB, k])
            ep = lj_on * math.sqrt(ea * w[_EB, k])
            energy, g, x6, x12, sw = _pair_energy(ok, qa * qb, sg, ep, f, df, inv, d, rs,
                                                  inv_width, lit)
            acc_e += energy
            fx = g * rx  # dE/dr_ij; the receiver moves with -r_ij
            fy = g * ry
            fz = g * rz
            w[_FX, k] = fx
            w[_FY, k] = fy
            w[_FZ, k] = fz
            gx -= fx
            gy -= fy
            gz -= fz
            v00 += s0 * fx
            v01 += s0 * fy
            v02 += s0 * fz
            v10 += s1 * fx
            v11 += s1 * fy
            v12 += s1 * fz
            v20 += s2 * fx
            v21 += s2 * fy
            v22 += s2 * fz
            if param_grads:
                # selects, not products: epsilon = 0 gives NaN on purpose (sqrt rule), but only
                # for pairs that count
                ds = (half * ep * four * (twelve * x12 - six * x6) / sg * sw
                      if inside and lj and sg != zero else zero)
                de = four * (x12 - x6) * sw * half / ep if inside and lj else zero
                acc_q += qb * f if inside else zero
                acc_s += ds
                acc_eps += de * w[_EB, k]
                w[_PQ, k] = kc * qa * f if inside else zero
                w[_PS, k] = ds
                w[_PE, k] = de * ea
        return (acc_e, gx, gy, gz, v00, v01, v02, v10, v11, v12, v20, v21, v22, acc_q, acc_s,
                acc_eps)

    return pair_loop


_pair_loop_polynomial = _make_pair_loop(_coulomb_polynomial)
_pair_loop_ewald_real = _make_pair_loop(_coulomb_ewald_real)


@njit(parallel=True, cache=True, error_model="numpy", fastmath=_FAST)
def _rows(pos, atoms, cells, atom_system, j, shifts, ptr, excl_ptr, excl_j, q, sig, eps, cutoff,
          switch_distance, coulomb, lj, k_rf, c_rf, alpha, kc, param_grads, half, chunk_ptr,
          max_row, gbuf, e_atom, g_pos, vir_atom, g_q, g_sig, g_eps):
    """Rows of receivers, chunk by chunk: gather, arithmetic, then (half lists) the senders'
    shares into the chunk's buffer."""
    dt = pos.dtype
    zero = dt.type(0.0)
    one = dt.type(1.0)
    cut2 = cutoff * cutoff
    masked_d2 = cut2 if cut2 < np.inf else one  # any finite distance: its weight is 0
    inv_width = one / (cutoff - switch_distance) if switch_distance >= zero else zero
    rs = switch_distance if switch_distance >= zero else zero
    share = one if half else dt.type(0.5)  # a full list holds each pair twice
    kq = kc if coulomb != 0 else zero  # no Coulomb: charges count as 0
    krf = k_rf if coulomb == 2 else zero  # plain Coulomb is the polynomial with krf = crf = 0
    crf = c_rf if coulomb == 2 else zero
    alpha2 = alpha * alpha
    two_alpha_over_sqrt_pi = dt.type(_TWO_OVER_SQRT_PI) * alpha
    for c in prange(chunk_ptr.shape[0] - 1):
        w = np.empty((_SCRATCH_ROWS, max_row), dt)
        for a in range(chunk_ptr[c], chunk_ptr[c + 1]):
            p0 = ptr[a]
            m = ptr[a + 1] - p0
            _gather(atoms, j, shifts, p0, m, excl_j, excl_ptr[a], excl_ptr[a + 1], w)
            cell = cells[atom_system[a]]
            if coulomb == 3:
                acc = _pair_loop_ewald_real(
                    w, m, cell, pos[a, 0], pos[a, 1], pos[a, 2], q[a], sig[a], eps[a], cut2,
                    masked_d2, kq, kc, alpha, alpha2, two_alpha_over_sqrt_pi, rs, inv_width, lj,
                    param_grads)
            else:
                acc = _pair_loop_polynomial(
                    w, m, cell, pos[a, 0], pos[a, 1], pos[a, 2], q[a], sig[a], eps[a], cut2,
                    masked_d2, kq, kc, krf, crf, zero, rs, inv_width, lj, param_grads)
            if half and param_grads:  # the sender's shares go to this chunk's buffer
                for k in range(m):
                    b = j[p0 + k]
                    gbuf[c, b, 0] += w[_FX, k]
                    gbuf[c, b, 1] += w[_FY, k]
                    gbuf[c, b, 2] += w[_FZ, k]
                    gbuf[c, b, 3] += w[_PQ, k] if coulomb != 0 else zero
                    gbuf[c, b, 4] += w[_PS, k]
                    gbuf[c, b, 5] += w[_PE, k]
            elif half:
                for k in range(m):
                    b = j[p0 + k]
                    gbuf[c, b, 0] += w[_FX, k]
                    gbuf[c, b, 1] += w[_FY, k]
                    gbuf[c, b, 2] += w[_FZ, k]
            e_atom[a] = share * acc[0]
            g_pos[a, 0] = acc[1]
            g_pos[a, 1] = acc[2]
            g_pos[a, 2] = acc[3]
            for u in range(3):
                for v in range(3):
                    vir_atom[a, u, v] = share * acc[4 + 3 * u + v]
            if param_grads:
                g_q[a] = acc[13] if coulomb != 0 else zero
                g_sig[a] = acc[14]
                g_eps[a] = acc[15]


@njit(parallel=True, cache=True)
def _add_chunks(gbuf, param_grads, g_pos, g_q, g_sig, g_eps):
    """Half lists: add the chunks' sender buffers, in chunk order (deterministic)."""
    for a in prange(g_pos.shape[0]):
        for c in range(gbuf.shape[0]):
            g_pos[a, 0] += gbuf[c, a, 0]
            g_pos[a, 1] += gbuf[c, a, 1]
            g_pos[a, 2] += gbuf[c, a, 2]
            if param_grads:
                g_q[a] += gbuf[c, a, 3]
                g_sig[a] += gbuf[c, a, 4]
                g_eps[a] += gbuf[c, a, 5]


@njit(cache=True)
def _per_system(atom_system, e_atom, vir_atom, energy, g_cells):
    """Serial, ordered sums per system: deterministic."""
    for a in range(e_atom.shape[0]):
        s = atom_system[a]
        energy[s] += e_atom[a]
        for u in range(3):
            for v in range(3):
                g_cells[s, u, v] += vir_atom[a, u, v]


# Rows are split into this many chunks of about equal pair counts, independent of the thread
# count, so that results do not depend on it; with a half list each chunk owns an [N, 3]
# sender buffer (16 x N x 3 floats, x 6 with parameter gradients: 7-13 MB at 35,000 atoms,
# against 210 MB of list).
NUM_CHUNKS = 16


def nonbonded(positions, cells, atom_system, i, j, shifts, ptr, excl_ptr, excl_j, charges,
              sigma, epsilon, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha,
              coulomb_constant, param_grads, half):
    """Launcher; see README.md for the signature. Deterministic (any thread count)."""
    n = positions.shape[0]
    nsys = cells.shape[0]
    dtype = positions.dtype
    pos = positions.detach().contiguous().numpy()
    dt = pos.dtype
    e_atom = np.zeros(n, dt)
    g_pos = np.zeros((n, 3), dt)
    vir = np.zeros((n, 3, 3), dt)
    g_q = np.zeros(n, dt)
    g_s = np.zeros(n, dt)
    g_e = np.zeros(n, dt)
    ptr_np = ptr.contiguous().numpy()
    nchunks = NUM_CHUNKS if n >= NUM_CHUNKS else 1
    targets = np.linspace(0, ptr_np[-1], nchunks + 1)[1:-1]
    chunk_ptr = np.concatenate([[0], np.searchsorted(ptr_np[1:], targets), [n]]).astype(np.int64)
    # senders' shares of a half list: force, then (charge, sigma, epsilon) gradients in the same
    # 24-byte record, so that one scattered write serves both (README, Tuning)
    gbuf = np.zeros((nchunks if half else 0, n, 6 if param_grads else 3), dt)
    if n:
        q = charges.detach().contiguous().numpy()
        sig = sigma.detach().contiguous().numpy()
        eps = epsilon.detach().contiguous().numpy()
        atoms = np.empty((n, 8), dt)
        _pack_atoms(pos, q, sig, eps, atoms)
        _rows(pos, atoms, cells.detach().contiguous().numpy(), atom_system.contiguous().numpy(),
              j.contiguous().numpy(), shifts.contiguous().numpy(), ptr_np,
              excl_ptr.contiguous().numpy(), excl_j.contiguous().numpy(), q, sig, eps,
              dt.type(cutoff), dt.type(switch_distance),
              int(coulomb), bool(lj), dt.type(k_rf), dt.type(c_rf), dt.type(alpha),
              dt.type(coulomb_constant), bool(param_grads), bool(half), chunk_ptr,
              max(1, int((ptr_np[1:] - ptr_np[:-1]).max())), gbuf,
              e_atom, g_pos, vir, g_q, g_s, g_e)
        if half:
            _add_chunks(gbuf, bool(param_grads), g_pos, g_q, g_s, g_e)
    energy = np.zeros(nsys, dt)
    g_cells = np.zeros((nsys, 3, 3), dt)
    _per_system(atom_system.contiguous().numpy(), e_atom, vir, energy, g_cells)
    out = (energy, g_pos, g_cells, g_q, g_s, g_e)
    return tuple(torch.from_numpy(x).to(dtype) for x in out)


def nonbonded_clusters(positions, cells, slot_atom, slot_wrap, cluster_ptr, entry_j, entry_shift,
                       entry_mask, charges, sigma, epsilon, cutoff, switch_distance, coulomb, lj,
                       k_rf, c_rf, alpha, coulomb_constant):
    """Launcher of the cluster-pair path (cpu_clusters.py)."""
    from fastff.kernels.nonbonded import cpu_clusters

    return cpu_clusters.nonbonded_clusters(
        positions, cells, slot_atom, slot_wrap, cluster_ptr, entry_j, entry_shift, entry_mask,
        charges, sigma, epsilon, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha,
        coulomb_constant)
