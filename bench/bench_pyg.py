"""The user's own torch_geometric SchNet, unmodified and accelerated (fastff.interop.pyg), and a
fastff model inside OpenMM (fastff.openmm.as_force) against fastff's direct call.

TIP3P water boxes (fastff.systems.water_box, positions in Angstrom), cutoff 5 A (~50 neighbours
per atom), float32, 2 threads. Both sides of a comparison get the same pairs through
torch_geometric's ``interaction_graph``: at every call, fastff's periodic cell list at the
positions given and its distances (nl.distances, differentiable), the same function for both;
the accelerated model also pays for turning that edge list into its own (mirror pairs checked).
Positions move by a small random step (0.02 A) before every call.

Cases (group: peers):
  energy+forces, SchNet(64, 64, 3, 32), 3,000 and 10,000 atoms: torch_geometric vs accelerated
  energy+forces, SchNet(128, 128, 6, 50), 10,000 atoms: the same
  force-matching training step (loss on energies and forces, parameter gradients), 64 / 3, at
      3,000 and 10,000 atoms
  energy+forces with accelerate(tabulate=True), 64 / 3, 3,000 atoms (its force error against
      the exact model is in extra_info)
  one MD step through as_force (fastff SchNet, 3,000 atoms, OpenMM CPU platform), against
      fastff's direct energy_and_forces (a fresh list per call, and a reused Verlet list)

Speed:   python -m pytest bench/bench_pyg.py --benchmark-json=OUT.json
         python bench/bench_pyg.py --ratios OUT.json        (ratios of medians per group)
Memory:  python bench/bench_pyg.py --memory                 (each case in a fresh process;
         extra peak RSS of one call over the RSS before it, /proc/self/clear_refs)
Alternating (a busy machine):  python bench/bench_pyg.py --alternate ROUNDS [CASE ...]
         the peers of a case called in turn, ROUNDS times, one JSON line per case
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastff  # noqa: E402
from fastff import models, systems  # noqa: E402
from fastff.profiling import peak_memory  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
warnings.filterwarnings("ignore", message="fastff:")
CUTOFF = 5.0  # Angstrom
STEP = 0.02  # Angstrom per coordinate per call
SMALL = {"hidden_channels": 64, "num_filters": 64, "num_interactions": 3, "num_gaussians": 32}
LARGE = {"hidden_channels": 128, "num_filters": 128, "num_interactions": 6, "num_gaussians": 50}
_CACHE: dict = {}


def water(n_atoms: int):
    """(species, positions [A], cell [A], graph) of a water box; graph is the interaction graph
    both sides get: fastff's periodic pairs at the positions it is called with."""
    if n_atoms not in _CACHE:
        box = systems.water_box(n_atoms // 3, seed=0)
        pos, cell = box.positions * 10.0, box.cell * 10.0

        def graph(p, batch):
            nl = fastff.neighbor_list(p, CUTOFF, cell)
            return torch.stack([nl.j, nl.i]), nl.distances(p, cell)

        _CACHE[n_atoms] = (box.species, pos, cell, graph)
    return _CACHE[n_atoms]


def pyg_models(n_atoms: int, config: dict, *, tabulate: bool = False):
    """(unmodified torch_geometric SchNet, accelerated copy) with the same weights."""
    from torch_geometric.nn.models import SchNet

    from fastff.interop import pyg

    torch.manual_seed(0)
    original = SchNet(cutoff=CUTOFF, interaction_graph=water(n_atoms)[3], **config)
    return original, pyg.accelerate(copy.deepcopy(original), tabulate=tabulate)


class Walker:
    """Positions along a random walk of ``step`` per coordinate per call."""

    def __init__(self, positions: torch.Tensor, seed: int = 1, step: float = STEP):
        self.g = torch.Generator().manual_seed(seed)
        self.x, self.step = positions.detach().clone(), step

    def __call__(self) -> torch.Tensor:
        self.x = self.x + self.step * torch.randn(self.x.shape, generator=self.g)
        return self.x.detach().requires_grad_(True)


def energy_forces(model, species, x):
    energy = model(species, x).sum()
    return energy.detach(), -torch.autograd.grad(energy, x)[0]


def training_step(model, species, x, target_e, target_f):
    energy = model(species, x).sum()
    forces = -torch.autograd.grad(energy, x, create_graph=True)[0]
    loss = (energy - target_e).square() + (forces - target_f).square().mean()
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def _run(benchmark, call, rounds: int):
    call()  # warm-up: JIT compilation (or cache load), tables, the list conversion
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


EF_CASES = [(3000, "small"), (10000, "small"), (10000, "large")]


@pytest.mark.parametrize("n,size", EF_CASES, ids=[f"{n}-{s}" for n, s in EF_CASES])
@pytest.mark.parametrize("impl", ["torch_geometric", "fastff"])
def test_energy_forces(benchmark, n, size, impl):
    original, accelerated = pyg_models(n, SMALL if size == "small" else LARGE)
    model = (original if impl == "torch_geometric" else accelerated).requires_grad_(False)
    species, pos, _, _ = water(n)
    walker = Walker(pos)
    benchmark.group = f"energy+forces {n} atoms, {size}"
    benchmark.extra_info["pairs"] = int(water(n)[3](pos, None)[0].shape[1])
    _run(benchmark, lambda: energy_forces(model, species, walker()),
         3 if impl == "torch_geometric" else 5)


@pytest.mark.parametrize("n", [3000, 10000])
@pytest.mark.parametrize("impl", ["torch_geometric", "fastff"])
def test_training_step(benchmark, n, impl):
    original, accelerated = pyg_models(n, SMALL)
    model = original if impl == "torch_geometric" else accelerated
    species, pos, _, _ = water(n)
    walker = Walker(pos)
    target_f = 0.1 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(2))
    benchmark.group = f"training step {n} atoms, small"
    _run(benchmark, lambda: training_step(model, species, walker(), -100.0, target_f), 3)


