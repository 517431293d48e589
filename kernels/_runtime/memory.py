"""Free-memory estimates, so that an op refuses an allocation it cannot make before any pass
runs (a MemoryError with the estimate, never an out-of-memory kill halfway through)."""

from __future__ import annotations

import os

import torch


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (available physical memory for the CPU), or None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def fits_in_memory(num_bytes: int, what: str, device: torch.device) -> None:
    """Raise MemoryError, with the estimate, before allocating more than the device has free."""
    free = free_memory(device)
    if free is not None and num_bytes > free:
        raise MemoryError(f"{what} would need {num_bytes / 2**30:.2f} GiB but only "
                          f"{free / 2**30:.2f} GiB is free on {device}")
