"""Built-in test systems: a box of flexible TIP3P water, MD-ready, and a uniform random gas.

Both are generated in code from a seed (no files, no downloads) and are deterministic for a
given seed. Lengths are nm, masses dalton, charges e, energies kJ/mol (OpenMM's units). The
water box is relaxed on its MM force field (:func:`fastff.mm.water_force_field`), so this
module builds on :mod:`fastff.mm`; mm reads a box through a protocol and never imports it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastff._checks import no_checks
from fastff.mm._terms import Exceptions, nonbonded
from fastff.mm.water import water_force_field
from fastff.neighbors import neighbor_list

# Flexible TIP3P as in OpenMM's data/tip3p.xml and data/amber14/tip3p.xml (OpenMM 8): masses
# from <AtomTypes>, charges / sigma / epsilon from <NonbondedForce> (amber14 keeps the charges
# in <Residue>), bond and angle from <HarmonicBondForce> / <HarmonicAngleForce>.
TIP3P_MASS_O = 15.99943  # dalton
TIP3P_MASS_H = 1.007947
TIP3P_CHARGE_O = -0.834  # e
TIP3P_CHARGE_H = 0.417
TIP3P_SIGMA_O = 0.31507524065751241  # nm
TIP3P_SIGMA_H = 1.0  # any value: epsilon_H = 0
TIP3P_EPSILON_O = 0.635968  # kJ/mol
TIP3P_EPSILON_H = 0.0
TIP3P_BOND_R0 = 0.09572  # nm
TIP3P_BOND_K = 462750.4  # kJ/mol/nm^2
TIP3P_ANGLE_THETA0 = 1.82421813418  # rad (104.52 degrees)
TIP3P_ANGLE_K = 836.8  # kJ/mol/rad^2

#: Default density of :func:`water_box` (g/cm^3): TIP3P liquid near 300 K and 1 bar with a
#: reaction field (published TIP3P densities at 298-300 K span about 0.98-1.00 g/cm^3); it
#: gives 32.96 molecules/nm^3.
TIP3P_DENSITY = 0.986

_AVOGADRO = 6.02214076e23
# Closest intermolecular approach allowed when molecules are placed (nm): O...O below 0.25 nm
# is deep in the O-O repulsion (LJ ~ +130 kJ/mol at 0.21 nm); H...O below 0.17 nm is shorter
# than any hydrogen bond (TIP3P's H has no LJ core, so nothing else keeps the pair apart).
_MIN_OO = 0.25
_MIN_OTHER = 0.17
_JITTER = 0.01  # nm, uniform per axis around each lattice site
_MAX_PLACEMENT_ROUNDS = 200
# Relaxation: steepest descent of rigid molecules (net force moves the centroid, torque turns
# the molecule) on the MM energy with a 0.6 nm reaction-field cutoff (under a third of the
# pairs of 0.9 nm; the short-range contacts are what must relax). Rigid moves are not limited
# by the O-H bond stiffness, which bounds the step of a flexible minimiser: 30 steps take 1,000
# molecules from about -7 to about -41 kJ/mol per molecule (measured at 0.9 nm). A 0.03 nm
# step cap left transient O...O contacts at 0.243 nm after 30 steps; 0.02 nm left >= 0.249 nm
# (37 boxes of 200-240 molecules).
_RELAX_CUTOFF = 0.6
_RELAX_STEPS = 30
_MAX_MOVE = 0.02  # nm
# float32 rounds a 4 nm coordinate by 2.4e-7 nm; the list reaches this much past the cutoff
_LIST_PAD = 1e-4  # nm
# Boxes up to this size relax on the reference nonbonded term, which needs no compilation
# (1.2 s at 1,000 molecules on 2 cores); larger ones on the fused cluster kernels (1.1 s at
# 10,000 molecules against 12.6 s for the reference), which compile for ~16 s once.
_REFERENCE_RELAX_MOLECULES = 2000


@dataclass
class WaterBox:
    """A cubic periodic box of flexible TIP3P water (atoms ordered O, H, H, O, H, H, ...).

    Attributes:
        positions: [N, 3] (nm), molecules whole (atoms of a molecule are never split by
            wrapping), centroids inside the box.
        cell: [3, 3] (nm), rows are lattice vectors (cubic).
        species: int64 [N], atomic numbers (8, 1, 1, ...).
        masses: [N] (dalton). charges: [N] (e). sigma: [N] (nm). epsilon: [N] (kJ/mol).
        bonds: int64 [2M, 2], (O, H) pairs. bond_k: [2M] (kJ/mol/nm^2). bond_r0: [2M] (nm).
        angles: int64 [M, 3], (H, O, H). angle_k: [M] (kJ/mol/rad^2). angle_theta0: [M] (rad).
        exclusions: int64 [3M, 2], the intramolecular pairs (O-H1, O-H2, H1-H2), excluded from
            the nonbonded interactions.

    Every float tensor has the dtype the box was made with.
    """

    positions: Tensor
    cell: Tensor
    species: Tensor
    masses: Tensor
    charges: Tensor
    sigma: Tensor
    epsilon: Tensor
    bonds: Tensor
    bond_k: Tensor
    bond_r0: Tensor
    angles: Tensor
    angle_k: Tensor
    angle_theta0: Tensor
    exclusions: Tensor

    @property
    def num_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_molecules(self) -> int:
        return int(self.angles.shape[0])

    @property
    def pbc(self) -> Tensor:
        """bool [3], all True."""
        return torch.ones(3, dtype=torch.bool)

    def to_openmm(self, *, cutoff: float = 0.9, method: str = "reaction_field",
                  dielectric: float = 78.3, switch_distance: float | None = None,
                  dispersion_correction: bool = False):
        """The same force field as an ``openmm.System``.

        NonbondedForce (CutoffPeriodic: reaction field within ``cutoff``), with one exception
        per exclusion (chargeProd 0, sigma 1, epsilon 0; minimum-image exceptions),
        HarmonicBondForce and HarmonicAngleForce, both with periodic boundary conditions
        (minimum-image bond vectors, so positions may be wrapped per atom),
        and the default periodic box set to ``cell``. Positions are not part of a System: pass
        ``positions`` (nm) to the Context.

        Args:
            cutoff: nm, at most half the box edge (OpenMM's limit).
            method: "reaction_field", the only Coulomb form of CutoffPeriodic.
            dielectric: reaction-field dielectric constant.
            switch_distance: nm, Lennard-Jones switching from here to the cutoff; None: none.
            dispersion_correction: OpenMM's long-range Lennard-Jones correction.

        Raises:
            ImportError: openmm is not installed.
            ValueError: unsupported method, or cutoff above half the box edge.
        """
        try:
            import openmm
        except ImportError as err:
            raise ImportError("WaterBox.to_openmm needs the openmm package "
                              "(pip install openmm)") from err
        if method != "reaction_field":
            raise ValueError(f"WaterBox.to_openmm: method must be 'reaction_field' (OpenMM's "
                             f"CutoffPeriodic), got {method!r}")
        edge = float(self.cell.double().diagonal().min())
        if not 0 < cutoff <= 0.5 * edge:
            raise ValueError(f"WaterBox.to_openmm: cutoff must be in (0, {0.5 * edge:.6g}] nm "
                             f"(half the box edge), got {cutoff}")
        system = openmm.System()
        for m in self.masses.double().tolist():
            system.addParticle(m)
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row)
                                              for row in self.cell.double().tolist()])
        nb = openmm.NonbondedForce()
        nb.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
        nb.setCutoffDistance(cutoff)
        nb.setReactionFieldDielectric(dielectric)
        nb.setUseDispersionCorrection(dispersion_correction)
        nb.setExceptionsUsePeriodicBoundaryConditions(True)
        if switch_distance is not None:
            nb.setUseSwitchingFunction(True)
            nb.setSwitchingDistance(switch_distance)
        for q, s, e in zip(self.charges.double().tolist(), self.sigma.double().tolist(),
                           self.epsilon.double().tolist(), strict=True):
            nb.addParticle(q, s, e)
        for i, j in self.exclusions.tolist():
            nb.addException(i, j, 0.0, 1.0, 0.0)
        bonds = openmm.HarmonicBondForce()
        for (i, j), r0, k in zip(self.bonds.tolist(), self.bond_r0.double().tolist(),
                                 self.bond_k.double().tolist(), strict=True):
            bonds.addBond(i, j, r0, k)
        bonds.setUsesPeriodicBoundaryConditions(True)
        angles = openmm.HarmonicAngleForce()
        for (i, j, k), theta0, k_a in zip(self.angles.tolist(),
                                          self.angle_theta0.double().tolist(),
                                          self.angle_k.double().tolist(), strict=True):
            angles.addAngle(i, j, k, theta0, k_a)
        angles.setUsesPeriodicBoundaryConditions(True)
        for force in (nb, bonds, angles):
            system.addForce(force)
        return system

    def to_ase(self):
        """An ``ase.Atoms`` (Angstrom positions and cell, pbc True, TIP3P masses and charges).

        Raises:
            ImportError: ase is not installed.
        """
        try:
            import ase
        except ImportError as err:
            raise ImportError("WaterBox.to_ase needs the ase package (pip install ase)") from err
        return ase.Atoms(numbers=self.species.tolist(),
                         positions=self.positions.double().numpy() * 10.0,
                         cell=self.cell.double().numpy() * 10.0, pbc=True,
                         masses=self.masses.double().numpy(),
                         charges=self.charges.double().numpy())


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_density(value, name: str, unit: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a finite number > 0 ({unit}), got {value!r}")
    return float(value)


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return int(seed)


def _molecule_frame() -> np.ndarray:
    """[3, 3] O, H1, H2 at the TIP3P geometry, oxygen at the origin (nm)."""
    half = 0.5 * TIP3P_ANGLE_THETA0
    return np.array([[0.0, 0.0, 0.0],
                     [TIP3P_BOND_R0 * math.sin(half), TIP3P_BOND_R0 * math.cos(half), 0.0],
                     [-TIP3P_BOND_R0 * math.sin(half), TIP3P_BOND_R0 * math.cos(half), 0.0]])


def _random_rotations(rng: np.random.Generator, count: int) -> np.ndarray:
    """[count, 3, 3] uniformly random rotation matrices (normalised Gaussian quaternions)."""
    q = rng.standard_normal((count, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


# Lattices with 1, 2 and 4 sites per cubic cell (fractional basis) and their nearest-neighbour
# distance in cell edges. Choosing among them per n keeps the closest sites at >= 0.89 of the
# mean molecular spacing (>= 0.28 nm at liquid density) for every n but 5 (0.86); a simple
# cubic lattice alone falls to k / (k + 1) of it when n = k^3 + 1 (0.21 nm for n = 9).
_LATTICES = (
    (np.zeros((1, 3)), 1.0),
    (np.array([[0, 0, 0], [0.5, 0.5, 0.5]]), math.sqrt(3) / 2),
    (np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]), math.sqrt(0.5)),
)


def _lattice_sites(n: int, edge: float) -> tuple[np.ndarray, float]:
    """Sites [S, 3] (nm, S >= n) of the cubic, body-centred or face-centred lattice whose
    nearest-neighbour distance is the largest, and that distance."""
    best = None
    for basis, nearest in _LATTICES:
        m = max(1, math.ceil(round((n / len(basis)) ** (1 / 3), 9)))
        if best is None or nearest / m > best[2] / best[1]:
            best = (basis, m, nearest)
    assert best is not None
    basis, m, nearest = best
    cells = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 1, 3)
    # a quarter cell in from the faces: molecules start whole and inside the box
    return ((cells + basis[None]).reshape(-1, 3) + 0.25) * (edge / m), nearest * edge / m


def _site_pairs(sites: np.ndarray, edge: float, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Unordered pairs (a < b) of sites closer than ``reach`` (minimum image), by binning the
    sites into cells of edge >= reach: O(S)."""
    bins = max(1, int(edge / reach))
    cell = np.floor(sites / (edge / bins)).astype(np.int64) % bins
    key = (cell[:, 0] * bins + cell[:, 1]) * bins + cell[:, 2]
    order = np.argsort(key, kind="stable")
    start = np.searchsorted(key[order], np.arange(bins ** 3 + 1))
    firsts, seconds = [], []
    offsets = {tuple(o) for o in np.array(np.meshgrid(*[(-1, 0, 1)] * 3)).T.reshape(-1, 3) % bins}
    for off in offsets:  # at most 27 neighbour cells; fewer distinct ones in tiny boxes
        other = (cell + np.array(off)) % bins
        okey = (other[:, 0] * bins + other[:, 1]) * bins + other[:, 2]
        counts = start[okey + 1] - start[okey]
        a = np.repeat(np.arange(len(sites)), counts)
        b = order[np.repeat(start[okey], counts)
                  + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)]
        firsts.append(a)
        seconds.append(b)
    a, b = np.concatenate(firsts), np.concatenate(seconds)
    d = sites[b] - sites[a]
    d -= edge * np.round(d / edge)
    keep = (a < b) & ((d * d).sum(1) < reach * reach)
    return a[keep], b[keep]


