"""Input validation shared by every op: cheap checks in Python, before any kernel launch.

Structural checks (shapes, dtypes, devices) always run. Checks that read tensor values (NaN
scans, sortedness, index ranges) can be switched off on hot paths, in the calling thread, with
``fastff.set_checks(False)`` or ``with fastff.no_checks(): ...``; kernels stay memory-safe
without them (indices are clamped or bounds-checked), but garbage in then gives garbage out.
They are also skipped while ``torch.compile`` or ``torch.export`` traces
(``torch.compiler.is_compiling()``): reading a value would break the graph, and the compiled
graph runs no Python checks anyway.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# the switch lives in the kernel runtime (thread-local); re-exported for fastff's modules
from fastff.kernels._runtime.checks import checks_enabled, no_checks, set_checks  # noqa: F401


def positions(x: Tensor, name: str = "positions") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3], got {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {x.dtype}")
    # One reduction finds NaN/inf (they propagate through a sum); the exact scan runs only when
    # the sum is not finite, which large finite values can also cause.
    if checks_enabled() and x.numel() and not math.isfinite(float(x.detach().sum())):
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            bad = int((~finite).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"{name} contains NaN or inf (first at atom {bad})")
    return x


def cutoff(value, name: str = "cutoff") -> float:
    try:
        c = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(c) or c <= 0.0:
        raise ValueError(f"{name} must be finite and positive, got {value}")
    return c


def same_device(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; "
                         "move them to one device")


def same_float_dtype(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; "
                        "use one floating point dtype")


def index_tensor(x: Tensor, name: str, length: int | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {x.dtype}")
    if x.dim() != 1 or (length is not None and x.shape[0] != length):
        want = f"[{length}]" if length is not None else "1-D"
        raise ValueError(f"{name} must have shape {want}, got {list(x.shape)}")
    return x


def index_range(x: Tensor, name: str, upper: int, what: str) -> None:
    """Value check: 0 <= x < upper."""
    if checks_enabled() and x.numel():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= upper:
            raise IndexError(f"{name} holds index {lo if lo < 0 else hi}, outside [0, {upper}) "
                             f"({what})")
