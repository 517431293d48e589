"""How numba's prange shares work between threads, alone and beside one busy process.

numba's OpenMP layer splits a prange range into one contiguous block per thread, whatever the
number of iterations (``numba.set_parallel_chunksize`` does not change it there), so cutting
the work into many small tasks does not by itself let a fast thread take over a slow one's
share. This script measures whether a dynamic schedule would pay: the same loop (64 float64
square roots per task, 2,000 tasks: ~0.2 ms per region on 2 cores, the size of an MD step's
regions) run

* ``static``: ``for task in prange(n)``, numba's split;
* ``chunksize 1``: the same under ``numba.set_parallel_chunksize(1)``;
* ``dynamic``: ``for thread in prange(threads)``, each thread taking the next task from an
  atomic counter until none is left;

and an imbalanced loop (the first half of the tasks 10x the work of the second), in alternating
order, quiet and while a pure-Python busy loop keeps one core occupied.

    python bench/prange_schedule.py --json bench/results/prange_schedule.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

TASKS, WIDTH, REGIONS = 2000, 64, 2000
BUSY = [sys.executable, "-c", "while True: pass"]


@intrinsic
def _fetch_add(typingctx, counter, value):
    """counter[0] += value atomically; returns the old value."""

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary,
                                       [context.get_constant(types.intp, 0)])
        return builder.atomic_rmw("add", ptr, args[1], "monotonic")

    return types.int64(counter, types.int64), codegen


@njit
def _task(t, x, heavy, out):
    reps = 10 if heavy and t < x.shape[0] // (2 * WIDTH) else 1
    s = 0.0
    for _ in range(reps):
        for i in range(t * WIDTH, (t + 1) * WIDTH):
            s += np.sqrt(x[i] + 1.0)
    out[t] = s


@njit(parallel=True)
def static(x, heavy, out):
    for t in prange(out.shape[0]):
        _task(t, x, heavy, out)


@njit(parallel=True)
def dynamic(x, heavy, out, counter, threads):
    counter[0] = 0
    for _ in prange(threads):
        while True:
            t = _fetch_add(counter, 1)
            if t >= out.shape[0]:
                break
            _task(t, x, heavy, out)


def _with_chunksize(size: int, kernel, *args) -> None:
    """``kernel(*args)`` with numba's parallel chunk size set to ``size`` for the call."""
    previous = numba.set_parallel_chunksize(size)
    try:
        kernel(*args)
    finally:
        numba.set_parallel_chunksize(previous)


def _us_per_region(run) -> float:
    start = time.perf_counter()
    for _ in range(REGIONS):
        run()
    return (time.perf_counter() - start) / REGIONS * 1e6


def measure(rounds: int) -> dict:
    x = np.random.default_rng(0).random(TASKS * WIDTH)
    out, out_dyn, counter = np.zeros(TASKS), np.zeros(TASKS), np.zeros(1, np.int64)
    threads = numba.get_num_threads()
    results: dict = {}
    for heavy in (False, True):
        static(x, heavy, out)
        dynamic(x, heavy, out_dyn, counter, threads)
        assert np.array_equal(out, out_dyn)  # same tasks, same results
        runs = {"static": lambda h=heavy: static(x, h, out),
                "chunksize 1": lambda h=heavy: _with_chunksize(1, static, x, h, out),
                "dynamic": lambda h=heavy: dynamic(x, h, out_dyn, counter, threads)}
        case = "imbalanced" if heavy else "balanced"
        results[case] = {}
        for busy in (False, True):
            times: dict = {name: [] for name in runs}
            loader = subprocess.Popen(BUSY) if busy else None
            try:
                for k in range(rounds):
                    for name in (list(runs) if k % 2 == 0 else list(runs)[::-1]):
                        times[name].append(_us_per_region(runs[name]))
            finally:
                if loader is not None:
                    loader.kill()
                    loader.wait()
            results[case]["busy" if busy else "quiet"] = {
                name: {"us_per_region": t, "median": statistics.median(t)}
                for name, t in times.items()}
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    doc = {"command": "python bench/prange_schedule.py " + " ".join(argv or sys.argv[1:]),
           "commit": commit,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "versions": {"python": platform.python_version(), "numba": numba.__version__,
                        "numpy": np.__version__},
           "threading_layer": None, "threads": numba.get_num_threads(),
           "openmp_environment": {k: os.environ.get(k) for k in
                                  ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
           "load_before": list(os.getloadavg()),
           "settings": {"tasks": TASKS, "sqrt_per_task": WIDTH, "regions_per_sample": REGIONS,
                        "rounds": args.rounds}}
    doc["samples"] = measure(args.rounds)
    doc["threading_layer"] = numba.threading_layer()
    doc["load_after"] = list(os.getloadavg())
    doc["rows"] = [{"loop": case, "machine": side,
                    "static us per region": round(rows["static"]["median"]),
                    "chunksize 1 us per region": round(rows["chunksize 1"]["median"]),
                    "dynamic us per region": round(rows["dynamic"]["median"]),
                    "dynamic / static": round(rows["dynamic"]["median"]
                                              / rows["static"]["median"], 2)}
                   for case, sides in doc["samples"].items() for side, rows in sides.items()]
    for row in doc["rows"]:
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return doc


if __name__ == "__main__":
    main()
