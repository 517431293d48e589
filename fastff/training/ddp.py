"""Data parallelism under ``torchrun``: the process group, each rank's share of the batches,
and the threads of each process.

Every process takes ``batch_size / world_size`` frames of each global batch, and
DistributedDataParallel averages the gradients (gloo on CPU, nccl on CUDA). The loss is a mean
over frames and every rank holds equally many, so the averaged gradient is the single-process
gradient of the global batch (when the number of training frames is a multiple of the number of
processes; otherwise the sampler repeats a few frames to even the ranks out). Rank 0 logs and
writes the output files.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from fastff.training.data import Dataset, collate


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


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"`` as a torch device."""
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
    kind = resolve_device(device)
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
    """This rank's share of each global batch of ``batch_size`` frames for ``epoch``, as
    :class:`Batch`\\ es.

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


def set_threads(threads: int | None, ctx: DistributedContext) -> None:
    """Torch and numba threads of this process: ``threads``, or under torchrun on CPU the
    torch count torchrun left (OMP_NUM_THREADS=1), so that processes do not oversubscribe."""
    if threads is None and ctx.distributed and ctx.device.type == "cpu":
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
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
