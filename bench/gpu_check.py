"""The GPU check: one command that, on one CUDA machine, runs the Triton tests compiled and times
the GPU path against its peers, with the roofline beside every number.

    bench/gpu_check.sh                   # on a CUDA machine: under 8 minutes in all
    bench/gpu_check.sh --rehearse        # anywhere: the same steps on CPU tensors under the
                                         # Triton interpreter, small sizes (timings meaningless)

Phases, each in its own process with its own time limit (a phase that fails or runs out of
time is recorded as such and the others still run):

1. ``environment``: torch (and whether it is a CUDA build), Triton, the GPU, the peers found.
2. ``tests``: the Triton tests, compiled (tests/conftest.py compiles where CUDA exists): the
   test files of the GPU path and every test parametrized with the Triton backend.
3. ``neighbors``: fastff's neighbor list (exact; capacity-mode rebuild; a Verlet step that keeps
   the list) against vesin-torch on the GPU.
4. ``mm``: LJ + reaction field + bonds + angles of a TIP3P water box, energy and forces:
   fastff's tiles and pair list, eager and in a CUDA graph, against OpenMM's CUDA platform.
5. ``cfconv``: a SchNet interaction with fastff's CFConv against torch_geometric's, energy and
   forces.
6. ``bench``: the headline of ``fastff bench --device cuda``.

Writes ``gpu_check.json`` (every figure, with its roofline time from bench/roofline.py) and
``gpu_check.md`` (a short table) to ``--out``. Peers that are not installed are skipped with
the reason; nothing is downloaded unless ``--install`` is given (then pip, from the package
registries only).
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
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # roofline.py

# Per phase: (seconds allowed on a GPU, seconds allowed in a rehearsal). 30 + 210 + 45 + 90 +
# 40 + 60 = 475 s at most on the GPU: under 8 minutes with start-up.
LIMITS = {"environment": (30, 60), "tests": (210, 900), "neighbors": (45, 300),
          "mm": (90, 600), "cfconv": (40, 300), "bench": (60, 600)}
# Test files of the GPU path, and the files whose tests with backend "triton" run as well.
GPU_TESTS = ["tests/kernels/test_neighbors_triton.py", "tests/kernels/test_equivariant_triton.py",
             "tests/test_gpu_capacity.py",
             "tests/test_gpu_mm.py", "tests/test_gpu_graph.py", "tests/test_sync_counter.py"]
TRITON_TESTS = ["tests/kernels/test_nonbonded.py", "tests/kernels/test_bonded.py",
                "tests/kernels/test_radial.py", "tests/kernels/test_message.py",
                "tests/kernels/test_message_positions.py"]
REHEARSAL_TESTS = ["tests/test_sync_counter.py", "tests/test_gpu_capacity.py::test_ops_register"]


def _sizes(rehearse: bool) -> dict:
    if rehearse:
        return {"nl_atoms": 300, "mm_molecules": 60, "cf_atoms": 60, "bench_atoms": 30,
                "repeat": 2}
    return {"nl_atoms": 100_000, "mm_molecules": 33_334, "cf_atoms": 10_000,
            "bench_atoms": 3000, "repeat": 20}


# ------------------------------------------------------------------------------ timing
class Timer:
    """Median wall time of a function on the device (CUDA events) or the host (rehearsal)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def __call__(self, fn, repeat: int, warmup: int = 2) -> dict:
        torch = self.torch
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e-3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return {"median_s": statistics.median(times), "min_s": min(times), "samples": len(times)}


def _row(name: str, timing: dict | None, roofline=None, gpu: str | None = None, **extra) -> dict:
    row = {"name": name, **(timing or {}), **extra}
    if roofline is not None:
        row["roofline_kernel"] = roofline.kernel
        row["roofline_workload"] = roofline.workload
        row["bytes"], row["flops"] = roofline.bytes, roofline.flops
        for g in ("H100", "H200"):
            row[f"roofline_{g}_s"] = roofline.seconds(g)
        if timing and gpu in ("H100", "H200"):
            row["x_roofline"] = timing["median_s"] / roofline.seconds(gpu)
    return row


