"""OpenMM runs fastff models: ``as_force`` (an ``openmm.PythonForce``) and the openmmml plugin.

``as_force(model, species)`` returns a PythonForce whose computation calls the model on the
positions OpenMM hands it and returns the energy and forces, converted from the model's units
(``model.length_unit``, ``model.energy_unit``, see :mod:`fastff.units`) to OpenMM's (nm,
kJ/mol). A Verlet list (the model's own, or one the force keeps) is reused across steps.
``MLPotential("fastff", model=model)`` (openmmml; the ``fastff`` entry point of the
``openmmml.potentials`` group, :func:`openmmml_plugin`) builds such forces for ``createSystem``
and, for ML/MM, ``createMixedSystem``. The model runs in Python, inside OpenMM's step: OpenMM's
CPU platform calls it once per step (PythonForce's own cost is tens of microseconds).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence

import numpy as np
import openmm
import torch
from openmm import unit
from torch import Tensor

from fastff import _checks, units
from fastff.verlet import VerletList

__all__ = ["DEFAULT_SKIN", "ModelComputation", "as_force", "openmmml_plugin"]

#: Verlet skin (nm) of the list a force keeps for a model without its own (as
#: fastff.ase.Calculator's 0.5 Angstrom).
DEFAULT_SKIN = 0.05


class ModelComputation:
    """The computation of the PythonForce made by :func:`as_force`: ``state -> (energy kJ/mol,
    forces [N, 3] kJ/mol/nm)``.

    Positions and the periodic box (rows are OpenMM's box vectors, as fastff's cell rows) are
    converted to the model's length unit and dtype; the model runs with its parameters'
    ``requires_grad`` off (forces need no parameter gradients) and under
    :func:`fastff.no_checks` (inputs were checked when the force was made; positions are
    checked for NaN each step). Picklable (OpenMM serialises it with the System) while the model
    is; the Verlet list is rebuilt after unpickling.
    """

    def __init__(self, model: torch.nn.Module, species: Tensor, *, periodic: bool,
                 nm_per_length: float, kj_per_energy: float, skin: float):
        self.model, self.species, self.periodic = model, species, bool(periodic)
        self.nm_per_length, self.kj_per_energy, self.skin = nm_per_length, kj_per_energy, skin
        ref = next(iter(model.parameters()), None)
        self.dtype = ref.dtype if ref is not None else torch.float64
        self.device = species.device
        self.pbc = torch.full((3,), self.periodic, dtype=torch.bool, device=self.device)
        cutoff = getattr(model, "cutoff", None)
        own = getattr(model, "verlet", None) is not None
        #: the reused list (None where the model keeps its own, or has no cutoff)
        self.verlet = None if (own or cutoff is None) else VerletList(
            float(cutoff), skin / nm_per_length, backend=getattr(model, "backend", None),
            compact=True)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["verlet"] = None if self.verlet is None else (self.verlet.cutoff, self.verlet.skin,
                                                            self.verlet.backend)
        own = getattr(self.model, "verlet", None)
        if isinstance(own, VerletList) and own.skin_list is not None:
            # a used list holds weak references, which do not pickle: a shallow copy of the
            # model (same parameters) with an empty list of the same settings goes instead
            model = copy.copy(self.model)
            model.__dict__["verlet"] = VerletList(own.cutoff, own.skin, half=own.half,
                                                  backend=own.backend, compact=own.compact)
            state["model"] = model
        return state

    def __setstate__(self, state):
        verlet = state.pop("verlet")
        self.__dict__.update(state)
        self.verlet = None if verlet is None else VerletList(
            verlet[0], verlet[1], backend=verlet[2], compact=True)

    def __call__(self, state: openmm.State) -> tuple[float, np.ndarray]:
        x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        if not math.isfinite(float(x.sum())):
            k = int(np.nonzero(~np.isfinite(x).all(axis=1))[0][0])
            raise ValueError(f"OpenMM handed fastff NaN or inf positions (first at particle {k} "
                             "of the force); the simulation has blown up")
        to_model = 1.0 / self.nm_per_length
        positions = torch.as_tensor(x, device=self.device).to(self.dtype)
        if to_model != 1.0:
            positions = positions * to_model
        cell = None
        if self.periodic:
            box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
            cell = torch.as_tensor(np.asarray(box) * to_model, device=self.device).to(self.dtype)
        energy, grad = self._evaluate(positions.requires_grad_(True), cell)
        forces = grad.detach().to("cpu", torch.float64).numpy()
        forces *= -self.kj_per_energy / self.nm_per_length
        return energy * self.kj_per_energy, forces

    def _evaluate(self, positions: Tensor, cell: Tensor | None) -> tuple[float, Tensor]:
        pbc = self.pbc if self.periodic else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        try:
            for p in params:
                p.requires_grad_(False)
            with torch.enable_grad(), _checks.no_checks():
                nl = None if self.verlet is None else self.verlet.update(positions, cell, pbc)
                energy = self.model(self.species, positions, cell, pbc, None, nl=nl).sum()
                (grad,) = torch.autograd.grad(energy, positions)
        finally:
            for p in params:
                p.requires_grad_(True)
        return float(energy.detach()), grad


def as_force(model: torch.nn.Module, species: Sequence[int] | np.ndarray | Tensor, *,
             atoms: Sequence[int] | None = None, periodic: bool | None = None,
             skin: float | None = None, length_unit: str | None = None,
             energy_unit: str | None = None) -> openmm.PythonForce:
    """An ``openmm.PythonForce`` computing a fastff model's energy and forces.

    Args:
        model: a fastff model (:class:`fastff.models.SchNet`, :class:`fastff.models.PaiNN`, one
            made by ``SchNet.from_pyg``, or any module called as
            ``model(species, positions, cell, pbc, batch, nl=...)`` returning energies [1]).
            It runs on its own device and dtype.
        species: atomic numbers [n] of the atoms the force acts on, in their order.
        atoms: indices of those atoms in the System (``PythonForce.setParticles``); None for
            every particle (then the System must have n particles).
        periodic: use the Context's periodic box (True) or treat the atoms as an isolated
            cluster; None means False, as for any PythonForce. openmmml passes the Topology's
            periodicity.
        skin: Verlet skin in nm of the list the force keeps for a model without its own
            (default :data:`DEFAULT_SKIN`); the list is reused until an atom moved skin / 2.
        length_unit: for a model without ``length_unit`` / ``energy_unit``; given
            for one with them, they must agree (:func:`fastff.units.model_units`).
        energy_unit: as ``length_unit``.

    Returns:
        The force, in OpenMM's units (kJ/mol, kJ/mol/nm), named "fastff <model class>"; its
        attribute ``computation`` is the :class:`ModelComputation` it calls. Add it to a System
        (``system.addForce``).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a fastff model), got "
                        f"{type(model).__name__}")
    if _is_pyg(model):
        raise TypeError("model is a torch_geometric model: convert it first, "
                        "fastff.models.SchNet.from_pyg(model, energy_unit=...)")
    length, energy = units.model_units(model, length_unit, energy_unit)
    cutoff = getattr(model, "cutoff", None)
    if cutoff is not None:
        units.check_cutoff(float(cutoff), units.nm(length), length)
    if periodic is not None and not isinstance(periodic, bool):
        raise TypeError(f"periodic must be True, False or None, got {periodic!r}")
    skin = DEFAULT_SKIN if skin is None else skin
    if isinstance(skin, bool) or not isinstance(skin, (int, float)) or not (
            math.isfinite(skin) and skin >= 0):
        raise ValueError(f"skin must be a finite number >= 0 (nm), got {skin!r}")
    ref = next(iter(model.parameters()), None)
    numbers = _species(species, model, ref.device if ref is not None else torch.device("cpu"))
    particles = _particles(atoms, numbers.shape[0])
    computation = ModelComputation(model, numbers, periodic=bool(periodic),
                                   nm_per_length=units.nm(length),
                                   kj_per_energy=units.kj_per_mol(energy), skin=float(skin))
    force = openmm.PythonForce(computation)
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setName(f"fastff {type(model).__name__}")
    if particles is not None:
        force.setParticles(particles)
    force.computation = computation  # for inspection (its Verlet list); OpenMM holds its own
    return force


