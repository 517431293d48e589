"""Input validation shared by every op: cheap checks in Python, before any kernel launch, and
the identity of a tensor's state that caches of checks and derived values are keyed by.

Structural checks (shapes, dtypes, devices) always run. Checks that read tensor values (NaN
scans, sortedness, index ranges) can be switched off on hot paths, in the calling thread only,
with ``fastff.set_checks(False)`` or ``with fastff.no_checks(): ...``; kernels stay memory-safe
without them (indices are clamped or bounds-checked), but garbage in then gives garbage out.
They are also skipped while ``torch.compile`` or ``torch.export`` traces
(``torch.compiler.is_compiling()``): reading a value would break the graph, and the compiled
graph runs no Python checks anyway. Models and force fields check their inputs once, at their
``forward``, and run their inner layers with the value checks off.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from fastff.kernels._runtime import registry

# the switch lives in the kernel runtime (thread-local); re-exported for fastff's modules
from fastff.kernels._runtime.checks import (  # noqa: F401
    FLOAT_DTYPES,
    checks_enabled,
    float_dtype,
    no_checks,
    set_checks,
)
from fastff.testing import mark_host_buffer


def positions(x: Tensor, name: str = "positions") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3], got {list(x.shape)}")
    float_dtype(x, name)
    # One reduction finds NaN/inf (they propagate through a sum); the exact scan runs only when
    # the sum is not finite, which large finite values can also cause.
    if checks_enabled() and x.numel() and not math.isfinite(float(x.detach().sum())):
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            bad = int((~finite).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"{name} contains NaN or inf (first at atom {bad})")
    return x


def distances(x: Tensor, name: str = "distances") -> Tensor:
    """Pair distances [E]: float32/float64; with value checks on, none negative or NaN (one
    reduction: the minimum is NaN when any entry is)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape [E], got {list(x.shape)}")
    float_dtype(x, name)
    if checks_enabled() and x.numel():
        low = float(x.detach().min())
        if not low >= 0.0:
            bad = torch.isnan(x) | (x < 0)
            k = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} must be >= 0 and not NaN, got {float(x[k])} at pair {k}")
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


def backend_request(backend, name: str = "backend") -> str:
    """``backend`` as a module keeps it: a backend name, or "auto" (by device). None reads
    ``FASTFF_BACKEND`` now, once: modules resolve their backend when built or on
    ``set_backend``, never per call."""
    source = name
    if backend is None:
        backend, source = os.environ.get("FASTFF_BACKEND") or "auto", "FASTFF_BACKEND"
    if backend != "auto" and backend not in registry.BACKENDS:
        raise ValueError(f"{source} must be one of {registry.BACKENDS}, 'auto' or None, got "
                         f"{backend!r}")
    return backend


def backend_on(request: str, device: torch.device) -> str:
    """The backend a module with ``request`` ("auto" or a name) runs on ``device``."""
    return registry.requested_backend("auto", device) if request == "auto" else request


# ------------------------------------------------------------------- identity of tensor states

def stampable(t) -> bool:
    """Whether ``t`` can be told apart by a :class:`Stamp`: a plain eager tensor (not fake, not
    traced)."""
    return not torch.compiler.is_compiling() and type(t) in (Tensor, torch.nn.Parameter)


def cacheable(t) -> bool:
    """Whether a value computed from ``t`` may be kept: ``t`` is stampable and tracks its
    version (not an inference tensor)."""
    return stampable(t) and not t.is_inference()


class Stamp:
    """The state of one tensor, as a cache key: the tensor object (a weak reference), its version
    counter and, with ``values=True``, a copy of its values.

    Never ``id()`` or ``data_ptr()``: a freed tensor's id and address are reused by new tensors
    (at version 0). The version counter sees in-place ops, ``load_state_dict`` and the for-loop
    and foreach optimizer steps; it misses edits through ``.data`` and fused optimizer steps
    (``fused=True``). A cache whose value must follow such edits keeps the values too (an exact
    comparison; :class:`TensorCache` does so for CPU tensors only, where it is no host sync).
    Inference tensors track no version: their values are always kept.
    """

    __slots__ = ("_ref", "_values", "_version")
    _ref: Callable[[], Tensor | None]

    def __init__(self, t: Tensor, *, values: bool = False):
        self._ref = weakref.ref(t)
        self._version = _version(t)
        self._values = t.detach().clone() if values or self._version is None else None
        if self._values is not None and self._values.device.type == "cpu":
            mark_host_buffer(self._values)  # host memory: comparing with it is no device sync

    def matches(self, t: Tensor) -> bool:
        if self._ref() is not t or self._version != _version(t):
            return False
        kept = self._values
        if kept is None:
            return True
        now = t.detach()
        return (now.shape == kept.shape and now.dtype == kept.dtype
                and now.device == kept.device and bool(torch.equal(now, kept)))

    def __getstate__(self):
        return "unbound"  # a copied or unpickled stamp names no tensor: it never matches

    def __setstate__(self, state) -> None:
        self._ref, self._version, self._values = _no_tensor, None, None


def _no_tensor() -> None:
    return None


def _version(t: Tensor) -> int | None:
    return None if t.is_inference() else t._version


class TensorCache:
    """Values computed from tensors, each kept while its tensors keep their state (:class:`Stamp`).

    ``get(what, tensors, compute)`` returns ``compute()``, or the value kept for the same
    ``what`` and the same tensors in the same state. At most ``size`` values are kept per
    ``what`` (most recent first); an entry whose tensor was freed never matches again. Safe to
    share between threads (``compute`` runs outside the lock).
    """

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: dict[Hashable, list[tuple[tuple[Stamp, ...], object]]] = {}
        self._lock = threading.Lock()

    def get(self, what: Hashable, tensors: Sequence[Tensor], compute: Callable, *,
            values: bool = False):
        """``values=True``: the value must follow every edit of the tensors' data (.data,
        fused optimizers); it is then kept for CPU tensors only and recomputed elsewhere."""
        if not all(cacheable(t) for t in tensors) or (
                values and any(t.device.type != "cpu" for t in tensors)):
            return compute()
        try:
            hash(what)
        except TypeError:  # symbolic sizes in ``what`` (torch.export): not kept
            return compute()
        with self._lock:
            entries = self._entries.setdefault(what, [])
            for k, (stamps, value) in enumerate(entries):
                if len(stamps) == len(tensors) and all(
                        s.matches(t) for s, t in zip(stamps, tensors, strict=True)):
                    if k:
                        entries.insert(0, entries.pop(k))
                    return value
        if torch.is_inference_mode_enabled():
            # a kept tensor may serve calls outside inference mode, which inference tensors
            # cannot enter: compute it as a normal tensor (the inputs are normal tensors)
            with torch.inference_mode(False):
                value = compute()
        else:
            value = compute()
        entry = (tuple(Stamp(t, values=values) for t in tensors), value)
        with self._lock:
            entries = self._entries.setdefault(what, [])
            entries.insert(0, entry)
            entries[:] = [e for e in entries
                          if all(s._ref() is not None for s in e[0])][:self.size]
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def forget(self, tensors: Sequence[Tensor]) -> None:
        """Drop every value computed from one of ``tensors``."""
        with self._lock:
            for what, entries in self._entries.items():
                self._entries[what] = [e for e in entries if not any(
                    s._ref() is t for s in e[0] for t in tensors)]

    def __getstate__(self):
        return {"size": self.size}  # pickled or copied empty

    def __setstate__(self, state) -> None:
        TensorCache.__init__(self, state["size"])