def _contacts(atoms: np.ndarray, first: np.ndarray, second: np.ndarray, edge: float):
    """Mask over pairs (first, second) of molecules with any two atoms too close."""
    d = atoms[second][:, None, :, :] - atoms[first][:, :, None, :]  # [P, 3, 3, 3]
    d -= edge * np.round(d / edge)
    r2 = (d * d).sum(-1)
    limit = np.full((3, 3), _MIN_OTHER ** 2)
    limit[0, 0] = _MIN_OO ** 2
    return (r2 < limit).any(axis=(1, 2))


def _place_molecules(n: int, edge: float, rng: np.random.Generator) -> np.ndarray:
    """[n, 3, 3] atom positions: oxygens on a jittered lattice (random sites left empty),
    random orientations about the oxygen, and every intermolecular contact removed by
    redrawing one molecule of the pair (O(n) per round)."""
    sites, nearest = _lattice_sites(n, edge)
    if len(sites) > n:
        sites = sites[np.sort(rng.choice(len(sites), n, replace=False))]
    frame = _molecule_frame()  # turned about the oxygen: O...O is set by the lattice alone
    reach = max(_MIN_OO, _MIN_OTHER + 2 * TIP3P_BOND_R0) + 2 * math.sqrt(3) * _JITTER
    first, second = _site_pairs(sites, edge, reach)

    def draw(index):
        oxygens = sites[index] + rng.uniform(-_JITTER, _JITTER, (len(index), 3))
        turns = _random_rotations(rng, len(index))
        return oxygens[:, None, :] + np.einsum("mij,aj->mai", turns, frame)

    atoms = draw(np.arange(n))
    changed = np.ones(n, dtype=bool)
    for _ in range(_MAX_PLACEMENT_ROUNDS):
        active = changed[first] | changed[second]
        f, s = first[active], second[active]
        hit = _contacts(atoms, f, s, edge)
        if not hit.any():
            return atoms
        # redraw one molecule per touching pair, chosen by a random priority, so a molecule
        # that is not the problem is not moved forever
        priority = rng.permutation(n)
        f, s = f[hit], s[hit]
        redo = np.unique(np.where(priority[f] > priority[s], f, s))
        atoms[redo] = draw(redo)
        changed[:] = False
        changed[redo] = True
    raise RuntimeError(f"water_box: could not place {n} molecules without intermolecular "
                       f"contacts (O-O >= {_MIN_OO} nm, others >= {_MIN_OTHER} nm) in a "
                       f"{edge:.4g} nm box (closest lattice sites {nearest:.3g} nm); lower the "
                       "density")