@pytest.mark.parametrize("impl", ["torch_geometric", "fastff_tabulated"])
def test_tabulated_energy_forces(benchmark, impl):
    n = 3000
    original, tabulated = pyg_models(n, SMALL, tabulate=True)
    model = (original if impl == "torch_geometric" else tabulated).requires_grad_(False)
    species, pos, _, _ = water(n)
    x = pos.detach().requires_grad_(True)
    _, f_exact = energy_forces(original, species, x)
    _, f_table = energy_forces(tabulated, species, x)
    error = float((f_table - f_exact).abs().max() / f_exact.abs().max())
    benchmark.extra_info["max_force_error_relative"] = error
    print(f"\ntabulated forces: max |error| / max |F| = {error:.2e} (float32)")
    walker = Walker(pos)
    benchmark.group = f"energy+forces {n} atoms, small, tabulated"
    _run(benchmark, lambda: energy_forces(model, species, walker()),
         3 if impl == "torch_geometric" else 5)


@pytest.mark.parametrize("impl", ["openmm_step", "direct_fresh_list", "direct_verlet_list"])
def test_openmm_step(benchmark, impl):
    openmm = pytest.importorskip("openmm")
    from fastff.openmm import DEFAULT_SKIN, as_force

    box = systems.water_box(1000, seed=0)
    torch.manual_seed(0)
    model = models.SchNet().requires_grad_(False)  # nm, kJ/mol: OpenMM's units
    benchmark.group = "one MD step, fastff SchNet 3000 atoms"
    if impl == "openmm_step":
        system = box.to_openmm()
        for k in reversed(range(system.getNumForces())):
            system.removeForce(k)
        system.addForce(as_force(model, box.species, periodic=True))
        ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("CPU"),
                             {"Threads": os.environ["OMP_NUM_THREADS"]})
        ctx.setPositions(box.positions.double().numpy())
        ctx.setVelocitiesToTemperature(300.0, 1)
        step = ctx.getIntegrator().step
        _run(benchmark, lambda: step(1), 10)
        return
    walker = Walker(box.positions, seed=3, step=0.002)  # nm: ~1-2 fs of thermal motion
    verlet = fastff.VerletList(model.cutoff, DEFAULT_SKIN, compact=True)

    def call():
        x = walker()
        nl = verlet.update(x, box.cell) if impl == "direct_verlet_list" else None
        return models.energy_and_forces(model, box.species, x, box.cell, nl=nl)

    _run(benchmark, call, 10)


