"""How far is an MLFF from MM cost, and how far is fastff from the code people run instead?
The measurements behind ``fastff bench``.

Trajectory: every component computes energy and forces (``-dE/dpositions``) on the same
precomputed frames of real dynamics: velocity Verlet (1 fs) on the MM forces of the built-in
TIP3P water box (:func:`fastff.systems.water_box`, relaxed; :func:`fastff.mm.water_force_field`,
float64) from Maxwell-Boltzmann velocities at 300 K (seeded, no net momentum). Verlet lists
rebuild at the rate that dynamics gives (recorded as rebuilds per step for the model's and MM's
list), so list costs are amortized as in MD. A structure file with an MM force field (a PDB that
OpenMM's amber14/TIP3P parametrises) runs the same dynamics on that force field; one without
falls back to a seeded Gaussian random walk of ``STEP_NM`` per coordinate (said in the output).

A *sample* is ``steps`` consecutive steps timed together; a component runs two warm-up steps
(JIT compilation, first list build, OpenMM context set-up) and then ``repeat`` samples, fewer and
shorter ones for a component that would exceed its time ``budget`` (see ``_time_samples``). The
figure of a component is the MEAN time per atom-step over every timed step, list rebuilds
included; the median over samples and its interquartile range are extra columns. A component
shortened by the budget times the first frames only (its "samples x steps" says how many),
which may come before the first rebuild. Every
headline speed-up names its peer and is a ratio of means measured in the same run.

Components (a list of :class:`Component` specs; ``COMPONENT_HOOKS`` adds more):
    neighbor list   a full list at the model cutoff, rebuilt every step (what an MLFF pays
                    without reuse)
    neighbor list (Verlet)
                    the same pairs from a list at cutoff + skin (0.1 nm, as MM's) reused until
                    an atom moved skin / 2 and compacted to the cutoff every step
                    (:class:`fastff.VerletList` with ``compact=True``): what the model rows pay
    MM (fastff)     LJ + reaction-field Coulomb (cutoff 0.9 nm, Verlet skin 0.1 nm) + bonds +
                    angles (:func:`fastff.mm.water_force_field`), parameters frozen (forces
                    only, as in MD): on CPU the cluster-pair nonbonded path. (Second
                    derivatives of the MM terms, as force-matching training needs, run the
                    reference path, not a fused kernel; MD needs none.)
    MM (OpenMM)     the peer: the same System on OpenMM's CUDA platform when fastff runs on CUDA
                    and OpenMM has it, otherwise its CPU platform (mixed precision); the ratio's
                    name says which
    SchNet          fastff's SchNet with the weights of a ``torch_geometric`` SchNet
                    (:func:`fastff.interop.pyg.from_pyg`), exact filter networks and tabulated
                    (cubic spline) filters, the latter with its force error against the exact
                    network on the same frames; the peer is that ``torch_geometric`` SchNet
                    itself, given the same pairs through its ``interaction_graph`` (their
                    energies are checked to agree at setup, recorded)
    PaiNN           fastff's PaiNN, exact and tabulated; the peer is
                    :class:`fastff._bench_peers.EagerPaiNN`, schnetpack's equations in plain
                    torch with the same weights (agreement checked likewise). fastff's own
                    reference backend is not that peer (a custom op with a hand-written
                    backward)
    ... reference (correctness oracle)
                    the same weights on fastff's torch reference backend: shown, never a
                    speed-up's denominator
Every model row gets its full list at the model cutoff from the same compacting Verlet list run
by fastff's kernels, peers included (the reference backend's own list is an O(N^2) oracle).

The user's system and model instead (``Settings.structure``, ``Settings.model_file``): any file
ASE reads (positions and cell in Angstrom, converted to nm), with MM rows where OpenMM's amber14 /
TIP3P parametrise it (a PDB file with standard residues; fastff's row runs the same System through
:meth:`fastff.mm.ForceField.from_openmm`); and a torch-saved model: a fastff model (rows as above,
in its own units, without a peer) or a ``torch_geometric`` SchNet ("torch_geometric SchNet": the
unmodified model as the peer, then :func:`fastff.interop.pyg.accelerate` on a copy, exact and
tabulated), both sides fed the same periodic pairs through its ``interaction_graph``.
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
#: The trajectory: velocity Verlet at 1 fs (ps) from Maxwell-Boltzmann velocities at 300 K.
MD_TIMESTEP_PS = 0.001
MD_TEMPERATURE = 300.0
#: Boltzmann's constant in kJ/mol/K (OpenMM's value).
BOLTZMANN = 0.00831446261815324
#: Timed frames, evenly spaced, on which a tabulated row's forces meet the exact network's.
FORCE_ERROR_FRAMES = 4
#: A peer and fastff must agree on the energy of the first frame to this relative difference
#: (float32 sums over thousands of atoms round at ~1e-6).
AGREEMENT_TOLERANCE = 1e-4


@dataclass
class Row:
    """One component's timing: seconds per atom-step over samples, and what it computes."""

    component: str
    backend: str
    atoms: int
    per_atom_step: list[float] = field(default_factory=list)
    steps: int = 0  # consecutive MD steps per sample
    samples: int = 0
    skipped: str | None = None  # why the component did not run
    estimate: float | None = None  # predicted s per atom-step of a row skipped for time
    filters: str | None = None  # a model's radial filters: "exact" or "tabulated (cubic spline)"
    peer: str | None = None  # the component this one's headline speed-up is measured against
    ratio: str | None = None  # that speed-up's name, e.g. "SchNet fastff vs torch_geometric"
    force_error: dict | None = None  # tabulated rows: forces against the exact network
    agreement: dict | None = None  # peer rows: energy against fastff's at setup
    oracle: bool = False  # fastff's reference backend: shown, never a ratio's denominator

    @property
    def mean(self) -> float:
        """Mean over every timed step (the samples have ``steps`` steps each)."""
        return statistics.fmean(self.per_atom_step) if self.per_atom_step else math.nan

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
        d.update(mean_s=self.mean, median_s=self.median, iqr_s=self.iqr)
        return d