def _build(positions: Tensor, edge: float, dtype: torch.dtype) -> WaterBox:
    n = positions.shape[0] // 3
    first = torch.arange(n, dtype=torch.int64) * 3
    def per_atom(o: float, h: float) -> Tensor:
        return torch.tensor([o, h, h], dtype=dtype).repeat(n)

    return WaterBox(
        positions=positions.to(dtype),
        cell=torch.eye(3, dtype=dtype) * edge,
        species=torch.tensor([8, 1, 1], dtype=torch.int64).repeat(n),
        masses=per_atom(TIP3P_MASS_O, TIP3P_MASS_H),
        charges=per_atom(TIP3P_CHARGE_O, TIP3P_CHARGE_H),
        sigma=per_atom(TIP3P_SIGMA_O, TIP3P_SIGMA_H),
        epsilon=per_atom(TIP3P_EPSILON_O, TIP3P_EPSILON_H),
        bonds=torch.stack([first, first + 1, first, first + 2], 1).reshape(-1, 2),
        bond_k=torch.full((2 * n,), TIP3P_BOND_K, dtype=dtype),
        bond_r0=torch.full((2 * n,), TIP3P_BOND_R0, dtype=dtype),
        angles=torch.stack([first + 1, first, first + 2], 1),
        angle_k=torch.full((n,), TIP3P_ANGLE_K, dtype=dtype),
        angle_theta0=torch.full((n,), TIP3P_ANGLE_THETA0, dtype=dtype),
        exclusions=torch.stack([first, first + 1, first, first + 2, first + 1, first + 2],
                               1).reshape(-1, 2),
    )


