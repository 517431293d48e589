"""Pair distances in pure torch: the norm of ``pair_vectors``, the oracle of the fused kernel.

Materialises the [E, 3] vectors (that is what the fused numba kernel avoids); autograd-native and
float64-safe. Also the CUDA path: there is no Triton kernel for this op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastff.kernels.neighbors import reference as _neighbors


def pair_distances(positions: Tensor, cells: Tensor, atom_system: Tensor | None, i: Tensor,
                   j: Tensor, shifts: Tensor) -> Tensor:
    """Launcher: |x_j - x_i + S @ cell[system(i)]| [E] in the dtype of positions."""
    vectors = _neighbors.pair_vectors(positions, cells.to(positions.dtype), atom_system, i, j,
                                      shifts)
    return torch.linalg.vector_norm(vectors, dim=1)
