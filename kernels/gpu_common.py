"""Triton helpers shared by the families' GPU paths: deterministic sums, fixed-point atomics,
a guarded scan, and constants that live on the device.

* **Fixed point** (OpenMM's CUDA platform, Eastman et al., J. Chem. Theory Comput. 9 (2013)
  461): in deterministic mode, values that many programs add into one address are converted to
  64-bit integers, ``round(x * 2^32)``, and added with integer atomics. Integer addition is
  associative, so the sum is bitwise the same whatever order the GPU schedules the programs
  in. Resolution 2^-32 (2.3e-10 in the value's unit), range +-2^31 (2.1e9) per accumulator.
* **Segment sums**: per-system sums of per-atom rows, one program per system, in atom order
  (deterministic, no atomics).
* **Guarded kernels**: the sync-free neighbor-list and cluster rebuilds run every step and do
  their work only when a device-side flag asks for it (bit 0 of a status word); the host never
  reads the flag. ``scan_kernel`` is the exclusive prefix sum they share.
* **Constants**: float64 settings travel in small device tensors (a Python float argument
  would be passed as float32); ``constants`` keeps one per distinct value tuple, so a steady
  MD step uploads nothing (an upload from pageable memory waits for the stream, and none may
  happen while a CUDA graph is captured).

Deterministic mode is torch's (``torch.use_deterministic_algorithms(True)``), read by the
launchers when they run.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastff.kernels._runtime import status

FIXED_SCALE = 2.0**32  # OpenMM's 0x100000000: 2^-32 resolution, +-2^31 range in int64

# the status word of capacity-mode lists (flags, rebuild count): see _runtime/status.py
REBUILD, OVERFLOW, NONFINITE, BAD_CELL, INVALID = (status.REBUILD, status.OVERFLOW,
                                                   status.NONFINITE, status.BAD_CELL,
                                                   status.INVALID)


def deterministic() -> bool:
    """True when torch's deterministic mode is on: launchers then accumulate in fixed point."""
    return torch.are_deterministic_algorithms_enabled()


