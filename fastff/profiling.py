"""Profiling fastff code: ``torch.profiler`` with every fastff op under its own name.

Every fastff kernel is a ``torch.library`` custom op, so it appears in a profile as
``fastff::<op>`` (its backward as ``fastff::<op>_vjp`` or similar), and the models add
``record_function`` ranges (``fastff.SchNet.interaction``, ...). Under a profiler the eager
shortcuts that call a launcher directly are switched off, so nothing is hidden.

Example::

    with fastff.profiling.profile(trace="trace.json") as prof:
        energy, forces = fastff.models.energy_and_forces(model, species, positions, cell)
    print(prof.summary())       # top ops by self time, fastff ops marked, peak memory

The Chrome trace opens in Perfetto (ui.perfetto.dev) or chrome://tracing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["PeakMemory", "Profile", "peak_memory", "profile"]


def _status_kib(name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class PeakMemory:
    """Peak memory of a block above the level at its start (bytes), from :func:`peak_memory`.

    ``extra`` is the CUDA allocator's peak on a GPU, else the peak resident set size (Linux:
    the high-water mark is reset at entry through /proc/self/clear_refs; resolution ~tens of
    KiB). ``None`` where neither can be read (e.g. macOS without CUDA).
    """

    device: str = "cpu"
    extra: int | None = None
    _start: int | None = None


@contextlib.contextmanager
def peak_memory(device: str | torch.device = "cpu") -> Iterator[PeakMemory]:
    """Measure the peak memory a block allocates on ``device`` (``cpu`` or ``cuda[:k]``)."""
    dev = torch.device(device)
    mem = PeakMemory(str(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        mem._start = torch.cuda.memory_allocated(dev)
        yield mem
        torch.cuda.synchronize(dev)
        mem.extra = torch.cuda.max_memory_allocated(dev) - mem._start
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        mem._start = _status_kib("VmRSS")
    except OSError:
        mem._start = None
    yield mem
    peak = _status_kib("VmHWM")
    if mem._start is not None and peak is not None:
        # Linux keeps RSS in per-CPU counters, read approximately (to ~tens of KiB): a block
        # that allocates nothing may read a peak just below its start
        mem.extra = max(peak - mem._start, 0) * 1024


@dataclass
class Profile:
    """What :func:`profile` collected: ``events`` (torch key averages) and ``memory``."""

    profiler: torch.profiler.profile | None = None
    memory: PeakMemory = field(default_factory=PeakMemory)
    trace: str | None = None

    def rows(self) -> list[dict]:
        """One dict per op: name, calls, self and total time (s), fastff or not."""
        if self.profiler is None:
            return []
        out = []
        for ev in self.profiler.key_averages():
            self_us = ev.self_device_time_total if _on_gpu(ev) else ev.self_cpu_time_total
            out.append({"name": ev.key, "calls": ev.count, "self_s": self_us * 1e-6,
                        "total_s": ev.cpu_time_total * 1e-6,
                        "fastff": ev.key.startswith(("fastff::", "fastff."))})
        out.sort(key=lambda r: r["self_s"], reverse=True)
        return out

    def summary(self, top: int = 15) -> str:
        """A table of the ``top`` ops by self time (fastff ops marked ``*``), then peak memory."""
        rows = self.rows()
        total = sum(r["self_s"] for r in rows) or 1.0
        lines = [f"{'op':<52} {'calls':>6} {'self ms':>10} {'%':>6} {'total ms':>10}"]
        for r in rows[:top]:
            mark = "*" if r["fastff"] else " "
            lines.append(f"{mark}{r['name'][:51]:<51} {r['calls']:>6} {r['self_s'] * 1e3:>10.2f} "
                         f"{100 * r['self_s'] / total:>5.1f}% {r['total_s'] * 1e3:>10.2f}")
        fastff_share = sum(r["self_s"] for r in rows if r["fastff"]) / total
        lines.append(f"* fastff ops: {100 * fastff_share:.1f}% of self time "
                     f"(total {total * 1e3:.1f} ms)")
        if self.memory.extra is not None:
            lines.append(f"peak memory above start ({self.memory.device}): "
                         f"{self.memory.extra / 2**20:.1f} MiB")
        if self.trace:
            lines.append(f"Chrome trace: {self.trace} (open in ui.perfetto.dev)")
        return "\n".join(lines)


def _on_gpu(ev) -> bool:
    return getattr(ev, "self_device_time_total", 0) > 0


@contextlib.contextmanager
def profile(*, trace: str | os.PathLike | None = None, record_shapes: bool = False,
            with_stack: bool = False, device: str | torch.device | None = None,
            ) -> Iterator[Profile]:
    """Profile a block with ``torch.profiler``; fastff ops appear under their own names.

    Args:
        trace: write a Chrome trace (JSON) here on exit.
        record_shapes: passed to ``torch.profiler.profile``.
        with_stack: as ``record_shapes``.
        device: where peak memory is measured; default cuda when available, else cpu.

    Yields:
        a :class:`Profile`, filled when the block exits (``summary()``, ``rows()``).
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    dev = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    result = Profile(trace=None if trace is None else os.fspath(trace))
    with torch.profiler.profile(activities=activities, record_shapes=record_shapes,
                                with_stack=with_stack) as prof, peak_memory(dev) as mem:
        yield result
    result.profiler, result.memory = prof, mem
    if result.trace is not None:
        prof.export_chrome_trace(result.trace)
