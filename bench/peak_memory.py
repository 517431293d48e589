"""Peak memory of one call, measured in a fresh process from the resident set size.

Run: python bench/peak_memory.py neighbors N   (prints one JSON line)
After imports, input creation and a warm-up call on a tiny system (JIT compilation done), the
kernel's high-water mark is reset (Linux: /proc/self/clear_refs), so the peak minus the resident
size just before the call is what the call itself allocates at its peak.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Context manager: ``extra`` is the peak resident memory above the level at entry, bytes."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.extra = (_status_kib("VmHWM") - self.start) * 1024


def neighbors(n):
    from systems import uniform_box

    import fastff

    small_pos, small_cell = uniform_box(100)
    fastff.neighbor_list(small_pos, 5.0, small_cell)  # compile
    pos, cell = uniform_box(n)
    with PeakMemory() as mem:
        nl = fastff.neighbor_list(pos, 5.0, cell)
    returned = sum(t.numel() * t.element_size()
                   for t in (nl.i, nl.j, nl.shifts, nl.ptr, nl.distances(pos)))
    return {"atoms": n, "pairs": len(nl), "peak_extra_bytes": mem.extra,
            "returned_bytes": returned, "ratio": mem.extra / returned}


if __name__ == "__main__":
    what, n = sys.argv[1], int(sys.argv[2])
    print(json.dumps({"neighbors": neighbors}[what](n)))
