"""fastff: fused kernels for machine-learning force fields.

Neighbor lists, MM terms and low-order message passing as PyTorch operators with full autograd,
each with a numba (CPU), a Triton (CUDA) and a pure-torch reference path.
"""

# OMP_WAIT_POLICY is left at libgomp's default: PASSIVE makes every small torch op pay a wake-up.

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
