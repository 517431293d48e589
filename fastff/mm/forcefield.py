"""``ForceField``: a molecular-mechanics energy as a torch module with learnable parameters.

Built from tensors with :meth:`ForceField.from_parameters` (one parameter group per term:
:class:`NonbondedParameters`, :class:`BondParameters`, :class:`AngleParameters`,
:class:`TorsionParameters`) or from an OpenMM System with :meth:`ForceField.from_openmm`, which
reads the System's parameters into those groups and takes the same path.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastff import _checks
from fastff.kernels._runtime import registry
from fastff.mm import _terms
from fastff.mm._clusters import ClusterList, ClusterVerletList, TileList, TileVerletList
from fastff.neighbors import NeighborList, poison_invalid
from fastff.verlet import VerletList

#: OpenMM's ONE_4PI_EPS0 (kJ mol^-1 nm e^-2, CODATA 2018), used so energies match OpenMM's.
OPENMM_COULOMB_CONSTANT = 138.93545764438198

_SUPPORTED = ("NonbondedForce", "HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce",
              "CMMotionRemover")

_NONBONDED_METHODS = ("plain", "reaction_field")


@dataclass
class NonbondedParameters:
    """Lennard-Jones + Coulomb over all pairs within ``cutoff``, with OpenMM-style exceptions.

    Attributes:
        charges: [N] (e). sigma: [N] (nm), >= 0. epsilon: [N] (kJ/mol), >= 0; combined by
            Lorentz-Berthelot.
        exceptions: :class:`fastff.mm.Exceptions` or a tuple (pairs int64 [X, 2], charge_prod
            [X] (e^2), sigma [X] (nm), epsilon [X] (kJ/mol)); charge_prod = epsilon = 0 is a
            pure exclusion. None: no exceptions.
        cutoff: nm; None means every pair interacts (then ``method`` must be "plain" and the
            system is not periodic).
        method: Coulomb form within the cutoff, "reaction_field" (OpenMM's CutoffNonPeriodic /
            CutoffPeriodic) or "plain" (1/r, OpenMM's NoCutoff when ``cutoff`` is None).
        dielectric: reaction-field dielectric constant (>= 1; inf for a conductor).
        switch_distance: nm, start of OpenMM's Lennard-Jones switching function; None: none.
        dispersion_correction: add OpenMM's long-range Lennard-Jones correction (periodic only).
        periodic: minimum-image pairs in the force field's box; None: periodic exactly when the
            force field has a box and ``cutoff`` is finite.
        exceptions_use_pbc: exception pair vectors take the minimum image.
        coulomb_constant: kJ mol^-1 nm e^-2; the default is OpenMM's value.
    """

    charges: Tensor
    sigma: Tensor
    epsilon: Tensor
    exceptions: _terms.Exceptions | tuple | None = None
    cutoff: float | None = None
    method: str = "reaction_field"
    dielectric: float = 78.3
    switch_distance: float | None = None
    dispersion_correction: bool = False
    periodic: bool | None = None
    exceptions_use_pbc: bool = False
    coulomb_constant: float = OPENMM_COULOMB_CONSTANT


@dataclass
class BondParameters:
    """Harmonic bonds 1/2 k (r - r0)^2: index int64 [T, 2], k [T] (kJ/mol/nm^2), r0 [T] (nm);
    ``periodic``: bond vectors take the minimum image in the force field's box."""

    index: Tensor
    k: Tensor
    r0: Tensor
    periodic: bool = False


@dataclass
class AngleParameters:
    """Harmonic angles 1/2 k (theta - theta0)^2: index int64 [T, 3] (vertex in the middle),
    k [T] (kJ/mol/rad^2), theta0 [T] (rad); ``periodic`` as for :class:`BondParameters`."""

    index: Tensor
    k: Tensor
    theta0: Tensor
    periodic: bool = False


@dataclass
class TorsionParameters:
    """Periodic torsions k (1 + cos(n phi - phase)): index int64 [T, 4], k [T] (kJ/mol),
    periodicity int64 [T] (n >= 0), phase [T] (rad); ``periodic`` as for
    :class:`BondParameters`."""

    index: Tensor
    k: Tensor
    periodicity: Tensor
    phase: Tensor
    periodic: bool = False


def _gauss_legendre(a: float, b: float, n: int, dtype) -> tuple[Tensor, Tensor]:
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(n)
    mid, half = 0.5 * (a + b), 0.5 * (b - a)
    return (torch.tensor(mid + half * x, dtype=dtype), torch.tensor(half * w, dtype=dtype))


def _parameter(values, name: str, length: int, dtype: torch.dtype) -> nn.Parameter:
    """A fresh float parameter [length] (a copy: the module never aliases the caller's data)."""
    t = torch.as_tensor(values).detach()
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"ForceField.from_parameters: {name} must be real numbers, got {t.dtype}")
    t = t.to(dtype).reshape(-1)
    if t.shape[0] != length:
        raise ValueError(f"ForceField.from_parameters: {name} must have {length} entries, got "
                         f"{t.shape[0]}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"ForceField.from_parameters: {name} contains NaN or inf")
    return nn.Parameter(t.clone())


def _index(values, name: str, width: int, num_atoms: int) -> Tensor:
    """int64 [T, width] atom indices, each in [0, num_atoms)."""
    t = torch.as_tensor(values).detach()
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"ForceField.from_parameters: {name} must hold integer atom indices, got "
                        f"{t.dtype}")
    t = t.to(torch.int64)
    if t.numel() == 0:
        t = t.reshape(0, width)
    if t.dim() != 2 or t.shape[1] != width:
        raise ValueError(f"ForceField.from_parameters: {name} must have shape [T, {width}], got "
                         f"{list(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_atoms):
        raise ValueError(f"ForceField.from_parameters: {name} holds atom indices outside "
                         f"[0, {num_atoms})")
    return t.contiguous().clone()


class ForceField(nn.Module):
    """Total MM energy: nonbonded (LJ + Coulomb with cutoff, reaction field or none; optional
    switching and dispersion correction; exceptions), harmonic bonds, harmonic angles and
    periodic torsions, the terms of OpenMM's NonbondedForce (NoCutoff, CutoffNonPeriodic,
    CutoffPeriodic), HarmonicBondForce, HarmonicAngleForce and PeriodicTorsionForce.

    Every force-field number is an ``nn.Parameter`` (charges, sigma, epsilon, exception
    charge products / sigma / epsilon, bond k / r0, angle k / theta0, torsion k / phase), so
    parameters can be learned; the module owns a :class:`fastff.VerletList` (half list) for the
    nonbonded pairs when there is a cutoff. Build it with :meth:`from_parameters` or
    :meth:`from_openmm`.

    On CPU (numba backend), when no parameter needs a gradient (MD: ``ff.requires_grad_(False)``
    or under ``torch.no_grad``), the nonbonded term runs on a cluster-pair list instead (8-atom
    clusters with partner lists, OpenMM's CPU layout; about 2x faster), for orthorhombic boxes
    longer than 2 (cutoff + skin + ~0.35 nm) and non-periodic systems. Set
    ``use_clusters = False`` to always use the pair list. Both give the same energy and forces.

    A call checks its inputs once (positions scanned for NaN/inf once, for every term), and the
    value checks of parameters, indices and the box once per tensor state. What the module
    derives from its tensors is kept while they stay the same: in-place changes,
    ``load_state_dict``, optimizer steps (fused ones too) and ``.data`` edits of parameters are
    seen on the next call, as are ``box.data`` edits on CPU; after editing ``.data`` of an index
    buffer, or of the box on another device, call :meth:`invalidate`. The backend is resolved
    when built, on :meth:`set_backend` and when the module moves to another device.
    """

    # parameters and buffers set by from_parameters (declared for type checkers)
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
    backend: str
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
        self.clusters: ClusterVerletList | None = None
        self.tiles: TileVerletList | None = None
        self._tile_box: tuple | None = None  # (box tensor, version, suits the tiles)
        self._max_exclusions: tuple | None = None  # (exception index, version, longest row)
        self._steady: tuple | None = None  # the inputs of a checked GPU step (see forward)
        self.use_clusters = True
        self._all_pairs: NeighborList | None = None
        self.dispersion_correction = False
        self.terms: list[str] = []
        self._backend_request = "auto"  # "auto" (by device) or a backend name
        self.backend = "reference"  # resolved in from_parameters
        self._box_state: _checks.Stamp | None = None  # the box the lists were last used with
        self.register_load_state_dict_post_hook(_invalidate_after_load)

    @classmethod
    def from_parameters(cls, num_atoms: int, *, box: Tensor | None = None,
                        nonbonded: NonbondedParameters | None = None,
                        bonds: BondParameters | None = None,
                        angles: AngleParameters | None = None,
                        torsions: TorsionParameters | None = None,
                        dtype: torch.dtype = torch.float64, skin: float = 0.1,
                        backend: str | None = None) -> ForceField:
        """Build from parameter tensors; a term given as None is absent.

        Args:
            num_atoms: N, the number of atoms.
            box: [3, 3] default periodic box (nm, rows are lattice vectors), used when the
                module is called without a cell; needed by any periodic term.
            nonbonded: the terms' parameters (see their classes).
                Values are copied into ``nn.Parameter`` objects of ``dtype``.
            bonds: as ``nonbonded``.
            angles: as ``nonbonded``.
            torsions: as ``nonbonded``.
            dtype: float64 or float32 for parameters (and expected positions).
            skin: Verlet skin (nm) of the owned neighbor list.
            backend: kernel path for every term (None: ``FASTFF_BACKEND`` when set, else by
                device; read now, see :meth:`set_backend`).

        Raises:
            ValueError / TypeError: naming the argument, for wrong shapes, out-of-range atom
                indices, unknown methods, or a periodic term without a box.
        """
        if isinstance(num_atoms, bool) or not isinstance(num_atoms, int) or num_atoms < 0:
            raise ValueError(f"ForceField.from_parameters: num_atoms must be an int >= 0, got "
                             f"{num_atoms!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"ForceField.from_parameters: dtype must be torch.float32 or "
                            f"torch.float64, got {dtype}")
        ff = cls()
        ff._backend_request = _checks.backend_request(backend)
        ff.num_atoms = num_atoms
        ff.cutoff = math.inf
        if box is None:
            ff.register_buffer("box", torch.zeros(3, 3, dtype=dtype))
        else:
            b = torch.as_tensor(box).detach().to(dtype)
            if b.shape != (3, 3) or not bool(torch.isfinite(b).all()):
                raise ValueError(f"ForceField.from_parameters: box must be a finite [3, 3] "
                                 f"tensor (nm), got shape {list(b.shape)}")
            if abs(float(torch.linalg.det(b.double()))) < 1e-12:
                raise ValueError("ForceField.from_parameters: box is singular")
            ff.register_buffer("box", b.clone())
        ff.backend = _checks.backend_on(ff._backend_request, ff.box.device)
        if nonbonded is not None:
            ff._set_nonbonded(nonbonded, box is not None, dtype, skin)
        for spec, kind in ((bonds, BondParameters), (angles, AngleParameters),
                           (torsions, TorsionParameters)):
            if spec is not None and not isinstance(spec, kind):
                raise TypeError(f"ForceField.from_parameters: expected {kind.__name__}, got "
                                f"{type(spec).__name__}")
            if spec is not None and spec.periodic and box is None:
                raise ValueError(f"ForceField.from_parameters: periodic {kind.__name__} need a "
                                 "box")
        if bonds is not None:
            ff.register_buffer("bond_index", _index(bonds.index, "bonds.index", 2, num_atoms))
            t = ff.bond_index.shape[0]
            ff.bond_k = _parameter(bonds.k, "bonds.k", t, dtype)
            ff.bond_r0 = _parameter(bonds.r0, "bonds.r0", t, dtype)
            ff.bonds_periodic = bool(bonds.periodic)
            ff.terms.append("harmonic_bonds")
        if angles is not None:
            ff.register_buffer("angle_index", _index(angles.index, "angles.index", 3, num_atoms))
            t = ff.angle_index.shape[0]
            ff.angle_k = _parameter(angles.k, "angles.k", t, dtype)
            ff.angle_theta0 = _parameter(angles.theta0, "angles.theta0", t, dtype)
            ff.angles_periodic = bool(angles.periodic)
            ff.terms.append("harmonic_angles")
        if torsions is not None:
            ff.register_buffer("torsion_index",
                               _index(torsions.index, "torsions.index", 4, num_atoms))
            t = ff.torsion_index.shape[0]
            periodicity = torch.as_tensor(torsions.periodicity).detach()
            if periodicity.is_floating_point() or periodicity.numel() != t:
                raise ValueError(f"ForceField.from_parameters: torsions.periodicity must hold {t} "
                                 "integers")
            ff.register_buffer("torsion_periodicity",
                               periodicity.to(torch.int64).reshape(-1).clone())
            ff.torsion_k = _parameter(torsions.k, "torsions.k", t, dtype)
            ff.torsion_phase = _parameter(torsions.phase, "torsions.phase", t, dtype)
            ff.torsions_periodic = bool(torsions.periodic)
            ff.terms.append("periodic_torsions")
        return ff

    def _set_nonbonded(self, spec: NonbondedParameters, has_box: bool, dtype: torch.dtype,
                       skin: float) -> None:
        if not isinstance(spec, NonbondedParameters):
            raise TypeError(f"ForceField.from_parameters: nonbonded must be NonbondedParameters, "
                            f"got {type(spec).__name__}")
        n = self.num_atoms
        where = "ForceField.from_parameters: nonbonded"
        if spec.method not in _NONBONDED_METHODS:
            raise ValueError(f"{where}.method must be one of {', '.join(_NONBONDED_METHODS)}, got "
                             f"{spec.method!r}")
        rc = spec.cutoff
        if rc is not None and not (math.isfinite(float(rc)) and float(rc) > 0):
            raise ValueError(f"{where}.cutoff must be positive and finite (or None), got {rc}")
        periodic = has_box and rc is not None if spec.periodic is None else bool(spec.periodic)
        if rc is None and (spec.method != "plain" or periodic or spec.switch_distance is not None
                           or spec.dispersion_correction):
            raise ValueError(f"{where}.cutoff=None (every pair) needs method='plain', no "
                             "switching, no dispersion correction and periodic=False")
        if periodic and not has_box:
            raise ValueError(f"{where}.periodic needs a box")
        if spec.dispersion_correction and not periodic:
            raise ValueError(f"{where}.dispersion_correction needs a periodic system")
        self.charges = _parameter(spec.charges, "nonbonded.charges", n, dtype)
        self.sigma = _parameter(spec.sigma, "nonbonded.sigma", n, dtype)
        self.epsilon = _parameter(spec.epsilon, "nonbonded.epsilon", n, dtype)
        if spec.exceptions is None:
            none = torch.zeros(0, dtype=torch.float64)
            ex = _terms.Exceptions(torch.zeros(0, 2, dtype=torch.int64), none, none, none)
        else:
            ex = _terms.Exceptions(*spec.exceptions)
        self.register_buffer("exception_index",
                             _index(ex.pairs, "nonbonded.exceptions.pairs", 2, n))
        x = self.exception_index.shape[0]
        self.exception_charge_prod = _parameter(ex.charge_prod,
                                                "nonbonded.exceptions.charge_prod", x, dtype)
        self.exception_sigma = _parameter(ex.sigma, "nonbonded.exceptions.sigma", x, dtype)
        self.exception_epsilon = _parameter(ex.epsilon, "nonbonded.exceptions.epsilon", x, dtype)
        self.has_nonbonded = True
        self.terms.insert(0, "nonbonded")
        self.periodic = periodic
        # every setting of fastff.mm.nonbonded but the tensors, the cell and the backend
        kwargs: dict = dict(coulomb_constant=float(spec.coulomb_constant),
                            exceptions_use_pbc=bool(spec.exceptions_use_pbc),
                            dielectric=float(spec.dielectric)
                            if spec.method == "reaction_field" and rc is not None else 1.0,
                            switch_distance=None,
                            ewald_alpha=None)
        if rc is None:
            kwargs.update(cutoff=None, method="plain")
        else:
            kwargs.update(cutoff=float(rc), method=spec.method)
            if spec.switch_distance is not None:
                kwargs["switch_distance"] = float(spec.switch_distance)
            self.cutoff = float(rc)
            # capacity mode on the Triton backend: steps without host synchronisation
            self.verlet = VerletList(float(rc), skin, half=True, backend=self.backend,
                                     capacity="auto")
            self.clusters = ClusterVerletList(float(rc), skin)
        self.nonbonded_kwargs = kwargs
        self.dispersion_correction = bool(spec.dispersion_correction)
        if self.dispersion_correction:
            # atoms with identical (sigma, epsilon) form a class, as in OpenMM
            keys = torch.stack([self.sigma.detach().double(), self.epsilon.detach().double()], 1)
            _, cls_of_atom, counts = torch.unique(keys, dim=0, return_inverse=True,
                                                  return_counts=True)
            self.register_buffer("lj_class", cls_of_atom)
            self.register_buffer("lj_class_count", counts.to(dtype))

    @classmethod
    def from_openmm(cls, system, *, dtype: torch.dtype = torch.float64, skin: float = 0.1,
                    backend: str | None = None) -> ForceField:
        """Build from an ``openmm.System`` (read into parameter groups, then
        :meth:`from_parameters`).

        Args:
            system: the OpenMM System (CMMotionRemover is ignored).
            dtype: float64 or float32 for parameters (and expected positions).
            skin: Verlet skin (nm) of the owned neighbor list.
            backend: kernel path for every term (None: ``FASTFF_BACKEND`` when set, else by
                device; read now, see :meth:`set_backend`).

        Raises:
            ValueError: for any force or method not listed above (PME, Ewald, LJPME, custom
                forces, ...), or more than one force of a kind, naming it.
        """
        import openmm

        names = [f.__class__.__name__ for f in system.getForces()]
        unsupported = [n for n in names if n not in _SUPPORTED]
        if unsupported:
            raise ValueError(f"ForceField.from_openmm: unsupported force(s) {unsupported}; "
                             f"supported: {', '.join(_SUPPORTED)}")
        for name in _SUPPORTED[:-1]:
            if names.count(name) > 1:
                raise ValueError(f"ForceField.from_openmm: more than one {name}")
        nm = openmm.unit.nanometer
        box = torch.tensor([[v.x, v.y, v.z] for v in
                            [b.value_in_unit(nm) for b in system.getDefaultPeriodicBoxVectors()]],
                           dtype=torch.float64)
        groups: dict = {}
        for force in system.getForces():
            name = force.__class__.__name__
            if name == "NonbondedForce":
                groups["nonbonded"] = _openmm_nonbonded(force)
            elif name == "HarmonicBondForce":
                rows = [force.getBondParameters(k) for k in range(force.getNumBonds())]
                groups["bonds"] = BondParameters(
                    _rows([r[:2] for r in rows], 2), _floats([_v(r[3]) for r in rows]),
                    _floats([_v(r[2]) for r in rows]), force.usesPeriodicBoundaryConditions())
            elif name == "HarmonicAngleForce":
                rows = [force.getAngleParameters(k) for k in range(force.getNumAngles())]
                groups["angles"] = AngleParameters(
                    _rows([r[:3] for r in rows], 3), _floats([_v(r[4]) for r in rows]),
                    _floats([_v(r[3]) for r in rows]), force.usesPeriodicBoundaryConditions())
            elif name == "PeriodicTorsionForce":
                rows = [force.getTorsionParameters(k) for k in range(force.getNumTorsions())]
                groups["torsions"] = TorsionParameters(
                    _rows([r[:4] for r in rows], 4), _floats([_v(r[6]) for r in rows]),
                    torch.tensor([int(r[4]) for r in rows], dtype=torch.int64),
                    _floats([_v(r[5]) for r in rows]),
                    force.usesPeriodicBoundaryConditions())
        return cls.from_parameters(system.getNumParticles(), box=box, dtype=dtype, skin=skin,
                                   backend=backend, **groups)

    def set_backend(self, backend: str | None) -> ForceField:
        """Run every term on ``backend`` ("numba", "triton", "reference", or None:
        ``FASTFF_BACKEND`` if set, else by device) from now on; the owned list is rebuilt."""
        self._backend_request = _checks.backend_request(backend)
        self._resolve_backend(force=True)
        return self

    def _resolve_backend(self, force: bool = False) -> None:
        backend = _checks.backend_on(self._backend_request, self.box.device)
        if backend == self.backend and not force:
            return
        self.backend = backend
        if self.verlet is not None:
            self.verlet = VerletList(self.verlet.cutoff, self.verlet.skin, half=True,
                                     backend=backend)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the parameters: the default backend follows the device
        out = super()._apply(fn, recurse)
        if hasattr(self, "box"):
            self._resolve_backend()
        self.invalidate()
        return out

    def invalidate(self) -> None:
        """Forget the owned neighbor lists and what was derived from the buffers (rebuilt on the
        next call): needed only after an edit the module does not see, of an index buffer's
        ``.data`` or, on a device other than the CPU, of ``box.data``."""
        if self.verlet is not None:
            self.verlet.reset()
        if self.clusters is not None:
            self.clusters = ClusterVerletList(self.clusters.cutoff, self.clusters.skin)
        self.tiles = None  # rebuilt from the exclusions on the next call
        _terms.forget(*self.buffers())
        self._box_state = None
        self._steady = None

    def _cluster_list(self, positions: Tensor, cell: Tensor | None) -> ClusterList | None:
        """The cluster list of the fast path, when it applies: no parameter gradients needed,
        not tracing, a box the layout handles (else None). Numba: the CPU's 8-atom cluster
        pairs; Triton: the GPU's 32-atom tiles (built on the device)."""
        if (self.clusters is None or not self.use_clusters or torch.compiler.is_compiling()
                or positions.dim() != 2
                or _terms._needs_grad(self.charges, self.sigma, self.epsilon)):
            return None
        if self.periodic and (cell is None or cell.shape != (3, 3)):
            return None
        path = registry.resolve("nonbonded", positions.device, self.backend)[0]
        if path == "triton":
            return self._tile_list(positions, cell)
        if path != "numba" or positions.device.type != "cpu":
            return None
        excl_ptr, excl_j = _terms.exclusion_rows(self.exception_index, self.num_atoms)
        return self.clusters.update(positions, cell if self.periodic else None, excl_ptr,
                                    excl_j)

    def _tile_list(self, positions: Tensor, cell: Tensor | None) -> TileList | None:
        """The GPU path's tile list: orthorhombic boxes longer than twice the cutoff (read from
        the box once per box tensor and version) and at most 32 exclusions per atom."""
        from fastff.kernels.nonbonded.gpu_clusters import MAX_EXCLUSIONS

        if self.periodic and not self._suits_tiles(cell):
            return None
        excl_ptr, excl_j = _terms.exclusion_rows(self.exception_index, self.num_atoms)
        index = self.exception_index
        kept = self._max_exclusions
        if kept is None or kept[0] is not index or kept[1] != index._version:
            counts = excl_ptr[1:] - excl_ptr[:-1]
            kept = (index, index._version, int(counts.max()) if counts.numel() else 0)
            self._max_exclusions = kept
        if kept[2] > MAX_EXCLUSIONS:
            return None
        if self.tiles is None:
            assert self.verlet is not None
            self.tiles = TileVerletList(self.cutoff, self.verlet.skin, backend=self.backend)
        return self.tiles.update(positions, cell if self.periodic else None, excl_ptr, excl_j,
                                 kept[2], exclusions_key=index)

    def _suits_tiles(self, cell: Tensor | None) -> bool:
        if cell is None:
            return False
        kept = self._tile_box
        if kept is not None and kept[0] is cell and kept[1] == cell._version:
            return kept[2]
        c = cell.detach().double()
        ok = (bool((c - torch.diag(torch.diagonal(c))).abs().max() == 0)
              and bool((torch.diagonal(c) > 2.0 * self.cutoff).all()))
        self._tile_box = (cell, cell._version, ok)
        return ok

    def _neighbor_list(self, positions: Tensor, cell: Tensor | None) -> NeighborList:
        if self.verlet is not None:
            return self.verlet.update(positions, cell if self.periodic else None)
        n = positions.shape[0]
        nl = self._all_pairs
        if (nl is None or nl.num_atoms != n or nl.i.device != positions.device
                or (nl.i.is_inference() and not torch.is_inference_mode_enabled())):
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
        cell = self._checked_call(positions, cell)
        out: dict[str, Tensor] = {}
        if self.has_nonbonded:
            out["nonbonded"] = self._nonbonded_energy(positions, cell, nl)
        for term, kind in (("harmonic_bonds", "bonds"), ("harmonic_angles", "angles"),
                           ("periodic_torsions", "torsions")):
            if term in self.terms:
                out[term] = self._bonded_energy(positions, cell, (kind,))
        return out

    def forward(self, positions: Tensor, cell: Tensor | None = None,
                nl: NeighborList | None = None) -> Tensor:
        """Total potential energy (kJ/mol, scalar); forces are ``-d energy / d positions``.

        The same sum as :meth:`energies`, with every bonded term in one fused op.

        On the Triton backend an MD step (no parameter needing a gradient) after the first
        checked one reads nothing back from the device: value checks of the inputs give way to
        the device flags of the neighbor list (non-finite positions make the energy NaN), the
        lists are rebuilt on the device, and the step can be captured in a CUDA graph
        (:func:`fastff.compile.cuda_graph_step`)."""
        key, steady = self._steady_step(positions)
        with _checks.no_checks() if steady else contextlib.nullcontext():
            cell = self._checked_call(positions, cell)
            total = positions.new_zeros(())
            if self.has_nonbonded:
                total = total + self._nonbonded_energy(positions, cell, nl)
            if any(t != "nonbonded" for t in self.terms):
                total = total + self._bonded_energy(positions, cell)
        if key is not None:
            self._steady = key  # this step ran with checks: the next ones like it skip them
        return total

    def check(self) -> None:
        """Raise if a list the module owns is unusable (more pairs or tiles than its capacity,
        non-finite positions, a box it does not suit): reads their status words, a host
        synchronisation. Steady GPU steps never read them (results from such a list are NaN);
        call this where the host waits anyway, e.g. when energies are logged."""
        for owned in (self.verlet, self.tiles):
            if owned is not None:
                owned.check()

    def _steady_step(self, positions: Tensor) -> tuple[tuple | None, bool]:
        """(key of a GPU MD step, whether a checked step with that key ran before): on the
        Triton backend, with no parameter needing a gradient; (None, False) elsewhere."""
        if (registry.resolve("nonbonded" if self.has_nonbonded else "bonded_terms",
                             positions.device, self.backend)[0] != "triton"
                or _terms._needs_grad(*self.parameters()) or not _checks.checks_enabled()):
            return None, False
        key = (positions.shape, positions.dtype, positions.device)
        return key, self._steady == key

    def bonded_energy(self, positions: Tensor, cell: Tensor | None = None) -> Tensor:
        """Bonds + angles + torsions (kJ/mol, scalar) in one fused op (:func:`fastff.mm.bonded`).
        """
        return self._bonded_energy(positions, self._checked_call(positions, cell))

    def _checked_call(self, positions: Tensor, cell: Tensor | None) -> Tensor | None:
        """The checks of a call, made once for every term: positions (shape, NaN/inf); returns
        the box to use. Cell, parameters and indices are checked inside, once per state."""
        _checks.positions(positions)
        if positions.shape[0] != self.num_atoms:
            raise ValueError(f"positions has {positions.shape[0]} atoms but the force field was "
                             f"built for {self.num_atoms}")
        cell = self._cell(cell)
        if cell is self.box and self.box.device.type == "cpu" and _checks.stampable(self.box):
            # the lists compare the box by version: an edit of its .data must rebuild them
            if self._box_state is None or not self._box_state.matches(self.box):
                if self._box_state is not None:
                    self.invalidate()
                self._box_state = _checks.Stamp(self.box, values=True)
        return cell

    def _bonded_energy(self, positions: Tensor, cell: Tensor | None,
                       kinds: tuple[str, ...] = ("bonds", "angles", "torsions")) -> Tensor:
        specs: dict[str, tuple[Tensor, ...]] = {}
        if "bonds" in kinds and "harmonic_bonds" in self.terms:
            specs["bonds"] = (self.bond_index, self.bond_k, self.bond_r0)
        if "angles" in kinds and "harmonic_angles" in self.terms:
            specs["angles"] = (self.angle_index, self.angle_k, self.angle_theta0)
        if "torsions" in kinds and "periodic_torsions" in self.terms:
            specs["torsions"] = (self.torsion_index, self.torsion_k, self.torsion_periodicity,
                                 self.torsion_phase)
        periodic = tuple(arg in specs and getattr(self, f"{arg}_periodic")
                         for arg in ("bonds", "angles", "torsions"))
        return _terms._bonded_energy(
            positions, cell=cell if any(periodic) else None, batch=None, periodic=periodic,
            backend=self.backend, bonds=specs.get("bonds"), angles=specs.get("angles"),
            torsions=specs.get("torsions"))

    def _cell(self, cell: Tensor | None) -> Tensor | None:
        """The box to use: the one given, else the System's default box when any term is
        periodic."""
        if cell is None and (self.periodic or any(getattr(self, f"{t}_periodic", False)
                                                  for t in ("bonds", "angles", "torsions"))):
            return self.box
        return cell

    def _nonbonded_energy(self, positions: Tensor, cell: Tensor | None,
                          nl: NeighborList | ClusterList | None) -> Tensor:
        if nl is None:
            # the positions are checked: building or reusing the lists reads no value again
            with _checks.no_checks():
                nl = self._cluster_list(positions, cell) or self._neighbor_list(positions, cell)
        exceptions = _terms.Exceptions(self.exception_index, self.exception_charge_prod,
                                       self.exception_sigma, self.exception_epsilon)
        e = _terms._pair_energy(positions, nl, self.charges, self.sigma, self.epsilon,
                                cell=cell if self.periodic else None, batch=None,
                                exceptions=exceptions, backend=self.backend,
                                **self.nonbonded_kwargs)
        status = getattr(nl, "status", None)
        if status is not None:  # a capacity-mode list: NaN (never a number) if it is invalid
            e = poison_invalid(e, status)
        if self.dispersion_correction:
            assert cell is not None  # periodic: the default box at least
            e = e + self._dispersion(cell)
        return e


def _invalidate_after_load(module: ForceField, incompatible_keys) -> None:
    module.invalidate()


def _floats(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _rows(values, width: int) -> Tensor:
    return torch.tensor(values, dtype=torch.int64).reshape(-1, width)


def _openmm_nonbonded(force) -> NonbondedParameters:
    """An ``openmm.NonbondedForce`` as :class:`NonbondedParameters`."""
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
    ex = [force.getExceptionParameters(k) for k in range(force.getNumExceptions())]
    exceptions = _terms.Exceptions(_rows([r[:2] for r in ex], 2), _floats([_v(r[2]) for r in ex]),
                                   _floats([_v(r[3]) for r in ex]), _floats([_v(r[4]) for r in ex]))
    periodic = method == nb.CutoffPeriodic
    cutoff = None if method == nb.NoCutoff else _v(force.getCutoffDistance())
    switch = (_v(force.getSwitchingDistance())
              if cutoff is not None and force.getUseSwitchingFunction() else None)
    return NonbondedParameters(
        _floats([_v(r[0]) for r in rows]), _floats([_v(r[1]) for r in rows]),
        _floats([_v(r[2]) for r in rows]),
        exceptions=exceptions, cutoff=cutoff,
        method="plain" if cutoff is None else "reaction_field",
        dielectric=force.getReactionFieldDielectric(), switch_distance=switch,
        dispersion_correction=periodic and force.getUseDispersionCorrection(),
        periodic=periodic,
        exceptions_use_pbc=force.getExceptionsUsePeriodicBoundaryConditions(),
        coulomb_constant=OPENMM_COULOMB_CONSTANT)


def _v(quantity) -> float:
    """A number in OpenMM's default units (nm, kJ/mol, e, rad)."""
    return float(quantity._value if hasattr(quantity, "_value") else quantity)
