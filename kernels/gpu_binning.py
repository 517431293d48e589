"""Spatial binning on the GPU in a handful of Triton kernels, with no host synchronisation: the
first half of the cell-list neighbor list (kernels/neighbors/gpu_triton.py) and of the cluster
layout of the nonbonded kernel (kernels/nonbonded/gpu_clusters.py).

Steps (one launch each; sizes that depend on the data stay on the device):

1. ``_frames_kernel`` (systems in parallel): each system's binning frame (periodic rows of the
   cell, an orthonormal completion elsewhere; reference.lattice_frame), its inverse and the
   heights between opposite faces, in float64.
2. ``_extent_kernel`` (atoms in parallel): the extent of each system along its non-periodic
   axes (block minima and maxima, one relaxed atomic each); zeroes the bin counters.
3. ``_grid_kernel`` (one program): bins per axis and system, the reach (cell lists) and the
   offsets of every system's bins; the total number of bins stays on the device.
4. ``_bin_kernel`` (atoms): each atom's wrapped position, image and bin; counts per bin.
5. ``scan_kernel`` (kernels/gpu_common.py): first slot of every bin.
6. ``_place_kernel`` (atoms): each atom into its bin (an atomic cursor per bin).
7. ``_sort_bins_kernel`` (bins): the atoms of each bin sorted by a key (atom index, or a
   coordinate for clusters) by ranking (O(m^2) per bin of m atoms, no sort primitive), which
   makes the order deterministic whatever order step 6 placed them in.

The number of bins is bounded by ``N + B`` (at most one per atom, at least one per system), so
every buffer has a size known on the host. Guarded mode (``status`` given): every kernel
returns at once unless bit 0 of the status word asks for a rebuild (a Verlet list's steady
state launches them and they do nothing). The grid of bins is that of ``_bins`` in the previous
torch implementation (same frames, caps and slack), so lists are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastff.kernels import gpu_common as common

# Relative slack on the reach: binning happens in the input dtype, so fractional coordinates
# carry rounding errors; the slack makes sure no pair closer than cutoff * (1 - slack) is missed
# for positions up to ~800 cutoffs from the origin (float32: 2 * 6e-8 * 800 < 1e-4).
SLACK = {torch.float32: 1e-4, torch.float64: 1e-10}
MAX_REACH = 1 << 14  # largest reach per axis; only reached for absurd cutoff/cell ratios
MAX_BINS_AXIS = 1 << 20
CELL_LIST, CLUSTERS = 0, 1  # grid modes: bins >= cutoff wide with a reach, or target widths
_BLOCK_S = 32  # systems per step of the per-system kernels
_BLOCK_A = 128  # atoms per program
_BLOCK_RANK = 32  # atoms per side of a ranking tile


@triton.jit
def _guard(status_ptr, GUARDED: tl.constexpr):
    """True when the kernel must work: always, or when the status word asks for a rebuild."""
    if GUARDED:
        go = (tl.load(status_ptr) & 1) != 0
    else:
        go = True
    return go


@triton.jit
def _dot3(ax, ay, az, bx, by, bz):
    return ax * bx + ay * by + az * bz


@triton.jit
def _unit(x, y, z):
    n = tl.sqrt(_dot3(x, y, z, x, y, z))
    inv = 1.0 / tl.maximum(n, 1e-300)
    return x * inv, y * inv, z * inv


@triton.jit
def _reject(vx, vy, vz, ux, uy, uz):
    """v - (v . u) u."""
    p = _dot3(vx, vy, vz, ux, uy, uz)
    return vx - p * ux, vy - p * uy, vz - p * uz


@triton.jit
def _periodic_basis(cx, cy, cz, periodic, b0x, b0y, b0z, b1x, b1y, b1z):
    """Unit vector of row c made orthogonal to the basis so far; zero for a non-periodic row."""
    vx, vy, vz = _reject(cx, cy, cz, b0x, b0y, b0z)
    vx, vy, vz = _reject(vx, vy, vz, b1x, b1y, b1z)
    ux, uy, uz = _unit(vx, vy, vz)
    return tl.where(periodic, ux, 0.0), tl.where(periodic, uy, 0.0), tl.where(periodic, uz, 0.0)


@triton.jit
def _completion(u0x, u0y, u0z, u1x, u1y, u1z, u2x, u2y, u2z, a0x, a0y, a0z, a1x, a1y, a1z):
    """The standard axis with the largest part orthogonal to the basis so far, normalised (the
    first of equals, as torch.argmax)."""
    zero = u0x * 0.0
    one = zero + 1.0
    bx = zero
    by = zero
    bz = zero
    bn = zero - 1.0
    for m in tl.static_range(3):
        ex = one if m == 0 else zero
        ey = one if m == 1 else zero
        ez = one if m == 2 else zero
        ex, ey, ez = _reject(ex, ey, ez, u0x, u0y, u0z)
        ex, ey, ez = _reject(ex, ey, ez, u1x, u1y, u1z)
        ex, ey, ez = _reject(ex, ey, ez, u2x, u2y, u2z)
        ex, ey, ez = _reject(ex, ey, ez, a0x, a0y, a0z)
        ex, ey, ez = _reject(ex, ey, ez, a1x, a1y, a1z)
        n = tl.sqrt(_dot3(ex, ey, ez, ex, ey, ez))
        better = n > bn
        bx = tl.where(better, ex, bx)
        by = tl.where(better, ey, by)
        bz = tl.where(better, ez, bz)
        bn = tl.where(better, n, bn)
    return _unit(bx, by, bz)


@triton.jit
def _frames_kernel(cells_ptr, pbc_ptr, inv_ptr, height_ptr, fmin_ptr, fmax_ptr, n_sys,
                   status_ptr, GUARDED: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per system: inverse of the binning frame (float64 [B, 9]), face heights ([B, 3]), and
    the extents of step 2 set to (+inf, -inf)."""
    if _guard(status_ptr, GUARDED):
        s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        ms = s < n_sys
        c = cells_ptr + s * 9
        c0x = tl.load(c + 0, mask=ms, other=1.0).to(tl.float64)
        c0y = tl.load(c + 1, mask=ms, other=0.0).to(tl.float64)
        c0z = tl.load(c + 2, mask=ms, other=0.0).to(tl.float64)
        c1x = tl.load(c + 3, mask=ms, other=0.0).to(tl.float64)
        c1y = tl.load(c + 4, mask=ms, other=1.0).to(tl.float64)
        c1z = tl.load(c + 5, mask=ms, other=0.0).to(tl.float64)
        c2x = tl.load(c + 6, mask=ms, other=0.0).to(tl.float64)
        c2y = tl.load(c + 7, mask=ms, other=0.0).to(tl.float64)
        c2z = tl.load(c + 8, mask=ms, other=1.0).to(tl.float64)
        p0 = tl.load(pbc_ptr + s * 3 + 0, mask=ms, other=0) != 0
        p1 = tl.load(pbc_ptr + s * 3 + 1, mask=ms, other=0) != 0
        p2 = tl.load(pbc_ptr + s * 3 + 2, mask=ms, other=0) != 0
        zero = c0x * 0.0
        u0x, u0y, u0z = _periodic_basis(c0x, c0y, c0z, p0, zero, zero, zero, zero, zero, zero)
        u1x, u1y, u1z = _periodic_basis(c1x, c1y, c1z, p1, u0x, u0y, u0z, zero, zero, zero)
        vx, vy, vz = _reject(c2x, c2y, c2z, u0x, u0y, u0z)
        u2x, u2y, u2z = _periodic_basis(vx, vy, vz, p2, u1x, u1y, u1z, zero, zero, zero)
        # orthonormal completion of the non-periodic rows, in row order
        vx, vy, vz = _completion(u0x, u0y, u0z, u1x, u1y, u1z, u2x, u2y, u2z, zero, zero, zero,
                                 zero, zero, zero)
        f0x = tl.where(p0, c0x, vx)
        f0y = tl.where(p0, c0y, vy)
        f0z = tl.where(p0, c0z, vz)
        a0x = tl.where(p0, 0.0, vx)
        a0y = tl.where(p0, 0.0, vy)
        a0z = tl.where(p0, 0.0, vz)
        vx, vy, vz = _completion(u0x, u0y, u0z, u1x, u1y, u1z, u2x, u2y, u2z, a0x, a0y, a0z,
                                 zero, zero, zero)
        f1x = tl.where(p1, c1x, vx)
        f1y = tl.where(p1, c1y, vy)
        f1z = tl.where(p1, c1z, vz)
        a1x = tl.where(p1, 0.0, vx)
        a1y = tl.where(p1, 0.0, vy)
        a1z = tl.where(p1, 0.0, vz)
        vx, vy, vz = _completion(u0x, u0y, u0z, u1x, u1y, u1z, u2x, u2y, u2z, a0x, a0y, a0z,
                                 a1x, a1y, a1z)
        f2x = tl.where(p2, c2x, vx)
        f2y = tl.where(p2, c2y, vy)
        f2z = tl.where(p2, c2z, vz)
        # right-handed: flip the first non-periodic row when the determinant is negative
        x0 = f1y * f2z - f1z * f2y
        x1 = f1z * f2x - f1x * f2z
        x2 = f1x * f2y - f1y * f2x
        det = f0x * x0 + f0y * x1 + f0z * x2
        neg = det < 0.0
        flip0 = neg & (p0 == 0)
        flip1 = neg & (p0 != 0) & (p1 == 0)
        flip2 = neg & (p0 != 0) & (p1 != 0) & (p2 == 0)
        f0x = tl.where(flip0, -f0x, f0x)
        f0y = tl.where(flip0, -f0y, f0y)
        f0z = tl.where(flip0, -f0z, f0z)
        f1x = tl.where(flip1, -f1x, f1x)
        f1y = tl.where(flip1, -f1y, f1y)
        f1z = tl.where(flip1, -f1z, f1z)
        f2x = tl.where(flip2, -f2x, f2x)
        f2y = tl.where(flip2, -f2y, f2y)
        f2z = tl.where(flip2, -f2z, f2z)
        # inverse by cofactors (rows of F are lattice vectors: frac = x @ F^-1)
        k0x = f1y * f2z - f1z * f2y
        k0y = f1z * f2x - f1x * f2z
        k0z = f1x * f2y - f1y * f2x
        k1x = f2y * f0z - f2z * f0y
        k1y = f2z * f0x - f2x * f0z
        k1z = f2x * f0y - f2y * f0x
        k2x = f0y * f1z - f0z * f1y
        k2y = f0z * f1x - f0x * f1z
        k2z = f0x * f1y - f0y * f1x
        det = f0x * k0x + f0y * k0y + f0z * k0z
        inv_det = 1.0 / det
        ib = inv_ptr + s * 9
        tl.store(ib + 0, k0x * inv_det, mask=ms)
        tl.store(ib + 1, k1x * inv_det, mask=ms)
        tl.store(ib + 2, k2x * inv_det, mask=ms)
        tl.store(ib + 3, k0y * inv_det, mask=ms)
        tl.store(ib + 4, k1y * inv_det, mask=ms)
        tl.store(ib + 5, k2y * inv_det, mask=ms)
        tl.store(ib + 6, k0z * inv_det, mask=ms)
        tl.store(ib + 7, k1z * inv_det, mask=ms)
        tl.store(ib + 8, k2z * inv_det, mask=ms)
        volume = tl.abs(det)
        hb = height_ptr + s * 3
        tl.store(hb + 0, volume / tl.sqrt(_dot3(k0x, k0y, k0z, k0x, k0y, k0z)), mask=ms)
        tl.store(hb + 1, volume / tl.sqrt(_dot3(k1x, k1y, k1z, k1x, k1y, k1z)), mask=ms)
        tl.store(hb + 2, volume / tl.sqrt(_dot3(k2x, k2y, k2z, k2x, k2y, k2z)), mask=ms)
        for d in tl.static_range(3):
            tl.store(fmin_ptr + s * 3 + d, zero + float("inf"), mask=ms)
            tl.store(fmax_ptr + s * 3 + d, zero - float("inf"), mask=ms)