class Rows(list[Row]):
    """The rows of one :func:`run`, with the trajectory they were timed on
    (``trajectory``: integrator, temperature, energies, Verlet-list rebuilds per step)."""

    trajectory: dict


@dataclass
class Component:
    """What one row times. ``make_step()`` gives a fresh step (its own lists and state) taking
    positions [N, 3] (nm); ``make_energy()``, where given, a fresh energy(positions) for the
    force error of tabulated rows. ``count`` rows are reported by ``samples_per_size`` per spec.

    Extra components (e.g. other models) come from ``COMPONENT_HOOKS``: each hook is called with
    the :class:`BenchContext` and returns a list of Components, timed after the built-in ones.
    """

    name: str
    backend: str
    make_step: Callable[[], Callable[[torch.Tensor], object]] | None = None
    make_energy: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None
    skip: str | None = None  # a reason not to run it
    filters: str | None = None
    peer: str | None = None
    ratio: str | None = None
    exact: str | None = None  # tabulated: the exact component its force error is measured to
    force_scale: float = 1.0  # d positions [nm] / d positions [model unit]
    force_unit: str = "kJ/mol/nm"
    agreement: dict | None = None
    oracle: bool = False


@dataclass
class BenchContext:
    """What component specs are built from: the system on the run's device and dtype, the
    frames every component is timed on, and the settings."""

    settings: Settings
    system: BenchSystem
    species: torch.Tensor
    cell: torch.Tensor | None
    pbc: torch.Tensor
    frames: list[torch.Tensor]
    model_cutoff: float
    predicted_over_budget: Callable[[str], bool]


#: Hooks adding components to every run: ``hook(ctx: BenchContext) -> list[Component]``, and
#: ``COMPONENT_COUNTS`` the matching ``count(settings) -> int`` (rows each adds), for progress.
COMPONENT_HOOKS: list[Callable[[BenchContext], list[Component]]] = []
COMPONENT_COUNTS: list[Callable[[Settings], int]] = []


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


def trajectory(positions: torch.Tensor, steps: int, seed: int,
               step: float = STEP_NM) -> list[torch.Tensor]:
    """``steps`` positions along a seeded random walk of ``step`` per coordinate (the
    fallback of a structure without MM force field, and ``fastff profile``'s frames)."""
    g = torch.Generator().manual_seed(seed)
    out, x = [], positions.detach().clone()
    for _ in range(steps):
        x = x + step * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
        out.append(x)
    return out


