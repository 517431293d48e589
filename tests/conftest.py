"""Test-wide settings.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any fastff
module imports Triton: every Triton kernel in this process runs interpreted on CPU tensors.
Ahead-of-time compilation is tested in a subprocess without it (tests/test_aot.py).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Idle OpenMP threads sleep instead of spinning: the suite's many small parallel regions (numba
# and torch) otherwise burn the cores that other processes on a small machine need; read by
# libgomp when torch loads it, so set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def rng():
    """Fresh random inputs each run; the seed is printed on failure, and FASTFF_TEST_SEED=<seed>
    replays it."""
    seed = int(os.environ.get("FASTFF_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"random seed: {seed}")
    torch.manual_seed(seed)
    return np.random.default_rng(seed)
