"""The settings of a training run (:class:`TrainConfig`), their checks and the learning-rate
schedule they define.

A run depends on nothing else: every checkpoint stores its config, and ``--resume`` reads it
back. Units: nm, kJ/mol, K, ps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

#: ``TrainConfig.dtype`` names and the float dtype of the model and the data.
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on (stored in each checkpoint). Units: nm, kJ/mol, K, ps."""

    out: str = "train_out"
    model: str = "schnet"  # "schnet" or "painn"
    features: int = 64
    interactions: int = 3
    basis: int | None = None  # None: SchNet 32 Gaussians, PaiNN 20 Bessel functions
    cutoff: float = 0.5
    molecules: int = 32
    train_frames: int = 192
    val_frames: int = 48
    runs: int = 4  # independent training trajectories; validation is one more trajectory
    temperature: float = 300.0
    equilibration: int = 200
    stride: int = 10
    label_cutoff: float = 0.45
    data: str | None = None  # a save_datasets file instead of generated water
    epochs: int = 20
    batch_size: int = 4  # global: split over the processes
    lr: float = 1e-3
    lr_decay: float = 0.9  # learning rate of epoch e (from 0): lr * lr_decay**e
    w_energy: float = 1.0
    w_forces: float = 1e-3
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    backend: str | None = None
    threads: int | None = None
    plot: bool = True

    def data_key(self) -> dict[str, Any]:
        """The fields that define the generated data set."""
        names = ("molecules", "train_frames", "val_frames", "runs", "temperature",
                 "equilibration", "stride", "label_cutoff", "seed", "dtype")
        return {name: getattr(self, name) for name in names}


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """``lr * lr_decay**epoch`` (epoch counted from 0): independent of the total number of
    epochs, so a run resumed with more epochs follows the schedule of one that ran straight."""
    return config.lr * config.lr_decay**epoch


def check_config(config: TrainConfig, world_size: int) -> None:
    """Raise ``ValueError`` naming the first setting out of range (before any work)."""
    positive = ("features", "interactions", "molecules", "train_frames", "val_frames", "runs",
                "stride", "epochs", "batch_size")
    for name in positive:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if config.runs > config.train_frames:
        raise ValueError(f"runs ({config.runs}) must be <= train_frames "
                         f"({config.train_frames})")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {config.dtype!r}")
    if not 0 < config.lr_decay <= 1:
        raise ValueError(f"lr_decay must be in (0, 1], got {config.lr_decay!r}")
    for name in ("lr", "cutoff", "label_cutoff", "temperature"):
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(config, name)!r}")
    for name in ("w_energy", "w_forces"):
        if not getattr(config, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)!r}")
    if config.batch_size % world_size:
        raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of the number "
                         f"of processes ({world_size})")
    if config.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("the loss-curve plot needs matplotlib (pip install matplotlib); "
                             "or pass --no-plot") from None
