"""Custom op of the nonbonded family (namespace ``fastff::``), its fake impl and autograd.

``fastff::nonbonded`` returns the energy per system and, from the same pass over the pairs, its
gradients with respect to positions, cells, charges, sigma and epsilon. Its autograd
(fastff.kernels._runtime.energy_op) makes the first backward a multiply and routes the second
through the torch reference, so derivatives of any order work. The op takes the already
resolved backend name; only this file knows all three paths.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastff.kernels._runtime import registry
from fastff.kernels._runtime.args import OpArgs
from fastff.kernels._runtime.energy_op import register_energy_autograd
from fastff.kernels.nonbonded import reference


class PairSettings(NamedTuple):
    """The pair potential's method and constants, as the nonbonded ops take them (in this order,
    after the per-atom parameters): see README.md for each."""

    cutoff: float
    switch_distance: float
    coulomb: int
    lj: bool
    k_rf: float
    c_rf: float
    alpha: float
    coulomb_constant: float


registry.register("nonbonded", "nonbonded", "nonbonded")


@torch.library.custom_op("fastff::nonbonded", mutates_args=())
def nonbonded(positions: Tensor, cells: Tensor, atom_system: Tensor, i: Tensor, j: Tensor,
              shifts: Tensor, ptr: Tensor, excl_ptr: Tensor, excl_j: Tensor, charges: Tensor,
              sigma: Tensor, epsilon: Tensor, cutoff: float, switch_distance: float,
              coulomb: int, lj: bool, k_rf: float, c_rf: float, alpha: float,
              coulomb_constant: float, param_grads: bool, half: bool, backend: str
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return registry.launch("nonbonded", NONBONDED, locals())


@nonbonded.register_fake
def _(positions, cells, atom_system, i, j, shifts, ptr, excl_ptr, excl_j, charges, sigma,
      epsilon, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha, coulomb_constant,
      param_grads, half, backend):
    return (positions.new_empty(cells.shape[0]), torch.empty_like(positions),
            torch.empty_like(cells), torch.empty_like(charges), torch.empty_like(sigma),
            torch.empty_like(epsilon))


def _nonbonded_reference(x) -> Tensor:
    return reference.nonbonded_energy(x.positions, x.cells, x.atom_system, x.i, x.j, x.shifts,
                                      x.excl_ptr, x.excl_j, x.charges, x.sigma, x.epsilon,
                                      *NONBONDED.settings(x, PairSettings), x.half)


def _nonbonded_rows(x, name: str) -> Tensor | None:
    return None if name == "cells" else x.atom_system


NONBONDED = register_energy_autograd(
    nonbonded, diff=("positions", "cells", "charges", "sigma", "epsilon"), rows=_nonbonded_rows,
    reference=_nonbonded_reference, params=("charges", "sigma", "epsilon"),
    param_flag="param_grads", name="fastff.mm.nonbonded")


# The cluster-pair layout (cpu_clusters.py) is a CPU optimization of the same energy for one
# system: numba and the reference (which expands the clusters into pairs); no Triton path (CUDA
# runs the pair list). Forces, energy and cell gradient only.
registry.register("nonbonded_clusters", "nonbonded", "nonbonded_clusters",
                  backends=("numba", "reference"))


@torch.library.custom_op("fastff::nonbonded_clusters", mutates_args=())
def nonbonded_clusters(positions: Tensor, cells: Tensor, slot_atom: Tensor, slot_wrap: Tensor,
                       cluster_ptr: Tensor, entry_j: Tensor, entry_shift: Tensor,
                       entry_mask: Tensor, charges: Tensor, sigma: Tensor, epsilon: Tensor,
                       cutoff: float, switch_distance: float, coulomb: int, lj: bool,
                       k_rf: float, c_rf: float, alpha: float, coulomb_constant: float,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return registry.launch("nonbonded_clusters", NONBONDED_CLUSTERS, locals())


@nonbonded_clusters.register_fake
def _(positions, cells, slot_atom, slot_wrap, cluster_ptr, entry_j, entry_shift, entry_mask,
      charges, sigma, epsilon, cutoff, switch_distance, coulomb, lj, k_rf, c_rf, alpha,
      coulomb_constant, backend):
    return positions.new_empty(1), torch.empty_like(positions), torch.empty_like(cells)


def _cluster_reference(x) -> Tensor:
    i, j, shifts = reference.cluster_pairs(x.slot_atom, x.slot_wrap, x.cluster_ptr, x.entry_j,
                                           x.entry_shift, x.entry_mask, reference.CLUSTER_LANES)
    n = x.positions.shape[0]
    system = torch.zeros(n, dtype=torch.int64, device=x.positions.device)
    no_excl = torch.zeros(n + 1, dtype=torch.int64, device=x.positions.device)
    return reference.nonbonded_energy(x.positions, x.cells, system, i, j, shifts, no_excl,
                                      no_excl[:0], x.charges, x.sigma, x.epsilon,
                                      *NONBONDED_CLUSTERS.settings(x, PairSettings), half=True)


NONBONDED_CLUSTERS = register_energy_autograd(
    nonbonded_clusters, diff=("positions", "cells"), rows=lambda x, name: None,
    reference=_cluster_reference, name="fastff.mm.nonbonded (clusters)")


# The cluster-tile layout (gpu_clusters.py) is the GPU's MD path for one system: Triton and the
# reference (which expands the tiles into pairs). Forces, energy and cell gradient only; the
# list is built in place, in capacity mode, by cluster_list_into.
registry.register("nonbonded_tiles", "nonbonded", "nonbonded_tiles",
                  backends=("triton", "reference"))
registry.register("cluster_list_into", "nonbonded", "cluster_list_into",
                  backends=("triton", "reference"))


@torch.library.custom_op("fastff::nonbonded_tiles", mutates_args=())
def nonbonded_tiles(positions: Tensor, cells: Tensor, order: Tensor, tile_ptr: Tensor,
                    tile_j: Tensor, tile_x: Tensor, masks: Tensor, charges: Tensor,
                    sigma: Tensor, epsilon: Tensor, cutoff: float, switch_distance: float,
                    coulomb: int, lj: bool, k_rf: float, c_rf: float, alpha: float,
                    coulomb_constant: float, periodic: bool, backend: str
                    ) -> tuple[Tensor, Tensor, Tensor]:
    return registry.launch("nonbonded_tiles", NONBONDED_TILES, locals())


@nonbonded_tiles.register_fake
def _(positions, cells, order, tile_ptr, tile_j, tile_x, masks, charges, sigma, epsilon, cutoff,
      switch_distance, coulomb, lj, k_rf, c_rf, alpha, coulomb_constant, periodic, backend):
    return positions.new_empty(1), torch.empty_like(positions), torch.empty_like(cells)


def _tiles_reference(x) -> Tensor:
    i, j, shifts = reference.tile_pairs(x.positions, x.cells, x.order, x.tile_ptr, x.tile_j,
                                        x.tile_x, x.masks, x.periodic)
    n = x.positions.shape[0]
    system = torch.zeros(n, dtype=torch.int64, device=x.positions.device)
    no_excl = torch.zeros(n + 1, dtype=torch.int64, device=x.positions.device)
    return reference.nonbonded_energy(x.positions, x.cells, system, i, j, shifts, no_excl,
                                      no_excl[:0], x.charges, x.sigma, x.epsilon,
                                      *NONBONDED_TILES.settings(x, PairSettings), half=True)


NONBONDED_TILES = register_energy_autograd(
    nonbonded_tiles, diff=("positions", "cells"), rows=lambda x, name: None,
    reference=_tiles_reference, name="fastff.mm.nonbonded (tiles)")


@torch.library.custom_op("fastff::cluster_list_into",
                         mutates_args=("status", "reference", "ref_cells", "order", "slot",
                                       "tile_ptr", "xtile_ptr", "tile_j", "tile_x", "masks"))
def cluster_list_into(positions: Tensor, cells: Tensor, periodic: bool, cutoff: float,
                      rlist: float, excl_ptr: Tensor, excl_j: Tensor, max_exclusions: int,
                      status: Tensor, reference: Tensor, ref_cells: Tensor, order: Tensor,
                      slot: Tensor, tile_ptr: Tensor, xtile_ptr: Tensor, tile_j: Tensor,
                      tile_x: Tensor, masks: Tensor, backend: str) -> None:
    registry.launch("cluster_list_into", CLUSTER_LIST_INTO, locals())


@cluster_list_into.register_fake
def _(positions, cells, periodic, cutoff, rlist, excl_ptr, excl_j, max_exclusions, status,
      reference, ref_cells, order, slot, tile_ptr, xtile_ptr, tile_j, tile_x, masks, backend):
    return None


CLUSTER_LIST_INTO = OpArgs(cluster_list_into)
