"""Drop-in neighbor lists for the data pipelines of MACE and NequIP, on fastff's kernels.

Each function has the signature, output types and conventions of the function it replaces, and
returns the same pairs (in another order within each centre atom's row); both packages use ASE's
convention ``r_ij = x[j] - x[i] + S @ cell``, fastff's own. Neither package is imported here.
Install one into its pipeline by assigning it where the pipeline looks it up::

    import mace.data.atomic_data
    mace.data.atomic_data.get_neighborhood = fastff.interop.pipelines.mace_get_neighborhood

    import nequip.data.AtomicData
    nequip.data.AtomicData.neighbor_list_and_relative_vec = (
        fastff.interop.pipelines.nequip_neighbor_list)

Import nequip before torch_geometric (or fastff.interop.pyg): torch_geometric 2.8 replaces
``torch.index_select`` with a function that nequip 0.6's TorchScript cannot compile.

Where the original would silently run a periodic axis without a lattice vector (both substitute
a unit vector, a 1 A box), these raise instead.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from fastff.neighbors import neighbor_list

__all__ = ["mace_get_neighborhood", "nequip_neighbor_list"]


def _pbc(pbc, name: str = "pbc") -> tuple[bool, bool, bool]:
    if isinstance(pbc, (bool, np.bool_)):
        return (bool(pbc),) * 3
    flags = tuple(pbc)
    if len(flags) != 3 or not all(isinstance(p, (bool, np.bool_)) for p in flags):
        raise ValueError(f"{name} must be three bools, got {pbc!r}")
    return tuple(bool(p) for p in flags)  # type: ignore[return-value]


def _no_lattice_vector(cell: np.ndarray | Tensor | None, pbc, package: str) -> None:
    for k in range(3):
        if pbc[k] and (cell is None or not bool((cell[k] != 0).any())):
            raise ValueError(f"pbc is True along axis {k} but the cell has no lattice vector "
                             f"there ({'no cell given' if cell is None else f'row {k} is zero'}); "
                             f"{package} would substitute a 1 A unit vector. Give the cell, or "
                             f"set pbc[{k}] = False")


def mace_get_neighborhood(positions: np.ndarray, cutoff: float, pbc=None,
                          cell: np.ndarray | None = None, true_self_interaction: bool = False):
    """``mace.data.neighborhood.get_neighborhood`` (matscipy's neighbour list in MACE) on
    fastff's kernel.

    Args:
        positions: float [N, 3] numpy array.
        cutoff: pairs closer than this are returned (units of positions).
        pbc: three bools, default all False.
        cell: [3, 3] lattice vectors as rows, or None.
        true_self_interaction: accepted as in MACE, where it keeps pairs (i, i, S=0) that
            matscipy never returns: no effect there, none here.

    Returns:
        ``(edge_index, shifts, unit_shifts, cell)`` as MACE returns them: ``edge_index`` int32
        [2, E] (sender = ASE's i, receiver = ASE's j), ``shifts`` float64 [E, 3] =
        ``unit_shifts @ cell``, ``unit_shifts`` int32 [E, 3], and MACE's cell: the identity for
        a missing or zero cell, and rows of non-periodic axes replaced by
        ``(max|positions| + 1) * 5 * cutoff`` times the unit vector. Unlike MACE, the caller's
        ``cell`` array is not modified in place.
    """
    del true_self_interaction  # matscipy never returns (i, i, 0), so MACE's flag changes nothing
    flags = _pbc((False, False, False) if pbc is None else pbc)
    pos = np.ascontiguousarray(positions)
    if pos.ndim != 2 or pos.shape[1] != 3 or not np.issubdtype(pos.dtype, np.floating):
        raise ValueError(f"positions must be a float array [N, 3], got {pos.dtype} "
                         f"{list(pos.shape)}")
    given = None if cell is None else np.asarray(cell, dtype=float)
    if given is not None and given.shape != (3, 3):
        raise ValueError(f"cell must have shape [3, 3], got {list(given.shape)}")
    if given is None or not given.any():
        _no_lattice_vector(None, flags, "MACE")
        out_cell = np.identity(3, dtype=float)
    else:
        _no_lattice_vector(given, flags, "MACE")
        out_cell = given.copy()
    # MACE's completion of non-periodic axes, reproduced for the returned cell
    extent = (np.max(np.absolute(pos)) if pos.size else 0.0) + 1
    for k in range(3):
        if not flags[k]:
            out_cell[k] = extent * 5 * cutoff * np.identity(3)[k]
    x = torch.from_numpy(pos)
    periodic = any(flags)
    nl = neighbor_list(x, float(cutoff),
                       torch.from_numpy(out_cell).to(x.dtype) if periodic else None,
                       torch.tensor(flags) if periodic else None)
    edge_index = np.empty((2, len(nl)), np.int32)
    edge_index[0] = nl.i.numpy()
    edge_index[1] = nl.j.numpy()
    unit_shifts = nl.shifts.numpy()  # int32, as matscipy's
    return edge_index, np.dot(unit_shifts, out_cell), unit_shifts, out_cell


def nequip_neighbor_list(pos, r_max, self_interaction: bool = False,
                         strict_self_interaction: bool = True, cell=None, pbc=False):
    """``nequip.data.AtomicData.neighbor_list_and_relative_vec`` on fastff's kernel.

    NequIP's default search (``NEQUIP_NL=ase``): pairs (i, j, S) closer than ``r_max``, with
    ``edge_index[0]`` = i (the centre) and ``edge_index[1]`` = j; the pair (i, i, S=0) only with
    ``self_interaction`` and ``strict_self_interaction`` both True; with
    ``NEQUIP_ERROR_ON_NO_EDGES`` (default "true") a ValueError when no edge remains and
    ``self_interaction`` is False. Tensors on a GPU stay there (NequIP copies them to the CPU).

    Args:
        pos: [N, 3] tensor (any device) or array.
        r_max: the cutoff (units of pos).
        self_interaction: as in NequIP, see above.
        strict_self_interaction: as in NequIP, see above.
        cell: [3, 3] tensor, array or ``ase.cell.Cell``, rows are lattice vectors; or None.
        pbc: a bool or three bools.

    Returns:
        ``(edge_index, edge_cell_shift, cell)``: int64 [2, E] and [E, 3] integer-valued shifts
        in the dtype of ``pos`` (a tensor) or torch's default dtype (an array), on the device
        of ``pos``, and the cell as given (zeros for None) in that dtype and device.
    """
    flags = _pbc(pbc)
    if isinstance(pos, Tensor):
        x, out_device, out_dtype = pos.detach(), pos.device, pos.dtype
    else:
        x = torch.as_tensor(np.asarray(pos))
        out_device, out_dtype = torch.device("cpu"), torch.get_default_dtype()
    if isinstance(cell, Tensor):
        lattice = cell.detach().to(x.device, torch.float64)
        cell_tensor = cell.to(device=out_device, dtype=out_dtype)
    elif cell is not None:
        lattice = torch.as_tensor(np.asarray(cell, dtype=np.float64), device=x.device)
        cell_tensor = lattice.to(device=out_device, dtype=out_dtype)
    else:
        lattice = None
        cell_tensor = torch.zeros(3, 3, device=out_device, dtype=out_dtype)
    if lattice is not None and lattice.shape != (3, 3):
        raise ValueError(f"cell must have shape [3, 3], got {list(lattice.shape)}")
    _no_lattice_vector(lattice, flags, "NequIP")
    periodic = any(flags)
    positions = x.to(torch.float64)  # NequIP's search runs in numpy float64
    nl = neighbor_list(positions, float(r_max), lattice if periodic else None,
                       torch.tensor(flags, device=x.device) if periodic else None)
    i, j, shifts = nl.i, nl.j, nl.shifts
    if self_interaction and strict_self_interaction:
        atoms = torch.arange(x.shape[0], device=x.device)
        i, j = torch.cat([i, atoms]), torch.cat([j, atoms])
        shifts = torch.cat([shifts, shifts.new_zeros(x.shape[0], 3)])
    if (not self_interaction and i.shape[0] == 0
            and os.environ.get("NEQUIP_ERROR_ON_NO_EDGES", "true").lower() == "true"):
        raise ValueError(f"Every single atom has no neighbors within the cutoff r_max={r_max} "
                         "(after eliminating self edges, no edges remain in this system)")
    edge_index = torch.stack([i, j]).to(out_device)
    return edge_index, shifts.to(device=out_device, dtype=out_dtype), cell_tensor
