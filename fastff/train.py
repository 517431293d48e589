"""Force-matching training of :class:`fastff.models.SchNet` / :class:`fastff.models.PaiNN` on
water, single-process or data-parallel (``torchrun``).

Pieces, each usable on its own:

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

Units: nm, kJ/mol, kJ/mol/nm (OpenMM's). Data parallelism: under ``torchrun`` every process
takes ``batch_size / world_size`` frames of each global batch (DistributedSampler), gradients
are averaged by DistributedDataParallel (gloo on CPU, nccl on CUDA), and rank 0 logs, writes
checkpoints and plots. Since the loss is a mean over frames and every rank holds the same number
of frames, the averaged gradient equals the single-process gradient of the global batch (when
the number of training frames is a multiple of the number of processes; otherwise the sampler
repeats a few frames to even the ranks out).

Force matching under DDP: the forces are ``autograd.grad(create_graph=True)`` inside the
module's forward, which reaches no parameter's gradient accumulator, so DDP's reducer hooks fire
once per parameter, in the final ``loss.backward()``. Every parameter is in the loss's graph
(the energy term is kept even at zero weight), so neither ``find_unused_parameters`` nor
``static_graph`` is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from fastff._cliargs import (
    ProgressBar,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from fastff.models import AtomisticModel, PaiNN, SchNet, energy_and_forces

__all__ = ["Batch", "Dataset", "DistributedContext", "ForceModel", "Frame", "LossTerms",
           "ProgressBar", "TrainConfig", "add_arguments", "backward_step", "build_model",
           "build_parser", "collate", "config_from_args", "evaluate", "force_matching_loss",
           "init_distributed", "learning_rate", "load_datasets", "load_model", "main",
           "make_train_loader", "plot_history", "run", "save_datasets", "train",
           "water_md_dataset"]

BOLTZMANN = 0.00831446261815324  # kJ/mol/K
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
DATA = "data.pt"
HISTORY = "history.json"
PLOT = "loss.png"
_FORMAT = "fastff.train/1"


# --------------------------------------------------------------------------------------------
# data


class Frame(NamedTuple):
    """One labelled configuration.

    Attributes:
        species: int64 [n], atomic numbers.
        positions: float [n, 3] (nm).
        cell: float [3, 3] (nm), lattice vectors as rows; periodic along every axis.
        energy: float [] (kJ/mol), total potential energy.
        forces: float [n, 3] (kJ/mol/nm).
    """

    species: Tensor
    positions: Tensor
    cell: Tensor
    energy: Tensor
    forces: Tensor


def _shape(x: Tensor) -> list[int]:
    return list(x.shape)


def _check_frame(index: int, frame, dtype: torch.dtype | None) -> Frame:
    where = f"Dataset: frame {index}"
    if not isinstance(frame, Sequence) or len(frame) != 5:
        raise TypeError(f"{where}: expected (species, positions, cell, energy, forces), got "
                        f"{type(frame).__name__}")
    species, positions, cell, energy, forces = frame
    for name, value in zip(Frame._fields, frame, strict=True):
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got "
                            f"{type(value).__name__}")
    if species.dtype != torch.int64 or species.dim() != 1 or species.numel() == 0:
        raise ValueError(f"{where}: species must be a non-empty int64 [n_atoms] tensor, got "
                         f"{species.dtype} {_shape(species)}")
    n = species.shape[0]
    if not positions.is_floating_point() or positions.shape != (n, 3):
        raise ValueError(f"{where}: positions has shape {_shape(positions)} "
                         f"({positions.dtype}); expected float [{n}, 3] (n_atoms = len(species) "
                         f"= {n})")
    dtype = positions.dtype if dtype is None else dtype
    if positions.dtype != dtype:
        raise ValueError(f"{where}: positions is {positions.dtype} but the earlier frames are "
                         f"{dtype}; every frame must have one float dtype")
    if cell.shape != (3, 3) or cell.dtype != dtype:
        raise ValueError(f"{where}: cell has shape {_shape(cell)} ({cell.dtype}); expected "
                         f"[3, 3] {dtype}")
    if energy.numel() != 1 or energy.dim() > 1 or energy.dtype != dtype:
        raise ValueError(f"{where}: energy has shape {_shape(energy)} ({energy.dtype}); "
                         f"expected one {dtype} value (shape [] or [1])")
    if forces.shape != (n, 3) or forces.dtype != dtype:
        raise ValueError(f"{where}: forces has shape {_shape(forces)} ({forces.dtype}) but "
                         f"positions has {_shape(positions)}; expected [{n}, 3] {dtype}")
    for name, value in (("positions", positions), ("cell", cell), ("energy", energy),
                        ("forces", forces)):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: {name} has NaN or infinite values")
    if abs(float(torch.linalg.det(cell.double()))) == 0.0:
        raise ValueError(f"{where}: cell is singular (zero volume)")
    return Frame(species, positions, cell, energy.reshape(()), forces)


class Dataset(torch.utils.data.Dataset):
    """Labelled frames, checked when built: a frame with a wrong shape, dtype or a non-finite
    value raises ``ValueError`` / ``TypeError`` naming its index and the offending field.

    Args:
        frames: :class:`Frame`\\ s, or (species, positions, cell, energy, forces) tuples; all
            frames share one float dtype. Frames may have different numbers of atoms.

    ``dataset[i]`` is a :class:`Frame`; :func:`collate` batches a list of them.
    """

    def __init__(self, frames: Iterable[Frame | Sequence[Tensor]]):
        checked: list[Frame] = []
        dtype: torch.dtype | None = None
        for index, frame in enumerate(frames):
            checked.append(_check_frame(index, frame, dtype))
            dtype = checked[-1].positions.dtype
        self.frames = checked

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> Frame:
        return self.frames[index]

    @property
    def dtype(self) -> torch.dtype | None:
        """The float dtype of the frames (None when empty)."""
        return self.frames[0].positions.dtype if self.frames else None

    def to(self, dtype: torch.dtype) -> Dataset:
        """A copy with every float tensor cast to ``dtype``."""
        return Dataset(Frame(f.species, *(t.to(dtype) for t in f[1:])) for f in self.frames)

    def subset(self, indices: Iterable[int]) -> Dataset:
        return Dataset(self.frames[i] for i in indices)

    def state(self) -> dict[str, list[Tensor]]:
        """Plain tensors by field (what :meth:`from_state` and ``torch.save`` take)."""
        return {name: [getattr(f, name) for f in self.frames] for name in Frame._fields}

    @classmethod
    def from_state(cls, state: dict[str, list[Tensor]]) -> Dataset:
        if not isinstance(state, dict) or set(state) != set(Frame._fields):
            raise ValueError(f"Dataset state must be a dict with keys {list(Frame._fields)}")
        lengths = {name: len(state[name]) for name in Frame._fields}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"Dataset state: the fields have different numbers of frames "
                             f"{lengths}")
        return cls(zip(*(state[name] for name in Frame._fields), strict=True))


def save_datasets(path: str, train: Dataset, validation: Dataset,
                  meta: dict[str, Any] | None = None) -> None:
    """Write a training and a validation set (and plain ``meta`` values) to one file."""
    _atomic_save({"format": _FORMAT, "train": train.state(), "validation": validation.state(),
                  "meta": dict(meta or {})}, path)


def load_datasets(path: str) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """Read a file of :func:`save_datasets`; every frame is checked (errors name the set and
    the frame index). Returns (train, validation, meta)."""
    blob = torch.load(path, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a fastff.train data file (expected format "
                         f"{_FORMAT!r})")
    sets = []
    for name in ("train", "validation"):
        try:
            sets.append(Dataset.from_state(blob[name]))
        except (ValueError, TypeError) as err:
            raise type(err)(f"{path}, {name} set: {err}") from None
    return sets[0], sets[1], blob.get("meta", {})


@dataclasses.dataclass
class Batch:
    """Frames concatenated along atoms.

    Attributes:
        species: int64 [N]. positions: [N, 3] (nm). forces: [N, 3] (kJ/mol/nm).
        batch: int64 [N], frame index of each atom (sorted).
        cell: [B, 3, 3] (nm). energy: [B] (kJ/mol). num_atoms: int64 [B].
    """

    species: Tensor
    positions: Tensor
    cell: Tensor
    batch: Tensor
    num_atoms: Tensor
    energy: Tensor
    forces: Tensor

    @property
    def num_frames(self) -> int:
        return int(self.num_atoms.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def collate(frames: Sequence[Frame]) -> Batch:
    """Batch frames: atoms concatenated, ``batch`` index per atom, cells stacked [B, 3, 3]."""
    if not frames:
        raise ValueError("collate: frames must not be empty")
    num_atoms = torch.tensor([f.species.shape[0] for f in frames], dtype=torch.int64)
    return Batch(
        species=torch.cat([f.species for f in frames]),
        positions=torch.cat([f.positions for f in frames]),
        cell=torch.stack([f.cell for f in frames]),
        batch=torch.repeat_interleave(torch.arange(len(frames)), num_atoms),
        num_atoms=num_atoms,
        energy=torch.stack([f.energy for f in frames]),
        forces=torch.cat([f.forces for f in frames]))


def _wrap_molecules(positions: Tensor, edge: float) -> Tensor:
    """Translate each O, H, H molecule by whole box edges so that its centroid is in the box."""
    atoms = positions.reshape(-1, 3, 3)
    return (atoms - torch.floor(atoms.mean(dim=1, keepdim=True) / edge) * edge).reshape(-1, 3)


def water_md_dataset(n_molecules: int, n_frames: int, *, seed: int = 0,
                     temperature: float = 300.0, time_step: float = 0.0005,
                     friction: float = 10.0, equilibration: int = 200, stride: int = 10,
                     label_cutoff: float = 0.45,
                     dtype: torch.dtype = torch.float32) -> Dataset:
    """Frames of a Langevin MD run of flexible TIP3P water, labelled by the MM force field.

    The box is :func:`fastff.systems.water_box` (``n_molecules``, ``seed``); MD is BAOAB
    Langevin dynamics in float64 on :func:`fastff.mm.water_force_field` (reaction field within
    ``label_cutoff``), velocities drawn from Maxwell-Boltzmann at ``temperature``. After
    ``equilibration`` steps a frame is kept every ``stride`` steps, molecules wrapped into the
    box; its energy and forces are the float64 MM values, then cast to ``dtype``.

    Cost: one MM evaluation per step, about 20 ms for 32-64 molecules on 2 cores.

    Args:
        n_molecules: water molecules (3 atoms each).
        n_frames: frames to keep.
        seed: seed of the box and of the thermostat noise.
        temperature: K. time_step: ps. friction: 1/ps.
        equilibration: steps before the first frame. stride: steps between frames.
        label_cutoff: nm, at most half the box edge.
        dtype: float dtype of the frames.

    Returns:
        :class:`Dataset` of ``n_frames`` frames of ``3 * n_molecules`` atoms.
    """
    import fastff
    from fastff.mm import water_force_field
    from fastff.systems import water_box

    for name, value, low in (("n_molecules", n_molecules, 1), ("n_frames", n_frames, 1),
                             ("equilibration", equilibration, 0), ("stride", stride, 1),
                             ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"water_md_dataset: {name} must be an int >= {low}, got {value!r}")
    for label, number in (("temperature", temperature), ("time_step", time_step),
                          ("friction", friction), ("label_cutoff", label_cutoff)):
        if not isinstance(number, (int, float)) or not 0 < number < math.inf:
            raise ValueError(f"water_md_dataset: {label} must be a positive number, got "
                             f"{number!r}")
    box = water_box(n_molecules, seed=seed, dtype=torch.float64)
    edge = float(box.cell[0, 0])
    if label_cutoff > 0.5 * edge:
        raise ValueError(f"water_md_dataset: label_cutoff {label_cutoff} nm exceeds half the box "
                         f"edge ({0.5 * edge:.4g} nm for {n_molecules} molecules); lower it or "
                         f"use more molecules")
    ff = water_force_field(box, cutoff=label_cutoff, dtype=torch.float64)
    ff.requires_grad_(False)

    def energy_and_forces(x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.detach().requires_grad_(True)
        energy = ff(x)
        (grad,) = torch.autograd.grad(energy, x)
        return energy.detach(), -grad

    generator = torch.Generator().manual_seed(seed)
    kt = BOLTZMANN * temperature
    mass = box.masses[:, None]
    dt = float(time_step)
    fade = math.exp(-friction * dt)
    kick = torch.sqrt((1 - fade**2) * kt / mass)
    x = box.positions.clone()
    v = torch.randn(x.shape, generator=generator, dtype=torch.float64) * torch.sqrt(kt / mass)
    frames: list[Frame] = []
    # the MM call is O(N) bookkeeping between numba kernels: one torch thread avoids OpenMP
    # barriers stalling on cores shared with numba's workers (see fastff.systems)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with fastff.no_checks():
            energy, forces = energy_and_forces(x)
            for step in range(1, equilibration + n_frames * stride + 1):
                v = v + 0.5 * dt * forces / mass
                x = x + 0.5 * dt * v
                v = fade * v + kick * torch.randn(x.shape, generator=generator,
                                                  dtype=torch.float64)
                x = x + 0.5 * dt * v
                energy, forces = energy_and_forces(x)
                v = v + 0.5 * dt * forces / mass
                if step > equilibration and (step - equilibration) % stride == 0:
                    if not bool(torch.isfinite(forces).all()):
                        raise RuntimeError(f"water_md_dataset: non-finite forces at step "
                                           f"{step}; lower time_step")
                    frames.append(Frame(box.species, _wrap_molecules(x, edge).to(dtype),
                                        box.cell.to(dtype), energy.to(dtype),
                                        forces.to(dtype)))
    finally:
        torch.set_num_threads(threads)
    return Dataset(frames)


# --------------------------------------------------------------------------------------------
# model and loss


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


# --------------------------------------------------------------------------------------------
# configuration


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


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


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
    return ForceModel(model.to(_DTYPES[config.dtype]))


def load_model(path: str, device: str | torch.device = "cpu") -> ForceModel:
    """The trained :class:`ForceModel` of a checkpoint file (``checkpoint.pt`` / ``best.pt``),
    in eval mode."""
    state = torch.load(path, map_location=device, weights_only=True)
    config = TrainConfig(**state["config"])
    model = build_model(config).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


# --------------------------------------------------------------------------------------------
# distributed


@dataclasses.dataclass
class DistributedContext:
    """Where this process runs: ``rank`` of ``world_size``, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            if dist.get_backend() == "nccl":
                t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu().tolist()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): gloo on CPU, nccl on CUDA. Without WORLD_SIZE > 1
    this is a single process and nothing is initialised.

    With a loopback MASTER_ADDR, gloo is pinned to the loopback interface (GLOO_SOCKET_IFNAME
    = lo, unless set), so no other address is used.
    """
    kind = _resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(device=kind)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if kind.type == "cuda":
        torch.cuda.set_device(local_rank)
        kind = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
        if os.environ.get("MASTER_ADDR", "") in ("127.0.0.1", "localhost") \
                and sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistributedContext(rank, world, local_rank, kind)


def make_train_loader(dataset: Dataset, batch_size: int, *, rank: int = 0,
                      world_size: int = 1, seed: int = 0, epoch: int = 0) -> DataLoader:
    """This rank's share of each global batch of ``batch_size`` frames for ``epoch``.

    One permutation of the frames per (seed, epoch), the same on every rank; rank r takes
    every world_size-th frame of it, so the union over ranks of their k-th batches is the k-th
    batch of a single process.
    """
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of the number of "
                         f"processes ({world_size})")
    sampler: DistributedSampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler,
                      collate_fn=collate)


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


# --------------------------------------------------------------------------------------------
# output


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def plot_history(history: Sequence[dict[str, float]], path: str) -> None:
    """Loss curves (train and validation, log scale) and the validation errors per epoch, as a
    PNG. Uses matplotlib's Agg canvas directly (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    ax.set(xlabel="epoch", ylabel="loss", yscale="log", title="force-matching loss")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    ax.plot(epochs, [h["val_energy_mae"] for h in history], "o-", color="C2")
    ax.set(xlabel="epoch", ylabel="energy MAE (kJ/mol/atom)", yscale="log",
           title="validation errors")
    twin = ax.twinx()
    twin.plot(epochs, [h["val_force_rmse"] for h in history], "s-", color="C3")
    twin.set(ylabel="force RMSE (kJ/mol/nm)", yscale="log")
    ax.legend(handles=[*ax.get_lines(), *twin.get_lines()],
              labels=["energy MAE", "force RMSE"])
    for axis in fig.axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------
