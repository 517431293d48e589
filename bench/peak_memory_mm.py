"""Peak memory of one nonbonded energy+forces call, measured in a fresh process (resident set).

Run: python bench/peak_memory_mm.py [numba|reference|clusters]   (prints one JSON line)
"clusters" measures the cluster-pair path against the bytes of its cluster list.
The baseline is taken after building the system, the neighbor list and a warm-up call on the
same inputs (JIT compiled, allocator warm), so the difference is what one call allocates at its
peak; it is compared with the bytes of the neighbor list (i, j, shifts, ptr).
"""

import json
import os
import resource
import sys

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")


def _reset_peak():
    """Reset the kernel's peak-RSS mark (Linux clear_refs); returns False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main(backend):
    import torch

    torch.set_num_threads(2)
    sys.path.insert(0, os.path.dirname(__file__))
    import bench_mm

    system, pos, box = bench_mm.solvated_protein()
    import fastff.mm as fmm

    model = fmm.ForceField.from_openmm(system, dtype=torch.float32)
    p = torch.tensor(pos, dtype=torch.float32)
    cell = torch.tensor(box, dtype=torch.float32)
    if backend == "clusters":
        nl = bench_mm._cluster_list(model, p, cell)
        arrays = (nl.slot_atom, nl.slot_wrap, nl.cluster_ptr, nl.entry_j, nl.entry_shift,
                  nl.entry_mask)
    else:
        nl = bench_mm._neighbor_list(p, cell, bench_mm.CUTOFF + bench_mm.SKIN)
        arrays = (nl.i, nl.j, nl.shifts, nl.ptr)
    be = None if backend in ("numba", "clusters") else backend
    bench_mm._nonbonded(model, p, nl, cell, be)  # warm-up
    reset = _reset_peak()
    base = _rss()
    bench_mm._nonbonded(model, p, nl, cell, be)
    peak = _peak_rss() - base
    list_bytes = sum(t.numel() * t.element_size() for t in arrays)
    size = nl.num_entries if backend == "clusters" else len(nl)
    return {"backend": backend, "atoms": len(pos), "pairs or entries": size,
            "peak_extra_bytes": peak,
            "neighbor_list_bytes": list_bytes, "ratio": peak / list_bytes,
            "peak_reset": reset}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "numba")))
