"""Checkpoints: what a run saves after every epoch, how ``--resume`` reads it back, and
:func:`load_model` for using a trained model.

A checkpoint holds the model and optimizer states, the number of finished epochs, the run's
:class:`TrainConfig` and its history; the learning-rate schedule is a function of the epoch
(:func:`fastff.training.config.learning_rate`), so nothing else is needed to continue.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastff.training.config import TrainConfig
from fastff.training.files import BEST, CHECKPOINT, HISTORY, atomic_save
from fastff.training.model import ForceModel, build_model

#: Settings a resumed run takes from the command line rather than from its checkpoint.
RESUME_OVERRIDES = ("epochs", "out", "device", "threads", "plot")


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                     config: TrainConfig, history: Sequence[dict[str, float]]
                     ) -> dict[str, Any]:
    """The checkpoint of a run after ``epoch`` finished epochs."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "config": dataclasses.asdict(config), "history": list(history)}


def write_epoch(out: str, state: dict[str, Any], *, best: bool) -> None:
    """Write ``checkpoint.pt`` (and ``best.pt`` when ``best``) and ``history.json``."""
    atomic_save(state, os.path.join(out, CHECKPOINT))
    if best:
        atomic_save(state, os.path.join(out, BEST))
    with open(os.path.join(out, HISTORY), "w") as f:
        json.dump(state["history"], f, indent=1)


def read_checkpoint(out: str, device: torch.device | str) -> dict[str, Any]:
    """The checkpoint of the run in folder ``out`` (``FileNotFoundError`` when none)."""
    path = os.path.join(out, CHECKPOINT)
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    return torch.load(path, map_location=device, weights_only=True)


def resumed_config(state: dict[str, Any], config: TrainConfig) -> TrainConfig:
    """The checkpoint's config, with the :data:`RESUME_OVERRIDES` of ``config``."""
    saved = dict(state["config"])
    saved.update({name: getattr(config, name) for name in RESUME_OVERRIDES})
    return TrainConfig(**saved)


def load_model(path: str, device: str | torch.device = "cpu") -> ForceModel:
    """The trained :class:`ForceModel` of a checkpoint file (``checkpoint.pt`` / ``best.pt``),
    in eval mode."""
    state = torch.load(path, map_location=device, weights_only=True)
    config = TrainConfig(**state["config"])
    model = build_model(config).to(device)
    model.load_state_dict(state["model"])
    return model.eval()
