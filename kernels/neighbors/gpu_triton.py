"""Neighbor lists on CUDA with Triton: a cell list with exact counts, and the pair-vector maps.

Algorithm: the classic cell (linked-cell) list of molecular dynamics (Allen & Tildesley,
"Computer Simulation of Liquids", ch. 5), laid out as on GPUs (atoms sorted by bin, CSR bin
offsets; Anderson, Lorenz & Travesset, J. Comput. Phys. 227 (2008) 5342). Binning is done in
torch for all systems of a batch at once; two Triton kernels then visit, for every atom, the
bins within reach: a count pass sizes every CSR row exactly and a fill pass writes it, so there
is no capacity to guess and nothing is ever truncated.

Trade-off: one program per bin, testing a BLOCK_I x BLOCK_J tile at a time (atoms of the bin x
candidates of one bin in reach). The two passes run the same code (so the fill pass writes
exactly what the count pass counted, and its writes are also bounded by the row end) and need
shared memory only for the tile reductions; the price is idle lanes on bins holding fewer atoms
than the tile, and the count work done twice. Distances use wrapped positions, (w_j - w_i) +
image offset, with the offset folded once per visited bin; subtracting first keeps a pair and its
mirror exactly antisymmetric. Bins are at least one cutoff wide
(reach 1, 27 bins visited) and capped near the number of atoms, so sparse systems do not
allocate huge grids; cells thinner than the cutoff get one bin and a longer reach, which visits
each image of that bin once. Aimed at the common range of ML force fields (10^3..10^6 atoms,
10..100 neighbours per atom); tile sizes were chosen from ptxas register counts, not yet timed
on hardware.

Determinism: neighbor_list, pair_vectors and neighbor_reverse give bitwise identical results for
a given input (the order of pairs within a row is fixed by the bin sort). pair_vectors_transpose
accumulates with atomics on the GPU and is not bitwise deterministic there.

CUDA graphs: neighbor_list reads two sizes back to the host (number of bins, number of pairs), so
it cannot be captured; pair_vectors, pair_vectors_transpose and neighbor_reverse never
synchronise and can be.

Every Triton kernel of this file is listed in ``AOT_SPECS`` for ``python -m fastff.aot``.
Sizes (atom, pair, bin counts) and the cutoff are run-time arguments: a new system size never
recompiles; only block sizes are ``tl.constexpr``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastff.kernels._runtime import memory

# Tile of (atoms of the bin) x (candidates of a bin in reach) tested at once, per dtype. Bins are
# >= 1 cutoff wide: at 0.1 atoms/A^3 and a 5 A cutoff a bin holds ~13 atoms on average. ptxas
# (python -m fastff.aot), 4 warps: 16 x 32 in float32 and 8 x 32 in float64 keep spills at or
# below 20 bytes (float64 16 x 32 spilled 120 bytes). Smaller tiles and 8 warps were tried and
# spilled as much: ptxas caps these kernels near 128 registers since distances are computed as
# (x_j - x_i) + offset for exact pair/mirror symmetry (the asymmetric form compiled spill-free).
_CELL_TILES = {torch.float32: (16, 32), torch.float64: (8, 32)}
_CELL_WARPS = 4
_PAIR_BLOCK = 128
_REVERSE_BLOCK = 128
# Largest reach per axis (bins visited on each side); only reached for absurd cutoff/cell ratios.
_MAX_REACH = 1 << 14
# Relative slack on the reach: binning happens in the input dtype, so fractional coordinates
# carry rounding errors; the slack makes sure no pair closer than cutoff * (1 - slack) is missed
# for positions up to ~800 cutoffs from the origin (float32: 2 * 6e-8 * 800 < 1e-4).
_SLACK = {torch.float32: 1e-4, torch.float64: 1e-10}


# ------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _cell_list_pass(pos_ptr, cell_ptr, cutoff_ptr, order_ptr, wrap_ptr, bin_start_ptr,
                    bin_system_ptr, sys_bin_offset_ptr, sys_nbins_ptr, sys_reach_ptr, sys_pbc_ptr,
                    half, count_ptr, row_ptr, j_out_ptr, shift_out_ptr, dist_out_ptr,
                    FILL: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """One program per bin: its atoms (BLOCK_I rows at a time) against the bins in reach."""
    b = tl.program_id(0)
    a0 = tl.load(bin_start_ptr + b)
    a1 = tl.load(bin_start_ptr + b + 1)
    s = tl.load(bin_system_ptr + b).to(tl.int64)
    off = tl.load(sys_bin_offset_ptr + s)
    nx = tl.load(sys_nbins_ptr + 3 * s)
    ny = tl.load(sys_nbins_ptr + 3 * s + 1)
    nz = tl.load(sys_nbins_ptr + 3 * s + 2)
    rx = tl.load(sys_reach_ptr + 3 * s)
    ry = tl.load(sys_reach_ptr + 3 * s + 1)
    rz = tl.load(sys_reach_ptr + 3 * s + 2)
    px = tl.load(sys_pbc_ptr + 3 * s)
    py = tl.load(sys_pbc_ptr + 3 * s + 1)
    pz = tl.load(sys_pbc_ptr + 3 * s + 2)
    local = b - off
    bz = local % nz
    by = (local // nz) % ny
    bx = local // (nz * ny)
    # Periodic axes visit every offset in [-r, r] (wrapping, with an image shift); the others
    # clip the search to the grid.
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
    rows = tl.arange(0, BLOCK_I)
    lanes = tl.arange(0, BLOCK_J)
    for ib in range(a0, a1, BLOCK_I):
        ka = ib + rows
        ma = ka < a1
        i = tl.load(order_ptr + ka, mask=ma, other=0)
        i64 = i.to(tl.int64)
        xi = tl.load(pos_ptr + 3 * i64, mask=ma, other=0.0)[:, None]
        yi = tl.load(pos_ptr + 3 * i64 + 1, mask=ma, other=0.0)[:, None]
        zi = tl.load(pos_ptr + 3 * i64 + 2, mask=ma, other=0.0)[:, None]
        if FILL:
            nix = tl.load(wrap_ptr + 3 * i64, mask=ma, other=0)[:, None]
            niy = tl.load(wrap_ptr + 3 * i64 + 1, mask=ma, other=0)[:, None]
            niz = tl.load(wrap_ptr + 3 * i64 + 2, mask=ma, other=0)[:, None]
            acc = tl.load(row_ptr + i64, mask=ma, other=0)  # next free slot of each row
            row_end = tl.load(row_ptr + i64 + 1, mask=ma, other=0)[:, None]
        else:
            acc = tl.zeros([BLOCK_I], dtype=tl.int64)  # pairs counted so far per row
        ii = i[:, None]
        mi = ma[:, None]
        for ox in range(lox, hix + 1):
            tx = bx + ox
            jx = ((tx % nx) + nx) % nx  # the same in C and Python remainder semantics
            swx = (tx - jx) // nx  # exact division: the image shift of the wrapped bin
            # r_ij = (w_j - w_i) + S_w @ cell for wrapped positions w; the image part is summed
            # axis by axis outside the loops that do not change it. Subtracting w_i first makes
            # the mirror pair compute exactly the negation: full lists stay symmetric even for
            # distances that round to the cutoff.
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
                key_y = (swx.to(tl.int64) * 65536 + swy) * 65536
                for oz in range(loz, hiz + 1):
                    tz = bz + oz
                    jz = ((tz % nz) + nz) % nz
                    swz = (tz - jz) // nz
                    fz = swz.to(cut.dtype)
                    ex = ex_y + fz * c20
                    ey = ey_y + fz * c21
                    ez = ez_y + fz * c22
                    # i == j implies n_i == n_j: a self-image's final shift is S_w, whose sign
                    # in lexicographic order is the sign of key (|S_w| < 2^15).
                    key = key_y + swz
                    self_ok = tl.where(half != 0, key, tl.abs(key)) > 0
                    g = g_y + jz
                    j0 = tl.load(bin_start_ptr + g)
                    j1 = tl.load(bin_start_ptr + g + 1)
                    for jb in range(j0, j1, BLOCK_J):
                        kb = jb + lanes
                        mb = kb < j1
                        j = tl.load(order_ptr + kb, mask=mb, other=0)
                        j64 = j.to(tl.int64)
                        dx = (tl.load(pos_ptr + 3 * j64, mask=mb, other=0.0)[None, :] - xi) + ex
                        dy = (tl.load(pos_ptr + 3 * j64 + 1, mask=mb, other=0.0)[None, :] - yi) + ey
                        dz = (tl.load(pos_ptr + 3 * j64 + 2, mask=mb, other=0.0)[None, :] - zi) + ez
                        d2 = dx * dx + dy * dy + dz * dz
                        # j > i (half) or j != i (full); j == i only for images
                        diff = j[None, :] - ii
                        keep = tl.where(diff == 0, self_ok, diff > lowest)
                        keep = keep & mi & mb[None, :] & (d2 < cut2)
                        kept = keep.to(tl.int32)
                        if FILL:
                            slot = acc[:, None] + (tl.cumsum(kept, 1) - 1).to(tl.int64)
                            ok = keep & (slot < row_end)  # never past the row counted
                            tl.store(j_out_ptr + slot, tl.broadcast_to(j64[None, :], slot.shape),
                                     mask=ok)
                            # final shift S = S_w + n_i - n_j: relative to the positions given
                            sx = (swx - tl.load(wrap_ptr + 3 * j64, mask=mb, other=0))[None, :]
                            sy = (swy - tl.load(wrap_ptr + 3 * j64 + 1, mask=mb, other=0))[None, :]
                            sz = (swz - tl.load(wrap_ptr + 3 * j64 + 2, mask=mb, other=0))[None, :]
                            tl.store(shift_out_ptr + 3 * slot, sx + nix, mask=ok)
                            tl.store(shift_out_ptr + 3 * slot + 1, sy + niy, mask=ok)
                            tl.store(shift_out_ptr + 3 * slot + 2, sz + niz, mask=ok)
                            tl.store(dist_out_ptr + slot, tl.sqrt(d2), mask=ok)
                        acc += tl.sum(kept, 1).to(tl.int64)
        if not FILL:
            tl.store(count_ptr + i64, acc, mask=ma)


# Integer arguments are not specialised (Triton would otherwise compile separate variants for
# values equal to 1 or divisible by 16): one compiled kernel per dtype serves every size.
@triton.jit(do_not_specialize=["half"])
def neighbor_count_kernel(pos_ptr, cell_ptr, cutoff_ptr, order_ptr, wrap_ptr, bin_start_ptr,
                          bin_system_ptr, sys_bin_offset_ptr, sys_nbins_ptr, sys_reach_ptr,
                          sys_pbc_ptr, half, count_ptr, BLOCK_I: tl.constexpr,
                          BLOCK_J: tl.constexpr):
    """Count pass: count[i] = number of neighbours of atom i."""
    _cell_list_pass(pos_ptr, cell_ptr, cutoff_ptr, order_ptr, wrap_ptr, bin_start_ptr,
                    bin_system_ptr, sys_bin_offset_ptr, sys_nbins_ptr, sys_reach_ptr, sys_pbc_ptr,
                    half, count_ptr, count_ptr, count_ptr, count_ptr, count_ptr,
                    False, BLOCK_I, BLOCK_J)


@triton.jit(do_not_specialize=["half"])
def neighbor_fill_kernel(pos_ptr, cell_ptr, cutoff_ptr, order_ptr, wrap_ptr, bin_start_ptr,
                         bin_system_ptr, sys_bin_offset_ptr, sys_nbins_ptr, sys_reach_ptr,
                         sys_pbc_ptr, half, row_ptr, j_out_ptr, shift_out_ptr, dist_out_ptr,
                         BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Fill pass: writes row i at row_ptr[i]:row_ptr[i + 1], in the order the count pass saw."""
    _cell_list_pass(pos_ptr, cell_ptr, cutoff_ptr, order_ptr, wrap_ptr, bin_start_ptr,
                    bin_system_ptr, sys_bin_offset_ptr, sys_nbins_ptr, sys_reach_ptr, sys_pbc_ptr,
                    half, row_ptr, row_ptr, j_out_ptr, shift_out_ptr, dist_out_ptr,
                    True, BLOCK_I, BLOCK_J)


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
    s0 = tl.min(tl.where(m, s, n_systems), 0)
    s0 = tl.minimum(s0, n_systems - 1)
    first = m & (s == s0)
    rest = m & (s != s0)
    for b in tl.static_range(3):
        g = tl.load(grad_ptr + 3 * p + b, mask=m, other=0.0)
        tl.atomic_add(grad_pos_ptr + 3 * j + b, g, mask=m)
        tl.atomic_add(grad_pos_ptr + 3 * i + b, -g, mask=m)
        gx = sx.to(g.dtype) * g
        gy = sy.to(g.dtype) * g
        gz = sz.to(g.dtype) * g
        tl.atomic_add(grad_cell_ptr + 9 * s0 + b, tl.sum(tl.where(first, gx, 0.0), 0))
        tl.atomic_add(grad_cell_ptr + 9 * s0 + 3 + b, tl.sum(tl.where(first, gy, 0.0), 0))
        tl.atomic_add(grad_cell_ptr + 9 * s0 + 6 + b, tl.sum(tl.where(first, gz, 0.0), 0))
        tl.atomic_add(grad_cell_ptr + 9 * s + b, gx, mask=rest)
        tl.atomic_add(grad_cell_ptr + 9 * s + 3 + b, gy, mask=rest)
        tl.atomic_add(grad_cell_ptr + 9 * s + 6 + b, gz, mask=rest)


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
# Binning (torch, batched over systems, on the tensors' device)
# ------------------------------------------------------------------------------------------


