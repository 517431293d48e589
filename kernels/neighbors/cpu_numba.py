"""Neighbor lists on CPU: a parallel cell list in numba, two passes (count, then fill).

Algorithm: the textbook linked-cell method (Allen & Tildesley, ch. 5) generalised to triclinic
cells, cells smaller than the cutoff, mixed periodicity and batches. Atoms are binned in
fractional coordinates of a per-system frame, counting-sorted by bin so that candidate positions
are read contiguously, and each centre atom scans the bins within its reach. Counting first and
filling second costs one extra distance pass but gives exact output sizes: no capacity, no
truncation, no per-pair temporaries, and rows sorted by centre atom without any sort. Both passes
are ``prange`` loops over atoms, deterministic (each atom writes only its own row). Also here:
pair vectors and their adjoint, the mirror index, and compaction to a smaller cutoff.
kernels/neighbors/README.md gives the maths and the "Tuning" table behind the constants.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

import fastff.kernels.cpu_threads  # noqa: F401  (numba's OpenMP layer first)
from fastff.kernels._runtime import memory

# Bins per cutoff length: bins of cutoff/2 scan less volume (15.6 c^3 instead of 27 c^3) but
# are slower, as the vectorised candidate loop prefers fewer, fuller bins (README, Tuning).
BINS_PER_CUTOFF = 1
# At most this many bins per atom, so sparse or very elongated systems keep the grid small.
MAX_BINS_PER_ATOM = 2.0
# Serial below this many candidate pairs (estimated as sum over systems of N_s * min(N_s, 400),
# 400 being the candidates of a dense 27-bin neighbourhood): below it, thread start-up and
# waiting for a descheduled thread cost more than the work (README, Tuning: the break-even).
SERIAL_BELOW = 250_000


@njit(cache=True)
def _frame(cell, pbc, out):
    """out = the binning frame: periodic rows of cell, orthonormal completion elsewhere.
    Scalar loops only: array expressions here compiled for ~2.8 s of a cold start."""
    n_periodic = np.int64(pbc[0]) + np.int64(pbc[1]) + np.int64(pbc[2])
    if n_periodic == 0 or n_periodic == 3:  # the common cases
        for r in range(3):
            for c in range(3):
                out[r, c] = cell[r, c] if n_periodic == 3 else np.float64(r == c)
        return
    basis = np.zeros((3, 3))  # orthonormal rows: the periodic directions, then the completion
    v = np.empty(3)
    nb = 0
    for k in range(3):
        if pbc[k]:
            for c in range(3):
                v[c] = cell[k, c]
                out[k, c] = cell[k, c]
            _orthonormalize(v, basis, nb)
            nb += 1
    first_free = -1
    for k in range(3):
        if pbc[k]:
            continue
        if first_free < 0:
            first_free = k
        best_norm = -1.0
        for e in range(3):  # the unit vector least in the span so far
            for c in range(3):
                v[c] = np.float64(c == e)
            norm = _orthonormalize(v, basis, nb)
            if norm > best_norm:
                best_norm = norm
                for c in range(3):
                    out[k, c] = basis[nb, c]
        for c in range(3):
            basis[nb, c] = out[k, c]
        nb += 1
    if first_free >= 0 and _det(out) < 0.0:
        for c in range(3):
            out[first_free, c] = -out[first_free, c]


@njit(cache=True)
def _orthonormalize(v, basis, nb):
    """basis[nb] = v minus its projections on basis[:nb], normalised; returns the norm before
    normalising."""
    for b in range(nb):
        dot = v[0] * basis[b, 0] + v[1] * basis[b, 1] + v[2] * basis[b, 2]
        for c in range(3):
            v[c] -= dot * basis[b, c]
    norm = math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
    inv = 1.0 / norm if norm > 0.0 else 0.0  # a unit vector already in the span: not chosen
    for c in range(3):
        basis[nb, c] = v[c] * inv
    return norm


@njit(cache=True, inline="always")
def _det(m):
    return (m[0, 0] * (m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1])
            - m[0, 1] * (m[1, 0] * m[2, 2] - m[1, 2] * m[2, 0])
            + m[0, 2] * (m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0]))


@njit(cache=True)
def _inverse(m, out):
    inv_det = 1.0 / _det(m)
    for r in range(3):
        for c in range(3):
            # cofactor of (c, r), i.e. the adjugate transposed
            r1, r2 = (c + 1) % 3, (c + 2) % 3
            c1, c2 = (r + 1) % 3, (r + 2) % 3
            out[r, c] = (m[r1, c1] * m[r2, c2] - m[r1, c2] * m[r2, c1]) * inv_det


@njit(cache=True)
def _build_grid(pos, cells, pbc, system_ptr, cutoff, bins_per_cutoff, max_bins_per_atom):
    """Bin every atom. Returns the grid description and atoms in bin order.

    Per system: nbins [B,3], reach [B,3], bin thickness [B,3] (face-to-face, in length
    units), whether the frame is orthogonal [B], first global bin [B+1].
    Per atom in bin order: original index, system, bin coordinates, continuous grid
    coordinates [3,N], wrapped position [3,N], integer wrap n (position = wrapped + n @ cell).
    """
    n_sys = cells.shape[0]
    n = pos.shape[0]
    nbins = np.ones((n_sys, 3), np.int64)
    reach = np.zeros((n_sys, 3), np.int64)
    thickness = np.zeros((n_sys, 3))
    orthogonal = np.zeros(n_sys, np.bool_)
    grid_u = np.empty((n, 3))
    bin_first = np.zeros(n_sys + 1, np.int64)
    frac = np.empty((n, 3))
    wrap = np.zeros((n, 3), np.int64)
    lo = np.zeros(3)
    extent = np.ones(3)
    frame = np.empty((3, 3))
    inv = np.empty((3, 3))
    height = np.empty(3)
    for s in range(n_sys):
        a0, a1 = system_ptr[s], system_ptr[s + 1]
        _frame(cells[s], pbc[s], frame)
        _inverse(frame, inv)
        vol = abs(_det(frame))
        for k in range(3):
            u, w = frame[(k + 1) % 3], frame[(k + 2) % 3]
            cx = u[1] * w[2] - u[2] * w[1]
            cy = u[2] * w[0] - u[0] * w[2]
            cz = u[0] * w[1] - u[1] * w[0]
            height[k] = vol / math.sqrt(cx * cx + cy * cy + cz * cz)
        cos_max = 0.0
        for k in range(3):
            u, w = frame[k], frame[(k + 1) % 3]
            uw = u[0] * w[0] + u[1] * w[1] + u[2] * w[2]
            cos_max = max(cos_max, abs(uw) / math.sqrt((u[0] * u[0] + u[1] * u[1] + u[2] * u[2])
                                                       * (w[0] * w[0] + w[1] * w[1] + w[2] * w[2])))
        orthogonal[s] = cos_max < 1e-12
        for k in range(3):
            lo[k] = np.inf
            hi = -np.inf
            for a in range(a0, a1):
                f = pos[a, 0] * inv[0, k] + pos[a, 1] * inv[1, k] + pos[a, 2] * inv[2, k]
                if pbc[s, k]:
                    fl = math.floor(f)
                    f -= fl
                    wrap[a, k] = np.int64(fl) if abs(fl) < 2.0**62 else 0
                frac[a, k] = f
                lo[k] = min(lo[k], f)
                hi = max(hi, f)
            if pbc[s, k]:
                lo[k] = 0.0
                extent[k] = 1.0
            else:
                extent[k] = max(hi - lo[k], 0.0) if a1 > a0 else 0.0
        # Bins of at least cutoff / bins_per_cutoff, at most max_bins_per_atom per atom.
        width = cutoff / bins_per_cutoff
        cap = max(1.0, max_bins_per_atom * (a1 - a0))
        while True:
            total = 1.0
            for k in range(3):
                thick = extent[k] * height[k]
                nk = np.int64(1)
                if thick >= width and thick < 1e300:  # false for NaN and inf
                    nk = min(np.int64(thick / width), np.int64(1) << 20)
                nbins[s, k] = nk
                total *= nk
            if total <= cap:
                break
            width *= 1.25
        for k in range(3):
            thick = extent[k] * height[k]
            if pbc[s, k]:
                # +1e-9: never under-reach when cutoff * nbins / height is an integer
                reach[s, k] = np.int64(math.ceil(cutoff * nbins[s, k] / height[k] * (1 + 1e-9)))
            elif nbins[s, k] > 1:
                r = math.ceil(cutoff * nbins[s, k] / thick * (1 + 1e-9))
                reach[s, k] = min(np.int64(r), nbins[s, k] - 1)
            thickness[s, k] = extent[k] * height[k] / nbins[s, k]
        bin_first[s + 1] = bin_first[s] + nbins[s, 0] * nbins[s, 1] * nbins[s, 2]
        for a in range(a0, a1):
            for k in range(3):
                x = 0.5
                if extent[k] > 0.0:
                    x = (frac[a, k] - lo[k]) / extent[k] * nbins[s, k]
                # clamp (NaN and rounding at the upper face): never index out of bounds
                b = np.int64(x) if x >= 0.0 and x < nbins[s, k] else (
                    nbins[s, k] - 1 if x >= nbins[s, k] else 0)
                grid_u[a, k] = min(max(x, b), b + 1.0) if x == x else b + 0.5
                frac[a, k] = b  # reuse: integer bin coordinate from here on
    # counting sort of atoms by global bin
    n_bins = bin_first[n_sys]
    bin_start = np.zeros(n_bins + 1, np.int64)
    atom_bin = np.empty(n, np.int64)
    atom_sys = np.empty(n, np.int64)
    for s in range(n_sys):
        for a in range(system_ptr[s], system_ptr[s + 1]):
            g = bin_first[s] + (np.int64(frac[a, 0]) * nbins[s, 1]
                                + np.int64(frac[a, 1])) * nbins[s, 2] + np.int64(frac[a, 2])
            atom_bin[a] = g
            atom_sys[a] = s
            bin_start[g + 1] += 1
    for g in range(n_bins):
        bin_start[g + 1] += bin_start[g]
    fill = bin_start[:-1].copy()
    order = np.empty(n, np.int64)
    for a in range(n):
        order[fill[atom_bin[a]]] = a
        fill[atom_bin[a]] += 1
    sorted_pos = np.empty((3, n))  # structure of arrays: the candidate loop vectorises
    sorted_wrap = np.empty((n, 3), np.int64)
    sorted_bin = np.empty((n, 3), np.int64)
    sorted_u = np.empty((3, n))
    sorted_sys = np.empty(n, np.int64)
    for p in range(n):
        a = order[p]
        s = atom_sys[a]
        sorted_sys[p] = s
        for k in range(3):
            sorted_wrap[p, k] = wrap[a, k]
            sorted_bin[p, k] = np.int64(frac[a, k])
            sorted_u[k, p] = grid_u[a, k]
        for k in range(3):
            sorted_pos[k, p] = (pos[a, k] - wrap[a, 0] * cells[s, 0, k]
                                - wrap[a, 1] * cells[s, 1, k] - wrap[a, 2] * cells[s, 2, k])
    return (nbins, reach, thickness, orthogonal, bin_first, bin_start, order, sorted_sys,
            sorted_bin, sorted_u, sorted_pos, sorted_wrap)


@njit(cache=True, inline="always")
def _gap2(t, u, thick):
    """Squared distance from grid coordinate u to the slab [t, t + 1) of bins, in length units."""
    g = max(0.0, t - u, u - t - 1.0) * thick
    return g * g


@njit(cache=True, inline="always")
def _combine(acc, g2, orthogonal):
    """Lower bound on the squared distance to a bin, one axis at a time: exact box distance in
    an orthogonal frame, the largest single-axis bound otherwise (|df_k| h_k <= |dx|)."""
    return acc + g2 if orthogonal else max(acc, g2)


@njit(cache=True, inline="always")
def _z_span(b, u, reach, nb, periodic, thick, acc, orthogonal, prune2):
    """(first, last) grid coordinate t = b + dz, |dz| <= reach, of the bins along z that are not
    pruned (first > last: none). The gap grows with |t - u|, so they form one interval."""
    first, last = b - reach, b + reach
    if not periodic:
        first, last = max(first, 0), min(last, nb - 1)
    while first <= last and _combine(acc, _gap2(first, u, thick), orthogonal) > prune2:
        first += 1
    while last >= first and _combine(acc, _gap2(last, u, thick), orthogonal) > prune2:
        last -= 1
    return first, last


@njit(cache=True, inline="always")
def _z_run(t, last, nb, periodic):
    """The bins from grid coordinate t to at most ``last`` that share one periodic image: they
    are consecutive in memory, so their atoms are one run of candidates. Returns (first bin,
    last bin, image shift, the next t)."""
    if not periodic:
        return t, last, 0, last + 1
    s = t // nb
    end = min(last, (s + 1) * nb - 1)
    return t - s * nb, end - s * nb, s, end + 1


@njit(cache=True, inline="always")
def _image(b, d, nb, periodic):
    """(bin, shift) of bin b + d along one axis; bin -1 when outside a non-periodic grid."""
    t = b + d
    if periodic:
        s = t // nb
        return t - s * nb, s
    if t < 0 or t >= nb:
        return -1, 0
    return t, 0


def _fill_py(cutoff, half, cells, pbc, nbins, reach, thickness, orthogonal, bin_first,
             bin_start, order, sorted_sys, sorted_bin, sorted_u, sorted_pos, sorted_wrap, counts,
             ptr, out_i, out_j, out_s, out_d):
    """Write the pairs of every atom to its row ``ptr[a]:ptr[a] + counts[a]``, one atom per
    iteration; a row whose pairs do not match its count gets ``counts[a] = -1``.

    Candidates of a bin are first compacted without branches (the index is always written, the
    hit count advances by the comparison), so the unpredictable cutoff test costs no branch
    mispredictions; only the ~15% of candidates inside the cutoff reach the scalar tail.
    """
    c2 = cutoff * cutoff
    # Bins whose nearest point is farther than the cutoff are skipped; the margin keeps rounding
    # in the grid coordinates from ever skipping a bin that holds a pair.
    prune2 = c2 * (1.0 + 1e-8)
    n = order.shape[0]
    max_bin = 0
    for g in range(bin_start.shape[0] - 1):
        max_bin = max(max_bin, bin_start[g + 1] - bin_start[g])
    max_run = 0  # a run of candidates spans at most 2 reach + 1 bins along z
    for k in range(reach.shape[0]):
        max_run = max(max_run, (2 * reach[k, 2] + 1) * max_bin)
    chunk = 64
    for c in prange((n + chunk - 1) // chunk):
        hit_q = np.empty(max_run, np.int64)
        hit_r2 = np.empty(max_run)
        for p in range(c * chunk, min(n, (c + 1) * chunk)):
            a = order[p]
            s = sorted_sys[p]
            xi0, xi1, xi2 = sorted_pos[0, p], sorted_pos[1, p], sorted_pos[2, p]
            nb0, nb1, nb2 = nbins[s, 0], nbins[s, 1], nbins[s, 2]
            found = 0
            out = ptr[a]
            limit = counts[a]
            for dx in range(-reach[s, 0], reach[s, 0] + 1):
                bx, sx = _image(sorted_bin[p, 0], dx, nb0, pbc[s, 0])
                gx = _gap2(sorted_bin[p, 0] + dx, sorted_u[0, p], thickness[s, 0])
                if bx < 0 or gx > prune2:
                    continue
                for dy in range(-reach[s, 1], reach[s, 1] + 1):
                    by, sy = _image(sorted_bin[p, 1], dy, nb1, pbc[s, 1])
                    gy = _combine(gx, _gap2(sorted_bin[p, 1] + dy, sorted_u[1, p],
                                            thickness[s, 1]), orthogonal[s])
                    if by < 0 or gy > prune2:
                        continue
                    # the z-neighbours of a column are consecutive bins: one run of
                    # candidates per periodic image instead of one short loop per bin
                    t, last = _z_span(sorted_bin[p, 2], sorted_u[2, p], reach[s, 2], nb2,
                                      pbc[s, 2], thickness[s, 2], gy, orthogonal[s], prune2)
                    column = bin_first[s] + (bx * nb1 + by) * nb2
                    while t <= last:
                        bz0, bz1, sz, t = _z_run(t, last, nb2, pbc[s, 2])
                        o0 = sx * cells[s, 0, 0] + sy * cells[s, 1, 0] + sz * cells[s, 2, 0]
                        o1 = sx * cells[s, 0, 1] + sy * cells[s, 1, 1] + sz * cells[s, 2, 1]
                        o2 = sx * cells[s, 0, 2] + sy * cells[s, 1, 2] + sz * cells[s, 2, 2]
                        own_image = sx == 0 and sy == 0 and sz == 0
                        m = 0
                        for q in range(bin_start[column + bz0], bin_start[column + bz1 + 1]):
                            # (x_j - x_i) + S @ C: the mirror pair computes exactly the
                            # negation, so a full list is symmetric even for distances that
                            # round to the cutoff.
                            d0 = (sorted_pos[0, q] - xi0) + o0
                            d1 = (sorted_pos[1, q] - xi1) + o1
                            d2 = (sorted_pos[2, q] - xi2) + o2
                            r2 = d0 * d0 + d1 * d1 + d2 * d2
                            hit_q[m] = q
                            hit_r2[m] = r2
                            m += r2 < c2
                        for h in range(m):
                            q = hit_q[h]
                            b = order[q]
                            if b == a and own_image:
                                continue
                            t0 = sx + sorted_wrap[p, 0] - sorted_wrap[q, 0]
                            t1 = sy + sorted_wrap[p, 1] - sorted_wrap[q, 1]
                            t2 = sz + sorted_wrap[p, 2] - sorted_wrap[q, 2]
                            if half and not (b > a or (b == a and (
                                    t0 > 0 or (t0 == 0 and (t1 > 0 or (t1 == 0 and t2 > 0)))))):
                                continue
                            if found < limit:  # never past the row counted
                                k = out + found
                                out_i[k] = a
                                out_j[k] = b
                                out_s[k, 0] = t0
                                out_s[k, 1] = t1
                                out_s[k, 2] = t2
                                out_d[k] = math.sqrt(hit_r2[h])
                            found += 1
            if found != limit:
                counts[a] = -1  # fill disagreed with count: reported by the caller


_fill_parallel = njit(cache=True, parallel=True)(_fill_py)


def _count_py(half, cutoff, cells, pbc, nbins, reach, thickness, orthogonal, bin_first,
              bin_start, order, sorted_sys, sorted_bin, sorted_u, sorted_pos, counts):
    """Pair counts: the candidate loop is a branch-free reduction (SIMD).

    Full lists: every candidate inside the cutoff, minus the atom itself (found at distance 0 in
    its own image). Half lists: only j > i, or j == i in an image whose shift is
    lexicographically positive (for j == i the final shift is the image shift: wraps cancel).
    """
    c2 = cutoff * cutoff
    # Bins whose nearest point is farther than the cutoff are skipped; the margin keeps rounding
    # in the grid coordinates from ever skipping a bin that holds a pair.
    prune2 = c2 * (1.0 + 1e-8)
    n = order.shape[0]
    for p in prange(n):
        s = sorted_sys[p]
        xi0, xi1, xi2 = sorted_pos[0, p], sorted_pos[1, p], sorted_pos[2, p]
        nb0, nb1, nb2 = nbins[s, 0], nbins[s, 1], nbins[s, 2]
        a = order[p]
        found = 0 if half else -1  # a full list finds the atom itself once
        for dx in range(-reach[s, 0], reach[s, 0] + 1):
            bx, sx = _image(sorted_bin[p, 0], dx, nb0, pbc[s, 0])
            gx = _gap2(sorted_bin[p, 0] + dx, sorted_u[0, p], thickness[s, 0])
            if bx < 0 or gx > prune2:
                continue
            for dy in range(-reach[s, 1], reach[s, 1] + 1):
                by, sy = _image(sorted_bin[p, 1], dy, nb1, pbc[s, 1])
                gy = _combine(gx, _gap2(sorted_bin[p, 1] + dy, sorted_u[1, p], thickness[s, 1]),
                              orthogonal[s])
                if by < 0 or gy > prune2:
                    continue
                t, last = _z_span(sorted_bin[p, 2], sorted_u[2, p], reach[s, 2], nb2, pbc[s, 2],
                                  thickness[s, 2], gy, orthogonal[s], prune2)
                column = bin_first[s] + (bx * nb1 + by) * nb2
                while t <= last:  # one run of candidates per periodic image (see _fill_py)
                    bz0, bz1, sz, t = _z_run(t, last, nb2, pbc[s, 2])
                    o0 = sx * cells[s, 0, 0] + sy * cells[s, 1, 0] + sz * cells[s, 2, 0]
                    o1 = sx * cells[s, 0, 1] + sy * cells[s, 1, 1] + sz * cells[s, 2, 1]
                    o2 = sx * cells[s, 0, 2] + sy * cells[s, 1, 2] + sz * cells[s, 2, 2]
                    q0, q1 = bin_start[column + bz0], bin_start[column + bz1 + 1]
                    hits = 0
                    if half:
                        positive = sx > 0 or (sx == 0 and (sy > 0 or (sy == 0 and sz > 0)))
                        for q in range(q0, q1):
                            d0 = (sorted_pos[0, q] - xi0) + o0
                            d1 = (sorted_pos[1, q] - xi1) + o1
                            d2 = (sorted_pos[2, q] - xi2) + o2
                            b = order[q]
                            hits += (d0 * d0 + d1 * d1 + d2 * d2 < c2) & (
                                (b > a) | ((b == a) & positive))
                    else:
                        for q in range(q0, q1):
                            # (x_j - x_i) + S @ C: the mirror pair computes exactly the
                            # negation, so a full list is symmetric even at the cutoff.
                            d0 = (sorted_pos[0, q] - xi0) + o0
                            d1 = (sorted_pos[1, q] - xi1) + o1
                            d2 = (sorted_pos[2, q] - xi2) + o2
                            hits += d0 * d0 + d1 * d1 + d2 * d2 < c2
                    found += hits
        counts[a] = max(found, 0)  # 0 for a NaN atom (value checks off): not even itself


_count_parallel = njit(cache=True, parallel=True)(_count_py)
_count_serial = njit(_count_py)


# The same body without threads (prange runs as range outside parallel=True), for small systems.
_fill_serial = njit(_fill_py)


@njit(cache=True)
def _small_neighbor_list(pos, cells, pbc, sys_ptr, cutoff, half, bins_per_cutoff,
                         max_bins_per_atom, max_pairs, distance_like):
    """Grid, count, allocation and fill in one serial call: for small work the cost is the
    number of launches, not the work. When the count exceeds ``max_pairs`` nothing is allocated
    and empty pair arrays come back with the count, which the caller reports."""
    grid = _build_grid(pos, cells, pbc, sys_ptr, cutoff, bins_per_cutoff, max_bins_per_atom)
    (nbins, reach, thickness, orthogonal, bin_first, bin_start, order, sorted_sys, sorted_bin,
     sorted_u, sorted_pos, sorted_wrap) = grid
    n = pos.shape[0]
    counts = np.zeros(n, np.int64)
    ptr = np.zeros(n + 1, np.int64)
    none_i = np.empty(0, np.int64)
    none_s = np.empty((0, 3), np.int32)
    none_d = np.empty(0, distance_like.dtype)
    _count_serial(half, cutoff, cells, pbc, nbins, reach, thickness, orthogonal, bin_first,
                  bin_start, order, sorted_sys, sorted_bin, sorted_u, sorted_pos, counts)
    for a in range(n):
        ptr[a + 1] = ptr[a] + counts[a]
    num_pairs = ptr[n]
    if num_pairs > max_pairs:
        return num_pairs, counts, ptr, none_i, none_i, none_s, none_d
    out_i = np.empty(num_pairs, np.int64)
    out_j = np.empty(num_pairs, np.int64)
    out_s = np.empty((num_pairs, 3), np.int32)
    out_d = np.empty(num_pairs, distance_like.dtype)
    _fill_serial(cutoff, half, cells, pbc, nbins, reach, thickness, orthogonal, bin_first,
                 bin_start, order, sorted_sys, sorted_bin, sorted_u, sorted_pos, sorted_wrap,
                 counts, ptr, out_i, out_j, out_s, out_d)
    return num_pairs, counts, ptr, out_i, out_j, out_s, out_d


def neighbor_list(positions, cutoff, cells, pbc, system_ptr, half):
    """Launcher: see README.md. Returns (i, j, shifts int32 [E,3], ptr [N+1], distances [E])."""
    pos = positions.detach().double().numpy() if positions.dtype != torch.float64 \
        else positions.detach().numpy()
    cells64 = cells.detach().double().numpy()
    pbc_np = pbc.numpy()
    sys_ptr = system_ptr.numpy()
    n = pos.shape[0]
    np_dtype = np.float32 if positions.dtype == torch.float32 else np.float64
    bytes_per_pair = 8 + 8 + 12 + np.dtype(np_dtype).itemsize
    cutoff = float(cutoff)
    sizes = sys_ptr[1:] - sys_ptr[:-1]
    if int((sizes * np.minimum(sizes, 400)).sum()) < SERIAL_BELOW:
        free = memory.free_memory(positions.device)
        max_pairs = free // bytes_per_pair if free is not None else np.iinfo(np.int64).max
        num_pairs, counts, ptr, out_i, out_j, out_s, out_d = _small_neighbor_list(
            pos, cells64, pbc_np, sys_ptr, cutoff, half, float(BINS_PER_CUTOFF),
            float(MAX_BINS_PER_ATOM), max_pairs, np.empty(0, np_dtype))
        if num_pairs > max_pairs:
            memory.fits_in_memory(num_pairs * bytes_per_pair,
                                   f"the neighbor list ({num_pairs} pairs)", positions.device)
    else:
        grid = _build_grid(pos, cells64, pbc_np, sys_ptr, cutoff, float(BINS_PER_CUTOFF),
                           float(MAX_BINS_PER_ATOM))
        counts = np.zeros(n, np.int64)
        _count_parallel(half, cutoff, cells64, pbc_np, *grid[:-1], counts)
        ptr = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=ptr[1:])
        num_pairs = int(ptr[-1])
        memory.fits_in_memory(num_pairs * bytes_per_pair,
                               f"the neighbor list ({num_pairs} pairs)", positions.device)
        out_i = np.empty(num_pairs, np.int64)
        out_j = np.empty(num_pairs, np.int64)
        out_s = np.empty((num_pairs, 3), np.int32)
        out_d = np.empty(num_pairs, np_dtype)
        _fill_parallel(cutoff, half, cells64, pbc_np, *grid, counts, ptr, out_i, out_j, out_s,
                       out_d)
    if n and counts.min() < 0:
        raise RuntimeError("fastff internal error: neighbor-list count and fill passes disagree")
    return (torch.from_numpy(out_i), torch.from_numpy(out_j), torch.from_numpy(out_s),
            torch.from_numpy(ptr), torch.from_numpy(out_d))


@njit(cache=True, parallel=True)
def _pair_vectors(pos, cells, atom_system, i, j, shifts, out):
    batched = atom_system.shape[0] > 0
    for e in prange(i.shape[0]):
        a, b = i[e], j[e]
        s = atom_system[a] if batched else 0
        for k in range(3):
            out[e, k] = (pos[b, k] - pos[a, k] + shifts[e, 0] * cells[s, 0, k]
                         + shifts[e, 1] * cells[s, 1, k] + shifts[e, 2] * cells[s, 2, k])


@njit(cache=True)
def _pair_vectors_transpose(grad, cells, atom_system, i, j, shifts, grad_pos, grad_cells):
    # Serial on purpose: the j-side scatter has no owner row; one thread keeps it deterministic.
    batched = atom_system.shape[0] > 0
    for e in range(i.shape[0]):
        a, b = i[e], j[e]
        s = atom_system[a] if batched else 0
        for k in range(3):
            g = grad[e, k]
            grad_pos[b, k] += g
            grad_pos[a, k] -= g
            for r in range(3):
                grad_cells[s, r, k] += shifts[e, r] * g


def _as_numpy(t):
    return t.detach().contiguous().numpy()


def _system_index(atom_system):
    return np.empty(0, np.int64) if atom_system is None else _as_numpy(atom_system)


def pair_vectors(positions, cells, atom_system, i, j, shifts):
    """Launcher: r_ij [E,3] in the dtype of positions."""
    out = np.empty((i.shape[0], 3), _numpy_dtype(positions))
    _pair_vectors(_as_numpy(positions), _as_numpy(cells.to(positions.dtype)),
                  _system_index(atom_system), _as_numpy(i), _as_numpy(j), _as_numpy(shifts), out)
    return torch.from_numpy(out)


def pair_vectors_transpose(grad, num_atoms, cells, atom_system, i, j, shifts):
    """Launcher: (grad_positions [N,3], grad_cells [B,3,3]) in the dtype of grad."""
    dtype = _numpy_dtype(grad)
    grad_pos = np.zeros((num_atoms, 3), dtype)
    grad_cells = np.zeros(tuple(cells.shape), dtype)
    _pair_vectors_transpose(_as_numpy(grad), _as_numpy(cells), _system_index(atom_system),
                            _as_numpy(i), _as_numpy(j), _as_numpy(shifts), grad_pos, grad_cells)
    return torch.from_numpy(grad_pos), torch.from_numpy(grad_cells)


@njit(cache=True, parallel=True)
def _reverse(i, j, shifts, ptr, out):
    """Each unordered pair is looked up once, from the end that comes first (a < b, or a == b
    with the first non-zero shift component positive), and both ends are written: the mirror
    pair (b -> a) belongs to that one lookup, so no two threads write one entry."""
    for a in prange(ptr.shape[0] - 1):
        for e in range(ptr[a], ptr[a + 1]):
            b = j[e]
            if b < a:
                continue
            s0 = shifts[e, 0]
            s1 = shifts[e, 1]
            s2 = shifts[e, 2]
            if b == a and not (s0 > 0 or (s0 == 0 and (s1 > 0 or (s1 == 0 and s2 > 0)))):
                continue
            for f in range(ptr[b], ptr[b + 1]):  # rows hold ~50 pairs: a scan beats a sort
                if j[f] == a and shifts[f, 0] == -s0 and shifts[f, 1] == -s1 and \
                        shifts[f, 2] == -s2:
                    out[e] = f
                    out[f] = e
                    break


def neighbor_reverse(i, j, shifts, ptr):
    """Launcher: index of each pair's mirror (j, i, -S); -1 where none exists."""
    out = np.full(i.shape[0], -1, np.int64)
    _reverse(_as_numpy(i), _as_numpy(j), _as_numpy(shifts), _as_numpy(ptr), out)
    return torch.from_numpy(out)


