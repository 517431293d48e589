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

The user's system and model instead (``Settings.structure``, ``Settings.model_file``): any file
ASE reads (positions and cell in Angstrom, converted to nm), with MM rows where OpenMM's amber14 /
TIP3P parametrise it (a PDB file with standard residues; fastff's row runs the same System through
:meth:`fastff.mm.ForceField.from_openmm`); and a torch-saved model: a fastff model (rows as above,
in its own units) or a ``torch_geometric`` SchNet ("torch_geometric SchNet": the unmodified model,
then :func:`fastff.interop.pyg.accelerate` on a copy, exact and tabulated), both sides fed the
same periodic pairs through its ``interaction_graph``.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fastff.systems import WaterBox

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
    structure: str | None = None  # a file ASE reads, instead of the water box
    model_file: str | None = None  # a torch-saved fastff or torch_geometric model


@dataclass
class BenchSystem:
    """What a run measures: the water box, or a structure read from a file (nm)."""

    label: str
    species: torch.Tensor  # int64 [N]
    positions: torch.Tensor  # [N, 3] nm, the run's dtype
    cell: torch.Tensor | None  # [3, 3] nm, rows are lattice vectors; None without pbc
    pbc: torch.Tensor  # bool [3]
    box: WaterBox | None = None  # the built-in water box (its MM force field)
    path: str | None = None  # the structure file (MM parameters from it where OpenMM can)

    @property
    def num_atoms(self) -> int:
        return int(self.positions.shape[0])


def bench_system(settings: Settings) -> BenchSystem:
    """The water box of ``settings.atoms`` atoms, or ``settings.structure``."""
    from fastff import systems

    if settings.structure is not None:
        return load_structure(settings.structure, settings.dtype)
    box = systems.water_box(max(1, round(settings.atoms / 3)), seed=settings.seed,
                            dtype=settings.dtype)
    return BenchSystem(f"{box.num_atoms // 3} TIP3P waters", box.species, box.positions,
                       box.cell, box.pbc, box=box)


def load_structure(path: str, dtype: torch.dtype = torch.float32) -> BenchSystem:
    """The first frame of any file ASE reads (positions and cell in Angstrom) as a
    :class:`BenchSystem` in nm. Raises ValueError for a file ASE cannot read or a structure
    with fewer than 2 atoms or a singular periodic cell."""
    import ase.io
    import numpy as np

    try:
        atoms: Any = ase.io.read(path, index=0)
    except Exception as err:  # ASE raises many kinds for unreadable files
        raise ValueError(f"ASE cannot read it ({type(err).__name__}: {err})") from None
    if len(atoms) < 2:
        raise ValueError(f"it holds {len(atoms)} atom(s); a benchmark needs at least 2")
    pbc = torch.as_tensor(np.asarray(atoms.pbc, dtype=bool))
    cell = None
    if bool(pbc.any()):
        lattice = np.asarray(atoms.cell, dtype=np.float64)
        if abs(np.linalg.det(lattice[np.asarray(atoms.pbc)] @ lattice[np.asarray(atoms.pbc)].T)
               ) < 1e-12:
            raise ValueError(f"its periodic cell is singular along pbc={atoms.pbc.tolist()}")
        cell = torch.as_tensor(lattice / 10.0, dtype=dtype)
    name = os.path.basename(path)
    return BenchSystem(f"{name}, {atoms.get_chemical_formula()}",
                       torch.as_tensor(atoms.numbers, dtype=torch.int64),
                       torch.as_tensor(atoms.positions / 10.0, dtype=dtype), cell, pbc, path=path)


@dataclass
class LoadedModel:
    """A model read by :func:`load_model`."""

    model: Any  # a fastff AtomisticModel or a torch_geometric SchNet
    kind: str  # "fastff" or "torch_geometric"
    nm_per_length: float  # nm per unit of the model's positions

    @property
    def cutoff_nm(self) -> float:
        return float(self.model.cutoff) * self.nm_per_length