def _rotations(w: Tensor) -> Tensor:
    """[M, 3, 3] rotation matrices of rotation vectors w [M, 3] (Rodrigues' formula)."""
    angle = w.norm(dim=1).clamp_min(1e-300)[:, None, None]
    k = w / angle[:, :, 0]
    zero = torch.zeros_like(k[:, 0])
    cross = torch.stack([torch.stack([zero, -k[:, 2], k[:, 1]], -1),
                         torch.stack([k[:, 2], zero, -k[:, 0]], -1),
                         torch.stack([-k[:, 1], k[:, 0], zero], -1)], 1)
    eye = torch.eye(3, dtype=w.dtype).expand_as(cross)
    return eye + torch.sin(angle) * cross + (1 - torch.cos(angle)) * (cross @ cross)


def _relax(box: WaterBox, steps: int) -> Tensor:
    """Rigid-molecule steepest descent on the MM energy (float64, short cutoff); returns new
    positions [N, 3] with every molecule at its starting geometry."""
    edge = float(box.cell[0, 0])
    cutoff = min(_RELAX_CUTOFF, 0.499 * edge)  # reaction field: at most half the box edge
    fused = box.positions.shape[0] > 3 * _REFERENCE_RELAX_MOLECULES
    energy_and_forces = _with_forces((_fused_energy if fused else _reference_energy)(box, cutoff))
    atoms = box.positions.detach().reshape(-1, 3, 3).clone()
    # beside the fused kernels torch's work is O(N) bookkeeping; with one torch thread its
    # OpenMP barriers cannot stall on cores shared with numba's workers or other processes
    # (a 60,000-element argsort measured 280 ms with 2 busy threads, 2.4 ms with one)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if fused else threads)
    try:
        with no_checks():
            atoms = _descend(energy_and_forces, atoms, steps)
    finally:
        torch.set_num_threads(threads)
    return atoms.reshape(-1, 3)


