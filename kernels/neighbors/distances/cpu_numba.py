"""Pair distances on CPU in one parallel pass over pairs, without the [E, 3] vectors.

``|x_j - x_i + S @ cell|`` is gathered, summed and square-rooted per pair in registers, so the
pass writes only the [E] output; ``pair_vectors`` followed by a norm writes [E, 3] (fresh pages
at every call in glibc's default malloc), reads it back and then writes [E]. Differences are
taken in float64 whatever the dtype of positions (the cast is free next to the gather), then
rounded once. Indices are clamped to the atoms, so a list whose values were never checked cannot
make it read outside ``positions``. The maths and the tuning table: ../README.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange


@njit(cache=True, parallel=True)
def _pair_distances(pos, cells, atom_system, i, j, shifts, out):
    batched = atom_system.shape[0] > 0
    last = pos.shape[0] - 1
    for e in prange(i.shape[0]):
        a = min(max(i[e], 0), last)
        b = min(max(j[e], 0), last)
        s = atom_system[a] if batched else 0
        s0, s1, s2 = shifts[e, 0], shifts[e, 1], shifts[e, 2]
        d0 = (np.float64(pos[b, 0]) - np.float64(pos[a, 0])
              + (s0 * cells[s, 0, 0] + s1 * cells[s, 1, 0] + s2 * cells[s, 2, 0]))
        d1 = (np.float64(pos[b, 1]) - np.float64(pos[a, 1])
              + (s0 * cells[s, 0, 1] + s1 * cells[s, 1, 1] + s2 * cells[s, 2, 1]))
        d2 = (np.float64(pos[b, 2]) - np.float64(pos[a, 2])
              + (s0 * cells[s, 0, 2] + s1 * cells[s, 1, 2] + s2 * cells[s, 2, 2]))
        out[e] = math.sqrt(d0 * d0 + d1 * d1 + d2 * d2)


def pair_distances(positions, cells, atom_system, i, j, shifts):
    """Launcher: |x_j - x_i + S @ cell[system(i)]| [E] in the dtype of positions."""
    pos = positions.detach()
    if pos.dtype not in (torch.float32, torch.float64):  # numba has no half precision
        pos = pos.double()
    out = np.empty(i.shape[0], np.float32 if pos.dtype == torch.float32 else np.float64)
    if out.shape[0] and pos.shape[0]:
        system = (np.empty(0, np.int64) if atom_system is None
                  else atom_system.detach().contiguous().numpy())
        _pair_distances(pos.contiguous().numpy(),
                        cells.detach().to(torch.float64).contiguous().numpy(), system,
                        i.detach().contiguous().numpy(), j.detach().contiguous().numpy(),
                        shifts.detach().contiguous().numpy(), out)
    elif out.shape[0]:
        out[:] = np.nan  # pairs but no atoms: only a list whose values were never checked
    return torch.from_numpy(out).to(positions.dtype)