def load_model(path: str) -> LoadedModel:
    """A torch-saved model (``torch.save(model, path)``): a fastff model (its ``length_unit``
    read) or a ``torch_geometric`` SchNet (Angstrom, its convention). Raises ValueError for
    anything else, naming what the file holds."""
    from fastff import units
    from fastff.models import AtomisticModel

    try:
        model = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as err:  # pickle, zip and torch errors alike
        raise ValueError(f"torch.load cannot read it ({type(err).__name__}: {err})") from None
    if isinstance(model, AtomisticModel):
        if model.length_unit is None:
            raise ValueError("the fastff model has no length_unit; set it before saving")
        nm = units.nm(model.length_unit)
        units.check_cutoff(model.cutoff, nm, model.length_unit)
        return LoadedModel(model, "fastff", nm)
    if any(c.__module__.startswith("torch_geometric") and c.__name__ == "SchNet"
           for c in type(model).__mro__):
        from fastff.interop import pyg

        pyg.layout(model)  # what accelerate needs, checked before measuring
        units.check_cutoff(float(model.cutoff), units.nm("Angstrom"), "Angstrom")
        return LoadedModel(model, "torch_geometric", units.nm("Angstrom"))
    what = "a state_dict (save the model object)" if isinstance(model, dict) else \
        f"a {type(model).__module__}.{type(model).__name__}"
    raise ValueError(f"it holds {what}; expected a fastff model or a torch_geometric SchNet")


def _structure_mm_rows(system: BenchSystem, frames, settings: Settings, timed, rows,
                       on_sample) -> None:
    """MM rows of a structure: OpenMM's amber14/TIP3P System from the file where it
    parametrises it, run by OpenMM and by fastff (ForceField.from_openmm); skipped otherwise."""
    n, be = system.num_atoms, settings.backend
    mm_system, why = _openmm_system(system)
    ff = None
    if mm_system is not None:
        from fastff.mm import ForceField

        try:
            ff = ForceField.from_openmm(mm_system, dtype=settings.dtype, skin=SKIN,
                                        backend=be).to(settings.device).requires_grad_(False)
        except ValueError as err:
            why = f"fastff.mm cannot run this System: {err}"
    if ff is None:
        rows.append(_skipped("MM (fastff)", be or "auto", n, why or "no MM force field",
                             settings, on_sample))
    else:
        cell = None if system.cell is None else system.cell.to(settings.device)
        timed("MM (fastff)", be or "auto", _energy_forces_step(lambda x: ff(x, cell)))
    if settings.openmm:
        if mm_system is None:
            rows.append(_skipped("MM (OpenMM)", "OpenMM CPU", n, why or "no MM force field",
                                 settings, on_sample))
        else:
            rows.append(_openmm_row(mm_system, n, frames, settings, on_sample))