def md_trajectory(energy: Callable[[torch.Tensor], torch.Tensor], positions: torch.Tensor,
                  masses: torch.Tensor, frames: int, seed: int, *,
                  timestep: float = MD_TIMESTEP_PS, temperature: float = MD_TEMPERATURE
                  ) -> tuple[list[torch.Tensor], dict]:
    """``frames`` positions (the first is ``positions``) of velocity Verlet dynamics in float64.

    Args:
        energy: potential energy (kJ/mol, scalar) of positions [N, 3] float64 (nm).
        positions: [N, 3] (nm), the start.
        masses: [N] (dalton).
        frames: number of positions returned (frames - 1 steps).
        seed: seed of the Maxwell-Boltzmann velocities at ``temperature`` (K), net momentum
            removed.
        timestep: ps.

    Returns:
        (positions [N, 3] float64 per frame, record) with the kinetic and potential energy
        (kJ/mol) of every frame and the total energy's drift and largest deviation from its
        start.
    """
    x = positions.detach().double().clone()
    m = masses.detach().double().reshape(-1, 1)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64) * torch.sqrt(
        BOLTZMANN * temperature / m)
    v = v - (m * v).sum(0) / m.sum()

    def forces(at: torch.Tensor) -> tuple[torch.Tensor, float]:
        at = at.detach().requires_grad_(True)
        e = energy(at)
        (grad,) = torch.autograd.grad(e, at)
        return -grad.detach(), float(e.detach())

    f, u = forces(x)
    out, kinetic, potential = [x.clone()], [], []
    for k in range(frames):
        kinetic.append(float(0.5 * (m * v * v).sum()))
        potential.append(u)
        if k == frames - 1:
            break
        v = v + 0.5 * timestep * f / m
        x = x + timestep * v
        f, u = forces(x)
        v = v + 0.5 * timestep * f / m
        out.append(x.clone())
    total = [a + b for a, b in zip(kinetic, potential, strict=True)]
    record = {"integrator": "velocity Verlet", "timestep_fs": timestep * 1000.0,
              "temperature_K": temperature, "velocity_seed": seed, "frames": frames,
              "kinetic_energy_kj_mol": kinetic, "potential_energy_kj_mol": potential,
              "total_energy_drift_kj_mol": total[-1] - total[0],
              "total_energy_max_deviation_kj_mol": max(abs(t - total[0]) for t in total)}
    return out, record


def rebuild_rate(frames: list[torch.Tensor], cutoff: float, skin: float, cell, pbc,
                 backend: str | None = None) -> float:
    """Verlet-list rebuilds per step along ``frames`` (after the first build)."""
    from fastff import VerletList

    lists = VerletList(cutoff, skin, backend=backend)
    for x in frames:
        lists.update(x, cell, pbc)
    return (lists.rebuilds - 1) / max(1, len(frames) - 1)


def _frames(system: BenchSystem, mm_system, settings: Settings, model_cutoff: float
            ) -> tuple[list[torch.Tensor], dict]:
    """The frames every component is timed on (run's dtype, CPU) and the trajectory record."""
    from fastff import mm

    count = settings.repeat * settings.steps + 2
    seed = settings.seed + 1
    box = system.box
    ff, masses, label = None, None, None
    if box is not None:
        edge = float(box.cell.diagonal().min())
        # reaction field under the minimum image: a small box gets a shorter cutoff
        cutoff = min(MM_CUTOFF, 0.5 * edge - 1e-3)
        ff = mm.water_force_field(box, cutoff=cutoff, skin=SKIN, dtype=torch.float64)
        masses = box.masses
        label = (f"flexible TIP3P, reaction field at {cutoff:.3g} nm "
                 "(fastff.mm.water_force_field, float64)")
    elif mm_system is not None:
        try:
            ff = mm.ForceField.from_openmm(mm_system, dtype=torch.float64, skin=SKIN)
            masses = torch.tensor([mm_system.getParticleMass(k)._value
                                   for k in range(mm_system.getNumParticles())])
            label = "amber14/TIP3P from the structure file (ForceField.from_openmm, float64)"
        except ValueError:
            ff = None
    md_cell = None if system.cell is None else system.cell.double()
    if ff is None or masses is None:
        frames = [system.positions] + trajectory(system.positions, count - 1, seed)
        record: dict = {"integrator": f"random walk of {STEP_NM} nm per coordinate (no MM "
                        "force field for dynamics)", "frames": count, "seed": seed}
    else:
        md_ff = ff.requires_grad_(False)
        xs, record = md_trajectory(lambda x: md_ff(x, md_cell), system.positions, masses, count,
                                   seed)
        record["force_field"] = label
        frames = [x.to(settings.dtype) for x in xs]
    cell = system.cell
    pbc = system.pbc
    record["rebuilds_per_step"] = {
        f"model list ({model_cutoff:.3g} + {SKIN} nm)": rebuild_rate(
            frames, model_cutoff, SKIN, cell, pbc),
        f"MM list ({MM_CUTOFF} + {SKIN} nm)": rebuild_rate(frames, MM_CUTOFF, SKIN, cell, pbc)}
    return frames, record