# ------------------------------------------------------------------ ratios and peak memory

def ratios(path: str) -> dict[str, dict[str, float]]:
    """Ratios of medians within each group of a --benchmark-json file: the first peer (the
    unmodified model, or the OpenMM step) over each other."""
    doc = json.load(open(path))
    groups: dict[str, dict[str, float]] = {}
    for b in doc["benchmarks"]:
        groups.setdefault(b["group"], {})[b["name"]] = b["stats"]["median"]
    out = {}
    for group, medians in groups.items():
        names = sorted(medians, key=lambda k: ("[torch_geometric" not in k and
                                               "[openmm_step" not in k, k))
        first = names[0]
        out[group] = {f"{first} / {k}": medians[first] / medians[k] for k in names[1:]}
        out[group]["medians_s"] = medians  # type: ignore[assignment]
    return out


def _timed(call) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def _openmm_calls(n: int = 3000) -> dict:
    """One MD step through as_force, and fastff's direct energy + forces (fresh list, reused
    Verlet list) along a random walk, on the same model and box."""
    import openmm

    from fastff.openmm import DEFAULT_SKIN, as_force

    box = systems.water_box(n // 3, seed=0)
    torch.manual_seed(0)
    model = models.SchNet().requires_grad_(False)
    system = box.to_openmm()
    for k in reversed(range(system.getNumForces())):
        system.removeForce(k)
    system.addForce(as_force(model, box.species, periodic=True))
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("CPU"),
                         {"Threads": os.environ["OMP_NUM_THREADS"]})
    ctx.setPositions(box.positions.double().numpy())
    ctx.setVelocitiesToTemperature(300.0, 1)
    walkers = {"fresh": Walker(box.positions, 3, 0.002), "verlet": Walker(box.positions, 3, 0.002)}
    verlet = fastff.VerletList(model.cutoff, DEFAULT_SKIN, compact=True)

    def direct(kind):
        x = walkers[kind]()
        nl = verlet.update(x, box.cell) if kind == "verlet" else None
        return models.energy_and_forces(model, box.species, x, box.cell, nl=nl)

    return {"openmm_step": lambda: ctx.getIntegrator().step(1),
            "direct_fresh_list": lambda: direct("fresh"),
            "direct_verlet_list": lambda: direct("verlet")}


def _pyg_calls(n: int, config: dict, what: str) -> dict:
    original, accelerated = pyg_models(n, config, tabulate=what == "tabulated")
    species, pos, _, _ = water(n)
    walkers = {"torch_geometric": Walker(pos), "fastff": Walker(pos)}
    if what == "training_step":
        target_f = 0.1 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(2))
        return {name: (lambda m=m, w=walkers[name]: training_step(m, species, w(), -100.0,
                                                                  target_f))
                for name, m in (("torch_geometric", original), ("fastff", accelerated))}
    original.requires_grad_(False)
    accelerated.requires_grad_(False)
    return {name: (lambda m=m, w=walkers[name]: energy_forces(m, species, w()))
            for name, m in (("torch_geometric", original), ("fastff", accelerated))}


ALTERNATING = {
    "energy+forces 3000 atoms, small": lambda: _pyg_calls(3000, SMALL, "energy_forces"),
    "energy+forces 10000 atoms, small": lambda: _pyg_calls(10000, SMALL, "energy_forces"),
    "energy+forces 10000 atoms, large": lambda: _pyg_calls(10000, LARGE, "energy_forces"),
    "training step 3000 atoms, small": lambda: _pyg_calls(3000, SMALL, "training_step"),
    "training step 10000 atoms, small": lambda: _pyg_calls(10000, SMALL, "training_step"),
    "energy+forces 3000 atoms, small, tabulated": lambda: _pyg_calls(3000, SMALL, "tabulated"),
    "one MD step, fastff SchNet 3000 atoms": _openmm_calls,
}