@triton.jit
def _frac(pos_ptr, inv_ptr, a, s, m):
    """Fractional coordinates of atoms a (system s) in the binning frame, in the positions'
    dtype."""
    x = tl.load(pos_ptr + a * 3 + 0, mask=m, other=0.0)
    y = tl.load(pos_ptr + a * 3 + 1, mask=m, other=0.0)
    z = tl.load(pos_ptr + a * 3 + 2, mask=m, other=0.0)
    ty = x.dtype
    ib = inv_ptr + s * 9
    f0 = (x * tl.load(ib + 0, mask=m, other=0.0).to(ty) + y * tl.load(ib + 3, mask=m,
                                                                      other=0.0).to(ty)
          + z * tl.load(ib + 6, mask=m, other=0.0).to(ty))
    f1 = (x * tl.load(ib + 1, mask=m, other=0.0).to(ty) + y * tl.load(ib + 4, mask=m,
                                                                      other=0.0).to(ty)
          + z * tl.load(ib + 7, mask=m, other=0.0).to(ty))
    f2 = (x * tl.load(ib + 2, mask=m, other=0.0).to(ty) + y * tl.load(ib + 5, mask=m,
                                                                      other=0.0).to(ty)
          + z * tl.load(ib + 8, mask=m, other=0.0).to(ty))
    return x, y, z, f0, f1, f2


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _system_extreme(ptr, s, v, m, MAX: tl.constexpr):
    """Per-system minimum (or maximum) of v over the block's lanes: one atomic for the block's
    first system, one per lane for others."""
    s0 = tl.min(tl.where(m, s, 2147483647), 0)
    first = m & (s == s0)
    if MAX:
        tl.atomic_max(ptr + s0 * 3, tl.max(tl.where(first, v, -float("inf")), 0),
                      mask=tl.max(first.to(tl.int32), 0) != 0, sem="relaxed")
        tl.atomic_max(ptr + s * 3, v, mask=m & (s != s0), sem="relaxed")
    else:
        tl.atomic_min(ptr + s0 * 3, tl.min(tl.where(first, v, float("inf")), 0),
                      mask=tl.max(first.to(tl.int32), 0) != 0, sem="relaxed")
        tl.atomic_min(ptr + s * 3, v, mask=m & (s != s0), sem="relaxed")


