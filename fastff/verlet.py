"""Reuse of a neighbor list across MD steps: a Verlet list with a skin."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastff import _checks
from fastff.kernels._runtime import registry
from fastff.kernels._runtime import status as status_bits
from fastff.neighbors import (
    CapacityBuffers,
    NeighborList,
    _normalize_batch,
    _normalize_cell,
    _system_ptr,
    neighbor_list,
    raise_for_status,
)
from fastff.testing import mark_host_buffer


class VerletList:
    """Pairs within ``cutoff + skin``, rebuilt only when needed; optionally compacted to ``cutoff``.

    A rebuild happens on the first call, when any atom has moved more than ``skin / 2`` since the
    last build, or when the cell, pbc, batch or number of atoms changed. Between rebuilds the same
    pairs (and shifts) are reused: they remain a superset of the pairs within ``cutoff`` and
    stay consistent with unwrapped positions.

    The cell, pbc and batch given at the last build are compared by tensor state: the same
    tensor at the same version is the same input (no value is read, so no host sync); another
    tensor is compared by value with a copy kept at the build. An in-place change of the same
    tensor bumps its version and is seen; a change through ``.data`` is not: call
    :meth:`reset` after one.

    With ``compact=False`` (default), :meth:`update` returns that reused list itself; consumers
    apply ``cutoff`` themselves (pairs between ``cutoff`` and ``cutoff + skin`` must contribute
    zero, as with any smooth cutoff). With ``compact=True``, :meth:`update` returns, at every
    call, the pairs of the reused list closer than ``cutoff`` at the given positions
    (:meth:`NeighborList.within`): the same pairs as a fresh ``neighbor_list(positions,
    cutoff)``, at the cost of one pass over the reused list instead of a rebuild, and consumers
    do no work for pairs in the skin (about ``((cutoff + skin) / cutoff)^3`` times fewer pairs).

    **Capacity mode** (``capacity`` given; on the Triton backend) makes every step free of host
    synchronisation, so that an MD step can be captured in a CUDA graph: the rebuild test runs
    on the device and the list is rebuilt, when needed, into buffers of fixed capacity by
    kernels that do nothing in steps that keep it. :meth:`update` returns the same
    capacity-mode :class:`~fastff.NeighborList` every step (read it by row). Value checks of
    the positions are replaced by a device flag after the first call; problems (more pairs
    than slots, non-finite positions) raise OVERFLOW / NONFINITE flags that poison results
    computed from the list (see :func:`fastff.neighbors.poison_invalid`). The flags are read
    without waiting (an asynchronous copy, looked at in the next call) and at :meth:`check`;
    an overflow then raises RuntimeError and the capacity grows for the rerun. The first call,
    and calls where the number of atoms, dtype, device, pbc or batch change, rebuild on the
    host side and may synchronise once.

    Args:
        cutoff: interaction cutoff, > 0.
        skin: extra distance, >= 0. Larger skins rebuild less often but hold more pairs.
        half: build half lists.
        backend: as for :func:`fastff.neighbor_list`.
        compact: return the pairs within ``cutoff`` rather than ``cutoff + skin`` (not with a
            capacity).
        capacity: None (exact lists), a number of pair slots, or "auto": capacity mode on the
            Triton backend only (exact lists elsewhere, where reading a size back costs
            nothing), sized ``headroom`` times the pairs of the first build and grown when a
            later build fills more than 90% of it.
        headroom: slots per pair of the first build in "auto" capacity mode.

    Attributes:
        rebuilds: number of builds so far (capacity mode: read from the device, a host
            synchronisation); ``steps``: number of ``update`` calls.
    """

    def __init__(self, cutoff: float, skin: float, *, half: bool = False,
                 backend: str | None = None, compact: bool = False,
                 capacity: int | str | None = None, headroom: float = 1.3):
        self.cutoff = _checks.cutoff(cutoff)
        if not skin >= 0.0 or skin != skin or skin == float("inf"):
            raise ValueError(f"skin must be finite and >= 0, got {skin}")
        self.skin = float(skin)
        self.half, self.backend, self.compact = half, backend, bool(compact)
        if capacity is not None and capacity != "auto" and not (
                isinstance(capacity, int) and capacity >= 0):
            raise ValueError(f"capacity must be None, 'auto' or an int >= 0, got {capacity!r}")
        if capacity is not None and compact:
            raise ValueError("compact=True needs exact lists: it cannot be combined with a "
                             "capacity")
        if not headroom >= 1.0:
            raise ValueError(f"headroom must be >= 1, got {headroom}")
        self.capacity, self.headroom = capacity, float(headroom)
        self._rebuilds = 0
        self.steps = 0
        self._nl: NeighborList | None = None
        self._reference: Tensor | None = None  # positions at the last build
        self._built_for: tuple[_Setting, _Setting, _Setting] | None = None  # cell, pbc, batch


        self._key: tuple | None = None
        self._buffers: CapacityBuffers | None = None
        self._next_capacity: int | None = None
        self._poll: _StatusPoll | None = None
        self._cells: tuple | None = None  # (cell, its version, normalized cells, pbc)

    @property
    def rebuilds(self) -> int:
        if self._buffers is not None and self._nl is not None and self._nl.status is not None:
            return int(self._buffers.status[1])
        return self._rebuilds

    @rebuilds.setter
    def rebuilds(self, value: int) -> None:
        self._rebuilds = value

    @property
    def skin_list(self) -> NeighborList | None:
        """The reused list, pairs within ``cutoff + skin`` at the last build (None before the
        first update)."""
        return self._nl

    @property
    def neighbor_list(self) -> NeighborList | None:
        """The reused list within ``cutoff + skin``, as :attr:`skin_list` (also with
        ``compact=True``, where :meth:`update` returns a compacted list instead)."""
        return self._nl

    def _needs_rebuild(self, positions: Tensor, cell, pbc, batch) -> bool:
        if self._nl is None or self._reference is None:
            return True
        if self._nl.i.is_inference() and not torch.is_inference_mode_enabled():
            return True  # built under torch.inference_mode: its tensors cannot enter autograd
        ref = self._reference
        if (positions.shape != ref.shape or positions.dtype != ref.dtype
                or positions.device != ref.device):
            return True
        built_for = self._built_for
        assert built_for is not None
        if not all(s.same(x) for s, x in zip(built_for, (cell, pbc, batch), strict=True)):
            return True
        moved2 = (positions.detach() - ref).square().sum(dim=1).max() if positions.shape[0] else 0.0
        return bool(moved2 > (0.5 * self.skin) ** 2)

    def update(self, positions: Tensor, cell: Tensor | None = None, pbc=None,
               batch: Tensor | None = None) -> NeighborList:
        """The neighbor list for these positions: the reused list (pairs within
        ``cutoff + skin``), or with ``compact=True`` its pairs within ``cutoff``."""
        self.steps += 1
        if self._capacity_mode(positions):
            return self._update_in_place(positions, cell, pbc, batch)
        if self._needs_rebuild(positions, cell, pbc, batch):
            self._nl = neighbor_list(positions, self.cutoff + self.skin, cell, pbc, batch,
                                     half=self.half, backend=self.backend)
            self._reference = positions.detach().clone()
            self._built_for = (_Setting(cell), _Setting(pbc), _Setting(batch))
            self._rebuilds += 1
        elif not self._compacts:
            _checks.positions(positions)  # within() checks them otherwise
        assert self._nl is not None
        if not self._compacts:
            return self._nl
        # cell=None: the list's own cell, equal to ``cell`` (a new cell rebuilds)
        return self._nl.within(positions, self.cutoff)

    def reset(self) -> None:
        """Forget the list: the next :meth:`update` rebuilds it (needed after a change of the
        cell, pbc or batch tensor that its version counter does not see, e.g. through
        ``.data``)."""
        self._nl = self._reference = self._built_for = None
        self._buffers = self._key = self._poll = self._cells = None

    @property
    def _compacts(self) -> bool:
        return self.compact and self.skin > 0.0  # without a skin the list is already exact

    # ---------------------------------------------------------------- capacity mode
    def _capacity_mode(self, positions: Tensor) -> bool:
        if self.capacity is None:
            return False
        name, _ = registry.resolve("neighbor_list_into", positions.device, self.backend)
        return name == "triton" or self.capacity != "auto"

    def check(self) -> None:
        """Raise if the capacity-mode list overflowed or saw non-finite positions (reads the
        status word: one host synchronisation); nothing for exact lists."""
        if self._nl is not None and self._nl.status is not None:
            self._nl.check()

    def _update_in_place(self, positions: Tensor, cell, pbc, batch) -> NeighborList:
        key = _host_key(positions, pbc, batch)
        if self._poll is not None and not capturing(positions):
            self._take_poll()
        if self._buffers is None or key != self._key or self._next_capacity is not None:
            return self._first_build(positions, cell, pbc, batch, key)
        assert self._nl is not None
        # Steady state: no value check reads the device (the Verlet check flags non-finite
        # positions instead); everything below is device work of fixed size.
        with _checks.no_checks():
            if positions.shape != (self._nl.num_atoms, 3):
                _checks.positions(positions)
            cells, periodic = self._normalized(positions, cell, pbc)
            buffers = self._buffers
            buffers.check(positions, cells, self.skin, self.backend)
            buffers.build(positions, self.cutoff + self.skin, cells, periodic, self._system_ptr,
                          self.half, self.backend)
        self._nl._cells, self._nl.cell = cells.detach(), None if cell is None else cell.detach()
        if not capturing(positions):  # a graph replays kernels, not this host-side reading
            self._start_poll()
        return self._nl

    def _first_build(self, positions: Tensor, cell, pbc, batch, key) -> NeighborList:
        """A build the host asks for: sizes the buffers (reads the number of pairs once in
        "auto" mode) and fills them."""
        exact = neighbor_list(positions, self.cutoff + self.skin, cell, pbc, batch,
                              half=self.half, backend=self.backend)
        batch_n, num_systems = _normalize_batch(batch, positions)
        self._batch = (batch_n, num_systems)
        self._cells = None
        cells, periodic = self._normalized(positions, cell, pbc)
        self._system_ptr = _system_ptr(batch_n, cells.shape[0], positions.shape[0],
                                       positions.device)
        if self._next_capacity is not None:
            capacity = self._next_capacity
        elif self.capacity == "auto":
            capacity = int(math.ceil(self.headroom * len(exact))) + 64
        else:
            assert isinstance(self.capacity, int)  # checked in __init__
            capacity = self.capacity
        self._next_capacity = None
        buffers = CapacityBuffers(positions.shape[0], capacity, positions, cells)
        count = min(len(exact), capacity)
        buffers.i[:count] = exact.i[:count]
        buffers.j[:count] = exact.j[:count]
        buffers.shifts[:count] = exact.shifts[:count]
        buffers.distances[:count] = exact.distances(positions)[:count]
        buffers.ptr.copy_(exact.ptr)
        buffers.reference.copy_(positions.detach())
        buffers.ref_cells.copy_(cells.detach())
        buffers.status[1] = self._rebuilds + 1
        if len(exact) > capacity:  # a fixed capacity that is too small: flag, as the kernels do
            buffers.status[0] = status_bits.OVERFLOW
        self._rebuilds += 1
        self._buffers, self._key = buffers, key
        self._nl = buffers.neighbor_list(self.cutoff + self.skin, self.half, batch_n, cells,
                                         periodic, cell, exact.backend)
        self._poll = None
        return self._nl

    def _normalized(self, positions: Tensor, cell, pbc):
        """(cells [B, 3, 3], pbc [B, 3]) of this cell and pbc, kept while the same cell tensor
        (and version) and pbc come back: a steady step does no work and reads nothing here."""
        hit = self._cells
        if (hit is not None and hit[0] is cell and hit[1] == getattr(cell, "_version", None)
                and _same_pbc(hit[4], pbc)):
            return hit[2], hit[3]
        batch_n, num_systems = self._batch
        cells, periodic = _normalize_cell(cell, pbc, positions, num_systems, batch_n is not None)
        self._cells = (cell, getattr(cell, "_version", None), cells, periodic, pbc)
        return cells, periodic

    def _start_poll(self) -> None:
        """Copy the status word and pair count to host memory without waiting (read next
        call)."""
        assert self._buffers is not None
        if self._poll is None or self._poll.device != self._buffers.status.device:
            self._poll = _StatusPoll(self._buffers.status.device)
        self._poll.start(self._buffers.status, self._buffers.ptr)

    def _take_poll(self) -> None:
        """Look at the last asynchronous copy if it has arrived (never waits); raise for a list
        that overflowed or saw non-finite positions, after scheduling a larger capacity."""
        assert self._poll is not None and self._buffers is not None
        seen = self._poll.read()
        if seen is None:
            return
        flags, count = seen
        capacity = self._buffers.capacity
        grow = int(math.ceil(self.headroom * count)) + 64
        if flags & status_bits.OVERFLOW:
            self._next_capacity = max(grow, capacity + 1)
        elif self.capacity == "auto" and count > 0.9 * capacity:
            self._next_capacity = grow  # the next call rebuilds into larger buffers
        if flags & status_bits.INVALID:
            status = torch.tensor([flags, 0], dtype=torch.int32)
            raise_for_status(status, count, capacity)


def capturing(x: Tensor) -> bool:
    """True while a CUDA graph is being captured on x's device."""
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _StatusPoll:
    """An asynchronous copy of (status flags, pair count) into host memory: started after a
    step's kernels, read in the next step if it has arrived (a CUDA event query never waits);
    on CPU the copy is immediate."""

    def __init__(self, device: torch.device):
        self.device = device
        pinned = device.type == "cuda"
        self.flags = torch.zeros(2, dtype=torch.int32, pin_memory=pinned)
        self.count = torch.zeros(1, dtype=torch.int64, pin_memory=pinned)
        for t in (self.flags, self.count):  # host memory: reading it waits for nothing
            mark_host_buffer(t)
        self.event = torch.cuda.Event() if pinned else None
        self.pending = False

    def start(self, status: Tensor, ptr: Tensor) -> None:
        self.flags.copy_(status, non_blocking=True)
        self.count.copy_(ptr[-1:], non_blocking=True)
        if self.event is not None:
            self.event.record()
        self.pending = True

    def read(self) -> tuple[int, int] | None:
        if not self.pending or (self.event is not None and not self.event.query()):
            return None
        self.pending = False
        return int(self.flags.tolist()[0]), int(self.count.tolist()[0])