def _is_pyg(model) -> bool:
    """A torch_geometric model (plain or accelerated), without importing torch_geometric."""
    return any(c.__module__.startswith("torch_geometric") for c in type(model).__mro__)


def _species(species, model, device: torch.device) -> Tensor:
    numbers = torch.as_tensor(np.asarray(species.cpu() if isinstance(species, Tensor)
                                         else species))
    if numbers.dim() != 1 or numbers.is_floating_point() or numbers.dtype == torch.bool:
        raise ValueError(f"species must be a 1-D sequence of atomic numbers, got "
                         f"{numbers.dtype} of shape {list(numbers.shape)}")
    numbers = numbers.to(torch.int64)
    top = getattr(model, "max_species", None)
    if top is not None and numbers.numel():
        bad = ((numbers < 0) | (numbers >= top)).nonzero()
        if bad.numel():
            k = int(bad[0, 0])
            raise ValueError(f"species[{k}] = {int(numbers[k])} is a species the model does not "
                             f"know: it takes atomic numbers in [0, {top}) (max_species)")
    return numbers.to(device)


def _particles(atoms, n: int) -> list[int] | None:
    if atoms is None:
        return None
    indices = [int(a) for a in atoms]
    if len(indices) != n:
        raise ValueError(f"atoms has {len(indices)} indices but species has {n} entries; give "
                         "one atomic number per atom of the force")
    if any(a < 0 for a in indices) or len(set(indices)) != len(indices):
        raise ValueError("atoms must be distinct particle indices >= 0")
    return indices


