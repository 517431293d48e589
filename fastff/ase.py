"""ASE calculator for fastff models (SchNet, PaiNN, ...) and MM force fields.

``fastff.ase.Calculator`` wraps either a model with the signature
``model(species, positions, cell, pbc, batch, *, nl=None) -> energies [B]`` or a
:class:`fastff.mm.ForceField` (``ff(positions, cell, nl) -> energy``) as an
``ase.calculators.calculator.Calculator``. ASE speaks eV and Angstrom; the calculator converts
from the model's units on the way in and out. ``fastff.ase.neighbor_list`` is ASE's
``neighbor_list`` function (same signature and output) on fastff's kernels. It needs the ``ase``
package (imported here, not by ``import fastff``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ase.calculators.calculator as ase_calculator
import ase.data
import ase.units
import numpy as np
import torch
from ase.stress import full_3x3_to_voigt_6_stress
from torch import Tensor

from fastff import _checks, units
from fastff.mm import ForceField
from fastff.neighbors import NeighborList
from fastff.verlet import VerletList

__all__ = ["ENERGY_UNITS", "LENGTH_UNITS", "Calculator", "neighbor_list"]

#: eV per unit of energy.
ENERGY_UNITS: dict[str, float] = {
    "eV": 1.0,
    "meV": 1e-3,
    "kJ/mol": ase.units.kJ / ase.units.mol,
    "kcal/mol": ase.units.kcal / ase.units.mol,
    "Hartree": ase.units.Hartree,
}

#: Angstrom per unit of length.
LENGTH_UNITS: dict[str, float] = {
    "A": 1.0,
    "Angstrom": 1.0,
    "nm": ase.units.nm,
    "Bohr": ase.units.Bohr,
}

#: Verlet skin (Angstrom) of the list the calculator owns for a model without its own.
DEFAULT_SKIN = 0.5

# A periodic cell whose periodic rows span a parallelepiped thinner than this fraction of the
# product of their lengths is treated as singular (rounding leaves ~1e-16 for parallel rows).
_SINGULAR = 1e-10


def _unit(value, table: dict[str, float], name: str, meaning: str) -> float:
    if isinstance(value, str):
        canonical = units.length_unit if table is LENGTH_UNITS else units.energy_unit
        try:
            return table[canonical(value)]
        except (ValueError, KeyError):
            raise ValueError(f"{name} must be one of {sorted(table)} or a positive number "
                             f"({meaning}), got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a unit name or a number ({meaning}), got "
                        f"{type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and positive ({meaning}), got {value}")
    return float(value)


def _model_unit(model, own, given, table: dict[str, float], name: str, meaning: str) -> float:
    """The model's unit (``own``, a name or None) as a number of ASE's units; ``given`` (the
    argument) must agree with it, and is required where the model has none."""
    mine = None if own is None else _unit(own, table, f"{type(model).__name__}.{name}", meaning)
    stated = None if given is None else _unit(given, table, name, meaning)
    if mine is None and stated is None:
        raise ValueError(f"the model ({type(model).__name__}) has no {name} and none was given: "
                         f"pass {name}=... or set model.{name}")
    if mine is not None and stated is not None and not math.isclose(mine, stated, rel_tol=1e-9):
        raise ValueError(f"{name}={given!r} contradicts the model's {name} {own!r}: a model "
                         f"computes in one unit; drop the argument or fix model.{name}")
    if mine is None:
        assert stated is not None
        return stated
    return mine


def _first_tensor(model: torch.nn.Module) -> Tensor | None:
    for p in model.parameters():
        return p
    for b in model.buffers():
        if b.is_floating_point():
            return b
    return None


class Calculator(ase_calculator.Calculator):
    """Energy, forces and stress of a fastff model or force field, in ASE's units.

    Units. The model says what it computes in: ``model.length_unit`` and ``model.energy_unit``
    (fastff's models: nm and kJ/mol unless set otherwise; a converted torch_geometric model:
    Angstrom and the energy unit given to ``from_pyg``; a :class:`fastff.mm.ForceField`: always
    nm and kJ/mol). ``energy_unit`` and ``length_unit`` are for a model without them: a name
    from :data:`ENERGY_UNITS` / :data:`LENGTH_UNITS` or a number (eV per model energy unit,
    Angstrom per model length unit). Given for a model that has units, they must agree with
    them; a model with neither raises. A cutoff shorter than 1 Angstrom in the model's unit
    raises too (a cutoff meant for another unit, see :func:`fastff.units.check_cutoff`).
    Results come back in ASE's units: energy eV, forces eV/A, stress eV/A^3.

    Stress is ``(1 / V) dE / d(strain)`` for a symmetric strain applied to positions and cell
    together (ASE's sign: negative for a compressed system, i.e. at positive pressure), Voigt
    order xx yy zz yz xz xy. It is computed only when asked for and only for fully periodic
    Atoms; otherwise asking raises ``PropertyNotImplementedError``.

    Neighbor lists are reused between MD steps: a :class:`fastff.mm.ForceField` and a model
    built with ``skin > 0`` use their own Verlet list; for any other model with a ``cutoff``
    attribute the calculator owns a :class:`fastff.VerletList` (full list, skin
    :data:`DEFAULT_SKIN`, ``compact=True``) and passes its pairs within the model's cutoff as
    ``nl=``, exactly the pairs a fresh list would hold (so a model without an envelope can use
    it too). ``skin`` (Angstrom) overrides all of this with a list the calculator owns.

    Checks. Atoms are validated when their numbers, cell or pbc change (species the model does
    not know, a number or order of atoms a force field was not built for, a singular periodic
    cell, pbc the force field does not use) and every step for NaN/inf positions (one
    reduction); the model then runs under :func:`fastff.no_checks`, so no value check is
    repeated per step. During a call the model's parameters have ``requires_grad`` switched off
    (and restored after), so the fused kernels skip parameter gradients.

    Args:
        model: a model called as ``model(species, positions, cell, pbc, batch, nl=...)``
            returning energies [1] (e.g. :class:`fastff.models.SchNet`), or a
            :class:`fastff.mm.ForceField`.
        device: device to run on; the model is moved there (``model.to``). Default: where the
            model's parameters are.
        dtype: float32 or float64; the model is converted (``model.to``). Default: the model's.
        skin: Verlet skin in Angstrom for a list the calculator owns (see above), >= 0.
        energy_unit: the model's energy unit, see above. Default: ``model.energy_unit``.
        length_unit: the model's length unit, see above. Default: ``model.length_unit``.
        species: for a ForceField, the atomic numbers [N] in the order it was built for.
            Default: ``model.species`` if the force field has it, else the numbers of the
            first Atoms calculated.
        **kwargs: passed to ``ase.calculators.calculator.Calculator`` (e.g. ``label``).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: torch.nn.Module, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, skin: float | None = None,
                 energy_unit: str | float | None = None, length_unit: str | float | None = None,
                 species: Sequence[int] | Tensor | np.ndarray | None = None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a fastff model or "
                            f"fastff.mm.ForceField), got {type(model).__name__}")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        own = (("nm", "kJ/mol") if isinstance(model, ForceField) else
               (getattr(model, "length_unit", None), getattr(model, "energy_unit", None)))
        self.energy_scale = _model_unit(model, own[1], energy_unit, ENERGY_UNITS, "energy_unit",
                                        "eV per model energy unit")
        self.length_scale = _model_unit(model, own[0], length_unit, LENGTH_UNITS, "length_unit",
                                        "Angstrom per model length unit")
        cutoff = getattr(model, "cutoff", None)
        if isinstance(cutoff, (int, float)) and not isinstance(model, ForceField):
            label = own[0] if own[0] is not None else f"(units of {self.length_scale:g} A)"
            units.check_cutoff(float(cutoff), self.length_scale * 0.1, label)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        ref = _first_tensor(model)
        self.device = torch.device(device) if device is not None else (
            ref.device if ref is not None else torch.device("cpu"))
        self.dtype = dtype or (ref.dtype if ref is not None and ref.is_floating_point()
                               else torch.float64)
        self.model = model
        #: the model as a ForceField, or None for a model called with species
        self.force_field: ForceField | None = model if isinstance(model, ForceField) else None
        if skin is not None and not (isinstance(skin, (int, float)) and math.isfinite(skin)
                                     and skin >= 0):
            raise ValueError(f"skin must be a finite number >= 0 (Angstrom), got {skin!r}")
        self.verlet = self._owned_verlet(skin)
        self._species_for_ff = self._force_field_species(species)
        self._eye = torch.eye(3, dtype=self.dtype, device=self.device)
        # state derived from Atoms, refreshed only when numbers / cell / pbc change
        self._species: Tensor | None = None
        self._cell: Tensor | None = None
        self._pbc: Tensor | None = None
        self._fully_periodic = False
        self._prepared = False

    # --- construction helpers -----------------------------------------------------------------

    def _owned_verlet(self, skin: float | None) -> VerletList | None:
        ff, model = self.force_field, self.model
        if ff is not None:
            if ff.verlet is None and skin:
                raise ValueError(f"skin={skin} needs a Verlet list, but the ForceField has no "
                                 "cutoff (every pair interacts); leave skin=None")
            if skin is None or ff.verlet is None:  # its own list, or all pairs
                return None
            return VerletList(ff.cutoff, skin / self.length_scale, half=True, backend=ff.backend)
        cutoff = getattr(model, "cutoff", None)
        if cutoff is None:  # the model builds its own lists
            if skin:
                raise ValueError(f"skin={skin} needs a Verlet list, but the model has no cutoff "
                                 "attribute; leave skin=None")
            return None
        if skin is None:
            if getattr(model, "verlet", None) is not None:
                return None
            skin = DEFAULT_SKIN
        # compact: the model gets exactly the pairs within its cutoff, as from a fresh list, so
        # pairs in the skin cost it nothing and models without an envelope are served too
        return VerletList(cutoff, skin / self.length_scale, backend=getattr(model, "backend", None),
                          compact=True)

    def _force_field_species(self, species) -> np.ndarray | None:
        ff = self.force_field
        if ff is None:
            if species is not None:
                raise ValueError("species is only for a fastff.mm.ForceField; a model gets the "
                                 "atomic numbers from the Atoms")
            return None
        if species is None:
            species = getattr(ff, "species", None)
        if species is None:
            return None
        numbers = np.asarray(species.cpu() if isinstance(species, Tensor) else species)
        if numbers.ndim != 1 or numbers.shape[0] != ff.num_atoms:
            raise ValueError(f"species must have shape [{ff.num_atoms}] (the force "
                             f"field's atoms), got {list(numbers.shape)}")
        return numbers.astype(np.int64)

    # --- validation (when numbers / cell / pbc change) ----------------------------------------

    def _set_numbers(self, numbers: np.ndarray) -> None:
        n = numbers.shape[0]
        ff = self.force_field
        if ff is not None:
            if n != ff.num_atoms:
                raise ValueError(f"atoms has {n} atoms but the ForceField was built for "
                                 f"{ff.num_atoms}")
            if self._species_for_ff is None:
                self._species_for_ff = numbers.astype(np.int64)  # the first Atoms fix the order
            elif not np.array_equal(numbers, self._species_for_ff):
                k = int(np.nonzero(numbers != self._species_for_ff)[0][0])
                raise ValueError(f"atoms.numbers[{k}] = {numbers[k]} but the ForceField was built "
                                 f"with atomic number {self._species_for_ff[k]} there: the atoms "
                                 "must come in the order of the force field")
            return
        max_species = getattr(self.model, "max_species", None)
        if max_species is not None and n:
            bad = np.nonzero((numbers < 0) | (numbers >= max_species))[0]
            if bad.size:
                k = int(bad[0])
                raise ValueError(f"atoms.numbers[{k}] = {numbers[k]} is a species the model does "
                                 f"not know: it takes atomic numbers in [0, {max_species}) "
                                 "(max_species)")
        self._species = torch.as_tensor(numbers, dtype=torch.int64, device=self.device)

    def _set_cell(self, cell: np.ndarray, pbc: np.ndarray) -> None:
        pbc = np.asarray(pbc, dtype=bool)
        if pbc.any():
            rows = cell[pbc]
            lengths = np.linalg.norm(rows, axis=1)
            gram = np.linalg.det(rows @ rows.T)
            if lengths.min() == 0 or gram <= (_SINGULAR * np.prod(lengths)) ** 2:
                raise ValueError(f"atoms.cell is singular along its periodic axes (pbc="
                                 f"{pbc.tolist()}, cell={cell.tolist()}): periodic lattice "
                                 "vectors must be non-zero and linearly independent")
        if self.force_field is not None:
            periodic = self.force_field.periodic
            if periodic and not pbc.all():
                raise ValueError(f"the ForceField is periodic (CutoffPeriodic) but atoms.pbc is "
                                 f"{pbc.tolist()}; set atoms.pbc = True and a cell")
            if not periodic and pbc.any():
                raise ValueError(f"the ForceField is not periodic but atoms.pbc is "
                                 f"{pbc.tolist()}; set atoms.pbc = False")
        self._fully_periodic = bool(pbc.all())
        if pbc.any():
            self._cell = torch.as_tensor(cell / self.length_scale, dtype=self.dtype,
                                         device=self.device)
            self._pbc = torch.as_tensor(pbc, device=self.device)
        else:
            self._cell = self._pbc = None

    # --- the calculation ----------------------------------------------------------------------

    def calculate(self, atoms=None, properties=("energy",),
                  system_changes=tuple(ase_calculator.all_changes)):
        """Compute energy, free_energy and forces (and stress when asked) for ``atoms``."""
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        first = not self._prepared
        if first or "numbers" in system_changes:
            self._set_numbers(atoms.numbers)
        if first or "cell" in system_changes or "pbc" in system_changes:
            self._set_cell(np.asarray(atoms.cell), atoms.pbc)
        self._prepared = True
        want_stress = "stress" in properties
        if want_stress and not self._fully_periodic:
            raise ase_calculator.PropertyNotImplementedError(
                f"stress needs fully periodic Atoms (pbc all True), got pbc={atoms.pbc.tolist()}")

        positions = atoms.positions
        if not math.isfinite(float(positions.sum())):  # one reduction; NaN/inf propagate
            k = int(np.nonzero(~np.isfinite(positions).all(axis=1))[0][0])
            raise ValueError(f"atoms.positions contains NaN or inf (first at atom {k})")
        pos = torch.from_numpy(positions).to(device=self.device, dtype=self.dtype, copy=True)
        pos.mul_(1.0 / self.length_scale).requires_grad_(True)

        energy, grad_pos, virial = self._evaluate(pos, want_stress)
        e_scale = self.energy_scale
        self.results = {
            "energy": energy * e_scale,
            "free_energy": energy * e_scale,
            "forces": grad_pos.to(device="cpu", dtype=torch.float64).numpy()
            * (-e_scale / self.length_scale),
        }
        if virial is not None:
            assert self._cell is not None
            volume = abs(float(torch.linalg.det(self._cell.double())))
            stress = virial.to(device="cpu", dtype=torch.float64).numpy() / volume
            self.results["stress"] = full_3x3_to_voigt_6_stress(
                stress * (e_scale / self.length_scale ** 3))

    def _evaluate(self, pos: Tensor, want_stress: bool) -> tuple[float, Tensor, Tensor | None]:
        """(energy, dE/dpositions, dE/dstrain or None) in the model's units."""
        cell = self._cell
        inputs = [pos]
        x, c = pos, cell
        if want_stress:
            assert cell is not None
            strain = torch.zeros(3, 3, dtype=self.dtype, device=self.device, requires_grad=True)
            deform = self._eye + 0.5 * (strain + strain.T)  # symmetric strain
            x, c = pos @ deform, cell @ deform
            inputs.append(strain)
        # Forces and stress need no parameter gradients: switching them off keeps the fused
        # kernels from computing them.
        params = [p for p in self.model.parameters() if p.requires_grad]
        try:
            for p in params:
                p.requires_grad_(False)
            with torch.enable_grad(), _checks.no_checks():
                energy = self._energy(x, c, pos)
                grads = torch.autograd.grad(energy, inputs)
        finally:
            for p in params:
                p.requires_grad_(True)
        return float(energy.detach()), grads[0], grads[1] if want_stress else None

    def _energy(self, x: Tensor, cell: Tensor | None, pos: Tensor) -> Tensor:
        nl: NeighborList | None = None
        if self.force_field is not None:
            if self.verlet is not None:
                nl = self.verlet.update(pos, self._cell)
            return self.model(x, cell, nl)
        if self.verlet is not None:
            nl = self.verlet.update(pos, self._cell, self._pbc)
        energies = self.model(self._species, x, cell, self._pbc, None, nl=nl)
        return energies.sum()