def _frames(cells: Tensor, pbc: Tensor) -> Tensor:
    """[B,3,3] binning frames: periodic rows of ``cells``, orthonormal completion elsewhere.

    The batched form of reference.lattice_frame (same construction, no loop over systems).
    """
    nsys = cells.shape[0]
    periodic = pbc.unsqueeze(-1)  # [B,3,1]
    basis = []  # [B,3] each; zero where the axis contributes nothing (yet)
    for k in range(3):
        v = cells[:, k]
        for u in basis:
            v = v - (v * u).sum(-1, keepdim=True) * u
        norm = v.norm(dim=-1, keepdim=True)
        basis.append(torch.where(periodic[:, k], v / norm.clamp_min(1e-300), 0.0))
    frame = cells.clone()
    eye = torch.eye(3, dtype=cells.dtype, device=cells.device).expand(nsys, 3, 3)
    rows = torch.arange(nsys, device=cells.device)
    for k in range(3):
        cand = eye
        for u in basis:  # Gram-Schmidt the three standard axes against the basis so far
            cand = cand - (cand * u.unsqueeze(1)).sum(-1, keepdim=True) * u.unsqueeze(1)
        norms = cand.norm(dim=-1)  # [B,3]; the best one is >= sqrt(1/3)
        best = norms.argmax(dim=1)
        v = cand[rows, best] / norms[rows, best].unsqueeze(-1)
        frame[:, k] = torch.where(periodic[:, k], frame[:, k], v)
        basis.append(torch.where(periodic[:, k], 0.0, v))
    # Right-handed where a non-periodic row can be flipped (as the reference does).
    aperiodic = ~pbc
    first = aperiodic & (aperiodic.cumsum(1) == 1)
    flip = (torch.linalg.det(frame) < 0).unsqueeze(-1) & first
    return torch.where(flip.unsqueeze(-1), -frame, frame)


