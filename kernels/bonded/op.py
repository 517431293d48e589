"""Custom ops of the bonded family (namespace ``fastff::``), their fake impls and autograd.

Each op returns the energy per system and, from the same pass over the terms, its gradients
with respect to positions, cells and the term parameters. Autograd
(fastff.kernels._runtime.energy_op): the first backward is a multiply, the second goes through
the torch reference, so derivatives of any order work. Every op takes the already resolved
backend name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastff.kernels._runtime import registry
from fastff.kernels._runtime.energy_op import register_energy_autograd
from fastff.kernels.bonded import reference

for _name in ("harmonic_bonds", "harmonic_angles", "periodic_torsions", "lj_coulomb_pairs",
              "bonded_terms"):
    registry.register(_name, "bonded", _name)


def _term_rows(x, name: str) -> Tensor | None:
    """System of each row of input ``name`` of a one-kind op: atoms for positions, the term's
    first atom for parameters, None for the cells."""
    if name == "cells":
        return None
    if name == "positions":
        return x.atom_system
    return x.atom_system[x.index[:, 0]]


def _energy_of(fn):
    """The reference energy of a one-kind op from its named inputs: ``fn``'s arguments are the
    op's, less param_grads and backend."""
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return lambda x: fn(*(getattr(x, n) for n in names))


_PARAMS = {"harmonic_bonds": ("k", "r0"), "harmonic_angles": ("k", "theta0"),
           "periodic_torsions": ("k", "phase"),  # periodicity is an integer per torsion
           "lj_coulomb_pairs": ("charge_prod", "sigma", "epsilon")}