# ---- neighbor_list: ASE's function on fastff's kernels -----------------------------------------

#: The quantities ASE's neighbor_list returns, and the numpy dtype of each.
_QUANTITIES = {"i": np.int64, "j": np.int64, "d": np.float64, "D": np.float64, "S": np.int64}


def _pair_cutoffs(cutoff, atoms: ase.Atoms):
    """(largest cutoff, per-pair cutoff or None) from ASE's three forms of ``cutoff``.

    The per-pair cutoff is ``fn(i, j) -> [E]`` for per-element dicts and per-atom radii.
    """
    if isinstance(cutoff, dict):
        return _element_cutoffs(cutoff, atoms.numbers)
    if isinstance(cutoff, (bool, np.bool_)) or cutoff is None or isinstance(cutoff, str):
        raise TypeError(f"cutoff must be a float, a dict of element pairs or per-atom radii, got "
                        f"{type(cutoff).__name__}")
    if np.isscalar(cutoff):
        return _checks.cutoff(cutoff), None
    radii = np.asarray(cutoff)
    if radii.shape != (len(atoms),) or not np.issubdtype(radii.dtype, np.number):
        raise ValueError(f"cutoff as per-atom radii must have one number per atom ({len(atoms)}), "
                         f"got shape {list(radii.shape)} of {radii.dtype}")
    radii = radii.astype(np.float64)
    if len(radii) and not (np.isfinite(radii).all() and (radii >= 0).all()):
        raise ValueError("cutoff as per-atom radii must be finite and >= 0")
    largest = 2.0 * float(radii.max()) if len(radii) else 0.0
    return largest, lambda i, j: radii[i] + radii[j]