# training loop


def _set_threads(config: TrainConfig, ctx: DistributedContext) -> None:
    threads = config.threads
    if threads is None and ctx.distributed and ctx.device.type == "cpu":
        # torchrun sets OMP_NUM_THREADS=1 per process; numba's pool must not oversubscribe
        threads = torch.get_num_threads()
    if threads is None:
        return
    torch.set_num_threads(threads)
    if "numba" not in sys.modules:
        # numba sizes its OpenMP pool from NUMBA_NUM_THREADS when imported, and idle pool
        # threads spin: with 2 processes on 2 cores, a 2-thread pool per process made an epoch
        # take 127 s instead of 20 s, even with numba.set_num_threads(1)
        os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]


def _datasets(config: TrainConfig, ctx: DistributedContext) -> tuple[Dataset, Dataset]:
    """Load ``config.data``, or the cached generated set in the output folder (rank 0 builds
    it when missing or made with other settings; the other ranks wait and read it)."""
    if config.data is not None:
        train_set, val_set, _ = load_datasets(config.data)
        return _nonempty(train_set.to(_DTYPES[config.dtype]),
                         val_set.to(_DTYPES[config.dtype]), config.data)
    path = os.path.join(config.out, DATA)
    key = config.data_key()
    if ctx.is_main:
        fresh = not os.path.exists(path) or load_datasets(path)[2] != key
        if fresh:
            def run(frames: int, seed: int) -> Dataset:
                return water_md_dataset(
                    config.molecules, frames, seed=seed, temperature=config.temperature,
                    equilibration=config.equilibration, stride=config.stride,
                    label_cutoff=config.label_cutoff, dtype=_DTYPES[config.dtype])

            train_frames: list[Frame] = []
            for r in range(config.runs):
                count = config.train_frames // config.runs + (r < config.train_frames
                                                              % config.runs)
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