@torch.library.custom_op("fastff::harmonic_bonds", mutates_args=())
def harmonic_bonds(positions: Tensor, cells: Tensor, inv_cells: Tensor, atom_system: Tensor,
                   periodic: bool, index: Tensor, k: Tensor, r0: Tensor, param_grads: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return registry.launch("harmonic_bonds", HARMONIC_BONDS, locals())


@harmonic_bonds.register_fake
def _(positions, cells, inv_cells, atom_system, periodic, index, k, r0, param_grads, backend):
    return (positions.new_empty(cells.shape[0]), torch.empty_like(positions),
            torch.empty_like(cells), torch.empty_like(k), torch.empty_like(r0))


@torch.library.custom_op("fastff::harmonic_angles", mutates_args=())
def harmonic_angles(positions: Tensor, cells: Tensor, inv_cells: Tensor, atom_system: Tensor,
                    periodic: bool, index: Tensor, k: Tensor, theta0: Tensor, param_grads: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return registry.launch("harmonic_angles", HARMONIC_ANGLES, locals())


@harmonic_angles.register_fake
def _(positions, cells, inv_cells, atom_system, periodic, index, k, theta0, param_grads, backend):
    return (positions.new_empty(cells.shape[0]), torch.empty_like(positions),
            torch.empty_like(cells), torch.empty_like(k), torch.empty_like(theta0))


@torch.library.custom_op("fastff::periodic_torsions", mutates_args=())
def periodic_torsions(positions: Tensor, cells: Tensor, inv_cells: Tensor, atom_system: Tensor,
                      periodic: bool, index: Tensor, k: Tensor, periodicity: Tensor,
                      phase: Tensor, param_grads: bool, backend: str
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return registry.launch("periodic_torsions", PERIODIC_TORSIONS, locals())


@periodic_torsions.register_fake
def _(positions, cells, inv_cells, atom_system, periodic, index, k, periodicity, phase,
      param_grads, backend):
    return (positions.new_empty(cells.shape[0]), torch.empty_like(positions),
            torch.empty_like(cells), torch.empty_like(k), torch.empty_like(phase))


@torch.library.custom_op("fastff::lj_coulomb_pairs", mutates_args=())
def lj_coulomb_pairs(positions: Tensor, cells: Tensor, inv_cells: Tensor, atom_system: Tensor,
                     periodic: bool, index: Tensor, charge_prod: Tensor, sigma: Tensor,
                     epsilon: Tensor, coulomb_constant: float, param_grads: bool, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return registry.launch("lj_coulomb_pairs", LJ_COULOMB_PAIRS, locals())


@lj_coulomb_pairs.register_fake
def _(positions, cells, inv_cells, atom_system, periodic, index, charge_prod, sigma, epsilon,
      coulomb_constant, param_grads, backend):
    return (positions.new_empty(cells.shape[0]), torch.empty_like(positions),
            torch.empty_like(cells), torch.empty_like(charge_prod), torch.empty_like(sigma),
            torch.empty_like(epsilon))


def _register_term(op, energy_fn, public_name: str):
    params = _PARAMS[op._name]
    return register_energy_autograd(
        op, diff=("positions", "cells", *params), rows=_term_rows, reference=_energy_of(energy_fn),
        params=params, param_flag="param_grads", name=public_name)


HARMONIC_BONDS = _register_term(harmonic_bonds, reference.harmonic_bonds_energy,
                                "fastff.mm.harmonic_bonds")
HARMONIC_ANGLES = _register_term(harmonic_angles, reference.harmonic_angles_energy,
                                 "fastff.mm.harmonic_angles")
PERIODIC_TORSIONS = _register_term(periodic_torsions, reference.periodic_torsions_energy,
                                   "fastff.mm.periodic_torsions")
LJ_COULOMB_PAIRS = _register_term(lj_coulomb_pairs, reference.lj_coulomb_pairs_energy,
                                  "fastff.mm.nonbonded (exceptions)")


# ------------------------------------------------------------ all bonded kinds in one op
@torch.library.custom_op("fastff::bonded_terms", mutates_args=())
def bonded_terms(positions: Tensor, cells: Tensor, inv_cells: Tensor, atom_system: Tensor,
                 bond_index: Tensor, bond_k: Tensor, bond_r0: Tensor, bonds_periodic: bool,
                 angle_index: Tensor, angle_k: Tensor, angle_theta0: Tensor,
                 angles_periodic: bool, torsion_index: Tensor, torsion_k: Tensor,
                 torsion_periodicity: Tensor, torsion_phase: Tensor, torsions_periodic: bool,
                 param_grads: bool, backend: str
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                            Tensor]:
    return registry.launch("bonded_terms", BONDED_TERMS, locals())


@bonded_terms.register_fake
def _(positions, cells, inv_cells, atom_system, bond_index, bond_k, bond_r0, bonds_periodic,
      angle_index, angle_k, angle_theta0, angles_periodic, torsion_index, torsion_k,
      torsion_periodicity, torsion_phase, torsions_periodic, param_grads, backend):
    return (positions.new_empty(cells.shape[0]), torch.empty_like(positions),
            torch.empty_like(cells), torch.empty_like(bond_k), torch.empty_like(bond_r0),
            torch.empty_like(angle_k), torch.empty_like(angle_theta0),
            torch.empty_like(torsion_k), torch.empty_like(torsion_phase))


# the index list whose first atom places each parameter's term in its system
_KIND_INDEX = {"bond_k": "bond_index", "bond_r0": "bond_index", "angle_k": "angle_index",
               "angle_theta0": "angle_index", "torsion_k": "torsion_index",
               "torsion_phase": "torsion_index"}


def _bonded_rows(x, name: str) -> Tensor | None:
    if name == "cells":
        return None
    if name == "positions":
        return x.atom_system
    return x.atom_system[getattr(x, _KIND_INDEX[name])[:, 0]]


BONDED_TERMS = register_energy_autograd(
    bonded_terms, diff=("positions", "cells", *_KIND_INDEX), rows=_bonded_rows,
    reference=_energy_of(reference.bonded_terms_energy), params=tuple(_KIND_INDEX),
    param_flag="param_grads", name="fastff.mm.bonded")