def _element(value, key) -> int:
    if isinstance(value, str):
        if value not in ase.data.atomic_numbers:
            raise ValueError(f"cutoff key {key!r} names an unknown element {value!r}")
        return ase.data.atomic_numbers[value]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    raise ValueError(f"cutoff key {key!r} must hold element symbols or atomic numbers, got "
                     f"{value!r}")


def _element_cutoffs(cutoff: dict, numbers: np.ndarray):
    """ASE's per-element-pair cutoffs: (a, b) and (b, a) alike, later keys win, pairs of
    elements not named have cutoff 0 (no pairs)."""
    if not cutoff:
        raise ValueError("cutoff is an empty dict: name at least one pair of elements")
    pairs = []
    for key, value in cutoff.items():
        if not isinstance(key, tuple) or len(key) != 2:
            raise ValueError(f"cutoff keys must be pairs of elements like ('H', 'O'), got {key!r}")
        c = float(value)
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"cutoff[{key!r}] must be finite and >= 0, got {value!r}")
        pairs.append((_element(key[0], key), _element(key[1], key), c))
    size = max(int(numbers.max()) if len(numbers) else 0,
               *(max(a, b) for a, b, _ in pairs)) + 1
    table = np.zeros((size, size))
    for a, b, c in pairs:
        table[a, b] = table[b, a] = c
    return max(c for _, _, c in pairs), lambda i, j: table[numbers[i], numbers[j]]


