"""Custom ops of the neighbor-list family (namespace ``fastff::``), their fake impls and autograd.

* ``neighbor_list``: pairs within a cutoff; integer outputs, data-dependent length E.
* ``pair_vectors`` and ``pair_vectors_transpose``: r_ij = r_j - r_i + S @ cell and its adjoint.
  The map is linear in (positions, cell), so each op's backward is the other op: derivatives of
  any order work.
* ``neighbor_reverse``: the mirror index of every pair of a full list.
* ``neighbor_compact`` and ``neighbor_compact_reverse``: the pairs of a list within a smaller
  cutoff (a Verlet list's pairs within the interaction cutoff) and their mirror index, mapped
  from the source list's. Integer outputs only; no Triton kernel (CUDA runs the torch path).
* ``pair_distances``: |r_ij| without the [E, 3] vectors. Its first-order backward is one fused
  pass (``pair_distances_transpose``: g_e r_ij / |r_ij| to the atoms and the cell without [E, 3]
  temporaries); with ``create_graph`` it is built from ``pair_vectors`` and
  ``pair_vectors_transpose``, so any order works. No Triton kernels (CUDA runs the torch path).


* ``verlet_check`` and ``neighbor_list_into``: the capacity mode of Verlet lists, in place on
  device buffers: the rebuild test sets flags of a status word, and the list is rebuilt into
  fixed-capacity buffers only when a flag asks for it; no host synchronisation on CUDA
  (kernels/_runtime/status.py). Triton and the torch reference.

Every op takes the already resolved backend name (see fastff.kernels._runtime.registry); only
this file knows all three paths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastff.kernels._runtime import registry
from fastff.kernels._runtime.args import OpArgs

registry.register("neighbor_list", "neighbors", "neighbor_list")
registry.register("pair_vectors", "neighbors", "pair_vectors")
registry.register("pair_vectors_transpose", "neighbors", "pair_vectors_transpose")
registry.register("neighbor_reverse", "neighbors", "neighbor_reverse")
registry.register("neighbor_compact", "neighbors", "neighbor_compact",
                  backends=("numba", "reference"))
registry.register("neighbor_compact_reverse", "neighbors", "neighbor_compact_reverse",
                  backends=("numba", "reference"))
registry.register("pair_distances", "neighbors", "pair_distances",
                  backends=("numba", "reference"))
registry.register("pair_distances_transpose", "neighbors", "pair_distances_transpose",
                  backends=("numba", "reference"))


registry.register("verlet_check", "neighbors", "verlet_check", backends=("triton", "reference"))
registry.register("neighbor_list_into", "neighbors", "neighbor_list_into",
                  backends=("triton", "reference"))


@torch.library.custom_op("fastff::neighbor_list", mutates_args=())
def neighbor_list(positions: Tensor, cutoff: float, cells: Tensor, pbc: Tensor,
                  system_ptr: Tensor, half: bool, backend: str
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return registry.launch("neighbor_list", _SPECS["neighbor_list"], locals())


@neighbor_list.register_fake
def _(positions, cutoff, cells, pbc, system_ptr, half, backend):
    num_pairs = torch.library.get_ctx().new_dynamic_size()
    i = positions.new_empty(num_pairs, dtype=torch.int64)
    return (i, torch.empty_like(i), positions.new_empty(num_pairs, 3, dtype=torch.int32),
            positions.new_empty(positions.shape[0] + 1, dtype=torch.int64),
            positions.new_empty(num_pairs))


@torch.library.custom_op("fastff::pair_vectors", mutates_args=())
def pair_vectors(positions: Tensor, cells: Tensor, atom_system: Tensor | None, i: Tensor,
                 j: Tensor, shifts: Tensor, backend: str) -> Tensor:
    return registry.launch("pair_vectors", _SPECS["pair_vectors"], locals())


@pair_vectors.register_fake
def _(positions, cells, atom_system, i, j, shifts, backend):
    return positions.new_empty(i.shape[0], 3)


@torch.library.custom_op("fastff::pair_vectors_transpose", mutates_args=())
def pair_vectors_transpose(grad: Tensor, num_atoms: int, cells: Tensor,
                           atom_system: Tensor | None, i: Tensor, j: Tensor, shifts: Tensor,
                           backend: str) -> tuple[Tensor, Tensor]:
    return registry.launch("pair_vectors_transpose", _SPECS["pair_vectors_transpose"], locals())


@pair_vectors_transpose.register_fake
def _(grad, num_atoms, cells, atom_system, i, j, shifts, backend):
    return grad.new_empty(num_atoms, 3), grad.new_empty(cells.shape)


PAIR_VECTORS = OpArgs(pair_vectors)
PAIR_VECTORS_TRANSPOSE = OpArgs(pair_vectors_transpose)


def _save_geometry(ctx, x, num_atoms: int) -> None:
    """What either op's backward (the other op) needs: the pairs, the cells and the backend."""
    ctx.save_for_backward(x.cells, x.atom_system, x.i, x.j, x.shifts)
    ctx.num_atoms, ctx.backend = num_atoms, x.backend