def _numpy_dtype(t):
    return np.float32 if t.dtype == torch.float32 else np.float64


# ---- compaction: the pairs of a (Verlet) list that are within a smaller cutoff ---------------


@njit(cache=True, inline="always")
def _row(ptr, a, num_pairs):
    """Pairs of row ``a``, clipped to the pair arrays: a malformed ptr cannot index past them."""
    return max(ptr[a], 0), min(ptr[a + 1], num_pairs)


@njit(cache=True, parallel=True)
def _compact_count(pos, cells, atom_system, j, shifts, ptr, cutoff, rank, counts):
    """rank[e]: index of pair e among the kept pairs of its row (-1: dropped); counts[a]: kept
    pairs of row a.

    The pair loop has no branch (an out-of-range neighbour is clamped, then dropped by the
    comparison): a branch on the range was slower (README, Tuning).
    """
    num_pairs = j.shape[0]
    c2 = cutoff * cutoff
    batched = atom_system.shape[0] > 0
    last = pos.shape[0] - 1
    for a in prange(ptr.shape[0] - 1):
        s = atom_system[a] if batched else 0
        c00, c01, c02 = cells[s, 0, 0], cells[s, 0, 1], cells[s, 0, 2]
        c10, c11, c12 = cells[s, 1, 0], cells[s, 1, 1], cells[s, 1, 2]
        c20, c21, c22 = cells[s, 2, 0], cells[s, 2, 1], cells[s, 2, 2]
        x0, x1, x2 = pos[a, 0], pos[a, 1], pos[a, 2]
        lo, hi = _row(ptr, a, num_pairs)
        found = 0
        for e in range(lo, hi):
            b = min(max(j[e], 0), last)
            s0, s1, s2 = shifts[e, 0], shifts[e, 1], shifts[e, 2]
            # (x_j - x_i) + S @ C, as the neighbor kernel: the mirror pair computes exactly the
            # negated vector, so a pair and its mirror are kept or dropped together.
            d0 = (pos[b, 0] - x0) + (s0 * c00 + s1 * c10 + s2 * c20)
            d1 = (pos[b, 1] - x1) + (s0 * c01 + s1 * c11 + s2 * c21)
            d2 = (pos[b, 2] - x2) + (s0 * c02 + s1 * c12 + s2 * c22)
            inside = (d0 * d0 + d1 * d1 + d2 * d2 < c2) & (b == j[e])
            rank[e] = (found + 1) * inside - 1
            found += inside
        counts[a] = found


