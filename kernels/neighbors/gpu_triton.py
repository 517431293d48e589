"""Neighbor lists on CUDA with Triton: a cell list with exact counts, a capacity mode for
Verlet lists that never synchronises, and the pair-vector maps.

Algorithm: the classic cell (linked-cell) list of molecular dynamics (Allen & Tildesley,
"Computer Simulation of Liquids", ch. 5), laid out as on GPUs (atoms sorted by bin, CSR bin
offsets; Anderson, Lorenz & Travesset, J. Comput. Phys. 227 (2008) 5342). Binning is a handful
of Triton kernels for all systems of a batch at once (kernels/gpu_binning.py); two kernels then
visit, for every atom, the bins within reach: a count pass sizes every CSR row exactly and a
fill pass writes it.

Trade-off: one program per bin, testing a BLOCK_I x BLOCK_J tile at a time (atoms of the bin x
candidates of one bin in reach). The two passes run the same code (so the fill pass writes
exactly what the count pass counted, and its writes are also bounded by the row end and the
capacity) and need shared memory only for the tile reductions; the price is idle lanes on bins
holding fewer atoms than the tile, and the count work done twice. Distances use wrapped
positions, (w_j - w_i) + image offset, with the offset folded once per visited bin;
subtracting first keeps a pair and its mirror exactly antisymmetric. Bins are at least one
cutoff wide (reach 1, 27 bins visited) and capped near the number of atoms, so sparse systems
do not allocate huge grids; cells thinner than the cutoff get one bin and a longer reach, which
visits each image of that bin once. Aimed at the common range of ML force fields (10^3..10^6
atoms, 10..100 neighbours per atom); tile sizes were chosen from ptxas register counts, not yet
timed on hardware.

Host synchronisations: ``neighbor_list`` reads one number back (the number of pairs, to
allocate the list). ``neighbor_list_into`` (capacity mode) reads none: it writes up to the
capacity of the buffers it is given, raises the OVERFLOW bit of a device status word when the
list does not fit (never truncating silently), and, guarded by that word, does nothing in steps
that keep the list (``verlet_check`` decides on the device). pair_vectors,
pair_vectors_transpose and neighbor_reverse never synchronise. All of them can be captured in
a CUDA graph except ``neighbor_list``.

Determinism: neighbor_list, neighbor_list_into, pair_vectors and neighbor_reverse give bitwise
identical results for a given input (the order of pairs within a row is fixed by the bin sort,
made deterministic by ranking). pair_vectors_transpose adds with relaxed atomics and is not
bitwise deterministic on a GPU. Distances are stored with IEEE square roots (``sqrt_rn``; the
default float32 ``sqrt`` is approximate), so a listed pair never shows a distance at or beyond
the cutoff.

Every Triton kernel of this file is listed in ``AOT_SPECS`` for ``python -m fastff.aot``.
Sizes (atom, pair, bin counts) and the cutoff are run-time arguments: a new system size never
recompiles; only block sizes are ``tl.constexpr``. Offsets are 64-bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastff.kernels import gpu_binning, gpu_common
from fastff.kernels._runtime import memory

# Tile of (atoms of the bin) x (candidates of a bin in reach) tested at once, per dtype and
# pass. Bins are >= 1 cutoff wide: at 0.1 atoms/A^3 and a 5 A cutoff a bin holds ~13 atoms on
# average. Chosen within 128 registers and without spills on sm_80 and sm_90 (python -m
# fastff.aot; README "Tuning"); distances are computed as (x_j - x_i) + offset for exact pair/mirror
# symmetry, which costs registers.
_COUNT_TILES = {torch.float32: (8, 32), torch.float64: (8, 8)}
_FILL_TILES = {torch.float32: (8, 32), torch.float64: (4, 32)}
_CELL_WARPS = 4
_PAIR_BLOCK = 128
_REVERSE_BLOCK = 128
_PAD_BLOCK = 1024
_SLACK = gpu_binning.SLACK


# ------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _sqrt_ieee(x):
    """Correctly rounded square root (float32 ``sqrt`` is approximate; float64's is IEEE)."""
    if x.dtype == tl.float32:
        r = tl.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r


@triton.jit
def _bin_system(offset_ptr, b, n_sys):
    """The system that owns global bin b: the largest s with offset[s] <= b (bisection)."""
    lo = tl.zeros([], dtype=tl.int64)
    hi = lo + n_sys
    while hi - lo > 1:
        mid = (lo + hi) // 2
        right = tl.load(offset_ptr + mid).to(tl.int64) <= b
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _cell_list_pass(pos_ptr, cell_ptr, cutoff_ptr, order_ptr, wrap_ptr, bin_start_ptr,
                    sys_bin_offset_ptr, sys_nbins_ptr, sys_reach_ptr, sys_pbc_ptr, n_sys,
                    half, count_ptr, row_ptr, i_out_ptr, j_out_ptr, shift_out_ptr, dist_out_ptr,
                    capacity, status_ptr, FILL: tl.constexpr, GUARDED: tl.constexpr,
                    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """One program per bin: its atoms (BLOCK_I rows at a time) against the bins in reach."""
    b = tl.program_id(0).to(tl.int64)
    total = tl.load(sys_bin_offset_ptr + n_sys).to(tl.int64)
    if gpu_binning._guard(status_ptr, GUARDED) & (b < total):
        a0 = tl.load(bin_start_ptr + b)
        a1 = tl.load(bin_start_ptr + b + 1)
        s = _bin_system(sys_bin_offset_ptr, b, n_sys)
        off = tl.load(sys_bin_offset_ptr + s).to(tl.int64)
        nx = tl.load(sys_nbins_ptr + 3 * s).to(tl.int64)
        ny = tl.load(sys_nbins_ptr + 3 * s + 1).to(tl.int64)
        nz = tl.load(sys_nbins_ptr + 3 * s + 2).to(tl.int64)
        rx = tl.load(sys_reach_ptr + 3 * s).to(tl.int64)
        ry = tl.load(sys_reach_ptr + 3 * s + 1).to(tl.int64)
        rz = tl.load(sys_reach_ptr + 3 * s + 2).to(tl.int64)
        px = tl.load(sys_pbc_ptr + 3 * s)
        py = tl.load(sys_pbc_ptr + 3 * s + 1)
        pz = tl.load(sys_pbc_ptr + 3 * s + 2)
        local = b - off
        bz = local % nz
        by = (local // nz) % ny
        bx = local // (nz * ny)
        # Periodic axes visit every offset in [-r, r] (wrapping, with an image shift); the
        # others clip the search to the grid.
        lox = tl.where(px != 0, -rx, tl.maximum(-rx, -bx))
        hix = tl.where(px != 0, rx, tl.minimum(rx, nx - 1 - bx))
        loy = tl.where(py != 0, -ry, tl.maximum(-ry, -by))
        hiy = tl.where(py != 0, ry, tl.minimum(ry, ny - 1 - by))
        loz = tl.where(pz != 0, -rz, tl.maximum(-rz, -bz))
        hiz = tl.where(pz != 0, rz, tl.minimum(rz, nz - 1 - bz))
        c00 = tl.load(cell_ptr + 9 * s)
        c01 = tl.load(cell_ptr + 9 * s + 1)
        c02 = tl.load(cell_ptr + 9 * s + 2)
        c10 = tl.load(cell_ptr + 9 * s + 3)
        c11 = tl.load(cell_ptr + 9 * s + 4)
        c12 = tl.load(cell_ptr + 9 * s + 5)
        c20 = tl.load(cell_ptr + 9 * s + 6)
        c21 = tl.load(cell_ptr + 9 * s + 7)
        c22 = tl.load(cell_ptr + 9 * s + 8)
        cut = tl.load(cutoff_ptr)
        cut2 = cut * cut
        lowest = tl.where(half != 0, 0, -2147483647)  # smallest j - i kept
        rows = tl.arange(0, BLOCK_I).to(tl.int64)
        lanes = tl.arange(0, BLOCK_J).to(tl.int64)
        for ib in range(a0, a1, BLOCK_I):
            ka = ib + rows
            ma = ka < a1
            i = tl.load(order_ptr + ka, mask=ma, other=0).to(tl.int64)
            xi = tl.load(pos_ptr + 3 * i, mask=ma, other=0.0)[:, None]
            yi = tl.load(pos_ptr + 3 * i + 1, mask=ma, other=0.0)[:, None]
            zi = tl.load(pos_ptr + 3 * i + 2, mask=ma, other=0.0)[:, None]
            if FILL:
                acc = tl.load(row_ptr + i, mask=ma, other=0)  # next free slot of each row
                row_end = tl.minimum(tl.load(row_ptr + i + 1, mask=ma, other=0),
                                     capacity)[:, None]
            else:
                acc = tl.zeros([BLOCK_I], dtype=tl.int64)  # pairs counted so far per row
            ii = i[:, None]
            mi = ma[:, None]
            for ox in range(lox, hix + 1):
                tx = bx + ox
                jx = ((tx % nx) + nx) % nx  # the same in C and Python remainder semantics
                swx = (tx - jx) // nx  # exact division: the image shift of the wrapped bin
                # r_ij = (w_j - w_i) + S_w @ cell for wrapped positions w; the image part is
                # summed axis by axis outside the loops that do not change it. Subtracting w_i
                # first makes the mirror pair compute exactly the negation: full lists stay
                # symmetric even for distances that round to the cutoff.
                fx = swx.to(cut.dtype)
                ex_x = fx * c00
                ey_x = fx * c01
                ez_x = fx * c02
                for oy in range(loy, hiy + 1):
                    ty = by + oy
                    jy = ((ty % ny) + ny) % ny
                    swy = (ty - jy) // ny
                    fy = swy.to(cut.dtype)
                    ex_y = ex_x + fy * c10
                    ey_y = ey_x + fy * c11
                    ez_y = ez_x + fy * c12
                    g_y = off + (jx * ny + jy) * nz
                    key_y = (swx * 65536 + swy) * 65536
                    for oz in range(loz, hiz + 1):
                        tz = bz + oz
                        jz = ((tz % nz) + nz) % nz
                        swz = (tz - jz) // nz
                        fz = swz.to(cut.dtype)
                        ex = ex_y + fz * c20
                        ey = ey_y + fz * c21
                        ez = ez_y + fz * c22
                        # i == j implies n_i == n_j: a self-image's final shift is S_w, whose
                        # sign in lexicographic order is the sign of key (|S_w| < 2^15).
                        key = key_y + swz
                        self_ok = tl.where(half != 0, key, tl.abs(key)) > 0
                        g = g_y + jz
                        j0 = tl.load(bin_start_ptr + g)
                        j1 = tl.load(bin_start_ptr + g + 1)
                        for jb in range(j0, j1, BLOCK_J):
                            kb = jb + lanes
                            mb = kb < j1
                            j = tl.load(order_ptr + kb, mask=mb, other=0).to(tl.int64)
                            dx = (tl.load(pos_ptr + 3 * j, mask=mb, other=0.0)[None, :] - xi) + ex
                            dy = (tl.load(pos_ptr + 3 * j + 1, mask=mb, other=0.0)[None, :]
                                  - yi) + ey
                            dz = (tl.load(pos_ptr + 3 * j + 2, mask=mb, other=0.0)[None, :]
                                  - zi) + ez
                            d2 = dx * dx + dy * dy + dz * dz
                            # j > i (half) or j != i (full); j == i only for images
                            diff = j[None, :] - ii
                            keep = tl.where(diff == 0, self_ok, diff > lowest)
                            keep = keep & mi & mb[None, :] & (d2 < cut2)
                            kept = keep.to(tl.int32)
                            if FILL:
                                slot = acc[:, None] + (tl.cumsum(kept, 1) - 1).to(tl.int64)
                                ok = keep & (slot < row_end)  # never past the row or capacity
                                tl.store(i_out_ptr + slot, tl.broadcast_to(ii, slot.shape),
                                         mask=ok)
                                tl.store(j_out_ptr + slot, tl.broadcast_to(j[None, :],
                                                                           slot.shape), mask=ok)
                                # final shift S = S_w + n_i - n_j: relative to the positions
                                wj = wrap_ptr + 3 * j
                                wi = wrap_ptr + 3 * ii
                                sx = swx - tl.load(wj, mask=mb, other=0)[None, :]
                                tl.store(shift_out_ptr + 3 * slot,
                                         sx + tl.load(wi, mask=mi, other=0), mask=ok)
                                sy = swy - tl.load(wj + 1, mask=mb, other=0)[None, :]
                                tl.store(shift_out_ptr + 3 * slot + 1,
                                         sy + tl.load(wi + 1, mask=mi, other=0), mask=ok)
                                sz = swz - tl.load(wj + 2, mask=mb, other=0)[None, :]
                                tl.store(shift_out_ptr + 3 * slot + 2,
                                         sz + tl.load(wi + 2, mask=mi, other=0), mask=ok)
                                tl.store(dist_out_ptr + slot, _sqrt_ieee(d2), mask=ok)
                            acc += tl.sum(kept, 1).to(tl.int64)
            if not FILL:
                tl.store(count_ptr + i, acc, mask=ma)


# Integer arguments are not specialised (Triton would otherwise compile separate variants for
# values equal to 1 or divisible by 16): one compiled kernel per dtype serves every size.
@triton.jit(do_not_specialize=["n_sys", "half"])
def neighbor_count_kernel(pos_ptr, cell_ptr, cutoff_ptr, order_ptr, wrap_ptr, bin_start_ptr,
                          sys_bin_offset_ptr, sys_nbins_ptr, sys_reach_ptr, sys_pbc_ptr, n_sys,
                          half, count_ptr, status_ptr, GUARDED: tl.constexpr,
                          BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Count pass: count[i] = number of neighbours of atom i."""
    _cell_list_pass(pos_ptr, cell_ptr, cutoff_ptr, order_ptr, wrap_ptr, bin_start_ptr,
                    sys_bin_offset_ptr, sys_nbins_ptr, sys_reach_ptr, sys_pbc_ptr, n_sys, half,
                    count_ptr, count_ptr, count_ptr, count_ptr, count_ptr, count_ptr, 0,
                    status_ptr, False, GUARDED, BLOCK_I, BLOCK_J)


@triton.jit(do_not_specialize=["n_sys", "half", "capacity"])
def neighbor_fill_kernel(pos_ptr, cell_ptr, cutoff_ptr, order_ptr, wrap_ptr, bin_start_ptr,
                         sys_bin_offset_ptr, sys_nbins_ptr, sys_reach_ptr, sys_pbc_ptr, n_sys,
                         half, row_ptr, i_out_ptr, j_out_ptr, shift_out_ptr, dist_out_ptr,
                         capacity, status_ptr, GUARDED: tl.constexpr, BLOCK_I: tl.constexpr,
                         BLOCK_J: tl.constexpr):
    """Fill pass: writes row i at row_ptr[i]:row_ptr[i + 1] (slots below ``capacity``), in the
    order the count pass saw."""
    _cell_list_pass(pos_ptr, cell_ptr, cutoff_ptr, order_ptr, wrap_ptr, bin_start_ptr,
                    sys_bin_offset_ptr, sys_nbins_ptr, sys_reach_ptr, sys_pbc_ptr, n_sys, half,
                    row_ptr, row_ptr, i_out_ptr, j_out_ptr, shift_out_ptr, dist_out_ptr,
                    capacity, status_ptr, True, GUARDED, BLOCK_I, BLOCK_J)


@triton.jit(do_not_specialize=["n_atoms", "capacity", "n_cell"])
def neighbor_pad_kernel(row_ptr, i_out_ptr, j_out_ptr, shift_out_ptr, dist_out_ptr, cells_ptr,
                        ref_cells_ptr, n_atoms, capacity, n_cell, status_ptr,
                        BLOCK: tl.constexpr):
    """Capacity mode, after the fill pass: slots past the last pair hold the padding pair
    (i = j = N, no shift, infinite distance); OVERFLOW is raised when the pairs exceed the
    capacity; the rebuild count goes up by one; the cells become the Verlet reference. Guarded
    by the status word (int32 [2]: flags, rebuilds)."""
    if (tl.load(status_ptr) & 1) != 0:
        pid = tl.program_id(0).to(tl.int64)
        num_pairs = tl.load(row_ptr + n_atoms)
        k = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        pad = (k >= num_pairs) & (k < capacity)
        sentinel = tl.zeros([BLOCK], dtype=tl.int64) + n_atoms
        tl.store(i_out_ptr + k, sentinel, mask=pad)
        tl.store(j_out_ptr + k, sentinel, mask=pad)
        zero = tl.zeros([BLOCK], dtype=tl.int32)
        tl.store(shift_out_ptr + 3 * k, zero, mask=pad)
        tl.store(shift_out_ptr + 3 * k + 1, zero, mask=pad)
        tl.store(shift_out_ptr + 3 * k + 2, zero, mask=pad)
        tl.store(dist_out_ptr + k, tl.zeros([BLOCK], dtype=dist_out_ptr.dtype.element_ty)
                 + float("inf"), mask=pad)
        if pid == 0:
            tl.atomic_add(status_ptr + 1, 1, sem="relaxed")  # rebuilds so far
            if num_pairs > capacity:
                tl.atomic_or(status_ptr, 2, sem="relaxed")  # OVERFLOW
            c = tl.arange(0, BLOCK)
            mc = c < n_cell
            tl.store(ref_cells_ptr + c, tl.load(cells_ptr + c, mask=mc), mask=mc)


@triton.jit(do_not_specialize=["n_atoms", "n_cell"])
def verlet_check_kernel(pos_ptr, ref_ptr, cells_ptr, ref_cells_ptr, limit_ptr, n_atoms, n_cell,
                        status_ptr, BLOCK: tl.constexpr):
    """Sets REBUILD when an atom moved more than the limit (half the skin) since the last build
    or a cell changed, and NONFINITE (with REBUILD) when a position is NaN or inf."""
    pid = tl.program_id(0).to(tl.int64)
    a = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = a < n_atoms
    limit = tl.load(limit_ptr)
    moved2 = tl.zeros([BLOCK], dtype=limit.dtype)
    bad = a < 0
    for d in tl.static_range(3):
        x = tl.load(pos_ptr + a * 3 + d, mask=m, other=0.0)
        dx = x - tl.load(ref_ptr + a * 3 + d, mask=m, other=0.0)
        moved2 += dx * dx
        bad = bad | (m & ((x != x) | (tl.abs(x) == float("inf"))))
    far = m & (moved2 > limit * limit)
    if tl.max(far.to(tl.int32), 0) != 0:
        tl.atomic_or(status_ptr, 1, sem="relaxed")  # REBUILD
    if tl.max(bad.to(tl.int32), 0) != 0:
        tl.atomic_or(status_ptr, 1 | 4, sem="relaxed")  # REBUILD | NONFINITE
    if pid == 0:
        changed = False
        for c0 in range(0, n_cell, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            mc = c < n_cell
            diff = mc & (tl.load(cells_ptr + c, mask=mc, other=0.0)
                         != tl.load(ref_cells_ptr + c, mask=mc, other=0.0))
            changed = changed | (tl.max(diff.to(tl.int32), 0) != 0)
        if changed:
            tl.atomic_or(status_ptr, 1, sem="relaxed")


@triton.jit
def _pair_geometry(system_ptr, i_ptr, j_ptr, shift_ptr, n_pairs, n_atoms, n_systems,
                   batched, BLOCK: tl.constexpr):
    """Indices (clamped into range), shifts and system of one block of pairs."""
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = p < n_pairs
    i = tl.minimum(tl.maximum(tl.load(i_ptr + p, mask=m, other=0), 0), n_atoms - 1).to(tl.int64)
    j = tl.minimum(tl.maximum(tl.load(j_ptr + p, mask=m, other=0), 0), n_atoms - 1).to(tl.int64)
    sx = tl.load(shift_ptr + 3 * p, mask=m, other=0)
    sy = tl.load(shift_ptr + 3 * p + 1, mask=m, other=0)
    sz = tl.load(shift_ptr + 3 * p + 2, mask=m, other=0)
    s = tl.load(system_ptr + i, mask=m & (batched != 0), other=0)
    s = tl.minimum(tl.maximum(s, 0), n_systems - 1).to(tl.int64)
    return p, m, i, j, sx, sy, sz, s


@triton.jit(do_not_specialize=["n_pairs", "n_atoms", "n_systems", "batched"])
def pair_vectors_kernel(pos_ptr, cell_ptr, system_ptr, i_ptr, j_ptr, shift_ptr, out_ptr,
                        n_pairs, n_atoms, n_systems, batched, BLOCK: tl.constexpr):
    """r_ij = x_j - x_i + S @ cell[system(i)] for BLOCK pairs per program."""
    p, m, i, j, sx, sy, sz, s = _pair_geometry(system_ptr, i_ptr, j_ptr, shift_ptr, n_pairs,
                                                n_atoms, n_systems, batched, BLOCK)
    c = cell_ptr + 9 * s
    xi = tl.load(pos_ptr + 3 * i, mask=m, other=0.0)
    fx = sx.to(xi.dtype)
    fy = sy.to(xi.dtype)
    fz = sz.to(xi.dtype)
    for b in tl.static_range(3):
        cb = (fx * tl.load(c + b, mask=m, other=0.0) + fy * tl.load(c + 3 + b, mask=m, other=0.0)
              + fz * tl.load(c + 6 + b, mask=m, other=0.0))
        r = tl.load(pos_ptr + 3 * j + b, mask=m, other=0.0) - tl.load(pos_ptr + 3 * i + b,
                                                                        mask=m, other=0.0) + cb
        tl.store(out_ptr + 3 * p + b, r, mask=m)


@triton.jit(do_not_specialize=["n_pairs", "n_atoms", "n_systems", "batched"])
def pair_vectors_transpose_kernel(grad_ptr, cell_ptr, system_ptr, i_ptr, j_ptr, shift_ptr,
                                  grad_pos_ptr, grad_cell_ptr, n_pairs, n_atoms, n_systems,
                                  batched, BLOCK: tl.constexpr):
    """Adjoint of pair_vectors: g to +j and -i, S (x) g to the cell of system(i); atomics."""
    p, m, i, j, sx, sy, sz, s = _pair_geometry(system_ptr, i_ptr, j_ptr, shift_ptr, n_pairs,
                                                n_atoms, n_systems, batched, BLOCK)
    # Pairs come sorted by i, hence by system: the block's first system takes one reduced atomic
    # per cell entry; pairs of other systems in the block (batch boundaries) add one by one.
    # Only pairs with a nonzero shift touch the cell; blocks without any skip it.
    s0 = tl.min(tl.where(m, s, n_systems), 0)
    s0 = tl.minimum(s0, n_systems - 1)
    shifted = m & ((sx != 0) | (sy != 0) | (sz != 0))
    first = shifted & (s == s0)
    rest = shifted & (s != s0)
    any_shift = tl.max(shifted.to(tl.int32), 0) != 0
    for b in tl.static_range(3):
        g = tl.load(grad_ptr + 3 * p + b, mask=m, other=0.0)
        tl.atomic_add(grad_pos_ptr + 3 * j + b, g, mask=m, sem="relaxed")
        tl.atomic_add(grad_pos_ptr + 3 * i + b, -g, mask=m, sem="relaxed")
        if any_shift:
            gx = sx.to(g.dtype) * g
            gy = sy.to(g.dtype) * g
            gz = sz.to(g.dtype) * g
            tl.atomic_add(grad_cell_ptr + 9 * s0 + b, tl.sum(tl.where(first, gx, 0.0), 0),
                          sem="relaxed")
            tl.atomic_add(grad_cell_ptr + 9 * s0 + 3 + b, tl.sum(tl.where(first, gy, 0.0), 0),
                          sem="relaxed")
            tl.atomic_add(grad_cell_ptr + 9 * s0 + 6 + b, tl.sum(tl.where(first, gz, 0.0), 0),
                          sem="relaxed")
            tl.atomic_add(grad_cell_ptr + 9 * s + b, gx, mask=rest, sem="relaxed")
            tl.atomic_add(grad_cell_ptr + 9 * s + 3 + b, gy, mask=rest, sem="relaxed")
            tl.atomic_add(grad_cell_ptr + 9 * s + 6 + b, gz, mask=rest, sem="relaxed")


@triton.jit(do_not_specialize=["n_pairs", "n_atoms"])
def neighbor_reverse_kernel(i_ptr, j_ptr, shift_ptr, row_ptr, out_ptr, n_pairs, n_atoms,
                            BLOCK: tl.constexpr):
    """Mirror of each pair: scan row j for (j, i, -S); -1 when absent."""
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = p < n_pairs
    i = tl.load(i_ptr + p, mask=m, other=0)
    j = tl.minimum(tl.maximum(tl.load(j_ptr + p, mask=m, other=0), 0), n_atoms - 1)
    sx = tl.load(shift_ptr + 3 * p, mask=m, other=0)
    sy = tl.load(shift_ptr + 3 * p + 1, mask=m, other=0)
    sz = tl.load(shift_ptr + 3 * p + 2, mask=m, other=0)
    start = tl.load(row_ptr + j, mask=m, other=0)
    end = tl.minimum(tl.load(row_ptr + j + 1, mask=m, other=0), n_pairs)
    start = tl.maximum(start, 0)
    longest = tl.max(tl.where(m, end - start, 0), 0)
    found = tl.full([BLOCK], -1, tl.int64)
    for k in range(0, longest):
        q = start + k
        mq = m & (q < end) & (found < 0)
        jq = tl.load(j_ptr + q, mask=mq, other=-1)
        hit = mq & (jq == i)
        hit = hit & (tl.load(shift_ptr + 3 * q, mask=mq, other=0) == -sx)
        hit = hit & (tl.load(shift_ptr + 3 * q + 1, mask=mq, other=0) == -sy)
        hit = hit & (tl.load(shift_ptr + 3 * q + 2, mask=mq, other=0) == -sz)
        found = tl.where(hit, q, found)
    tl.store(out_ptr + p, found, mask=m)


# ------------------------------------------------------------------------------------------
# Launchers (signatures shared with reference.py and cpu_numba.py; see README.md)
# ------------------------------------------------------------------------------------------


def _float_dtype(x: Tensor, name: str) -> None:
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64 for the triton backend, got {x.dtype}")


def _prepare(positions: Tensor, cutoff: float, cells: Tensor, pbc: Tensor,
             system_ptr: Tensor):
    """(positions, cells, pbc int32, atom system, widths, cutoff tensor) as the kernels read
    them: contiguous, in the positions' dtype; constants from a device cache (no upload)."""
    dev, dtype = positions.device, positions.dtype
    n, nsys = positions.shape[0], cells.shape[0]
    pos = positions.detach().contiguous()
    cells = cells.detach().to(dtype).contiguous()
    counts = system_ptr[1:] - system_ptr[:-1]
    atom_system = torch.repeat_interleave(_arange(nsys, dev), counts, output_size=n)
    reach_cut = cutoff * (1.0 + _SLACK.get(dtype, 1e-4))
    widths = gpu_common.constants((reach_cut,) * 3, dtype, dev)
    cut = gpu_common.constants((cutoff,), dtype, dev)  # a tensor keeps float64 exact
    return pos, cells, pbc.to(torch.int32).contiguous(), atom_system, widths, cut


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device)


@functools.lru_cache(maxsize=64)
def _index_constant(value: int, device: torch.device) -> Tensor:
    return torch.full((1,), value, dtype=torch.int64, device=device)


def _pass_args(b: gpu_binning.Bins, cells: Tensor, cut: Tensor, pbc: Tensor, half: bool):
    return (b.wrapped, cells, cut, b.order, b.wrap, b.bin_start, b.sys_bin_offset, b.sys_nbins,
            b.sys_reach, pbc, cells.shape[0], int(half))


def _tiles(table, dtype):
    tile_i, tile_j = table.get(dtype, table[torch.float64])
    # No FMA contraction: the count and fill passes must round every distance identically, so
    # that the fill pass finds exactly the pairs counted (no slot left unwritten).
    return {"BLOCK_I": tile_i, "BLOCK_J": tile_j, "num_warps": _CELL_WARPS,
            "enable_fp_fusion": False}


def neighbor_list(positions: Tensor, cutoff: float, cells: Tensor, pbc: Tensor,
                  system_ptr: Tensor, half: bool):
    """Cell-list neighbor list: see README.md beside this file.

    Args:
        positions: [N,3] float32/float64, any length unit.
        cutoff: pairs with distance < cutoff are kept.
        cells: [B,3,3] lattice vectors as rows, same dtype as positions.
        pbc: bool [B,3].
        system_ptr: int64 [B+1], atoms of system s are system_ptr[s]:system_ptr[s+1].
        half: keep one pair of each mirror couple.

    Returns:
        i int64 [E], j int64 [E], shifts int32 [E,3], ptr int64 [N+1], distances [E] (dtype of
        positions). Sorted by i; within a row the order is deterministic (bin order). One host
        synchronisation (the number of pairs).
    """
    _float_dtype(positions, "positions")
    dev, dtype = positions.device, positions.dtype
    n = positions.shape[0]
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        return (empty, empty.clone(), torch.empty(0, 3, dtype=torch.int32, device=dev), ptr,
                torch.empty(0, dtype=dtype, device=dev))
    pos, cells, pbc_i32, atom_system, widths, cut = _prepare(positions, cutoff, cells, pbc,
                                                             system_ptr)
    b = gpu_binning.bin_atoms(pos, cells, pbc_i32, system_ptr, atom_system, widths)
    args = _pass_args(b, cells, cut, pbc_i32, half)
    grid = (b.max_bins,)
    count = torch.empty(n, dtype=torch.int64, device=dev)
    neighbor_count_kernel[grid](*args, count, ptr, GUARDED=False,
                                **_tiles(_COUNT_TILES, dtype))
    torch.cumsum(count, 0, out=ptr[1:])
    num_pairs = int(ptr[-1])  # the one host synchronisation: the size of the list
    memory.fits_in_memory(num_pairs * (8 + 8 + 12 + positions.element_size()),
                           "the neighbor list", dev)
    i = torch.empty(num_pairs, dtype=torch.int64, device=dev)
    j = torch.empty(num_pairs, dtype=torch.int64, device=dev)
    shifts = torch.empty(num_pairs, 3, dtype=torch.int32, device=dev)
    distances = torch.empty(num_pairs, dtype=dtype, device=dev)
    if num_pairs:
        neighbor_fill_kernel[grid](*args, ptr, i, j, shifts, distances, num_pairs, ptr,
                                   GUARDED=False, **_tiles(_FILL_TILES, dtype))
    return i, j, shifts, ptr, distances


def neighbor_list_into(positions: Tensor, cutoff: float, cells: Tensor, pbc: Tensor,
                       system_ptr: Tensor, half: bool, status: Tensor, reference: Tensor,
                       ref_cells: Tensor, i: Tensor, j: Tensor, shifts: Tensor, ptr: Tensor,
                       distances: Tensor) -> None:
    """Capacity mode: when ``status`` asks for a rebuild (bit 0), the list of
    :func:`neighbor_list` is written into the given buffers (capacity C = len(i)), padded past
    its end with the pair (N, N, 0, inf); OVERFLOW (bit 1) is raised if it holds more than C
    pairs (``ptr`` then counts them all; only the first C are written). The positions and
    cells become the Verlet reference. No host synchronisation: everything happens on the
    device, and nothing at all when no rebuild is asked for.

    Args:
        positions, cutoff, cells, pbc, system_ptr, half: as :func:`neighbor_list`.
        status: int32 [2] status word (kernels/_runtime/status.py). reference: [N, 3] and
            ref_cells: [B, 3, 3] in the positions' dtype. i, j: int64 [C]; shifts int32 [C, 3];
            ptr int64 [N + 1]; distances [C] (positions' dtype). All written in place.
    """
    _float_dtype(positions, "positions")
    dev, dtype = positions.device, positions.dtype
    n, capacity = positions.shape[0], i.shape[0]
    if n == 0:
        return
    pos, cells, pbc_i32, atom_system, widths, cut = _prepare(positions, cutoff, cells, pbc,
                                                             system_ptr)
    b = gpu_binning.bin_atoms(pos, cells, pbc_i32, system_ptr, atom_system, widths,
                              status=status, reference=reference)
    args = _pass_args(b, cells, cut, pbc_i32, half)
    grid = (b.max_bins,)
    count = torch.empty(n, dtype=torch.int64, device=dev)
    neighbor_count_kernel[grid](*args, count, status, GUARDED=True,
                                **_tiles(_COUNT_TILES, dtype))
    gpu_common.scan(count, ptr, _index_constant(n, dev), status)
    neighbor_fill_kernel[grid](*args, ptr, i, j, shifts, distances, capacity, status,
                               GUARDED=True, **_tiles(_FILL_TILES, dtype))
    neighbor_pad_kernel[(max(1, triton.cdiv(capacity, _PAD_BLOCK)),)](
        ptr, i, j, shifts, distances, cells, ref_cells, n, capacity, cells.numel(), status,
        BLOCK=_PAD_BLOCK)


def verlet_check(positions: Tensor, cells: Tensor, reference: Tensor, ref_cells: Tensor,
                 skin: float, status: Tensor) -> None:
    """A Verlet list's rebuild test on the device: keeps OVERFLOW of the status word (until the
    owner rebuilds with a larger capacity), clears the other bits, then sets REBUILD when an
    atom moved more than ``skin / 2`` since the reference or a cell differs from its reference,
    and NONFINITE when a position is not finite. No host synchronisation."""
    n = positions.shape[0]
    status[:1].bitwise_and_(gpu_common.OVERFLOW)
    if n == 0:
        return
    limit = gpu_common.constants((0.5 * skin,), positions.dtype, positions.device)
    cells = cells.detach().to(positions.dtype).contiguous()
    verlet_check_kernel[(triton.cdiv(n, _PAIR_BLOCK),)](
        positions.detach().contiguous(), reference, cells, ref_cells, limit, n, cells.numel(),
        status, BLOCK=_PAIR_BLOCK)


def _pair_args(cells: Tensor, atom_system: Tensor | None, i: Tensor, j: Tensor, shifts: Tensor):
    system = i if atom_system is None else atom_system.contiguous()
    return (cells.contiguous(), system, i.contiguous(), j.contiguous(),
            shifts.to(torch.int32).contiguous())


def pair_vectors(positions: Tensor, cells: Tensor, atom_system: Tensor | None, i: Tensor,
                 j: Tensor, shifts: Tensor) -> Tensor:
    """r_ij [E,3] = positions[j] - positions[i] + shifts @ cells[system(i)]; deterministic."""
    _float_dtype(positions, "positions")
    num_pairs = i.shape[0]
    out = positions.new_empty(num_pairs, 3)
    if num_pairs == 0:
        return out
    cells, system, i, j, shifts = _pair_args(cells, atom_system, i, j, shifts)
    grid = (triton.cdiv(num_pairs, _PAIR_BLOCK),)
    pair_vectors_kernel[grid](positions.contiguous(), cells, system, i, j, shifts, out, num_pairs,
                              positions.shape[0], cells.shape[0], int(atom_system is not None),
                              BLOCK=_PAIR_BLOCK)
    return out


def pair_vectors_transpose(grad: Tensor, num_atoms: int, cells: Tensor,
                           atom_system: Tensor | None, i: Tensor, j: Tensor, shifts: Tensor):
    """Adjoint of pair_vectors: (grad_positions [N,3], grad_cells [B,3,3]).

    Accumulates with atomics: on a GPU the summation order, hence the last bits of the result,
    may change from run to run (not bitwise deterministic).
    """
    _float_dtype(grad, "grad")
    grad_pos = grad.new_zeros(num_atoms, 3)
    grad_cells = grad.new_zeros(cells.shape)
    num_pairs = i.shape[0]
    if num_pairs == 0 or num_atoms == 0:
        return grad_pos, grad_cells
    cells, system, i, j, shifts = _pair_args(cells, atom_system, i, j, shifts)
    grid = (triton.cdiv(num_pairs, _PAIR_BLOCK),)
    pair_vectors_transpose_kernel[grid](grad.contiguous(), cells, system, i, j, shifts, grad_pos,
                                        grad_cells, num_pairs, num_atoms, cells.shape[0],
                                        int(atom_system is not None), BLOCK=_PAIR_BLOCK)
    return grad_pos, grad_cells


def neighbor_reverse(i: Tensor, j: Tensor, shifts: Tensor, ptr: Tensor) -> Tensor:
    """int64 [E]: index of the mirror (j, i, -S) of every pair, -1 where none; deterministic.

    Scans row j of the CSR layout for each pair: O(E x longest row in the block), no sort and
    no extra memory.
    """
    num_pairs = i.shape[0]
    out = torch.empty(num_pairs, dtype=torch.int64, device=i.device)
    if num_pairs == 0:
        return out
    grid = (triton.cdiv(num_pairs, _REVERSE_BLOCK),)
    neighbor_reverse_kernel[grid](i.contiguous(), j.contiguous(),
                                  shifts.to(torch.int32).contiguous(), ptr.contiguous(), out,
                                  num_pairs, ptr.shape[0] - 1, BLOCK=_REVERSE_BLOCK)
    return out


# ------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (python -m fastff.aot)
# ------------------------------------------------------------------------------------------


def _cell_signature(fp: str, fill: bool, guarded: bool) -> dict[str, str]:
    sig = {"pos_ptr": f"*{fp}", "cell_ptr": f"*{fp}", "cutoff_ptr": f"*{fp}", "order_ptr": "*i32",
           "wrap_ptr": "*i32", "bin_start_ptr": "*i64", "sys_bin_offset_ptr": "*i32",
           "sys_nbins_ptr": "*i32", "sys_reach_ptr": "*i32", "sys_pbc_ptr": "*i32",
           "n_sys": "i32", "half": "i32"}
    if fill:
        sig.update({"row_ptr": "*i64", "i_out_ptr": "*i64", "j_out_ptr": "*i64",
                    "shift_out_ptr": "*i32", "dist_out_ptr": f"*{fp}", "capacity": "i32"})
    else:
        sig["count_ptr"] = "*i64"
    sig.update({"status_ptr": "*i32" if guarded else "*i64", "GUARDED": "constexpr",
                "BLOCK_I": "constexpr", "BLOCK_J": "constexpr"})
    return sig


def _pair_signature(fp: str, transpose: bool) -> dict[str, str]:
    first = {"grad_ptr": f"*{fp}"} if transpose else {"pos_ptr": f"*{fp}"}
    sig = {**first, "cell_ptr": f"*{fp}", "system_ptr": "*i64", "i_ptr": "*i64", "j_ptr": "*i64",
           "shift_ptr": "*i32"}
    if transpose:
        sig.update({"grad_pos_ptr": f"*{fp}", "grad_cell_ptr": f"*{fp}"})
    else:
        sig["out_ptr"] = f"*{fp}"
    sig.update({"n_pairs": "i32", "n_atoms": "i32", "n_systems": "i32", "batched": "i32",
                "BLOCK": "constexpr"})
    return sig


_CELL_OPTIONS = {"num_warps": _CELL_WARPS, "enable_fp_fusion": False}  # as launched
_FP = (("fp32", torch.float32), ("fp64", torch.float64))
AOT_SPECS = [
    *({"kernel": kernel, "name": f"{kernel.__name__}[{'guarded,' if g else ''}{fp}]",
       "signature": _cell_signature(fp, fill, g),
       "constexprs": {"GUARDED": g, "BLOCK_I": tiles[dt][0], "BLOCK_J": tiles[dt][1]},
       "options": _CELL_OPTIONS}
      for kernel, fill, tiles in ((neighbor_count_kernel, False, _COUNT_TILES),
                                  (neighbor_fill_kernel, True, _FILL_TILES))
      for fp, dt in _FP for g in (False, True)),
    {"kernel": neighbor_pad_kernel, "name": "neighbor_pad_kernel",
     "signature": {"row_ptr": "*i64", "i_out_ptr": "*i64", "j_out_ptr": "*i64",
                   "shift_out_ptr": "*i32", "dist_out_ptr": "*fp32", "cells_ptr": "*fp32",
                   "ref_cells_ptr": "*fp32", "n_atoms": "i32", "capacity": "i32",
                   "n_cell": "i32", "status_ptr": "*i32", "BLOCK": "constexpr"},
     "constexprs": {"BLOCK": _PAD_BLOCK}, "dtypes": ("fp32", "fp64")},
    {"kernel": verlet_check_kernel, "name": "verlet_check_kernel",
     "signature": {"pos_ptr": "*fp32", "ref_ptr": "*fp32", "cells_ptr": "*fp32",
                   "ref_cells_ptr": "*fp32", "limit_ptr": "*fp32", "n_atoms": "i32",
                   "n_cell": "i32", "status_ptr": "*i32", "BLOCK": "constexpr"},
     "constexprs": {"BLOCK": _PAIR_BLOCK}, "dtypes": ("fp32", "fp64")},
    *({"kernel": pair_vectors_kernel, "name": f"pair_vectors_kernel[{fp}]",
       "signature": _pair_signature(fp, False), "constexprs": {"BLOCK": _PAIR_BLOCK}}
      for fp in ("fp32", "fp64")),
    *({"kernel": pair_vectors_transpose_kernel, "name": f"pair_vectors_transpose_kernel[{fp}]",
       "signature": _pair_signature(fp, True), "constexprs": {"BLOCK": _PAIR_BLOCK}}
      for fp in ("fp32", "fp64")),
    {"kernel": neighbor_reverse_kernel, "name": "neighbor_reverse_kernel",
     "signature": {"i_ptr": "*i64", "j_ptr": "*i64", "shift_ptr": "*i32", "row_ptr": "*i64",
                   "out_ptr": "*i64", "n_pairs": "i32", "n_atoms": "i32", "BLOCK": "constexpr"},
     "constexprs": {"BLOCK": _REVERSE_BLOCK}},
]