# --------------------------------------------------------------------------- openmmml plugin

def openmmml_plugin():
    """The factory openmmml registers as the potential "fastff" (entry point group
    ``openmmml.potentials``): ``MLPotential("fastff", model=model)``.

    ``model``: a fastff model, a ``torch_geometric.nn.models.SchNet`` (converted with
    :meth:`fastff.models.SchNet.from_pyg`; give ``energy_unit``), or the path of a torch-saved
    one. Other keyword arguments of ``MLPotential`` (``length_unit``, ``energy_unit``, ``skin``)
    go to :func:`as_force`. ``createSystem(topology)`` and ``createMixedSystem(topology,
    mm_system, ml_atoms)`` then take the atomic numbers from the Topology and its
    periodicity from the Topology's box.
    """
    factory, _ = _plugin_classes()
    return factory()


@functools.cache
def _plugin_classes():
    # openmmml imports this module's entry point while it is itself being imported: its base
    # classes are defined by then, but importing openmmml here at import time would be circular
    from openmmml.mlpotential import MLPotentialImpl, MLPotentialImplFactory

    class FastffPotentialImplFactory(MLPotentialImplFactory):
        """Creates :class:`FastffPotentialImpl` objects for ``MLPotential("fastff", ...)``."""

        def createImpl(self, name: str, **args) -> MLPotentialImpl:
            return FastffPotentialImpl(name, **args)

    class FastffPotentialImpl(MLPotentialImpl):
        """Adds an :func:`as_force` force for the ML atoms of a Topology."""

        def __init__(self, name: str, model=None, **options):
            if model is None:
                raise ValueError(f"MLPotential({name!r}) needs model=...: a fastff model, a "
                                 "torch_geometric SchNet (with energy_unit=...), or the path of "
                                 "a torch-saved one")
            unknown = set(options) - {"length_unit", "energy_unit", "skin"}
            if unknown:
                raise TypeError(f"MLPotential({name!r}) got unexpected arguments "
                                f"{sorted(unknown)}; it takes model, length_unit, energy_unit, "
                                "skin")
            self.name, self.model, self.options = name, _load_model(model, options), options

        def addForces(self, topology, system, atoms, forceGroup, **args):
            included = list(topology.atoms())
            if atoms is not None:
                included = [included[i] for i in atoms]
            missing = [a.index for a in included if a.element is None]
            if missing:
                raise ValueError(f"atom {missing[0]} of the Topology has no element; the model "
                                 "needs atomic numbers")
            periodic = topology.getPeriodicBoxVectors() is not None
            force = as_force(self.model, [a.element.atomic_number for a in included],
                             atoms=None if atoms is None else list(atoms), periodic=periodic,
                             **self.options)
            force.setForceGroup(forceGroup)
            system.addForce(force)

        def getMLLongRange(self) -> bool:
            return False  # a cutoff model: no long-range interactions of its own

    return FastffPotentialImplFactory, FastffPotentialImpl


def _load_model(model, options: dict) -> torch.nn.Module:
    """A fastff model from what MLPotential was given; a torch_geometric SchNet is converted
    (its units then move from ``options`` into the model)."""
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model = torch.load(model, weights_only=False, map_location="cpu")
    if _is_pyg(model):
        from fastff.models import SchNet

        if "energy_unit" not in options:
            raise ValueError("a torch_geometric model carries no units: give energy_unit=... "
                             "(and length_unit=..., default Angstrom) to MLPotential")
        model = SchNet.from_pyg(model, energy_unit=options.pop("energy_unit"),
                                length_unit=options.pop("length_unit", "Angstrom"))
    return model
