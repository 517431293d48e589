"""Benchmark settings: 2 threads for every library, like the machine the targets refer to.
glibc malloc keeps its defaults (no fastff.tune_malloc): published numbers are what a user who
imports the libraries gets."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
