"""How far is an MLFF from MM cost? The measurements behind ``fastff bench``.

Every component computes energy and forces (``-dE/dpositions``) on the built-in TIP3P water box
(:func:`fastff.systems.water_box`), and is timed over the same MD-like trajectory: each step
moves every coordinate by a Gaussian random walk of ``STEP_NM`` nm, so Verlet lists rebuild at a
realistic rate (every ~30 steps at 3,000 atoms with a 0.1 nm skin, as with a 1-2 fs MD step and
a short list interval) and list costs are amortized as in MD.
A *sample* is ``steps`` consecutive steps timed together; a component runs two warm-up steps
(JIT compilation, first list build, OpenMM context set-up) and then ``repeat`` samples, fewer and
shorter ones for a component that would exceed its time ``budget`` (see ``_time_samples``). The
figure is the median over samples of time per atom-step, with the interquartile range.

Components:
    neighbor list   a full list at the model cutoff, rebuilt every step (what an MLFF pays
                    without reuse)
    neighbor list (Verlet)
                    the same pairs from a list at cutoff + skin (0.1 nm, as MM's) reused until
                    an atom moved skin / 2 and compacted to the cutoff every step
                    (:class:`fastff.VerletList` with ``compact=True``): what the model rows pay
    MM (fastff)     LJ + reaction-field Coulomb (cutoff 0.9 nm, Verlet skin 0.1 nm) + bonds +
                    angles (:func:`fastff.mm.water_force_field`), parameters frozen (forces
                    only, as in MD): on CPU the cluster-pair nonbonded path
    MM (OpenMM)     the same System on OpenMM's CPU platform (mixed precision)
    SchNet / PaiNN  :mod:`fastff.models` on fastff kernels with the exact filter networks and
                    with tabulated filters (inference), and the same weights on the torch
                    reference backend ("eager"). Every model row gets its full list at the
                    model cutoff from the same compacting Verlet list, run by fastff's kernels
                    (the reference backend's own list is an O(N^2) oracle, not an eager
                    baseline), as MM gets its pairs from a Verlet list.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

#: Random-walk step per coordinate (nm): about the distance a water atom travels in 1-2 fs.
STEP_NM = 0.002
#: Model rows on the reference backend are skipped above this estimated peak memory (bytes):
#: the eager path keeps several [pairs, features] float tensors alive for the backward.
REFERENCE_MEMORY_LIMIT = 8e9
#: Sizes of ``--sweep`` (atoms; rounded to whole water molecules).
SWEEP_ATOMS = (300, 1000, 3000, 10000, 30000, 100000)
MODELS = ("schnet", "painn")
#: Fewest timed samples of a component, however slow (a median with a spread needs a few).
MIN_SAMPLES = 3
#: A sweep skips a component predicted to need more than this many budgets at the next size.
OVER_BUDGET = 5
#: The MM cutoff (nm) of the water box's force field: reaction field, as in the MM benchmarks.
MM_CUTOFF = 0.9
#: Verlet skin (nm) of every list: MM's (fastff.mm.water_force_field's default) and the models'.
SKIN = 0.1


@dataclass
class Row:
    """One component's timing: seconds per atom-step over samples."""

    component: str
    backend: str
    atoms: int
    per_atom_step: list[float] = field(default_factory=list)
    steps: int = 0  # MD-like steps per sample
    samples: int = 0
    skipped: str | None = None  # why the component did not run
    estimate: float | None = None  # predicted s per atom-step of a row skipped for time

    @property
    def median(self) -> float:
        return statistics.median(self.per_atom_step) if self.per_atom_step else math.nan

    @property
    def iqr(self) -> float:
        xs = sorted(self.per_atom_step)
        if len(xs) < 2:
            return 0.0
        q = statistics.quantiles(xs, n=4, method="inclusive")
        return q[2] - q[0]

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(median_s=self.median, iqr_s=self.iqr)
        return d


@dataclass
class Settings:
    atoms: int = 3000
    models: tuple[str, ...] = MODELS
    backend: str | None = None  # fastff kernels; None = by device
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    threads: int | None = None
    repeat: int = 5
    steps: int = 10
    budget: float = 20.0  # seconds per component, see _time_samples
    seed: int = 0
    openmm: bool = True
    reference: bool = True


