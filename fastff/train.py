"""Force-matching training of :class:`fastff.models.SchNet` / :class:`fastff.models.PaiNN` on
water, single-process or data-parallel (``torchrun``): the public names of
:mod:`fastff.training`, where each piece lives in its own module.

- :class:`Dataset` of frames (species, positions, cell, energy, forces), checked when built,
  :func:`collate` into a :class:`Batch`, and :func:`water_md_dataset`, frames of a Langevin MD
  run of a :func:`fastff.systems.water_box` labelled by its MM force field
  (:func:`fastff.mm.water_force_field`, float64).
- :class:`ForceModel`: a model plus a fixed energy scale and per-atom shift, returning energies
  and forces (forces by autograd; ``create_graph`` while training).
- :func:`force_matching_loss`: ``w_E * (dE / n)^2 + w_F * mean(dF^2)`` per frame, mean over
  frames.
- :func:`train` (the loop: Adam, validation, checkpoints, loss-curve PNG) and :func:`main`, the
  ``fastff train`` command line.

Units: nm, kJ/mol, kJ/mol/nm (OpenMM's). Under ``torchrun`` every process takes
``batch_size / world_size`` frames of each global batch and DistributedDataParallel averages
the gradients (see :mod:`fastff.training.ddp`).
"""

from fastff._cliargs import ProgressBar
from fastff.training.checkpoint import load_model
from fastff.training.cli import add_arguments, build_parser, config_from_args, main, run
from fastff.training.config import TrainConfig, learning_rate
from fastff.training.data import Batch, Dataset, Frame, collate, load_datasets, save_datasets
from fastff.training.ddp import DistributedContext, init_distributed, make_train_loader
from fastff.training.loop import evaluate, train
from fastff.training.loss import LossTerms, backward_step, force_matching_loss
from fastff.training.model import ForceModel, build_model
from fastff.training.plots import plot_history
from fastff.training.water import water_md_dataset

__all__ = ["Batch", "Dataset", "DistributedContext", "ForceModel", "Frame", "LossTerms",
           "ProgressBar", "TrainConfig", "add_arguments", "backward_step", "build_model",
           "build_parser", "collate", "config_from_args", "evaluate", "force_matching_loss",
           "init_distributed", "learning_rate", "load_datasets", "load_model", "main",
           "make_train_loader", "plot_history", "run", "save_datasets", "train",
           "water_md_dataset"]
