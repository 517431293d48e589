"""Custom ops of the bonded family (namespace ``fastff::``), their fake impls and autograd.

Each op returns the energy per system and, from the same pass over the terms, its gradients
with respect to positions, cells and the term parameters. Autograd (fastff._energy_op): the
first backward is a multiply, the second goes through the torch reference, so derivatives of
any order work. Every op takes the already resolved backend name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastff import _backend
from fastff._energy_op import register_energy_autograd
from fastff.kernels.bonded import reference

for _name in ("harmonic_bonds", "harmonic_angles", "periodic_torsions", "lj_coulomb_pairs",
              "bonded_terms"):
    _backend.register(_name, "bonded", _name)


def _term_rows(inputs, k):
    if k == 1:
        return None
    if k == 0:
        return inputs[3]
    return inputs[3][inputs[5][:, 0]]


@torch.library.custom_op("fastff::harmonic_bonds", mutates_args=())
def harmonic_bonds(positions: Tensor, cells: Tensor, inv_cells: Tensor, atom_system: Tensor,
                   periodic: bool, index: Tensor, k: Tensor, r0: Tensor, param_grads: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    launch = _backend.launcher("harmonic_bonds", backend)
    return launch(positions, cells, inv_cells, atom_system, periodic, index, k, r0, param_grads)


@harmonic_bonds.register_fake
def _(positions, cells, inv_cells, atom_system, periodic, index, k, r0, param_grads, backend):
    return (positions.new_empty(cells.shape[0]), torch.empty_like(positions),
            torch.empty_like(cells), torch.empty_like(k), torch.empty_like(r0))


register_energy_autograd(
    harmonic_bonds, diff=(0, 1, 6, 7), rows=_term_rows, param_flag=8, params=(6, 7),
    reference=lambda p, c, inv, s, per, idx, k, r0, pg, be: reference.harmonic_bonds_energy(
        p, c, inv, s, per, idx, k, r0),
    name="fastff.mm.harmonic_bonds")


@torch.library.custom_op("fastff::harmonic_angles", mutates_args=())
def harmonic_angles(positions: Tensor, cells: Tensor, inv_cells: Tensor, atom_system: Tensor,
                    periodic: bool, index: Tensor, k: Tensor, theta0: Tensor, param_grads: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    launch = _backend.launcher("harmonic_angles", backend)
    return launch(positions, cells, inv_cells, atom_system, periodic, index, k, theta0,
                  param_grads)


@harmonic_angles.register_fake
def _(positions, cells, inv_cells, atom_system, periodic, index, k, theta0, param_grads, backend):
    return (positions.new_empty(cells.shape[0]), torch.empty_like(positions),
            torch.empty_like(cells), torch.empty_like(k), torch.empty_like(theta0))


register_energy_autograd(
    harmonic_angles, diff=(0, 1, 6, 7), rows=_term_rows, param_flag=8, params=(6, 7),
    reference=lambda p, c, inv, s, per, idx, k, t0, pg, be: reference.harmonic_angles_energy(
        p, c, inv, s, per, idx, k, t0),
    name="fastff.mm.harmonic_angles")


@torch.library.custom_op("fastff::periodic_torsions", mutates_args=())
def periodic_torsions(positions: Tensor, cells: Tensor, inv_cells: Tensor, atom_system: Tensor,
                      periodic: bool, index: Tensor, k: Tensor, periodicity: Tensor,
                      phase: Tensor, param_grads: bool, backend: str
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    launch = _backend.launcher("periodic_torsions", backend)
    return launch(positions, cells, inv_cells, atom_system, periodic, index, k, periodicity,
                  phase, param_grads)


@periodic_torsions.register_fake
def _(positions, cells, inv_cells, atom_system, periodic, index, k, periodicity, phase,
      param_grads, backend):
    return (positions.new_empty(cells.shape[0]), torch.empty_like(positions),
            torch.empty_like(cells), torch.empty_like(k), torch.empty_like(phase))


register_energy_autograd(
    periodic_torsions, diff=(0, 1, 6, 8), rows=_term_rows, param_flag=9, params=(6, 8),
    reference=lambda p, c, inv, s, per, idx, k, n, ph, pg, be: (
        reference.periodic_torsions_energy(p, c, inv, s, per, idx, k, n, ph)),
    name="fastff.mm.periodic_torsions")


@torch.library.custom_op("fastff::lj_coulomb_pairs", mutates_args=())
def lj_coulomb_pairs(positions: Tensor, cells: Tensor, inv_cells: Tensor, atom_system: Tensor,
                     periodic: bool, index: Tensor, charge_prod: Tensor, sigma: Tensor,
                     epsilon: Tensor, coulomb_constant: float, param_grads: bool, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    launch = _backend.launcher("lj_coulomb_pairs", backend)
    return launch(positions, cells, inv_cells, atom_system, periodic, index, charge_prod, sigma,
                  epsilon, coulomb_constant, param_grads)


@lj_coulomb_pairs.register_fake
def _(positions, cells, inv_cells, atom_system, periodic, index, charge_prod, sigma, epsilon,
      coulomb_constant, param_grads, backend):
    return (positions.new_empty(cells.shape[0]), torch.empty_like(positions),
            torch.empty_like(cells), torch.empty_like(charge_prod), torch.empty_like(sigma),
            torch.empty_like(epsilon))


register_energy_autograd(
    lj_coulomb_pairs, diff=(0, 1, 6, 7, 8), rows=_term_rows, param_flag=10, params=(6, 7, 8),
    reference=lambda p, c, inv, s, per, idx, qq, sg, ep, kc, pg, be: (
        reference.lj_coulomb_pairs_energy(p, c, inv, s, per, idx, qq, sg, ep, kc)),
    name="fastff.mm.nonbonded (exceptions)")


# ------------------------------------------------------------ all bonded kinds in one op
# Inputs: 0 positions, 1 cells, 2 inv_cells, 3 atom_system, 4-7 bonds (index, k, r0, periodic),
# 8-11 angles (index, k, theta0, periodic), 12-16 torsions (index, k, periodicity, phase,
# periodic), 17 param_grads, 18 backend.
_KIND_INDEX = {5: 4, 6: 4, 9: 8, 10: 8, 13: 12, 15: 12}


def _bonded_rows(inputs, k):
    if k == 1:
        return None
    if k == 0:
        return inputs[3]
    return inputs[3][inputs[_KIND_INDEX[k]][:, 0]]


@torch.library.custom_op("fastff::bonded_terms", mutates_args=())
def bonded_terms(positions: Tensor, cells: Tensor, inv_cells: Tensor, atom_system: Tensor,
                 bond_index: Tensor, bond_k: Tensor, bond_r0: Tensor, bonds_periodic: bool,
                 angle_index: Tensor, angle_k: Tensor, angle_theta0: Tensor,
                 angles_periodic: bool, torsion_index: Tensor, torsion_k: Tensor,
                 torsion_periodicity: Tensor, torsion_phase: Tensor, torsions_periodic: bool,
                 param_grads: bool, backend: str
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                            Tensor]:
    launch = _backend.launcher("bonded_terms", backend)
    return launch(positions, cells, inv_cells, atom_system, bond_index, bond_k, bond_r0,
                  bonds_periodic, angle_index, angle_k, angle_theta0, angles_periodic,
                  torsion_index, torsion_k, torsion_periodicity, torsion_phase,
                  torsions_periodic, param_grads)


@bonded_terms.register_fake
def _(positions, cells, inv_cells, atom_system, bond_index, bond_k, bond_r0, bonds_periodic,
      angle_index, angle_k, angle_theta0, angles_periodic, torsion_index, torsion_k,
      torsion_periodicity, torsion_phase, torsions_periodic, param_grads, backend):
    return (positions.new_empty(cells.shape[0]), torch.empty_like(positions),
            torch.empty_like(cells), torch.empty_like(bond_k), torch.empty_like(bond_r0),
            torch.empty_like(angle_k), torch.empty_like(angle_theta0),
            torch.empty_like(torsion_k), torch.empty_like(torsion_phase))


register_energy_autograd(
    bonded_terms, diff=(0, 1, 5, 6, 9, 10, 13, 15), rows=_bonded_rows, param_flag=17,
    params=(5, 6, 9, 10, 13, 15),
    reference=lambda *inputs: reference.bonded_terms_energy(*inputs[:17]),
    name="fastff.mm.bonded")