def _heights(frame: Tensor) -> Tensor:
    """[B,3] distances between opposite faces of each frame's parallelepiped."""
    volume = torch.linalg.det(frame).abs().unsqueeze(-1)
    crosses = torch.stack([torch.linalg.cross(frame[:, (k + 1) % 3], frame[:, (k + 2) % 3])
                           for k in range(3)], dim=1)
    return volume / crosses.norm(dim=-1)


def _bins(positions: Tensor, cutoff: float, cells: Tensor, pbc: Tensor, system_ptr: Tensor):
    """Bin every atom; returns the tensors the kernels read (see neighbor_list)."""
    dev, dtype = positions.device, positions.dtype
    n, nsys = positions.shape[0], cells.shape[0]
    counts = system_ptr[1:] - system_ptr[:-1]
    atom_system = torch.repeat_interleave(torch.arange(nsys, device=dev), counts, output_size=n)

    # Per-system frame, inverse and heights: tiny [B,...] tensors, kept in float64.
    c64 = cells.detach().to(torch.float64)
    frame = _frames(c64, pbc)
    inv = torch.linalg.inv_ex(frame)[0]
    heights = _heights(frame)
    if nsys == 1:
        frac = positions @ inv[0].to(dtype)
    else:
        frac = torch.bmm(positions.unsqueeze(1), inv.to(dtype)[atom_system]).squeeze(1)
    per_atom_pbc = pbc[atom_system]
    wrap = torch.where(per_atom_pbc, torch.floor(frac), 0.0)
    wrap = torch.nan_to_num(wrap, nan=0.0).clamp(-(2.0**30), 2.0**30)  # NaN-safe, fits int32
    # Wrapped positions w = x - n @ cell: the kernels measure r_ij = w_j - w_i + S_w @ cell.
    if nsys == 1:
        wrapped = positions - wrap @ cells[0]
    else:
        wrapped = positions - torch.bmm(wrap.unsqueeze(1), cells[atom_system]).squeeze(1)

    # Extent of each system along its non-periodic axes (fractional units: frame rows there
    # are unit vectors, so this is a length).
    index = atom_system.unsqueeze(1).expand(n, 3)
    fmin = torch.full((nsys, 3), float("inf"), dtype=dtype, device=dev).scatter_reduce(
        0, index, frac, "amin")
    fmax = torch.full((nsys, 3), float("-inf"), dtype=dtype, device=dev).scatter_reduce(
        0, index, frac, "amax")
    span = torch.nan_to_num((fmax - fmin).to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    span = torch.where(pbc, 1.0, span.clamp_min(0.0))
    length = heights * span  # [B,3] extent of the binned region along each axis
    reach_cut = cutoff * (1.0 + _SLACK.get(dtype, 1e-4))

    # Bins at least one cutoff wide, at most ~ one per atom in every system.
    nbins = torch.nan_to_num(torch.floor(length / reach_cut), nan=1.0, posinf=2.0**20)
    nbins = nbins.clamp(1.0, 2.0**20)
    cap = counts.clamp_min(1).to(torch.float64)
    for _ in range(3):  # each round either meets the cap or pins one more axis to one bin
        prod = nbins.prod(1)
        over = (prod > cap).unsqueeze(1) & (nbins > 1)
        free_axes = (nbins > 1).sum(1).clamp_min(1)
        factor = ((cap / prod).clamp(max=1.0) ** (1.0 / free_axes)).unsqueeze(1)
        nbins = torch.where(over, torch.floor(nbins * factor).clamp_min(1.0), nbins)
    reach = torch.ceil(reach_cut * nbins / length)
    reach = torch.where(pbc, reach, torch.minimum(reach, nbins - 1))
    reach = torch.nan_to_num(reach, nan=0.0, posinf=_MAX_REACH).clamp(0, _MAX_REACH)
    nbins_i = nbins.to(torch.int64)

    # Bin of every atom, clamped into the grid whatever the input (NaN included).
    rel = torch.where(per_atom_pbc, frac - wrap,
                      (frac - fmin[atom_system]) / span[atom_system].to(dtype))
    cell_of = torch.floor(torch.nan_to_num(rel * nbins.to(dtype)[atom_system], nan=0.0,
                                           posinf=0.0, neginf=0.0))
    top = (nbins_i[atom_system] - 1).to(dtype)
    cell_of = torch.minimum(torch.maximum(cell_of, torch.zeros_like(cell_of)), top).to(torch.int64)
    bins_per_system = nbins_i.prod(1)
    bin_offset = torch.cumsum(bins_per_system, 0) - bins_per_system
    ny, nz = nbins_i[atom_system, 1], nbins_i[atom_system, 2]
    gid = bin_offset[atom_system] + (cell_of[:, 0] * ny + cell_of[:, 1]) * nz + cell_of[:, 2]
    num_bins = int(bins_per_system.sum())
    sorted_gid, order = torch.sort(gid, stable=True)
    # searchsorted rather than bincount: no hidden host synchronisation on CUDA
    bin_start = torch.searchsorted(sorted_gid, torch.arange(num_bins + 1, device=dev))
    bin_system = torch.repeat_interleave(torch.arange(nsys, device=dev), bins_per_system,
                                         output_size=num_bins)
    return dict(wrapped=wrapped.contiguous(), order=order.to(torch.int32),
                wrap=wrap.to(torch.int32).contiguous(),
                bin_start=bin_start.to(torch.int32), bin_system=bin_system.to(torch.int32),
                sys_bin_offset=bin_offset.to(torch.int32),
                sys_nbins=nbins_i.to(torch.int32).contiguous(),
                sys_reach=reach.to(torch.int32).contiguous(),
                sys_pbc=pbc.to(torch.int32).contiguous(), num_bins=num_bins)


# ------------------------------------------------------------------------------------------
# Launchers (signatures shared with reference.py and cpu_numba.py; see README.md)
# ------------------------------------------------------------------------------------------


def _float_dtype(x: Tensor, name: str) -> None:
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64 for the triton backend, got {x.dtype}")


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
        positions). Sorted by i; within a row the order is deterministic (bin order). Two host
        synchronisations (the number of bins and of pairs).
    """
    _float_dtype(positions, "positions")
    dev, dtype = positions.device, positions.dtype
    n = positions.shape[0]
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        return (empty, empty.clone(), torch.empty(0, 3, dtype=torch.int32, device=dev), ptr,
                torch.empty(0, dtype=dtype, device=dev))
    pos = positions.detach().contiguous()
    cells = cells.detach().to(dtype).contiguous()
    b = _bins(pos, cutoff, cells, pbc, system_ptr)
    cut = torch.tensor([cutoff], dtype=dtype, device=dev)  # a tensor keeps float64 exact
    args = (b["wrapped"], cells, cut, b["order"], b["wrap"], b["bin_start"], b["bin_system"],
            b["sys_bin_offset"], b["sys_nbins"], b["sys_reach"], b["sys_pbc"], int(half))
    grid = (b["num_bins"],)
    count = torch.zeros(n, dtype=torch.int64, device=dev)
    tile_i, tile_j = _CELL_TILES.get(dtype, _CELL_TILES[torch.float64])
    # No FMA contraction: the count and fill passes must round every distance identically, so
    # that the fill pass finds exactly the pairs counted (no slot left unwritten).
    blocks = {"BLOCK_I": tile_i, "BLOCK_J": tile_j, "num_warps": _CELL_WARPS,
              "enable_fp_fusion": False}
    neighbor_count_kernel[grid](*args, count, **blocks)
    ptr[1:] = torch.cumsum(count, 0)
    num_pairs = int(ptr[-1])
    memory.fits_in_memory(num_pairs * (8 + 8 + 12 + positions.element_size()),
                           "the neighbor list", dev)
    j = torch.empty(num_pairs, dtype=torch.int64, device=dev)
    shifts = torch.empty(num_pairs, 3, dtype=torch.int32, device=dev)
    distances = torch.empty(num_pairs, dtype=dtype, device=dev)
    if num_pairs:
        neighbor_fill_kernel[grid](*args, ptr, j, shifts, distances, **blocks)
    i = torch.repeat_interleave(torch.arange(n, device=dev), count, output_size=num_pairs)
    return i, j, shifts, ptr, distances


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


def _cell_signature(fp: str, fill: bool) -> dict[str, str]:
    sig = {"pos_ptr": f"*{fp}", "cell_ptr": f"*{fp}", "cutoff_ptr": f"*{fp}", "order_ptr": "*i32",
           "wrap_ptr": "*i32", "bin_start_ptr": "*i32", "bin_system_ptr": "*i32",
           "sys_bin_offset_ptr": "*i32", "sys_nbins_ptr": "*i32", "sys_reach_ptr": "*i32",
           "sys_pbc_ptr": "*i32", "half": "i32"}
    if fill:
        sig.update({"row_ptr": "*i64", "j_out_ptr": "*i64", "shift_out_ptr": "*i32",
                    "dist_out_ptr": f"*{fp}"})
    else:
        sig["count_ptr"] = "*i64"
    sig.update({"BLOCK_I": "constexpr", "BLOCK_J": "constexpr"})
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


_CELL_CONSTEXPRS = {fp: {"BLOCK_I": _CELL_TILES[dt][0], "BLOCK_J": _CELL_TILES[dt][1]}
                    for fp, dt in (("fp32", torch.float32), ("fp64", torch.float64))}
_CELL_OPTIONS = {"num_warps": _CELL_WARPS, "enable_fp_fusion": False}  # as launched
AOT_SPECS = [
    *({"kernel": neighbor_count_kernel, "name": f"neighbor_count_kernel[{fp}]",
       "signature": _cell_signature(fp, False), "constexprs": _CELL_CONSTEXPRS[fp],
       "options": _CELL_OPTIONS} for fp in ("fp32", "fp64")),
    *({"kernel": neighbor_fill_kernel, "name": f"neighbor_fill_kernel[{fp}]",
       "signature": _cell_signature(fp, True), "constexprs": _CELL_CONSTEXPRS[fp],
       "options": _CELL_OPTIONS} for fp in ("fp32", "fp64")),
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