def _fused_energy(box: WaterBox, cutoff: float):
    """Energy of positions [N, 3] by the fused cluster kernels."""
    ff = water_force_field(box, cutoff=cutoff, skin=0.1, dtype=torch.float64, bonded=False)
    ff.requires_grad_(False)  # no parameter gradients: positions only
    return ff


def _reference_energy(box: WaterBox, cutoff: float):
    """Energy of positions [N, 3] by the float64 reference term, on pairs from a float32 cell
    list (padded by _LIST_PAD for its rounding): the kernels that a float32 model's first call
    compiles anyway, so a small box compiles no MM kernel."""
    zeros = torch.zeros(box.exclusions.shape[0], dtype=torch.float64)
    excluded = Exceptions(box.exclusions, zeros, torch.ones_like(zeros), zeros)
    cell32 = box.cell.to(torch.float32)

    def reference(x: Tensor) -> Tensor:
        pairs = neighbor_list(x.detach().to(torch.float32), cutoff + _LIST_PAD, cell32,
                              half=True)
        return nonbonded(x, pairs, box.charges, box.sigma, box.epsilon, cutoff=cutoff,
                         cell=box.cell, exceptions=excluded, backend="reference")

    return reference


def _with_forces(energy_of):
    """(energy, forces [M, 3, 3]) of molecules [M, 3, 3], from an energy of positions [N, 3]."""

    def energy_and_forces(atoms: Tensor) -> tuple[float, Tensor]:
        x = atoms.reshape(-1, 3).clone().requires_grad_(True)
        energy = energy_of(x)
        (grad,) = torch.autograd.grad(energy, x)
        return float(energy.detach()), -grad.reshape(-1, 3, 3)

    return energy_and_forces


