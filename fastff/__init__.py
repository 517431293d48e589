"""fastff: fused kernels for machine-learning force fields.

Neighbor lists, MM terms and low-order message passing as PyTorch operators with full autograd,
each with a numba (CPU), a Triton (CUDA) and a pure-torch reference path.
"""

# OpenMP: numba's OpenMP layer and torch each load their own libgomp. fastff leaves both at
# libgomp's default (idle threads spin briefly, then sleep): with OMP_WAIT_POLICY=PASSIVE every
# small torch op of a blocked kernel (cfconv, PaiNN) pays a thread wake-up, which took exact
# SchNet on the 3,000-atom water box from 116-155 to 288-366 us/atom-step (2 cores, README).

from fastff import mm, models, mp, nn, profiling, systems
from fastff._checks import no_checks, set_checks
from fastff.allocator import tune_malloc
from fastff.kernels._runtime.registry import BACKENDS, backends
from fastff.neighbors import NeighborList, neighbor_list
from fastff.verlet import VerletList

__version__ = "0.1.0"

# fastff.ase, fastff.compile, fastff.train, fastff.benchmark and fastff.interop are imported on
# demand (they bring ASE, torch.export, the command line and other packages' adapters).
__all__ = ["BACKENDS", "NeighborList", "VerletList", "backends", "mm", "models", "mp",
           "neighbor_list", "nn", "no_checks", "profiling", "set_checks", "systems",
           "tune_malloc"]
