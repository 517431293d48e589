"""Benchmark settings: 2 threads for every library, like the machine the targets refer to, and
glibc malloc tuned (fastff.allocator) for every library in the run, as `fastff bench` does."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from fastff.allocator import tune_malloc  # noqa: E402

tune_malloc()
