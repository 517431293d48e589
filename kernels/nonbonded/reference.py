"""Nonbonded pair energies in pure torch: the definition every other path is tested against.

Autograd-native and float64-safe: derivatives of any order come from torch. It materialises
per-pair tensors (several [E] and [E, 3] temporaries), so it is meant for tests, small systems
and the double-backward path of the fused kernels, not for production. The launcher shares its
signature with cpu_numba.py and gpu_triton.py; README.md beside this file gives the maths.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

COULOMB_NONE, COULOMB_PLAIN, COULOMB_REACTION_FIELD, COULOMB_EWALD_REAL = 0, 1, 2, 3


def excluded_pairs(i: Tensor, j: Tensor, excl_ptr: Tensor, excl_j: Tensor,
                   num_atoms: int) -> Tensor:
    """bool [E]: pair (i, j) appears in the exclusion rows (any periodic image)."""
    if excl_j.numel() == 0 or i.numel() == 0:
        return torch.zeros(i.shape[0], dtype=torch.bool, device=i.device)
    rows = torch.repeat_interleave(torch.arange(num_atoms, device=i.device),
                                   excl_ptr[1:] - excl_ptr[:-1])
    return torch.isin(i * num_atoms + j, rows * num_atoms + excl_j)


def switch(d: Tensor, cutoff: float, switch_distance: float) -> Tensor:
    """OpenMM's switching function: 1 below switch_distance, 1 - 10x^3 + 15x^4 - 6x^5 above."""
    x = ((d - switch_distance) / (cutoff - switch_distance)).clamp(min=0.0)
    return torch.where(d > switch_distance, 1.0 - x ** 3 * (10.0 - 15.0 * x + 6.0 * x * x),
                       torch.ones_like(d))


def pair_energy(d: Tensor, qi: Tensor, qj: Tensor, si: Tensor,
                sj: Tensor, ei: Tensor, ej: Tensor, *, cutoff: float,
                switch_distance: float, coulomb: int, lj: bool, k_rf: float, c_rf: float,
                alpha: float, coulomb_constant: float) -> Tensor:
    """Energy [E] of each pair at distance d (no cutoff test here)."""
    e = torch.zeros_like(d)
    if coulomb != COULOMB_NONE:
        qq = coulomb_constant * qi * qj
        if coulomb == COULOMB_PLAIN:
            e = e + qq / d
        elif coulomb == COULOMB_REACTION_FIELD:
            e = e + qq * (1.0 / d + k_rf * d * d - c_rf)
        elif coulomb == COULOMB_EWALD_REAL:
            e = e + qq * torch.erfc(alpha * d) / d
        else:
            raise ValueError(f"unknown coulomb code {coulomb}")
    if lj:
        sig = 0.5 * (si + sj)
        eps = torch.sqrt(ei * ej)
        x6 = (sig / d) ** 6
        u = 4.0 * eps * (x6 * x6 - x6)
        if switch_distance >= 0.0:
            u = u * switch(d, cutoff, switch_distance)
        e = e + u
    return e


def nonbonded_energy(positions: Tensor, cells: Tensor, atom_system: Tensor, i: Tensor,
                     j: Tensor, shifts: Tensor, excl_ptr: Tensor, excl_j: Tensor,
                     charges: Tensor, sigma: Tensor, epsilon: Tensor, cutoff: float,
                     switch_distance: float, coulomb: int, lj: bool, k_rf: float, c_rf: float,
                     alpha: float, coulomb_constant: float, half: bool = False) -> Tensor:
    """Energy [B] per system: sum over the pairs within cutoff, not excluded, of a half list
    (1/2 of the sum over a full list, which holds each pair twice)."""
    n = positions.shape[0]
    system = atom_system[i]
    r = (positions[j] - positions[i]
         + torch.einsum("ea,eab->eb", shifts.to(positions.dtype), cells[system]))
    d2 = (r * r).sum(dim=1)
    keep = d2 < cutoff * cutoff if math.isfinite(cutoff) else torch.ones_like(d2, dtype=torch.bool)
    keep = keep & ~excluded_pairs(i, j, excl_ptr, excl_j, n)
    i, j, system, d2 = i[keep], j[keep], system[keep], d2[keep]
    d = torch.sqrt(d2)
    e = pair_energy(d, charges[i], charges[j], sigma[i], sigma[j], epsilon[i], epsilon[j],
                    cutoff=cutoff, switch_distance=switch_distance, coulomb=coulomb, lj=lj,
                    k_rf=k_rf, c_rf=c_rf, alpha=alpha, coulomb_constant=coulomb_constant)
    out = torch.zeros(cells.shape[0], dtype=positions.dtype, device=positions.device)
    return (1.0 if half else 0.5) * out.index_add(0, system, e)


