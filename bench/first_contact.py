"""First contact with fastff: what ``import fastff`` adds to ``import torch``, and the first call.

* Import: ``python -X importtime -c "import torch"`` and ``... "import fastff"`` in fresh
  processes, alternating, ``--rounds`` of each; the cumulative time of the top-level ``torch``
  and ``fastff`` entries (fastff's includes torch's), their medians and the difference; and,
  less noisy, ``import fastff`` timed alone in a process that imported torch first. Also
  which toolchains ``import fastff`` loaded (numba and Triton load when first used; torch itself
  imports Triton, through torch._dynamo, at the first dispatch of any custom op).
* First call: in a fresh process with ``NUMBA_CACHE_DIR`` an empty temporary folder,
  ``import fastff``, ``fastff.systems.water_box(1000)`` (3,000 atoms), a default SchNet and its
  first energy + forces (numba compiles here), then a second call; ``--cold-runs`` times, each
  on its own empty cache; then the same in another fresh process on a filled cache.

    python bench/first_contact.py [--rounds 5] [--cold-runs 3] [--out ...first_contact.json]

The load average is recorded before and after each part; on a shared machine the numbers are
indicative (compare the alternating medians, not single runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FIRST_CALL = r"""
import json, sys, time
t0 = time.perf_counter()
import fastff
t1 = time.perf_counter()
from fastff import models, systems
box = systems.water_box(1000)
t2 = time.perf_counter()
model = models.SchNet()
energy, forces = models.energy_and_forces(model, box.species, box.positions, box.cell)[:2]
t3 = time.perf_counter()
energy, forces = models.energy_and_forces(model, box.species, box.positions + 1e-4, box.cell)[:2]
t4 = time.perf_counter()
print(json.dumps({"import_fastff_s": t1 - t0, "water_box_1000_s": t2 - t1,
                  "first_energy_forces_s": t3 - t2, "second_energy_forces_s": t4 - t3,
                  "total_to_first_forces_s": t3 - t0, "atoms": int(box.num_atoms),
                  "toolchains_loaded": [m for m in ("numba", "triton") if m in sys.modules]}))
"""


def _importtime(module: str) -> tuple[float, float]:
    """(cumulative import time of ``module`` from -X importtime, wall time of the process) in s."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    for line in out.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2].rstrip() == f" {module}":  # top level: one space
            return int(parts[1]) / 1e6, wall
    raise RuntimeError(f"no top-level entry for {module} in -X importtime output")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "numba", "triton", "numpy", "fastff"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return head + ("+dirty" if dirty else "")


def measure_imports(rounds: int) -> dict:
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"torch": [], "fastff": []}
    walls: dict[str, list[float]] = {"torch": [], "fastff": []}
    for k in range(rounds):
        for module in (("torch", "fastff") if k % 2 == 0 else ("fastff", "torch")):
            cumulative, wall = _importtime(module)
            times[module].append(cumulative)
            walls[module].append(wall)
    after_torch = []  # in one process: torch first, then the time of import fastff alone
    for _ in range(rounds):
        out = subprocess.run(
            [sys.executable, "-c", "import time, torch; t = time.perf_counter(); import fastff; "
             "print(time.perf_counter() - t)"],
            capture_output=True, text=True, check=True, cwd=ROOT)
        after_torch.append(float(out.stdout.strip().splitlines()[-1]))
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, fastff; print(','.join(m for m in ('numba', "
         "'triton', 'sympy') if m in sys.modules))"],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    medians = {m: statistics.median(v) for m, v in times.items()}
    return {
        "command": f"python -X importtime -c 'import torch' / 'import fastff', {rounds} rounds "
                   "each, alternating, fresh processes",
        "importtime_cumulative_s": times, "process_wall_s": walls,
        "median_importtime_s": medians,
        "median_process_wall_s": {m: statistics.median(v) for m, v in walls.items()},
        "fastff_adds_s": medians["fastff"] - medians["torch"],
        "import_fastff_after_torch_s": after_torch,
        "median_import_fastff_after_torch_s": statistics.median(after_torch),
        "loaded_by_import_fastff": [m for m in loaded.split(",") if m],
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }


def _first_call(cache: str) -> dict:
    """One fresh process running FIRST_CALL with NUMBA_CACHE_DIR=cache."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    load_before = os.getloadavg()
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", FIRST_CALL], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - start
    result["load_average_before"] = load_before
    result["load_average_after"] = os.getloadavg()
    return result


def measure_first_call(cold_runs: int) -> dict:
    """``cold_runs`` processes, each on its own empty cache (this machine's compile times vary
    by up to 1.5x between runs), then one on a filled cache. ``empty_numba_cache`` is the run
    with the median total."""
    cold, warm = [], {}
    for k in range(cold_runs):
        with tempfile.TemporaryDirectory(prefix="fastff-numba-cache-") as cache:
            cold.append(_first_call(cache))
            if k == cold_runs - 1:
                warm = _first_call(cache)
    totals = [run["total_to_first_forces_s"] for run in cold]
    median = sorted(cold, key=lambda run: run["total_to_first_forces_s"])[(cold_runs - 1) // 2]
    return {"command": "NUMBA_CACHE_DIR=<empty temporary folder> python -c '<import fastff; "
                       "fastff.systems.water_box(1000); models.SchNet(); energy_and_forces "
                       f"twice>', {cold_runs} times on empty caches, then once on the filled "
                       "cache (bench/first_contact.py)",
            "empty_numba_cache_runs": cold,
            "empty_numba_cache_totals_s": totals,
            "empty_numba_cache": median,
            "filled_numba_cache": warm}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "first_contact.json"))
    parser.add_argument("--cold-runs", type=int, default=3,
                        help="first calls from an empty numba cache (the median is reported)")
    parser.add_argument("--skip-first-call", action="store_true")
    args = parser.parse_args(argv)
    if args.cold_runs < 1:
        parser.error(f"--cold-runs must be >= 1, got {args.cold_runs}")
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpus": os.cpu_count()},
        "versions": _versions(), "commit": _commit(),
        "command": "python bench/first_contact.py " + " ".join(argv or sys.argv[1:]),
        "imports": measure_imports(args.rounds),
    }
    if not args.skip_first_call:
        report["first_call"] = measure_first_call(args.cold_runs)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
