"""The files a training run writes into its output folder, and how they are written.

Every file is written to a temporary name and renamed, so that a run killed mid-write leaves
the previous complete file (what ``--resume`` reads) rather than a truncated one.
"""

from __future__ import annotations

import os
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"  # after every epoch: what --resume continues
BEST = "best.pt"  # the checkpoint of the lowest validation loss
DATA = "data.pt"  # the generated data set (save_datasets format)
HISTORY = "history.json"  # one record per epoch
PLOT = "loss.png"  # the loss curves


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file and an atomic rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)