def _periodic_cell(atoms: ase.Atoms) -> tuple[np.ndarray, np.ndarray]:
    """(cell [3, 3], pbc [3]) as float64 / bool arrays; a periodic axis needs a lattice vector."""
    pbc = np.array(atoms.pbc, dtype=bool)
    cell = np.ascontiguousarray(atoms.cell.array, dtype=np.float64)
    for k in np.flatnonzero(pbc):
        if not cell[k].any():
            raise ValueError(f"atoms.pbc is True along axis {k} but atoms.cell has no lattice "
                             f"vector there (row {k} is zero): periodic images and the shifts S "
                             f"need the cell; set atoms.cell, or atoms.pbc[{k}] = False")
    return cell, pbc


def _with_self_pairs(values: dict, ptr: np.ndarray, n: int) -> dict:
    """Insert (a, a, S=0) with distance 0 at the start of every row a, as ASE's
    self_interaction=True returns them (rows stay sorted by i)."""
    i = values["i"]
    rows = np.arange(n)
    pairs_to = np.arange(i.shape[0]) + i + 1  # each pair moves down by the self pairs before it
    self_to = ptr[:-1] + rows
    fill = {"i": rows, "j": rows, "d": 0.0, "D": 0.0, "S": 0}
    out = {}
    for q, x in values.items():
        y = np.empty((x.shape[0] + n, *x.shape[1:]), x.dtype)
        y[pairs_to] = x
        y[self_to] = fill[q]
        out[q] = y
    return out


