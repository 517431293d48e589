"""Peak memory of one call, measured in a fresh process from the resident set size.

Run: python bench/peak_memory.py neighbors N   (prints one JSON line)
The baseline is taken after imports, input creation and a warm-up call on a tiny system (JIT
compilation done), so the difference is what the call itself allocates at its peak.
"""

import json
import resource
import sys


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def neighbors(n):
    import fastff
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from systems import uniform_box

    small_pos, small_cell = uniform_box(100)
    fastff.neighbor_list(small_pos, 5.0, small_cell)  # compile
    pos, cell = uniform_box(n)
    base = peak_rss_bytes()
    nl = fastff.neighbor_list(pos, 5.0, cell)
    peak = peak_rss_bytes() - base
    returned = sum(t.numel() * t.element_size()
                   for t in (nl.i, nl.j, nl.shifts, nl.ptr, nl.distances(pos)))
    return {"atoms": n, "pairs": len(nl), "peak_extra_bytes": peak, "returned_bytes": returned,
            "ratio": peak / returned}


if __name__ == "__main__":
    what, n = sys.argv[1], int(sys.argv[2])
    print(json.dumps({"neighbors": neighbors}[what](n)))
