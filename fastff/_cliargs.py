"""Argument types and the progress bar shared by the ``fastff`` subcommands."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm


def _number(text: str, cast, low: float, strict: bool, wanted: str):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if not (value > low if strict else value >= low) or value == math.inf or value != value:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 0, True, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _number(text, int, 0, False, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, 0.0, True, "a positive number")


def nonnegative_float(text: str) -> float:
    return _number(text, float, 0.0, False, "a number >= 0")


class ProgressBar(tqdm):
    """A tqdm progress bar on stderr whose ``label`` (tqdm's description) can change while it
    runs. On a terminal it redraws at most every 0.2 s; elsewhere (a log file, CI) at most
    every 30 s, so that logs stay short.

    Args:
        total: number of :meth:`update` calls of a full bar.
        label: the text before the bar.
        enabled: False draws nothing (tqdm's ``disable``).
        stream: where to draw (default: ``sys.stderr`` at construction).
    """

    def __init__(self, total: int, label: str = "", *, enabled: bool = True,
                 stream: TextIO | None = None):
        stream = sys.stderr if stream is None else stream
        tty = bool(getattr(stream, "isatty", lambda: False)())
        super().__init__(total=total, desc=label, disable=not enabled, file=stream,
                         mininterval=0.2 if tty else 30.0, dynamic_ncols=tty)

    @property
    def label(self) -> str:
        return getattr(self, "desc", "")

    @label.setter
    def label(self, text: str) -> None:
        self.set_description_str(text, refresh=False)


class CompileNotice:
    """While active, ``bar``'s label names the fastff kernel numba is compiling (each kernel's
    first call on a machine takes seconds; numba then caches it on disk), and
    :attr:`compiled` / :attr:`seconds` count the kernels compiled and the time they took."""

    def __init__(self, bar: ProgressBar):
        self.bar, self.compiled, self.seconds = bar, 0, 0.0
        self._label, self._depth, self._start = "", 0, 0.0
        self._listener: Any = None  # a numba event listener while active

    def started(self, module: str, name: str) -> None:
        if not module.startswith("fastff."):
            return
        self._depth += 1
        if self._depth == 1:
            self._label, self._start = self.bar.label, time.perf_counter()
            kernel = f"{module.removeprefix('fastff.kernels.')}.{name}"
            self.bar.label = f"{self._label}: compiling {kernel} (first run, then cached)"
            self.bar.refresh()

    def ended(self, module: str) -> None:
        if not module.startswith("fastff.") or self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            self.compiled += 1
            self.seconds += time.perf_counter() - self._start
            self.bar.label = self._label

    def __enter__(self) -> CompileNotice:
        from numba.core import event

        notice = self

        class _Listener(event.Listener):
            def on_start(self, ev):
                func = ev.data["dispatcher"].py_func
                notice.started(func.__module__ or "", func.__name__)

            def on_end(self, ev):
                notice.ended(ev.data["dispatcher"].py_func.__module__ or "")

        self._listener = _Listener()
        event.register("numba:compile", self._listener)
        return self

    def __exit__(self, *exc) -> None:
        from numba.core import event

        event.unregister("numba:compile", self._listener)
