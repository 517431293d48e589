"""Bonded terms in pure torch: the definition every other path is tested against.

Autograd-native and float64-safe (derivatives of any order come from torch); it keeps several
per-term temporaries, so it serves tests and the double-backward path of the fused kernels.
Launchers share their signatures with cpu_numba.py and gpu_triton.py; README.md beside this
file gives the maths and conventions (OpenMM's).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _vector(positions: Tensor, cells: Tensor, inv_cells: Tensor, system: Tensor, a: Tensor,
            b: Tensor, periodic: bool) -> Tensor:
    """x_b - x_a, reduced to the minimum image (rounded fractional coordinates) if periodic."""
    r = positions[b] - positions[a]
    if periodic:
        n = torch.round(torch.einsum("eb,eba->ea", r.detach(), inv_cells[system]))
        r = r - torch.einsum("ea,eab->eb", n, cells[system])
    return r


def _per_system(e: Tensor, system: Tensor, num_systems: int) -> Tensor:
    return e.new_zeros(num_systems).index_add(0, system, e)


def harmonic_bonds_energy(positions, cells, inv_cells, atom_system, periodic, index, k, r0):
    """sum 1/2 k (|x_j - x_i| - r0)^2 per system [B]."""
    system = atom_system[index[:, 0]]
    r = _vector(positions, cells, inv_cells, system, index[:, 0], index[:, 1], periodic)
    d = torch.linalg.vector_norm(r, dim=1)
    return _per_system(0.5 * k * (d - r0) ** 2, system, cells.shape[0])


def _angle(u: Tensor, v: Tensor) -> Tensor:
    return torch.atan2(torch.linalg.vector_norm(torch.linalg.cross(u, v), dim=1),
                       (u * v).sum(dim=1))


def harmonic_angles_energy(positions, cells, inv_cells, atom_system, periodic, index, k, theta0):
    """sum 1/2 k (theta_ijk - theta0)^2 per system [B]; j is the vertex."""
    system = atom_system[index[:, 0]]
    u = _vector(positions, cells, inv_cells, system, index[:, 1], index[:, 0], periodic)
    v = _vector(positions, cells, inv_cells, system, index[:, 1], index[:, 2], periodic)
    return _per_system(0.5 * k * (_angle(u, v) - theta0) ** 2, system, cells.shape[0])


def dihedral(b1: Tensor, b2: Tensor, b3: Tensor) -> Tensor:
    """IUPAC dihedral angle in (-pi, pi] of bond vectors b1 = x_j - x_i, b2, b3."""
    n1 = torch.linalg.cross(b1, b2)
    n2 = torch.linalg.cross(b2, b3)
    y = torch.linalg.vector_norm(b2, dim=1) * (b1 * n2).sum(dim=1)
    return torch.atan2(y, (n1 * n2).sum(dim=1))


def periodic_torsions_energy(positions, cells, inv_cells, atom_system, periodic, index, k,
                             periodicity, phase):
    """sum k (1 + cos(n phi - phase)) per system [B]."""
    system = atom_system[index[:, 0]]
    b1 = _vector(positions, cells, inv_cells, system, index[:, 0], index[:, 1], periodic)
    b2 = _vector(positions, cells, inv_cells, system, index[:, 1], index[:, 2], periodic)
    b3 = _vector(positions, cells, inv_cells, system, index[:, 2], index[:, 3], periodic)
    phi = dihedral(b1, b2, b3)
    e = k * (1.0 + torch.cos(periodicity.to(phi.dtype) * phi - phase))
    return _per_system(e, system, cells.shape[0])


def lj_coulomb_pairs_energy(positions, cells, inv_cells, atom_system, periodic, index,
                            charge_prod, sigma, epsilon, coulomb_constant):
    """sum kc qq / r + 4 eps ((sigma/r)^12 - (sigma/r)^6) per system [B]: no cutoff."""
    system = atom_system[index[:, 0]]
    r = _vector(positions, cells, inv_cells, system, index[:, 0], index[:, 1], periodic)
    d = torch.linalg.vector_norm(r, dim=1)
    x6 = (sigma / d) ** 6
    e = coulomb_constant * charge_prod / d + 4.0 * epsilon * (x6 * x6 - x6)
    return _per_system(e, system, cells.shape[0])


def _launch(energy_fn, positions, cells, inv_cells, atom_system, periodic, index, params,
            fixed, param_grads):
    from fastff.kernels._runtime.energy_op import reference_gradients

    def energy(p, c, *prm):
        return energy_fn(p, c, inv_cells, atom_system, periodic, index, *prm, *fixed)

    pg = bool(param_grads)
    e, grads = reference_gradients(energy, (positions, cells, *params),
                                   (True, True) + (pg,) * len(params))
    return (e, *grads)


def harmonic_bonds(positions, cells, inv_cells, atom_system, periodic, index, k, r0, param_grads):
    return _launch(harmonic_bonds_energy, positions, cells, inv_cells, atom_system, periodic,
                   index, (k, r0), (), param_grads)


def harmonic_angles(positions, cells, inv_cells, atom_system, periodic, index, k, theta0,
                    param_grads):
    return _launch(harmonic_angles_energy, positions, cells, inv_cells, atom_system, periodic,
                   index, (k, theta0), (), param_grads)


def periodic_torsions(positions, cells, inv_cells, atom_system, periodic, index, k, periodicity,
                      phase, param_grads):
    def energy(p, c, inv, sysm, per, idx, k_, phase_):
        return periodic_torsions_energy(p, c, inv, sysm, per, idx, k_, periodicity, phase_)

    return _launch(energy, positions, cells, inv_cells, atom_system, periodic, index,
                   (k, phase), (), param_grads)


def lj_coulomb_pairs(positions, cells, inv_cells, atom_system, periodic, index, charge_prod,
                     sigma, epsilon, coulomb_constant, param_grads):
    return _launch(lj_coulomb_pairs_energy, positions, cells, inv_cells, atom_system, periodic,
                   index, (charge_prod, sigma, epsilon), (coulomb_constant,), param_grads)


def bonded_terms_energy(positions, cells, inv_cells, atom_system, bond_index, bond_k, bond_r0,
                        bonds_periodic, angle_index, angle_k, angle_theta0, angles_periodic,
                        torsion_index, torsion_k, torsion_periodicity, torsion_phase,
                        torsions_periodic):
    """Bonds + angles + torsions per system [B]: the energy of the fused op."""
    return (harmonic_bonds_energy(positions, cells, inv_cells, atom_system, bonds_periodic,
                                  bond_index, bond_k, bond_r0)
            + harmonic_angles_energy(positions, cells, inv_cells, atom_system, angles_periodic,
                                     angle_index, angle_k, angle_theta0)
            + periodic_torsions_energy(positions, cells, inv_cells, atom_system,
                                       torsions_periodic, torsion_index, torsion_k,
                                       torsion_periodicity, torsion_phase))


def bonded_terms_by_kind(bonds, angles, torsions, positions, cells, inv_cells, atom_system,
                         bond_index, bond_k, bond_r0, bonds_periodic, angle_index, angle_k,
                         angle_theta0, angles_periodic, torsion_index, torsion_k,
                         torsion_periodicity, torsion_phase, torsions_periodic, param_grads):
    """The fused op's outputs from one launcher per kind (``bonds``, ``angles``, ``torsions``):
    energies, position and cell gradients add; parameter gradients follow in kind order."""
    common = (positions, cells, inv_cells, atom_system)
    outputs = (bonds(*common, bonds_periodic, bond_index, bond_k, bond_r0, param_grads),
               angles(*common, angles_periodic, angle_index, angle_k, angle_theta0, param_grads),
               torsions(*common, torsions_periodic, torsion_index, torsion_k, torsion_periodicity,
                        torsion_phase, param_grads))
    energy = sum(out[0] for out in outputs)
    g_pos = sum(out[1] for out in outputs)
    g_cells = sum(out[2] for out in outputs)
    return (energy, g_pos, g_cells, *(g for out in outputs for g in out[3:]))


def bonded_terms(positions, cells, inv_cells, atom_system, bond_index, bond_k, bond_r0,
                 bonds_periodic, angle_index, angle_k, angle_theta0, angles_periodic,
                 torsion_index, torsion_k, torsion_periodicity, torsion_phase, torsions_periodic,
                 param_grads):
    return bonded_terms_by_kind(
        harmonic_bonds, harmonic_angles, periodic_torsions, positions, cells, inv_cells,
        atom_system, bond_index, bond_k, bond_r0, bonds_periodic, angle_index, angle_k,
        angle_theta0, angles_periodic, torsion_index, torsion_k, torsion_periodicity,
        torsion_phase, torsions_periodic, param_grads)
