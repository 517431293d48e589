"""Argument types and the progress bar shared by the ``fastff`` subcommands."""

from __future__ import annotations

import argparse
import math
import sys
from typing import TextIO

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