def _descend(energy_and_forces, atoms: Tensor, steps: int) -> Tensor:
    """Steepest descent of rigid molecules [M, 3, 3]: each step moves no atom more than
    ``move`` (at most _MAX_MOVE); a step that raises the energy is retried at half."""
    move = _MAX_MOVE
    energy, forces = energy_and_forces(atoms)
    for _ in range(steps):
        centre = atoms.mean(dim=1, keepdim=True)
        arm = atoms - centre
        # unit masses: translation by the mean force, rotation by torque / (sum of r^2)
        shift = forces.mean(dim=1)
        spin = (torch.linalg.cross(arm, forces, dim=2).sum(dim=1)
                / (arm * arm).sum(dim=(1, 2))[:, None])
        reach = shift.norm(dim=1) + spin.norm(dim=1) * arm.norm(dim=2).amax(dim=1)
        scale = move / max(float(reach.max()), 1e-300)
        trial = (centre + scale * shift[:, None, :]
                 + arm @ _rotations(scale * spin).transpose(1, 2))
        trial_energy, trial_forces = energy_and_forces(trial)
        if trial_energy < energy:
            atoms, energy, forces = trial, trial_energy, trial_forces
            move = min(1.2 * move, _MAX_MOVE)
        else:
            move *= 0.5
    return atoms


def wrap_molecules(positions: Tensor, edge: float) -> Tensor:
    """Water molecules (atoms O, H, H, ...) kept whole, each translated by whole box edges so
    that its centroid lies in [0, edge)^3 (nm)."""
    atoms = positions.reshape(-1, 3, 3)
    shift = torch.floor(atoms.mean(dim=1, keepdim=True) / edge) * edge
    return (atoms - shift).reshape(-1, 3)