@functools.lru_cache(maxsize=256)
def _constants(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def constants(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A device tensor holding ``values`` (created once per distinct tuple, dtype and device).

    The caller must not write to it."""
    return _constants(tuple(float(v) for v in values), dtype, torch.device(device))


@triton.jit
def to_fixed(x):
    """round(x * 2^32) as int64 (deterministic accumulation, see the module docstring)."""
    return tl.floor(x.to(tl.float64) * 4294967296.0 + 0.5).to(tl.int64)


def from_fixed(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float values of a fixed-point accumulator."""
    return (acc.to(torch.float64) * (1.0 / FIXED_SCALE)).to(dtype)


@triton.jit
def atomic_add_to(ptr, value, mask, DET: tl.constexpr):
    """``*ptr += value`` with a relaxed atomic: float, or fixed point when DET (``ptr`` then
    points to int64)."""
    if DET:
        tl.atomic_add(ptr, to_fixed(value), mask=mask, sem="relaxed")
    else:
        tl.atomic_add(ptr, value, mask=mask, sem="relaxed")


@triton.jit(do_not_specialize=["width"])
def segment_sum_kernel(x_ptr, ptr_ptr, out_ptr, width, BLOCK_R: tl.constexpr,
                       BLOCK_W: tl.constexpr):
    """out[s, :] = sum of rows ptr[s]:ptr[s+1] of x [N, width]: one program per segment, rows
    in order (deterministic)."""
    s = tl.program_id(0).to(tl.int64)
    lo = tl.load(ptr_ptr + s)
    hi = tl.load(ptr_ptr + s + 1)
    cols = tl.arange(0, BLOCK_W)
    cm = cols < width
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=out_ptr.dtype.element_ty)
    for r0 in range(lo, hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < hi)[:, None] & cm[None, :]
        acc += tl.load(x_ptr + rows[:, None] * width + cols[None, :], mask=m, other=0.0)
    tl.store(out_ptr + s * width + cols, tl.sum(acc, 0), mask=cm)


def segment_sum(x: torch.Tensor, ptr: torch.Tensor) -> torch.Tensor:
    """[B, K] per-segment sums of the rows of x [N, K] (or [B] of x [N]); ``ptr`` int64 [B+1]
    delimits contiguous segments. Deterministic."""
    flat = x.reshape(x.shape[0], -1).contiguous()
    width = flat.shape[1]
    nseg = ptr.shape[0] - 1
    out = torch.empty(nseg, width, dtype=x.dtype, device=x.device)
    if nseg:
        block_w = max(1, triton.next_power_of_2(width))
        segment_sum_kernel[(nseg,)](flat, ptr.contiguous(), out, width,
                                    BLOCK_R=max(1, 128 // block_w), BLOCK_W=block_w)
    return out.reshape(nseg, *x.shape[1:])


def system_ptr(atom_system: torch.Tensor, num_systems: int) -> torch.Tensor:
    """int64 [B+1] CSR over sorted per-atom system indices (no host synchronisation)."""
    grid = torch.arange(num_systems + 1, device=atom_system.device, dtype=atom_system.dtype)
    return torch.searchsorted(atom_system.contiguous(), grid)


@triton.jit
def scan_kernel(x_ptr, out_ptr, n_ptr, n_max, status_ptr, GUARDED: tl.constexpr,
                BLOCK: tl.constexpr):
    """out[0] = 0, out[k + 1] = x[0] + ... + x[k] for k < n (int64), one program.

    ``n`` is read from the device (``n_ptr``), bounded by ``n_max``; GUARDED: does nothing
    unless the status word asks for a rebuild."""
    go = True
    if GUARDED:
        go = (tl.load(status_ptr) & 1) != 0
    if go:
        n = tl.minimum(tl.load(n_ptr).to(tl.int64), n_max)
        carry = tl.zeros([], dtype=tl.int64)
        tl.store(out_ptr, carry)
        for k0 in range(0, n, BLOCK):
            k = k0 + tl.arange(0, BLOCK).to(tl.int64)
            v = tl.load(x_ptr + k, mask=k < n, other=0).to(tl.int64)
            c = tl.cumsum(v, 0) + carry
            tl.store(out_ptr + k + 1, c, mask=k < n)
            carry = carry + tl.sum(v, 0)


SCAN_BLOCK = 1024


def scan(x: torch.Tensor, out: torch.Tensor, n: torch.Tensor, status: torch.Tensor | None
         ) -> None:
    """Exclusive prefix sum of x[:n] into out[:n+1] (int64), n a device int tensor [1]; with a
    status word, only when it asks for a rebuild."""
    guarded = status is not None
    scan_kernel[(1,)](x, out, n, x.shape[0], status if guarded else n, GUARDED=guarded,
                      BLOCK=SCAN_BLOCK, num_warps=8)


AOT_SPECS = [
    {"kernel": segment_sum_kernel, "name": "segment_sum_kernel[w=9]",
     "signature": {"x_ptr": "*fp32", "ptr_ptr": "*i64", "out_ptr": "*fp32", "width": "i32",
                   "BLOCK_R": "constexpr", "BLOCK_W": "constexpr"},
     "constexprs": {"BLOCK_R": 8, "BLOCK_W": 16}, "dtypes": ("fp32", "fp64")},
    {"kernel": segment_sum_kernel, "name": "segment_sum_kernel[w=1]",
     "signature": {"x_ptr": "*fp32", "ptr_ptr": "*i64", "out_ptr": "*fp32", "width": "i32",
                   "BLOCK_R": "constexpr", "BLOCK_W": "constexpr"},
     "constexprs": {"BLOCK_R": 128, "BLOCK_W": 1}, "dtypes": ("fp32", "fp64")},
    *({"kernel": scan_kernel, "name": f"scan_kernel[{'guarded' if g else 'plain'},{t}]",
       "signature": {"x_ptr": f"*{t}", "out_ptr": "*i64", "n_ptr": "*i64", "n_max": "i32",
                     "status_ptr": "*i32" if g else "*i64", "GUARDED": "constexpr",
                     "BLOCK": "constexpr"},
       "constexprs": {"GUARDED": g, "BLOCK": SCAN_BLOCK}, "options": {"num_warps": 8}}
      for g in (False, True) for t in ("i32", "i64")),
]
