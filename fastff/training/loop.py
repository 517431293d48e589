"""The training loop: :func:`train` (Adam with an exponential learning-rate decay per epoch,
validation, checkpoints, loss curves) and :func:`evaluate`.

Force matching under DDP: the forces are ``autograd.grad(create_graph=True)`` inside the
module's forward, which reaches no parameter's gradient accumulator, so DDP's reducer hooks fire
once per parameter, in the final ``loss.backward()``. Every parameter is in the loss's graph
(the energy term is kept even at zero weight), so neither ``find_unused_parameters`` nor
``static_graph`` is needed. Messages go to the ``logging`` logger of this module (rank 0 only).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from fastff._cliargs import ProgressBar
from fastff.training.checkpoint import (
    checkpoint_state,
    read_checkpoint,
    resumed_config,
    write_epoch,
)
from fastff.training.config import DTYPES, TrainConfig, check_config
from fastff.training.data import Dataset, Frame, collate, load_datasets, save_datasets
from fastff.training.ddp import (
    DistributedContext,
    init_distributed,
    make_train_loader,
    set_threads,
)
from fastff.training.files import CHECKPOINT, DATA, PLOT
from fastff.training.loss import backward_step, force_matching_loss
from fastff.training.model import ForceModel, build_model
from fastff.training.plots import plot_history
from fastff.training.water import water_md_dataset

log = logging.getLogger(__name__)


def train(config: TrainConfig, *, resume: bool = False, ctx: DistributedContext | None = None,
          progress: bool = True) -> list[dict[str, float]]:
    """Train ``config.model`` for ``config.epochs`` epochs (in total, counting a resumed run's).

    Writes into ``config.out`` (rank 0): ``checkpoint.pt`` after every epoch (model state,
    optimizer state, epoch, config, history), ``best.pt`` (lowest validation loss),
    ``history.json``, ``loss.png`` and the generated data set ``data.pt``. Progress messages
    go to ``logging`` (logger ``fastff.training.loop``, level INFO; ``fastff train`` shows
    them on stderr).

    Args:
        config: the run's settings. With ``resume``, every setting but ``epochs`` is read from
            the checkpoint.
        resume: continue from ``config.out/checkpoint.pt``.
        ctx: the process group (default: :func:`init_distributed` of ``config.device``).
        progress: draw a progress bar on stderr (rank 0).

    Returns:
        The history: one dict per epoch with ``epoch``, ``train_loss``, ``val_loss``,
        ``val_energy_mae`` (kJ/mol/atom), ``val_force_rmse`` (kJ/mol/nm), ``lr``, ``seconds``.
    """
    own_ctx = ctx is None
    ctx = init_distributed(config.device) if ctx is None else ctx
    try:
        return _train(config, resume, ctx, progress)
    finally:
        if own_ctx:
            ctx.close()


def _train(config: TrainConfig, resume: bool, ctx: DistributedContext,
           progress: bool) -> list[dict[str, float]]:
    state = None
    if resume:
        state = read_checkpoint(config.out, ctx.device)
        config = resumed_config(state, config)
    elif os.path.exists(os.path.join(config.out, CHECKPOINT)):
        raise FileExistsError(f"{os.path.join(config.out, CHECKPOINT)} exists: resume it "
                              f"(--resume) or choose another output folder (--out)")
    check_config(config, ctx.world_size)
    set_threads(config.threads, ctx)
    if ctx.is_main:
        os.makedirs(config.out, exist_ok=True)
    ctx.barrier()

    train_set, val_set = prepare_datasets(config, ctx)
    model = build_model(config).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history: list[dict[str, float]] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
    else:
        model.calibrate(train_set)
    start = int(state["epoch"]) if state is not None else 0
    if ctx.is_main:
        log.info(f"{config.model}: {sum(p.numel() for p in model.parameters())} parameters, "
                 f"{len(train_set)} training / {len(val_set)} validation frames, "
                 f"{ctx.world_size} process(es) on {ctx.device.type}; epochs {start + 1}.."
                 f"{config.epochs}")
    model.train()
    wrapped: nn.Module = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # forces come from autograd.grad(create_graph=True) inside forward; only the final
        # loss.backward() reaches the parameters, where DDP's reducer hooks fire once each
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
    # learning_rate() of the epoch: a closed form, so a resumed run enters it at its epoch
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
    scheduler = LambdaLR(optimizer, lambda epoch: config.lr_decay**epoch, last_epoch=start - 1)
    with warnings.catch_warnings():
        # the double backward hands the readout's [1, F/2] weight a grad with strides (1, 1):
        # with a size-1 row that is the layout of (F/2, 1), but the reducer compares strides
        # exactly and warns
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        for epoch in range(start, config.epochs):
            record = _epoch(config, ctx, model, wrapped, optimizer, train_set, val_set, epoch,
                            progress)
            history.append(record)
            if ctx.is_main:
                best = record["val_loss"] < min((h["val_loss"] for h in history[:-1]),
                                                default=math.inf)
                write_epoch(config.out, checkpoint_state(model, optimizer, epoch + 1, config,
                                                         history), best=best)
                if config.plot:
                    plot_history(history, os.path.join(config.out, PLOT))
            scheduler.step()
            ctx.barrier()
    return history


def _epoch(config: TrainConfig, ctx: DistributedContext, model: ForceModel,
           wrapped: nn.Module, optimizer: torch.optim.Optimizer, train_set: Dataset,
           val_set: Dataset, epoch: int, progress: bool) -> dict[str, float]:
    """One pass over this rank's share of the training set, then validation; the record."""
    began = time.monotonic()
    loader = make_train_loader(train_set, config.batch_size, rank=ctx.rank,
                               world_size=ctx.world_size, seed=config.seed, epoch=epoch)
    loss_sum, frames = 0.0, 0
    with ProgressBar(len(loader), f"epoch {epoch + 1}/{config.epochs}",
                     enabled=progress and ctx.is_main) as bar:
        for batch in loader:
            batch = batch.to(ctx.device)
            optimizer.zero_grad(set_to_none=True)
            terms = backward_step(wrapped, batch, config.w_energy, config.w_forces)
            optimizer.step()
            loss = float(terms.loss.detach())
            loss_sum += loss * batch.num_frames
            frames += batch.num_frames
            bar.set_postfix_str(f"loss {loss:.4g}", refresh=False)
            bar.update()
    loss_total, frames_total = ctx.sum([loss_sum, frames])
    metrics = evaluate(model, val_set, ctx, w_energy=config.w_energy, w_forces=config.w_forces)
    record = {"epoch": epoch + 1, "train_loss": loss_total / frames_total,
              "val_loss": metrics["loss"], "val_energy_mae": metrics["energy_mae"],
              "val_force_rmse": metrics["force_rmse"], "lr": optimizer.param_groups[0]["lr"],
              "seconds": time.monotonic() - began}
    if ctx.is_main:
        log.info(f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4g}, "
                 f"val loss {record['val_loss']:.4g}, energy MAE "
                 f"{record['val_energy_mae']:.4g} kJ/mol/atom, force RMSE "
                 f"{record['val_force_rmse']:.4g} kJ/mol/nm ({record['seconds']:.1f} s)")
    return record


