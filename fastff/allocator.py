"""Keep freed memory in the process instead of handing it back to the kernel (glibc malloc).

The CPU paths allocate temporaries of 0.1-10 MB many times per step (blocks of pairs x
features, [E] tensors). With glibc's defaults such blocks are fresh ``mmap`` pages, returned to
the kernel when freed, so the same sizes are mapped, faulted in page by page and zeroed again
at every step: on exact SchNet's energy + forces at 3,000 atoms (2 cores) ~14,000 page faults
per step, 20-25% of its time. :func:`tune_malloc` raises glibc's mmap and trim thresholds so
that freed blocks are reused; no faults in steady state, at the cost of resident memory.

``fastff bench``, ``fastff profile`` and the benchmark suite (bench/conftest.py) call it before
measuring, so every component of one run, peers included, runs with the same settings (the JSON
of ``fastff bench`` records ``malloc_tuned``). fastff never calls it on import: a library
should not change a process's allocator behind its back. In your own scripts call it once at
start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit systems
TRIM_THRESHOLD = 1 << 30

_state = {"tuned": False}


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # mallopt and gnu_get_libc_version exist in glibc only (not in musl's libc)
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return None
    return libc


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
                ) -> bool:
    """Set glibc's mmap and trim thresholds (bytes) for the whole process.

    * ``M_MMAP_THRESHOLD`` = 32 MiB by default (glibc's maximum): smaller blocks come from the
      heap, which reuses them (glibc's default threshold is dynamic, 128 KB to 32 MB);
    * ``M_TRIM_THRESHOLD`` = 1 GiB by default: up to that much free memory stays with the
      process (glibc's default gives back anything above twice the mmap threshold).

    Both must be set: setting the trim threshold alone freezes the mmap threshold at 128 KB,
    which makes every block above it a fresh mapping. Freed blocks are kept for reuse (up to
    ``trim_threshold`` beyond the live peak); blocks of ``mmap_threshold`` and more are still
    mapped and returned. The equivalent of starting Python with
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment.

    Returns True if both were set, False where the C library is not glibc (macOS, Windows,
    musl), where it does nothing. Raises ValueError for thresholds outside glibc's ranges.
    """
    if not 0 < mmap_threshold <= MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold must be in (0, {MMAP_THRESHOLD}] bytes, got "
                         f"{mmap_threshold}")
    if not 0 < trim_threshold < 1 << 31:
        raise ValueError(f"trim_threshold must be in (0, 2^31) bytes, got {trim_threshold}")
    libc = _libc()
    if libc is None:
        return False
    ok = (libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) == 1
          and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)) == 1)
    _state["tuned"] = _state["tuned"] or ok
    return ok


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` has succeeded in this process."""
    return _state["tuned"]