def _openmm_system(system: BenchSystem):
    """(openmm.System, None) from the structure file with amber14 + TIP3P, or (None, why)."""
    path = system.path or ""
    if not path.lower().endswith((".pdb", ".cif", ".pdbx")):
        return None, "no MM force field for this format (amber14/TIP3P needs a PDB/PDBx file)"
    try:
        from openmm import app, unit
    except ImportError:
        return None, "openmm not installed"
    try:
        reader = app.PDBFile if path.lower().endswith(".pdb") else app.PDBxFile
        structure = reader(path)
        periodic = system.cell is not None and bool(system.pbc.all())
        if periodic and system.cell is not None:
            structure.topology.setPeriodicBoxVectors(system.cell.double().numpy() * unit.nanometer)
        forcefield = app.ForceField("amber14-all.xml", "amber14/tip3p.xml")
        method = app.CutoffPeriodic if periodic else app.NoCutoff
        return forcefield.createSystem(structure.topology, nonbondedMethod=method,
                                       nonbondedCutoff=MM_CUTOFF * unit.nanometer,
                                       constraints=None, rigidWater=False), None
    except Exception as err:  # OpenMM raises ValueError and its own exceptions here
        return None, f"amber14/TIP3P cannot parametrise it ({str(err).splitlines()[0][:120]})"


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
    """Measure every component at ``settings.atoms`` (or on ``settings.structure``); returns
    one :class:`Row` each.

    ``previous``: rows of a smaller size (a sweep). A component whose time per atom-step there,
    scaled to this size, predicts more than ``OVER_BUDGET`` budgets for its warm-up and fewest
    samples is skipped, with the prediction as the reason.
    """
    from fastff import VerletList, mm, models, neighbor_list

    if settings.threads:
        set_threads(settings.threads)
    system = bench_system(settings)
    box = system.box
    n = system.num_atoms
    dev = torch.device(settings.device)
    frames = [f.to(dev) for f in trajectory(system.positions, settings.repeat * settings.steps
                                            + 2, settings.seed + 1)]
    cell = None if system.cell is None else system.cell.to(dev)
    species, pbc = system.species.to(dev), system.pbc.to(dev)
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

    loaded = None if settings.model_file is None else load_model(settings.model_file)
    model_cutoff = models.SchNet().cutoff if loaded is None else loaded.cutoff_nm
    timed("neighbor list", be or "auto",
          lambda x: neighbor_list(x, model_cutoff, cell, pbc, backend=be))

    def model_lists() -> VerletList:
        return VerletList(model_cutoff, SKIN, backend=be, compact=True)

    lists = model_lists()
    timed("neighbor list (Verlet)", be or "auto",
          lambda x: lists.update(x, cell, pbc).reverse)  # the mirror index, as models read it
    if box is None:
        _structure_mm_rows(system, frames, settings, timed, rows, on_sample)
    elif float(box.cell[0, 0]) < 2 * MM_CUTOFF:  # reaction field under the minimum image
        edge = float(box.cell[0, 0])
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
            rows.append(_openmm_row(box.to_openmm(cutoff=MM_CUTOFF), box.num_atoms, frames,
                                    settings, on_sample))

    built = {"schnet": models.SchNet, "painn": models.PaiNN}
    named = []
    for name in settings.models:
        if name == "mace":  # mace-torch's own model, original and accelerated: below
            continue
        torch.manual_seed(settings.seed)
        named.append(("SchNet" if name == "schnet" else "PaiNN", built[name](), 1.0))
    if loaded is not None and loaded.kind == "fastff":
        named.append((type(loaded.model).__name__, loaded.model, loaded.nm_per_length))
    for label, model, nm_per_length in named:
        # parameters frozen, as for the force field above and as fastff.ase.Calculator runs a
        # model in MD
        model = model.to(dev, settings.dtype).set_backend(be).requires_grad_(False)
        energy = _model_energy(model, species, cell, pbc, nm_per_length, be)
        timed(f"{label} (fastff)", be or "auto", _energy_forces_step(energy))
        model.set_tabulate(True)
        timed(f"{label} (fastff, tabulated)", be or "auto", _energy_forces_step(energy))
        model.set_tabulate(False)
        if settings.reference:
            need = reference_memory_estimate("painn" if label == "PaiNN" else "schnet", n,
                                             model.num_features, settings.dtype)
            if need > REFERENCE_MEMORY_LIMIT:
                rows.append(_skipped(f"{label} (reference)", "reference", n,
                                     f"needs ~{need / 1e9:.0f} GB", settings, on_sample))
                continue
            model.set_backend("reference")
            timed(f"{label} (reference)", "reference", _energy_forces_step(energy))
    if "mace" in settings.models:
        from fastff import _bench_mace

        _bench_mace.bench_rows(species, cell, settings, timed, rows, on_sample, n, _skipped)
    if loaded is not None and loaded.kind == "torch_geometric":
        _pyg_rows(loaded.model, species, cell, pbc, settings, timed, rows, on_sample, n)
    return rows


def _model_energy(model, species, cell, pbc, nm_per_length: float, backend):
    """energy(x [nm]) of a fastff model in its own length unit, on a compacting Verlet list."""
    from fastff import VerletList

    to_model = 1.0 / nm_per_length
    cell_m = None if cell is None else cell * to_model
    verlet = VerletList(model.cutoff, SKIN * to_model, backend=backend, compact=True)

    def energy(x):
        xm = x if to_model == 1.0 else x * to_model
        return model(species, xm, cell_m, pbc, nl=verlet.update(xm, cell_m, pbc))
    return energy