def _check_config(config: TrainConfig, world_size: int) -> None:
    positive = ("features", "interactions", "molecules", "train_frames", "val_frames", "runs",
                "stride", "epochs", "batch_size")
    for name in positive:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if config.runs > config.train_frames:
        raise ValueError(f"runs ({config.runs}) must be <= train_frames "
                         f"({config.train_frames})")
    if config.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {config.dtype!r}")
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


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """``lr * lr_decay**epoch`` (epoch counted from 0): independent of the total number of
    epochs, so a run resumed with more epochs follows the schedule of one that ran straight."""
    return config.lr * config.lr_decay**epoch


def _log(ctx: DistributedContext, text: str) -> None:
    if ctx.is_main:
        print(text, file=sys.stderr, flush=True)


def train(config: TrainConfig, *, resume: bool = False, ctx: DistributedContext | None = None,
          progress: bool = True) -> list[dict[str, float]]:
    """Train ``config.model`` for ``config.epochs`` epochs (in total, counting a resumed run's).

    Writes into ``config.out`` (rank 0): ``checkpoint.pt`` after every epoch (model state,
    optimizer state, epoch, config, history), ``best.pt`` (lowest validation loss),
    ``history.json``, ``loss.png`` and the generated data set ``data.pt``.

    Args:
        config: the run's settings. With ``resume``, every setting but ``epochs`` is read from
            the checkpoint.
        resume: continue from ``config.out/checkpoint.pt``.
        ctx: the process group (default: :func:`init_distributed` of ``config.device``).
        progress: draw a progress bar on stderr (rank 0).

    Returns:
        The history: one dict per epoch with ``epoch``, ``train_loss``, ``val_loss``,
        ``val_energy_mae`` (kJ/mol/atom), ``val_force_rmse`` (kJ/mol/nm), ``seconds``.
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
    checkpoint_path = os.path.join(config.out, CHECKPOINT)
    state: dict[str, Any] | None = None
    if resume:
        if not os.path.exists(checkpoint_path):
            raise FileNotFoundError(f"resume: no checkpoint at {checkpoint_path}")
        state = torch.load(checkpoint_path, map_location=ctx.device, weights_only=True)
        saved = dict(state["config"])
        saved.update(epochs=config.epochs, out=config.out, device=config.device,
                     threads=config.threads, plot=config.plot)
        config = TrainConfig(**saved)
    elif os.path.exists(checkpoint_path):
        raise FileExistsError(f"{checkpoint_path} exists: resume it (--resume) or choose another "
                              f"output folder (--out)")
    _check_config(config, ctx.world_size)
    _set_threads(config, ctx)
    if ctx.is_main:
        os.makedirs(config.out, exist_ok=True)
    ctx.barrier()

    train_set, val_set = _datasets(config, ctx)
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
    _log(ctx, f"{config.model}: {sum(p.numel() for p in model.parameters())} parameters, "
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
    with warnings.catch_warnings():
        # the double backward hands the readout's [1, F/2] weight a grad with strides (1, 1):
        # with a size-1 row that is the layout of (F/2, 1), but the reducer compares strides
        # exactly and warns
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        return _epochs(config, ctx, model, wrapped, optimizer, train_set, val_set, history,
                       start, progress)


def _epochs(config: TrainConfig, ctx: DistributedContext, model: ForceModel,
            wrapped: nn.Module, optimizer: torch.optim.Optimizer, train_set: Dataset,
            val_set: Dataset, history: list[dict[str, float]], start: int,
            progress: bool) -> list[dict[str, float]]:
    checkpoint_path = os.path.join(config.out, CHECKPOINT)
    best = min((h["val_loss"] for h in history), default=math.inf)
    for epoch in range(start, config.epochs):
        began = time.monotonic()
        loader = make_train_loader(train_set, config.batch_size, rank=ctx.rank,
                                   world_size=ctx.world_size, seed=config.seed, epoch=epoch)
        bar = ProgressBar(len(loader), f"epoch {epoch + 1}/{config.epochs}",
                          enabled=progress and ctx.is_main)
        loss_sum, frames = 0.0, 0
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, epoch)
        for batch in loader:
            batch = batch.to(ctx.device)
            optimizer.zero_grad(set_to_none=True)
            terms = backward_step(wrapped, batch, config.w_energy, config.w_forces)
            optimizer.step()
            loss_sum += float(terms.loss.detach()) * batch.num_frames
            frames += batch.num_frames
            bar.update(f"loss {float(terms.loss.detach()):.4g}")
        bar.close()
        loss_total, frames_total = ctx.sum([loss_sum, frames])
        metrics = evaluate(model, val_set, ctx, w_energy=config.w_energy,
                           w_forces=config.w_forces)
        record = {"epoch": epoch + 1, "train_loss": loss_total / frames_total,
                  "val_loss": metrics["loss"], "val_energy_mae": metrics["energy_mae"],
                  "val_force_rmse": metrics["force_rmse"],
                  "lr": optimizer.param_groups[0]["lr"], "seconds": time.monotonic() - began}
        history.append(record)
        _log(ctx, f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4g}, "
                  f"val loss {record['val_loss']:.4g}, energy MAE "
                  f"{record['val_energy_mae']:.4g} kJ/mol/atom, force RMSE "
                  f"{record['val_force_rmse']:.4g} kJ/mol/nm ({record['seconds']:.1f} s)")
        if ctx.is_main:
            checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "epoch": epoch + 1, "config": dataclasses.asdict(config),
                          "history": history}
            _atomic_save(checkpoint, checkpoint_path)
            if record["val_loss"] < best:
                best = record["val_loss"]
                _atomic_save(checkpoint, os.path.join(config.out, BEST))
            with open(os.path.join(config.out, HISTORY), "w") as f:
                json.dump(history, f, indent=1)
            if config.plot:
                plot_history(history, os.path.join(config.out, PLOT))
        ctx.barrier()
    return history


# --------------------------------------------------------------------------------------------
# command line


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
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=d.dtype)
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


def run(args: argparse.Namespace) -> int:
    """Run parsed ``fastff train`` options; returns the exit status. Bad settings and missing
    files end with one line ``fastff train: error: ...`` on stderr and status 2."""
    try:
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