def _time_samples(step: Callable[[torch.Tensor], object], frames: list[torch.Tensor],
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


def _forces(energy: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(x).sum(), x)
    return -grad.detach()


def reference_memory_estimate(model_name: str, atoms: int, num_features: int,
                              dtype: torch.dtype) -> float:
    """Rough peak bytes of a model's energy+forces on the reference backend or an eager peer
    (~52 neighbours at 0.5 nm in water; the eager graph keeps ~10 [E, F] tensors per
    interaction)."""
    width = num_features * (3 if model_name == "painn" else 1)
    per_interaction = 10 * 52 * atoms * width * torch.finfo(dtype).bits / 8
    return 3 * per_interaction


def run(settings: Settings, *, on_sample: Callable[[], None] | None = None,
        previous: list[Row] | None = None) -> Rows:
    """Measure every component at ``settings.atoms`` (or on ``settings.structure``); returns
    one :class:`Row` each (a :class:`Rows` list, with ``.trajectory``).

    ``previous``: rows of a smaller size (a sweep). A component whose time per atom-step there,
    scaled to this size, predicts more than ``OVER_BUDGET`` budgets for its warm-up and fewest
    samples is skipped, with the prediction as the reason.
    """
    from fastff import VerletList, models, neighbor_list

    if settings.threads:
        set_threads(settings.threads)
    system = bench_system(settings)
    n = system.num_atoms
    dev = torch.device(settings.device)
    loaded = None if settings.model_file is None else load_model(settings.model_file)
    model_cutoff = models.SchNet().cutoff if loaded is None else loaded.cutoff_nm
    mm_system, mm_why = (None, None) if system.box is not None else _openmm_system(system)
    cpu_frames, record = _frames(system, mm_system, settings, model_cutoff)
    frames = [f.to(dev) for f in cpu_frames]
    cell = None if system.cell is None else system.cell.to(dev)
    species, pbc = system.species.to(dev), system.pbc.to(dev)
    rows = Rows()
    rows.trajectory = record
    be = settings.backend

    before = {r.component: r.mean if not r.skipped else r.estimate for r in previous or []}

    def over_budget(component: str) -> bool:
        per_atom = before.get(component) or 0.0
        return per_atom * n * (2 + MIN_SAMPLES) > OVER_BUDGET * settings.budget

    ctx = BenchContext(settings, system, species, cell, pbc, frames, model_cutoff, over_budget)

    def lists() -> VerletList:
        return VerletList(model_cutoff, SKIN, backend=be, compact=True)

    def verlet_step():
        own = lists()
        return lambda x: own.update(x, cell, pbc).reverse  # the mirror index, as models read it

    specs = [Component("neighbor list", be or "auto",
                       lambda: lambda x: neighbor_list(x, model_cutoff, cell, pbc, backend=be)),
             Component("neighbor list (Verlet)", be or "auto", verlet_step)]
    specs += _mm_components(ctx, mm_system, mm_why)
    for name in settings.models:
        if name == "mace":  # mace-torch's model, unmodified and accelerated
            from fastff import _bench_mace

            specs += _bench_mace.components(ctx)
        else:
            specs += _model_components(ctx, name)
    if loaded is not None and loaded.kind == "fastff":
        specs += _loaded_components(ctx, loaded)
    if loaded is not None and loaded.kind == "torch_geometric":
        specs += _pyg_components(ctx, loaded.model)
    for hook in COMPONENT_HOOKS:
        specs += hook(ctx)

    for spec in specs:
        rows.append(_measure(spec, ctx, specs, before, on_sample))
    return rows


def _measure(spec: Component, ctx: BenchContext, specs: list[Component], before: dict,
             on_sample) -> Row:
    """Time one component (or say why not), then its force error against its exact twin."""
    settings, n = ctx.settings, ctx.system.num_atoms
    meta: dict[str, Any] = {"filters": spec.filters, "peer": spec.peer, "ratio": spec.ratio,
            "agreement": spec.agreement, "oracle": spec.oracle}
    if spec.skip is not None or spec.make_step is None:
        row = _skipped(spec.name, spec.backend, n, spec.skip or "nothing to run", settings,
                       on_sample)
        row.__dict__.update(meta)
        return row
    if ctx.predicted_over_budget(spec.name):
        per_atom = before.get(spec.name) or 0.0
        row = _skipped(spec.name, spec.backend, n, f"over the time budget (~{per_atom * n:.0f}"
                       " s per step predicted)", settings, on_sample)
        row.estimate = per_atom
        row.__dict__.update(meta)
        return row
    row = Row(spec.name, spec.backend, n, **meta)
    _time_samples(spec.make_step(), ctx.frames, settings, row, on_sample)
    exact = next((s for s in specs if s.name == spec.exact), None)
    if exact is not None and exact.make_energy is not None and spec.make_energy is not None:
        row.force_error = _force_error(spec, exact, ctx.frames)
    return row


def _force_error(tabulated: Component, exact: Component, frames: list[torch.Tensor]) -> dict:
    """Forces of ``tabulated`` against ``exact`` on up to ``FORCE_ERROR_FRAMES`` timed frames,
    evenly spaced: largest absolute and RMS component error, in the model's units."""
    assert tabulated.make_energy is not None and exact.make_energy is not None
    picks = sorted({round(2 + k * (len(frames) - 3) / max(1, FORCE_ERROR_FRAMES - 1))
                    for k in range(FORCE_ERROR_FRAMES)}) if len(frames) > 2 else [0]
    e_exact = exact.make_energy()
    reference = [_forces(e_exact, frames[k]) for k in picks]
    e_tab = tabulated.make_energy()
    worst, square, count, largest = 0.0, 0.0, 0, 0.0
    for k, ref in zip(picks, reference, strict=True):
        diff = (_forces(e_tab, frames[k]) - ref).double() * tabulated.force_scale
        worst = max(worst, float(diff.abs().max()))
        square += float((diff * diff).sum())
        count += diff.numel()
        largest = max(largest, float(ref.abs().max()) * tabulated.force_scale)
    return {"against": exact.name, "max_abs": worst, "rms": math.sqrt(square / max(1, count)),
            "max_abs_force": largest, "unit": tabulated.force_unit, "frames": picks}


def _agreement(peer_energy, fast_energy, x: torch.Tensor, against: str) -> dict:
    """Energies of a peer and of fastff at one frame: relative difference and verdict."""
    with torch.no_grad():
        e_peer, e_fast = float(peer_energy(x).sum()), float(fast_energy(x).sum())
    rel = abs(e_peer - e_fast) / max(abs(e_fast), 1e-30)
    return {"against": against, "energy": e_peer, "energy_fastff": e_fast,
            "relative_difference": rel, "tolerance": AGREEMENT_TOLERANCE,
            "ok": rel <= AGREEMENT_TOLERANCE}


def _peer_check(spec: Component, peer_energy, fast_energy, ctx: BenchContext,
                against: str) -> None:
    """Record the peer's agreement with fastff (skipping the check, and the row, where the
    row would be skipped anyway); a peer that disagrees is not timed."""
    if spec.skip is not None or ctx.predicted_over_budget(spec.name):
        return
    spec.agreement = _agreement(peer_energy(), fast_energy(), ctx.frames[0], against)
    if not spec.agreement["ok"]:
        spec.skip = (f"its energy differs from fastff's by "
                     f"{spec.agreement['relative_difference']:.2g} relative (> "
                     f"{AGREEMENT_TOLERANCE:g}): not the same computation")


def _mm_components(ctx: BenchContext, mm_system, mm_why: str | None) -> list[Component]:
    """MM (fastff) and its peer MM (OpenMM) on the water box or the structure's System."""
    from fastff import mm

    settings, system, cell = ctx.settings, ctx.system, ctx.cell
    be, dev = settings.backend, torch.device(settings.device)
    platform_name = _openmm_platform(settings)
    ratio = f"MM fastff vs OpenMM {platform_name}"
    fast = Component("MM (fastff)", be or "auto", peer="MM (OpenMM)", ratio=ratio)
    peer = Component("MM (OpenMM)", f"OpenMM {platform_name}")
    box = system.box
    openmm_system = None
    if box is not None:
        if float(box.cell[0, 0]) < 2 * MM_CUTOFF:  # reaction field under the minimum image
            why = f"box {float(box.cell[0, 0]):.2f} nm < 2 x cutoff {MM_CUTOFF} nm"
            fast.skip = peer.skip = why
        else:
            # forces only, as in MD and as OpenMM computes them: no parameter gradients
            ff = mm.water_force_field(box, cutoff=MM_CUTOFF, skin=SKIN, backend=be).to(
                dev).requires_grad_(False)
            fast.make_step = lambda: _energy_forces_step(lambda x: ff(x, cell))
            openmm_system = box.to_openmm(cutoff=MM_CUTOFF)
    else:
        ff = None
        why = mm_why or "no MM force field"
        if mm_system is not None:
            try:
                ff = mm.ForceField.from_openmm(mm_system, dtype=settings.dtype, skin=SKIN,
                                               backend=be).to(dev).requires_grad_(False)
            except ValueError as err:
                why = f"fastff.mm cannot run this System: {err}"
        if ff is None:
            fast.skip = why
        else:
            fast.make_step = lambda: _energy_forces_step(lambda x: ff(x, cell))
        openmm_system = mm_system
        if mm_system is None:
            peer.skip = mm_why or "no MM force field"
    out = [fast]
    if settings.openmm:
        if openmm_system is not None:
            peer.make_step = lambda: _openmm_step(openmm_system, settings, platform_name)
        out.append(peer)
    else:
        fast.peer = fast.ratio = None
    return out


def _openmm_platform(settings: Settings) -> str:
    """OpenMM's CUDA platform beside a CUDA run where OpenMM has it, else its CPU platform."""
    if not settings.device.startswith("cuda"):
        return "CPU"
    try:
        import openmm

        openmm.Platform.getPlatformByName("CUDA")
        return "CUDA"
    except Exception:  # no openmm, or an OpenMM build without CUDA
        return "CPU"


def _openmm_step(system, settings: Settings, platform_name: str):
    import openmm

    if platform_name == "CUDA":
        properties = {"Precision": "mixed"}
    else:
        threads = settings.threads or torch.get_num_threads()
        properties = {"Threads": str(threads)}
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName(platform_name), properties)

    def step(x: torch.Tensor) -> None:
        ctx.setPositions(x.detach().double().cpu().numpy())
        ctx.getState(getEnergy=True, getForces=True)
    return step


