"""The radial network once per mirror pair (fastff.interop.mace), on and off, in one process.

An accelerated 64x0e MACE (fastff/_bench_mace.py: 3,000-atom water box, max_ell 3,
correlation 3, 2 interactions, float32) steps along a walk; steps alternate between the
mirror-pair path and the per-edge path (``_Graph.mirror_rows`` patched to find no mirrors), so a
busy machine slows both alike. Time is the process CPU time of a step (one thread by default:
CPU time is what the change saves, and it is insensitive to other processes). The extra peak
resident memory of one step is measured for each path in a fresh process.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/mace_mirror_rows.py --steps 12 \\
        --json bench/results/mace_mirror_rows.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import torch  # noqa: E402


def _stepper(atoms: int):
    import copy

    from fastff import _bench_mace as bm
    from fastff.interop import mace as fm

    model = fm.accelerate(copy.deepcopy(bm.build("64x0e")))
    species, pos, cell = bm.water(atoms)
    return bm.Stepper(model, species, cell), pos


def _mirrors(on: bool) -> None:
    from fastff.interop import mace as fm

    if not hasattr(fm._Graph, "_real_mirror_rows"):
        fm._Graph._real_mirror_rows = fm._Graph.mirror_rows
    fm._Graph.mirror_rows = (fm._Graph._real_mirror_rows if on
                             else lambda self, r, y, backend: None)


def timing(atoms: int, steps: int) -> dict:
    from fastff import _bench_mace as bm

    stepper, pos = _stepper(atoms)
    frames = bm.walk(pos, steps + 2)
    for on in (True, False):  # warm-up of both paths
        _mirrors(on)
        stepper(frames[0])
    cpu: dict[str, list[float]] = {"mirror pairs": [], "per edge": []}
    for k, x in enumerate(frames[2:]):
        on = k % 2 == 0
        _mirrors(on)
        t = time.process_time()
        stepper(x)
        cpu["mirror pairs" if on else "per edge"].append(time.process_time() - t)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    return {"cpu_s": cpu, "median_cpu_s": med,
            "per_edge_over_mirror_pairs": med["per edge"] / med["mirror pairs"]}


def memory_one(atoms: int, on: bool) -> dict:
    import ctypes
    import gc

    from fastff.profiling import peak_memory

    _mirrors(on)
    stepper, pos = _stepper(atoms)
    stepper(pos)  # compile and warm caches
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with peak_memory() as mem:
        stepper(pos + 0.01)
    return {"extra_peak_MiB": round(mem.extra / 2**20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, default=3000)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--json")
    p.add_argument("--one-memory", choices=("on", "off"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.one_memory:
        print(json.dumps(memory_one(args.atoms, args.one_memory == "on")))
        return
    load_before = list(os.getloadavg())
    doc = {"command": "python " + " ".join(["bench/mace_mirror_rows.py", *sys.argv[1:]]),
           "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")},
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or None,
           "model": "64x0e, max_ell 3, correlation 3, 2 interactions (fastff/_bench_mace.py)",
           "atoms": args.atoms, "timing": timing(args.atoms, args.steps)}
    memory = {}
    for label, flag in (("mirror pairs", "on"), ("per edge", "off")):
        out = subprocess.run([sys.executable, __file__, "--atoms", str(args.atoms),
                              "--one-memory", flag], capture_output=True, text=True,
                             check=True).stdout
        memory[label] = json.loads(out.strip().splitlines()[-1])
    doc["memory"] = memory
    doc["load_average"] = {"before": load_before, "after": list(os.getloadavg())}
    print(json.dumps({k: doc[k] for k in ("timing", "memory")}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
