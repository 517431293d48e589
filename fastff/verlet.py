"""Reuse of a neighbor list across MD steps: a Verlet list with a skin."""

from __future__ import annotations

import torch
from torch import Tensor

from fastff import _checks
from fastff.neighbors import NeighborList, neighbor_list


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

    Args:
        cutoff: interaction cutoff, > 0.
        skin: extra distance, >= 0. Larger skins rebuild less often but hold more pairs.
        half: build half lists.
        backend: as for :func:`fastff.neighbor_list`.
        compact: return the pairs within ``cutoff`` rather than ``cutoff + skin``.

    Attributes:
        rebuilds: number of builds so far; ``steps``: number of ``update`` calls.
    """

    def __init__(self, cutoff: float, skin: float, *, half: bool = False,
                 backend: str | None = None, compact: bool = False):
        self.cutoff = _checks.cutoff(cutoff)
        if not skin >= 0.0 or skin != skin or skin == float("inf"):
            raise ValueError(f"skin must be finite and >= 0, got {skin}")
        self.skin = float(skin)
        self.half, self.backend, self.compact = half, backend, bool(compact)
        self.rebuilds = 0
        self.steps = 0
        self._nl: NeighborList | None = None
        self._reference: Tensor | None = None  # positions at the last build
        self._built_for: tuple[_Setting, _Setting, _Setting] | None = None  # cell, pbc, batch

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
        if self._needs_rebuild(positions, cell, pbc, batch):
            self._nl = neighbor_list(positions, self.cutoff + self.skin, cell, pbc, batch,
                                     half=self.half, backend=self.backend)
            self._reference = positions.detach().clone()
            self._built_for = (_Setting(cell), _Setting(pbc), _Setting(batch))
            self.rebuilds += 1
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

    @property
    def _compacts(self) -> bool:
        return self.compact and self.skin > 0.0  # without a skin the list is already exact


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
