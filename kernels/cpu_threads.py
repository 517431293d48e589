"""numba's threading layer for fastff's CPU kernels: OpenMP first, unless the user chose one.

numba takes TBB whenever the ``tbb`` package is installed (any package may bring it). On the
2-core development machine TBB's work stealing held up better beside a busy process (fastff's
slowdowns 0.73-1.13x OpenMM's against 1.55-2.52x), but on a quiet machine it took 1.31x
(MM), 1.38x (SchNet) and 1.82x (tabulated SchNet) OpenMP's time per atom-step
(bench/results/contention_threading_layer.json; docs/backends.md). ``NUMBA_THREADING_LAYER``
or ``NUMBA_THREADING_LAYER_PRIORITY`` in the environment is left as set. Takes effect if
imported before numba's first parallel launch in the process: every numba kernel module of
fastff imports it first.
"""

from __future__ import annotations

import os

import numba

PRIORITY = ["omp", "tbb", "workqueue"]

if not ({"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ)):
    numba.config.THREADING_LAYER_PRIORITY = list(PRIORITY)
