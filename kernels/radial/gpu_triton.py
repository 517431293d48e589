"""Radial bases and envelopes on CUDA with Triton: one program per block of edges x bases.

Algorithm: the closed forms of README.md, with run-time loops over derivative orders (Hermite
recurrence, Leibniz sums), so one compiled kernel per basis x envelope serves every order and
size. The basis and envelope are compile-time constants: a kernel evaluates only its own
transcendentals, and registers stay low. Deterministic (no reductions). Block sizes per basis
and dtype (``BLOCK_E``) x 32 bases, within 128 registers and without spills (``python -m
fastff.aot`` reports each specialisation). Offsets are 64-bit: E x K passes 2^31 at 34 million
edges x 64 bases. In float32, exp, sin, cos and division compile to fast approximate
instructions (a few ulp); the kernels are compared with the float64 reference at 1e-5.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KINDS = {"gaussian": 0, "bessel": 1}
ENVELOPES = {"none": 0, "cosine": 1, "polynomial": 2}
# Edges per program by basis and dtype (x BLOCK_K = 32 bases): the largest block within 128
# registers and without spills on sm_90 for every envelope (python -m fastff.aot; README
# "Tuning").
BLOCK_E = {("gaussian", torch.float32): 32, ("gaussian", torch.float64): 16,
           ("bessel", torch.float32): 8, ("bessel", torch.float64): 8}
BLOCK_K = 32
_FP = {torch.float32: "fp32", torch.float64: "fp64"}


@triton.jit
def _cosine_deriv(r, cutoff, m):
    """u^(m) of the cosine envelope inside the cutoff: 0.5 w^m cos(w r + m pi/2) (+0.5 at m = 0)."""
    w = 3.141592653589793 / cutoff
    wm = w * 0.0 + 1.0  # loop-carried: in the dtype of the inputs (a literal is float32)
    for _t in range(0, m):
        wm = wm * w
    val = 0.5 * wm * tl.cos(w * r + m * 1.5707963267948966)
    return tl.where(m == 0, val + 0.5, val)


@triton.jit
def _polynomial_deriv(r, cutoff, m):
    """u^(m) of 1 - 28 x^6 + 48 x^7 - 21 x^8 = (1 - x)^3 g(x), g = sum_k (k+1)(k+2)/2 x^k (k <= 5),
    by Leibniz over the two factors: no term grows near the cutoff, where the expanded form
    cancels terms ~168 x^5 / c and keeps only ~1e-5 in float32."""
    x = r / cutoff
    omx = 1.0 - x
    val = x * 0.0
    for t in range(0, 4):  # d^t/dx^t (1 - x)^3 = (-1)^t 3! / (3 - t)! (1 - x)^(3 - t)
        binom = x * 0.0 + 1.0
        for i in range(0, t):
            binom = binom * (m - i) / (i + 1)  # C(m, t); zero for t > m
        h = x * 0.0 + tl.where(t % 2 == 0, 1.0, -1.0)
        for i in range(0, t):
            h = h * (3 - i)
        for _i in range(0, 3 - t):
            h = h * omx
        s = tl.maximum(m - t, 0)
        g = x * 0.0  # g^(s)(x): positive terms only
        xp = x * 0.0 + 1.0
        for k in range(s, 6):
            c = x * 0.0 + (k + 1) * (k + 2) * 0.5
            for i in range(0, s):
                c = c * (k - i)
            g += c * xp
            xp = xp * x
        val += tl.where(t <= m, binom * h * g, 0.0)
    for _t in range(0, m):
        val = val / cutoff
    return val


@triton.jit
def _envelope_deriv(r, cutoff, ENV: tl.constexpr, m):
    """u^(m)(r); zero beyond the cutoff (ENV 0: u = 1 everywhere)."""
    if ENV == 0:
        val = tl.where(m == 0, 1.0, 0.0) + r * 0.0
    else:
        if ENV == 1:
            val = _cosine_deriv(r, cutoff, m)
        else:
            val = _polynomial_deriv(r, cutoff, m)
        val = tl.where(r < cutoff, val, 0.0)
    return val


@triton.jit
def _gaussian_deriv(r, k, num_basis, cutoff, q):
    """b_k^(q)(r) = (-s)^q H_q(z) e^(-z^2), z = s (r - k delta)."""
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
    scale = s * 0.0 + 1.0
    for _t in range(0, q):
        scale = scale * (-s)
    return scale * hq * e


@triton.jit
def _bessel_deriv(r, k, cutoff, q):
    """b_k^(q)(r) = sqrt(2/c) (sin(a r) / r)^(q) = sqrt(2/c) a^(q+1) j^(q)(z), j(z) = sin(z) / z,
    z = a r. For z < 2 the closed form cancels terms ~q! / z^(q+1) down to a value ~1 / (q+1)
    (float32 keeps ~1e-5 of it at q = 2), so there the alternating Taylor series
    j^(q)(z) = sum_{2i >= q} (-1)^i z^(2i-q) / ((2i+1) (2i-q)!) is summed (12 terms)."""
    a = (k + 1) * (3.141592653589793 / cutoff)
    z = a * r
    near = z < 2.0
    rs = tl.where(near, 1.0, r)  # keeps the unused closed form finite
    closed = r * a * 0.0
    for m in range(0, q + 1):
        c = a * 0.0 + 1.0
        for t in range(0, m):
            c = c * (q - t) / (t + 1)
        f = a * 0.0 + 1.0
        for t in range(1, q - m + 1):
            f = f * t
        am = a * 0.0 + 1.0
        for _t in range(0, m):
            am = am * a
        rp = rs * 0.0 + 1.0
        for _t in range(0, q - m + 1):
            rp = rp * rs
        sign = tl.where((q - m) % 2 == 0, 1.0, -1.0)
        closed += c * am * tl.sin(a * rs + m * 1.5707963267948966) * sign * f / rp
    i0 = (q + 1) // 2
    e0 = 2 * i0 - q  # 0 or 1
    term = tl.where(e0 == 1, z, 1.0)  # z^e / e!, e = 2i - q
    series = z * 0.0
    for n in range(0, 12):
        i = i0 + n
        ex = e0 + 2 * n
        series += tl.where(i % 2 == 0, 1.0, -1.0) * term / (2 * i + 1)
        term = term * z * z / ((ex + 1) * (ex + 2))
    aq = a * 0.0 + 1.0
    for _t in range(0, q + 1):
        aq = aq * a
    return tl.sqrt(2.0 / cutoff) * tl.where(near, aq * series, closed)


@triton.jit
def radial_basis_kernel(d_ptr, cutoff_ptr, out_ptr, num_edges, num_basis, order,
                        KIND: tl.constexpr, ENV: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid_e = tl.program_id(0).to(tl.int64)  # offs_e * num_basis passes 2^31 at E K > 2^31
    pid_k = tl.program_id(1).to(tl.int64)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_e = offs_e < num_edges
    cutoff = tl.load(cutoff_ptr)  # a tensor, not an fp32 scalar argument: float64 stays exact
    mask_k = offs_k < num_basis
    r = tl.load(d_ptr + offs_e, mask=mask_e, other=1.0)[:, None]
    k = offs_k[None, :]
    acc = tl.zeros((BLOCK_E, BLOCK_K), dtype=r.dtype)
    comb = cutoff * 0.0 + 1.0
    for m in range(0, order + 1):
        u = _envelope_deriv(r, cutoff, ENV, m)
        if KIND == 0:
            b = _gaussian_deriv(r, k, num_basis, cutoff, order - m)
        else:
            b = _bessel_deriv(r, k, cutoff, order - m)
        acc += comb * u * b
        comb = comb * (order - m) / (m + 1)
    mask = mask_e[:, None] & mask_k[None, :]
    tl.store(out_ptr + offs_e[:, None] * num_basis + k, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


AOT_SPECS = [
    {"kernel": radial_basis_kernel, "name": f"radial_basis_kernel[{kind},{env}]",
     "signature": {"d_ptr": "*fp32", "cutoff_ptr": "*fp32", "out_ptr": "*fp32", "num_edges": "i32",
                   "num_basis": "i32", "order": "i32", "KIND": "constexpr", "ENV": "constexpr",
                   "BLOCK_E": "constexpr", "BLOCK_K": "constexpr"},
     "constexprs": {"KIND": KINDS[kind], "ENV": ENVELOPES[env],
                    "BLOCK_E": BLOCK_E[kind, dtype], "BLOCK_K": BLOCK_K},
     "dtypes": (_FP[dtype],)}
    for kind in KINDS for env in ENVELOPES for dtype in _FP
]


def radial_basis(distances, num_basis: int, cutoff: float, kind: str, envelope: str, order: int):
    """Launcher: see README.md."""
    d = distances.detach().contiguous()
    out = torch.empty(d.shape[0], num_basis, dtype=d.dtype, device=d.device)
    if d.shape[0]:
        block_e = BLOCK_E[kind, d.dtype if d.dtype == torch.float64 else torch.float32]
        grid = (triton.cdiv(d.shape[0], block_e), triton.cdiv(num_basis, BLOCK_K))
        cut = torch.full((1,), float(cutoff), dtype=d.dtype, device=d.device)
        radial_basis_kernel[grid](d, cut, out, d.shape[0], num_basis, int(order),
                                  KIND=KINDS[kind], ENV=ENVELOPES[envelope], BLOCK_E=block_e,
                                  BLOCK_K=BLOCK_K)
    return out


__all__ = ["AOT_SPECS", "radial_basis"]
