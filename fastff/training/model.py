"""The trained module: :class:`ForceModel`, a SchNet or PaiNN with a fixed energy scale and
per-atom shift, and :func:`build_model`, which makes one from a :class:`TrainConfig`.

The scale and shift are calibrated from the training data before the first step, so that the
network's outputs are O(1) and the untrained model predicts energies near the data's mean.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastff.models import AtomisticModel, PaiNN, SchNet, energy_and_forces
from fastff.training.config import DTYPES, TrainConfig
from fastff.training.data import Batch, Dataset, collate


class ForceModel(nn.Module):
    """An :class:`fastff.models.AtomisticModel` with a fixed output scale and per-atom shift:
    ``E = energy_scale * model(...) + energy_shift * n_atoms``, ``F = -dE/dpositions``.

    Both are buffers set by :meth:`calibrate` from the training data, so that the model's
    outputs are O(1) and the untrained model predicts energies around the data's mean. In
    training mode (``module.train()``) the forces keep their graph (create_graph=True) for
    force matching; in eval mode outputs are detached.
    """

    energy_scale: Tensor
    energy_shift: Tensor

    def __init__(self, model: AtomisticModel):
        super().__init__()
        self.model = model
        dtype = model.dtype
        self.register_buffer("energy_scale", torch.ones((), dtype=dtype))
        self.register_buffer("energy_shift", torch.zeros((), dtype=dtype))

    def forward(self, species: Tensor, positions: Tensor, cell: Tensor, batch: Tensor,
                num_atoms: Tensor) -> tuple[Tensor, Tensor]:
        """Energies [B] (kJ/mol) and forces [N, 3] (kJ/mol/nm) of a :class:`Batch`'s fields."""
        energy, forces = energy_and_forces(self.model, species, positions, cell, batch=batch,
                                           training=self.training)
        energy = self.energy_scale * energy + self.energy_shift * num_atoms.to(energy.dtype)
        return energy, self.energy_scale * forces

    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return self(batch.species, batch.positions, batch.cell, batch.batch, batch.num_atoms)

    @torch.no_grad()
    def calibrate(self, dataset: Dataset, *, length: float = 0.1,
                  max_frames: int = 16) -> ForceModel:
        """Set ``energy_scale`` to rms(reference forces) * ``length`` (nm) and ``energy_shift``
        to the mean per-atom energy the scaled model misses, on the first ``max_frames`` frames
        (deterministic: every rank computes the same values).

        With the default 0.1 nm this is the force-rms scaling of NequIP and MACE with lengths
        counted in Angstrom: an O(1) change of the model's output over 0.1 nm gives forces of
        the data's size. (Matching the untrained model's force rms instead gave scales of
        ~1e4 for SchNet, and per-atom energies that jumped by kJ/mol per Adam step.)
        """
        was_training = self.training
        self.eval()
        device = self.energy_scale.device
        batch = collate([dataset[i] for i in range(min(max_frames, len(dataset)))]).to(device)
        scale = float(batch.forces.double().square().mean().sqrt()) * length
        self.energy_scale.fill_(scale if scale > 0 else 1.0)
        self.energy_shift.fill_(0.0)
        energy, _ = self.predict(batch)
        self.energy_shift.fill_(float(((batch.energy - energy) / batch.num_atoms).mean()))
        self.train(was_training)
        return self


def build_model(config: TrainConfig) -> ForceModel:
    """The (uncalibrated) :class:`ForceModel` of ``config``, initialised from ``config.seed``
    (the global torch RNG is left as it was)."""
    kwargs: dict[str, Any] = {"num_features": config.features,
                              "num_interactions": config.interactions, "cutoff": config.cutoff,
                              "backend": config.backend}
    if config.basis is not None:
        kwargs["num_basis"] = config.basis
    if config.model not in ("schnet", "painn"):
        raise ValueError(f"model must be 'schnet' or 'painn', got {config.model!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model: AtomisticModel = (SchNet if config.model == "schnet" else PaiNN)(**kwargs)
    return ForceModel(model.to(DTYPES[config.dtype]))
