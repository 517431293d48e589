"""fastff.testing.count_host_syncs catches every kind of device-to-host synchronisation.

Each test plants exactly one sync of one kind into otherwise sync-free torch code and checks
that the counter reports exactly one; the Triton interpreter's own reads while it runs a kernel
must not count (a launch is asynchronous on a GPU).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from fastff.testing import count_host_syncs, mark_host_buffer


@triton.jit
def _double(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, 2.0 * tl.load(x_ptr + offs, mask=m), mask=m)


def _sync_free(x):
    """Device-only torch work: no value comes back to the host."""
    y = torch.sort(x * 2.0 + 1.0, stable=True).values
    z = torch.cumsum(y, 0) + torch.searchsorted(y, x).to(x.dtype)
    return torch.where(z > 0, z, -z).sum() + torch.repeat_interleave(
        x, torch.ones_like(x, dtype=torch.int64), output_size=x.shape[0]).sum()


PLANTED = {
    "int": lambda x: int(x[0]),
    "float": lambda x: float(x.sum()),
    "bool": lambda x: bool(x[0] > 0),
    "if": lambda x: 1 if x[1] > 0 else 0,
    "item": lambda x: x.max().item(),
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "np.asarray": lambda x: np.asarray(x),
    "cpu": lambda x: x.cpu(),
    "print": lambda x: repr(x),
    "format": lambda x: f"{x[0]:.3f}",
    "range": lambda x: range(10)[x.long()[1]],
    "equal": lambda x: torch.equal(x, x),
    "allclose": lambda x: torch.allclose(x, x),
    "nonzero": lambda x: (x > 0.5).nonzero(),
    "where1": lambda x: torch.where(x > 0.5),
    "mask": lambda x: x[x > 0.5],
    "mask-assign": lambda x: x.clone().__setitem__(x > 0.5, 0.0),
    "masked_select": lambda x: torch.masked_select(x, x > 0.5),
    "unique": lambda x: torch.unique(x),
    "repeat_interleave": lambda x: torch.repeat_interleave(x, torch.ones_like(x).long()),
    "bincount": lambda x: torch.bincount(x.long()),
    "inv": lambda x: torch.linalg.inv(torch.eye(3, dtype=x.dtype) + x[:9].view(3, 3) * 0.01),
    "masked_fill": lambda x: x.masked_fill(x > 0.5, x.sum()),
    "upload": lambda x: x + torch.tensor([1.0], dtype=x.dtype),
    "as_tensor": lambda x: x + torch.as_tensor(np.ones(1), dtype=x.dtype),
}


def test_sync_free_torch_counts_zero():
    x = torch.rand(16, dtype=torch.float64)
    with count_host_syncs() as syncs:
        _sync_free(x)
    assert int(syncs) == 0, syncs.report()


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_each_planted_sync_counts_once(kind):
    x = torch.rand(16, dtype=torch.float64)
    with count_host_syncs() as syncs:
        _sync_free(x)
        PLANTED[kind](x)
        _sync_free(x)
    assert int(syncs) == 1, f"{kind}: {syncs.report()}"
    assert "test_sync_counter.py" in syncs.events[0][1]  # says where


def test_kernel_launch_is_not_a_sync():
    # interpreted on CPU tensors (the interpreter's reads are not counted), compiled on a GPU
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    x = torch.rand(100, dtype=torch.float64, device=device)
    out = torch.empty_like(x)
    with count_host_syncs() as syncs:
        _double[(triton.cdiv(100, 32),)](x, out, 100, BLOCK=32)
    assert int(syncs) == 0, syncs.report()
    torch.testing.assert_close(out, 2 * x)
    with count_host_syncs() as syncs:  # and reads around launches still count
        _double[(triton.cdiv(100, 32),)](x, out, 100, BLOCK=32)
        int(out[3])
    assert int(syncs) == 1


def test_host_buffers_are_not_device_reads():
    status = mark_host_buffer(torch.zeros(4, dtype=torch.int32))
    device = torch.ones(4, dtype=torch.int32)
    with count_host_syncs() as syncs:
        status.copy_(device, non_blocking=True)
        values = status.tolist()
    assert values == [1, 1, 1, 1]
    assert int(syncs) == 0, syncs.report()


def test_counters_nest_and_restore_the_methods():
    x = torch.rand(4)
    tolist = torch.Tensor.tolist
    with count_host_syncs() as outer:
        x.tolist()
        with count_host_syncs() as inner:
            x.numpy()
    assert int(outer) == 2 and int(inner) == 1
    assert torch.Tensor.tolist is tolist
