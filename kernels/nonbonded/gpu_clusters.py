"""Cluster-tile nonbonded path for CUDA (Triton): the layout of OpenMM's CUDA nonbonded kernel
(32-atom blocks, interacting-block lists, exclusion bitmasks; Eastman & Pande, J. Comput. Chem.
31 (2010) 1268) written for Triton, for the energy and forces of one system (MD).

* **Clusters.** Atoms are binned into columns of about one cluster's width along a serpentine
  through the (x, y) grid and sorted by z (up and down alternate columns) with the shared
  binning kernels (kernels/gpu_binning.py); every 32 consecutive atoms of that order form a
  cluster, so there are ceil(N / 32) clusters whatever the positions.
* **Tiles.** Each cluster I lists the clusters J >= I whose bounding boxes come within
  ``rlist = cutoff + skin`` (minimum image of the box centres; the box gap is a lower bound on
  every atom pair's distance in every image). Tiles holding an excluded pair carry a 32 x 32
  bitmask; the others none. Two passes (count, then fill at scanned offsets) make the list
  deterministic; it is written into buffers of fixed capacity, and a tile count beyond it
  raises the OVERFLOW flag (the list is never silently truncated). Guarded like the neighbor
  list: a Verlet step that keeps the list launches the build kernels and they do nothing.
* **Kernel.** One program per cluster I keeps its 32 atoms in registers and walks its tiles:
  a 32 x 32 block of pairs with the minimum image along each periodic axis; I's forces are
  reduced along the tile and written once by their owner; J's are reduced across the tile and
  added with one relaxed atomic per atom and component (64-bit fixed point in torch's
  deterministic mode, then bitwise reproducible). Energies and virials are per-program sums,
  added in program order.

Limits: one system, no cell or an orthorhombic box whose lengths all exceed twice the cutoff
(the minimum image of a pair within the cutoff is then unique); the status word's BAD_CELL
flag reports a box that stops meeting this, and ForceField takes the pair list otherwise.
Parameter gradients use the pair list (kernels/nonbonded/gpu_triton.py). Positions are used as
given (not wrapped): in float32, atoms that diffused many box lengths lose precision in the
pair differences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastff.kernels import gpu_binning, gpu_common
from fastff.kernels.nonbonded.gpu_physics import pair_terms

CLUSTER = 32  # atoms per cluster: a 32 x 32 tile of pairs per step of the kernel
_COLUMN = 4.0  # bins of the clustering grid: a cluster's edge wide, four edges tall
_BLOCK_C = 64  # candidate clusters tested at once by the tile search
# warps of the count and fill passes: the only pairing without spills on sm_80 and sm_90 for
# every MAXEX and dtype (ptxas; README "Tuning")
_COUNT_WARPS = 4
_WARPS = 8
# The tile kernel takes J's lanes SUB at a time: float32 the whole 32 x 32 block on 8 warps
# (125 registers; 225 on 4 warps), float64 two 32 x 16 halves on 16 warps (126; 248 for the
# whole block on 8, 128 with spills on 16): ptxas, sm_90, see README "Tuning".
_SUB = {torch.float32: 32, torch.float64: 16}
_TILE_WARPS = {torch.float32: 8, torch.float64: 16}
_DT = {"fp32": torch.float32, "fp64": torch.float64}


# ---------------------------------------------------------------------------------------------
# Build


@triton.jit
def _box_check_kernel(cells_ptr, cutoff_ptr, periodic, status_ptr):
    """BAD_CELL when a periodic box is not orthorhombic or a length is not above twice the
    cutoff (then the minimum image of a pair within the cutoff may not be the pair)."""
    if periodic != 0:
        c = tl.arange(0, 16)
        m = c < 9
        v = tl.load(cells_ptr + c, mask=m, other=0.0)
        diag = (c == 0) | (c == 4) | (c == 8)
        cut = tl.load(cutoff_ptr)
        bad = m & ((~diag & (v != 0.0)) | (diag & ~(v > 2.0 * cut)))
        if tl.max(bad.to(tl.int32), 0) != 0:
            tl.atomic_or(status_ptr, 8, sem="relaxed")  # BAD_CELL


@triton.jit
def _boxes_kernel(pos_ptr, order_ptr, box_ptr, n_atoms, status_ptr, CL: tl.constexpr):
    """Bounding box of every cluster's atoms: centre and half extent, [C, 6]."""
    if (tl.load(status_ptr) & 1) != 0:
        c = tl.program_id(0).to(tl.int64)
        k = c * CL + tl.arange(0, CL)
        m = k < n_atoms
        a = tl.load(order_ptr + k, mask=m, other=0).to(tl.int64)
        for d in tl.static_range(3):
            x = tl.load(pos_ptr + a * 3 + d, mask=m, other=0.0)
            lo = tl.min(tl.where(m, x, float("inf")), 0)
            hi = tl.max(tl.where(m, x, -float("inf")), 0)
            tl.store(box_ptr + c * 6 + d, 0.5 * (lo + hi))
            tl.store(box_ptr + c * 6 + 3 + d, 0.5 * (hi - lo))


