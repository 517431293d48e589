"""mace-torch MACE, unmodified and after fastff.interop.mace.accelerate (a deep copy with the same
weights), on fastff's TIP3P water box (Angstrom, cutoff 5 A, ~50 neighbours per atom), float32,
2 threads unless --threads. Model and steps: fastff/_bench_mace.py (random-weight
ScaleShiftMACE, max_ell 3, correlation 3, 2 residual interactions, 8 Bessel functions; both
sides get their pairs from their own compacting fastff Verlet list; positions move 0.02 A per
coordinate before every step).

Cases:
  64x0e                 energy+forces, hidden 64x0e, 3,000 atoms
  64x0e+64x1o           the same, hidden 64x0e+64x1o
  128x0e+128x1o         the same, hidden 128x0e+128x1o, 1,000 atoms
  training 64x0e        force-matching training step (loss on energy and forces, parameter
                        gradients through the double backward), 64x0e, 3,000 atoms
  64x0e tabulated       (only when named in --cases) energy+forces of accelerate(tabulate=True):
                        frozen weights, radial MLP read from cubic tables, as in MD
Also: extra peak memory of one energy+forces call (64x0e, each side in a fresh process: peak
resident size over the size before the call, /proc/self/clear_refs; the median of
--memory-runs alternating processes per side, as glibc's heap makes one process's peak vary
by ~20%); fastff MM (LJ +
reaction-field water force field, nm) per atom-step on the same box and MACE / MM; mace's
cuequivariance path (``enable_cueq``) where it imports; and with --profile the top torch ops of
the accelerated 64x0e step.

Run:  python bench/bench_mace.py [--quick] [--atoms N] [--steps S] [--json OUT]
      python bench/bench_mace.py --alternate K     original and accelerated in alternating
                                                   fresh processes, K rounds; medians of the
                                                   per-round ratios
Every figure in the JSON comes with the machine, versions, commit, command and load average.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time


def _threads(argv: list[str]) -> str:
    for k, a in enumerate(argv):
        if a == "--threads" and k + 1 < len(argv):
            return argv[k + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "2"


if __name__ == "__main__":  # before torch and numba start their thread pools
    os.environ.setdefault("OMP_NUM_THREADS", _threads(sys.argv[1:]))
    os.environ.setdefault("NUMBA_NUM_THREADS", _threads(sys.argv[1:]))

import torch  # noqa: E402

torch.serialization.add_safe_globals([slice])  # e3nn 0.4's constants.pt (before mace imports)

from fastff import _bench_mace as bm  # noqa: E402
from fastff.profiling import peak_memory  # noqa: E402

CASES = {  # name: (hidden irreps, atoms, atoms with --quick, training)
    "64x0e": ("64x0e", 3000, 300, False),
    "64x0e+64x1o": ("64x0e+64x1o", 3000, 300, False),
    "128x0e+128x1o": ("128x0e+128x1o", 1000, 150, False),
    "training 64x0e": ("64x0e", 3000, 300, True),
    # not a target: accelerate(tabulate=True), frozen weights (MD), radial MLP read from tables
    "64x0e tabulated": ("64x0e", 3000, 300, False),
}
DEFAULT_CASES = ["64x0e", "64x0e+64x1o", "128x0e+128x1o", "training 64x0e"]
IMPLS = ("original", "accelerated")
TARGETS = {"64x0e": ">= 10x", "64x0e tabulated": "none (for information)",
           "64x0e+64x1o": ">= 10x", "128x0e+128x1o": ">= 8x",
           "training 64x0e": ">= 5x", "extra peak memory": "<= 20% of the original's",
           "MACE (accelerated 64x0e) / MM": "<= 100x (goal)"}
HERE = os.path.dirname(os.path.abspath(__file__))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI-scale sizes (300 / 150 atoms) and 2 steps")
    p.add_argument("--atoms", type=int, default=None, help="atoms of every case (overrides)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per process after one warm-up (default 3; --quick 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=DEFAULT_CASES)
    p.add_argument("--alternate", type=int, default=0, metavar="K",
                   help="K rounds of fresh processes, original and accelerated in turn")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--memory-runs", type=int, default=3, metavar="K",
                   help="fresh processes per side for the peak memory, alternating (default 3)")
    p.add_argument("--no-mm", action="store_true", help="skip the fastff MM row")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler top ops of the accelerated 64x0e step")
    p.add_argument("--json", metavar="OUT", help="write the results here")
    p.add_argument("--one", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--one-memory", metavar="IMPL", help=argparse.SUPPRESS)
    return p


def _atoms(args, case: str) -> int:
    _, full, quick, _ = CASES[case]
    return args.atoms or (quick if args.quick else full)


def _steps(args) -> int:
    return args.steps or (2 if args.quick else 3)


def _dtype(args) -> torch.dtype:
    return getattr(torch, args.dtype)


_BUILT: dict = {}


def _model(args, case: str, impl: str):
    """A fresh copy of the case's model (built once per process: e3nn's construction is slow),
    accelerated for ``impl == "accelerated"``."""
    hidden, _, _, _ = CASES[case]
    key = (hidden, args.dtype)
    if key not in _BUILT:
        _BUILT[key] = bm.build(hidden, dtype=_dtype(args))
    original = copy.deepcopy(_BUILT[key])
    if impl == "original":
        return original
    from fastff.interop import mace as fm

    return fm.accelerate(original, tabulate=case.endswith("tabulated"))


def time_case(args, case: str, impl: str) -> dict:
    """One side of one case in this process: a warm-up step (its energy recorded: both sides
    see the same first positions), then ``steps`` timed steps along the walk."""
    n = _atoms(args, case)
    species, pos, cell = bm.water(n, _dtype(args))
    t0 = time.perf_counter()
    model = _model(args, case, impl)
    build_s = time.perf_counter() - t0
    stepper = bm.Stepper(model, species, cell, training=CASES[case][3])
    frames = bm.walk(pos, _steps(args) + 1)
    t0 = time.perf_counter()
    first = stepper.outputs(frames[0]) if not CASES[case][3] else None
    if first is None:
        stepper(frames[0])
    warm_s = time.perf_counter() - t0
    times = []
    for x in frames[1:]:
        t0 = time.perf_counter()
        stepper(x)
        times.append(time.perf_counter() - t0)
    med, mean = statistics.median(times), statistics.mean(times)
    out = {"case": case, "impl": impl, "atoms": len(species), "times_s": times,
           "mean_s": mean, "median_s": med, "us_per_atom_step_median": med / len(species) * 1e6,
           "us_per_atom_step_mean": mean / len(species) * 1e6, "build_s": build_s,
           "warmup_s": warm_s, "pairs": int(len(stepper.verlet.update(frames[-1], cell).i))}
    if first is not None:
        out["energy_first"] = float(first["energy"].detach().sum())
        if first.get("interaction_energy") is not None:  # without the E0 sum that hides it
            out["interaction_energy_first"] = float(first["interaction_energy"].detach().sum())
        out["forces_first_max_abs"] = float(first["forces"].abs().max())
        out["forces_first"] = first["forces"].detach().double()
    return out


def _pairs_of(rows: dict) -> dict:
    """Ratios original / accelerated of one round's rows, and the agreement at the first step."""
    o, f = rows["original"], rows["accelerated"]
    res = {"ratio_median": o["median_s"] / f["median_s"], "ratio_mean": o["mean_s"] / f["mean_s"]}
    if "energy_first" in o:
        res["energy_rel_diff"] = abs(o["energy_first"] - f["energy_first"]) / abs(o["energy_first"])
        if "interaction_energy_first" in o and "interaction_energy_first" in f:
            e = o["interaction_energy_first"]
            res["interaction_energy_rel_diff"] = abs(e - f["interaction_energy_first"]) / abs(e)
        if "forces_first" in o:
            res["forces_max_diff_over_max"] = float(
                (o["forces_first"] - f["forces_first"]).abs().max() / o["forces_first"].abs().max())
    return res


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "forces_first"}


