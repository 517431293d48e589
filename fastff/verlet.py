"""Reuse of a neighbor list across MD steps: a Verlet list with a skin."""

from __future__ import annotations

import torch
from torch import Tensor

from fastff import _checks
from fastff.neighbors import NeighborList, neighbor_list


class VerletList:
    """Pairs within ``cutoff + skin``, rebuilt only when needed.

    A rebuild happens on the first call, when any atom has moved more than ``skin / 2`` since the
    last build, or when the cell, pbc, batch or number of atoms changed. Between rebuilds the same
    pairs (and shifts) are returned: they remain a superset of the pairs within ``cutoff`` and
    stay consistent with unwrapped positions. Consumers apply ``cutoff`` themselves (pairs between
    ``cutoff`` and ``cutoff + skin`` must contribute zero, as with any smooth cutoff).

    Args:
        cutoff: interaction cutoff, > 0.
        skin: extra distance, >= 0. Larger skins rebuild less often but hold more pairs.
        half: build half lists.
        backend: as for :func:`fastff.neighbor_list`.

    Attributes:
        rebuilds: number of builds so far; ``steps``: number of ``update`` calls.
    """

    def __init__(self, cutoff: float, skin: float, *, half: bool = False,
                 backend: str | None = None):
        self.cutoff = _checks.cutoff(cutoff)
        if not skin >= 0.0 or skin != skin or skin == float("inf"):
            raise ValueError(f"skin must be finite and >= 0, got {skin}")
        self.skin = float(skin)
        self.half, self.backend = half, backend
        self.rebuilds = 0
        self.steps = 0
        self._nl: NeighborList | None = None
        self._reference: Tensor | None = None  # positions at the last build
        self._key: tuple | None = None

    @property
    def neighbor_list(self) -> NeighborList | None:
        """The current list (None before the first update)."""
        return self._nl

    def _needs_rebuild(self, positions: Tensor, cell, pbc, batch) -> bool:
        if self._nl is None or self._reference is None:
            return True
        ref = self._reference
        if (positions.shape != ref.shape or positions.dtype != ref.dtype
                or positions.device != ref.device):
            return True
        key = self._key
        assert key is not None
        if not _same(cell, key[0]) or not _same(pbc, key[1]) or not _same(batch, key[2]):
            return True
        moved2 = (positions.detach() - ref).square().sum(dim=1).max() if positions.shape[0] else 0.0
        return bool(moved2 > (0.5 * self.skin) ** 2)

    def update(self, positions: Tensor, cell: Tensor | None = None, pbc=None,
               batch: Tensor | None = None) -> NeighborList:
        """The neighbor list (pairs within cutoff + skin) for these positions."""
        self.steps += 1
        if self._needs_rebuild(positions, cell, pbc, batch):
            self._nl = neighbor_list(positions, self.cutoff + self.skin, cell, pbc, batch,
                                     half=self.half, backend=self.backend)
            self._reference = positions.detach().clone()
            self._key = (_snapshot(cell), _snapshot(pbc), _snapshot(batch))
            self.rebuilds += 1
        else:
            _checks.positions(positions)
        assert self._nl is not None
        return self._nl


def _snapshot(x):
    if isinstance(x, Tensor):
        return x.detach().clone()
    return None if x is None else torch.as_tensor(x).clone()


def _same(x, saved) -> bool:
    if x is None or saved is None:
        return x is None and saved is None
    x = torch.as_tensor(x)
    return (x.shape == saved.shape and x.device == saved.device
            and bool(torch.equal(x.detach(), saved)))