def _configured(model, *, tabulate: bool, backend: str | None, energy_of):
    """A factory of energy functions that first puts ``model`` in the mode they run."""
    def make():
        model.set_tabulate(tabulate).set_backend(backend)
        return energy_of(model)
    return make


def _model_components(ctx: BenchContext, name: str) -> list[Component]:
    """fastff's SchNet or PaiNN (exact and tabulated), its eager peer and the reference
    backend as the oracle, all with the same weights."""
    from fastff import _bench_peers as peers
    from fastff import models

    settings = ctx.settings
    be, dev, dtype = settings.backend, torch.device(settings.device), settings.dtype
    label = "SchNet" if name == "schnet" else "PaiNN"
    torch.manual_seed(settings.seed)
    pyg_model, why_no_peer = None, None
    model: models.AtomisticModel
    if name == "schnet":
        try:
            pyg_model = peers.pyg_schnet()
        except ImportError as err:
            why_no_peer = f"torch_geometric not installed ({err})"
        if pyg_model is not None:
            from fastff.interop.pyg import from_pyg

            model = from_pyg(pyg_model, energy_unit="kJ/mol", length_unit="nm")
        else:
            model = models.SchNet()
        peer_name, peer_backend = "SchNet (torch_geometric)", "torch_geometric"
        ratio = "SchNet fastff vs torch_geometric"
    else:
        model = models.PaiNN()
        peer_name, peer_backend = "PaiNN eager (torch, schnetpack's equations)", "torch eager"
        ratio = "PaiNN fastff vs eager torch (schnetpack's equations)"
    # parameters frozen, as for the force field and as fastff.ase.Calculator runs a model in MD
    model = model.to(dev, dtype).requires_grad_(False)

    def energy_of(m):
        return _model_energy(m, ctx.species, ctx.cell, ctx.pbc, 1.0, be)

    exact = _configured(model, tabulate=False, backend=be, energy_of=energy_of)
    tab = _configured(model, tabulate=True, backend=be, energy_of=energy_of)
    fast = f"{label} (fastff)"
    out = [Component(fast, be or "auto", lambda: _energy_forces_step(exact()), exact,
                     filters="exact", peer=peer_name, ratio=ratio),
           Component(f"{label} (fastff, tabulated)", be or "auto",
                     lambda: _energy_forces_step(tab()), tab, filters="tabulated (cubic spline)",
                     peer=peer_name, ratio=ratio.replace(" fastff ", " fastff tabulated "),
                     exact=fast)]
    need = reference_memory_estimate(name, ctx.system.num_atoms, model.num_features, dtype)
    too_big = f"needs ~{need / 1e9:.0f} GB" if need > REFERENCE_MEMORY_LIMIT else None
    peer = Component(peer_name, peer_backend, filters="exact", skip=too_big or why_no_peer)
    if name == "schnet" and pyg_model is not None:
        import warnings

        from fastff import VerletList

        pyg_model = pyg_model.to(dev, dtype).requires_grad_(False)

        def pyg_energy():
            lists = VerletList(ctx.model_cutoff, SKIN, backend=be, compact=True)
            del pyg_model.interaction_graph  # a child module, or the previous graph
            pyg_model.interaction_graph = peers.pair_graph(lists, ctx.cell, ctx.pbc)
            return lambda x: pyg_model(ctx.species, x).sum()
        peer.make_step = lambda: _energy_forces_step(pyg_energy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _peer_check(peer, pyg_energy, exact, ctx, fast)
    elif name == "painn":
        eager = peers.EagerPaiNN.from_fastff(model).to(dev).requires_grad_(False)

        def painn_energy():
            from fastff import VerletList

            lists = VerletList(ctx.model_cutoff, SKIN, backend=be, compact=True)

            def energy(x):
                nl = lists.update(x, ctx.cell, ctx.pbc)
                return eager(ctx.species, nl.vectors(x, ctx.cell), nl)
            return energy
        peer.make_step = lambda: _energy_forces_step(painn_energy())
        _peer_check(peer, painn_energy, exact, ctx, fast)
    out.append(peer)
    if settings.reference:
        oracle = _configured(model, tabulate=False, backend="reference", energy_of=energy_of)
        out.append(Component(f"{label} reference (correctness oracle)", "reference",
                             lambda: _energy_forces_step(oracle()), filters="exact",
                             skip=too_big, oracle=True))
    return out


def _loaded_components(ctx: BenchContext, loaded: LoadedModel) -> list[Component]:
    """A fastff model from a file: exact, tabulated and the reference oracle (no peer)."""
    settings = ctx.settings
    be, dev = settings.backend, torch.device(settings.device)
    model = loaded.model.to(dev, settings.dtype).requires_grad_(False)
    label = type(model).__name__

    def energy_of(m):
        return _model_energy(m, ctx.species, ctx.cell, ctx.pbc, loaded.nm_per_length, be)

    exact = _configured(model, tabulate=False, backend=be, energy_of=energy_of)
    tab = _configured(model, tabulate=True, backend=be, energy_of=energy_of)
    unit = f"{model.energy_unit or 'energy'}/{model.length_unit}"
    scale = loaded.nm_per_length
    out = [Component(f"{label} (fastff)", be or "auto", lambda: _energy_forces_step(exact()),
                     exact, filters="exact", force_scale=scale, force_unit=unit),
           Component(f"{label} (fastff, tabulated)", be or "auto",
                     lambda: _energy_forces_step(tab()), tab, filters="tabulated (cubic spline)",
                     exact=f"{label} (fastff)", force_scale=scale, force_unit=unit)]
    if settings.reference:
        kind = "painn" if label == "PaiNN" else "schnet"
        need = reference_memory_estimate(kind, ctx.system.num_atoms, model.num_features,
                                         settings.dtype)
        oracle = _configured(model, tabulate=False, backend="reference", energy_of=energy_of)
        out.append(Component(f"{label} reference (correctness oracle)", "reference",
                             lambda: _energy_forces_step(oracle()), filters="exact",
                             skip=f"needs ~{need / 1e9:.0f} GB"
                             if need > REFERENCE_MEMORY_LIMIT else None, oracle=True))
    return out


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


def _pyg_components(ctx: BenchContext, original) -> list[Component]:
    """A torch_geometric SchNet (Angstrom) unmodified (the peer), then accelerated (exact,
    tabulated); every side gets the same periodic pairs from fastff's list through
    interaction_graph."""
    import copy
    import warnings

    from fastff import neighbor_list
    from fastff.interop import pyg

    settings, species, pbc = ctx.settings, ctx.species, ctx.pbc
    labels = ("torch_geometric SchNet", "torch_geometric SchNet (fastff)",
              "torch_geometric SchNet (fastff, tabulated)")
    cutoff, be = float(original.cutoff), settings.backend
    backends = ("torch_geometric", be or "auto", be or "auto")
    cell_a = None if ctx.cell is None else ctx.cell * 10.0
    if cell_a is not None and bool(pbc.any()):
        widths = _cell_widths(cell_a, pbc)
        if widths < 2 * cutoff:
            why = (f"cell {widths:.3g} A across < 2 x cutoff {cutoff} A: periodic images of one "
                   "pair repeat in torch_geometric's edge list")
            return [Component(label, backend, skip=why)
                    for label, backend in zip(labels, backends, strict=True)]

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
    ratio = "torch_geometric SchNet accelerated (fastff) vs torch_geometric"
    out = []
    for label, model, backend in zip(labels, (base, fast, tabulated), backends, strict=True):
        def make(model=model):
            return _scaled_energy(model, species, 10.0)
        def step(make=make):
            return _energy_forces_step(make())
        spec = Component(label, backend, step, make,
                         filters="tabulated (cubic spline)" if "tabulated" in label else "exact",
                         force_scale=0.1, force_unit="model energy/A")
        if label != labels[0]:
            spec.peer = labels[0]
            spec.ratio = ratio.replace("(fastff)", "(fastff, tabulated)") \
                if "tabulated" in label else ratio
        if "tabulated" in label:
            spec.exact = labels[1]
        out.append(spec)
    return out


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
    # the two neighbor-list rows and MM (fastff), OpenMM, then per model: fastff, tabulated,
    # the eager peer and the reference oracle
    fastff_models = [m for m in settings.models if m != "mace"]  # MACE: 2 rows
    components = (3 + int(settings.openmm) + len(fastff_models) * (3 + int(settings.reference))
                  + 2 * int("mace" in settings.models))
    if settings.model_file is not None:  # a fastff model: 2 or 3 rows; torch_geometric: 3
        try:
            kind = load_model(settings.model_file).kind
        except ValueError:
            kind = "fastff"
        components += 3 if kind == "torch_geometric" else 2 + int(settings.reference)
    components += sum(count(settings) for count in COMPONENT_COUNTS)
    return components * per_component


def set_threads(threads: int) -> None:
    """Threads for torch and numba (numba cannot exceed the count it started with)."""
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore
    except ImportError:
        pass


def headline(rows: list[Row]) -> dict[str, float]:
    """Ratios of means: each fastff model row's cost over MM (fastff)'s ("X (fastff) / MM
    (fastff)"), and each row's speed-up over its named peer ("SchNet fastff vs torch_geometric":
    peer time / fastff time). The reference oracle is no ratio's denominator."""
    by = {r.component: r for r in rows if not r.skipped and r.per_atom_step}
    out: dict[str, float] = {}
    mm = by.get("MM (fastff)")
    for r in by.values():
        if (mm is not None and r.component.endswith(("(fastff)", "(fastff, tabulated)"))
                and not r.component.startswith(("MM", "torch_geometric"))):
            out[f"{r.component} / MM (fastff)"] = r.mean / mm.mean
    for r in by.values():
        peer = by.get(r.peer or "")
        if peer is not None and r.ratio and not peer.oracle:
            out[r.ratio] = peer.mean / r.mean
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
            "commit": _git_commit(),
            # a shared machine's load moves every row: recorded beside the figures
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "versions": versions, "settings": s, "skin_nm": SKIN,
            "malloc_tuned": malloc_tuned(),
            "openmp_environment": {k: os.environ.get(k)
                                   for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}}


def _git_commit() -> str | None:
    """The commit of the fastff source tree (with "+changes" when files differ), or None."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
