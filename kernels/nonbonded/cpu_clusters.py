"""Cluster-pair nonbonded path for CPU (numba): the layout of OpenMM's and GROMACS's CPU kernels.

Atoms are sorted into columns of a grid (x, y), by z within a column, and cut into clusters of
``LANES = 8`` consecutive atoms (a column's last cluster is padded). Each cluster keeps a list
of partner atoms (*entries*) within ``rlist`` of its bounding box, each with the partner's
periodic image and an 8-bit mask of the lanes it pairs with (real lane, each unordered pair
once, not excluded). The kernel loads a partner once and evaluates it against the 8 lanes in
one vectorized loop (one AVX2 float32 instruction per operation), instead of one gather per
pair; the partner's force is summed over lanes and scattered once.

Periodic images: positions are wrapped into the box once per build (``slot_wrap``, fixed until
the next build) and every entry stores the image nearest to its cluster. This is exact when the
box is orthorhombic and every box length exceeds ``2 (rlist + cluster radius)`` (then a partner
has one image within reach of a cluster); :func:`build` returns None otherwise, and callers
use the general pair list. The build makes one pass over atoms within cluster-level bounds.
kernels/nonbonded/README.md ("Cluster-pair path", "Tuning") gives the details and measurements.

Deterministic: clusters are split into a fixed number of chunks with private partner-force
buffers, added in chunk order (as in cpu_numba.py). Parameter gradients are not computed here
(forces, energy and cell gradient only); the pair-list path computes them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

import fastff.kernels.cpu_threads  # noqa: F401  (numba's OpenMP layer first)
from fastff.kernels.nonbonded.cpu_numba import (
    _FAST,
    NUM_CHUNKS,
    _constants,
    _coulomb_ewald_real,
    _coulomb_polynomial,
    _masked_distance,
    _pair_energy,
)

LANES = 8


# ---------------------------------------------------------------------------------------------
# Build


def _column_grid(wrapped: np.ndarray, lengths: np.ndarray, lo: np.ndarray, density: float):
    """Columns about as wide as a cluster of LANES atoms is tall (compact clusters)."""
    width = (LANES / max(density, 1e-12)) ** (1.0 / 3.0)
    nx = max(1, int(lengths[0] / width))
    ny = max(1, int(lengths[1] / width))
    cx = np.minimum(((wrapped[:, 0] - lo[0]) * (nx / lengths[0])).astype(np.int64), nx - 1)
    cy = np.minimum(((wrapped[:, 1] - lo[1]) * (ny / lengths[1])).astype(np.int64), ny - 1)
    return nx, ny, np.maximum(cx, 0) * ny + np.maximum(cy, 0)


@njit(cache=True)
def _slots(order, column, num_columns):
    """Slot of every atom (clusters of LANES, a column's last one padded), the clusters of each
    column (CSR) and the column of each cluster."""
    n = order.shape[0]
    counts = np.zeros(num_columns, np.int64)
    for a in range(n):
        counts[column[a]] += 1
    col_cluster = np.zeros(num_columns + 1, np.int64)
    for c in range(num_columns):
        col_cluster[c + 1] = col_cluster[c] + (counts[c] + LANES - 1) // LANES
    slot_atom = -np.ones(col_cluster[num_columns] * LANES, np.int64)
    cluster_col = np.empty(col_cluster[num_columns], np.int64)
    for c in range(num_columns):
        cluster_col[col_cluster[c]:col_cluster[c + 1]] = c
    filled = np.zeros(num_columns, np.int64)
    for k in range(n):
        a = order[k]
        c = column[a]
        slot_atom[col_cluster[c] * LANES + filled[c]] = a
        filled[c] += 1
    return slot_atom, col_cluster, cluster_col


@njit(cache=True)
def _boxes(xw, slot_atom, num_clusters):
    """Bounding box (lo, hi) of every cluster's real atoms, in wrapped coordinates."""
    lo = np.full((num_clusters, 3), np.inf)
    hi = np.full((num_clusters, 3), -np.inf)
    for s in range(slot_atom.shape[0]):
        a = slot_atom[s]
        if a >= 0:
            c = s // LANES
            for d in range(3):
                lo[c, d] = min(lo[c, d], xw[a, d])
                hi[c, d] = max(hi[c, d], xw[a, d])
    return lo, hi


@njit(inline="always")
def _box_distance2(lo, hi, c, x, y, z):
    dx = max(lo[c, 0] - x, 0.0, x - hi[c, 0])
    dy = max(lo[c, 1] - y, 0.0, y - hi[c, 1])
    dz = max(lo[c, 2] - z, 0.0, z - hi[c, 2])
    return dx * dx + dy * dy + dz * dz


@njit(inline="always")
def _gap(a0, a1, b0, b1, length, periodic):
    """Distance between intervals [a0, a1] and [b0, b1], over periodic images if periodic."""
    g = max(b0 - a1, a0 - b1, 0.0)
    if periodic:
        g = min(g, max(b0 + length - a1, a0 - b1 - length, 0.0),
                max(b0 - length - a1, a0 - b1 + length, 0.0))
    return g


@njit(inline="always")
def _atom_image(x, centre, length, periodic):
    """The lattice shift (in box lengths) that brings coordinate x nearest to ``centre``."""
    if not periodic:
        return 0
    return -int(math.floor((x - centre) / length + 0.5))


@njit(inline="always")
def _cluster_image(lo, hi, cj, d, centre, lengths, periodic):
    """(shift, uniform) along axis d for cluster cj seen from ``centre``: the shift of its
    centre, and whether every atom of cj has that same nearest image (cj lies inside the open
    half-box around ``centre`` with a margin, so _atom_image agrees for all of them)."""
    if not periodic[d]:
        return 0, True
    mid = 0.5 * (lo[cj, d] + hi[cj, d])
    shift = _atom_image(mid, centre, lengths[d], True)
    reach = abs(mid + shift * lengths[d] - centre) + 0.5 * (hi[cj, d] - lo[cj, d])
    return shift, reach < (0.5 - 1e-9) * lengths[d]


@njit(parallel=True, cache=True)
def _entries(fill, xs, slot_atom, col_cluster, cluster_col, nx, ny, reach_x, reach_y, lengths,
             periodic, rlist, lo, hi, excl_ptr, excl_j, chunk_ptr, count, entry_ptr, entry_j,
             entry_shift, entry_mask):
    """Bound (fill = False) or write (fill = True) every cluster's entries: partner slots j of
    clusters J >= I within rlist of I's box, with their nearest image and lane mask.

    The bound pass tests clusters only: count[I] = the atoms of the clusters J whose boxes come
    within rlist of I's (a cheap upper bound on I's entries). The fill pass tests atoms and
    writes the entries of chunk c's clusters one after another from entry_ptr[c] (the prefix
    sums of the chunks' bounds), setting count[I] to the number of I's; build() then joins the
    chunks' runs. An entry whose lanes are all excluded keeps mask 0;
    exclusions are looked up only for partners stamped as excluded by some lane of the
    cluster."""
    r2 = rlist * rlist
    for c in prange(chunk_ptr.shape[0] - 1):
        stamp = np.zeros(excl_ptr.shape[0] - 1, np.int64)  # ci + 1: some lane of ci excludes b
        k = entry_ptr[c] if fill else 0
        for ci in range(chunk_ptr[c], chunk_ptr[c + 1]):
            start = k if fill else 0
            k = start
            count[ci] = 0
            if slot_atom[ci * LANES] < 0:
                continue
            real = 0
            for li in range(LANES):
                a = slot_atom[ci * LANES + li]
                if a >= 0:
                    real |= 1 << li
                    if fill:
                        for e in range(excl_ptr[a], excl_ptr[a + 1]):
                            stamp[excl_j[e]] = ci + 1
            col = cluster_col[ci]
            gx0 = col // ny
            gy0 = col % ny
            mx = min(2 * reach_x + 1, nx)
            my = min(2 * reach_y + 1, ny)
            cen0 = 0.5 * (lo[ci, 0] + hi[ci, 0])
            cen1 = 0.5 * (lo[ci, 1] + hi[ci, 1])
            cen2 = 0.5 * (lo[ci, 2] + hi[ci, 2])
            for ox in range(mx):
                gx = gx0 - reach_x + ox if mx < nx else ox
                if not periodic[0] and (gx < 0 or gx >= nx):
                    continue
                gx %= nx
                for oy in range(my):
                    gy = gy0 - reach_y + oy if my < ny else oy
                    if not periodic[1] and (gy < 0 or gy >= ny):
                        continue
                    gy %= ny
                    cc = gx * ny + gy
                    for cj in range(max(col_cluster[cc], ci), col_cluster[cc + 1]):
                        gap2 = 0.0  # a lower bound on the distance of J's atoms to I's box
                        for d in range(3):
                            g = _gap(lo[ci, d], hi[ci, d], lo[cj, d], hi[cj, d], lengths[d],
                                     periodic[d])
                            gap2 += g * g
                        if gap2 >= r2:
                            continue
                        if not fill:
                            for lj in range(1 if cj == ci else 0, LANES):
                                if slot_atom[cj * LANES + lj] < 0:
                                    break
                                k += 1
                            continue
                        # one image for all of J's atoms unless J straddles half a box length
                        # from I's centre (then each atom finds its own)
                        c0, u0 = _cluster_image(lo, hi, cj, 0, cen0, lengths, periodic)
                        c1, u1 = _cluster_image(lo, hi, cj, 1, cen1, lengths, periodic)
                        c2, u2 = _cluster_image(lo, hi, cj, 2, cen2, lengths, periodic)
                        uniform = u0 and u1 and u2
                        for lj in range(1 if cj == ci else 0, LANES):  # lane 0 pairs with none
                            sj = cj * LANES + lj
                            b = slot_atom[sj]
                            if b < 0:
                                break
                            if uniform:
                                s0, s1, s2 = c0, c1, c2
                            else:
                                s0 = _atom_image(xs[sj, 0], cen0, lengths[0], periodic[0])
                                s1 = _atom_image(xs[sj, 1], cen1, lengths[1], periodic[1])
                                s2 = _atom_image(xs[sj, 2], cen2, lengths[2], periodic[2])
                            x = xs[sj, 0] + s0 * lengths[0]
                            y = xs[sj, 1] + s1 * lengths[1]
                            z = xs[sj, 2] + s2 * lengths[2]
                            if _box_distance2(lo, hi, ci, x, y, z) >= r2:
                                continue
                            # lanes before j in its own cluster; all lanes of later clusters
                            mask = real & ((1 << lj) - 1) if cj == ci else real
                            if stamp[b] == ci + 1:
                                for li in range(LANES):
                                    a = slot_atom[ci * LANES + li]
                                    if (mask >> li) & 1:
                                        for e in range(excl_ptr[a], excl_ptr[a + 1]):
                                            if excl_j[e] == b:
                                                mask &= ~(1 << li)
                                                break
                            entry_j[k] = sj
                            entry_shift[k, 0] = s0
                            entry_shift[k, 1] = s1
                            entry_shift[k, 2] = s2
                            entry_mask[k] = mask
                            k += 1
            count[ci] = k - start


def build(positions: np.ndarray, box: np.ndarray | None, rlist: float, excl_ptr: np.ndarray,
          excl_j: np.ndarray):
    """Clusters and entries for float64 ``positions`` [N, 3]; ``box`` [3, 3] or None.

    Returns None when the cluster layout is not exact for this box (not orthorhombic, or a box
    length <= 2 (rlist + cluster radius)); else a dict of numpy arrays: slot_atom [S] (-1:
    padding), slot_wrap int32 [S, 3] (box vectors subtracted from each slot's position),
    cluster_ptr [C + 1], entry_j int32 [E] (slot), entry_shift int32 [E, 3], entry_mask int32
    [E].
    """
    n = positions.shape[0]
    periodic = np.zeros(3, np.bool_)
    if box is not None:
        if np.count_nonzero(box - np.diag(np.diag(box))) != 0:
            return None
        lengths = np.diag(box).astype(np.float64)
        periodic[:] = True
        wrap = np.floor(positions / lengths).astype(np.int64)
        xw = positions - wrap * lengths
        lo = np.zeros(3)
    else:
        wrap = np.zeros((n, 3), np.int64)
        xw = positions
        lo = positions.min(0) if n else np.zeros(3)
        lengths = np.maximum((positions.max(0) - lo) if n else np.ones(3), 1e-6)
    volume = float(np.prod(lengths))
    nx, ny, column = _column_grid(xw, lengths, lo, n / volume)
    order = np.lexsort((xw[:, 2], column))
    slot_atom, col_cluster, cluster_col = _slots(order, column, nx * ny)
    num_clusters = slot_atom.shape[0] // LANES
    blo, bhi = _boxes(xw, slot_atom, num_clusters)
    radius = 0.5 * float(np.sqrt(((bhi - blo) ** 2).sum(1)).max()) if num_clusters else 0.0
    if box is not None and float(lengths.min()) <= 2.0 * (rlist + radius):
        return None
    # a cluster's atoms lie in its column: partners within rlist lie this many columns away
    reach_x = int(math.ceil(rlist * nx / lengths[0])) + 1
    reach_y = int(math.ceil(rlist * ny / lengths[1])) + 1
    count = np.zeros(num_clusters, np.int64)
    ptr = np.zeros(num_clusters + 1, np.int64)
    empty_i = np.zeros(0, np.int32)
    chunks = np.linspace(0, num_clusters, min(NUM_CHUNKS, max(1, num_clusters)) + 1
                         ).astype(np.int64)
    # positions in slot order: a cluster's partners are read as contiguous runs of 8 atoms
    xs = np.zeros((slot_atom.shape[0], 3))
    real = slot_atom >= 0
    xs[real] = xw[slot_atom[real]]
    args = (xs, slot_atom, col_cluster, cluster_col, nx, ny, reach_x, reach_y, lengths, periodic,
            float(rlist), blo, bhi, excl_ptr, excl_j, chunks)
    # one pass over atoms: fill within cluster-level bounds per chunk, then join the chunks'
    # runs (an exact count pass over atoms would cost as much as the fill: README, Tuning)
    _entries(False, *args, count, ptr, empty_i, np.zeros((0, 3), np.int32),
             np.zeros(0, np.int32))
    bounds = np.cumsum(count)
    chunk_base = np.concatenate([[0], bounds[chunks[1:] - 1]]) if num_clusters else chunks * 0
    bound = int(chunk_base[-1])
    tmp_j = np.empty(bound, np.int32)
    tmp_shift = np.empty((bound, 3), np.int32)
    tmp_mask = np.empty(bound, np.int32)
    _entries(True, *args, count, chunk_base, tmp_j, tmp_shift, tmp_mask)
    ptr[1:] = np.cumsum(count)
    runs = [slice(chunk_base[c], chunk_base[c] + ptr[chunks[c + 1]] - ptr[chunks[c]])
            for c in range(len(chunks) - 1)]
    entry_j = np.concatenate([tmp_j[r] for r in runs])
    entry_shift = np.concatenate([tmp_shift[r] for r in runs])
    entry_mask = np.concatenate([tmp_mask[r] for r in runs])
    slot_wrap = np.zeros((slot_atom.shape[0], 3), np.int32)
    slot_wrap[real] = wrap[slot_atom[real]]
    return dict(slot_atom=slot_atom, slot_wrap=slot_wrap, cluster_ptr=ptr, entry_j=entry_j,
                entry_shift=entry_shift, entry_mask=entry_mask)


# ---------------------------------------------------------------------------------------------
# Kernel

# Packing and gathering run serially below this many slots (3,000 atoms: 30-50 us each with 2
# threads, 60-90 us with one): beside a busy process each parallel region waited 2-3 ms for a
# descheduled thread (README.md, Tuning).
SERIAL_SLOTS_BELOW = 8192


@njit(cache=True, inline="always")
def _pack_slot(s, pos, cell, q, sig, eps, slot_atom, slot_wrap, rec):
    """rec[s] = (x, y, z, q, sigma / 2, sqrt(epsilon), 0, 0) of slot s with the build's wrap
    applied; zero for padding."""
    a = slot_atom[s]
    if a < 0:
        for d in range(8):
            rec[s, d] = 0.0
        return
    w0 = slot_wrap[s, 0]
    w1 = slot_wrap[s, 1]
    w2 = slot_wrap[s, 2]
    for d in range(3):
        rec[s, d] = pos[a, d] - (w0 * cell[0, d] + w1 * cell[1, d] + w2 * cell[2, d])
    rec[s, 3] = q[a]
    rec[s, 4] = 0.5 * sig[a]  # combining rules become a sum and a product per pair
    rec[s, 5] = math.sqrt(eps[a])
    rec[s, 6] = 0.0
    rec[s, 7] = 0.0


@njit(parallel=True, cache=True)
def _pack_slots(pos, cell, q, sig, eps, slot_atom, slot_wrap, rec):
    for s in prange(slot_atom.shape[0]):
        _pack_slot(s, pos, cell, q, sig, eps, slot_atom, slot_wrap, rec)


@njit(cache=True)
def _pack_slots_serial(pos, cell, q, sig, eps, slot_atom, slot_wrap, rec):
    for s in range(slot_atom.shape[0]):
        _pack_slot(s, pos, cell, q, sig, eps, slot_atom, slot_wrap, rec)


# Rows of the per-chunk scratch (each as long as the longest entry list): the partners' imaged
# positions and parameters, their shifts, and their accumulated forces.
_XJ, _YJ, _ZJ, _QJ, _SJ, _EJ, _S0, _S1, _S2, _FX, _FY, _FZ = range(12)
_SCRATCH_ROWS = 12


def _make_cluster_loop(coulomb_terms):
    """All entries of one cluster against its lanes, for one Coulomb form (see cpu_numba): the
    partners are gathered once, then each lane runs a branch-free loop over them that LLVM
    vectorizes (8 partners per AVX2 float32 instruction), then each partner's force is
    scattered once."""

    @njit(fastmath=_FAST, error_model="numpy")
    def cluster_loop(rec, w, wm, ci, e0, e1, entry_j, entry_shift, entry_mask, cell, cut2,
                     masked_d2, kq, c1, c2, c3, rs, inv_width, lj, c, gbuf, g_slot, slot_atom):
        dt = rec.dtype
        lit = _constants(dt)
        zero, one = lit[0], lit[1]
        lj_on = one if lj else zero
        m = e1 - e0
        for k in range(m):
            e = e0 + k
            sj = entry_j[e]
            s0 = dt.type(entry_shift[e, 0])
            s1 = dt.type(entry_shift[e, 1])
            s2 = dt.type(entry_shift[e, 2])
            w[_XJ, k] = rec[sj, 0] + s0 * cell[0, 0] + s1 * cell[1, 0] + s2 * cell[2, 0]
            w[_YJ, k] = rec[sj, 1] + s0 * cell[0, 1] + s1 * cell[1, 1] + s2 * cell[2, 1]
            w[_ZJ, k] = rec[sj, 2] + s0 * cell[0, 2] + s1 * cell[1, 2] + s2 * cell[2, 2]
            w[_QJ, k] = kq * rec[sj, 3]
            w[_SJ, k] = rec[sj, 4]
            w[_EJ, k] = lj_on * rec[sj, 5]
            w[_S0, k] = s0
            w[_S1, k] = s1
            w[_S2, k] = s2
            w[_FX, k] = zero
            w[_FY, k] = zero
            w[_FZ, k] = zero
            wm[k] = entry_mask[e]
        acc_e = zero
        for li in range(LANES):
            si = ci * LANES + li
            if slot_atom[si] < 0:
                break  # padding comes last
            xi = rec[si, 0]
            yi = rec[si, 1]
            zi = rec[si, 2]
            qi = rec[si, 3]
            sgi = rec[si, 4]
            epi = rec[si, 5]
            gx = gy = gz = zero
            for k in range(m):  # vectorized over partners
                rx = w[_XJ, k] - xi
                ry = w[_YJ, k] - yi
                rz = w[_ZJ, k] - zi
                d2 = rx * rx + ry * ry + rz * rz
                inside = d2 < cut2 and ((wm[k] >> li) & 1) != 0
                ok, inv, d = _masked_distance(d2, inside, masked_d2, one, zero)
                qq = qi * w[_QJ, k]
                f, df = coulomb_terms(d, d2, inv, c1, c2, c3)
                energy, g, _, _, _ = _pair_energy(ok, qq, sgi + w[_SJ, k], epi * w[_EJ, k], f,
                                                  df, inv, d, rs, inv_width, lit)
                acc_e += energy
                fx = g * rx
                fy = g * ry
                fz = g * rz
                w[_FX, k] += fx
                w[_FY, k] += fy
                w[_FZ, k] += fz
                gx -= fx
                gy -= fy
                gz -= fz
            g_slot[si, 0] = gx
            g_slot[si, 1] = gy
            g_slot[si, 2] = gz
        v00 = v01 = v02 = v10 = v11 = v12 = v20 = v21 = v22 = zero
        for k in range(m):
            sj = entry_j[e0 + k]
            fx = w[_FX, k]
            fy = w[_FY, k]
            fz = w[_FZ, k]
            gbuf[c, sj, 0] += fx
            gbuf[c, sj, 1] += fy
            gbuf[c, sj, 2] += fz
            s0 = w[_S0, k]
            s1 = w[_S1, k]
            s2 = w[_S2, k]
            v00 += s0 * fx
            v01 += s0 * fy
            v02 += s0 * fz
            v10 += s1 * fx
            v11 += s1 * fy
            v12 += s1 * fz
            v20 += s2 * fx
            v21 += s2 * fy
            v22 += s2 * fz
        return acc_e, v00, v01, v02, v10, v11, v12, v20, v21, v22

    return cluster_loop


_cluster_loop_polynomial = _make_cluster_loop(_coulomb_polynomial)
_cluster_loop_ewald_real = _make_cluster_loop(_coulomb_ewald_real)


@njit(parallel=True, cache=True)
def _clusters(rec, cell, slot_atom, cluster_ptr, entry_j, entry_shift, entry_mask, chunk_ptr,
              max_entries, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha, kc, gbuf,
              g_slot, e_chunk, v_chunk):
    dt = rec.dtype
    zero = dt.type(0.0)
    one = dt.type(1.0)
    cut2 = cutoff * cutoff
    masked_d2 = cut2 if cut2 < np.inf else one
    inv_width = one / (cutoff - switch_distance) if switch_distance >= zero else zero
    rs = switch_distance if switch_distance >= zero else zero
    kq = kc if coulomb != 0 else zero
    krf = k_rf if coulomb == 2 else zero
    crf = c_rf if coulomb == 2 else zero
    alpha2 = alpha * alpha
    two_alpha_over_sqrt_pi = dt.type(2.0 / math.sqrt(math.pi)) * alpha
    for c in prange(chunk_ptr.shape[0] - 1):
        # typed as one int: a prange index is int64 in the parfor and uint64 in its gufunc,
        # and each type compiles the cluster loops again (1.8 s of a cold start)
        chunk = np.int64(c)
        w = np.empty((_SCRATCH_ROWS, max_entries), dt)
        wm = np.empty(max_entries, np.int32)
        e_sum = zero
        v = np.zeros(9, dt)
        for ci in range(chunk_ptr[c], chunk_ptr[c + 1]):
            e0 = cluster_ptr[ci]
            e1 = cluster_ptr[ci + 1]
            if coulomb == 3:
                acc = _cluster_loop_ewald_real(rec, w, wm, ci, e0, e1, entry_j, entry_shift,
                                               entry_mask, cell, cut2, masked_d2, kq, alpha,
                                               alpha2, two_alpha_over_sqrt_pi, rs, inv_width,
                                               lj, chunk, gbuf, g_slot, slot_atom)
            else:
                acc = _cluster_loop_polynomial(rec, w, wm, ci, e0, e1, entry_j, entry_shift,
                                               entry_mask, cell, cut2, masked_d2, kq, krf, crf,
                                               zero, rs, inv_width, lj, chunk, gbuf, g_slot,
                                               slot_atom)
            e_sum += acc[0]
            v[0] += acc[1]
            v[1] += acc[2]
            v[2] += acc[3]
            v[3] += acc[4]
            v[4] += acc[5]
            v[5] += acc[6]
            v[6] += acc[7]
            v[7] += acc[8]
            v[8] += acc[9]
        e_chunk[c] = e_sum
        for k in range(9):
            v_chunk[c, k] = v[k]


@njit(cache=True, inline="always")
def _gather_slot(s, g_slot, gbuf, slot_atom, g_pos):
    """Slot s's atom gradient: its lane's share plus the chunks' partner shares, in chunk
    order."""
    a = slot_atom[s]
    if a < 0:
        return
    for d in range(3):
        acc = g_slot[s, d]
        for c in range(gbuf.shape[0]):
            acc += gbuf[c, s, d]
        g_pos[a, d] = acc


@njit(parallel=True, cache=True)
def _gather_forces(g_slot, gbuf, slot_atom, g_pos):
    for s in prange(slot_atom.shape[0]):
        _gather_slot(s, g_slot, gbuf, slot_atom, g_pos)


@njit(cache=True)
def _gather_forces_serial(g_slot, gbuf, slot_atom, g_pos):
    for s in range(slot_atom.shape[0]):
        _gather_slot(s, g_slot, gbuf, slot_atom, g_pos)


def nonbonded_clusters(positions, cells, slot_atom, slot_wrap, cluster_ptr, entry_j, entry_shift,
                       entry_mask, charges, sigma, epsilon, cutoff, switch_distance, coulomb, lj,
                       k_rf, c_rf, alpha, coulomb_constant):
    """Launcher (see README.md): energy [1], grad_positions [N, 3], grad_cells [1, 3, 3]."""
    dtype = positions.dtype
    pos = positions.detach().contiguous().numpy()
    dt = pos.dtype
    cell = cells.detach()[0].contiguous().numpy()
    n = pos.shape[0]
    slot_atom_np = slot_atom.numpy()
    slots = slot_atom_np.shape[0]
    ptr = cluster_ptr.numpy()
    num_clusters = slots // LANES
    nchunks = min(NUM_CHUNKS, max(1, num_clusters))
    targets = np.linspace(0, ptr[-1], nchunks + 1)[1:-1]
    chunk_ptr = np.concatenate([[0], np.searchsorted(ptr[1:], targets), [num_clusters]]
                               ).astype(np.int64)
    rec = np.empty((slots, 8), dt)
    wrap = slot_wrap.numpy()
    serial = slots < SERIAL_SLOTS_BELOW
    pack = _pack_slots_serial if serial else _pack_slots
    pack(pos, cell, charges.detach().contiguous().numpy(), sigma.detach().contiguous().numpy(),
         epsilon.detach().contiguous().numpy(), slot_atom_np, wrap, rec)
    gbuf = np.zeros((nchunks, slots, 3), dt)
    g_slot = np.zeros((slots, 3), dt)
    e_chunk = np.zeros(nchunks, dt)
    v_chunk = np.zeros((nchunks, 9), dt)
    if num_clusters:
        max_entries = max(1, int((ptr[1:] - ptr[:-1]).max()))
        _clusters(rec, cell, slot_atom_np, ptr, entry_j.numpy(), entry_shift.numpy(),
                  entry_mask.numpy(), chunk_ptr, max_entries, dt.type(cutoff),
                  dt.type(switch_distance), int(coulomb), bool(lj), dt.type(k_rf),
                  dt.type(c_rf), dt.type(alpha), dt.type(coulomb_constant), gbuf, g_slot,
                  e_chunk, v_chunk)
    g_pos = np.zeros((n, 3), dt)
    (_gather_forces_serial if serial else _gather_forces)(g_slot, gbuf, slot_atom_np, g_pos)
    # dE/dC: partner images (S C) plus the build's wrap (-w C) of every slot
    g_cell = v_chunk.sum(0).reshape(3, 3)
    real = slot_atom_np >= 0
    g_slot_total = np.zeros((slots, 3), dt)
    g_slot_total[real] = g_pos[slot_atom_np[real]]
    g_cell = g_cell - wrap.astype(dt).T @ g_slot_total
    energy = np.array([e_chunk.sum()], dt)
    return (torch.from_numpy(energy).to(dtype), torch.from_numpy(g_pos).to(dtype),
            torch.from_numpy(np.ascontiguousarray(g_cell, dt)[None]).to(dtype))