def alternate(rounds: int, cases: list[str]) -> list[dict]:
    """Each case's peers called in turn, ``rounds`` times (after a warm-up call each), so that
    a busy machine slows them alike; per case: every time, the medians, and the ratio of the
    first peer's median to each other's with the range of the per-round ratios."""
    results = []
    for case in cases:
        calls = ALTERNATING[case]()
        for call in calls.values():
            call()  # warm-up: JIT compilation (or cache load), tables, lists
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                times[name].append(_timed(call))
        first, *others = list(calls)
        med = {name: statistics.median(t) for name, t in times.items()}
        row = {"case": case, "rounds": rounds, "times_s": times, "medians_s": med,
               "ratios": {f"{first} / {o}": med[first] / med[o] for o in others},
               "round_ratio_range": {f"{first} / {o}": [
                   min(a / b for a, b in zip(times[first], times[o], strict=True)),
                   max(a / b for a, b in zip(times[first], times[o], strict=True))]
                   for o in others}}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def record_run(results: list[dict], load_before: list[float],
               path: str = "bench/results/bench_pyg_alternating.json") -> None:
    """Append one ``--alternate`` run, with its command, commit, machine, threads and load, to
    the committed JSON of alternating runs."""
    import platform
    import shlex

    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        doc = {"runs": []}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    doc["runs"].append({
        "command": "python " + shlex.join(["bench/bench_pyg.py", *sys.argv[1:]]),
        "commit": commit or None, "machine": {"platform": platform.platform(),
                                              "processor": platform.processor(),
                                              "cpu_count": os.cpu_count()},
        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")},
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
        "results": results})
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement may then undercount
        pass




def _one_memory_case(case: str, n: int) -> dict:
    impl, what = case.split(":")
    warm_original, warm_fast = pyg_models(300, SMALL)
    species, pos, _, _ = water(300)
    for m in (warm_original, warm_fast):  # JIT compilation / cache load on a small system
        training_step(m, species, pos.detach().requires_grad_(True), 0.0, torch.zeros_like(pos))
    original, accelerated = pyg_models(n, SMALL)
    model = original if impl == "torch_geometric" else accelerated
    species, pos, _, _ = water(n)
    x = pos.detach().requires_grad_(True)
    if what == "energy_forces":
        model.requires_grad_(False)
    import gc

    gc.collect()
    _trim()  # freed heap memory back to the OS: the resident size is then what is alive
    with peak_memory() as mem:  # resident high-water mark over the size at entry
        if what == "energy_forces":
            energy_forces(model, species, x)
        else:
            training_step(model, species, x, 0.0, torch.zeros_like(pos))
    return {"case": case, "atoms": n, "extra_peak_MiB": round(mem.extra / 2**20, 1)}


def measure_memory(sizes=(3000, 10000)) -> list[dict]:
    rows = []
    for n in sizes:
        for case in ("torch_geometric:training_step", "fastff:training_step",
                     "torch_geometric:energy_forces", "fastff:energy_forces"):
            out = subprocess.run([sys.executable, __file__, "--one", case, str(n)],
                                 capture_output=True, text=True, check=True, env=os.environ)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(_one_memory_case(sys.argv[2], int(sys.argv[3]))))
    elif sys.argv[1:2] == ["--memory"]:
        measure_memory(tuple(int(a) for a in sys.argv[2:]) or (3000, 10000))
    elif sys.argv[1:2] == ["--ratios"]:
        print(json.dumps(ratios(sys.argv[2]), indent=1))
    elif sys.argv[1:2] == ["--alternate"]:
        load_before = list(os.getloadavg())
        found = alternate(int(sys.argv[2]), sys.argv[3:] or list(ALTERNATING))
        record_run(found, load_before)
