"""Cluster-pair lists for the CPU nonbonded fast path (kernels/nonbonded/cpu_clusters.py).

A :class:`ClusterList` stands where a half :class:`fastff.NeighborList` would for the nonbonded
term of one system: clusters of 8 nearby atoms, each with its partners within
``cutoff + skin``. :class:`ClusterVerletList` rebuilds it with the Verlet criterion (an atom
moved more than ``skin / 2``). :class:`fastff.mm.ForceField` uses it for energies and forces on
CPU; parameter gradients, batches, triclinic or small boxes and CUDA take the pair list.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastff import _checks


class ClusterList:
    """Clusters and their partner entries (see cpu_clusters.build for the arrays)."""

    half = True
    batch = None

    def __init__(self, arrays: dict, *, cutoff: float, num_atoms: int, cell: Tensor | None,
                 dtype: torch.dtype):
        self.slot_atom = torch.from_numpy(arrays["slot_atom"])
        self.slot_wrap = torch.from_numpy(arrays["slot_wrap"])
        self.cluster_ptr = torch.from_numpy(arrays["cluster_ptr"])
        self.entry_j = torch.from_numpy(arrays["entry_j"])
        self.entry_shift = torch.from_numpy(arrays["entry_shift"])
        self.entry_mask = torch.from_numpy(arrays["entry_mask"])
        self.cutoff, self.num_atoms = cutoff, num_atoms
        periodic = cell is not None
        self.pbc = torch.full((1, 3), periodic, dtype=torch.bool)
        self._cells = (cell.detach().to(dtype).reshape(1, 3, 3).clone() if cell is not None
                       else torch.zeros(1, 3, 3, dtype=dtype))

    @property
    def num_entries(self) -> int:
        return int(self.entry_j.shape[0])

    def _cell_for(self, positions: Tensor, cell: Tensor | None) -> Tensor:
        if positions.shape[0] != self.num_atoms:
            raise ValueError(f"positions has {positions.shape[0]} atoms but this cluster list "
                             f"was built for {self.num_atoms}")
        if cell is None:
            return self._cells.to(positions.dtype)
        if cell.shape != (3, 3):
            raise ValueError(f"cell must have shape [3, 3], got {list(cell.shape)}")
        _checks.same_float_dtype("cell", cell, "positions", positions)
        return cell.unsqueeze(0)


class ClusterVerletList:
    """A :class:`ClusterList` within ``cutoff + skin``, rebuilt only when needed (the first
    call, an atom moved more than ``skin / 2``, a new cell or atom count, new exclusions).

    ``update`` returns None when the cluster layout does not apply (triclinic box, or a box
    length below 2 (cutoff + skin + cluster radius)); the caller then uses a pair list.
    """

    def __init__(self, cutoff: float, skin: float):
        self.cutoff, self.skin = float(cutoff), float(skin)
        self.rebuilds = 0
        self._list: ClusterList | None = None
        self._reference: Tensor | None = None
        self._key: tuple | None = None
        self._exclusions: _checks.Stamp | None = None  # the excl_j of the last build

    def update(self, positions: Tensor, cell: Tensor | None, excl_ptr: Tensor,
               excl_j: Tensor) -> ClusterList | None:
        """The list for these positions (checked by the caller: binning assumes finite ones,
        and stays in bounds otherwise), or None where clusters do not apply."""
        from fastff.kernels.nonbonded import cpu_clusters

        # the cell by value (CPU: a few microseconds); the exclusions by tensor state
        key = (None if cell is None else tuple(cell.detach().double().flatten().tolist()),
               positions.shape[0], positions.dtype)
        reference = self._reference
        # a list built under torch.inference_mode holds tensors that cannot enter autograd
        inference = self._list is not None and self._list.entry_j.is_inference()
        if (self._key == key and reference is not None and self._exclusions is not None
                and self._exclusions.matches(excl_j)
                and not (inference and not torch.is_inference_mode_enabled())):
            if self._list is None:
                return None  # this box does not take clusters
            moved2 = (positions.detach() - reference).square().sum(1).max()
            if not bool(moved2 > (0.5 * self.skin) ** 2):
                return self._list
        arrays = cpu_clusters.build(
            positions.detach().double().numpy(),
            None if cell is None else cell.detach().double().numpy(),
            self.cutoff + self.skin, excl_ptr.numpy(), excl_j.numpy())
        self._key = key
        self._exclusions = _checks.Stamp(excl_j)
        self._reference = positions.detach().clone()
        self._list = None if arrays is None else ClusterList(
            arrays, cutoff=self.cutoff + self.skin, num_atoms=positions.shape[0], cell=cell,
            dtype=positions.dtype)
        self.rebuilds += self._list is not None
        return self._list