@njit(cache=True, parallel=True)
def _compact_fill(j, shifts, ptr, rank, new_ptr, out_i, out_j, out_s):
    """Write the kept pairs of row a to new_ptr[a] + rank, i.e. in their old order."""
    num_pairs = j.shape[0]
    for a in prange(ptr.shape[0] - 1):
        lo, hi = _row(ptr, a, num_pairs)
        for e in range(lo, hi):
            k = new_ptr[a] + rank[e]
            if rank[e] >= 0 and k < new_ptr[a + 1]:
                out_i[k] = a
                out_j[k] = j[e]
                out_s[k, 0] = shifts[e, 0]
                out_s[k, 1] = shifts[e, 1]
                out_s[k, 2] = shifts[e, 2]


def neighbor_compact(positions, cells, atom_system, i, j, shifts, ptr, cutoff):
    """Launcher: the pairs closer than ``cutoff`` in their old order, see README.md. Returns
    (i, j, shifts int32 [E',3], ptr [N+1], rank int32 [E]). Distances are tested in float64, as
    the neighbor kernel does.

    Arrays are allocated here, not inside the kernels: numpy's zero-filled allocations are lazy,
    while np.zeros inside a parallel numba function writes every page (README, Tuning).
    """
    pos = positions.detach().to(torch.float64).contiguous().numpy()
    j_np, shifts_np, ptr_np = _as_numpy(j), _as_numpy(shifts), _as_numpy(ptr)
    n = ptr_np.shape[0] - 1
    rank = np.zeros(j_np.shape[0], np.int32)
    counts = np.zeros(n, np.int64)
    _compact_count(pos, _as_numpy(cells.to(torch.float64)), _system_index(atom_system), j_np,
                   shifts_np, ptr_np, float(cutoff), rank, counts)
    new_ptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=new_ptr[1:])
    kept = int(new_ptr[-1])
    out_i = np.empty(kept, np.int64)
    out_j = np.empty(kept, np.int64)
    out_s = np.empty((kept, 3), np.int32)
    _compact_fill(j_np, shifts_np, ptr_np, rank, new_ptr, out_i, out_j, out_s)
    return (torch.from_numpy(out_i), torch.from_numpy(out_j), torch.from_numpy(out_s),
            torch.from_numpy(new_ptr), torch.from_numpy(rank))