def _gpu_kind() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return "H200" if "H200" in name else ("H100" if "H100" in name else None)


# ------------------------------------------------------------------------------ phases
def phase_environment(args) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_kind"] = _gpu_kind()
        info["capability"] = list(torch.cuda.get_device_capability())
    for name in ("triton", "numba", "vesin", "vesin.torch", "torch_geometric", "openmm",
                 "pytest", "xdist"):
        try:
            module = __import__(name, fromlist=["_"])
            info[name] = getattr(module, "__version__", "installed")
        except Exception as exc:  # an import error of any kind means: not usable here
            info[name] = f"missing ({type(exc).__name__})"
    try:
        import openmm

        info["openmm_platforms"] = [openmm.Platform.getPlatform(i).getName()
                                    for i in range(openmm.Platform.getNumPlatforms())]
    except Exception:
        info["openmm_platforms"] = []
    import fastff

    info["fastff"] = fastff.__version__
    return info


def phase_tests(args) -> dict:
    """pytest on the Triton tests (compiled on a GPU); the result counts from a JUnit file."""
    xml = os.path.join(args.out, "tests.xml")
    if args.rehearse:
        selection = list(REHEARSAL_TESTS)
        extra: list[str] = []
    else:
        selection = GPU_TESTS + TRITON_TESTS
        extra = ["-k", "triton or gpu or sync or capacity"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", xml,
           *selection, *extra]
    try:
        import xdist  # noqa: F401  (pytest-xdist: compile kernels in parallel processes)

        workers = "2" if args.rehearse else str(min(8, os.cpu_count() or 1))
        cmd += ["-n", workers]
    except ImportError:
        pass
    limit = LIMITS["tests"][1 if args.rehearse else 0] - 15
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        status, tail = done.returncode, done.stdout[-3000:] + done.stderr[-2000:]
    except subprocess.TimeoutExpired as exc:
        status, tail = "timeout", str(exc.stdout or "")[-3000:]
    result = {"command": " ".join(cmd[1:]), "exit_status": status,
              "seconds": time.perf_counter() - t0, "output_tail": tail}
    if os.path.exists(xml):
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            result[key] = int(suite.get(key, 0))
        result["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                            if c.find("failure") is not None or c.find("error") is not None]
    return result


def phase_neighbors(args) -> dict:
    import roofline
    import torch

    import fastff
    from fastff.kernels._runtime import status as status_bits

    dev, sizes, gpu = args.device, _sizes(args.rehearse), _gpu_kind()
    timer = Timer(dev)
    n, density, cutoff = sizes["nl_atoms"], 0.1, 5.0  # atoms / A^3 and A: ~52 neighbours
    box = (n / density) ** (1 / 3)
    g = torch.Generator().manual_seed(0)
    pos = (torch.rand(n, 3, generator=g, dtype=torch.float64) * box).float().to(dev)
    cell = (torch.eye(3) * box).to(dev)
    rows = []
    nl = fastff.neighbor_list(pos, cutoff, cell, backend="triton")
    neighbors = len(nl) / n
    est = roofline.neighbor_list(n, neighbors)
    rows.append(_row("neighbor_list (triton, exact)", timer(
        lambda: fastff.neighbor_list(pos, cutoff, cell, backend="triton"), sizes["repeat"]),
        est, gpu, pairs=len(nl)))
    buffers = fastff.neighbors.CapacityBuffers(n, int(1.2 * len(nl)), pos, cell[None])
    system_ptr = torch.tensor([0, n], device=dev)
    pbc = torch.ones(1, 3, dtype=torch.bool, device=dev)

    def rebuild():
        buffers.status[0] = status_bits.REBUILD
        buffers.build(pos, cutoff, cell[None], pbc, system_ptr, False, "triton")

    rows.append(_row("neighbor_list_into (triton, capacity rebuild, no sync)",
                     timer(rebuild, sizes["repeat"]), est, gpu))
    vl = fastff.VerletList(cutoff - 0.5, 0.5, backend="triton", capacity="auto")
    vl.update(pos, cell)
    vl.update(pos, cell)
    rows.append(_row("VerletList step keeping the list (triton)",
                     timer(lambda: vl.update(pos, cell), sizes["repeat"]), None, gpu))
    try:
        import vesin.torch

        calc = vesin.torch.NeighborList(cutoff=cutoff, full_list=True)
        rows.append(_row("vesin-torch (full list)", timer(
            lambda: calc.compute(pos, cell, True, "ijS"), sizes["repeat"]), est, gpu))
    except ImportError as exc:
        rows.append({"name": "vesin-torch", "skipped": f"not installed ({exc})"})
    return {"atoms": n, "neighbours": neighbors, "rows": rows}


def phase_mm(args) -> dict:
    import roofline
    import torch

    from fastff.compile import cuda_graph_step
    from fastff.mm import water_force_field
    from fastff.systems import water_box

    dev, sizes, gpu = args.device, _sizes(args.rehearse), _gpu_kind()
    timer = Timer(dev)
    cutoff = 0.9 if not args.rehearse else 0.4
    box = water_box(sizes["mm_molecules"], seed=0, dtype=torch.float32, relax_steps=0)
    n = box.num_atoms
    rows = []
    positions = box.positions.to(dev)
    for use_clusters, label in ((True, "tiles"), (False, "pair list")):
        ff = water_force_field(box, cutoff=cutoff, skin=0.1, backend="triton").to(dev)
        ff.requires_grad_(False)
        ff.use_clusters = use_clusters

        def step(x, ff=ff):
            x = x.detach().requires_grad_(True)
            energy = ff(x)
            (grad,) = torch.autograd.grad(energy, x)
            return energy.detach(), grad

        est = (roofline.nonbonded_tiles(n, n / float(box.cell[0, 0]) ** 3, cutoff, 0.1)
               if use_clusters else roofline.nonbonded_rows(n, n / float(box.cell[0, 0]) ** 3,
                                                            cutoff, 0.1))
        rows.append(_row(f"fastff MM step, {label} (eager)",
                         timer(lambda step=step: step(positions), sizes["repeat"]), est, gpu,
                         atoms=n))
        if dev.startswith("cuda"):
            graph = cuda_graph_step(step, positions)
            rows.append(_row(f"fastff MM step, {label} (CUDA graph)",
                             timer(lambda graph=graph: graph(positions), sizes["repeat"]), est,
                             gpu, atoms=n))
            ff.check()
    try:
        import openmm
        import openmm.unit as unit

        name = "CUDA" if dev.startswith("cuda") else "CPU"
        platform_ = openmm.Platform.getPlatformByName(name)
        system = box.to_openmm(cutoff=cutoff)
        integrator = openmm.VerletIntegrator(0.0005 * unit.picoseconds)
        ctx = openmm.Context(system, integrator, platform_)
        ctx.setPositions(box.positions.double().numpy())
        ctx.setVelocitiesToTemperature(300)

        def omm_steps(k=10):
            integrator.step(k)
            ctx.getState(getEnergy=True)  # waits for the steps

        timing = timer(omm_steps, max(3, sizes["repeat"] // 4))
        timing = {k: (v / 10 if k.endswith("_s") else v) for k, v in timing.items()}
        rows.append(_row(f"OpenMM {name} MD step (mixed precision default)", timing, None, gpu,
                         atoms=n))
    except Exception as exc:  # not installed, or no CUDA platform in this build
        rows.append({"name": "OpenMM", "skipped": f"{type(exc).__name__}: {exc}"[:300]})
    return {"atoms": n, "cutoff_nm": cutoff, "rows": rows}


def phase_cfconv(args) -> dict:
    import numpy as np
    import roofline
    import torch
    from torch import nn

    import fastff
    import fastff.nn as fnn

    dev, sizes, gpu = args.device, _sizes(args.rehearse), _gpu_kind()
    timer = Timer(dev)
    F, K, cutoff, density = (128, 32, 5.0, 0.1) if not args.rehearse else (16, 8, 4.0, 0.1)
    n = sizes["cf_atoms"]
    box = (n / density) ** (1 / 3)
    rng = np.random.default_rng(0)
    pos = torch.tensor(rng.random((n, 3)) * box, dtype=torch.float32, device=dev)
    cell = torch.eye(3, device=dev) * box
    nl = fastff.neighbor_list(pos, cutoff, cell, backend="triton")
    nl.reverse  # noqa: B018  (mirror index built once, outside the timings)
    torch.manual_seed(0)
    conv = fnn.CFConv(F, K, cutoff, backend="triton").to(dev)
    h = torch.randn(n, F, device=dev)
    est = roofline.cfconv(n, len(nl) / n, F, K)

    def fastff_ef():
        p = pos.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(conv(h, p, nl, cell).sum(), p)
        return g

    rows = [_row("fastff CFConv, energy + forces", timer(fastff_ef, sizes["repeat"]), est, gpu,
                 atoms=n, edges=len(nl))]
    try:
        from torch_geometric.nn.models.schnet import CFConv as PygCFConv
        from torch_geometric.nn.models.schnet import GaussianSmearing, ShiftedSoftplus

        mlp = nn.Sequential(nn.Linear(K, F), ShiftedSoftplus(), nn.Linear(F, F))
        peer = PygCFConv(F, F, F, mlp, cutoff).to(dev)
        peer.lin1 = nn.Identity()  # the filter convolution alone, as fastff's CFConv
        peer.lin2 = nn.Identity()
        smearing = GaussianSmearing(0.0, cutoff, K).to(dev)
        edge_index = torch.stack([nl.j, nl.i])

        def pyg_ef():
            p = pos.clone().requires_grad_(True)
            d = nl.distances(p, cell)
            (g,) = torch.autograd.grad(peer(h, edge_index, d, smearing(d)).sum(), p)
            return g

        rows.append(_row("torch_geometric CFConv, energy + forces",
                         timer(pyg_ef, sizes["repeat"]), est, gpu))
    except Exception as exc:
        rows.append({"name": "torch_geometric", "skipped": f"{type(exc).__name__}: {exc}"[:300]})
    return {"atoms": n, "features": F, "basis": K, "rows": rows}


def phase_bench(args) -> dict:
    sizes = _sizes(args.rehearse)
    out = os.path.join(args.out, "bench.json")
    cmd = [sys.executable, "-m", "fastff", "bench", "--device", args.device.split(":")[0],
           "--atoms", str(sizes["bench_atoms"]), "--json", out, "--budget",
           "4" if not args.rehearse else "1", "--repeat", "3" if not args.rehearse else "1",
           "--steps", "10" if not args.rehearse else "1", "--no-reference"]
    if args.rehearse:
        cmd += ["--model", "schnet", "--no-openmm"]
    limit = LIMITS["bench"][1 if args.rehearse else 0] - 10
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    result = {"command": " ".join(cmd[1:]), "exit_status": done.returncode,
              "output_tail": (done.stdout + done.stderr)[-3000:]}
    if os.path.exists(out):
        with open(out) as f:
            doc = json.load(f)
        result["headline"] = doc.get("results", [{}])[0].get("headline", doc.get("headline"))
    return result


PHASES = {"environment": phase_environment, "tests": phase_tests, "neighbors": phase_neighbors,
          "mm": phase_mm, "cfconv": phase_cfconv, "bench": phase_bench}


# ------------------------------------------------------------------------------ driver
def _run_phase(name: str, args) -> dict:
    """One phase in its own process (a crash or a hang costs only that phase)."""
    out = os.path.join(args.out, f"phase_{name}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", name, "--out", args.out,
           "--device", args.device] + (["--rehearse"] if args.rehearse else [])
    limit = LIMITS[name][1 if args.rehearse else 0]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        status = done.returncode
        log = done.stdout[-2000:] + done.stderr[-4000:]
    except subprocess.TimeoutExpired:
        status, log = "timeout", f"phase {name} ran past its limit of {limit} s"
    result = {"phase": name, "exit_status": status, "seconds": round(time.perf_counter() - t0, 1)}
    if os.path.exists(out):
        with open(out) as f:
            result.update(json.load(f))
    if status != 0:
        result["log"] = log
    return result


def _markdown(results: dict) -> str:
    env = results["phases"].get("environment", {})
    lines = [f"# GPU check: {env.get('gpu', 'no GPU (rehearsal)')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}", ""]
    tests = results["phases"].get("tests", {})
    lines.append(f"Tests: {tests.get('tests', '?')} run, {tests.get('failures', '?')} failed, "
                 f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped "
                 f"(exit {tests.get('exit_status')}, {tests.get('seconds', 0):.0f} s)")
    lines += ["", "| phase | measurement | median (ms) | roofline H100 / H200 (ms) | x roofline |",
              "|---|---|---|---|---|"]
    for name in ("neighbors", "mm", "cfconv"):
        phase = results["phases"].get(name, {})
        if phase.get("exit_status") not in (0, None):
            lines.append(f"| {name} | failed ({phase.get('exit_status')}) | | | |")
        for row in phase.get("rows", []):
            if "skipped" in row:
                lines.append(f"| {name} | {row['name']}: skipped ({row['skipped'][:60]}) | | | |")
                continue
            roof = (f"{row['roofline_H100_s'] * 1e3:.3f} / {row['roofline_H200_s'] * 1e3:.3f}"
                    if "roofline_H100_s" in row else "")
            ratio = f"{row['x_roofline']:.1f}" if "x_roofline" in row else ""
            lines.append(f"| {name} | {row['name']} | {row['median_s'] * 1e3:.3f} | {roof} | "
                         f"{ratio} |")
    bench = results["phases"].get("bench", {})
    for key, value in (bench.get("headline") or {}).items():
        lines.append(f"| bench | {key} | {value:.3g} (ratio) | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rehearse", action="store_true",
                        help="CPU tensors under the Triton interpreter, small sizes")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu_check"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", choices=list(PHASES), help="run only these phases")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.device is None:
        args.device = "cpu" if args.rehearse else "cuda"
    if args.phase:  # inside a phase's own process
        try:
            result = PHASES[args.phase](args)
        except Exception:
            result = {"error": traceback.format_exc()[-4000:]}
        with open(os.path.join(args.out, f"phase_{args.phase}.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        return 1 if "error" in result else 0
    if not args.rehearse:
        import torch

        if torch.version.cuda is None or not torch.cuda.is_available():
            print("gpu_check: this torch cannot use a GPU (torch "
                  f"{torch.__version__}, CUDA build: {torch.version.cuda}, device visible: "
                  f"{torch.cuda.is_available()}). Install a CUDA build of torch (on Linux x86_64 "
                  "the PyPI wheel `pip install torch==2.13.0` is one; a '+cpu' build from the "
                  "CPU index is not), or run `bench/gpu_check.sh --rehearse` on CPU.",
                  file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    results = {"rehearsal": args.rehearse, "device": args.device, "phases": {}}
    for name in args.only or list(PHASES):
        print(f"gpu_check: {name} ...", flush=True)
        results["phases"][name] = _run_phase(name, args)
        print(f"gpu_check: {name} done ({results['phases'][name]['seconds']} s, exit "
              f"{results['phases'][name]['exit_status']})", flush=True)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    table = _markdown(results)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"gpu_check: {results['seconds']} s in all; wrote {args.out}/gpu_check.json and "
          "gpu_check.md")
    failed = [n for n, p in results["phases"].items() if p.get("exit_status") != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