def _pair_vectors_setup(ctx, inputs, output):
    x = PAIR_VECTORS(inputs)
    _save_geometry(ctx, x, x.positions.shape[0])


def _pair_vectors_backward(ctx, grad):
    cells, atom_system, i, j, shifts = ctx.saved_tensors
    needs = PAIR_VECTORS(ctx.needs_input_grad)
    grad_pos, grad_cells = pair_vectors_transpose(grad.contiguous(), ctx.num_atoms, cells,
                                                  atom_system, i, j, shifts, ctx.backend)
    return PAIR_VECTORS.grads(positions=grad_pos if needs.positions else None,
                              cells=grad_cells if needs.cells else None)


def _transpose_setup(ctx, inputs, output):
    x = PAIR_VECTORS_TRANSPOSE(inputs)
    _save_geometry(ctx, x, x.num_atoms)


def _transpose_backward(ctx, grad_grad_pos, grad_grad_cells):
    cells, atom_system, i, j, shifts = ctx.saved_tensors
    if grad_grad_pos is None:
        grad_grad_pos = cells.new_zeros(ctx.num_atoms, 3)
    if grad_grad_cells is None:
        grad_grad_cells = torch.zeros_like(cells)
    grad = pair_vectors(grad_grad_pos.contiguous(), grad_grad_cells.contiguous(), atom_system,
                        i, j, shifts, ctx.backend)
    return PAIR_VECTORS_TRANSPOSE.grads(grad=grad)


pair_vectors.register_autograd(_pair_vectors_backward, setup_context=_pair_vectors_setup)
pair_vectors_transpose.register_autograd(_transpose_backward, setup_context=_transpose_setup)


@torch.library.custom_op("fastff::neighbor_reverse", mutates_args=())
def neighbor_reverse(i: Tensor, j: Tensor, shifts: Tensor, ptr: Tensor, backend: str) -> Tensor:
    return registry.launch("neighbor_reverse", _SPECS["neighbor_reverse"], locals())


@neighbor_reverse.register_fake
def _(i, j, shifts, ptr, backend):
    return torch.empty_like(i)