@njit(cache=True, parallel=True)
def _compact_reverse(reverse, j, ptr, rank, new_ptr, out):
    """For every kept pair e of row a: out[new(e)] = new(reverse[e]), where the new index of a
    pair of row a is new_ptr[a] + rank, and the mirror of e lies in row j[e]. Each kept pair
    writes its own slot."""
    num_pairs = rank.shape[0]
    n = new_ptr.shape[0] - 1
    for a in prange(ptr.shape[0] - 1):
        lo, hi = _row(ptr, a, num_pairs)
        for e in range(lo, hi):
            k = new_ptr[a] + rank[e]
            if rank[e] < 0 or k >= out.shape[0]:
                continue
            f, b = reverse[e], j[e]
            mirror = -1
            if f >= 0 and f < num_pairs and b >= 0 and b < n and rank[f] >= 0:
                mirror = new_ptr[b] + rank[f]
            out[k] = mirror


def neighbor_compact_reverse(reverse, j, ptr, rank, new_ptr, num_pairs):
    """Launcher: the mirror index of a compacted list (int64 [num_pairs], -1 where the mirror was
    dropped or never existed) from its source's ``reverse``, ``j``, ``ptr`` and the ``rank`` and
    ``ptr`` that :func:`neighbor_compact` returned."""
    out = np.full(num_pairs, -1, np.int64)
    _compact_reverse(_as_numpy(reverse), _as_numpy(j), _as_numpy(ptr), _as_numpy(rank),
                     _as_numpy(new_ptr), out)
    return torch.from_numpy(out)


