"""Radial bases and envelopes on CUDA with Triton: one program per block of edges x bases.

Algorithm: the closed forms of README.md, with run-time loops over derivative orders (Hermite
recurrence, Leibniz sums), so one compiled kernel serves every order and size. The cost is a few
redundant recurrences per order, negligible next to the memory traffic of writing [E, K].
Deterministic (no reductions). Block sizes: 32 edges x 32 bases keeps registers low (checked with
``python -m fastff.aot``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

KINDS = {"gaussian": 0, "bessel": 1}
ENVELOPES = {"none": 0, "cosine": 1, "polynomial": 2}
BLOCK_E = 32  # 64 x 32 needed 222 registers (ptxas, sm_90)
BLOCK_K = 32


@triton.jit
def _envelope_deriv(r, cutoff, env, m):
    """u^(m)(r); zero beyond the cutoff (env 0: u = 1)."""
    x = r / cutoff
    w = 3.141592653589793 / cutoff
    # cosine: 0.5 w^m cos(w r + m pi/2) (+0.5 at m = 0)
    wm = 1.0
    for _t in range(0, m):
        wm = wm * w
    cos_val = 0.5 * wm * tl.cos(w * r + m * 1.5707963267948966)
    cos_val = tl.where(m == 0, cos_val + 0.5, cos_val)
    # polynomial: 1 - 28 x^6 + 48 x^7 - 21 x^8, term by term
    poly = tl.where(m == 0, 1.0, 0.0) + x * 0.0
    cm = 1.0
    for _t in range(0, m):
        cm = cm / cutoff
    for qi in range(0, 3):
        q = 6 + qi
        coef = tl.where(qi == 0, -28.0, tl.where(qi == 1, 48.0, -21.0))
        f = 1.0
        for t in range(0, m):
            f = f * (q - t)
        xp = x * 0.0 + 1.0
        for _t in range(0, q - m):
            xp = xp * x
        poly += tl.where(m <= q, coef * f * xp * cm, 0.0)
    val = tl.where(env == 1, cos_val, poly)
    val = tl.where(r < cutoff, val, 0.0)
    one = tl.where(m == 0, 1.0, 0.0) + r * 0.0
    return tl.where(env == 0, one, val)


@triton.jit
def _basis_deriv(r, k, num_basis, cutoff, kind, q):
    """b_k^(q)(r) for r [BE, 1] and k [1, BK] (k counts from 0)."""
    # gaussian
    delta = tl.where(num_basis > 1, cutoff / tl.maximum(num_basis - 1, 1), cutoff)
    s = 0.7071067811865476 / delta
    z = s * (r - k * delta)
    e = tl.exp(-z * z)
    h_prev = z * 0.0 + 1.0
    h = 2.0 * z
    for n in range(1, q):
        h_new = 2.0 * z * h - 2.0 * n * h_prev
        h_prev = h
        h = h_new
    hq = tl.where(q == 0, z * 0.0 + 1.0, h)
    p = 1.0
    for _t in range(0, q):
        p = p * (-s)
    gauss = p * hq * e
    # bessel
    a = (k + 1) * (3.141592653589793 / cutoff)
    tiny = tl.abs(r) < 1e-12
    rs = tl.where(tiny, 1.0, r)
    acc = r * a * 0.0
    for m in range(0, q + 1):
        c = 1.0
        for t in range(0, m):
            c = c * (q - t) / (t + 1)
        f = 1.0
        for t in range(1, q - m + 1):
            f = f * t
        am = a * 0.0 + 1.0
        for _t in range(0, m):
            am = am * a
        rp = rs * 0.0 + 1.0
        for _t in range(0, q - m + 1):
            rp = rp * rs
        sign = tl.where((q - m) % 2 == 0, 1.0, -1.0)
        acc += c * am * tl.sin(a * rs + m * 1.5707963267948966) * sign * f / rp
    aq = a * 0.0 + 1.0
    for _t in range(0, q + 1):
        aq = aq * a
    limit_sign = tl.where((q // 2) % 2 == 0, 1.0, -1.0)
    limit = tl.where(q % 2 == 0, aq * limit_sign / (q + 1), 0.0)
    bessel = tl.sqrt(2.0 / cutoff) * tl.where(tiny, limit, acc)
    return tl.where(kind == 0, gauss, bessel)


@triton.jit
def radial_basis_kernel(d_ptr, cutoff_ptr, out_ptr, num_edges, num_basis, kind, env, order,
                        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_e = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_e = offs_e < num_edges
    cutoff = tl.load(cutoff_ptr)  # a tensor, not an fp32 scalar argument: float64 stays exact
    mask_k = offs_k < num_basis
    r = tl.load(d_ptr + offs_e, mask=mask_e, other=1.0)[:, None]
    k = offs_k[None, :]
    acc = tl.zeros((BLOCK_E, BLOCK_K), dtype=r.dtype)
    comb = 1.0
    for m in range(0, order + 1):
        u = _envelope_deriv(r, cutoff, env, m)
        b = _basis_deriv(r, k, num_basis, cutoff, kind, order - m)
        acc += comb * u * b
        comb = comb * (order - m) / (m + 1)
    mask = mask_e[:, None] & mask_k[None, :]
    tl.store(out_ptr + offs_e[:, None] * num_basis + k, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


AOT_SPECS = [
    {"kernel": radial_basis_kernel,
     "signature": {"d_ptr": "*fp32", "cutoff_ptr": "*fp32", "out_ptr": "*fp32", "num_edges": "i32",
                   "num_basis": "i32", "kind": "i32", "env": "i32", "order": "i32",
                   "BLOCK_E": "constexpr", "BLOCK_K": "constexpr"},
     "constexprs": {"BLOCK_E": BLOCK_E, "BLOCK_K": BLOCK_K}},
]


def radial_basis(distances, num_basis: int, cutoff: float, kind: str, envelope: str, order: int):
    """Launcher: see README.md."""
    d = distances.detach().contiguous()
    out = torch.empty(d.shape[0], num_basis, dtype=d.dtype, device=d.device)
    if d.shape[0]:
        grid = (triton.cdiv(d.shape[0], BLOCK_E), triton.cdiv(num_basis, BLOCK_K))
        cut = torch.full((1,), float(cutoff), dtype=d.dtype, device=d.device)
        radial_basis_kernel[grid](d, cut, out, d.shape[0], num_basis, KINDS[kind],
                                  ENVELOPES[envelope], int(order), BLOCK_E=BLOCK_E,
                                  BLOCK_K=BLOCK_K)
    return out


__all__ = ["AOT_SPECS", "radial_basis", "math"]
