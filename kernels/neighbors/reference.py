"""Neighbor lists in pure torch: an O(N^2 x images) brute force that defines "correct".

Float64-safe and device-agnostic; memory is bounded by processing one periodic image at a time
(N x N per image), so it is meant for tests and small systems, not production.
The launchers in this file share their signatures with cpu_numba.py and gpu_triton.py; see
README.md beside this file for the definitions.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from fastff.kernels._runtime import status as status_bits


def lattice_frame(cell: Tensor, pbc: Tensor) -> Tensor:
    """A well-conditioned [3,3] frame: the periodic rows of ``cell``, and unit vectors
    orthogonal to them (and to each other) in place of the non-periodic rows.

    Fractional coordinates in this frame are exact along periodic axes and Cartesian-like
    (unit length) along the others, so a cell whose non-periodic rows are zero or arbitrary
    still bins correctly.
    """
    frame = cell.clone()
    periodic = [k for k in range(3) if bool(pbc[k])]
    if len(periodic) == 3:
        return frame
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
    basis: list[Tensor] = []  # orthonormal basis of the periodic span
    for k in periodic:
        v = cell[k].clone()
        for b in basis:
            v = v - (v @ b) * b
        basis.append(v / v.norm())
    for k in range(3):
        if k in periodic:
            continue
        # Gram-Schmidt the standard axis that is least aligned with the basis built so far.
        best = None
        for e in eye:
            v = e.clone()
            for b in basis:
                v = v - (v @ b) * b
            if best is None or v.norm() > best.norm():
                best = v
        assert best is not None
        basis.append(best / best.norm())
        frame[k] = basis[-1]
    if torch.linalg.det(frame) < 0:  # keep a right-handed frame; only non-periodic rows flip
        k = next(k for k in range(3) if k not in periodic)
        frame[k] = -frame[k]
    return frame


def cell_heights(frame: Tensor) -> Tensor:
    """Distances between opposite faces of the parallelepiped spanned by ``frame`` rows."""
    volume = torch.linalg.det(frame).abs()
    crosses = torch.stack([torch.linalg.cross(frame[(k + 1) % 3], frame[(k + 2) % 3])
                           for k in range(3)])
    return volume / crosses.norm(dim=1)


def _system_pairs(pos: Tensor, cutoff: float, cell: Tensor, pbc: Tensor, half: bool):
    n = pos.shape[0]
    frame = lattice_frame(cell, pbc)
    frac = pos @ torch.linalg.inv(frame)
    wrap = torch.where(pbc, torch.floor(frac), torch.zeros_like(frac))  # n_a: pos = w + n_a @ cell
    wrapped = pos - wrap @ cell
    heights = cell_heights(frame)
    # Wrapped fractional coordinates differ by less than 1, so image S_k can hold a pair only if
    # (|S_k| - 1) * h_k < cutoff, i.e. |S_k| <= ceil(cutoff / h_k).
    reach = [math.ceil(cutoff / float(heights[k])) if bool(pbc[k]) else 0 for k in range(3)]
    found = []
    idx = torch.arange(n, device=pos.device)
    for image in itertools.product(*(range(-r, r + 1) for r in reach)):
        s = torch.tensor(image, dtype=pos.dtype, device=pos.device)
        d = (wrapped[None, :, :] - wrapped[:, None, :]) + s @ cell  # [i, j, 3], antisymmetric
        close = (d * d).sum(-1) < cutoff * cutoff
        if image == (0, 0, 0):
            close &= idx[:, None] != idx[None, :]
        ii, jj = close.nonzero(as_tuple=True)
        if ii.numel():
            shift = torch.tensor(image, dtype=torch.int64, device=pos.device)
            found.append((ii, jj, shift + wrap[ii].long() - wrap[jj].long()))
    if not found:
        empty = torch.empty(0, dtype=torch.int64, device=pos.device)
        return empty, empty, torch.empty(0, 3, dtype=torch.int64, device=pos.device)
    i = torch.cat([f[0] for f in found])
    j = torch.cat([f[1] for f in found])
    shifts = torch.cat([f[2].expand(f[0].shape[0], 3) if f[2].dim() == 1 else f[2] for f in found])
    if half:
        keep = (i < j) | ((i == j) & _lexicographically_positive(shifts))
        i, j, shifts = i[keep], j[keep], shifts[keep]
    return i, j, shifts


def _lexicographically_positive(s: Tensor) -> Tensor:
    return (s[:, 0] > 0) | ((s[:, 0] == 0) & ((s[:, 1] > 0) | ((s[:, 1] == 0) & (s[:, 2] > 0))))


def sort_pairs(i: Tensor, j: Tensor, shifts: Tensor) -> Tensor:
    """The permutation that orders pairs by (i, j, shift), as integers; a canonical order."""
    order = torch.arange(i.shape[0], device=i.device)
    for key in (shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i):  # least significant first
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def neighbor_list(positions: Tensor, cutoff: float, cells: Tensor, pbc: Tensor,
                  system_ptr: Tensor, half: bool):
    """Launcher: see README.md. Returns (i, j, shifts int32 [E,3], ptr [N+1], distances [E])."""
    n = positions.shape[0]
    pos64 = positions.detach().double()
    cells64 = cells.detach().double()
    parts = []
    bounds = system_ptr.tolist()
    for s in range(cells.shape[0]):
        lo, hi = bounds[s], bounds[s + 1]
        if hi - lo == 0:
            continue
        i, j, sh = _system_pairs(pos64[lo:hi], cutoff, cells64[s], pbc[s], half)
        parts.append((i + lo, j + lo, sh))
    if parts:
        i = torch.cat([p[0] for p in parts])
        j = torch.cat([p[1] for p in parts])
        shifts = torch.cat([p[2] for p in parts])
    else:
        i = j = torch.empty(0, dtype=torch.int64, device=positions.device)
        shifts = torch.empty(0, 3, dtype=torch.int64, device=positions.device)
    order = sort_pairs(i, j, shifts)
    i, j, shifts = i[order], j[order], shifts[order]
    atom_system = _atom_system(system_ptr, n)
    vec = pair_vectors(pos64, cells64, atom_system, i, j, shifts)
    distances = vec.norm(dim=1).to(positions.dtype)
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=positions.device)
    ptr[1:] = torch.cumsum(torch.bincount(i, minlength=n), 0)
    return i, j, shifts.to(torch.int32), ptr, distances


def _atom_system(system_ptr: Tensor, n: int) -> Tensor:
    counts = system_ptr[1:] - system_ptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.shape[0], device=system_ptr.device),
                                   counts, output_size=n)


def pair_vectors(positions: Tensor, cells: Tensor, atom_system: Tensor | None, i: Tensor,
                 j: Tensor, shifts: Tensor) -> Tensor:
    """r_ij = r_j - r_i + S @ cell[system(i)], [E,3]; autograd-native."""
    offset = shifts.to(positions.dtype)
    if atom_system is None:
        offset = offset @ cells[0]
    else:
        offset = torch.bmm(offset.unsqueeze(1), cells[atom_system[i]]).squeeze(1)
    return positions.index_select(0, j) - positions.index_select(0, i) + offset


def pair_vectors_transpose(grad: Tensor, num_atoms: int, cells: Tensor,
                           atom_system: Tensor | None, i: Tensor, j: Tensor, shifts: Tensor):
    """The adjoint of pair_vectors: (grad_positions [N,3], grad_cells [B,3,3])."""
    grad_pos = grad.new_zeros(num_atoms, 3)
    grad_pos.index_add_(0, j, grad)
    grad_pos.index_add_(0, i, -grad)
    outer = shifts.to(grad.dtype).unsqueeze(2) * grad.unsqueeze(1)  # [E,3,3]: S_a g_b
    grad_cells = grad.new_zeros(cells.shape)
    system = (torch.zeros_like(i) if atom_system is None else atom_system[i])
    grad_cells.index_add_(0, system, outer)
    return grad_pos, grad_cells


def neighbor_reverse(i: Tensor, j: Tensor, shifts: Tensor, ptr: Tensor) -> Tensor:
    """Index of the mirror (j, i, -S) of every pair of a full list; -1 where none exists."""
    s = shifts.long()
    n = ptr.shape[0] - 1
    span = int(s.abs().max()) * 2 + 1 if s.numel() else 1
    code = ((s[:, 0] + span // 2) * span + (s[:, 1] + span // 2)) * span + (s[:, 2] + span // 2)
    mirror_code = ((-s[:, 0] + span // 2) * span + (-s[:, 1] + span // 2)) * span + (
        -s[:, 2] + span // 2)
    key = (i * n + j) * span**3 + code
    mirror_key = (j * n + i) * span**3 + mirror_code
    sorted_key, order = torch.sort(key)
    pos = torch.searchsorted(sorted_key, mirror_key).clamp(max=max(key.shape[0] - 1, 0))
    found = (sorted_key[pos] == mirror_key if key.numel()
             else torch.zeros_like(key, dtype=torch.bool))
    return torch.where(found, order[pos], torch.full_like(pos, -1))


def neighbor_compact(positions: Tensor, cells: Tensor, atom_system: Tensor | None, i: Tensor,
                     j: Tensor, shifts: Tensor, ptr: Tensor, cutoff: float):
    """Launcher: the pairs closer than ``cutoff``, in their old order. Returns (i, j, shifts
    int32 [E',3], ptr [N+1], rank int32 [E]: index of each pair among the kept pairs of its row,
    -1 if dropped).

    Also the CUDA path (no Triton kernel: a handful of O(E) torch ops). The test is done in
    float64 as ``(x_j - x_i) + S @ C`` with the shift term summed row by row, elementwise, so
    that a pair and its mirror round to exactly negated vectors.
    """
    pos = positions.detach().to(torch.float64)
    n = pos.shape[0]
    rows = cells.detach().to(torch.float64)
    system = torch.zeros_like(i) if atom_system is None else atom_system[i]
    valid = (j >= 0) & (j < n)  # an out-of-range neighbour (value checks off) is dropped
    s = shifts.to(torch.float64)
    d = pos.index_select(0, torch.where(valid, j, 0)) - pos.index_select(0, i)
    d = d + (s[:, 0:1] * rows[system, 0] + s[:, 1:2] * rows[system, 1]
             + s[:, 2:3] * rows[system, 2])
    r2 = d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]
    keep = (r2 < cutoff * cutoff) & valid
    before = torch.zeros(keep.shape[0] + 1, dtype=torch.int64, device=keep.device)
    torch.cumsum(keep, 0, out=before[1:])  # before[e]: kept pairs ahead of pair e
    new_ptr = before[ptr]
    rank = torch.where(keep, before[:-1] - new_ptr[i], -1).to(torch.int32)
    return i[keep], j[keep], shifts[keep].to(torch.int32), new_ptr, rank


def neighbor_compact_reverse(reverse: Tensor, j: Tensor, ptr: Tensor, rank: Tensor,
                             new_ptr: Tensor, num_pairs: int) -> Tensor:
    """Launcher: the mirror index of a compacted list, -1 where the mirror was dropped."""
    n, m = ptr.shape[0] - 1, rank.shape[0]
    out = torch.full((num_pairs,), -1, dtype=torch.int64, device=rank.device)
    if m == 0:
        return out
    i = torch.repeat_interleave(torch.arange(n, device=ptr.device), ptr[1:] - ptr[:-1],
                                output_size=m)
    rank = rank.long()
    valid = (reverse >= 0) & (reverse < m) & (j >= 0) & (j < n)
    mirror_rank = torch.where(valid, rank[torch.where(valid, reverse, 0)], -1)
    mirror = torch.where(mirror_rank >= 0, new_ptr[torch.where(valid, j, 0)] + mirror_rank, -1)
    kept = rank >= 0
    out[(new_ptr[i] + rank)[kept]] = mirror[kept]
    return out


def pair_distances(positions: Tensor, cells: Tensor, atom_system: Tensor | None, i: Tensor,
                   j: Tensor, shifts: Tensor) -> Tensor:
    """Launcher: |x_j - x_i + S @ cell[system(i)]| [E] in the dtype of positions (the norm of
    ``pair_vectors``; materialises the [E, 3] vectors that the numba kernel avoids)."""
    vectors = pair_vectors(positions, cells.to(positions.dtype), atom_system, i, j, shifts)
    return torch.linalg.vector_norm(vectors, dim=1)


def pair_distances_transpose(grad: Tensor, positions: Tensor, cells: Tensor,
                             atom_system: Tensor | None, i: Tensor, j: Tensor, shifts: Tensor):
    """Launcher: (grad_positions [N,3], grad_cells [B,3,3]) of sum_e grad_e |r_ij|: the unit
    vectors (0 for coincident atoms, as torch's norm) times grad, through pair_vectors_transpose."""
    vectors = pair_vectors(positions, cells.to(positions.dtype), atom_system, i, j, shifts)
    norm = torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    unit = vectors / torch.where(norm == 0, 1, norm)
    return pair_vectors_transpose(grad.unsqueeze(1).to(unit.dtype) * unit, positions.shape[0],
                                  cells.to(positions.dtype), atom_system, i, j, shifts)


def verlet_check(positions: Tensor, cells: Tensor, reference: Tensor, ref_cells: Tensor,
                 skin: float, status: Tensor) -> None:
    """Sets the REBUILD flag of ``status`` when an atom moved more than ``skin / 2`` since
    ``reference`` or a cell differs from ``ref_cells``, NONFINITE (and REBUILD) for NaN or inf
    positions; keeps OVERFLOW, clears the other flags (kernels/_runtime/status.py)."""
    flags = int(status[0]) & status_bits.OVERFLOW
    if positions.shape[0]:
        x = positions.detach()
        moved2 = (x - reference).square().sum(1)
        if bool((moved2 > (0.5 * skin) ** 2).any()) or not torch.equal(
                cells.to(ref_cells.dtype), ref_cells):
            flags |= status_bits.REBUILD
        if not bool(torch.isfinite(x).all()):
            flags |= status_bits.REBUILD | status_bits.NONFINITE
    status[0] = flags


def neighbor_list_into(positions: Tensor, cutoff: float, cells: Tensor, pbc: Tensor,
                       system_ptr: Tensor, half: bool, status: Tensor, reference: Tensor,
                       ref_cells: Tensor, i: Tensor, j: Tensor, shifts: Tensor, ptr: Tensor,
                       distances: Tensor) -> None:
    """Capacity mode (see gpu_triton.neighbor_list_into): when ``status`` asks for a rebuild,
    the first ``len(i)`` pairs of :func:`neighbor_list` go into the buffers, the rest of them
    is padding (N, N, 0, inf), OVERFLOW is set when pairs were left out; the positions and cells
    become the reference and the rebuild count goes up."""
    if not int(status[0]) & status_bits.REBUILD or positions.shape[0] == 0:
        return
    n, capacity = positions.shape[0], i.shape[0]
    ii, jj, ss, pp, dd = neighbor_list(positions.detach(), cutoff, cells.detach(), pbc,
                                       system_ptr, half)
    k = min(ii.shape[0], capacity)
    i[:k], j[:k], shifts[:k], distances[:k] = ii[:k], jj[:k], ss[:k], dd[:k].to(distances.dtype)
    i[k:], j[k:], shifts[k:], distances[k:] = n, n, 0, math.inf
    ptr.copy_(pp)
    reference.copy_(positions.detach())
    ref_cells.copy_(cells.detach().to(ref_cells.dtype))
    status[1] += 1
    if ii.shape[0] > capacity:
        status[0] |= status_bits.OVERFLOW