def nonbonded(positions, cells, atom_system, i, j, shifts, ptr, excl_ptr, excl_j, charges,
              sigma, epsilon, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha,
              coulomb_constant, param_grads, half):
    """Launcher: energy [B] and its gradients, through autograd on the energy above."""
    from fastff.kernels._runtime.energy_op import reference_gradients

    def energy(p, c, q, s, e):
        return nonbonded_energy(p, c, atom_system, i, j, shifts, excl_ptr, excl_j, q, s, e,
                                cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha,
                                coulomb_constant, half)

    pg = bool(param_grads)
    e, grads = reference_gradients(energy, (positions, cells, charges, sigma, epsilon),
                                   (True, True, pg, pg, pg))
    return (e, *grads)


# atoms per cluster of the cluster-pair layout (cpu_clusters.LANES: one 8-bit mask per entry)
CLUSTER_LANES = 8


def cluster_pairs(slot_atom: Tensor, slot_wrap: Tensor, cluster_ptr: Tensor, entry_j: Tensor,
                  entry_shift: Tensor, entry_mask: Tensor, lanes: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The half pair list (i, j, shifts) that a cluster list stands for: lane l of cluster c
    pairs with entry e's partner when bit l of its mask is set. A slot's position is its atom's
    minus ``slot_wrap`` box vectors and a partner's image adds ``entry_shift``, so the pair's
    shift in atom positions is ``entry_shift + wrap(i) - wrap(j)``."""
    dev = slot_atom.device
    counts = cluster_ptr[1:] - cluster_ptr[:-1]
    cluster = torch.repeat_interleave(torch.arange(counts.shape[0], device=dev), counts)
    lane = torch.arange(lanes, device=dev)
    on = ((entry_mask.to(torch.int64)[:, None] >> lane) & 1).bool()  # [E, lanes]
    e_idx, l_idx = on.nonzero(as_tuple=True)
    si = cluster[e_idx] * lanes + l_idx
    sj = entry_j[e_idx].to(torch.int64)
    shifts = (entry_shift[e_idx].to(torch.int64) + slot_wrap[si].to(torch.int64)
              - slot_wrap[sj].to(torch.int64))
    return slot_atom[si], slot_atom[sj], shifts.to(torch.int32)


def nonbonded_clusters(positions, cells, slot_atom, slot_wrap, cluster_ptr, entry_j, entry_shift,
                       entry_mask, charges, sigma, epsilon, cutoff, switch_distance, coulomb, lj,
                       k_rf, c_rf, alpha, coulomb_constant):
    """Launcher: energy [1] and its gradients for positions and cell, over the expanded pairs
    (no parameter gradients; see cpu_clusters.py)."""
    from fastff.kernels._runtime.energy_op import reference_gradients

    i, j, shifts = cluster_pairs(slot_atom, slot_wrap, cluster_ptr, entry_j, entry_shift,
                                 entry_mask, CLUSTER_LANES)
    system = torch.zeros(positions.shape[0], dtype=torch.int64, device=positions.device)
    no_excl = torch.zeros(positions.shape[0] + 1, dtype=torch.int64, device=positions.device)

    def energy(p, c):
        return nonbonded_energy(p, c, system, i, j, shifts, no_excl, no_excl[:0], charges,
                                sigma, epsilon, cutoff, switch_distance, coulomb, lj, k_rf,
                                c_rf, alpha, coulomb_constant, half=True)

    e, grads = reference_gradients(energy, (positions, cells), (True, True))
    return (e, *grads)


# ---------------------------------------------------------------------------------------------
# Cluster tiles (the GPU layout of gpu_clusters.py): reference build and energy

TILE_LANES = 32  # atoms per cluster of the tile layout (gpu_clusters.CLUSTER)
_REBUILD, _OVERFLOW, _BAD_CELL = 1, 2, 8  # status flags (kernels/_runtime/status.py)


def _orthorhombic_ok(cells: Tensor, cutoff: float) -> bool:
    c = cells[0]
    return bool((c - torch.diag(torch.diagonal(c))).abs().max() == 0) and bool(
        (torch.diagonal(c) > 2.0 * cutoff).all())


def tile_pairs(positions: Tensor, cells: Tensor, order: Tensor, tile_ptr: Tensor,
               tile_j: Tensor, tile_x: Tensor, masks: Tensor, periodic: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The half pair list (i, j, shifts) that a cluster-tile list stands for: every lane pair of
    every tile (each pair of a diagonal tile once), real atoms only, not excluded by the tile's
    bits; shifts give the minimum image at these positions."""
    dev = positions.device
    n = positions.shape[0]
    lanes = TILE_LANES
    nclus = tile_ptr.shape[0] - 1
    capacity = tile_j.shape[0]
    ptr = tile_ptr.clamp(max=capacity)
    counts = ptr[1:] - ptr[:-1]
    ci = torch.repeat_interleave(torch.arange(nclus, device=dev), counts)
    t = torch.arange(ci.shape[0], device=dev)  # tiles are stored row after row from slot 0
    cj = tile_j[t].to(torch.int64)
    li = torch.arange(lanes, device=dev)
    si = ci[:, None, None] * lanes + li[None, :, None]  # [T, 32, 1]
    sj = cj[:, None, None] * lanes + li[None, None, :]  # [T, 1, 32]
    keep = (si < n) & (sj < n) & ((cj != ci)[:, None, None] | (li[None, None, :] > li[None, :,
                                                                                      None]))
    xt = tile_x[t].to(torch.int64)
    words = torch.where(xt[:, None] >= 0, masks[xt.clamp(min=0)].to(torch.int64),
                        torch.zeros(1, dtype=torch.int64, device=dev))  # [T, 32]
    excluded = ((words[:, :, None] >> li[None, None, :]) & 1).bool()
    keep = keep & ~excluded
    si, sj = torch.broadcast_tensors(si, sj)
    a = order[si[keep].clamp(max=n - 1)].to(torch.int64)
    b = order[sj[keep].clamp(max=n - 1)].to(torch.int64)
    shifts = torch.zeros(a.shape[0], 3, dtype=torch.int32, device=dev)
    if periodic:
        lengths = torch.diagonal(cells[0]).detach()
        r = positions.detach()[b] - positions.detach()[a]
        shifts = (-torch.floor(r / lengths + 0.5)).to(torch.int32)
    return a, b, shifts


def cluster_list_into(positions, cells, periodic, cutoff, rlist, excl_ptr, excl_j,
                      max_exclusions, status, reference, ref_cells, order, slot, tile_ptr,
                      xtile_ptr, tile_j, tile_x, masks):
    """A valid cluster-tile list in the layout of gpu_clusters.cluster_list_into, built simply:
    clusters of atoms in index order, tiles from the same box test in torch."""
    if periodic and not _orthorhombic_ok(cells.detach(), cutoff):
        status[0] |= _BAD_CELL
    n = positions.shape[0]
    if not int(status[0]) & _REBUILD or n == 0:
        return
    dev, lanes = positions.device, TILE_LANES
    x = positions.detach()
    if periodic:
        lengths = torch.diagonal(cells[0]).detach().to(x.dtype)
        x = x - torch.floor(x / lengths) * lengths
    order.copy_(torch.arange(n, dtype=torch.int32, device=dev))
    slot.copy_(order)
    nclus = tile_ptr.shape[0] - 1
    pad = nclus * lanes - n
    xs = torch.cat([x, x[-1:].expand(pad, 3)]).view(nclus, lanes, 3)
    centre = 0.5 * (xs.amin(1) + xs.amax(1))
    half = 0.5 * (xs.amax(1) - xs.amin(1))
    dc = centre[None, :, :] - centre[:, None, :]
    if periodic:
        dc = dc - lengths * torch.floor(dc / lengths + 0.5)
    gap = (dc.abs() - half[:, None, :] - half[None, :, :]).clamp(min=0.0)
    hit = ((gap * gap).sum(-1) < rlist * rlist) & torch.ones(nclus, nclus, dtype=torch.bool,
                                                            device=dev).triu()
    rows = torch.repeat_interleave(torch.arange(n, device=dev), excl_ptr[1:] - excl_ptr[:-1])
    pair_tile = torch.zeros(nclus, nclus, dtype=torch.bool, device=dev)
    ca, cb = rows // lanes, excl_j // lanes
    pair_tile[torch.minimum(ca, cb), torch.maximum(ca, cb)] = True
    ti, tj = hit.nonzero(as_tuple=True)  # row-major: sorted by I, then J
    xhit = pair_tile[ti, tj]
    counts = torch.bincount(ti, minlength=nclus)
    xcounts = torch.bincount(ti[xhit], minlength=nclus)
    tile_ptr.zero_()
    xtile_ptr.zero_()
    tile_ptr[1:] = torch.cumsum(counts, 0)
    xtile_ptr[1:] = torch.cumsum(xcounts, 0)
    xslot = torch.cumsum(xhit.to(torch.int64), 0) - 1
    k, kx = min(ti.shape[0], tile_j.shape[0]), min(int(xhit.sum()), masks.shape[0])
    tile_j[:k] = tj[:k].to(torch.int32)
    ok = xhit & (xslot < masks.shape[0])
    tile_x[:k] = torch.where(ok, xslot, -1)[:k].to(torch.int32)
    # bit (b mod 32) of word (a mod 32) of tile (cluster(a), cluster(b)), for I <= J: every
    # (a, b) is distinct, so a sum of the bits is their OR
    key = ti * nclus + tj
    ca, cb = rows // lanes, excl_j // lanes
    upper = ca <= cb
    a_, b_, want = rows[upper], excl_j[upper], (ca * nclus + cb)[upper]
    found = torch.zeros(want.shape[0], dtype=torch.bool, device=dev)
    t = torch.zeros_like(want)
    if key.numel():
        t = torch.searchsorted(key, want).clamp(max=key.numel() - 1)
        found = (key[t] == want) & ok[t]
    words = torch.zeros(max(kx, 1), lanes, dtype=torch.int64, device=dev)
    if bool(found.any()):
        words.index_put_((xslot[t[found]], a_[found] % lanes),
                         torch.ones_like(b_[found]) << (b_[found] % lanes), accumulate=True)
    words = words[:kx]
    masks[:kx] = ((words + 2**31) % 2**32 - 2**31).to(torch.int32)  # bit 31 as int32
    reference.copy_(positions.detach())
    ref_cells.copy_(cells.detach().to(ref_cells.dtype))
    status[1] += 1
    if ti.shape[0] > tile_j.shape[0] or int(xhit.sum()) > masks.shape[0]:
        status[0] |= _OVERFLOW


def nonbonded_tiles(positions, cells, order, tile_ptr, tile_j, tile_x, masks, charges, sigma,
                    epsilon, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha,
                    coulomb_constant, periodic):
    """Launcher: energy [1] and its gradients for positions and cell over the tiles' pairs."""
    from fastff.kernels._runtime.energy_op import reference_gradients

    i, j, shifts = tile_pairs(positions, cells, order, tile_ptr, tile_j, tile_x, masks,
                              periodic)
    n = positions.shape[0]
    system = torch.zeros(n, dtype=torch.int64, device=positions.device)
    no_excl = torch.zeros(n + 1, dtype=torch.int64, device=positions.device)

    def energy(p, c):
        return nonbonded_energy(p, c, system, i, j, shifts, no_excl, no_excl[:0], charges,
                                sigma, epsilon, cutoff, switch_distance, coulomb, lj, k_rf,
                                c_rf, alpha, coulomb_constant, half=True)

    e, grads = reference_gradients(energy, (positions, cells), (True, True))
    return (e, *grads)
