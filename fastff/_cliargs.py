"""Argument types and the progress bar shared by the ``fastff`` subcommands."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import TextIO


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


class ProgressBar:
    """A one-line progress bar on a stream (stderr). Redrawn at most every 0.2 s on a terminal;
    elsewhere (a log file, CI) a line at each tenth, so logs stay short."""

    def __init__(self, total: int, label: str = "", *, enabled: bool = True,
                 stream: TextIO | None = None, width: int = 24):
        self.total, self.label, self.enabled, self.width = max(total, 1), label, enabled, width
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.count, self.last, self.tenth = 0, 0.0, -1

    def update(self, text: str = "") -> None:
        self.count += 1
        if not self.enabled:
            return
        now, done = time.monotonic(), self.count >= self.total
        tenth = 10 * self.count // self.total
        if self.tty and not (now - self.last > 0.2 or done):
            return
        if not self.tty and tenth == self.tenth:
            return
        self.last, self.tenth = now, tenth
        filled = self.width * min(self.count, self.total) // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.label} [{bar}] {self.count}/{self.total} {text}".rstrip()
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
