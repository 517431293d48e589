"""ASE calculator for fastff models (SchNet, PaiNN, ...) and MM force fields.

``fastff.ase.Calculator`` wraps either a model with the signature
``model(species, positions, cell, pbc, batch, *, nl=None) -> energies [B]`` or a
:class:`fastff.mm.ForceField` (``ff(positions, cell, nl) -> energy``) as an
``ase.calculators.calculator.Calculator``. ASE speaks eV and Angstrom; the calculator converts
from the model's units on the way in and out. It needs the ``ase`` package (imported here, not by
``import fastff``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ase.calculators.calculator as ase_calculator
import ase.units
import numpy as np
import torch
from ase.stress import full_3x3_to_voigt_6_stress
from torch import Tensor

from fastff import _checks, units
from fastff.mm import ForceField
from fastff.neighbors import NeighborList
from fastff.verlet import VerletList

__all__ = ["ENERGY_UNITS", "LENGTH_UNITS", "Calculator"]

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
