"""fastff: fused kernels for machine-learning force fields.

Neighbor lists, MM terms and low-order message passing as PyTorch operators with full autograd,
each with a numba (CPU), a Triton (CUDA) and a pure-torch reference path.
"""

import os as _os
import sys as _sys

# numba's OpenMP layer and torch each load their own libgomp, and by default the idle threads of
# one runtime spin while the other runtime's threads need the cores: energy + forces on the
# 2-core water box measured 2.4x (MM) to 5x (SchNet) slower than with sleeping idle threads.
# libgomp reads OMP_WAIT_POLICY when it is loaded, so this default takes effect only when fastff
# is imported before torch (the `fastff` command does); otherwise set it in the environment.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fastff import mm, models, mp, nn, profiling, systems  # noqa: E402
from fastff._backend import BACKENDS, backends  # noqa: E402
from fastff._checks import no_checks, set_checks  # noqa: E402
from fastff.neighbors import NeighborList, neighbor_list  # noqa: E402
from fastff.verlet import VerletList  # noqa: E402

__version__ = "0.1.0"

# fastff.ase, fastff.compile, fastff.train and fastff.benchmark are imported on demand (they
# bring ASE, torch.export and the command line).
__all__ = ["BACKENDS", "NeighborList", "VerletList", "backends", "mm", "models", "mp",
           "neighbor_list", "nn", "no_checks", "profiling", "set_checks", "systems"]