@triton.jit
def _extent_kernel(pos_ptr, atom_sys_ptr, inv_ptr, pbc_ptr, fmin_ptr, fmax_ptr, count_ptr,
                   cursor_ptr, n_atoms, n_counters, status_ptr, GUARDED: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Extents of every system along its non-periodic axes (finite coordinates only), and the
    bin counters of steps 4 and 6 zeroed."""
    if _guard(status_ptr, GUARDED):
        pid = tl.program_id(0).to(tl.int64)
        a = pid * BLOCK + tl.arange(0, BLOCK)
        ma = a < n_atoms
        s = tl.load(atom_sys_ptr + a, mask=ma, other=0).to(tl.int64)
        x, y, z, f0, f1, f2 = _frac(pos_ptr, inv_ptr, a, s, ma)
        for d in tl.static_range(3):
            f = f0 if d == 0 else (f1 if d == 1 else f2)
            aperiodic = tl.load(pbc_ptr + s * 3 + d, mask=ma, other=1) == 0
            m = ma & aperiodic & _finite(f)
            if tl.max(m.to(tl.int32), 0) != 0:
                _system_extreme(fmin_ptr + d, s, f, m, False)
                _system_extreme(fmax_ptr + d, s, f, m, True)
        # the counters: one block each, the first program also the tail beyond n_atoms
        zero = tl.zeros([BLOCK], dtype=tl.int32)
        tl.store(count_ptr + a, zero, mask=a < n_counters)
        tl.store(cursor_ptr + a, zero, mask=a < n_counters)
        if pid == 0:
            for k0 in range(n_atoms, n_counters, BLOCK):
                k = k0 + tl.arange(0, BLOCK).to(tl.int64)
                tl.store(count_ptr + k, zero, mask=k < n_counters)
                tl.store(cursor_ptr + k, zero, mask=k < n_counters)


@triton.jit
def _nan_to(x, value):
    return tl.where(x == x, x, value)


@triton.jit
def _grid_kernel(height_ptr, pbc_ptr, sys_ptr, fmin_ptr, fmax_ptr, width_ptr, span_ptr,
                 nbins_ptr, reach_ptr, offset_ptr, n_sys, status_ptr, MODE: tl.constexpr,
                 GUARDED: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program: bins per axis of every system (at least one cutoff wide and at most about
    one per atom, as reference and the former torch binning), the reach of a cell list, and
    the offsets of each system's bins (offset[B] = the total). ``width_ptr``: the bin widths
    (cell lists), or (atoms per cluster, column height in cluster edges, -) for clusters."""
    if _guard(status_ptr, GUARDED):
        carry = tl.zeros([], dtype=tl.int64)
        tl.store(offset_ptr, carry.to(tl.int32))
        w_x = tl.load(width_ptr + 0).to(tl.float64)
        w_y = tl.load(width_ptr + 1).to(tl.float64)
        w_z = tl.load(width_ptr + 2).to(tl.float64)
        for s0 in range(0, n_sys, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
            ms = s < n_sys
            count = (tl.load(sys_ptr + s + 1, mask=ms, other=0)
                     - tl.load(sys_ptr + s, mask=ms, other=0))
            cap = tl.maximum(count, 1).to(tl.float64)
            l0, l1, l2 = cap * 0.0, cap * 0.0, cap * 0.0
            for d in tl.static_range(3):
                periodic = tl.load(pbc_ptr + s * 3 + d, mask=ms, other=0) != 0
                lo = tl.load(fmin_ptr + s * 3 + d, mask=ms, other=0.0).to(tl.float64)
                hi = tl.load(fmax_ptr + s * 3 + d, mask=ms, other=0.0).to(tl.float64)
                span = hi - lo
                span = tl.where(_finite(span), span, 0.0)  # no finite atom: nothing to span
                span = tl.where(periodic, 1.0, tl.maximum(span, 0.0))
                tl.store(span_ptr + s * 3 + d, span.to(span_ptr.dtype.element_ty), mask=ms)
                length = tl.load(height_ptr + s * 3 + d, mask=ms, other=1.0) * span
                if d == 0:
                    l0 = length
                elif d == 1:
                    l1 = length
                else:
                    l2 = length
            if MODE == 0:  # cell list: bins at least the (slackened) cutoff wide
                v_x, v_y, v_z = w_x + cap * 0.0, w_y + cap * 0.0, w_z + cap * 0.0
            else:
                # clusters: columns as wide as a cluster of w_x atoms is tall at this density,
                # and w_y times as tall (flat axes count as one unit of length)
                ell = (tl.maximum(l0, 1e-30) * tl.maximum(l1, 1e-30)
                       * tl.maximum(l2, 1e-30))
                edge = tl.exp(tl.log(w_x * ell / cap) / 3.0)
                v_x, v_y, v_z = edge, edge, w_y * edge
            n0 = tl.floor(l0 / v_x)
            n1 = tl.floor(l1 / v_y)
            n2 = tl.floor(l2 / v_z)
            n0 = tl.minimum(tl.maximum(tl.where(n0 == n0, n0, 1.0), 1.0), 1048576.0)
            n1 = tl.minimum(tl.maximum(tl.where(n1 == n1, n1, 1.0), 1.0), 1048576.0)
            n2 = tl.minimum(tl.maximum(tl.where(n2 == n2, n2, 1.0), 1.0), 1048576.0)
            # at most about one bin per atom: each round meets the cap or pins an axis to one
            for _r in tl.static_range(3):
                prod = n0 * n1 * n2
                free = ((n0 > 1.0).to(tl.float64) + (n1 > 1.0).to(tl.float64)
                        + (n2 > 1.0).to(tl.float64))
                factor = tl.exp(tl.log(tl.minimum(cap / prod, 1.0)) / tl.maximum(free, 1.0))
                over = prod > cap
                n0 = tl.where(over & (n0 > 1.0), tl.maximum(tl.floor(n0 * factor), 1.0), n0)
                n1 = tl.where(over & (n1 > 1.0), tl.maximum(tl.floor(n1 * factor), 1.0), n1)
                n2 = tl.where(over & (n2 > 1.0), tl.maximum(tl.floor(n2 * factor), 1.0), n2)
            for d in tl.static_range(3):
                nb = n0 if d == 0 else (n1 if d == 1 else n2)
                length = l0 if d == 0 else (l1 if d == 1 else l2)
                tl.store(nbins_ptr + s * 3 + d, nb.to(tl.int32), mask=ms)
                if MODE == 0:  # cell list: the bins within one cutoff
                    periodic = tl.load(pbc_ptr + s * 3 + d, mask=ms, other=0) != 0
                    width = w_x if d == 0 else (w_y if d == 1 else w_z)
                    # a flat axis (length 0, one bin) reaches as far as the cap allows
                    reach = tl.where(length > 0.0,
                                     tl.ceil(width * nb / tl.where(length > 0.0, length, 1.0)),
                                     16384.0)
                    reach = tl.where(periodic, reach, tl.minimum(reach, nb - 1.0))
                    reach = _nan_to(reach, 0.0)
                    reach = tl.minimum(tl.maximum(reach, 0.0), 16384.0)
                    tl.store(reach_ptr + s * 3 + d, reach.to(tl.int32), mask=ms)
            bins = tl.where(ms, (n0 * n1 * n2).to(tl.int64), 0)
            ends = tl.cumsum(bins, 0) + carry
            tl.store(offset_ptr + s + 1, ends.to(tl.int32), mask=ms)
            carry = carry + tl.sum(bins, 0)


@triton.jit
def _bin_of(f, periodic, lo, span, nb):
    """(image, bin) of fractional coordinate f along one axis (any input, NaN included, lands
    in the grid)."""
    wrap = tl.where(periodic, tl.floor(f), 0.0)
    wrap = tl.minimum(tl.maximum(_nan_to(wrap, 0.0), -1073741824.0), 1073741824.0)
    rel = tl.where(periodic, f - wrap, (f - lo) / tl.where(span > 0.0, span, 1.0))
    c = tl.floor(_nan_to(rel * nb.to(f.dtype), 0.0))
    c = tl.where(tl.abs(c) < float("inf"), c, 0.0)
    c = tl.minimum(tl.maximum(c, 0.0), (nb - 1).to(f.dtype))
    return wrap, c.to(tl.int64)


@triton.jit
def _bin_kernel(pos_ptr, cells_ptr, atom_sys_ptr, inv_ptr, pbc_ptr, fmin_ptr, span_ptr,
                nbins_ptr, offset_ptr, wrapped_ptr, wrap_ptr, gid_ptr, key_ptr, count_ptr,
                ref_ptr, n_atoms, status_ptr, MODE: tl.constexpr, COMMIT: tl.constexpr,
                GUARDED: tl.constexpr, BLOCK: tl.constexpr):
    """Each atom's image n (frac - n in [0, 1) along periodic axes), wrapped position x - n @ C,
    global bin and sort key; atoms counted per bin. Cell lists number bins row-major; clusters
    along a serpentine through columns (x, y) and along z within them, so that consecutive
    bins are neighbours in space. COMMIT copies the positions to the Verlet reference."""
    if _guard(status_ptr, GUARDED):
        a = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ma = a < n_atoms
        s = tl.load(atom_sys_ptr + a, mask=ma, other=0).to(tl.int64)
        x, y, z, f0, f1, f2 = _frac(pos_ptr, inv_ptr, a, s, ma)
        p0 = tl.load(pbc_ptr + s * 3 + 0, mask=ma, other=0) != 0
        p1 = tl.load(pbc_ptr + s * 3 + 1, mask=ma, other=0) != 0
        p2 = tl.load(pbc_ptr + s * 3 + 2, mask=ma, other=0) != 0
        nb0 = tl.load(nbins_ptr + s * 3 + 0, mask=ma, other=1).to(tl.int64)
        nb1 = tl.load(nbins_ptr + s * 3 + 1, mask=ma, other=1).to(tl.int64)
        nb2 = tl.load(nbins_ptr + s * 3 + 2, mask=ma, other=1).to(tl.int64)
        n0, c0 = _bin_of(f0, p0, tl.load(fmin_ptr + s * 3 + 0, mask=ma, other=0.0),
                         tl.load(span_ptr + s * 3 + 0, mask=ma, other=1.0), nb0)
        n1, c1 = _bin_of(f1, p1, tl.load(fmin_ptr + s * 3 + 1, mask=ma, other=0.0),
                         tl.load(span_ptr + s * 3 + 1, mask=ma, other=1.0), nb1)
        n2, c2 = _bin_of(f2, p2, tl.load(fmin_ptr + s * 3 + 2, mask=ma, other=0.0),
                         tl.load(span_ptr + s * 3 + 2, mask=ma, other=1.0), nb2)
        cb = cells_ptr + s * 9
        wx = x - (n0 * tl.load(cb + 0, mask=ma, other=0.0) + n1 * tl.load(cb + 3, mask=ma,
                                                                          other=0.0)
                  + n2 * tl.load(cb + 6, mask=ma, other=0.0))
        wy = y - (n0 * tl.load(cb + 1, mask=ma, other=0.0) + n1 * tl.load(cb + 4, mask=ma,
                                                                          other=0.0)
                  + n2 * tl.load(cb + 7, mask=ma, other=0.0))
        wz = z - (n0 * tl.load(cb + 2, mask=ma, other=0.0) + n1 * tl.load(cb + 5, mask=ma,
                                                                          other=0.0)
                  + n2 * tl.load(cb + 8, mask=ma, other=0.0))
        tl.store(wrapped_ptr + a * 3 + 0, wx, mask=ma)
        tl.store(wrapped_ptr + a * 3 + 1, wy, mask=ma)
        tl.store(wrapped_ptr + a * 3 + 2, wz, mask=ma)
        tl.store(wrap_ptr + a * 3 + 0, n0.to(tl.int32), mask=ma)
        tl.store(wrap_ptr + a * 3 + 1, n1.to(tl.int32), mask=ma)
        tl.store(wrap_ptr + a * 3 + 2, n2.to(tl.int32), mask=ma)
        if MODE == 0:
            local = (c0 * nb1 + c1) * nb2 + c2
        else:
            c1 = tl.where(c0 % 2 == 1, nb1 - 1 - c1, c1)  # serpentine over columns
            column = c0 * nb1 + c1
            c2 = tl.where(column % 2 == 1, nb2 - 1 - c2, c2)  # and up / down the columns
            local = column * nb2 + c2
            # within a bin, atoms follow the column's direction
            tl.store(key_ptr + a, tl.where(column % 2 == 1, -f2, f2), mask=ma)
        gid = tl.load(offset_ptr + s, mask=ma, other=0).to(tl.int64) + local
        tl.store(gid_ptr + a, gid.to(tl.int32), mask=ma)
        tl.atomic_add(count_ptr + gid, 1, mask=ma, sem="relaxed")
        if COMMIT:
            tl.store(ref_ptr + a * 3 + 0, x, mask=ma)
            tl.store(ref_ptr + a * 3 + 1, y, mask=ma)
            tl.store(ref_ptr + a * 3 + 2, z, mask=ma)


@triton.jit
def _place_kernel(gid_ptr, start_ptr, cursor_ptr, tmp_ptr, n_atoms, status_ptr,
                  GUARDED: tl.constexpr, BLOCK: tl.constexpr):
    """Each atom into a free slot of its bin (order within a bin fixed by step 7)."""
    if _guard(status_ptr, GUARDED):
        a = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ma = a < n_atoms
        gid = tl.load(gid_ptr + a, mask=ma, other=0).to(tl.int64)
        slot = tl.load(start_ptr + gid, mask=ma, other=0) + tl.atomic_add(
            cursor_ptr + gid, 1, mask=ma, sem="relaxed").to(tl.int64)
        tl.store(tmp_ptr + slot, a.to(tl.int32), mask=ma)


@triton.jit
def _sort_bins_kernel(tmp_ptr, start_ptr, key_ptr, order_ptr, total_ptr, status_ptr,
                      USE_KEY: tl.constexpr, GUARDED: tl.constexpr, BLOCK: tl.constexpr):
    """Bin b's atoms in order of (key, atom index) (or atom index): each atom's rank is the
    number of the bin's atoms before it, counted BLOCK x BLOCK at a time."""
    b = tl.program_id(0).to(tl.int64)
    if _guard(status_ptr, GUARDED) & (b < tl.load(total_ptr).to(tl.int64)):
        lo = tl.load(start_ptr + b)
        hi = tl.load(start_ptr + b + 1)
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        for i0 in range(lo, hi, BLOCK):
            ki = i0 + lanes
            mi = ki < hi
            ai = tl.load(tmp_ptr + ki, mask=mi, other=0)
            if USE_KEY:
                vi = tl.load(key_ptr + ai, mask=mi, other=0.0)
            rank = tl.zeros([BLOCK], dtype=tl.int64)
            for j0 in range(lo, hi, BLOCK):
                kj = j0 + lanes
                mj = kj < hi
                aj = tl.load(tmp_ptr + kj, mask=mj, other=0)
                before = aj[None, :] < ai[:, None]
                if USE_KEY:
                    vj = tl.load(key_ptr + aj, mask=mj, other=0.0)
                    before = (vj[None, :] < vi[:, None]) | ((vj[None, :] == vi[:, None]) & before)
                before = before & mj[None, :]
                rank += tl.sum(before.to(tl.int64), 1)
            tl.store(order_ptr + lo + rank, ai, mask=mi)


@dataclass
class Bins:
    """Device buffers of one binning (sizes known on the host; values on the device).

    wrapped [N, 3] (dtype): x - n @ C; wrap int32 [N, 3]: the images n; order int32 [N]: atoms
    sorted by bin; bin_start int64 [max_bins + 1]; sys_nbins / sys_reach int32 [B, 3];
    sys_bin_offset int32 [B + 1] (offset[B]: the number of bins, on the device); max_bins: N + B.
    """

    wrapped: torch.Tensor
    wrap: torch.Tensor
    order: torch.Tensor
    bin_start: torch.Tensor
    sys_nbins: torch.Tensor
    sys_reach: torch.Tensor
    sys_bin_offset: torch.Tensor
    max_bins: int


def bin_atoms(positions: torch.Tensor, cells: torch.Tensor, pbc_i32: torch.Tensor,
              system_ptr: torch.Tensor, atom_system: torch.Tensor, widths: torch.Tensor, *,
              mode: int = CELL_LIST, status: torch.Tensor | None = None,
              reference: torch.Tensor | None = None, out: Bins | None = None) -> Bins:
    """Bin the atoms (steps 1-7 of the module docstring).

    Args:
        positions: [N, 3] float32/float64, contiguous. cells: [B, 3, 3] same dtype.
        pbc_i32: int32 [B, 3]. system_ptr: int64 [B + 1]. atom_system: int64 [N].
        widths: [3] (positions' dtype) target bin widths: the cutoff with its slack (cell
            lists: bins at least that wide), or the cluster grid's widths.
        mode: CELL_LIST or CLUSTERS (serpentine order, atoms sorted along z within bins).
        status: int32 [1] status word: guarded mode (work only when bit 0 is set).
        reference: [N, 3] buffer that receives the positions (a Verlet list's reference).
        out: buffers of a previous call to reuse (guarded mode keeps one set per list).
    """
    dev, dtype = positions.device, positions.dtype
    n, nsys = positions.shape[0], cells.shape[0]
    max_bins = n + nsys
    guarded = status is not None
    st = status if guarded else system_ptr  # any pointer: unread when not guarded
    if out is None:
        out = Bins(wrapped=torch.empty(n, 3, dtype=dtype, device=dev),
                   wrap=torch.empty(n, 3, dtype=torch.int32, device=dev),
                   order=torch.empty(n, dtype=torch.int32, device=dev),
                   bin_start=torch.empty(max_bins + 1, dtype=torch.int64, device=dev),
                   sys_nbins=torch.empty(nsys, 3, dtype=torch.int32, device=dev),
                   sys_reach=torch.zeros(nsys, 3, dtype=torch.int32, device=dev),
                   sys_bin_offset=torch.empty(nsys + 1, dtype=torch.int32, device=dev),
                   max_bins=max_bins)
    inv = torch.empty(nsys, 9, dtype=torch.float64, device=dev)
    heights = torch.empty(nsys, 3, dtype=torch.float64, device=dev)
    fmin = torch.empty(nsys, 3, dtype=dtype, device=dev)
    fmax = torch.empty(nsys, 3, dtype=dtype, device=dev)
    span = torch.empty(nsys, 3, dtype=dtype, device=dev)
    count = torch.empty(max_bins + 1, dtype=torch.int32, device=dev)
    cursor = torch.empty(max_bins + 1, dtype=torch.int32, device=dev)
    gid = torch.empty(n, dtype=torch.int32, device=dev)
    key = torch.empty(n if mode == CLUSTERS else 1, dtype=dtype, device=dev)
    tmp = torch.empty(n, dtype=torch.int32, device=dev)
    atom_blocks = (max(1, triton.cdiv(n, _BLOCK_A)),)
    _frames_kernel[(triton.cdiv(nsys, _BLOCK_S),)](cells, pbc_i32, inv, heights, fmin, fmax,
                                                   nsys, st, GUARDED=guarded, BLOCK_S=_BLOCK_S)
    _extent_kernel[atom_blocks](positions, atom_system, inv, pbc_i32, fmin, fmax, count, cursor,
                                n, max_bins + 1, st, GUARDED=guarded, BLOCK=_BLOCK_A)
    _grid_kernel[(1,)](heights, pbc_i32, system_ptr, fmin, fmax, widths, span, out.sys_nbins,
                       out.sys_reach, out.sys_bin_offset, nsys, st, MODE=mode, GUARDED=guarded,
                       BLOCK_S=_BLOCK_S)
    commit = reference is not None
    _bin_kernel[atom_blocks](positions, cells, atom_system, inv, pbc_i32, fmin, span,
                             out.sys_nbins, out.sys_bin_offset, out.wrapped, out.wrap, gid, key,
                             count, reference if commit else positions, n, st, MODE=mode,
                             COMMIT=commit, GUARDED=guarded, BLOCK=_BLOCK_A)
    total = out.sys_bin_offset[nsys:]  # the number of bins, on the device
    common.scan(count, out.bin_start, total, status)
    _place_kernel[atom_blocks](gid, out.bin_start, cursor, tmp, n, st, GUARDED=guarded,
                               BLOCK=_BLOCK_A)
    _sort_bins_kernel[(max_bins,)](tmp, out.bin_start, key, out.order, total, st,
                                   USE_KEY=mode == CLUSTERS, GUARDED=guarded,
                                   BLOCK=_BLOCK_RANK)
    return out


def _specs():
    specs = []
    for g in (False, True):
        st = "*i32" if g else "*i64"
        tag = "guarded" if g else "plain"
        specs.append({"kernel": _frames_kernel, "name": f"_frames_kernel[{tag}]",
                      "signature": {"cells_ptr": "*fp32", "pbc_ptr": "*i32", "inv_ptr": "*fp64",
                                    "height_ptr": "*fp64", "fmin_ptr": "*fp32",
                                    "fmax_ptr": "*fp32", "n_sys": "i32", "status_ptr": st,
                                    "GUARDED": "constexpr", "BLOCK_S": "constexpr"},
                      "constexprs": {"GUARDED": g, "BLOCK_S": _BLOCK_S},
                      "dtypes": ("fp32", "fp64")})
        specs.append({"kernel": _extent_kernel, "name": f"_extent_kernel[{tag}]",
                      "signature": {"pos_ptr": "*fp32", "atom_sys_ptr": "*i64",
                                    "inv_ptr": "*fp64", "pbc_ptr": "*i32", "fmin_ptr": "*fp32",
                                    "fmax_ptr": "*fp32", "count_ptr": "*i32",
                                    "cursor_ptr": "*i32", "n_atoms": "i32", "n_counters": "i32",
                                    "status_ptr": st, "GUARDED": "constexpr",
                                    "BLOCK": "constexpr"},
                      "constexprs": {"GUARDED": g, "BLOCK": _BLOCK_A},
                      "dtypes": ("fp32", "fp64")})
        for mode in (CELL_LIST, CLUSTERS):
            specs.append({"kernel": _grid_kernel, "name": f"_grid_kernel[{tag},mode={mode}]",
                          "signature": {"height_ptr": "*fp64", "pbc_ptr": "*i32",
                                        "sys_ptr": "*i64", "fmin_ptr": "*fp32",
                                        "fmax_ptr": "*fp32", "width_ptr": "*fp32",
                                        "span_ptr": "*fp32", "nbins_ptr": "*i32",
                                        "reach_ptr": "*i32", "offset_ptr": "*i32",
                                        "n_sys": "i32", "status_ptr": st, "MODE": "constexpr",
                                        "GUARDED": "constexpr", "BLOCK_S": "constexpr"},
                          "constexprs": {"MODE": mode, "GUARDED": g, "BLOCK_S": _BLOCK_S},
                          "dtypes": ("fp32", "fp64")})
            for commit in (False, True):
                specs.append({
                    "kernel": _bin_kernel,
                    "name": f"_bin_kernel[{tag},mode={mode}{',commit' if commit else ''}]",
                    "signature": {"pos_ptr": "*fp32", "cells_ptr": "*fp32",
                                  "atom_sys_ptr": "*i64", "inv_ptr": "*fp64",
                                  "pbc_ptr": "*i32", "fmin_ptr": "*fp32", "span_ptr": "*fp32",
                                  "nbins_ptr": "*i32", "offset_ptr": "*i32",
                                  "wrapped_ptr": "*fp32", "wrap_ptr": "*i32", "gid_ptr": "*i32",
                                  "key_ptr": "*fp32", "count_ptr": "*i32", "ref_ptr": "*fp32",
                                  "n_atoms": "i32", "status_ptr": st, "MODE": "constexpr",
                                  "COMMIT": "constexpr", "GUARDED": "constexpr",
                                  "BLOCK": "constexpr"},
                    "constexprs": {"MODE": mode, "COMMIT": commit, "GUARDED": g,
                                   "BLOCK": _BLOCK_A},
                    "dtypes": ("fp32", "fp64")})
        specs.append({"kernel": _place_kernel, "name": f"_place_kernel[{tag}]",
                      "signature": {"gid_ptr": "*i32", "start_ptr": "*i64", "cursor_ptr": "*i32",
                                    "tmp_ptr": "*i32", "n_atoms": "i32", "status_ptr": st,
                                    "GUARDED": "constexpr", "BLOCK": "constexpr"},
                      "constexprs": {"GUARDED": g, "BLOCK": _BLOCK_A}})
        for use_key in (False, True):
            specs.append({"kernel": _sort_bins_kernel,
                          "name": f"_sort_bins_kernel[{tag}{',key' if use_key else ''}]",
                          "signature": {"tmp_ptr": "*i32", "start_ptr": "*i64",
                                        "key_ptr": "*fp32", "order_ptr": "*i32",
                                        "total_ptr": "*i32", "status_ptr": st,
                                        "USE_KEY": "constexpr", "GUARDED": "constexpr",
                                        "BLOCK": "constexpr"},
                          "constexprs": {"USE_KEY": use_key, "GUARDED": g, "BLOCK": _BLOCK_RANK},
                          # the key pointer takes the positions' dtype even where unused
                          "dtypes": ("fp32", "fp64")})
    return specs


AOT_SPECS = _specs()
