"""Which kernel path runs an op: numba (CPU), triton (CUDA) or the torch reference.

Every family's ``op.py`` registers its ops here (``register``) and its custom ops call
``launcher(name, backend)`` with a backend resolved by the caller: modules resolve it once, when
built or on ``set_backend``, and functions once per call, so no op body reads the environment.

Choice, highest priority first: the call's ``backend=`` argument, the ``FASTFF_BACKEND``
environment variable, then the tensors' device (cpu -> numba, cuda -> triton, anything else ->
reference). A backend whose toolchain cannot be imported falls back to the reference with a
warning given once per (op, backend); a backend that cannot run on the tensors' device is an
error, never a silent change of path.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BACKENDS = ("numba", "triton", "reference")
_MODULES = {"numba": "cpu_numba", "triton": "gpu_triton", "reference": "reference"}


@dataclass
class _Op:
    family: str  # folder under fastff.kernels
    launcher: str  # function name shared by the three backend files
    backends: tuple[str, ...] = BACKENDS
    _cache: dict[str, Callable] = field(default_factory=dict)


_OPS: dict[str, _Op] = {}
_warned: set[tuple[str, str]] = set()


def register(name: str, family: str, launcher: str, backends: tuple[str, ...] = BACKENDS) -> None:
    """Declare an op: ``fastff.kernels.<family>.<backend module>.<launcher>`` implements it."""
    _OPS[name] = _Op(family, launcher, backends)


def _default_for(device: torch.device) -> str:
    if device.type == "cpu":
        return "numba"
    if device.type == "cuda":
        return "triton"
    return "reference"


def _device_error(backend: str, device: torch.device) -> str | None:
    if backend == "numba" and device.type != "cpu":
        return f"backend='numba' runs on CPU tensors only, got tensors on {device}"
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return ("backend='triton' needs CUDA tensors; on CPU tensors it runs only under the "
                    "Triton interpreter (set TRITON_INTERPRET=1 before importing fastff)")
        if device.type not in ("cpu", "cuda"):
            return f"backend='triton' runs on CUDA tensors, got tensors on {device}"
    return None


def requested_backend(backend: str | None, device: torch.device) -> str:
    """The backend asked for (argument, environment, or device default), validated."""
    name = backend if backend is not None else os.environ.get("FASTFF_BACKEND") or None
    if name is None or name == "auto":
        return _default_for(device)
    if name not in BACKENDS:
        source = "backend" if backend is not None else "FASTFF_BACKEND"
        raise ValueError(f"{source}={name!r} is not a fastff backend; expected one of "
                         f"{', '.join(BACKENDS)} or 'auto'")
    err = _device_error(name, device)
    if err is not None:
        raise ValueError(err)
    return name


def _load(op: _Op, backend: str) -> Callable:
    fn = op._cache.get(backend)
    if fn is None:
        module = importlib.import_module(f"fastff.kernels.{op.family}.{_MODULES[backend]}")
        fn = getattr(module, op.launcher)
        op._cache[backend] = fn
    return fn


def op_names() -> tuple[str, ...]:
    """The names of every registered op (after ``import_all_ops``: of every family)."""
    return tuple(_OPS)


def op_family(name: str) -> tuple[str, str, tuple[str, ...]]:
    """(family, launcher function name, backends) of op ``name``."""
    op = _OPS[name]
    return op.family, op.launcher, op.backends


def launcher(name: str, backend: str) -> Callable:
    """The launcher of op ``name`` on an already resolved ``backend``; the reference's where the
    op has no kernel on that backend (a backward chain passes its op's backend to ops that may
    lack one, as ``resolve`` maps them)."""
    op = _OPS[name]
    return _load(op, backend if backend in op.backends else "reference")


def resolve(name: str, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """The (backend name, launcher) that runs op ``name`` on ``device``."""
    op = _OPS[name]
    chosen = requested_backend(backend, device)
    if chosen not in op.backends:
        chosen = "reference"
    try:
        return chosen, _load(op, chosen)
    except ImportError as exc:
        if chosen == "reference":
            raise
        if (name, chosen) not in _warned:
            _warned.add((name, chosen))
            warnings.warn(f"fastff: {name} falls back to the torch reference: the {chosen} "
                          f"backend could not be imported ({exc})", RuntimeWarning, stacklevel=3)
        return "reference", _load(op, "reference")


def _availability(backend: str) -> str | None:
    """None when the backend's toolchain imports, else the reason it does not."""
    module = {"numba": "numba", "triton": "triton"}.get(backend)
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{module} not importable: {exc}"
    return None


def backends(device: str | torch.device | None = None, *, file=None) -> dict[str, dict]:
    """Print, and return, the path each op takes on ``device`` (default: cpu, and cuda if present).

    Returns ``{op: {device: (backend, reason)}}``.
    """
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    import_all_ops()
    table: dict[str, dict] = {}
    lines = [f"{'op':28s} {'device':8s} {'path':10s} why"]
    for name in sorted(_OPS):
        op = _OPS[name]
        table[name] = {}
        for dev in devices:
            try:
                chosen = requested_backend(None, dev)
                from_env = os.environ.get("FASTFF_BACKEND") not in (None, "", "auto")
                why = "FASTFF_BACKEND" if from_env else f"default for {dev.type}"
            except ValueError as exc:
                chosen, why = "error", str(exc)
            if chosen in BACKENDS and chosen not in op.backends:
                chosen, why = "reference", f"{name} has no {chosen} kernel"
            missing = _availability(chosen) if chosen in BACKENDS else None
            if missing is not None:
                chosen, why = "reference", f"fallback: {missing}"
            table[name][str(dev)] = (chosen, why)
            lines.append(f"{name:28s} {str(dev):8s} {chosen:10s} {why}")
    print("\n".join(lines), file=file)
    return table


FAMILIES = ("neighbors", "nonbonded", "bonded", "radial", "message", "equivariant")


def import_all_ops() -> None:
    """Import every family's op module so that the registry is complete."""
    for family in FAMILIES:
        importlib.import_module(f"fastff.kernels.{family}.op")


def launch(name: str, spec, inputs):
    """Run op ``name``'s launcher on the backend named in its inputs: the body of every custom
    op. ``spec`` is the op's ``OpArgs``; ``inputs`` its inputs (the body's ``locals()``). The
    launchers take the op's inputs by name, all but ``backend``, which chose the launcher."""
    args = spec(inputs)._asdict()
    return launcher(name, args.pop("backend"))(**args)
