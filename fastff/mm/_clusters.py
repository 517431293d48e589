"""Cluster lists for the nonbonded fast paths: CPU (kernels/nonbonded/cpu_clusters.py) and GPU
(kernels/nonbonded/gpu_clusters.py).

A :class:`ClusterList` stands where a half :class:`fastff.NeighborList` would for the nonbonded
term of one system: clusters of 8 nearby atoms, each with its partners within
``cutoff + skin``. :class:`ClusterVerletList` rebuilds it with the Verlet criterion (an atom
moved more than ``skin / 2``). A :class:`TileList` is the GPU's layout (32-atom clusters and
the clusters they interact with, built and rebuilt on the device by :class:`TileVerletList`
without host synchronisation). :class:`fastff.mm.ForceField` uses them for energies and forces;
parameter gradients, batches, triclinic or small boxes take the pair list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fastff import _checks
from fastff.kernels._runtime import registry
from fastff.kernels._runtime import status as status_bits

if TYPE_CHECKING:
    from fastff.verlet import _StatusPoll


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


class TileList(ClusterList):
    """The cluster-tile list of the GPU path (kernels/nonbonded/gpu_clusters.py): 32-atom
    clusters, each with the clusters it interacts with (tiles) and exclusion bitmasks, in
    device buffers of fixed capacity updated in place (capacity mode: ``status`` as for a
    capacity-mode :class:`fastff.NeighborList`)."""

    def __init__(self, n: int, tile_capacity: int, xtile_capacity: int, positions: Tensor,
                 cell: Tensor | None, *, cutoff: float):
        dev, dtype = positions.device, positions.dtype
        nclus = -(-n // 32)
        self.cell: Tensor | None = None  # the box of the last build, as NeighborList.cell
        self.order = torch.zeros(n, dtype=torch.int32, device=dev)
        self.slot = torch.zeros(n, dtype=torch.int32, device=dev)
        self.tile_ptr = torch.zeros(nclus + 1, dtype=torch.int64, device=dev)
        self.xtile_ptr = torch.zeros(nclus + 1, dtype=torch.int64, device=dev)
        self.tile_j = torch.zeros(tile_capacity, dtype=torch.int32, device=dev)
        self.tile_x = torch.zeros(tile_capacity, dtype=torch.int32, device=dev)
        self.masks = torch.zeros(xtile_capacity, 32, dtype=torch.int32, device=dev)
        self.status = torch.zeros(2, dtype=torch.int32, device=dev)
        self.reference = torch.zeros(n, 3, dtype=dtype, device=dev)
        self.ref_cells = torch.zeros(1, 3, 3, dtype=dtype, device=dev)
        self.cutoff, self.num_atoms = cutoff, n
        self.periodic = cell is not None
        self.pbc = torch.full((1, 3), self.periodic, dtype=torch.bool, device=dev)
        self._cells = (cell.detach().to(dtype).reshape(1, 3, 3) if cell is not None
                       else torch.zeros(1, 3, 3, dtype=dtype, device=dev))

    @property
    def num_entries(self) -> int:
        return int(self.tile_j.shape[0])

    def counts(self) -> tuple[int, int]:
        """(tiles, tiles holding exclusions) of the last build: a host synchronisation."""
        return int(self.tile_ptr[-1]), int(self.xtile_ptr[-1])


class TileVerletList:
    """A :class:`TileList` within ``cutoff + skin``, rebuilt on the device when an atom moved
    more than ``skin / 2`` or the box changed (no host synchronisation in steady steps, as a
    capacity-mode :class:`fastff.VerletList`). The host rebuilds (and may synchronise once to
    size the buffers) on the first call, for a new atom count, dtype, device, periodicity or
    exclusion list, and after an overflow."""

    def __init__(self, cutoff: float, skin: float, *, backend: str | None = None,
                 headroom: float = 1.3):
        self.cutoff, self.skin, self.backend, self.headroom = (float(cutoff), float(skin),
                                                               backend, float(headroom))
        self._list: TileList | None = None
        self._key: tuple | None = None
        self._poll: _StatusPoll | None = None
        self._grow: tuple[int, int] | None = None

    @property
    def rebuilds(self) -> int:
        """Builds so far (read from the device)."""
        return 0 if self._list is None else int(self._list.status[1])

    def update(self, positions: Tensor, cell: Tensor | None, excl_ptr: Tensor, excl_j: Tensor,
               max_exclusions: int, exclusions_key=None) -> TileList:
        """The list for these positions. ``exclusions_key``: an object that changes when the
        exclusions do (default: the ``excl_j`` tensor and its version)."""
        from fastff.verlet import _Identity, _StatusPoll, capturing

        key = (positions.shape, positions.dtype, positions.device, cell is not None,
               _Identity(excl_j if exclusions_key is None else exclusions_key), max_exclusions)
        if self._list is not None and self._poll is not None and not capturing(positions):
            self._take_poll()
        if self._list is None or key != self._key or self._grow is not None:
            self._first_build(positions, cell, excl_ptr, excl_j, max_exclusions)
            self._key = key
            self._poll = _StatusPoll(positions.device)
        else:
            self._build(positions, cell, excl_ptr, excl_j, max_exclusions)
        assert self._list is not None and self._poll is not None
        if not capturing(positions):
            self._poll.start(self._list.status, self._list.tile_ptr)
        return self._list

    def check(self) -> None:
        """Raise if the list is unusable (overflow, non-finite positions, a box it does not
        suit): reads its status word, a host synchronisation."""
        from fastff.neighbors import raise_for_status

        if self._list is not None:
            raise_for_status(self._list.status, self._list.counts()[0], self._list.num_entries)

    def _cells(self, positions: Tensor, cell: Tensor | None) -> Tensor:
        if cell is None:
            return torch.zeros(1, 3, 3, dtype=positions.dtype, device=positions.device)
        return cell.detach().to(positions.dtype).reshape(1, 3, 3)

    def _build(self, positions, cell, excl_ptr, excl_j, max_exclusions, check=True) -> None:
        """The device-side Verlet test (unless the host asked for the build), then the guarded
        rebuild (no synchronisation)."""
        from fastff.kernels.nonbonded import op as nbop

        tl = self._list
        assert tl is not None
        cells = self._cells(positions, cell)
        if check:
            name, launch = registry.resolve("verlet_check", positions.device, self.backend)
            launch(positions.detach(), cells, tl.reference, tl.ref_cells, self.skin, tl.status)
        name, launch = registry.resolve("cluster_list_into", positions.device, self.backend)
        args = (positions.detach(), cells, tl.periodic, self.cutoff, self.cutoff + self.skin,
                excl_ptr, excl_j, max_exclusions, tl.status, tl.reference, tl.ref_cells,
                tl.order, tl.slot, tl.tile_ptr, tl.xtile_ptr, tl.tile_j, tl.tile_x, tl.masks)
        if type(positions) is Tensor and not torch.compiler.is_compiling():
            launch(*args)
        else:
            nbop.cluster_list_into(*args, name)
        tl._cells = cells
        tl.cell = None if cell is None else cell.detach()

    def _first_build(self, positions, cell, excl_ptr, excl_j, max_exclusions) -> None:
        """Sized on the host: a build with the previous (or a generous) capacity, the counts
        read back, and a second build into larger buffers when they did not fit."""
        n = positions.shape[0]
        nclus = -(-n // 32)
        tiles, xtiles = self._grow or (max(64, 48 * nclus), max(16, 2 * nclus))
        self._grow = None
        for _ in range(2):
            self._list = TileList(n, tiles, xtiles, positions, cell,
                                  cutoff=self.cutoff + self.skin)
            self._list.status[0] = status_bits.REBUILD
            self._build(positions, cell, excl_ptr, excl_j, max_exclusions, check=False)
            need_tiles, need_x = self._list.counts()
            if need_tiles <= tiles and need_x <= xtiles:
                break
            tiles = int(self.headroom * need_tiles) + 64
            xtiles = int(self.headroom * need_x) + 16
        assert self._list is not None
        self._list.status[:1].bitwise_and_(~status_bits.REBUILD)

    def _take_poll(self) -> None:
        """The last step's flags, if they arrived (never waits): raise for an unusable list
        after scheduling larger buffers."""
        from fastff.neighbors import raise_for_status

        assert self._poll is not None and self._list is not None
        seen = self._poll.read()
        if seen is None:
            return
        flags, count = seen
        capacity = self._list.num_entries
        if flags & status_bits.OVERFLOW or count > 0.9 * capacity:
            self._grow = (max(int(self.headroom * count) + 64, capacity + 1),
                          2 * int(self._list.masks.shape[0]) + 16)
        if flags & status_bits.INVALID:
            raise_for_status(torch.tensor([flags, 0], dtype=torch.int32), count, capacity)
