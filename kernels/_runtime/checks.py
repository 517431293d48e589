"""The switch for value checks (NaN scans, sortedness, index ranges): on by default, off with
``set_checks(False)`` or inside ``no_checks()``, in the calling thread only, and off while
torch.compile or torch.export trace (reading a value would break the graph).

Thread-local so that one thread's hot loop (an MD driver calling ``no_checks``) cannot switch
checks off under another thread's calls. Structural checks (shapes, dtypes) always run.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

#: the float dtypes every kernel computes in (numba and Triton have no half-precision path)
FLOAT_DTYPES = (torch.float32, torch.float64)


def float_dtype(x: torch.Tensor, name: str) -> None:
    """Structural check: ``x`` is float32 or float64 (raises TypeError naming ``name``)."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")


class _Switch(threading.local):
    enabled = True


_switch = _Switch()


def set_checks(enabled: bool) -> None:
    """Enable or disable the value checks in the calling thread."""
    _switch.enabled = bool(enabled)


def checks_enabled() -> bool:
    """True when value checks run: enabled in this thread, and not inside torch.compile or
    torch.export tracing."""
    return _switch.enabled and not torch.compiler.is_compiling()


@contextlib.contextmanager
def no_checks() -> Iterator[None]:
    """Context manager that skips the value checks inside its block (calling thread only)."""
    previous, _switch.enabled = _switch.enabled, False
    try:
        yield
    finally:
        _switch.enabled = previous