def neighbor_list(quantities: str, a: ase.Atoms, cutoff, self_interaction: bool = False,
                  max_nbins: float = 1e6):
    """ASE's ``ase.neighborlist.neighbor_list`` on fastff's cell-list kernel: same signature,
    same pairs, same output.

    Each character of ``quantities`` asks for one numpy array, returned in that order (a single
    array for a single character): ``i`` and ``j`` int64 [E], the centre and neighbour atom;
    ``d`` float64 [E], the distance; ``D`` float64 [E, 3], the vector
    ``a.positions[j] - a.positions[i] + S @ a.cell``; ``S`` int64 [E, 3], the integer cell
    shifts. Pairs are sorted by ``i`` (order within a row differs from ASE's, which leaves it
    unspecified); the list is full: (i, j, S) and (j, i, -S) are both present. Periodic,
    triclinic, mixed-periodic and non-periodic Atoms and cells smaller than the cutoff are
    supported, as in ASE; positions need not be wrapped.

    Args:
        quantities: a string of characters from ``"ijdDS"``.
        a: the :class:`ase.Atoms` (Angstrom, or any unit the cutoff shares).
        cutoff: pairs closer than this are returned; as in ASE one of
            a float (all pairs);
            a dict of element pairs, e.g. ``{("H", "O"): 1.2, (6, 6): 1.85}`` (symbols or
            atomic numbers, either order; elements not named get no pairs);
            or per-atom radii [N] (pairs closer than ``r_i + r_j``).
        self_interaction: also return each atom as its own neighbour (S = 0, d = 0).
        max_nbins: accepted for ASE compatibility; fastff sizes its grid itself.

    Returns:
        One numpy array per quantity, as above.

    Raises:
        ValueError: an unknown quantity, a cutoff that is not finite and positive, an unknown
            element in a dict cutoff, or a periodic axis without a lattice vector (ASE would
            substitute a 1 A unit vector there).
    """
    del max_nbins  # ASE's memory bound on its bins; fastff's grid is bounded by the atom count
    if not isinstance(quantities, str) or any(q not in _QUANTITIES for q in quantities):
        raise ValueError(f"quantities must be a string of characters from 'ijdDS', got "
                         f"{quantities!r}")
    if not isinstance(a, ase.Atoms):
        raise TypeError(f"a must be an ase.Atoms, got {type(a).__name__}")
    largest, pair_cutoff = _pair_cutoffs(cutoff, a)
    cell, pbc = _periodic_cell(a)
    n = len(a)
    wanted = set(quantities) | ({"i"} if self_interaction else set()) | (
        {"i", "j", "d"} if pair_cutoff is not None else set())
    if n and largest > 0:
        values, ptr = _pairs(a.positions, cell, pbc, largest, wanted)
    else:
        values = {q: np.empty((0, 3) if q in "DS" else 0, _QUANTITIES[q]) for q in wanted}
        ptr = np.zeros(n + 1, np.int64)
    if self_interaction:
        values = _with_self_pairs(values, ptr, n)
    if pair_cutoff is not None:
        keep = values["d"] < pair_cutoff(values["i"], values["j"])
        values = {q: x[keep] for q, x in values.items()}
    out = tuple(values[q] for q in quantities)
    return out[0] if len(out) == 1 else out


def _pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float,
           wanted: set) -> tuple[dict, np.ndarray]:
    """The quantities in ``wanted`` as numpy arrays, and the CSR row pointer [N + 1]."""
    from fastff.neighbors import neighbor_list as build

    pos = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.float64))
    periodic = bool(pbc.any())
    cell_t = torch.from_numpy(cell) if periodic else None
    nl = build(pos, cutoff, cell_t, torch.from_numpy(pbc) if periodic else None)
    values = {}
    if "i" in wanted:
        values["i"] = nl.i.numpy()
    if "j" in wanted:
        values["j"] = nl.j.numpy()
    if "d" in wanted:
        values["d"] = nl.distances(pos, cell_t).numpy()  # the build's, no new work
    if "D" in wanted:
        values["D"] = nl.vectors(pos, cell_t).numpy()
    if "S" in wanted:
        values["S"] = nl.shifts.numpy().astype(np.int64)
    return values, nl.ptr.numpy()
