"""Test-wide settings.

Triton kernels run compiled where a CUDA device exists and under the Triton interpreter on CPU
tensors elsewhere. ``FASTFF_TEST_INTERPRET=1`` asks for the interpreter even with a GPU (``0``
asks for compiled kernels, and fails without one). Triton reads TRITON_INTERPRET when a kernel
is decorated, so the choice is made here, before any fastff module imports Triton; ahead-of-time
compilation is tested in a subprocess without it (tests/test_aot.py).

Compiled, the Triton tests (modules named ``*triton*`` or ``*gpu*``, tests parametrized with
``backend="triton"``, and tests marked ``triton``) run with CUDA as torch's default device, so
the tensors they create live on the GPU; every other test keeps the CPU.
"""

import os

# Idle OpenMP threads sleep instead of spinning: the suite's many small parallel regions (numba
# and torch) otherwise burn the cores that other processes on a small machine need; read by
# libgomp when torch loads it, so set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def _interpret() -> bool:
    asked = os.environ.get("FASTFF_TEST_INTERPRET")
    if asked in ("0", "1"):
        return asked == "1"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return not torch.cuda.is_available()


INTERPRET = _interpret()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# torch_geometric 2.8 replaces torch.index_select with a function TorchScript cannot compile, and
# nequip 0.6 scripts functions that call it when nequip.data is imported: nequip goes first.
# e3nn 0.4 (under nequip and mace) loads constants.pt, tensors and slices, with torch.load.
torch.serialization.add_safe_globals([slice])
try:
    import nequip.data  # noqa: E402, F401
except ImportError:
    pass


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs Triton kernels (on the GPU when compiled)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def _is_triton_test(item) -> bool:
    name = item.module.__name__ if item.module is not None else ""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return ("triton" in name or "gpu" in name or item.get_closest_marker("triton") is not None
            or any(isinstance(v, str) and v == "triton" for v in params.values()))


@pytest.fixture(autouse=True)
def _triton_device(request):
    """Compiled Triton tests create their tensors on the GPU (see the module docstring)."""
    if INTERPRET or not _is_triton_test(request.node):
        yield
        return
    previous = torch.get_default_device()
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(previous)


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture
def rng():
    """Fresh random inputs each run; the seed is printed on failure, and FASTFF_TEST_SEED=<seed>
    replays it."""
    seed = int(os.environ.get("FASTFF_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"random seed: {seed}")
    torch.manual_seed(seed)
    return np.random.default_rng(seed)