@torch.no_grad()
def evaluate(model: ForceModel, dataset: Dataset, ctx: DistributedContext, *, w_energy: float,
             w_forces: float, batch_size: int = 8) -> dict[str, float]:
    """Validation metrics over ``dataset``, each rank taking every world_size-th frame:
    ``loss`` (as :func:`force_matching_loss`), ``energy_mae`` (kJ/mol per atom, mean over
    frames of |dE| / n) and ``force_rmse`` (kJ/mol/nm, over all force components)."""
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, |dE|/n, dF^2, components, frames
    mine = list(range(ctx.rank, len(dataset), ctx.world_size))
    for start in range(0, len(mine), batch_size):
        batch = collate([dataset[i] for i in mine[start:start + batch_size]]).to(ctx.device)
        energy, forces = model.predict(batch)
        terms = force_matching_loss(energy, forces, batch, w_energy, w_forces)
        sums[0] += float(terms.loss) * batch.num_frames
        sums[1] += float(((energy - batch.energy).abs() / batch.num_atoms).sum())
        sums[2] += float((forces - batch.forces).double().square().sum())
        sums[3] += forces.numel()
        sums[4] += batch.num_frames
    loss, mae, sq, count, frames = ctx.sum(sums)
    model.train(was_training)
    return {"loss": loss / frames, "energy_mae": mae / frames,
            "force_rmse": math.sqrt(sq / count)}


def prepare_datasets(config: TrainConfig, ctx: DistributedContext) -> tuple[Dataset, Dataset]:
    """Load ``config.data``, or the cached generated set in the output folder (rank 0 builds
    it when missing or made with other settings; the other ranks wait and read it)."""
    if config.data is not None:
        train_set, val_set, _ = load_datasets(config.data)
        return _nonempty(train_set.to(DTYPES[config.dtype]),
                         val_set.to(DTYPES[config.dtype]), config.data)
    path = os.path.join(config.out, DATA)
    key = config.data_key()
    if ctx.is_main and (not os.path.exists(path) or load_datasets(path)[2] != key):
        def run(frames: int, seed: int) -> Dataset:
            return water_md_dataset(
                config.molecules, frames, seed=seed, temperature=config.temperature,
                equilibration=config.equilibration, stride=config.stride,
                label_cutoff=config.label_cutoff, dtype=DTYPES[config.dtype])

        train_frames: list[Frame] = []
        for r in range(config.runs):
            count = config.train_frames // config.runs + (r < config.train_frames % config.runs)
            train_frames += run(count, config.seed + r).frames
        val_set = run(config.val_frames, config.seed + config.runs)
        save_datasets(path, Dataset(train_frames), val_set, key)
    ctx.barrier()
    train_set, val_set, _ = load_datasets(path)
    return train_set, val_set


def _nonempty(train_set: Dataset, val_set: Dataset, source: str) -> tuple[Dataset, Dataset]:
    for name, data in (("training", train_set), ("validation", val_set)):
        if len(data) == 0:
            raise ValueError(f"{source}: the {name} set has no frames")
    return train_set, val_set