# ---------------------------------------------------------------- pair distances
# |x_j - x_i + S @ cell| per pair in registers: the pass writes only the [E] output, where
# pair_vectors + norm writes [E, 3], reads it back and writes [E]. Differences in float64 (free
# next to the gather), rounded once; indices clamped, so an unchecked list cannot read outside.
@njit(cache=True, inline="always")
def _pair_difference(pos, cells, atom_system, i, j, shifts, e):
    """(a, b, system, x_b - x_a + S @ cell) of pair e in float64, indices clamped."""
    last = pos.shape[0] - 1
    a = min(max(i[e], 0), last)
    b = min(max(j[e], 0), last)
    s = atom_system[a] if atom_system.shape[0] > 0 else 0
    s0, s1, s2 = shifts[e, 0], shifts[e, 1], shifts[e, 2]
    d0 = (np.float64(pos[b, 0]) - np.float64(pos[a, 0])
          + (s0 * cells[s, 0, 0] + s1 * cells[s, 1, 0] + s2 * cells[s, 2, 0]))
    d1 = (np.float64(pos[b, 1]) - np.float64(pos[a, 1])
          + (s0 * cells[s, 0, 1] + s1 * cells[s, 1, 1] + s2 * cells[s, 2, 1]))
    d2 = (np.float64(pos[b, 2]) - np.float64(pos[a, 2])
          + (s0 * cells[s, 0, 2] + s1 * cells[s, 1, 2] + s2 * cells[s, 2, 2]))
    return a, b, s, d0, d1, d2


