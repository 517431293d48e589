"""The force-matching loss and one backward step.

``loss = mean over frames of [w_energy * ((E - E_ref) / n)^2 + w_forces * mean((F - F_ref)^2)]``:
a mean over frames, so that the data-parallel average over ranks holding equally many frames is
the loss of the global batch.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from fastff.training.data import Batch


class LossTerms(NamedTuple):
    """``loss`` (differentiable scalar) and its parts, detached: the mean over frames of the
    squared energy error per atom ((kJ/mol)^2) and of the per-frame force MSE
    ((kJ/mol/nm)^2)."""

    loss: Tensor
    energy_mse: Tensor
    force_mse: Tensor


def force_matching_loss(energy: Tensor, forces: Tensor, batch: Batch, w_energy: float,
                        w_forces: float) -> LossTerms:
    """``mean over frames of [w_energy * ((E - E_ref) / n)^2 + w_forces * mean((F - F_ref)^2)]``,
    the force mean over the frame's 3n components.

    A mean over frames, so that the DDP average over ranks holding equally many frames is the
    loss of the global batch. Both terms stay in the graph even with a zero weight, so every
    parameter gets a gradient (DDP needs that without ``find_unused_parameters``).

    Args:
        energy: [B] predicted (kJ/mol). forces: [N, 3] predicted (kJ/mol/nm).
        batch: the :class:`Batch` with the references.
        w_energy: weight of the energy term (dimensionless).
        w_forces: weight of the force term (nm^2: a force error f weighs like an energy error
            per atom of f * sqrt(w_forces)).
    """
    n = batch.num_atoms.to(energy.dtype)
    energy_sq = ((energy - batch.energy) / n).square()
    per_atom = (forces - batch.forces).square().sum(1)
    force_sq = per_atom.new_zeros(batch.num_frames).index_add(0, batch.batch, per_atom) / (3 * n)
    loss = (w_energy * energy_sq + w_forces * force_sq).mean()
    return LossTerms(loss, energy_sq.detach().mean(), force_sq.detach().mean())


def backward_step(model: nn.Module, batch: Batch, w_energy: float, w_forces: float) -> LossTerms:
    """Forward (energies and forces, with graph), loss and ``loss.backward()``: accumulates the
    parameter gradients (averaged over ranks when ``model`` is DistributedDataParallel). The
    optimizer step is the caller's."""
    energy, forces = model(batch.species, batch.positions, batch.cell, batch.batch,
                           batch.num_atoms)
    terms = force_matching_loss(energy, forces, batch, w_energy, w_forces)
    terms.loss.backward()
    return terms