def water_box(n_molecules: int = 1000, *, seed: int = 0, dtype: torch.dtype = torch.float32,
              density: float = TIP3P_DENSITY, relax_steps: int = _RELAX_STEPS) -> WaterBox:
    """A cubic box of flexible TIP3P water, ready for NVE molecular dynamics with a 0.5 fs step.

    Generation, in float64 and deterministic for a seed (bitwise with one kernel backend): the
    box edge is sized for ``density``. Oxygens sit on a simple, body-centred or face-centred
    cubic lattice (whichever has the largest nearest-neighbour distance with at least
    ``n_molecules`` sites, >= 0.27 nm at the default density; extra sites are left empty at
    random) with +-0.01 nm uniform jitter, and each molecule, at the exact TIP3P geometry, gets
    a uniformly random orientation. A molecule with an atom within 0.25 nm (O...O) or 0.17 nm
    (any other pair) of another molecule's is redrawn until no such contact is left (neighbour
    search on a grid: O(N)). Then ``relax_steps`` steps of steepest descent of rigid molecules
    (translation by the net force, rotation by the torque; no atom moves more than 0.02 nm a
    step) on the nonbonded MM energy of :func:`fastff.mm.water_force_field` with a 0.6 nm
    reaction-field cutoff (a rigid molecule's bonded forces have no net force or torque). The
    default 30 steps take the energy (at 0.9 nm) from about -7 to about -41 kJ/mol per
    molecule; bonds and angles stay exactly at r0 and theta0 (the flexible bonds then take up
    the hydrogen-bond forces within the first MD steps).

    Cost: O(N), almost all of it in the relaxation. Up to 2,000 molecules it evaluates the
    float64 reference nonbonded term on a float32 cell list (about 1.2 s for 1,000 molecules
    on 2 cores), so a fresh install compiles only the cell list, which a float32 model's first
    call needs anyway; larger boxes use the fused cluster kernels (about 1.1 s for 10,000
    molecules, plus about 16 s once to compile them). Pass a smaller ``relax_steps`` (0 skips
    the relaxation) for large benchmark boxes.

    Args:
        n_molecules: M, number of water molecules (N = 3M atoms), a positive int.
        seed: seed of the numpy Generator that draws the box (int >= 0).
        dtype: torch.float32 or torch.float64 for every float tensor. The box is generated in
            float64, so both dtypes give the same positions up to rounding.
        density: g/cm^3 (> 0); the default 0.986 is TIP3P liquid near 300 K (32.96
            molecules/nm^3). Densities well above the liquid's cannot be placed without contacts
            and raise RuntimeError.
        relax_steps: rigid steepest-descent steps (int >= 0).

    Returns:
        :class:`WaterBox`, atoms ordered O, H, H per molecule, molecules whole.

    Raises:
        ValueError / TypeError: an argument out of range, naming it.
        RuntimeError: the molecules could not be placed without contacts (density too high).
    """
    n = _check_count(n_molecules, "n_molecules")
    seed = _check_seed(seed)
    dtype = _check_dtype(dtype)
    density = _check_density(density, "density", "g/cm^3")
    if isinstance(relax_steps, bool) or not isinstance(relax_steps, numbers.Integral) \
            or relax_steps < 0:
        raise ValueError(f"relax_steps must be an int >= 0, got {relax_steps!r}")
    molar_mass = TIP3P_MASS_O + 2 * TIP3P_MASS_H  # g/mol
    per_nm3 = density * 1e-21 * _AVOGADRO / molar_mass  # molecules / nm^3
    edge = (n / per_nm3) ** (1 / 3)
    rng = np.random.default_rng(seed)
    atoms = _place_molecules(n, edge, rng)
    positions = torch.from_numpy(atoms.reshape(-1, 3))
    box = _build(positions, edge, torch.float64)
    if relax_steps:
        box.positions = _relax(box, int(relax_steps))
    return _build(wrap_molecules(box.positions, edge), edge, dtype)


def random_gas(n_atoms: int, density: float = 100.0, *, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Atoms uniformly at random in a cubic periodic box (the neighbor-list benchmark system).

    Args:
        n_atoms: N, a positive int.
        density: atoms per nm^3 (> 0); the default 100 is 0.1 atoms per Angstrom^3.
        seed: seed of the numpy Generator (int >= 0); deterministic for a seed.
        dtype: torch.float32 or torch.float64.

    Returns:
        (positions [N, 3] in [0, L)^3 (nm), cell [3, 3] = L * identity (nm)), with
        L = (N / density)^(1/3).
    """
    n = _check_count(n_atoms, "n_atoms")
    density = _check_density(density, "density", "atoms/nm^3")
    seed = _check_seed(seed)
    dtype = _check_dtype(dtype)
    edge = (n / density) ** (1 / 3)
    rng = np.random.default_rng(seed)
    positions = torch.from_numpy(rng.uniform(0.0, edge, (n, 3))).to(dtype)
    return positions, torch.eye(3, dtype=dtype) * edge
