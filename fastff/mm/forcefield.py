"""``ForceField``: the energy of an OpenMM System as a torch module with learnable parameters."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastff.mm import _terms
from fastff.neighbors import NeighborList
from fastff.verlet import VerletList

#: OpenMM's ONE_4PI_EPS0 (kJ mol^-1 nm e^-2, CODATA 2018), used so energies match OpenMM's.
OPENMM_COULOMB_CONSTANT = 138.93545764438198

_SUPPORTED = ("NonbondedForce", "HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce",
              "CMMotionRemover")


def _gauss_legendre(a: float, b: float, n: int, dtype) -> tuple[Tensor, Tensor]:
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(n)
    mid, half = 0.5 * (a + b), 0.5 * (b - a)
    return (torch.tensor(mid + half * x, dtype=dtype), torch.tensor(half * w, dtype=dtype))


class ForceField(nn.Module):
    """Total energy of an OpenMM ``System`` (NonbondedForce with NoCutoff, CutoffNonPeriodic or
    CutoffPeriodic, optional switching and dispersion correction; HarmonicBondForce,
    HarmonicAngleForce, PeriodicTorsionForce; CMMotionRemover is ignored).

    Every force-field number is an ``nn.Parameter`` (charges, sigma, epsilon, exception
    charge products / sigma / epsilon, bond k / r0, angle k / theta0, torsion k / phase), so
    parameters can be learned; the module owns a :class:`fastff.VerletList` (half list) for the
    nonbonded pairs. Build it with :meth:`from_openmm`.
    """

    # parameters and buffers set by from_openmm (declared for type checkers)
    charges: nn.Parameter
    sigma: nn.Parameter
    epsilon: nn.Parameter
    exception_charge_prod: nn.Parameter
    exception_sigma: nn.Parameter
    exception_epsilon: nn.Parameter
    bond_k: nn.Parameter
    bond_r0: nn.Parameter
    angle_k: nn.Parameter
    angle_theta0: nn.Parameter
    torsion_k: nn.Parameter
    torsion_phase: nn.Parameter
    box: Tensor
    exception_index: Tensor
    bond_index: Tensor
    angle_index: Tensor
    torsion_index: Tensor
    torsion_periodicity: Tensor
    lj_class: Tensor
    lj_class_count: Tensor
    backend: str | None
    num_atoms: int
    cutoff: float
    bonds_periodic: bool
    angles_periodic: bool
    torsions_periodic: bool

    def __init__(self):
        super().__init__()
        self.nonbonded_kwargs: dict = {}
        self.periodic = False
        self.has_nonbonded = False
        self.verlet: VerletList | None = None
        self._all_pairs: NeighborList | None = None
        self.dispersion_correction = False
        self.terms: list[str] = []

    @classmethod
    def from_openmm(cls, system, *, dtype: torch.dtype = torch.float64, skin: float = 0.1,
                    backend: str | None = None) -> ForceField:
        """Build from an ``openmm.System``.

        Args:
            system: the OpenMM System.
            dtype: float64 or float32 for parameters (and expected positions).
            skin: Verlet skin (nm) of the owned neighbor list.
            backend: kernel path for every term (None: by device).

        Raises:
            ValueError: for any force or method not listed above (PME, Ewald, LJPME, custom
                forces, ...), naming it.
        """
        import openmm

        ff = cls()
        ff.backend = backend
        ff.num_atoms = system.getNumParticles()
        box = system.getDefaultPeriodicBoxVectors()
        ff.register_buffer("box", torch.tensor([[v.x, v.y, v.z] for v in
                                                [b.value_in_unit(openmm.unit.nanometer)
                                                 for b in box]], dtype=dtype))
        names = [f.__class__.__name__ for f in system.getForces()]
        unsupported = [n for n in names if n not in _SUPPORTED]
        if unsupported:
            raise ValueError(f"ForceField.from_openmm: unsupported force(s) {unsupported}; "
                             f"supported: {', '.join(_SUPPORTED)}")
        if names.count("NonbondedForce") > 1:
            raise ValueError("ForceField.from_openmm: more than one NonbondedForce")

        def p(values):
            return nn.Parameter(torch.tensor(values, dtype=dtype).reshape(-1))

        def idx(values, width):
            return torch.tensor(values, dtype=torch.int64).reshape(-1, width)

        for force in system.getForces():
            name = force.__class__.__name__
            if name == "NonbondedForce":
                ff._add_nonbonded(force, p, idx, dtype, skin)
            elif name == "HarmonicBondForce":
                rows = [force.getBondParameters(k) for k in range(force.getNumBonds())]
                ff.register_buffer("bond_index", idx([r[:2] for r in rows], 2))
                ff.bond_r0 = p([_v(r[2]) for r in rows])
                ff.bond_k = p([_v(r[3]) for r in rows])
                ff.bonds_periodic = force.usesPeriodicBoundaryConditions()
                ff.terms.append("harmonic_bonds")
            elif name == "HarmonicAngleForce":
                rows = [force.getAngleParameters(k) for k in range(force.getNumAngles())]
                ff.register_buffer("angle_index", idx([r[:3] for r in rows], 3))
                ff.angle_theta0 = p([_v(r[3]) for r in rows])
                ff.angle_k = p([_v(r[4]) for r in rows])
                ff.angles_periodic = force.usesPeriodicBoundaryConditions()
                ff.terms.append("harmonic_angles")
            elif name == "PeriodicTorsionForce":
                rows = [force.getTorsionParameters(k) for k in range(force.getNumTorsions())]
                ff.register_buffer("torsion_index", idx([r[:4] for r in rows], 4))
                ff.register_buffer("torsion_periodicity",
                                   torch.tensor([r[4] for r in rows], dtype=torch.int64))
                ff.torsion_phase = p([_v(r[5]) for r in rows])
                ff.torsion_k = p([_v(r[6]) for r in rows])
                ff.torsions_periodic = force.usesPeriodicBoundaryConditions()
                ff.terms.append("periodic_torsions")
        return ff

    def _add_nonbonded(self, force, p, idx, dtype, skin):
        import openmm

        nb = openmm.NonbondedForce
        method = force.getNonbondedMethod()
        method_names = {nb.NoCutoff: "NoCutoff", nb.CutoffNonPeriodic: "CutoffNonPeriodic",
                        nb.CutoffPeriodic: "CutoffPeriodic", nb.Ewald: "Ewald", nb.PME: "PME",
                        nb.LJPME: "LJPME"}
        if method not in (nb.NoCutoff, nb.CutoffNonPeriodic, nb.CutoffPeriodic):
            raise ValueError(f"ForceField.from_openmm: NonbondedForce method "
                             f"{method_names.get(method, method)} is not supported (supported: "
                             "NoCutoff, CutoffNonPeriodic, CutoffPeriodic)")
        if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
            raise ValueError("ForceField.from_openmm: NonbondedForce parameter offsets are not "
                             "supported")
        rows = [force.getParticleParameters(k) for k in range(force.getNumParticles())]
        self.charges = p([_v(r[0]) for r in rows])
        self.sigma = p([_v(r[1]) for r in rows])
        self.epsilon = p([_v(r[2]) for r in rows])
        ex = [force.getExceptionParameters(k) for k in range(force.getNumExceptions())]
        self.register_buffer("exception_index", idx([r[:2] for r in ex], 2))
        self.exception_charge_prod = p([_v(r[2]) for r in ex])
        self.exception_sigma = p([_v(r[3]) for r in ex])
        self.exception_epsilon = p([_v(r[4]) for r in ex])
        self.has_nonbonded = True
        self.terms.insert(0, "nonbonded")
        self.periodic = method == nb.CutoffPeriodic
        kwargs = dict(coulomb_constant=OPENMM_COULOMB_CONSTANT,
                      exceptions_use_pbc=force.getExceptionsUsePeriodicBoundaryConditions())
        if method == nb.NoCutoff:
            kwargs.update(cutoff=None, method="plain")
            self.cutoff = math.inf
        else:
            rc = _v(force.getCutoffDistance())
            kwargs.update(cutoff=rc, method="reaction_field",
                          dielectric=force.getReactionFieldDielectric())
            if force.getUseSwitchingFunction():
                kwargs["switch_distance"] = _v(force.getSwitchingDistance())
            self.cutoff = rc
            self.verlet = VerletList(rc, skin, half=True, backend=self.backend)
        self.nonbonded_kwargs = kwargs
        self.dispersion_correction = self.periodic and force.getUseDispersionCorrection()
        if self.dispersion_correction:
            # atoms with identical (sigma, epsilon) form a class, as in OpenMM
            keys = torch.stack([self.sigma.detach().double(), self.epsilon.detach().double()], 1)
            _, cls_of_atom, counts = torch.unique(keys, dim=0, return_inverse=True,
                                                  return_counts=True)
            self.register_buffer("lj_class", cls_of_atom)
            self.register_buffer("lj_class_count", counts.to(dtype))

    def _neighbor_list(self, positions: Tensor, cell: Tensor | None) -> NeighborList:
        if self.verlet is not None:
            return self.verlet.update(positions, cell if self.periodic else None)
        n = positions.shape[0]
        nl = self._all_pairs
        if nl is None or nl.num_atoms != n or nl.i.device != positions.device:
            i, j = torch.triu_indices(n, n, offset=1, device=positions.device)  # half list
            ptr = torch.zeros(n + 1, dtype=torch.int64, device=positions.device)
            ptr[1:] = torch.cumsum(torch.bincount(i, minlength=n), 0)
            nl = NeighborList(i, j, torch.zeros(i.shape[0], 3, dtype=torch.int32,
                                                device=positions.device), ptr,
                              cutoff=math.inf, half=True, num_atoms=n, batch=None,
                              cells=positions.new_zeros(1, 3, 3),
                              pbc=torch.zeros(1, 3, dtype=torch.bool, device=positions.device),
                              cell=None, backend="reference")
            self._all_pairs = nl
        return nl

    def _dispersion(self, cell: Tensor) -> Tensor:
        """OpenMM's long-range dispersion correction, coefficient / volume, from class averages
        of the (switched) Lennard-Jones tail; differentiable in sigma, epsilon and cell."""
        n = self.num_atoms
        counts = self.lj_class_count
        dtype = counts.dtype
        ones = torch.zeros_like(counts).index_add(0, self.lj_class, torch.ones_like(self.sigma))
        sig = torch.zeros_like(counts).index_add(0, self.lj_class, self.sigma) / ones
        eps = torch.zeros_like(counts).index_add(0, self.lj_class, self.epsilon) / ones
        s = 0.5 * (sig[:, None] + sig[None, :])
        e = torch.sqrt(eps[:, None] * eps[None, :])
        weight = torch.triu(counts[:, None] * counts[None, :], diagonal=1)
        weight = weight + torch.diag(counts * (counts + 1) / 2)
        rc = self.cutoff
        s6 = s ** 6
        value = e * (s6 * s6 / (9 * rc ** 9) - s6 / (3 * rc ** 3))
        rs = self.nonbonded_kwargs.get("switch_distance")
        if rs is not None:
            r, w = _gauss_legendre(rs, rc, 48, dtype)
            r, w = r.to(cell.device), w.to(cell.device)
            x = (r - rs) / (rc - rs)
            one_minus_switch = x ** 3 * (10 - 15 * x + 6 * x * x)
            x6 = (s[..., None] / r) ** 6
            value = value + e * ((x6 * x6 - x6) * r * r * one_minus_switch * w).sum(-1)
        mean = (weight * value).sum() / (n * (n + 1) / 2)
        volume = torch.linalg.det(cell).abs()
        return 8 * math.pi * n * n * mean / volume

    def energies(self, positions: Tensor, cell: Tensor | None = None,
                 nl: NeighborList | None = None) -> dict[str, Tensor]:
        """Energy (kJ/mol, scalar) per OpenMM force: nonbonded (with dispersion correction),
        harmonic_bonds, harmonic_angles, periodic_torsions.

        Args:
            positions: [N, 3] (nm), the module's dtype.
            cell: [3, 3] box (rows are vectors, nm); default: the System's default box.
            nl: a full neighbor list to use instead of the owned Verlet list.
        """
        if cell is None and (self.periodic or any(getattr(self, f"{t}_periodic", False)
                                                  for t in ("bonds", "angles", "torsions"))):
            cell = self.box
        out: dict[str, Tensor] = {}
        be = self.backend
        if self.has_nonbonded:
            if nl is None:
                nl = self._neighbor_list(positions, cell)
            exceptions = _terms.Exceptions(self.exception_index, self.exception_charge_prod,
                                           self.exception_sigma, self.exception_epsilon)
            e = _terms.nonbonded(positions, nl, self.charges, self.sigma, self.epsilon,
                                 cell=cell if self.periodic else None, exceptions=exceptions,
                                 backend=be, **self.nonbonded_kwargs)
            if self.dispersion_correction:
                assert cell is not None  # periodic: the default box at least
                e = e + self._dispersion(cell)
            out["nonbonded"] = e
        if "harmonic_bonds" in self.terms:
            out["harmonic_bonds"] = _terms.harmonic_bonds(
                positions, self.bond_index, self.bond_k, self.bond_r0,
                cell=cell if self.bonds_periodic else None, backend=be)
        if "harmonic_angles" in self.terms:
            out["harmonic_angles"] = _terms.harmonic_angles(
                positions, self.angle_index, self.angle_k, self.angle_theta0,
                cell=cell if self.angles_periodic else None, backend=be)
        if "periodic_torsions" in self.terms:
            out["periodic_torsions"] = _terms.periodic_torsions(
                positions, self.torsion_index, self.torsion_k, self.torsion_periodicity,
                self.torsion_phase, cell=cell if self.torsions_periodic else None, backend=be)
        return out

    def forward(self, positions: Tensor, cell: Tensor | None = None,
                nl: NeighborList | None = None) -> Tensor:
        """Total potential energy (kJ/mol, scalar); forces are ``-d energy / d positions``."""
        terms = self.energies(positions, cell, nl)
        total = positions.new_zeros(())
        for e in terms.values():
            total = total + e
        return total


def _v(quantity) -> float:
    """A number in OpenMM's default units (nm, kJ/mol, e, rad)."""
    return float(quantity._value if hasattr(quantity, "_value") else quantity)