def trajectory(positions: torch.Tensor, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` positions along a seeded random walk of ``STEP_NM`` per coordinate."""
    g = torch.Generator().manual_seed(seed)
    out, x = [], positions.detach().clone()
    for _ in range(steps):
        x = x + STEP_NM * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
        out.append(x)
    return out


def _time_samples(step: Callable[[torch.Tensor], None], frames: list[torch.Tensor],
                  settings: Settings, row: Row, on_sample: Callable[[], None] | None) -> Row:
    """Two warm-up steps (JIT compilation, first list build; the second gives the step time),
    then up to ``repeat`` samples of up to ``steps`` consecutive steps along ``frames``.

    A component slower than ``settings.budget`` seconds for the whole row gets fewer steps per
    sample (at least 1), then fewer samples (at least ``MIN_SAMPLES``), so one slow path (an
    eager baseline) does not hold the run for minutes; the row records what it ran.
    """
    cuda = settings.device.startswith("cuda")

    def run(chunk: list[torch.Tensor]) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in chunk:
            step(x)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(frames[:1])
    one = max(run(frames[1:2]), 1e-9)
    if on_sample is not None:
        on_sample()
    steps = min(settings.steps, max(1, int(settings.budget / (settings.repeat * one))))
    samples = settings.repeat
    if steps == 1:
        samples = min(settings.repeat, max(MIN_SAMPLES, int(settings.budget / one)))
    for sample in range(samples):
        chunk = frames[2 + sample * steps:2 + (sample + 1) * steps]
        row.per_atom_step.append(run(chunk) / (len(chunk) * row.atoms))
        if on_sample is not None:
            on_sample()
    for _ in range(settings.repeat - samples):  # progress the samples not taken
        if on_sample is not None:
            on_sample()
    row.steps, row.samples = steps, samples
    return row


def _energy_forces_step(energy: Callable[[torch.Tensor], torch.Tensor]):
    def step(x: torch.Tensor) -> None:
        x = x.detach().requires_grad_(True)
        e = energy(x).sum()
        torch.autograd.grad(e, x)
    return step


def reference_memory_estimate(model_name: str, atoms: int, num_features: int,
                              dtype: torch.dtype) -> float:
    """Rough peak bytes of a model's energy+forces on the reference backend (~52 neighbours at
    0.5 nm in water; the eager graph keeps ~10 [E, F] tensors per interaction)."""
    width = num_features * (3 if model_name == "painn" else 1)
    per_interaction = 10 * 52 * atoms * width * torch.finfo(dtype).bits / 8
    return 3 * per_interaction


def run(settings: Settings, *, on_sample: Callable[[], None] | None = None,
        previous: list[Row] | None = None) -> list[Row]:
    """Measure every component at ``settings.atoms``; returns one :class:`Row` each.

    ``previous``: rows of a smaller size (a sweep). A component whose time per atom-step there,
    scaled to this size, predicts more than ``OVER_BUDGET`` budgets for its warm-up and fewest
    samples is skipped, with the prediction as the reason.
    """
    from fastff import VerletList, mm, models, neighbor_list, systems

    if settings.threads:
        set_threads(settings.threads)
    box = systems.water_box(max(1, round(settings.atoms / 3)), seed=settings.seed,
                            dtype=settings.dtype)
    n = box.num_atoms
    dev = torch.device(settings.device)
    frames = [f.to(dev) for f in trajectory(box.positions, settings.repeat * settings.steps + 2,
                                            settings.seed + 1)]
    cell, species = box.cell.to(dev), box.species.to(dev)
    rows: list[Row] = []
    be = settings.backend

    before = {r.component: r.median if not r.skipped else r.estimate for r in previous or []}

    def timed(component: str, backend: str, step) -> None:
        per_atom = before.get(component) or 0.0
        predicted = per_atom * n
        if predicted * (2 + MIN_SAMPLES) > OVER_BUDGET * settings.budget:
            row = _skipped(component, backend, n, f"over the time budget (~{predicted:.0f} s "
                           "per step predicted)", settings, on_sample)
            row.estimate = per_atom
            rows.append(row)
            return
        row = Row(component, backend, n)
        rows.append(_time_samples(step, frames, settings, row, on_sample))

    model_cutoff = models.SchNet().cutoff
    timed("neighbor list", be or "auto",
          lambda x: neighbor_list(x, model_cutoff, cell, backend=be))

    def model_lists() -> VerletList:
        return VerletList(model_cutoff, SKIN, backend=be, compact=True)

    lists = model_lists()
    timed("neighbor list (Verlet)", be or "auto",
          lambda x: lists.update(x, cell).reverse)  # the mirror index, as the models read it
    edge = float(box.cell[0, 0])
    if edge < 2 * MM_CUTOFF:  # reaction field under the minimum image (as OpenMM requires)
        why = f"box {edge:.2f} nm < 2 x cutoff {MM_CUTOFF} nm"
        for component, backend in (("MM (fastff)", be or "auto"), ("MM (OpenMM)", "OpenMM CPU")):
            if component == "MM (fastff)" or settings.openmm:
                rows.append(_skipped(component, backend, n, why, settings, on_sample))
    else:
        # forces only, as in MD and as OpenMM computes them: no parameter gradients
        ff = mm.water_force_field(box, cutoff=MM_CUTOFF, skin=SKIN, backend=be).to(
            dev).requires_grad_(False)
        timed("MM (fastff)", be or "auto", _energy_forces_step(lambda x: ff(x, cell)))
        if settings.openmm:
            rows.append(_openmm_row(box, frames, settings, on_sample))

    built = {"schnet": models.SchNet, "painn": models.PaiNN}
    for name in settings.models:
        torch.manual_seed(settings.seed)
        # parameters frozen, as for the force field above and as fastff.ase.Calculator runs a
        # model in MD
        model = built[name]().to(dev, settings.dtype).set_backend(be).requires_grad_(False)
        label = "SchNet" if name == "schnet" else "PaiNN"

        def energy(x, m=model, verlet=model_lists()):  # noqa: B008  (one list per model)
            return m(species, x, cell, nl=verlet.update(x, cell))

        timed(f"{label} (fastff)", be or "auto", _energy_forces_step(energy))
        model.set_tabulate(True)
        timed(f"{label} (fastff, tabulated)", be or "auto", _energy_forces_step(energy))
        model.set_tabulate(False)
        if settings.reference:
            need = reference_memory_estimate(name, n, model.num_features, settings.dtype)
            if need > REFERENCE_MEMORY_LIMIT:
                rows.append(_skipped(f"{label} (reference)", "reference", n,
                                     f"needs ~{need / 1e9:.0f} GB", settings, on_sample))
                continue
            model.set_backend("reference")
            timed(f"{label} (reference)", "reference", _energy_forces_step(energy))
    return rows


def _skipped(component: str, backend: str, atoms: int, why: str, settings: Settings,
             on_sample) -> Row:
    """A row that did not run, and the progress it would have made."""
    for _ in range(settings.repeat + 1):
        if on_sample is not None:
            on_sample()
    return Row(component, backend, atoms, skipped=why)


def samples_per_size(settings: Settings) -> int:
    """Progress units of one :func:`run` (one per sample, warm-ups included)."""
    per_component = settings.repeat + 1
    # the two neighbor-list rows and MM (fastff), OpenMM, then per model: fastff, tabulated
    # and reference
    components = 3 + int(settings.openmm) + len(settings.models) * (2 + int(settings.reference))
    return components * per_component


def _openmm_row(box, frames, settings: Settings, on_sample) -> Row:
    try:
        import openmm
    except ImportError:
        return _skipped("MM (OpenMM)", "OpenMM CPU", box.num_atoms, "openmm not installed",
                        settings, on_sample)
    row = Row("MM (OpenMM)", "OpenMM CPU", box.num_atoms)
    system = box.to_openmm(cutoff=MM_CUTOFF)
    threads = settings.threads or torch.get_num_threads()
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("CPU"), {"Threads": str(threads)})

    def step(x: torch.Tensor) -> None:
        ctx.setPositions(x.detach().double().cpu().numpy())
        ctx.getState(getEnergy=True, getForces=True)

    return _time_samples(step, frames, settings, row, on_sample)


def set_threads(threads: int) -> None:
    """Threads for torch and numba (numba cannot exceed the count it started with)."""
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore
    except ImportError:
        pass


def headline(rows: list[Row]) -> dict[str, float]:
    """Ratios of medians: MLFF / MM (fastff), fastff speed-up over reference, MM vs OpenMM."""
    by = {r.component: r.median for r in rows if not r.skipped}
    out: dict[str, float] = {}
    mm = by.get("MM (fastff)")
    for label in ("SchNet", "PaiNN"):
        for kind in ("fastff", "fastff, tabulated", "reference"):
            t = by.get(f"{label} ({kind})")
            if t is not None and mm:
                out[f"{label} ({kind}) / MM (fastff)"] = t / mm
        ref = by.get(f"{label} (reference)")
        for kind in ("fastff", "fastff, tabulated"):
            fast = by.get(f"{label} ({kind})")
            if fast and ref:
                out[f"{label}: reference / {kind}"] = ref / fast
    if mm and by.get("MM (OpenMM)"):
        out["MM (fastff) / MM (OpenMM)"] = mm / by["MM (OpenMM)"]
    return out


def environment(settings: Settings) -> dict:
    """Machine, versions and settings recorded with every JSON result."""
    import fastff
    from fastff.allocator import malloc_tuned

    versions: dict[str, str | None] = {"fastff": fastff.__version__, "torch": torch.__version__}
    for mod in ("numba", "triton", "openmm", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # not installed, or a broken install: record it as absent
            versions[mod] = None
    s = asdict(settings)
    s["dtype"] = str(settings.dtype).replace("torch.", "")
    s["threads"] = settings.threads or torch.get_num_threads()
    return {"machine": {"platform": platform.platform(), "processor": _cpu_name(),
                        "cpu_count": os.cpu_count(), "python": platform.python_version()},
            "versions": versions, "settings": s, "step_nm": STEP_NM, "skin_nm": SKIN,
            "malloc_tuned": malloc_tuned()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
