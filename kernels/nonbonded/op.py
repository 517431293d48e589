"""Custom op of the nonbonded family (namespace ``fastff::``), its fake impl and autograd.

``fastff::nonbonded`` returns the energy per system and, from the same pass over the pairs, its
gradients with respect to positions, cells, charges, sigma and epsilon. Its autograd
(fastff._energy_op) makes the first backward a multiply and routes the second through the
torch reference, so derivatives of any order work. The op takes the already resolved backend
name; only this file knows all three paths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastff import _backend
from fastff._energy_op import register_energy_autograd
from fastff.kernels.nonbonded import reference

_backend.register("nonbonded", "nonbonded", "nonbonded")


@torch.library.custom_op("fastff::nonbonded", mutates_args=())
def nonbonded(positions: Tensor, cells: Tensor, atom_system: Tensor, i: Tensor, j: Tensor,
              shifts: Tensor, ptr: Tensor, excl_ptr: Tensor, excl_j: Tensor, charges: Tensor,
              sigma: Tensor, epsilon: Tensor, cutoff: float, switch_distance: float,
              coulomb: int, lj: bool, k_rf: float, c_rf: float, alpha: float,
              coulomb_constant: float, param_grads: bool, half: bool, backend: str
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    launch = _backend.launcher("nonbonded", backend)
    return launch(positions, cells, atom_system, i, j, shifts, ptr, excl_ptr, excl_j, charges,
                  sigma, epsilon, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha,
                  coulomb_constant, param_grads, half)


@nonbonded.register_fake
def _(positions, cells, atom_system, i, j, shifts, ptr, excl_ptr, excl_j, charges, sigma,
      epsilon, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha, coulomb_constant,
      param_grads, half, backend):
    return (positions.new_empty(cells.shape[0]), torch.empty_like(positions),
            torch.empty_like(cells), torch.empty_like(charges), torch.empty_like(sigma),
            torch.empty_like(epsilon))


def _reference(positions, cells, atom_system, i, j, shifts, ptr, excl_ptr, excl_j, charges,
               sigma, epsilon, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha,
               coulomb_constant, param_grads, half, backend):
    return reference.nonbonded_energy(positions, cells, atom_system, i, j, shifts, excl_ptr,
                                      excl_j, charges, sigma, epsilon, cutoff, switch_distance,
                                      coulomb, lj, k_rf, c_rf, alpha, coulomb_constant, half)


def _rows(inputs, k):
    return None if k == 1 else inputs[2]


register_energy_autograd(nonbonded, diff=(0, 1, 9, 10, 11), rows=_rows, reference=_reference,
                         param_flag=20, params=(9, 10, 11), name="fastff.mm.nonbonded")


# The cluster-pair layout (cpu_clusters.py) is a CPU optimization of the same energy for one
# system: numba and the reference (which expands the clusters into pairs); no Triton path (CUDA
# runs the pair list). Forces, energy and cell gradient only.
_backend.register("nonbonded_clusters", "nonbonded", "nonbonded_clusters",
                  backends=("numba", "reference"))


@torch.library.custom_op("fastff::nonbonded_clusters", mutates_args=())
def nonbonded_clusters(positions: Tensor, cells: Tensor, slot_atom: Tensor, slot_wrap: Tensor,
                       cluster_ptr: Tensor, entry_j: Tensor, entry_shift: Tensor,
                       entry_mask: Tensor, charges: Tensor, sigma: Tensor, epsilon: Tensor,
                       cutoff: float, switch_distance: float, coulomb: int, lj: bool,
                       k_rf: float, c_rf: float, alpha: float, coulomb_constant: float,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    launch = _backend.launcher("nonbonded_clusters", backend)
    return launch(positions, cells, slot_atom, slot_wrap, cluster_ptr, entry_j, entry_shift,
                  entry_mask, charges, sigma, epsilon, cutoff, switch_distance, coulomb, lj,
                  k_rf, c_rf, alpha, coulomb_constant)


@nonbonded_clusters.register_fake
def _(positions, cells, slot_atom, slot_wrap, cluster_ptr, entry_j, entry_shift, entry_mask,
      charges, sigma, epsilon, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha,
      coulomb_constant, backend):
    return positions.new_empty(1), torch.empty_like(positions), torch.empty_like(cells)


def _cluster_reference(positions, cells, slot_atom, slot_wrap, cluster_ptr, entry_j,
                       entry_shift, entry_mask, charges, sigma, epsilon, cutoff,
                       switch_distance, coulomb, lj, k_rf, c_rf, alpha, coulomb_constant,
                       backend):
    i, j, shifts = reference.cluster_pairs(slot_atom, slot_wrap, cluster_ptr, entry_j,
                                           entry_shift, entry_mask, 8)
    n = positions.shape[0]
    system = torch.zeros(n, dtype=torch.int64, device=positions.device)
    no_excl = torch.zeros(n + 1, dtype=torch.int64, device=positions.device)
    return reference.nonbonded_energy(positions, cells, system, i, j, shifts, no_excl,
                                      no_excl[:0], charges, sigma, epsilon, cutoff,
                                      switch_distance, coulomb, lj, k_rf, c_rf, alpha,
                                      coulomb_constant, half=True)


register_energy_autograd(nonbonded_clusters, diff=(0, 1), rows=lambda inputs, k: None,
                         reference=_cluster_reference, param_flag=0, params=(),
                         name="fastff.mm.nonbonded (clusters)")
