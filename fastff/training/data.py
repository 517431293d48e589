"""Labelled frames for force matching: :class:`Frame`, the checked :class:`Dataset`, batching
(:func:`collate` into a :class:`Batch`) and the data-set file (:func:`save_datasets`).

A frame with a wrong shape, dtype or a non-finite value is rejected when the data set is built
or read, with its index and field named, so a bad file fails before any training step. Units:
nm, kJ/mol, kJ/mol/nm (OpenMM's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fastff.training.files import atomic_save

#: Format tag of a :func:`save_datasets` file.
DATA_FORMAT = "fastff.train/1"


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


def _check_frame(index: int, frame: object, dtype: torch.dtype | None) -> Frame:
    where = f"Dataset: frame {index}"
    if not isinstance(frame, Sequence) or len(frame) != 5:
        raise TypeError(f"{where}: expected (species, positions, cell, energy, forces), got "
                        f"{type(frame).__name__}")
    for name, value in zip(Frame._fields, frame, strict=True):
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got "
                            f"{type(value).__name__}")
    species, positions, cell, energy, forces = frame
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
    atomic_save({"format": DATA_FORMAT, "train": train.state(),
                 "validation": validation.state(), "meta": dict(meta or {})}, path)


def load_datasets(path: str) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """Read a file of :func:`save_datasets`; every frame is checked (errors name the set and
    the frame index). Returns (train, validation, meta)."""
    blob = torch.load(path, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != DATA_FORMAT:
        raise ValueError(f"{path} is not a fastff.train data file (expected format "
                         f"{DATA_FORMAT!r})")
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