def _pyg_rows(original, species, cell, pbc, settings: Settings, timed, rows, on_sample,
              n: int) -> None:
    """A torch_geometric SchNet (Angstrom) unmodified, then accelerated (exact, tabulated);
    every side gets the same periodic pairs from fastff's list through interaction_graph."""
    import copy
    import warnings

    from fastff import neighbor_list
    from fastff.interop import pyg

    labels = ("torch_geometric SchNet", "torch_geometric SchNet (fastff)",
              "torch_geometric SchNet (fastff, tabulated)")
    cutoff, be = float(original.cutoff), settings.backend
    cell_a = None if cell is None else cell * 10.0
    if cell_a is not None and bool(pbc.any()):
        widths = _cell_widths(cell_a, pbc)
        if widths < 2 * cutoff:
            why = (f"cell {widths:.3g} A across < 2 x cutoff {cutoff} A: periodic images of one "
                   "pair repeat in torch_geometric's edge list")
            for label in labels:
                rows.append(_skipped(label, "torch_geometric" if label == labels[0] else
                                     be or "auto", n, why, settings, on_sample))
            return

    def graph(pos, batch):
        nl = neighbor_list(pos, cutoff, cell_a, pbc if cell_a is not None else None, backend=be)
        return torch.stack([nl.j, nl.i]), nl.distances(pos, cell_a)

    base = copy.deepcopy(original)
    if isinstance(base, pyg.AcceleratedSchNet):
        pyg.restore(base)
    del base.interaction_graph  # a child module (RadiusInteractionGraph) by default
    base.interaction_graph = graph
    base = base.to(species.device, settings.dtype).requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tabulation note and float32-defaults note
        fast = pyg.accelerate(copy.deepcopy(base), backend=be)
        tabulated = pyg.accelerate(copy.deepcopy(base), tabulate=True, backend=be)
    for label, model, backend in zip(labels, (base, fast, tabulated),
                                     ("torch_geometric", be or "auto", be or "auto"),
                                     strict=True):
        timed(label, backend, _energy_forces_step(_scaled_energy(model, species, 10.0)))


def _scaled_energy(model, species: torch.Tensor, scale: float):
    """energy(x [nm]) of a model called as ``model(species, x * scale)``."""
    def energy(x: torch.Tensor) -> torch.Tensor:
        return model(species, x * scale).sum()
    return energy


def _cell_widths(cell: torch.Tensor, pbc: torch.Tensor) -> float:
    """The smallest distance between opposite faces of the cell along a periodic axis."""
    c = cell.detach().double().cpu()
    volume = abs(float(torch.linalg.det(c)))
    out = math.inf
    for k in range(3):
        if bool(pbc[k]):
            a, b = c[(k + 1) % 3], c[(k + 2) % 3]
            out = min(out, volume / float(torch.linalg.cross(a, b).norm()))
    return out


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
    components -= int("mace" in settings.models and settings.reference)  # MACE: 2 rows
    if settings.model_file is not None:  # a fastff model: 2 or 3 rows; torch_geometric: 3
        components += 3
    return components * per_component


def _openmm_row(system, num_atoms: int, frames, settings: Settings, on_sample) -> Row:
    try:
        import openmm
    except ImportError:
        return _skipped("MM (OpenMM)", "OpenMM CPU", num_atoms, "openmm not installed",
                        settings, on_sample)
    row = Row("MM (OpenMM)", "OpenMM CPU", num_atoms)
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
    labels = [c[:-len(" (fastff)")] for c in by if c.endswith(" (fastff)")
              and not c.startswith(("torch_geometric", "MM"))]
    for label in labels:
        for kind in ("fastff", "fastff, tabulated", "reference"):
            t = by.get(f"{label} ({kind})")
            if t is not None and mm:
                out[f"{label} ({kind}) / MM (fastff)"] = t / mm
        ref = by.get(f"{label} (reference)")
        for kind in ("fastff", "fastff, tabulated"):
            fast = by.get(f"{label} ({kind})")
            if fast and ref:
                out[f"{label}: reference / {kind}"] = ref / fast
    original = by.get("torch_geometric SchNet")
    for kind in ("fastff", "fastff, tabulated"):
        fast = by.get(f"torch_geometric SchNet ({kind})")
        if original and fast:
            out[f"torch_geometric SchNet: original / {kind}"] = original / fast
    if mm and by.get("MM (OpenMM)"):
        out["MM (fastff) / MM (OpenMM)"] = mm / by["MM (OpenMM)"]
    from fastff import _bench_mace

    out.update(_bench_mace.headline(by))
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
