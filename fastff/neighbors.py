"""Neighbor lists: ``neighbor_list``, the ``NeighborList`` it returns, and ``VerletList``.

Conventions (as ASE and vesin): a pair (i, j, S) has the vector
``r_ij = positions[j] - positions[i] + S @ cell``, with ``cell`` rows the lattice vectors and
``S`` integer cell shifts consistent with the positions given (never wrapped behind the
caller's back). A full list holds both (i, j, S) and (j, i, -S); a half list one of them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from fastff import _checks
from fastff.kernels._runtime import memory as _memory
from fastff.kernels._runtime import registry
from fastff.kernels._runtime import status as status_bits
from fastff.kernels.message import op as _message_op
from fastff.kernels.neighbors import op as _op


class NeighborList:
    """Pairs of atoms closer than ``cutoff``, sorted by centre atom ``i`` (CSR layout).

    Attributes:
        i, j: int64 [E], centre and neighbour atom of each pair; sorted by ``i``.
        shifts: int32 [E, 3], integer cell shifts S with r_ij = r_j - r_i + S @ cell.
        ptr: int64 [N + 1], pairs of atom ``a`` are ``ptr[a]:ptr[a + 1]``.
        cutoff: the cutoff the list was built with (pairs have distance < cutoff).
        half: True when each unordered pair is stored once.
        batch: int64 [N] system index per atom, or None for a single system.
        cell: the cell given at build time ([3, 3], [B, 3, 3]) or None; detached.
        pbc: bool [B, 3] periodicity per system.
        backend: the kernel path that built it.
        symmetric: True when every pair (i, j, S) is known to have its mirror (j, i, -S) in the
            list: full lists built by :func:`neighbor_list` (their pair test is exactly
            antisymmetric) and lists compacted from them with :meth:`within`. Message-passing
            modules check other full lists for mirrors.
        status: capacity mode only (else None): int32 [2] on the list's device, (flags, number
            of builds); see :meth:`check`.

    **Capacity mode** (``neighbor_list(..., capacity=C)``, ``VerletList(..., capacity=...)``):
    ``i``, ``j``, ``shifts`` hold ``C`` slots; the pairs are the first ``ptr[-1]`` of them
    (a number that stays on the device), sorted by ``i`` as usual, and the other slots hold the
    padding pair ``(N, N, 0)``. Such a list is built and updated without any host
    synchronisation; consumers read it by row through ``ptr`` (the nonbonded kernels do).
    Methods that need the pairs themselves (:meth:`vectors`, :meth:`distances`,
    :attr:`reverse`, :meth:`within`) refuse it: :meth:`compacted` gives the exact list (one
    synchronisation). When the pairs exceed ``C`` the OVERFLOW flag is raised on the device and
    the list is incomplete: :meth:`check` reads the flags (one synchronisation) and raises.
    """

    def __init__(self, i: Tensor, j: Tensor, shifts: Tensor, ptr: Tensor, *, cutoff: float,
                 half: bool, num_atoms: int, batch: Tensor | None, cells: Tensor, pbc: Tensor,
                 cell: Tensor | None, backend: str, status: Tensor | None = None):
        self.i, self.j, self.shifts, self.ptr = i, j, shifts, ptr
        self.status = status
        self.cutoff, self.half, self.num_atoms = cutoff, half, num_atoms
        self.batch, self.pbc, self.cell, self.backend = batch, pbc, cell, backend
        self._cells = cells  # [B, 3, 3], zeros where no cell was given
        self.symmetric = False
        self._reverse: Tensor | None = None
        self._mirror_pairs: Tensor | None = None  # computed from _reverse, kept with it
        # of a compacted list until its reverse is needed: (source list, rank int32 [E_source])
        self._compacted_from: tuple[NeighborList, Tensor] | None = None
        # the build's distances: (Stamp of positions, _CellStamp or None, distances)
        self._cached: tuple | None = None

    def __len__(self) -> int:
        return int(self.i.shape[0])

    @property
    def num_pairs(self) -> int:
        """The number of pairs (the number of slots, ``capacity``, in capacity mode)."""
        return int(self.i.shape[0])

    @property
    def capacity(self) -> int | None:
        """Slots of a capacity-mode list, None for an exact list."""
        return None if self.status is None else int(self.i.shape[0])

    @property
    def count(self) -> Tensor:
        """int64 [1] on the device: the number of pairs (in capacity mode, possibly more than
        the capacity after an overflow). Reading it is a host synchronisation."""
        return self.ptr[-1:]

    def __repr__(self) -> str:
        kind = "half" if self.half else "full"
        size = (f"pairs={self.num_pairs}" if self.status is None
                else f"capacity={self.capacity}")
        return (f"NeighborList({kind}, atoms={self.num_atoms}, {size}, "
                f"cutoff={self.cutoff}, backend={self.backend!r})")

    def check(self) -> NeighborList:
        """Raise if a capacity-mode list is unusable (overflow, non-finite positions, a cell it
        does not suit); reads its status word (one host synchronisation). Returns self."""
        if self.status is not None:
            raise_for_status(self.status, int(self.ptr[-1]), self.capacity)
        return self

    def compacted(self) -> NeighborList:
        """The exact list of a capacity-mode list (its first ``count`` pairs; raises on
        overflow); self for an exact list. One host synchronisation."""
        if self.status is None:
            return self
        count = int(self.ptr[-1])
        raise_for_status(self.status, count, self.capacity)
        out = NeighborList(self.i[:count], self.j[:count], self.shifts[:count], self.ptr,
                           cutoff=self.cutoff, half=self.half, num_atoms=self.num_atoms,
                           batch=self.batch, cells=self._cells, pbc=self.pbc, cell=self.cell,
                           backend=self.backend)
        out.symmetric = self.symmetric
        return out

    def _exact(self, what: str) -> None:
        if self.status is not None:
            raise ValueError(f"{what} needs the pairs themselves, but this list was built in "
                             "capacity mode (padding after the last pair): use "
                             "nl.compacted() (one host synchronisation), or a consumer that "
                             "reads the list by row (ptr)")

    @property
    def reverse(self) -> Tensor:
        """int64 [E]: index of each pair's mirror (j, i, -S). Full lists only; computed once.

        A list made by :meth:`within` maps its source's reverse (computed once per source)
        through the old-to-new pair index: O(E), no search.
        """
        if self.half:
            raise ValueError("a half neighbor list has no mirror pairs; build it with half=False")
        self._exact("reverse")
        if self._reverse is None:
            reverse = self._mirrors()
            if is_fake(reverse):  # computed while tracing (make_fx, export): do not keep it
                return reverse
            self._reverse = reverse
            self._compacted_from = None  # the source is no longer needed
        return self._reverse

    @property
    def mirror_pairs(self) -> Tensor:
        """int64 [4, P]: each unordered pair of a full list once, as rows (c, m, a, b): its
        canonical edge ``c`` (``c < reverse[c]``), the mirror ``m = reverse[c]`` and the ends
        ``a = i[c]``, ``b = j[c]`` (P = E / 2). Message passing evaluates one filter per pair.
        Computed once, from :attr:`reverse`, and kept only where ``reverse`` is (not while
        tracing); P is a data-dependent size under torch.compile.
        """
        if self._mirror_pairs is None:
            reverse = self.reverse
            name, launch = registry.resolve("mirror_pairs", self.i.device, self.backend)
            if _plain_eager(reverse):
                pairs = launch(self.i, self.j, reverse)
            else:
                pairs = _message_op.mirror_pairs(self.i, self.j, reverse, name)
            if self._reverse is not reverse or torch.compiler.is_compiling() or is_fake(pairs):
                return pairs  # computed while tracing: not kept, as reverse
            self._mirror_pairs = pairs
        return self._mirror_pairs

    def _mirrors(self) -> Tensor:
        if self._compacted_from is None:
            name, _ = registry.resolve("neighbor_reverse", self.i.device, self.backend)
            return _op.neighbor_reverse(self.i, self.j, self.shifts, self.ptr, name)
        source, rank = self._compacted_from
        name, launch = registry.resolve("neighbor_compact_reverse", self.i.device, self.backend)
        args = (source.reverse, source.j, source.ptr, rank, self.ptr, self.num_pairs)
        if _plain_eager(rank):
            return launch(*args)
        return _op.neighbor_compact_reverse(*args, name)

    def within(self, positions: Tensor, cutoff: float, cell: Tensor | None = None
               ) -> NeighborList:
        """The pairs of this list closer than ``cutoff`` at ``positions`` (compaction).

        Meant for a list built with a larger cutoff and reused while atoms move (a Verlet list
        built at cutoff + skin, see :class:`fastff.VerletList`): consumers then see only the
        pairs within their own cutoff. When no atom moved more than ``(self.cutoff - cutoff) / 2``
        since this list was built, the result holds the same pairs as
        ``neighbor_list(positions, cutoff, ...)`` (a pair whose distance rounds to the cutoff
        may fall on either side); otherwise pairs that entered the cutoff from outside this list
        are missing.

        The test is the one :func:`neighbor_list` uses, ``|x_j - x_i + S @ cell|^2 < cutoff^2``
        in float64, computed so that a pair and its mirror get exactly negated vectors: a full
        list keeps both or neither, stays ``symmetric``, and its :attr:`reverse` is mapped from
        this list's through the old-to-new pair index (O(E), no search). Pair order is kept
        (sorted by ``i``, CSR ``ptr``), as are ``half``, ``batch``, ``pbc`` and ``backend``;
        ``cutoff`` becomes the new cutoff.

        Args:
            positions: [N, 3], the atoms this list was built for (any float dtype); detached.
            cutoff: the new cutoff, ``0 < cutoff <= self.cutoff``.
            cell: [3, 3] or [B, 3, 3] in the dtype of positions; None uses the cell this list
                was built with.

        Returns:
            A new :class:`NeighborList`. Deterministic on CPU (numba: parallel over rows, count
            then write). On CUDA this runs as a few torch ops (no Triton kernel); it reads the
            pair count back to the host, so it cannot be captured in a CUDA graph.
        """
        self._exact("within()")
        c = _checks.cutoff(cutoff)
        if c > self.cutoff:
            raise ValueError(f"cutoff {c} is larger than the neighbor list's cutoff {self.cutoff}:"
                             " pairs in between are not in the list; build a new list")
        _checks.positions(positions)
        _checks.same_device("positions", positions, "the neighbor list", self.i)
        cells = self._cell_for(positions, cell)
        return _compact(self, positions, c, cells.detach(),
                        self.cell if cell is None else cell.detach())

    def _cell_for(self, positions: Tensor, cell: Tensor | None) -> Tensor:
        _checks.float_dtype(positions, "positions")
        if positions.shape[0] != self.num_atoms:
            raise ValueError(f"positions has {positions.shape[0]} atoms but this neighbor list "
                             f"was built for {self.num_atoms}")
        if cell is None:
            return self._cells.to(positions.dtype)
        cells = cell.unsqueeze(0) if cell.dim() == 2 else cell
        if cells.shape != self._cells.shape:
            want = [3, 3] if self._cells.shape[0] == 1 else list(self._cells.shape)
            raise ValueError(f"cell must have shape {want}, got {list(cell.shape)}")
        _checks.same_float_dtype("cell", cell, "positions", positions)
        _checks.same_device("cell", cell, "positions", positions)
        return cells

    def vectors(self, positions: Tensor, cell: Tensor | None = None) -> Tensor:
        """r_ij [E, 3] = positions[j] - positions[i] + shifts @ cell.

        Differentiable (to any order) in ``positions`` and ``cell``; ``cell=None`` uses the cell
        the list was built with (detached). Deterministic on CPU.
        """
        self._exact("vectors()")
        cells = self._cell_for(positions, cell)
        name, _ = registry.resolve("pair_vectors", positions.device, self.backend)
        return _op.pair_vectors(positions, cells, self.batch, self.i, self.j, self.shifts, name)

    def distances(self, positions: Tensor, cell: Tensor | None = None) -> Tensor:
        """|r_ij| [E] in the dtype of positions; differentiable (to any order) in ``positions``
        and ``cell`` like :meth:`vectors`.

        * ``positions`` and ``cell`` are the tensors the list was built from (the same objects,
          unchanged: same ``_version``, see :class:`fastff._checks.Stamp`; ``cell=None`` stands
          for the build's cell) and no gradient is needed: the distances the build computed,
          without new work.
        * Otherwise one fused pass over the pairs (``pair_distances``): |x_j - x_i + S @ cell|
          per pair, without the [E, 3] vectors. Its backward (when a gradient is needed) is
          built from ``pair_vectors`` and its transpose, so any order of derivative works.

        Deterministic on CPU. On CUDA the fused op runs the torch composition (no Triton kernel).
        """
        self._exact("distances()")
        needs_grad = torch.is_grad_enabled() and (
            positions.requires_grad or (cell is not None and cell.requires_grad))
        if not needs_grad:
            cached = self._built_distances(positions, cell)
            if cached is not None:
                return cached
        cells = self._cell_for(positions, cell)
        name, launch = registry.resolve("pair_distances", positions.device, self.backend)
        if needs_grad:
            return _op.pair_distances(positions, cells, self.batch, self.i, self.j, self.shifts,
                                      name)
        args = (positions.detach(), cells.detach(), self.batch, self.i, self.j, self.shifts)
        if _plain_eager(positions):  # no gradient: skip the custom op's dispatch, as the build
            return launch(*args)
        return _op.pair_distances(*args, name)

    def _built_distances(self, positions: Tensor, cell: Tensor | None) -> Tensor | None:
        """The build's distances if ``positions`` and ``cell`` are its unchanged inputs."""
        if self._cached is None:
            return None
        pos_stamp, cell_stamp, distances = self._cached
        if not pos_stamp.matches(positions):
            return None
        if cell is None:  # the build's cell: self.cell shares the given cell's version counter
            cell = self.cell
        if cell is None:
            return distances if cell_stamp is None else None
        return distances if cell_stamp is not None and cell_stamp.matches(cell) else None

    def _remember(self, positions: Tensor, distances: Tensor, cell: Tensor | None = None) -> None:
        """Keep the build's distances for :meth:`distances`, keyed by the state of positions
        and cell (nothing is kept for tensors without a version counter: inference tensors)."""
        if not _checks.cacheable(positions) or not (cell is None or _checks.cacheable(cell)):
            self._cached = None
            return
        # the cell is matched as given, or as self.cell (cell=None), a view of it
        self._cached = (_checks.Stamp(positions),
                        None if cell is None else _CellStamp(cell, self.cell), distances)

    # ---- pairs in and out: edge lists, devices, batches (see fastff/_edge_index.py) ----------

    @classmethod
    def from_edge_index(cls, edge_index: Tensor, num_atoms: int, *, shifts: Tensor | None = None,
                        cell: Tensor | None = None, pbc=None, batch: Tensor | None = None,
                        cutoff: float | None = None, flow: str = "source_to_target",
                        half: bool = False, backend: str | None = None) -> NeighborList:
        """A :class:`NeighborList` from pairs found by any other code (torch_geometric, ASE,
        vesin, matscipy, a data pipeline), usable by every fastff op and module.

        Convention: for ``flow="source_to_target"`` (torch_geometric's default) column ``k`` is
        the edge ``edge_index[0, k] -> edge_index[1, k]``, i.e. source ``j`` and target (centre)
        ``i``; for ``"target_to_source"`` row 0 is ``i`` and row 1 is ``j``. A pair's vector is

            r_ij = x[j] - x[i] + shifts @ cell,

        the convention of ASE, vesin, matscipy, MACE and NequIP, whose ``(i, j, S)`` outputs
        map onto it unchanged: ``from_edge_index(torch.stack([i, j]), n, shifts=S,
        flow="target_to_source")``, or ``torch.stack([j, i])`` with the default flow.
        torch_geometric's own graph builders (``radius_graph``) are not periodic (no shifts);
        a periodic graph whose vector is ``x[edge_index[0]] - x[edge_index[1]] + S @ cell``
        maps with ``S`` unchanged (default flow), one with ``x[edge_index[1]] -
        x[edge_index[0]] + S @ cell`` with ``-S``.

        The pairs are sorted by ``i`` (stable: the given order within a row), ``ptr`` is built,
        and while value checks are on (``fastff.set_checks``) the list is validated before it
        is used, each error giving the count and one example: indices out of range or negative,
        an atom paired with itself without a shift, pairs across systems of a batch, shifts
        along non-periodic axes, duplicate pairs, and for a full list (``half=False``) pairs
        whose mirror ``(j, i, -S)`` is missing (a half list: pairs whose mirror is present).
        That check computes :attr:`reverse`, which is kept; with checks off it is computed when
        first needed.

        Args:
            edge_index: int64 [2, E].
            num_atoms: N, the number of atoms (indices are in [0, N)).
            shifts: integer [E, 3] cell shifts S (any integer dtype, stored as int32); None for
                no shifts (every pair in the home cell). Needs ``cell``.
            cell: [3, 3] or [B, 3, 3] lattice vectors as rows (float), or None.
            pbc: bool [3] or [B, 3]; default: periodic along every axis when ``cell`` is given.
            batch: int64 [N], sorted system index of each atom, or None for one system.
            cutoff: the cutoff the pairs were found with (length unit of the positions); a
                module or model checks its own cutoff against it. None: unknown, taken as
                infinite (no module can then check that the list holds all its pairs).
            flow: "source_to_target" or "target_to_source", as above.
            half: True when each unordered pair is stored once.
            backend: the kernel path for the list's ops ("numba", "triton", "reference"); None
                chooses by device, as :func:`neighbor_list`.

        Returns:
            A :class:`NeighborList` on the device of ``edge_index``; ``symmetric`` when it is a
            checked full list.
        """
        from fastff._edge_index import from_edge_index

        return from_edge_index(cls, edge_index, num_atoms, shifts=shifts, cell=cell, pbc=pbc,
                               batch=batch, cutoff=cutoff, flow=flow, half=half, backend=backend)

    def edge_index(self, flow: str = "source_to_target") -> Tensor:
        """int64 [2, E]: the pairs in torch_geometric's layout, ``[j, i]`` for
        ``flow="source_to_target"`` (messages flow from neighbour j to centre i) and ``[i, j]``
        for ``"target_to_source"``; pair ``k`` keeps its ``shifts[k]``."""
        from fastff._edge_index import check_flow

        self._exact("edge_index()")
        if check_flow(flow) == "source_to_target":
            return torch.stack((self.j, self.i))
        return torch.stack((self.i, self.j))

    def to(self, device) -> NeighborList:
        """This list on ``device`` (itself if already there); what was computed lazily
        (``reverse``) moves along. The backend is kept where it runs on the new device, else
        chosen by device (numba -> triton on CUDA)."""
        from fastff._edge_index import moved

        self._exact("to()")
        return moved(self, torch.device(device))

    @classmethod
    def cat(cls, lists) -> NeighborList:
        """One batched list from per-frame lists, as a data loader's collate builds a batch.

        Atom indices of list ``k`` are offset by the atoms of the lists before it, its systems
        by their systems; ``batch`` [sum N] is the joined system index (a list without batch is
        one system), ``cell`` and ``pbc`` are stacked to [B, 3, 3] and [B, 3] (zeros and False
        for a list without cell), ``cutoff`` is the smallest of the lists', ``reverse`` is
        joined where every list has computed it. All lists must be on one device and all full
        or all half.
        """
        from fastff._edge_index import cat

        return cat(cls, lists)


class _CellStamp:
    """The build's cell as given and as kept by the list (``cell.detach()``, one version
    counter): either tensor, unchanged, matches."""

    __slots__ = ("_given", "_kept")

    def __init__(self, given: Tensor, kept: Tensor | None):
        self._given = _checks.Stamp(given)
        self._kept = None if kept is None else _checks.Stamp(kept)

    def matches(self, t: Tensor) -> bool:
        return self._given.matches(t) or (self._kept is not None and self._kept.matches(t))


def _normalize_batch(batch: Tensor | None, positions: Tensor):
    """(batch or None, number of systems implied by batch or None, system_ptr or None)."""
    if batch is None:
        return None, None
    _checks.index_tensor(batch, "batch", positions.shape[0])
    _checks.same_device("batch", batch, "positions", positions)
    if batch.numel() == 0:
        return batch, 0
    if _checks.checks_enabled():
        if bool((batch[1:] < batch[:-1]).any()):
            raise ValueError("batch must be sorted (atoms of one system contiguous, systems in "
                             "increasing order)")
        if int(batch[0]) < 0:
            raise ValueError(f"batch holds a negative system index {int(batch[0])}")
    return batch, int(batch[-1]) + 1


def _normalize_cell(cell: Tensor | None, pbc, positions: Tensor, num_systems: int | None,
                    batched: bool):
    """(cells [B,3,3], pbc [B,3] bool) in the dtype and device of positions."""
    dev, dtype = positions.device, positions.dtype
    b = (num_systems or 0) if batched else 1
    if cell is None:
        cells = torch.zeros(b, 3, 3, dtype=dtype, device=dev)
    else:
        if not isinstance(cell, Tensor):
            raise TypeError(f"cell must be a torch.Tensor, got {type(cell).__name__}")
        _checks.same_device("cell", cell, "positions", positions)
        _checks.same_float_dtype("cell", cell, "positions", positions)
        if cell.shape == (3, 3):
            cells = cell.expand(b, 3, 3)
        elif cell.dim() == 3 and cell.shape[1:] == (3, 3):
            if not batched and cell.shape[0] != 1:
                raise ValueError(f"cell has shape {list(cell.shape)} ([B, 3, 3]) but no batch was "
                                 "given; pass batch, or a [3, 3] cell")
            if batched and cell.shape[0] < (num_systems or 0):
                raise ValueError(f"batch refers to {num_systems} systems but cell holds only "
                                 f"{cell.shape[0]}")
            cells = cell
        else:
            raise ValueError(f"cell must have shape [3, 3] or [B, 3, 3], got {list(cell.shape)}")
    b = cells.shape[0]
    if pbc is None:
        periodic = torch.full((b, 3), cell is not None, dtype=torch.bool, device=dev)
    else:
        periodic = torch.as_tensor(pbc, device=dev)
        if periodic.dtype != torch.bool:
            raise TypeError(f"pbc must hold bools, got {periodic.dtype}")
        if periodic.shape == (3,):
            periodic = periodic.expand(b, 3)
        elif periodic.shape != (b, 3):
            raise ValueError(f"pbc must have shape [3] or [{b}, 3], got {list(periodic.shape)}")
    if cell is None:
        if pbc is not None and bool(periodic.any()):
            raise ValueError("pbc is True along some axis but no cell was given")
    elif _checks.checks_enabled() and bool(periodic.any()):  # a value check of the cell
        _check_periodic_cells(cells, periodic)
    return cells.contiguous(), periodic.contiguous()


def _check_periodic_cells(cells: Tensor, pbc: Tensor) -> None:
    """Periodic rows must be finite and linearly independent.

    Test: the Gram determinant of the periodic rows over the product of their squared norms
    (1 for orthogonal rows, 0 for dependent ones); non-periodic rows are ignored.
    """
    if cells.shape[0] == 1 and cells.device.type == "cpu":
        # one system: plain Python floats cost a few microseconds, torch ops ten times more
        lattice, flags = cells[0].tolist(), pbc[0].tolist()
        if not all(math.isfinite(x) for row in lattice for x in row):
            raise ValueError("cell contains NaN or inf")
        ratio = _hadamard_ratio([r for r, p in zip(lattice, flags, strict=True) if p])
        if not ratio > 1e-12:
            _singular(cells, pbc, 0)
        return
    c = cells.detach().double()
    if not bool(torch.isfinite(c).all()):
        raise ValueError("cell contains NaN or inf")
    aperiodic = (~pbc).double()
    rows = c * pbc.unsqueeze(-1)
    gram = rows @ rows.transpose(1, 2) + torch.diag_embed(aperiodic)
    ratio = torch.linalg.det(gram) / ((rows * rows).sum(-1) + aperiodic).prod(-1)
    bad = (~(ratio > 1e-12)).nonzero()  # also catches 0/0 from zero rows
    if bad.numel():
        _singular(cells, pbc, int(bad[0, 0]))


def _hadamard_ratio(rows: list[list[float]]) -> float:
    """det(Gram) / prod |row|^2 for 1 to 3 rows; 1.0 for none, nan for zero rows."""
    if not rows:
        return 1.0
    g = [[a[0] * b[0] + a[1] * b[1] + a[2] * b[2] for b in rows] for a in rows]
    if len(rows) == 1:
        det = g[0][0]
    elif len(rows) == 2:
        det = g[0][0] * g[1][1] - g[0][1] * g[1][0]
    else:
        det = (g[0][0] * (g[1][1] * g[2][2] - g[1][2] * g[2][1])
               - g[0][1] * (g[1][0] * g[2][2] - g[1][2] * g[2][0])
               + g[0][2] * (g[1][0] * g[2][1] - g[1][1] * g[2][0]))
    norms = math.prod(g[k][k] for k in range(len(rows)))
    return det / norms if norms > 0 else math.nan


def _singular(cells: Tensor, pbc: Tensor, s: int) -> None:
    axes = [k for k in range(3) if bool(pbc[s, k])]
    where = "" if cells.shape[0] == 1 else f"[{s}]"
    raise ValueError(f"cell{where} is singular along its periodic axes {axes}: "
                     f"lattice vectors {cells[s].tolist()}")


def _plain_eager(x: Tensor) -> bool:
    """True outside torch.compile, make_fx/export tracing, fake tensors and profiling, where the
    custom op must be seen; elsewhere a launcher may be called directly."""
    return (type(x) is Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and not torch.autograd._profiler_enabled())


def _compact(nl: NeighborList, positions: Tensor, cutoff: float, cells: Tensor,
             cell: Tensor | None) -> NeighborList:
    """:meth:`NeighborList.within` after its checks."""
    name, launch = registry.resolve("neighbor_compact", positions.device, nl.backend)
    args = (positions.detach(), cells, nl.batch, nl.i, nl.j, nl.shifts, nl.ptr, cutoff)
    if _plain_eager(positions):  # integer outputs: skip the custom op's dispatch, as above
        i, j, shifts, ptr, rank = launch(*args)
    else:
        i, j, shifts, ptr, rank = _op.neighbor_compact(*args, name)
    out = NeighborList(i, j, shifts, ptr, cutoff=cutoff, half=nl.half, num_atoms=nl.num_atoms,
                       batch=nl.batch, cells=cells, pbc=nl.pbc, cell=cell, backend=nl.backend)
    out.symmetric = nl.symmetric
    if not nl.half:
        out._compacted_from = (nl, rank)
    return out


def neighbor_list(positions: Tensor, cutoff: float, cell: Tensor | None = None, pbc=None,
                  batch: Tensor | None = None, *, half: bool = False,
                  backend: str | None = None, capacity: int | None = None) -> NeighborList:
    """All pairs of atoms closer than ``cutoff``, with periodic images.

    Args:
        positions: [N, 3] float32 or float64, any length unit; need not be wrapped into the cell.
        cutoff: pairs with distance < cutoff are kept (same unit as positions).
        cell: [3, 3] (rows are lattice vectors) or [B, 3, 3] with ``batch``; None for no cell.
        pbc: bool [3] or [B, 3]; default: periodic along every axis when ``cell`` is given.
            Rows of non-periodic axes may be zero.
        batch: int64 [N], sorted system index of each atom; pairs never cross systems.
        half: store each unordered pair once (i < j, or i == j with S lexicographically > 0).
        backend: "numba", "triton", "reference" or None (``FASTFF_BACKEND``, then by device).
        capacity: build in capacity mode with this many pair slots (see :class:`NeighborList`):
            no host synchronisation on CUDA (the exact list reads its size back once); check
            for overflow with ``nl.check()`` at a point where the host waits anyway.

    Returns:
        A :class:`NeighborList`. Deterministic on CPU and with the Triton backend (order and
        values), and the same pair set on every backend. Not differentiable itself: use
        ``nl.vectors`` / ``nl.distances``.
    """
    _checks.positions(positions)
    c = _checks.cutoff(cutoff)
    batch, num_systems = _normalize_batch(batch, positions)
    cells, periodic = _normalize_cell(cell, pbc, positions, num_systems, batch is not None)
    n = positions.shape[0]
    system_ptr = _system_ptr(batch, cells.shape[0], n, positions.device)
    if capacity is None:
        _check_pair_memory(positions, c, cells, periodic, batch, system_ptr)
    if capacity is not None:
        buffers = CapacityBuffers(n, int(capacity), positions, cells)
        buffers.status[0] = status_bits.REBUILD
        name = buffers.build(positions, c, cells, periodic, system_ptr, half, backend)
        buffers.status[:1].bitwise_and_(~status_bits.REBUILD)  # built: flags report problems
        return buffers.neighbor_list(c, half, batch, cells, periodic, cell, name)
    name, launch = registry.resolve("neighbor_list", positions.device, backend)
    pos = positions.detach().contiguous()
    args = (pos, c, cells.detach(), periodic, system_ptr, half)
    if _plain_eager(pos):
        # Integer outputs, no autograd: outside tracing the custom op would only add its
        # dispatch cost (~25 us, a sixth of an 8-atom call), so call the launcher directly.
        i, j, shifts, ptr, dist = launch(*args)
    else:
        i, j, shifts, ptr, dist = _op.neighbor_list(*args, name)
    nl = NeighborList(i, j, shifts, ptr, cutoff=c, half=half, num_atoms=n, batch=batch,
                      cells=cells.detach(), pbc=periodic,
                      cell=None if cell is None else cell.detach(), backend=name)
    nl.symmetric = not half
    nl._remember(positions, dist, cell)
    return nl


#: bytes a list keeps per pair besides its distance: i, j (int64) and shifts (int32 [3])
_PAIR_BYTES = 8 + 8 + 12
#: below this many bytes for every atom paired with every other, no estimate is made
_SMALL_LIST_BYTES = 1 << 26


def _check_pair_memory(positions: Tensor, cutoff: float, cells: Tensor, pbc: Tensor,
                       batch: Tensor | None, system_ptr: Tensor) -> None:
    """Refuse, before any pass runs, a cutoff whose expected pairs do not fit in free memory.

    Expected pairs of a system of n atoms in volume V: ``n * n / V * (4/3) pi cutoff^3``
    (homogeneous density), at most ``n * n`` without periodic axes. V is the cell's volume,
    a non-periodic axis taking the extent of the atoms along it plus ``2 * cutoff``. An
    estimate, not a bound: the build still checks the exact count. Reads values (cell,
    extents): on CPU always, elsewhere only while value checks are on (a host sync).
    """
    if not _plain_eager(positions) or not (positions.device.type == "cpu"
                                           or _checks.checks_enabled()):
        return
    bytes_per_pair = _PAIR_BYTES + positions.element_size()
    if cells.shape[0] == 1:
        n = float(positions.shape[0])
        flags = pbc[0].tolist()
        if not any(flags) and n * n * bytes_per_pair < _SMALL_LIST_BYTES:
            return
        rows = cells[0].tolist()
        if not all(flags):
            extent = ((positions.detach().amax(0) - positions.detach().amin(0)).tolist()
                      if n else [0.0, 0.0, 0.0])
            for k in range(3):
                if not flags[k]:
                    rows[k] = [0.0, 0.0, 0.0]
                    rows[k][k] = extent[k] + 2.0 * cutoff
        volume = abs(rows[0][0] * (rows[1][1] * rows[2][2] - rows[1][2] * rows[2][1])
                     - rows[0][1] * (rows[1][0] * rows[2][2] - rows[1][2] * rows[2][0])
                     + rows[0][2] * (rows[1][0] * rows[2][1] - rows[1][1] * rows[2][0]))
        per_atom = n * (4.0 / 3.0) * math.pi * cutoff**3 / volume if volume > 0 else math.inf
        pairs = n * (per_atom if any(flags) else min(n, per_atom))
    else:
        sizes = (system_ptr[1:] - system_ptr[:-1]).double()
        if not bool(pbc.any()) and float((sizes * sizes).sum()) * bytes_per_pair \
                < _SMALL_LIST_BYTES:
            return
        lattice = cells.detach().double().clone()
        if not bool(pbc.all()):
            pos = positions.detach().double()
            index = (torch.zeros(pos.shape[0], dtype=torch.int64, device=pos.device)
                     if batch is None else batch).unsqueeze(1).expand(-1, 3)
            empty = pos.new_full((lattice.shape[0], 3), math.inf)
            hi = (-empty).scatter_reduce(0, index, pos, "amax")
            lo = empty.scatter_reduce(0, index, pos, "amin")
            spans = torch.where(hi >= lo, hi - lo, 0.0) + 2.0 * cutoff
            lattice = torch.where(pbc.unsqueeze(-1), lattice, torch.diag_embed(spans))
        volumes = torch.linalg.det(lattice).abs()
        neighbours = sizes * (4.0 / 3.0) * math.pi * cutoff**3 / volumes
        neighbours = torch.where(pbc.any(1), neighbours, torch.minimum(neighbours, sizes))
        pairs = float((sizes * neighbours).sum())
    free = _memory.free_memory(positions.device)
    if free is not None and pairs * bytes_per_pair > free:
        raise MemoryError(f"cutoff {cutoff} would give about {pairs:.3g} pairs "
                          f"({pairs * bytes_per_pair / 2**30:.3g} GiB) for "
                          f"{positions.shape[0]} atoms, but only {free / 2**30:.2f} GiB is "
                          f"free on {positions.device}; use a smaller cutoff")


def _system_ptr(batch: Tensor | None, num_systems: int, n: int, device) -> Tensor:
    """int64 [B + 1]: atoms of system s are system_ptr[s]:system_ptr[s + 1] (device ops only:
    no upload)."""
    if batch is None:
        ptr = torch.full((2,), n, dtype=torch.int64, device=device)
        ptr[0] = 0
        return ptr
    return torch.searchsorted(batch, torch.arange(num_systems + 1, device=device))


class CapacityBuffers:
    """The device buffers of a capacity-mode list: pairs (``capacity`` slots), CSR ``ptr``,
    the status word (flags, builds) and the Verlet reference (positions and cells of the last
    build). Updated in place, so a list built on them stays valid (and a CUDA graph that
    captured them replays on the same memory)."""

    def __init__(self, n: int, capacity: int, positions: Tensor, cells: Tensor):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        dev, dtype = positions.device, positions.dtype
        self.i = torch.full((capacity,), n, dtype=torch.int64, device=dev)
        self.j = torch.full((capacity,), n, dtype=torch.int64, device=dev)
        self.shifts = torch.zeros(capacity, 3, dtype=torch.int32, device=dev)
        self.distances = torch.full((capacity,), math.inf, dtype=dtype, device=dev)
        self.ptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
        self.status = torch.zeros(2, dtype=torch.int32, device=dev)
        self.reference = torch.zeros(n, 3, dtype=dtype, device=dev)
        self.ref_cells = torch.zeros(cells.shape, dtype=dtype, device=dev)

    @property
    def capacity(self) -> int:
        return int(self.i.shape[0])

    def build(self, positions: Tensor, cutoff: float, cells: Tensor, pbc: Tensor,
              system_ptr: Tensor, half: bool, backend: str | None) -> str:
        """Rebuild in place when the status word asks for it (on the device); returns the
        backend that ran."""
        name, launch = registry.resolve("neighbor_list_into", positions.device, backend)
        args = (positions.detach().contiguous(), cutoff, cells.detach(), pbc, system_ptr, half,
                self.status, self.reference, self.ref_cells, self.i, self.j, self.shifts,
                self.ptr, self.distances)
        if _plain_eager(positions):
            launch(*args)
        else:
            _op.neighbor_list_into(*args, name)
        return name

    def check(self, positions: Tensor, cells: Tensor, skin: float, backend: str | None) -> None:
        """The Verlet test on the device: flags a rebuild when needed (no synchronisation)."""
        name, launch = registry.resolve("verlet_check", positions.device, backend)
        args = (positions.detach(), cells.detach(), self.reference, self.ref_cells, skin,
                self.status)
        if _plain_eager(positions):
            launch(*args)
        else:
            _op.verlet_check(*args, name)

    def neighbor_list(self, cutoff: float, half: bool, batch: Tensor | None, cells: Tensor,
                      pbc: Tensor, cell: Tensor | None, backend: str) -> NeighborList:
        nl = NeighborList(self.i, self.j, self.shifts, self.ptr, cutoff=cutoff, half=half,
                          num_atoms=self.ptr.shape[0] - 1, batch=batch, cells=cells.detach(),
                          pbc=pbc, cell=None if cell is None else cell.detach(),
                          backend=backend, status=self.status)
        nl.symmetric = not half
        return nl


def raise_for_status(status: Tensor, count: int | None = None,
                     capacity: int | None = None) -> None:
    """Raise RuntimeError naming what the flags of a capacity-mode status word report (reads
    it: a host synchronisation unless it is host memory)."""
    flags = int(status[0])
    problems = [name for bit, name in status_bits.NAMES.items() if flags & bit]
    if not problems:
        return
    detail = ""
    if flags & status_bits.OVERFLOW and count is not None:
        detail = f" ({count} pairs for {capacity} slots)"
    raise RuntimeError(f"capacity-mode neighbor list unusable: {', '.join(problems)}{detail}; "
                       "results computed from it are NaN. Rebuild with a larger capacity (or "
                       "finite positions) and rerun the steps since the last check")


def poison_invalid(x: Tensor, status: Tensor) -> Tensor:
    """``x``, or NaN everywhere (and in its gradients) when the status word of the list it was
    computed from reports a problem: results of a truncated or invalid list never pass as
    numbers. Device ops only (no synchronisation)."""
    bad = (status[0] & status_bits.INVALID) != 0  # 0-dim: x keeps its shape
    return x * torch.where(bad, math.nan, 1.0).to(x.dtype)