@torch.library.custom_op("fastff::neighbor_compact", mutates_args=())
def neighbor_compact(positions: Tensor, cells: Tensor, atom_system: Tensor | None, i: Tensor,
                     j: Tensor, shifts: Tensor, ptr: Tensor, cutoff: float, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return registry.launch("neighbor_compact", _SPECS["neighbor_compact"], locals())


@neighbor_compact.register_fake
def _(positions, cells, atom_system, i, j, shifts, ptr, cutoff, backend):
    num_pairs = torch.library.get_ctx().new_dynamic_size()
    new_i = i.new_empty(num_pairs)
    return (new_i, torch.empty_like(new_i), shifts.new_empty(num_pairs, 3, dtype=torch.int32),
            torch.empty_like(ptr), i.new_empty(i.shape[0], dtype=torch.int32))


@torch.library.custom_op("fastff::neighbor_compact_reverse", mutates_args=())
def neighbor_compact_reverse(reverse: Tensor, j: Tensor, ptr: Tensor, rank: Tensor,
                             new_ptr: Tensor, num_pairs: int, backend: str) -> Tensor:
    return registry.launch("neighbor_compact_reverse", _SPECS["neighbor_compact_reverse"], locals())


@neighbor_compact_reverse.register_fake
def _(reverse, j, ptr, rank, new_ptr, num_pairs, backend):
    return reverse.new_empty(num_pairs)


@torch.library.custom_op("fastff::pair_distances", mutates_args=())
def pair_distances(positions: Tensor, cells: Tensor, atom_system: Tensor | None, i: Tensor,
                   j: Tensor, shifts: Tensor, backend: str) -> Tensor:
    return registry.launch("pair_distances", _SPECS["pair_distances"], locals())


@pair_distances.register_fake
def _(positions, cells, atom_system, i, j, shifts, backend):
    return positions.new_empty(i.shape[0])


PAIR_DISTANCES = OpArgs(pair_distances)


def _pair_distances_setup(ctx, inputs, output):
    x = PAIR_DISTANCES(inputs)
    ctx.save_for_backward(x.positions, x.cells, x.atom_system, x.i, x.j, x.shifts)
    ctx.backend = x.backend


@torch.library.custom_op("fastff::pair_distances_transpose", mutates_args=())
def pair_distances_transpose(grad: Tensor, positions: Tensor, cells: Tensor,
                             atom_system: Tensor | None, i: Tensor, j: Tensor, shifts: Tensor,
                             backend: str) -> tuple[Tensor, Tensor]:
    """The adjoint of pair_distances at ``positions``: (grad_positions [N,3], grad_cells
    [B,3,3]) of sum_e grad_e |r_ij|; no derivative of its own (the backward of pair_distances
    uses it only when no graph of the gradient is asked for)."""
    return registry.launch("pair_distances_transpose", _SPECS["pair_distances_transpose"],
                           locals())


@pair_distances_transpose.register_fake
def _(grad, positions, cells, atom_system, i, j, shifts, backend):
    return positions.new_empty(positions.shape), positions.new_empty(cells.shape)


def _pair_distances_backward(ctx, grad):
    positions, cells, atom_system, i, j, shifts = ctx.saved_tensors
    needs = PAIR_DISTANCES(ctx.needs_input_grad)
    if torch.is_grad_enabled():  # create_graph: differentiable to any order
        vectors = pair_vectors(positions, cells, atom_system, i, j, shifts, ctx.backend)
        norm = torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
        unit = vectors / torch.where(norm == 0, 1, norm)  # 0 for coincident atoms, as torch
        grad_pos, grad_cells = pair_vectors_transpose(
            (grad.unsqueeze(1) * unit).contiguous(), positions.shape[0], cells, atom_system, i,
            j, shifts, ctx.backend)
    else:  # forces: one pass, no [E, 3] temporaries
        grad_pos, grad_cells = pair_distances_transpose(
            grad.contiguous(), positions.detach(), cells.detach(), atom_system, i, j, shifts,
            ctx.backend)  # the same backends as pair_distances
    return PAIR_DISTANCES.grads(positions=grad_pos if needs.positions else None,
                                cells=grad_cells if needs.cells else None)


pair_distances.register_autograd(_pair_distances_backward, setup_context=_pair_distances_setup)


@torch.library.custom_op("fastff::verlet_check", mutates_args=("status",))
def verlet_check(positions: Tensor, cells: Tensor, reference: Tensor, ref_cells: Tensor,
                 skin: float, status: Tensor, backend: str) -> None:
    registry.launch("verlet_check", _SPECS["verlet_check"], locals())


@verlet_check.register_fake
def _(positions, cells, reference, ref_cells, skin, status, backend):
    return None


@torch.library.custom_op("fastff::neighbor_list_into",
                         mutates_args=("status", "reference", "ref_cells", "i", "j", "shifts",
                                       "ptr", "distances"))
def neighbor_list_into(positions: Tensor, cutoff: float, cells: Tensor, pbc: Tensor,
                       system_ptr: Tensor, half: bool, status: Tensor, reference: Tensor,
                       ref_cells: Tensor, i: Tensor, j: Tensor, shifts: Tensor, ptr: Tensor,
                       distances: Tensor, backend: str) -> None:
    registry.launch("neighbor_list_into", _SPECS["neighbor_list_into"], locals())


@neighbor_list_into.register_fake
def _(positions, cutoff, cells, pbc, system_ptr, half, status, reference, ref_cells, i, j,
      shifts, ptr, distances, backend):
    return None


_SPECS = {op._name: OpArgs(op)
          for op in (neighbor_list, pair_vectors, pair_vectors_transpose, neighbor_reverse,
                     neighbor_compact, neighbor_compact_reverse, pair_distances,
                     pair_distances_transpose, verlet_check,
                     neighbor_list_into)}