def _same_pbc(a, b) -> bool:
    """Tensors by identity (their values are the device's business), host values by value."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    return a == b


def _host_key(positions: Tensor, pbc, batch) -> tuple:
    """What the host knows changes a capacity-mode list's buffers: atoms, dtype, device, and
    the pbc and batch objects (values of tensors are compared on the device, not here)."""
    return (positions.shape, positions.dtype, positions.device,
            pbc if not isinstance(pbc, Tensor) and pbc is not None else _Identity(pbc),
            _Identity(batch))


class _Identity:
    """Compares by object identity and version (a tensor whose values may change)."""

    def __init__(self, obj):
        self.obj, self.version = obj, getattr(obj, "_version", None)

    def __eq__(self, other) -> bool:
        return (isinstance(other, _Identity) and other.obj is self.obj
                and other.version == self.version)

    def __hash__(self) -> int:
        return hash(type(self))


class _Setting:
    """One input a list was built for (cell, pbc or batch): its value, kept, and the state of the
    tensor that gave it (or of the last tensor found equal to it)."""

    def __init__(self, x):
        self.value = None if x is None else torch.as_tensor(x).detach().clone()
        self.stamp = _checks.Stamp(x) if _checks.stampable(x) else None

    def same(self, x) -> bool:
        """Whether ``x`` holds the value kept: by tensor state when it is the same tensor, else
        by value (then its state is kept, so the next call with it reads no value)."""
        if x is None or self.value is None:
            return x is None and self.value is None
        if self.stamp is not None and self.stamp.matches(x):
            return True
        now = torch.as_tensor(x)
        kept = self.value
        if not (now.shape == kept.shape and now.dtype == kept.dtype and now.device == kept.device
                and bool(torch.equal(now.detach(), kept))):
            return False
        if _checks.stampable(x):
            self.stamp = _checks.Stamp(x)
        return True
