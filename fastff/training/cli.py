"""``fastff train``: the command-line options, and running them.

Bad settings and missing files end with one line ``fastff train: error: ...`` on stderr and
exit status 2; progress messages go to stderr through ``logging``, the final summary (one JSON
line) to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from fastff._cliargs import nonnegative_float, nonnegative_int, positive_float, positive_int
from fastff.training.config import DTYPES, TrainConfig
from fastff.training.loop import train


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``fastff train`` options to a parser (or subparser)."""
    d = TrainConfig()
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--resume", action="store_true",
                   help="continue OUT/checkpoint.pt up to --epochs in total (its other "
                        "settings are kept)")
    p.add_argument("--model", choices=("schnet", "painn"), default=d.model)
    p.add_argument("--features", type=positive_int, default=d.features)
    p.add_argument("--interactions", type=positive_int, default=d.interactions)
    p.add_argument("--basis", type=positive_int, default=None,
                   help="radial basis size (default: SchNet 32, PaiNN 20)")
    p.add_argument("--cutoff", type=positive_float, default=d.cutoff,
                   help=f"model cutoff, nm (default {d.cutoff})")
    p.add_argument("--molecules", type=positive_int, default=d.molecules,
                   help=f"water molecules per frame (default {d.molecules})")
    p.add_argument("--train-frames", type=positive_int, default=d.train_frames)
    p.add_argument("--val-frames", type=positive_int, default=d.val_frames)
    p.add_argument("--runs", type=positive_int, default=d.runs,
                   help="independent MD runs of the training frames; the validation frames "
                        f"come from one more (default {d.runs})")
    p.add_argument("--temperature", type=positive_float, default=d.temperature, help="K")
    p.add_argument("--equilibration", type=nonnegative_int, default=d.equilibration,
                   help=f"MD steps (0.5 fs) before the first frame (default {d.equilibration})")
    p.add_argument("--stride", type=positive_int, default=d.stride,
                   help=f"MD steps between frames (default {d.stride})")
    p.add_argument("--label-cutoff", type=positive_float, default=d.label_cutoff,
                   help=f"MM reaction-field cutoff of the labels, nm (default {d.label_cutoff})")
    p.add_argument("--data", default=None,
                   help="train on a fastff.train.save_datasets file instead of generated water")
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"frames per step over all processes (default {d.batch_size})")
    p.add_argument("--lr", type=positive_float, default=d.lr,
                   help=f"Adam learning rate of the first epoch (default {d.lr})")
    p.add_argument("--lr-decay", type=positive_float, default=d.lr_decay,
                   help=f"learning-rate factor per epoch, in (0, 1] (default {d.lr_decay})")
    p.add_argument("--w-energy", type=nonnegative_float, default=d.w_energy,
                   help=f"weight of the per-atom energy MSE (default {d.w_energy})")
    p.add_argument("--w-forces", type=nonnegative_float, default=d.w_forces,
                   help=f"weight of the force MSE, nm^2 (default {d.w_forces})")
    p.add_argument("--seed", type=nonnegative_int, default=d.seed)
    p.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    p.add_argument("--backend", choices=("auto", "numba", "triton", "reference"),
                   default="auto", help="fastff kernel path (default: by device)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch and numba threads per process (default: torch's; 1 per "
                        "process under torchrun)")
    p.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="fastff train",
        description="Force-matching training of SchNet or PaiNN on MM-labelled water; runs "
                    "data-parallel under torchrun (e.g. torchrun --nproc_per_node=2 "
                    "examples/train.py ...)."))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        out=args.out, model=args.model, features=args.features,
        interactions=args.interactions, basis=args.basis, cutoff=args.cutoff,
        molecules=args.molecules, train_frames=args.train_frames, val_frames=args.val_frames,
        runs=args.runs, temperature=args.temperature, equilibration=args.equilibration,
        stride=args.stride, label_cutoff=args.label_cutoff, data=args.data,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        lr_decay=args.lr_decay, w_energy=args.w_energy,
        w_forces=args.w_forces, seed=args.seed, dtype=args.dtype, device=args.device,
        backend=None if args.backend == "auto" else args.backend, threads=args.threads,
        plot=not args.no_plot)


@contextlib.contextmanager
def _messages_on_stderr() -> Iterator[None]:
    """fastff's INFO messages on the current stderr while a command runs (a handler made
    per run, so that one bound to an earlier, closed stderr is never left behind)."""
    logger = logging.getLogger("fastff")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run(args: argparse.Namespace) -> int:
    """Run parsed ``fastff train`` options; returns the exit status. Bad settings and missing
    files end with one line ``fastff train: error: ...`` on stderr and status 2."""
    try:
        with _messages_on_stderr():
            history = train(config_from_args(args), resume=args.resume,
                            progress=not args.no_progress)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"fastff train: error: {err}", file=sys.stderr)
        return 2
    if history and int(os.environ.get("RANK", "0")) == 0:
        last = history[-1]
        print(json.dumps({"epoch": last["epoch"], "val_energy_mae": last["val_energy_mae"],
                          "val_force_rmse": last["val_force_rmse"],
                          "out": os.path.abspath(args.out)}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``fastff train [options]``; returns the exit status."""
    return run(build_parser().parse_args(argv))
