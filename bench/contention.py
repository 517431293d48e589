"""Speed on a shared machine: ``fastff bench`` alone and beside one busy process, alternating.

Each round runs ``fastff bench --model schnet --no-reference`` (MM fastff, OpenMM, SchNet exact
and tabulated on the 3,000-atom water box; means per atom-step over MD frames) twice in fresh
processes: once alone, once while a pure-Python busy loop keeps one core occupied. A component's
slowdown is its busy mean over its quiet mean (median over rounds); fastff's rows are compared
with OpenMM's slowdown in the same rounds (target: at most 1.15x OpenMM's).

    python bench/contention.py --rounds 2 --json bench/results/contention.json

The OpenMP settings each ``fastff bench`` process ran with (``GOMP_SPINCOUNT``,
``OMP_WAIT_POLICY``, inherited from this process) are recorded in the JSON:
``GOMP_SPINCOUNT=10000 python bench/contention.py ...`` measures idle threads that sleep after
~10 us instead of spinning for ~0.3 ms (libgomp's default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROWS = ("MM (fastff)", "MM (OpenMM)", "SchNet (fastff)", "SchNet (fastff, tabulated)")
BUSY = [sys.executable, "-c", "while True: pass"]  # one core, all the time
_SEEN_ENV: list = []


def bench_means(busy: bool, atoms: int) -> dict[str, float]:
    """Mean seconds per atom-step of each row of one ``fastff bench`` run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        loader = subprocess.Popen(BUSY) if busy else None
        try:
            subprocess.run([sys.executable, "-m", "fastff", "bench", "--model", "schnet",
                            "--no-reference", "--atoms", str(atoms), "--json", out],
                           check=True, stdout=subprocess.DEVNULL)
        finally:
            if loader is not None:
                loader.kill()
                loader.wait()
        with open(out) as f:
            doc = json.load(f)
    rows = doc["results"][0]["rows"]
    means = {r["component"]: r["mean_s"] for r in rows
             if r["component"] in ROWS and not r.get("skipped")}
    _SEEN_ENV.append(doc.get("openmp_environment"))  # what the bench process ran with
    return means


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--atoms", type=int, default=3000)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    load_before = list(os.getloadavg())
    rounds = []
    for _ in range(args.rounds):
        quiet = bench_means(False, args.atoms)
        busy = bench_means(True, args.atoms)
        rounds.append({"quiet_s": quiet, "busy_s": busy,
                       "slowdown": {k: busy[k] / quiet[k] for k in quiet if k in busy}})
    slowdown = {k: statistics.median(r["slowdown"][k] for r in rounds)
                for k in rounds[0]["slowdown"]}
    openmm = slowdown.get("MM (OpenMM)")
    relative = {k: v / openmm for k, v in slowdown.items()
                if openmm and k != "MM (OpenMM)"}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    doc = {"command": "python " + " ".join(["bench/contention.py", *sys.argv[1:]]),
           "commit": commit, "cpu_count": os.cpu_count(), "atoms": args.atoms,
           "busy_process": "one pure-Python loop (one core)", "rounds": rounds,
           "openmp_environment": {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT",
                                                                 "OMP_WAIT_POLICY")},
           "bench_openmp_environment": _SEEN_ENV,
           "median_slowdown": slowdown, "slowdown_over_openmm": relative,
           "target": "fastff's slowdown <= 1.15x OpenMM's",
           "load_average": {"before": load_before, "after": list(os.getloadavg())}}
    print(json.dumps({"median_slowdown": slowdown, "slowdown_over_openmm": relative}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return doc


if __name__ == "__main__":
    main()