@triton.jit
def _exclusion_partners(order_ptr, slot_ptr, excl_ptr_ptr, excl_j_ptr, i_cluster, n_atoms,
                        CL: tl.constexpr, MAXEX: tl.constexpr):
    """For the atoms of cluster I: [CL, MAXEX] clusters and lanes of their excluded partners
    (-1 where none)."""
    k = i_cluster * CL + tl.arange(0, CL)
    mk = k < n_atoms
    a = tl.load(order_ptr + k, mask=mk, other=0).to(tl.int64)
    e0 = tl.load(excl_ptr_ptr + a, mask=mk, other=0)
    e1 = tl.load(excl_ptr_ptr + a + 1, mask=mk, other=0)
    e = e0[:, None] + tl.arange(0, MAXEX)[None, :]
    me = mk[:, None] & (e < e1[:, None])
    b = tl.load(excl_j_ptr + e, mask=me, other=0)
    slot = tl.load(slot_ptr + b, mask=me, other=0).to(tl.int64)
    return tl.where(me, slot // CL, -1), tl.where(me, slot % CL, 0)


@triton.jit
def _box_gap2(box_ptr, i_cluster, j, mj, lx, ly, lz, periodic):
    """Squared gap between the boxes of cluster I and clusters j (minimum image of the centres
    along periodic axes)."""
    gap2 = tl.zeros(j.shape, dtype=lx.dtype)
    for d in tl.static_range(3):
        length = lx if d == 0 else (ly if d == 1 else lz)
        dc = (tl.load(box_ptr + j * 6 + d, mask=mj, other=0.0)
              - tl.load(box_ptr + i_cluster * 6 + d))
        if periodic != 0:
            dc = dc - length * tl.floor(dc / length + 0.5)
        g = tl.maximum(tl.abs(dc) - tl.load(box_ptr + i_cluster * 6 + 3 + d)
                       - tl.load(box_ptr + j * 6 + 3 + d, mask=mj, other=0.0), 0.0)
        gap2 += g * g
    return gap2


@triton.jit
def _tile_pass(box_ptr, order_ptr, slot_ptr, excl_ptr_ptr, excl_j_ptr, cells_ptr, rlist_ptr,
               tile_count_ptr, xtile_count_ptr, tile_ptr_ptr, xtile_ptr_ptr, tile_j_ptr,
               tile_x_ptr, n_atoms, n_clusters, periodic, tile_cap, xtile_cap, status_ptr,
               FILL: tl.constexpr, CL: tl.constexpr, MAXEX: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """Cluster I's tiles: count them (and those holding exclusions), or write them at their
    scanned offsets, below the capacities."""
    if (tl.load(status_ptr) & 1) != 0:
        ci = tl.program_id(0).to(tl.int64)
        rl = tl.load(rlist_ptr)
        lx = tl.load(cells_ptr + 0).to(rl.dtype)
        ly = tl.load(cells_ptr + 4).to(rl.dtype)
        lz = tl.load(cells_ptr + 8).to(rl.dtype)
        pc, _ = _exclusion_partners(order_ptr, slot_ptr, excl_ptr_ptr, excl_j_ptr, ci, n_atoms,
                                    CL, MAXEX)
        if FILL:
            t = tl.load(tile_ptr_ptr + ci)
            x = tl.load(xtile_ptr_ptr + ci)
        else:
            t = tl.zeros([], dtype=tl.int64)
            x = tl.zeros([], dtype=tl.int64)
        for j0 in range(ci, n_clusters, BLOCK_C):
            j = j0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mj = j < n_clusters
            hit = mj & (_box_gap2(box_ptr, ci, j, mj, lx, ly, lz, periodic) < rl * rl)
            if tl.max(hit.to(tl.int32), 0) != 0:
                # which hits hold an excluded pair: J among the clusters of I's partners,
                # one column of partners (one per atom of I) at a time
                excl = tl.zeros([BLOCK_C], dtype=tl.int32)
                for e in range(0, MAXEX):
                    col = tl.sum(tl.where(tl.arange(0, MAXEX)[None, :] == e, pc, 0), 1)
                    excl += tl.sum((col[None, :] == j[:, None]).to(tl.int32), 1)
                xhit = hit & (excl > 0)
                if FILL:
                    slot = t + tl.cumsum(hit.to(tl.int64), 0) - 1
                    xslot = x + tl.cumsum(xhit.to(tl.int64), 0) - 1
                    ok = hit & (slot < tile_cap)
                    xok = xhit & (xslot < xtile_cap)
                    tl.store(tile_j_ptr + slot, j.to(tl.int32), mask=ok)
                    tl.store(tile_x_ptr + slot, tl.where(xok, xslot, -1).to(tl.int32), mask=ok)
                t += tl.sum(hit.to(tl.int64), 0)
                x += tl.sum(xhit.to(tl.int64), 0)
        if not FILL:
            tl.store(tile_count_ptr + ci, t)
            tl.store(xtile_count_ptr + ci, x)


@triton.jit(do_not_specialize=["n_atoms", "n_clusters", "periodic"])
def tile_count_kernel(box_ptr, order_ptr, slot_ptr, excl_ptr_ptr, excl_j_ptr, cells_ptr,
                      rlist_ptr, tile_count_ptr, xtile_count_ptr, n_atoms, n_clusters, periodic,
                      status_ptr, CL: tl.constexpr, MAXEX: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    _tile_pass(box_ptr, order_ptr, slot_ptr, excl_ptr_ptr, excl_j_ptr, cells_ptr, rlist_ptr,
               tile_count_ptr, xtile_count_ptr, tile_count_ptr, tile_count_ptr, tile_count_ptr,
               tile_count_ptr, n_atoms, n_clusters, periodic, 0, 0, status_ptr, False, CL, MAXEX,
               BLOCK_C)


@triton.jit(do_not_specialize=["n_atoms", "n_clusters", "periodic", "tile_cap", "xtile_cap"])
def tile_fill_kernel(box_ptr, order_ptr, slot_ptr, excl_ptr_ptr, excl_j_ptr, cells_ptr,
                     rlist_ptr, tile_ptr_ptr, xtile_ptr_ptr, tile_j_ptr, tile_x_ptr, n_atoms,
                     n_clusters, periodic, tile_cap, xtile_cap, status_ptr, CL: tl.constexpr,
                     MAXEX: tl.constexpr, BLOCK_C: tl.constexpr):
    _tile_pass(box_ptr, order_ptr, slot_ptr, excl_ptr_ptr, excl_j_ptr, cells_ptr, rlist_ptr,
               tile_ptr_ptr, tile_ptr_ptr, tile_ptr_ptr, xtile_ptr_ptr, tile_j_ptr, tile_x_ptr,
               n_atoms, n_clusters, periodic, tile_cap, xtile_cap, status_ptr, True, CL, MAXEX,
               BLOCK_C)


@triton.jit
def _slots_kernel(order_ptr, slot_ptr, n_atoms, status_ptr, BLOCK: tl.constexpr):
    """slot[atom] = its position in the cluster order (inverse of ``order``)."""
    if (tl.load(status_ptr) & 1) != 0:
        k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = k < n_atoms
        a = tl.load(order_ptr + k, mask=m, other=0)
        tl.store(slot_ptr + a, k.to(tl.int32), mask=m)


@triton.jit(do_not_specialize=["n_atoms", "tile_cap", "xtile_cap"])
def tile_masks_kernel(order_ptr, slot_ptr, excl_ptr_ptr, excl_j_ptr, tile_ptr_ptr, tile_j_ptr,
                      tile_x_ptr, mask_ptr, n_atoms, tile_cap, xtile_cap, status_ptr,
                      CL: tl.constexpr, MAXEX: tl.constexpr):
    """The exclusion bits of cluster I's tiles that hold excluded pairs: bit j of word i is
    set when lane i of I and lane j of J are excluded."""
    if (tl.load(status_ptr) & 1) != 0:
        ci = tl.program_id(0).to(tl.int64)
        pc, pl = _exclusion_partners(order_ptr, slot_ptr, excl_ptr_ptr, excl_j_ptr, ci, n_atoms,
                                     CL, MAXEX)
        lane_bit = tl.where(pc >= 0, 1 << pl.to(tl.int32), 0)
        t0 = tl.minimum(tl.load(tile_ptr_ptr + ci), tile_cap)
        t1 = tl.minimum(tl.load(tile_ptr_ptr + ci + 1), tile_cap)
        for t in range(t0, t1):
            xt = tl.load(tile_x_ptr + t).to(tl.int64)
            if (xt >= 0) & (xt < xtile_cap):
                cj = tl.load(tile_j_ptr + t).to(tl.int64)
                bits = tl.sum(tl.where(pc == cj, lane_bit, 0), 1)  # partners distinct: OR
                tl.store(mask_ptr + xt * CL + tl.arange(0, CL), bits)


@triton.jit
def _overflow_kernel(tile_ptr_ptr, xtile_ptr_ptr, cells_ptr, ref_cells_ptr, n_clusters,
                     tile_cap, xtile_cap, status_ptr):
    """OVERFLOW when the tiles (or exclusion tiles) exceed their capacity; counts a build; the
    cell becomes the Verlet reference."""
    if (tl.load(status_ptr) & 1) != 0:
        tl.atomic_add(status_ptr + 1, 1, sem="relaxed")
        c = tl.arange(0, 16)
        tl.store(ref_cells_ptr + c, tl.load(cells_ptr + c, mask=c < 9), mask=c < 9)
        if (tl.load(tile_ptr_ptr + n_clusters) > tile_cap) | (
                tl.load(xtile_ptr_ptr + n_clusters) > xtile_cap):
            tl.atomic_or(status_ptr, 2, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Energy and forces


@triton.jit
def _half_tile(pos_ptr, order_ptr, q_ptr, sig_ptr, eps_ptr, scal_ptr, vir_ptr, g_acc_ptr, ci, cj,
               xt, mask_ptr, li, mi, xi, yi, zi, qi, si, ei, lx, ly, lz, ilx, ily, ilz,
               n_atoms, coulomb, lj, use_switch, CL: tl.constexpr, SUB: tl.constexpr,
               H: tl.constexpr, DET: tl.constexpr):
    """Lanes [H SUB, (H + 1) SUB) of cluster J against the CL lanes of I: returns I's energy
    and gradient sums; J's gradients go out with one relaxed atomic per atom and component."""
    cutoff = tl.load(scal_ptr + 0)
    lj_lanes = H * SUB + tl.arange(0, SUB)
    kj = cj * CL + lj_lanes
    mj = kj < n_atoms
    aj = tl.load(order_ptr + kj, mask=mj, other=0).to(tl.int64)
    # r = x_j - x_i, shifted to the minimum image: S = -round(r / L) per periodic axis
    rx = tl.load(pos_ptr + aj * 3 + 0, mask=mj, other=0.0)[None, :] - xi[:, None]
    ry = tl.load(pos_ptr + aj * 3 + 1, mask=mj, other=0.0)[None, :] - yi[:, None]
    rz = tl.load(pos_ptr + aj * 3 + 2, mask=mj, other=0.0)[None, :] - zi[:, None]
    sx = -tl.floor(rx * ilx + 0.5)
    sy = -tl.floor(ry * ily + 0.5)
    sz = -tl.floor(rz * ilz + 0.5)
    rx += sx * lx
    ry += sy * ly
    rz += sz * lz
    d2 = rx * rx + ry * ry + rz * rz
    m = mi[:, None] & mj[None, :] & (d2 < cutoff * cutoff)
    m = m & ((cj != ci) | (lj_lanes[None, :] > li[:, None]))  # each pair once
    if xt >= 0:  # excluded pairs: bit j of word i
        bits = tl.load(mask_ptr + xt * CL + li)
        m = m & (((bits[:, None] >> lj_lanes[None, :]) & 1) == 0)
    energy, g, _, _, _, _ = pair_terms(
        d2, m, qi[:, None], tl.load(q_ptr + aj, mask=mj, other=0.0)[None, :], si[:, None],
        tl.load(sig_ptr + aj, mask=mj, other=0.0)[None, :], ei[:, None],
        tl.load(eps_ptr + aj, mask=mj, other=0.0)[None, :], scal_ptr, coulomb, lj, use_switch)
    gx = g * rx
    gy = g * ry
    gz = g * rz
    gj = g_acc_ptr + aj * 3  # J's gradients: reduced over the tile, one atomic per atom
    gpu_common.atomic_add_to(gj + 0, tl.sum(gx, 0), mj, DET)
    gpu_common.atomic_add_to(gj + 1, tl.sum(gy, 0), mj, DET)
    gpu_common.atomic_add_to(gj + 2, tl.sum(gz, 0), mj, DET)
    imaged = m & ((sx != 0.0) | (sy != 0.0) | (sz != 0.0))
    if tl.max(tl.max(imaged.to(tl.int32), 1), 0) != 0:  # image pairs: dE/dC += S (x) g
        tl.store(vir_ptr + 0, tl.load(vir_ptr + 0) + tl.sum(tl.sum(sx * gx, 1), 0))
        tl.store(vir_ptr + 1, tl.load(vir_ptr + 1) + tl.sum(tl.sum(sx * gy, 1), 0))
        tl.store(vir_ptr + 2, tl.load(vir_ptr + 2) + tl.sum(tl.sum(sx * gz, 1), 0))
        tl.store(vir_ptr + 3, tl.load(vir_ptr + 3) + tl.sum(tl.sum(sy * gx, 1), 0))
        tl.store(vir_ptr + 4, tl.load(vir_ptr + 4) + tl.sum(tl.sum(sy * gy, 1), 0))
        tl.store(vir_ptr + 5, tl.load(vir_ptr + 5) + tl.sum(tl.sum(sy * gz, 1), 0))
        tl.store(vir_ptr + 6, tl.load(vir_ptr + 6) + tl.sum(tl.sum(sz * gx, 1), 0))
        tl.store(vir_ptr + 7, tl.load(vir_ptr + 7) + tl.sum(tl.sum(sz * gy, 1), 0))
        tl.store(vir_ptr + 8, tl.load(vir_ptr + 8) + tl.sum(tl.sum(sz * gz, 1), 0))
    return tl.sum(energy, 1), tl.sum(gx, 1), tl.sum(gy, 1), tl.sum(gz, 1)


@triton.jit(do_not_specialize=["n_atoms", "tile_cap", "periodic", "coulomb", "lj",
                               "use_switch"])
def nonbonded_tiles_kernel(pos_ptr, cells_ptr, order_ptr, tile_ptr_ptr, tile_j_ptr, tile_x_ptr,
                           mask_ptr, q_ptr, sig_ptr, eps_ptr, scal_ptr, e_part_ptr, vir_part_ptr,
                           g_own_ptr, g_acc_ptr, n_atoms, tile_cap, periodic, coulomb, lj,
                           use_switch, CL: tl.constexpr, SUB: tl.constexpr, DET: tl.constexpr):
    """Cluster I against its tiles (see the module docstring), SUB lanes of J at a time."""
    ci = tl.program_id(0).to(tl.int64)
    ty = tl.load(scal_ptr + 0).dtype
    li = tl.arange(0, CL)
    ki = ci * CL + li
    mi = ki < n_atoms
    ai = tl.load(order_ptr + ki, mask=mi, other=0).to(tl.int64)
    xi = tl.load(pos_ptr + ai * 3 + 0, mask=mi, other=0.0)
    yi = tl.load(pos_ptr + ai * 3 + 1, mask=mi, other=0.0)
    zi = tl.load(pos_ptr + ai * 3 + 2, mask=mi, other=0.0)
    qi = tl.load(q_ptr + ai, mask=mi, other=0.0)
    si = tl.load(sig_ptr + ai, mask=mi, other=0.0)
    ei = tl.load(eps_ptr + ai, mask=mi, other=0.0)
    lx = tl.load(cells_ptr + 0)
    ly = tl.load(cells_ptr + 4)
    lz = tl.load(cells_ptr + 8)
    ilx = tl.where(periodic != 0, 1.0 / tl.where(lx != 0.0, lx, 1.0), 0.0)
    ily = tl.where(periodic != 0, 1.0 / tl.where(ly != 0.0, ly, 1.0), 0.0)
    ilz = tl.where(periodic != 0, 1.0 / tl.where(lz != 0.0, lz, 1.0), 0.0)
    zero = tl.zeros([CL], dtype=ty)
    fx = zero
    fy = zero
    fz = zero
    en = zero
    vir = vir_part_ptr + ci * 9
    t0 = tl.minimum(tl.load(tile_ptr_ptr + ci), tile_cap)
    t1 = tl.minimum(tl.load(tile_ptr_ptr + ci + 1), tile_cap)
    for t in range(t0, t1):
        cj = tl.load(tile_j_ptr + t).to(tl.int64)
        xt = tl.load(tile_x_ptr + t).to(tl.int64)
        for h in tl.static_range(CL // SUB):
            e_h, x_h, y_h, z_h = _half_tile(pos_ptr, order_ptr, q_ptr, sig_ptr, eps_ptr,
                                            scal_ptr, vir, g_acc_ptr, ci, cj, xt, mask_ptr, li,
                                            mi, xi, yi, zi, qi, si, ei, lx, ly, lz, ilx, ily,
                                            ilz, n_atoms, coulomb, lj, use_switch, CL, SUB, h,
                                            DET)
            en += e_h
            fx += x_h
            fy += y_h
            fz += z_h
    tl.store(e_part_ptr + ci, tl.sum(en, 0))
    tl.store(g_own_ptr + ai * 3 + 0, -fx, mask=mi)
    tl.store(g_own_ptr + ai * 3 + 1, -fy, mask=mi)
    tl.store(g_own_ptr + ai * 3 + 2, -fz, mask=mi)


# ---------------------------------------------------------------------------------------------
# Launchers (signatures shared with reference.py)


MAX_EXCLUSIONS = 32  # the most exclusions per atom the build kernels take (ForceField checks)


def max_exclusions_block(max_exclusions: int) -> int:
    """The MAXEX block of the build kernels: a power of two >= the most exclusions of an atom
    (at least 8, at most MAX_EXCLUSIONS)."""
    if max_exclusions > MAX_EXCLUSIONS:
        raise ValueError(f"the cluster-tile list takes at most {MAX_EXCLUSIONS} exclusions per "
                         f"atom, got {max_exclusions}: use the pair list")
    return max(8, triton.next_power_of_2(max(1, int(max_exclusions))))


def num_clusters(n: int) -> int:
    return triton.cdiv(n, CLUSTER)


def cluster_list_into(positions, cells, periodic, cutoff, rlist, excl_ptr, excl_j,
                      max_exclusions, status, reference, ref_cells, order, slot, tile_ptr,
                      xtile_ptr, tile_j, tile_x, masks):
    """Capacity-mode cluster-tile list (see the module docstring), in place; guarded by the
    status word like neighbor_list_into (no host synchronisation).

    Args:
        positions: [N, 3] float32/float64. cells: [1, 3, 3] (zeros without a box).
        periodic: the box is periodic (then orthorhombic, every length > 2 cutoff: else the
            BAD_CELL flag is raised). cutoff: interaction cutoff; rlist: list cutoff.
        excl_ptr, excl_j: int64 CSR of excluded partners; max_exclusions: the longest row.
        status: int32 [2]; reference [N, 3], ref_cells [1, 3, 3]: the Verlet reference.
        order: int32 [N] atoms in cluster order; slot: int32 [N] its inverse;
        tile_ptr, xtile_ptr: int64 [C + 1]; tile_j, tile_x: int32 [T] (capacity T);
        masks: int32 [X, 32] (capacity X).
    """
    dev, dtype = positions.device, positions.dtype
    n = positions.shape[0]
    nclus = num_clusters(n)
    pos = positions.detach().contiguous()
    cells = cells.detach().to(dtype).contiguous()
    cut = gpu_common.constants((cutoff,), dtype, dev)
    _box_check_kernel[(1,)](cells, cut, int(bool(periodic)), status)
    if n == 0:
        return
    b = gpu_binning.Bins(wrapped=torch.empty(n, 3, dtype=dtype, device=dev),
                         wrap=torch.empty(n, 3, dtype=torch.int32, device=dev), order=order,
                         bin_start=torch.empty(n + 2, dtype=torch.int64, device=dev),
                         sys_nbins=torch.empty(1, 3, dtype=torch.int32, device=dev),
                         sys_reach=torch.zeros(1, 3, dtype=torch.int32, device=dev),
                         sys_bin_offset=torch.empty(2, dtype=torch.int32, device=dev),
                         max_bins=n + 1)
    gpu_binning.bin_atoms(pos, cells, _pbc(bool(periodic), dev), _system_ptr(n, dev),
                          _zeros(n, dev), gpu_common.constants((CLUSTER, _COLUMN, 0.0), dtype,
                                                               dev),
                          mode=gpu_binning.CLUSTERS, status=status, reference=reference, out=b)
    _slots_kernel[(triton.cdiv(n, 1024),)](order, slot, n, status, BLOCK=1024)
    boxes = torch.empty(nclus, 6, dtype=dtype, device=dev)
    _boxes_kernel[(nclus,)](b.wrapped, order, boxes, n, status, CL=CLUSTER)
    maxex = max_exclusions_block(max_exclusions)
    rl = gpu_common.constants((rlist,), dtype, dev)
    counts = torch.empty(nclus, dtype=torch.int64, device=dev)
    xcounts = torch.empty(nclus, dtype=torch.int64, device=dev)
    common = (boxes, order, slot, excl_ptr, excl_j, cells, rl)
    tile_count_kernel[(nclus,)](*common, counts, xcounts, n, nclus, int(bool(periodic)), status,
                                CL=CLUSTER, MAXEX=maxex, BLOCK_C=_BLOCK_C,
                                num_warps=_COUNT_WARPS)
    size = _index(nclus, dev)
    gpu_common.scan(counts, tile_ptr, size, status)
    gpu_common.scan(xcounts, xtile_ptr, size, status)
    tile_fill_kernel[(nclus,)](*common, tile_ptr, xtile_ptr, tile_j, tile_x, n, nclus,
                               int(bool(periodic)), tile_j.shape[0], masks.shape[0], status,
                               CL=CLUSTER, MAXEX=maxex, BLOCK_C=_BLOCK_C, num_warps=_WARPS)
    tile_masks_kernel[(nclus,)](order, slot, excl_ptr, excl_j, tile_ptr, tile_j, tile_x, masks,
                                n, tile_j.shape[0], masks.shape[0], status, CL=CLUSTER,
                                MAXEX=maxex, num_warps=_WARPS)
    _overflow_kernel[(1,)](tile_ptr, xtile_ptr, cells, ref_cells, nclus, tile_j.shape[0],
                           masks.shape[0], status)


_CACHE: dict = {}


def _cached(key, make):
    value = _CACHE.get(key)
    if value is None:
        value = _CACHE[key] = make()
    return value


def _pbc(periodic: bool, device) -> torch.Tensor:
    return _cached(("pbc", periodic, device),
                   lambda: torch.full((1, 3), int(periodic), dtype=torch.int32, device=device))


def _system_ptr(n: int, device) -> torch.Tensor:
    def make():
        ptr = torch.full((2,), n, dtype=torch.int64, device=device)
        ptr[0] = 0
        return ptr

    return _cached(("system_ptr", n, device), make)


def _zeros(n: int, device) -> torch.Tensor:
    return _cached(("zeros", n, device),
                   lambda: torch.zeros(n, dtype=torch.int64, device=device))


def _index(n: int, device) -> torch.Tensor:
    return _cached(("index", n, device), lambda: torch.full((1,), n, dtype=torch.int64,
                                                            device=device))


def nonbonded_tiles(positions, cells, order, tile_ptr, tile_j, tile_x, masks, charges, sigma,
                    epsilon, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha,
                    coulomb_constant, periodic):
    """Launcher: energy [1], grad_positions [N, 3], grad_cells [1, 3, 3] over the tiles of a
    cluster list (one system; see the module docstring). Deterministic in torch's
    deterministic mode (fixed-point partner forces), else not bitwise."""
    from fastff.kernels.nonbonded.gpu_triton import scalars

    dev, dtype = positions.device, positions.dtype
    n = positions.shape[0]
    nclus = num_clusters(n)
    det = gpu_common.deterministic()
    e_part = torch.zeros(nclus, dtype=dtype, device=dev)
    vir_part = torch.zeros(nclus, 9, dtype=dtype, device=dev)
    g_own = torch.zeros(n, 3, dtype=dtype, device=dev)
    g_acc = torch.zeros(n, 3, dtype=torch.int64 if det else dtype, device=dev)
    if n:
        scal = scalars(cutoff, switch_distance, k_rf, c_rf, alpha, coulomb_constant, dtype,
                       dev)
        nonbonded_tiles_kernel[(nclus,)](
            positions.detach().contiguous(), cells.detach().to(dtype).contiguous(), order,
            tile_ptr, tile_j, tile_x, masks, charges.detach().contiguous(),
            sigma.detach().contiguous(), epsilon.detach().contiguous(), scal, e_part, vir_part,
            g_own, g_acc, n, tile_j.shape[0], int(bool(periodic)), int(coulomb),
            int(bool(lj)), int(switch_distance >= 0.0), CL=CLUSTER, SUB=_SUB[dtype], DET=det,
            num_warps=_TILE_WARPS[dtype])
    g_pos = g_own + (gpu_common.from_fixed(g_acc, dtype) if det else g_acc)
    return e_part.sum().reshape(1), g_pos, vir_part.sum(0).view(1, 3, 3)


def _build_specs():
    specs = []
    for fp in ("fp32", "fp64"):
        common = {"box_ptr": f"*{fp}", "order_ptr": "*i32", "slot_ptr": "*i32",
                  "excl_ptr_ptr": "*i64", "excl_j_ptr": "*i64", "cells_ptr": f"*{fp}",
                  "rlist_ptr": f"*{fp}"}
        for maxex in (8, 16, 32):
            const = {"CL": CLUSTER, "MAXEX": maxex, "BLOCK_C": _BLOCK_C}
            specs.append({"kernel": tile_count_kernel, "name": f"tile_count_kernel[ex{maxex},{fp}]",
                          "signature": {**common, "tile_count_ptr": "*i64",
                                        "xtile_count_ptr": "*i64", "n_atoms": "i32",
                                        "n_clusters": "i32", "periodic": "i32",
                                        "status_ptr": "*i32", "CL": "constexpr",
                                        "MAXEX": "constexpr", "BLOCK_C": "constexpr"},
                          "constexprs": const, "options": {"num_warps": _COUNT_WARPS}})
            specs.append({"kernel": tile_fill_kernel, "name": f"tile_fill_kernel[ex{maxex},{fp}]",
                          "signature": {**common, "tile_ptr_ptr": "*i64", "xtile_ptr_ptr": "*i64",
                                        "tile_j_ptr": "*i32", "tile_x_ptr": "*i32",
                                        "n_atoms": "i32", "n_clusters": "i32", "periodic": "i32",
                                        "tile_cap": "i32", "xtile_cap": "i32",
                                        "status_ptr": "*i32", "CL": "constexpr",
                                        "MAXEX": "constexpr", "BLOCK_C": "constexpr"},
                          "constexprs": const, "options": {"num_warps": _WARPS}})
        specs.append({"kernel": _boxes_kernel, "name": f"_boxes_kernel[{fp}]",
                      "signature": {"pos_ptr": f"*{fp}", "order_ptr": "*i32", "box_ptr": f"*{fp}",
                                    "n_atoms": "i32", "status_ptr": "*i32", "CL": "constexpr"},
                      "constexprs": {"CL": CLUSTER}})
        specs.append({"kernel": _box_check_kernel, "name": f"_box_check_kernel[{fp}]",
                      "signature": {"cells_ptr": f"*{fp}", "cutoff_ptr": f"*{fp}",
                                    "periodic": "i32", "status_ptr": "*i32"}})
        specs.append({"kernel": _overflow_kernel, "name": f"_overflow_kernel[{fp}]",
                      "signature": {"tile_ptr_ptr": "*i64", "xtile_ptr_ptr": "*i64",
                                    "cells_ptr": f"*{fp}", "ref_cells_ptr": f"*{fp}",
                                    "n_clusters": "i32", "tile_cap": "i32", "xtile_cap": "i32",
                                    "status_ptr": "*i32"}})
        for det in (False, True):
            acc = "i64" if det else fp
            specs.append({
                "kernel": nonbonded_tiles_kernel,
                "name": f"nonbonded_tiles_kernel[{'det,' if det else ''}{fp}]",
                "signature": {"pos_ptr": f"*{fp}", "cells_ptr": f"*{fp}", "order_ptr": "*i32",
                              "tile_ptr_ptr": "*i64", "tile_j_ptr": "*i32", "tile_x_ptr": "*i32",
                              "mask_ptr": "*i32", "q_ptr": f"*{fp}", "sig_ptr": f"*{fp}",
                              "eps_ptr": f"*{fp}", "scal_ptr": f"*{fp}", "e_part_ptr": f"*{fp}",
                              "vir_part_ptr": f"*{fp}", "g_own_ptr": f"*{fp}",
                              "g_acc_ptr": f"*{acc}", "n_atoms": "i32", "tile_cap": "i32",
                              "periodic": "i32", "coulomb": "i32", "lj": "i32",
                              "use_switch": "i32", "CL": "constexpr", "SUB": "constexpr",
                              "DET": "constexpr"},
                "constexprs": {"CL": CLUSTER, "SUB": _SUB[_DT[fp]], "DET": det},
                "options": {"num_warps": _TILE_WARPS[_DT[fp]]}})
    for maxex in (8, 16, 32):
        specs.append({"kernel": tile_masks_kernel, "name": f"tile_masks_kernel[ex{maxex}]",
                      "signature": {"order_ptr": "*i32", "slot_ptr": "*i32",
                                    "excl_ptr_ptr": "*i64", "excl_j_ptr": "*i64",
                                    "tile_ptr_ptr": "*i64", "tile_j_ptr": "*i32",
                                    "tile_x_ptr": "*i32", "mask_ptr": "*i32", "n_atoms": "i32",
                                    "tile_cap": "i32", "xtile_cap": "i32", "status_ptr": "*i32",
                                    "CL": "constexpr", "MAXEX": "constexpr"},
                      "constexprs": {"CL": CLUSTER, "MAXEX": maxex},
                      "options": {"num_warps": _WARPS}})
    specs.append({"kernel": _slots_kernel, "name": "_slots_kernel",
                  "signature": {"order_ptr": "*i32", "slot_ptr": "*i32", "n_atoms": "i32",
                                "status_ptr": "*i32", "BLOCK": "constexpr"},
                  "constexprs": {"BLOCK": 1024}})
    return specs


AOT_SPECS = _build_specs()