@njit(cache=True, parallel=True)
def _pair_distances(pos, cells, atom_system, i, j, shifts, out):
    for e in prange(i.shape[0]):
        _, _, _, d0, d1, d2 = _pair_difference(pos, cells, atom_system, i, j, shifts, e)
        out[e] = math.sqrt(d0 * d0 + d1 * d1 + d2 * d2)


def pair_distances(positions, cells, atom_system, i, j, shifts):
    """Launcher: |x_j - x_i + S @ cell[system(i)]| [E] in the dtype of positions."""
    pos = positions.detach()
    if pos.dtype not in (torch.float32, torch.float64):  # numba has no half precision
        pos = pos.double()
    out = np.empty(i.shape[0], np.float32 if pos.dtype == torch.float32 else np.float64)
    if out.shape[0] and pos.shape[0]:
        system = (np.empty(0, np.int64) if atom_system is None
                  else atom_system.detach().contiguous().numpy())
        _pair_distances(pos.contiguous().numpy(),
                        cells.detach().to(torch.float64).contiguous().numpy(), system,
                        i.detach().contiguous().numpy(), j.detach().contiguous().numpy(),
                        shifts.detach().contiguous().numpy(), out)
    elif out.shape[0]:
        out[:] = np.nan  # pairs but no atoms: only a list whose values were never checked
    return torch.from_numpy(out).to(positions.dtype)


