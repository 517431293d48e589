"""fastff: fused kernels for machine-learning force fields.

Neighbor lists, MM terms and low-order message passing as PyTorch operators with full autograd,
each with a numba (CPU), a Triton (CUDA) and a pure-torch reference path.
"""

from fastff import mm, mp, nn
from fastff._backend import BACKENDS, backends
from fastff._checks import no_checks, set_checks
from fastff.neighbors import NeighborList, neighbor_list
from fastff.verlet import VerletList

__version__ = "0.1.0"

__all__ = ["BACKENDS", "NeighborList", "VerletList", "backends", "mm", "mp", "neighbor_list",
           "nn", "no_checks", "set_checks"]