def _sub(args, extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads),
           "--dtype", args.dtype, "--steps", str(_steps(args))]
    cmd += (["--quick"] if args.quick else []) + (["--atoms", str(args.atoms)] if args.atoms
                                                   else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               NUMBA_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd + extra, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if "forces_first" in row:
        row["forces_first"] = torch.tensor(row["forces_first"], dtype=torch.float64)
    return row


def run_cases(args, done=None) -> list[dict]:
    """Every case: in this process (original, then accelerated), or with --alternate K in
    fresh processes, the two sides in turn, K rounds; ratios per round, then their median.
    ``done(results)`` after each case (the JSON is saved as the run goes)."""
    results: list[dict] = []
    for case in args.cases:
        try:
            results.append(_run_case(args, case))
        except RuntimeError as err:  # a failed process (out of memory): recorded, others go on
            results.append({"case": case, "target": TARGETS[case], "error": str(err)[-2000:]})
            print(json.dumps({"case": case, "error": str(err)[-300:]}), flush=True)
        if done is not None:
            done(results)
    return results


def _run_case(args, case: str) -> dict:
    """One case: its rounds, the medians of its sides and of the per-round ratios."""
    rounds = []
    for r in range(max(1, args.alternate)):
        sides = {}
        for impl in IMPLS:
            if args.alternate:
                sides[impl] = _sub(args, ["--one", case, impl])
            else:
                sides[impl] = time_case(args, case, impl)
        rounds.append({"round": r, **_pairs_of(sides),
                       "sides": {k: _strip(v) for k, v in sides.items()}})
        print(json.dumps({"case": case, "round": r, "ratio_median":
                          rounds[-1]["ratio_median"], "median_s": {
                              k: v["median_s"] for k, v in sides.items()},
                          "load": os.getloadavg()}), flush=True)
    row = {"case": case, "target": TARGETS[case], "rounds": rounds,
           "atoms": rounds[0]["sides"]["original"]["atoms"],
           "ratio": statistics.median(x["ratio_median"] for x in rounds),
           "ratio_range": [min(x["ratio_median"] for x in rounds),
                           max(x["ratio_median"] for x in rounds)]}
    for impl in IMPLS:
        med = statistics.median(x["sides"][impl]["median_s"] for x in rounds)
        mean = statistics.median(x["sides"][impl]["mean_s"] for x in rounds)
        row[impl] = {"median_s_per_step": med, "mean_s_per_step": mean,
                     "us_per_atom_step_median": med / row["atoms"] * 1e6,
                     "us_per_atom_step_mean": mean / row["atoms"] * 1e6}
    for key in ("energy_rel_diff", "interaction_energy_rel_diff", "forces_max_diff_over_max"):
        if key in rounds[0]:
            row[key] = rounds[0][key]
    return row


# ------------------------------------------------------------------------------- memory



def memory_one(args, impl: str) -> dict:
    """Extra peak resident memory of one 64x0e energy+forces call, in this (fresh) process,
    after a warm-up call on a small box (JIT compilation and caches loaded)."""
    import ctypes
    import gc

    n = _atoms(args, "64x0e")
    model = _model(args, "64x0e", impl)
    species, pos, cell = bm.water(min(n, 60), _dtype(args))
    bm.Stepper(model, species, cell)(pos)
    species, pos, cell = bm.water(n, _dtype(args))
    stepper = bm.Stepper(model, species, cell)
    stepper.verlet.update(pos, cell)  # the list is not what is measured
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS
    except (OSError, AttributeError):  # not glibc: the measurement may then undercount
        pass
    with peak_memory() as mem:  # resident high-water mark over the size at entry
        stepper(pos)
    return {"impl": impl, "atoms": len(species), "extra_peak_MiB": round(mem.extra / 2**20, 1)}


def measure_memory(args) -> dict:
    samples: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for _ in range(max(1, args.memory_runs)):
        for impl in IMPLS:
            samples[impl].append(_sub(args, ["--one-memory", impl]))
    rows = {impl: {**runs[0], "extra_peak_MiB": statistics.median(r["extra_peak_MiB"]
                                                                     for r in runs),
                   "samples_MiB": [r["extra_peak_MiB"] for r in runs]}
            for impl, runs in samples.items()}
    o, f = rows["original"]["extra_peak_MiB"], rows["accelerated"]["extra_peak_MiB"]
    return {"case": "64x0e energy+forces", "atoms": rows["original"]["atoms"], "rows": rows,
            "accelerated_over_original": f / o if o > 0 else None,
            "target": TARGETS["extra peak memory"]}


# ---------------------------------------------------------------------------------- MM

def measure_mm(args) -> dict:
    """fastff's water force field (LJ + reaction field 0.9 nm, Verlet skin 0.1 nm, bonds and
    angles; nm, kJ/mol), frozen, energy+forces per atom-step along a 0.002 nm walk."""
    from fastff import mm, systems

    n = _atoms(args, "64x0e")
    box = systems.water_box(max(1, n // 3), seed=0)
    if float(box.cell[0, 0]) < 1.8:
        return {"skipped": f"box {float(box.cell[0, 0]):.2f} nm < 2 x MM cutoff 0.9 nm"}
    dtype = _dtype(args)
    ff = mm.water_force_field(box, cutoff=0.9, skin=0.1).to(dtype).requires_grad_(False)
    cell = box.cell.to(dtype)
    frames = bm.walk(box.positions.to(dtype), 2 + 20, step=0.002)

    def step(x):
        x = x.detach().requires_grad_(True)
        torch.autograd.grad(ff(x, cell).sum(), x)

    for x in frames[:2]:
        step(x)
    times = []
    for x in frames[2:]:
        t0 = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"atoms": box.num_atoms, "steps": len(times), "median_s_per_step": med,
            "mean_s_per_step": statistics.mean(times),
            "us_per_atom_step_median": med / box.num_atoms * 1e6}


def mace_over_mm(doc: dict) -> dict | None:
    """MACE 64x0e (accelerated, and unmodified) over fastff MM, per atom-step (medians)."""
    mm = doc.get("mm") or {}
    row = next((c for c in doc.get("cases", []) if c["case"] == "64x0e" and "error" not in c),
               None)
    if row is None or "us_per_atom_step_median" not in mm:
        return None
    per = mm["us_per_atom_step_median"]
    return {"MACE (accelerated 64x0e) / MM": row["accelerated"]["us_per_atom_step_median"] / per,
            "MACE (mace-torch 64x0e) / MM": row["original"]["us_per_atom_step_median"] / per,
            "target": TARGETS["MACE (accelerated 64x0e) / MM"]}


# ------------------------------------------------------------------------- cueq, profile

def try_cueq(args) -> dict:
    status = bm.cueq_status()
    if status != "available":
        return {"status": status}
    try:  # mace's own conversion, timed like the others at the 64x0e case
        n = _atoms(args, "64x0e")
        species, pos, cell = bm.water(n, _dtype(args))
        stepper = bm.Stepper(bm.cueq_model(_model(args, "64x0e", "original")), species, cell)
        frames = bm.walk(pos, _steps(args) + 1)
        stepper(frames[0])
        times = []
        for x in frames[1:]:
            t0 = time.perf_counter()
            stepper(x)
            times.append(time.perf_counter() - t0)
        return {"status": status, "atoms": n, "median_s_per_step": statistics.median(times)}
    except Exception as err:  # a CUDA-only build on a CPU machine: record why
        return {"status": f"conversion or call failed ({type(err).__name__}: {err})"}


def profile_accelerated(args, top: int = 20) -> dict:
    """torch.profiler of two accelerated 64x0e energy+forces steps: ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    n = _atoms(args, "64x0e")
    species, pos, cell = bm.water(n, _dtype(args))
    stepper = bm.Stepper(_model(args, "64x0e", "accelerated"), species, cell)
    frames = bm.walk(pos, 3)
    stepper(frames[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x in frames[1:]:
            stepper(x)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return {"atoms": n, "steps": 2, "total_self_cpu_s": total / 1e6,
            "top_ops": [{"name": e.key, "calls": e.count,
                         "self_cpu_s": e.self_cpu_time_total / 1e6,
                         "self_share": e.self_cpu_time_total / total}
                        for e in events[:top]]}


# --------------------------------------------------------------------------- environment

def environment(argv: list[str]) -> dict:
    import fastff

    versions = {"fastff": fastff.__version__, "torch": torch.__version__,
                "python": platform.python_version()}
    for mod in ("mace", "e3nn", "numba", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # not installed, or a broken install: record it as absent
            versions[mod] = None

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"machine": {"platform": platform.platform(), "processor": cpu,
                        "cpu_count": os.cpu_count()},
            "versions": versions, "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "command": shlex.join(["python", "bench/bench_mace.py", *argv]),
            "threads": {"torch": torch.get_num_threads(),
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                        "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS")},
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.atoms is not None and args.atoms < 3:
        raise SystemExit("--atoms: the water box needs at least 3 atoms")
    if _steps(args) < 1:
        raise SystemExit("--steps: at least 1")
    torch.set_num_threads(args.threads)
    if args.one:
        return time_case(args, *args.one)
    if args.one_memory:
        return memory_one(args, args.one_memory)
    why = bm.mace_import_error()
    if why is not None:
        raise SystemExit(why)
    doc = environment(argv)
    doc["settings"] = {"dtype": args.dtype, "steps": _steps(args), "alternate": args.alternate,
                       "quick": args.quick, "cutoff_A": bm.CUTOFF, "skin_A": bm.SKIN,
                       "num_bessel": bm.NUM_BESSEL, "max_ell": 3, "correlation": 3,
                       "num_interactions": 2}
    doc["load_before"] = os.getloadavg()

    def save(cases=None):
        if cases is not None:
            doc["cases"] = cases
        doc["mace_over_mm"] = mace_over_mm(doc)
        doc["summary"] = summary(doc)
        doc["load_after"] = os.getloadavg()
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(doc, fh, indent=1)

    doc["cases"] = []
    doc["cueq"] = try_cueq(args)
    doc["mm"] = None if args.no_mm else measure_mm(args)
    try:
        doc["memory"] = None if args.no_memory else measure_memory(args)
    except RuntimeError as err:  # a failed process: recorded
        doc["memory"] = {"error": str(err)[-2000:]}
    if args.profile:
        doc["profile"] = profile_accelerated(args)
    save()
    run_cases(args, save)
    return doc


def summary(doc: dict) -> dict:
    """Each target with the measured value and whether it is met."""
    out = {}
    for c in doc["cases"]:
        if "error" in c:
            out[c["case"]] = {"value": None, "target": c["target"], "met": None,
                              "error": c["error"][-200:]}
            continue
        if not c["target"].startswith(">="):
            continue
        bar = float(c["target"].split()[1].rstrip("x"))
        out[f"{c['case']} ({c['atoms']} atoms): original / accelerated"] = {
            "value": c["ratio"], "target": c["target"], "met": c["ratio"] >= bar}
    mem = doc.get("memory")
    if mem and mem.get("accelerated_over_original") is not None:
        out["extra peak memory, accelerated / original"] = {
            "value": mem["accelerated_over_original"], "target": mem["target"],
            "met": mem["accelerated_over_original"] <= 0.2}
    ratio = doc.get("mace_over_mm")
    if ratio:
        v = ratio["MACE (accelerated 64x0e) / MM"]
        out["MACE (accelerated 64x0e) / MM per atom-step"] = {
            "value": v, "target": ratio["target"], "met": v <= 100}
    return out


if __name__ == "__main__":
    result = main()
    if "--one" in sys.argv or "--one-memory" in sys.argv:
        print(json.dumps({k: v for k, v in result.items() if k != "forces_first"}
                         | ({"forces_first": result["forces_first"].tolist()}
                            if "forces_first" in result else {})))
    else:
        print(json.dumps(result["summary"], indent=1))
