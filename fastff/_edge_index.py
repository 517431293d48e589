"""Pairs in and out of fastff: a NeighborList from any edge list, on another device, or joined.

``NeighborList.from_edge_index``, ``.to`` and ``.cat`` live here, beside the class, so that the
checks an outside edge list needs stay out of the build path. An edge list from elsewhere can be
anything, so every value check reports how many pairs fail and one example (its column in the
caller's ``edge_index``), and all of them run before the list is used. The checks read values
(a few O(E) passes, one sort for duplicates, the mirror search of a full list), so they follow
``fastff.set_checks`` like every value check.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from fastff import _checks
from fastff.kernels._runtime import registry

FLOWS = ("source_to_target", "target_to_source")
_INT32 = 2**31


def check_flow(flow) -> str:
    if flow not in FLOWS:
        raise ValueError(f"flow must be one of {', '.join(map(repr, FLOWS))} (torch_geometric's "
                         f"convention), got {flow!r}")
    return flow


def _num_atoms(value) -> int:
    if isinstance(value, bool):
        raise TypeError("num_atoms must be an int, got bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"num_atoms must be an int, got {type(value).__name__}") from None
    if n < 0:
        raise ValueError(f"num_atoms must be >= 0, got {n}")
    return n


def _check_structure(edge_index, shifts, cell) -> None:
    """Types, dtypes, shapes and devices: everything that needs no values."""
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor [2, E], got "
                        f"{type(edge_index).__name__}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {list(edge_index.shape)}")
    if edge_index.dtype != torch.int64:
        raise TypeError(f"edge_index must be int64 (torch.long), got {edge_index.dtype}; "
                        "convert it with .long()")
    if shifts is not None:
        if not isinstance(shifts, Tensor):
            raise TypeError(f"shifts must be a torch.Tensor [E, 3], got {type(shifts).__name__}")
        if shifts.shape != (edge_index.shape[1], 3):
            raise ValueError(f"shifts must have shape [E, 3] = [{edge_index.shape[1]}, 3] (one "
                             f"row per column of edge_index), got {list(shifts.shape)}")
        if shifts.is_floating_point() or shifts.is_complex() or shifts.dtype == torch.bool:
            raise TypeError(f"shifts must hold integer cell shifts, got {shifts.dtype}; convert "
                            "integral float shifts with .round().to(torch.int32)")
        _checks.same_device("shifts", shifts, "edge_index", edge_index)
        if cell is None:
            raise ValueError("shifts were given but no cell: r_ij = x_j - x_i + shifts @ cell "
                             "needs the cell")
    if cell is not None:
        if not isinstance(cell, Tensor):
            raise TypeError(f"cell must be a torch.Tensor, got {type(cell).__name__}")
        _checks.float_dtype(cell, "cell")
        _checks.same_device("cell", cell, "edge_index", edge_index)


def _column(order: Tensor | None, k: int) -> int:
    """Column of edge_index of sorted pair k."""
    return k if order is None else int(order[k])


def _describe(i: Tensor, j: Tensor, s: Tensor, k: int, column: int) -> str:
    return (f"column {column}: source {int(j[k])} -> target {int(i[k])}, shift "
            f"{s[k].tolist()}")


def _check_values(i: Tensor, j: Tensor, s: Tensor, n: int, batch: Tensor | None,
                  periodic: Tensor) -> None:
    """Checks on the pairs as given (before sorting): indices, self pairs, systems, pbc."""
    e = i.shape[0]
    if e == 0:
        return
    for name, bad, what in (("negative", (i < 0) | (j < 0), "negative index"),
                            ("out of range", (i >= n) | (j >= n), f"index >= num_atoms={n}")):
        count = int(bad.sum())
        if count:
            k = int(bad.nonzero()[0, 0])
            raise IndexError(f"edge_index holds {count} pairs with a {what} ({name}), e.g. "
                             f"column {k}: source {int(j[k])} -> target {int(i[k])}")
    self_pair = (i == j) & (s == 0).all(dim=1)
    count = int(self_pair.sum())
    if count:
        k = int(self_pair.nonzero()[0, 0])
        raise ValueError(f"edge_index holds {count} pairs of an atom with itself without a shift "
                         f"(distance 0), e.g. column {k}: atom {int(i[k])}; remove them")
    system = None
    if batch is not None:
        system = batch[i]
        across = system != batch[j]
        count = int(across.sum())
        if count:
            k = int(across.nonzero()[0, 0])
            raise ValueError(f"edge_index holds {count} pairs across systems of the batch, e.g. "
                             f"column {k}: atom {int(j[k])} (system {int(batch[j[k]])}) -> atom "
                             f"{int(i[k])} (system {int(batch[i[k]])})")
    flags = periodic[0].expand(e, 3) if system is None else periodic[system]
    off_axis = ((s != 0) & ~flags).any(dim=1)
    count = int(off_axis.sum())
    if count:
        k = int(off_axis.nonzero()[0, 0])
        raise ValueError(f"shifts hold {count} pairs shifted along a non-periodic axis, e.g. "
                         f"column {k}: shift {s[k].tolist()} with pbc {flags[k].tolist()}")


def _canonical_order(i: Tensor, j: Tensor, s: Tensor, n: int) -> Tensor:
    """A permutation sorting pairs by (i, j, shift): one sort of a packed int64 key when it fits,
    five stable sorts otherwise."""
    reach = int(s.abs().max()) if s.numel() else 0
    span = 2 * reach + 1
    if max(n, 1) ** 2 * span**3 < 2**62:
        s = s.long() + reach
        key = ((i * n + j) * span + s[:, 0]) * span
        key = (key + s[:, 1]) * span + s[:, 2]
        return torch.sort(key).indices
    order = torch.arange(i.shape[0], device=i.device)
    for column in (s[:, 2], s[:, 1], s[:, 0], j, i):  # least significant first
        order = order[torch.sort(column[order], stable=True).indices]
    return order


def _check_duplicates(i: Tensor, j: Tensor, s: Tensor, n: int, order: Tensor | None) -> None:
    canon = _canonical_order(i, j, s, n)
    a, b, c = i[canon], j[canon], s[canon]
    same = (a[1:] == a[:-1]) & (b[1:] == b[:-1]) & (c[1:] == c[:-1]).all(dim=1)
    count = int(same.sum())
    if count:
        k = int(same.nonzero()[0, 0])
        first, second = sorted((_column(order, int(canon[k])), _column(order, int(canon[k + 1]))))
        raise ValueError(f"edge_index holds {count} duplicate pairs, e.g. columns {first} and "
                         f"{second}: source {int(b[k])} -> target {int(a[k])}, shift "
                         f"{c[k].tolist()}")


def _check_mirrors(i: Tensor, j: Tensor, s: Tensor, reverse: Tensor, half: bool,
                   order: Tensor | None) -> None:
    bad = reverse >= 0 if half else reverse < 0
    count = int(bad.sum())
    if not count:
        return
    k = int(bad.nonzero()[0, 0])
    pair = _describe(i, j, s, k, _column(order, k))
    mirror = f"source {int(i[k])} -> target {int(j[k])}, shift {(-s[k]).tolist()}"
    if half:
        raise ValueError(f"half=True but edge_index holds {count} pairs together with their "
                         f"mirror, e.g. {pair} and {mirror}; pass half=False for a full list")
    raise ValueError(f"edge_index is not a full list: {count} of {i.shape[0]} pairs have no "
                     f"mirror pair (j, i, -S), e.g. {pair} has no {mirror}; add the missing "
                     "pairs, or pass half=True for a half list")


def from_edge_index(cls, edge_index, num_atoms, *, shifts, cell, pbc, batch, cutoff, flow,
                    half, backend):
    """NeighborList.from_edge_index (see its docstring)."""
    flow = check_flow(flow)
    n = _num_atoms(num_atoms)
    _check_structure(edge_index, shifts, cell)
    c = math.inf if cutoff is None else _checks.cutoff(cutoff)
    device = edge_index.device
    name = registry.requested_backend(backend, device)
    from fastff.neighbors import _normalize_batch, _normalize_cell

    dtype = cell.dtype if cell is not None else torch.float64
    atoms = torch.zeros((), dtype=dtype, device=device).expand(n, 3)  # shape, dtype and device
    batch, num_systems = _normalize_batch(batch, atoms)
    cells, periodic = _normalize_cell(cell, pbc, atoms, num_systems, batch is not None)

    i, j = (edge_index[1], edge_index[0]) if flow == "source_to_target" else edge_index
    e = i.shape[0]
    checked = _checks.checks_enabled()
    if shifts is None:
        s = torch.zeros(e, 3, dtype=torch.int32, device=device)
    else:
        if checked and shifts.numel() and shifts.dtype == torch.int64:
            big = int(shifts.abs().max())
            if big >= _INT32:
                raise ValueError(f"shifts hold a value of magnitude {big}, beyond int32")
        s = shifts.to(torch.int32)
    if checked:
        _check_values(i, j, s, n, batch, periodic)
    order = None
    if e and bool((i[1:] < i[:-1]).any()):
        order = torch.argsort(i, stable=True)
        i, j, s = i[order], j[order], s[order]
    i, j, s = i.contiguous(), j.contiguous(), s.contiguous()
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=device)
    if n:
        torch.cumsum(torch.bincount(i, minlength=n), 0, out=ptr[1:])
    nl = cls(i, j, s, ptr, cutoff=c, half=bool(half), num_atoms=n, batch=batch, cells=cells,
             pbc=periodic, cell=None if cell is None else cell.detach(), backend=name)
    if checked and e:
        _check_duplicates(i, j, s, n, order)
        reverse = _reverse(i, j, s, ptr, name)
        _check_mirrors(i, j, s, reverse, bool(half), order)
        if not half:
            nl._reverse, nl.symmetric = reverse, True
    elif checked and not half:
        nl.symmetric = True  # no pairs: nothing lacks a mirror
    return nl


def _reverse(i: Tensor, j: Tensor, s: Tensor, ptr: Tensor, backend: str) -> Tensor:
    _, launch = registry.resolve("neighbor_reverse", i.device, backend)
    return launch(i, j, s, ptr)


def _backend_on(backend: str, device: torch.device) -> str:
    try:
        return registry.requested_backend(backend, device)
    except ValueError:  # e.g. numba on CUDA tensors: the device's default path
        return registry.requested_backend(None, device)


def moved(nl, device: torch.device):
    """NeighborList.to (see its docstring)."""
    i = nl.i.to(device)
    if i.device == nl.i.device:
        return nl

    def to(x):
        return None if x is None else x.to(device)

    out = type(nl)(i, to(nl.j), to(nl.shifts), to(nl.ptr), cutoff=nl.cutoff, half=nl.half,
                   num_atoms=nl.num_atoms, batch=to(nl.batch), cells=to(nl._cells),
                   pbc=to(nl.pbc), cell=to(nl.cell), backend=_backend_on(nl.backend, i.device))
    out.symmetric = nl.symmetric
    out._reverse = to(nl._reverse)
    if nl._compacted_from is not None and nl._reverse is None:
        source, rank = nl._compacted_from
        out._compacted_from = (source.to(device), rank.to(device))
    return out


def cat(cls, lists):
    """NeighborList.cat (see its docstring)."""
    lists = list(lists)
    if not lists:
        raise ValueError("lists is empty: NeighborList.cat needs at least one neighbor list")
    for k, nl in enumerate(lists):
        if not isinstance(nl, cls):
            raise TypeError(f"lists[{k}] must be a fastff.NeighborList, got {type(nl).__name__}")
        nl._exact(f"NeighborList.cat (lists[{k}])")
    first = lists[0]
    device = first.i.device
    for k, nl in enumerate(lists):
        if nl.i.device != device:
            raise ValueError(f"lists[{k}] is on {nl.i.device} but lists[0] is on {device}; "
                             "move them to one device (nl.to(device))")
        if nl.half != first.half:
            raise ValueError(f"lists[{k}] is a {'half' if nl.half else 'full'} list but lists[0] "
                             f"is a {'half' if first.half else 'full'} one")
    dtype = first._cells.dtype
    for nl in lists[1:]:
        dtype = torch.promote_types(dtype, nl._cells.dtype)
    atom_offset = pair_offset = system_offset = 0
    i, j, shifts, ptr, batch, cells, pbc, reverse = [], [], [], [first.ptr[:1]], [], [], [], []
    for nl in lists:
        i.append(nl.i + atom_offset)
        j.append(nl.j + atom_offset)
        shifts.append(nl.shifts)
        ptr.append(nl.ptr[1:] + pair_offset)
        systems = nl._cells.shape[0]
        batch.append(nl.batch + system_offset if nl.batch is not None else
                     torch.full((nl.num_atoms,), system_offset, dtype=torch.int64, device=device))
        cells.append(nl._cells.to(dtype))
        pbc.append(nl.pbc)
        if nl._reverse is not None:
            reverse.append(torch.where(nl._reverse >= 0, nl._reverse + pair_offset, -1))
        atom_offset += nl.num_atoms
        pair_offset += len(nl)
        system_offset += systems
    backends = {nl.backend for nl in lists}
    backend = backends.pop() if len(backends) == 1 else registry.requested_backend(None, device)
    stacked = torch.cat(cells)
    out = cls(torch.cat(i), torch.cat(j), torch.cat(shifts), torch.cat(ptr),
              cutoff=min(nl.cutoff for nl in lists), half=first.half, num_atoms=atom_offset,
              batch=torch.cat(batch), cells=stacked, pbc=torch.cat(pbc),
              cell=None if all(nl.cell is None for nl in lists) else stacked, backend=backend)
    out.symmetric = all(nl.symmetric for nl in lists)
    if not first.half and len(reverse) == len(lists):
        out._reverse = torch.cat(reverse)
    return out