# The adjoint of _pair_distances in one pass: each pair's vector is recomputed in registers (as
# the forward, differences in float64) and g r_ij / |r_ij| goes to both atoms and the cell, where
# pair_vectors + norm + division + pair_vectors_transpose write and read three [E, 3] tensors.
# Serial on purpose, as _pair_vectors_transpose: the j-side scatter has no owner row, and one
# thread keeps it deterministic (150,000 pairs: ~0.5 ms).
@njit(cache=True, inline="always")
def _scatter_component(gk, k, a, b, s, s0, s1, s2, grad_pos, grad_cells):
    """Component k of one pair's gradient g r_ij / |r_ij|: +j, -i, S (x) g to the cell."""
    grad_pos[b, k] += gk
    grad_pos[a, k] -= gk
    grad_cells[s, 0, k] += s0 * gk
    grad_cells[s, 1, k] += s1 * gk
    grad_cells[s, 2, k] += s2 * gk


@njit(cache=True)
def _pair_distances_transpose(grad, pos, cells, atom_system, i, j, shifts, grad_pos, grad_cells):
    for e in range(i.shape[0]):
        a, b, s, d0, d1, d2 = _pair_difference(pos, cells, atom_system, i, j, shifts, e)
        s0, s1, s2 = shifts[e, 0], shifts[e, 1], shifts[e, 2]
        r = math.sqrt(d0 * d0 + d1 * d1 + d2 * d2)
        if r == 0.0:  # coincident atoms: zero gradient, as torch's norm
            continue
        g = grad[e] / r
        _scatter_component(g * d0, 0, a, b, s, s0, s1, s2, grad_pos, grad_cells)
        _scatter_component(g * d1, 1, a, b, s, s0, s1, s2, grad_pos, grad_cells)
        _scatter_component(g * d2, 2, a, b, s, s0, s1, s2, grad_pos, grad_cells)


def pair_distances_transpose(grad, positions, cells, atom_system, i, j, shifts):
    """Launcher: (grad_positions [N,3], grad_cells [B,3,3]) of sum_e grad_e |r_ij|, in the dtype
    of positions (accumulated in float64)."""
    grad_pos = np.zeros((positions.shape[0], 3), np.float64)
    grad_cells = np.zeros(tuple(cells.shape), np.float64)
    if i.shape[0] and positions.shape[0]:
        _pair_distances_transpose(_as_numpy(grad), _as_numpy(positions),
                                  _as_numpy(cells.to(torch.float64)),
                                  _system_index(atom_system), _as_numpy(i), _as_numpy(j),
                                  _as_numpy(shifts), grad_pos, grad_cells)
    dtype = positions.dtype
    return torch.from_numpy(grad_pos).to(dtype), torch.from_numpy(grad_cells).to(dtype)
