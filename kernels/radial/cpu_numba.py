"""Radial bases and envelopes on CPU with numba: one pass over the edges, no temporaries.

Algorithm: the closed forms of README.md evaluated per edge (Hermite recurrence for gaussians,
Leibniz sums for the Bessel functions and for the envelope product; for the filter networks'
float32 gaussians, each value from a vectorized exp), parallel over edges with
``prange``. Each output element is written by exactly one thread: deterministic. Tuned for the
sizes of MLFF edge lists (1e4..1e7 edges, K <= 128, order <= 2: recurrences over k); the
per-edge scratch is O(order) so any order works.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

import fastff.kernels.cpu_threads  # noqa: F401  (numba's OpenMP layer first)
from fastff.kernels.cpu_math import exp_neg

KINDS = {"gaussian": 0, "bessel": 1}
ENVELOPES = {"none": 0, "cosine": 1, "polynomial": 2}


@njit(cache=True, inline="always")
def _comb(n, m):
    c = 1.0
    for t in range(m):
        c = c * (n - t) / (t + 1)
    return c


@njit(cache=True)
def envelope_derivs(r, cutoff, env, order, out):
    """out[m] = u^(m)(r) for m = 0..order."""
    for m in range(order + 1):
        out[m] = 0.0
    if env == 0:
        out[0] = 1.0
        return
    if r >= cutoff:
        return
    if env == 1:
        w = math.pi / cutoff
        p = 0.5
        for m in range(order + 1):
            out[m] = p * math.cos(w * r + m * (math.pi / 2))
            p *= w
        out[0] += 0.5
    else:
        x = r / cutoff
        out[0] = 1.0
        for m in range(order + 1):
            for q, coef in ((6, -28.0), (7, 48.0), (8, -21.0)):
                if m <= q:
                    f = 1.0
                    for t in range(m):
                        f *= q - t
                    out[m] += coef * f * x ** (q - m) / cutoff**m


@njit(cache=True)
def basis_derivs(r, k, num_basis, cutoff, kind, order, out):
    """out[n] = b_k^(n)(r) for n = 0..order (k counts from 0)."""
    if kind == 0:
        delta = cutoff / (num_basis - 1) if num_basis > 1 else cutoff
        s = math.sqrt(0.5) / delta
        z = s * (r - k * delta)
        e = math.exp(-z * z)
        h_prev, h = 1.0, 2.0 * z
        out[0] = e
        p = -s
        if order >= 1:
            out[1] = p * h * e
        for n in range(1, order):
            h_prev, h = h, 2.0 * z * h - 2.0 * n * h_prev
            p *= -s
            out[n + 1] = p * h * e
    else:
        a = (k + 1) * math.pi / cutoff
        norm = math.sqrt(2.0 / cutoff)
        if abs(r) < 1e-12:
            for n in range(order + 1):
                if n % 2 == 0:
                    sign = 1.0 if (n // 2) % 2 == 0 else -1.0
                    out[n] = norm * a ** (n + 1) * sign / (n + 1)
                else:
                    out[n] = 0.0
            return
        for n in range(order + 1):
            acc = 0.0
            for m in range(n + 1):
                f = 1.0
                for t in range(1, n - m + 1):
                    f *= t
                sign = 1.0 if (n - m) % 2 == 0 else -1.0
                acc += (_comb(n, m) * a**m * math.sin(a * r + m * (math.pi / 2)) * sign * f
                        / r ** (n - m + 1))
            out[n] = norm * acc


@njit(cache=True, inline="always")
def _leibniz(order, u0, u1, u2, b0, b1, b2):
    """d^order/dr^order (u b) for order <= 2."""
    if order == 0:
        return u0 * b0
    if order == 1:
        return u1 * b0 + u0 * b1
    return u2 * b0 + 2.0 * u1 * b1 + u0 * b2


@njit(cache=True, parallel=True)
def _radial_fast(d, num_basis, cutoff, kind, env, order, out):
    """Orders 0 to 2 by recurrences over k: 3 exp (gaussian) or 2 trig (bessel) calls per edge
    instead of K, so the cost is a few multiply-adds per edge and basis function. Computed in
    float64 whatever the storage dtype; the recurrences lose ~K ulp of float64, far below
    float32 rounding."""
    for e in prange(d.shape[0]):
        r = np.float64(d[e])  # float() keeps a float32 a float32 in numba
        u0, u1, u2 = _envelope_orders(r, cutoff, env)  # _leibniz reads those <= order
        if kind == 0:
            delta = cutoff / (num_basis - 1) if num_basis > 1 else cutoff
            x = r / delta  # b_k = exp(-(x - k)^2 / 2), so b_{k+1} / b_k = exp(x - k - 1/2)
            kc = min(max(int(math.floor(x + 0.5)), 0), num_basis - 1)
            bc = math.exp(-0.5 * (x - kc) ** 2)
            for direction in (1, -1):
                b = bc
                k = kc
                step = math.exp(direction * (x - kc) - 0.5)
                while True:
                    z = (k - x) / delta  # b' = z b, b'' = (z^2 - 1 / delta^2) b
                    b2 = (z * z - 1.0 / (delta * delta)) * b if order == 2 else 0.0
                    out[e, k] = _leibniz(order, u0, u1, u2, b, z * b, b2)
                    k += direction
                    if k < 0 or k >= num_basis:
                        break
                    b *= step
                    step *= 0.36787944117144233  # e^-1
        else:
            norm = math.sqrt(2.0 / cutoff)
            th = math.pi * r / cutoff
            if abs(r) < 1e-12:  # the limits of b = norm sin(a r) / r and its derivatives
                for k in range(num_basis):
                    a = (k + 1) * math.pi / cutoff
                    out[e, k] = _leibniz(order, u0, u1, u2, norm * a, 0.0, -norm * a**3 / 3.0)
                continue
            c1 = math.cos(th)
            s_prev, s_cur = 0.0, math.sin(th)  # sin(k th), k = 0, 1
            co_prev, co_cur = 1.0, c1  # cos(k th)
            for k in range(num_basis):
                a = (k + 1) * math.pi / cutoff
                b = norm * s_cur / r
                b1 = norm * (a * co_cur * r - s_cur) / (r * r) if order else 0.0
                b2 = -a * a * b - 2.0 * b1 / r if order == 2 else 0.0
                out[e, k] = _leibniz(order, u0, u1, u2, b, b1, b2)
                s_prev, s_cur = s_cur, 2.0 * c1 * s_cur - s_prev
                co_prev, co_cur = co_cur, 2.0 * c1 * co_cur - co_prev


@njit(cache=True, inline="always")
def _put_orders(out, e, k, n, b, b1, b2):
    out[0, e, k] = b
    if n >= 1:
        out[1, e, k] = b1
        if n >= 2:
            out[2, e, k] = b2


@njit(cache=True, inline="always")
def _envelope_orders(r, cutoff, env):
    """(u, u', u'') at r, as ``envelope_derivs`` at order 2 without a scratch array."""
    if env == 0:
        return 1.0, 0.0, 0.0
    if r >= cutoff:
        return 0.0, 0.0, 0.0
    if env == 1:
        w = math.pi / cutoff
        c, s = math.cos(w * r), math.sin(w * r)
        return 0.5 * c + 0.5, -0.5 * w * s, -0.5 * w * w * c
    x = r / cutoff
    x5 = x**5
    u0 = 1.0 + x5 * x * (-28.0 + x * (48.0 - 21.0 * x))
    u1 = x5 * (-168.0 + x * (336.0 - 168.0 * x)) / cutoff
    u2 = x * x * x * x * (-840.0 + x * (2016.0 - 1176.0 * x)) / (cutoff * cutoff)
    return u0, u1, u2


@njit(cache=True, inline="always")
def _put_envelope(env_out, e, r, cutoff, env, n):
    u0, u1, u2 = _envelope_orders(r, cutoff, env)
    env_out[0, e] = u0
    if n >= 1:
        env_out[1, e] = u1
        if n >= 2:
            env_out[2, e] = u2


@njit(cache=True, parallel=True)
def _bare_orders(d, num_basis, cutoff, kind, env, out, env_out):
    """out[n, e, k] = b_k^(n)(d_e), n = 0..len(out) - 1 <= 2, no envelope: what the blocked
    filter networks read (they apply the envelope to their outputs), and env_out[n, e] =
    u^(n)(d_e), computed in float64. One pass for all orders; the gaussian's upward and
    downward recurrences run in one loop, so their multiplies overlap (one chain alone is
    bound by multiply latency; README.md, Tuning)."""
    n = out.shape[0] - 1
    if kind == 1:
        for e in prange(d.shape[0]):
            _put_envelope(env_out, e, np.float64(d[e]), cutoff, env, n)
            _bessel_orders(out, e, np.float64(d[e]), num_basis, cutoff, n)
        return
    delta = cutoff / (num_basis - 1) if num_basis > 1 else cutoff
    inv_delta = 1.0 / delta
    curv = inv_delta * inv_delta
    for e in prange(d.shape[0]):
        _put_envelope(env_out, e, np.float64(d[e]), cutoff, env, n)
        x = np.float64(d[e]) * inv_delta  # b_k = exp(-(x - k)^2 / 2): b_{k+1} / b_k = exp(x-k-1/2)
        kc = min(max(int(math.floor(x + 0.5)), 0), num_basis - 1)
        b = math.exp(-0.5 * (x - kc) ** 2)
        z = (kc - x) * inv_delta  # b' = z b, b'' = (z^2 - 1 / delta^2) b
        _put_orders(out, e, kc, n, b, z * b, (z * z - curv) * b)
        up, down = math.exp(x - kc - 0.5), math.exp(kc - x - 0.5)
        b_up = b_down = b
        for s in range(1, max(num_basis - 1 - kc, kc) + 1):
            if kc + s < num_basis:
                b_up *= up
                up *= 0.36787944117144233  # e^-1
                z = (kc + s - x) * inv_delta
                _put_orders(out, e, kc + s, n, b_up, z * b_up, (z * z - curv) * b_up)
            if kc - s >= 0:
                b_down *= down
                down *= 0.36787944117144233
                z = (kc - s - x) * inv_delta
                _put_orders(out, e, kc - s, n, b_down, z * b_down, (z * z - curv) * b_down)


# Edges per prange task of the float32 gaussian kernel: its envelope loop then runs over a
# contiguous run of edges in SIMD lanes.
_EDGE_CHUNK = 256
_PI32 = np.float32(math.pi)


@njit(cache=True, inline="always", fastmath={"contract"})
def _cosine_envelope_f32(d, lo, hi, cutoff, n, env_out):
    """env_out[m, e] = u^(m)(d_e), m <= n, of the cosine envelope for float32 outputs, from
    cos(pi x) = -sin(pi y) and sin(pi x) = cos(pi y), y = x - 1/2 in [-1/2, 1/2) inside the
    cutoff, each by its Taylor polynomial in float32 (truncation < 1e-9): a branch-free loop
    over edges that vectorizes, where numba's math.cos and math.sin are two libm calls per
    edge (~45% of the radial kernel's time at K = 32 with them)."""
    inv_c = 1.0 / cutoff
    w = np.float32(math.pi / cutoff)
    half = np.float32(0.5)
    zero = np.float32(0.0)
    for e in range(lo, hi):
        r = np.float64(d[e])
        z = _PI32 * np.float32(r * inv_c - 0.5)
        z2 = z * z
        sin_z = z * (np.float32(1.0) + z2 * (np.float32(-1.0 / 6.0) + z2 * (
            np.float32(1.0 / 120.0) + z2 * (np.float32(-1.0 / 5040.0) + z2 * (
                np.float32(1.0 / 362880.0) + z2 * (np.float32(-1.0 / 39916800.0)
                                                   + z2 * np.float32(1.0 / 6227020800.0)))))))
        cos_z = np.float32(1.0) + z2 * (np.float32(-0.5) + z2 * (np.float32(1.0 / 24.0) + z2 * (
            np.float32(-1.0 / 720.0) + z2 * (np.float32(1.0 / 40320.0) + z2 * (
                np.float32(-1.0 / 3628800.0) + z2 * (np.float32(1.0 / 479001600.0)
                                                     - z2 * np.float32(1.0 / 87178291200.0)))))))
        inside = r < cutoff
        env_out[0, e] = half - half * sin_z if inside else zero
        if n >= 1:
            env_out[1, e] = -half * w * cos_z if inside else zero
            if n >= 2:
                env_out[2, e] = half * w * w * sin_z if inside else zero


@njit(cache=True, inline="always")
def envelope_run_f32(d, lo, hi, cutoff, env, n, env_out):
    """env_out[m, e] = u^(m)(d_e) for the edges lo..hi - 1 and m <= n, into float32: the cosine
    envelope by ``_cosine_envelope_f32``, the others in float64 per edge."""
    if env == 1:
        _cosine_envelope_f32(d, lo, hi, cutoff, n, env_out)
    else:
        for e in range(lo, hi):
            _put_envelope(env_out, e, np.float64(d[e]), cutoff, env, n)


@njit(cache=True, parallel=True, fastmath={"contract"})
def _gaussian_orders_f32(d, num_basis, cutoff, env, out, env_out):
    """_bare_orders of the gaussian basis into float32 outputs, each b_k = exp(-(x - k)^2 / 2)
    evaluated on its own with the vectorized float32 exp (cpu_math.exp_neg): the loops over k
    run in SIMD lanes where the recurrence is a chain of dependent multiplies. k - x is
    formed in float32 as (k - floor(x)) - frac(x), exact up to the rounding of frac(x), and a
    float32 copy of k is read from an array (AVX2 has no int64 -> float32 vector conversion).
    Within a few float32 ulp of max|b| (tests/kernels/test_radial.py). The cosine envelope is
    evaluated over runs of edges (``_cosine_envelope_f32``) instead of libm's cos and sin per
    edge (README.md, Tuning)."""
    n = out.shape[0] - 1
    delta = cutoff / (num_basis - 1) if num_basis > 1 else cutoff
    inv_delta = 1.0 / delta
    inv_delta32 = np.float32(inv_delta)
    curv = np.float32(inv_delta * inv_delta)
    ks = np.arange(num_basis).astype(np.float32)
    half = np.float32(0.5)
    for c in prange((d.shape[0] + _EDGE_CHUNK - 1) // _EDGE_CHUNK):
        lo, hi = c * _EDGE_CHUNK, min((c + 1) * _EDGE_CHUNK, d.shape[0])
        envelope_run_f32(d, lo, hi, cutoff, env, n, env_out)
        for e in range(lo, hi):
            _gaussian_row_f32(d, e, n, inv_delta, inv_delta32, curv, ks, half, out)


@njit(cache=True, inline="always", fastmath={"contract"})
def _gaussian_row_f32(d, e, n, inv_delta, inv_delta32, curv, ks, half, out):
    """The basis of edge e at orders 0..n (see _gaussian_orders_f32)."""
    num_basis = ks.shape[0]
    r = np.float64(d[e])
    x = r * inv_delta  # b_k = exp(-(x - k)^2 / 2), b_k' = z_k b_k, z_k = (k - x) / delta
    whole = math.floor(x)
    base, frac = np.float32(whole), np.float32(x - whole)
    b = out[0, e]
    for k in range(num_basis):
        t = (ks[k] - base) - frac
        b[k] = exp_neg(half * t * t)
    if n >= 1:
        b1 = out[1, e]
        for k in range(num_basis):
            b1[k] = ((ks[k] - base) - frac) * inv_delta32 * b[k]
    if n >= 2:
        b2 = out[2, e]
        for k in range(num_basis):
            z = ((ks[k] - base) - frac) * inv_delta32
            b2[k] = (z * z - curv) * b[k]


@njit(cache=True, inline="always")
def _bessel_orders(out, e, r, num_basis, cutoff, n):
    norm = math.sqrt(2.0 / cutoff)
    if abs(r) < 1e-12:  # the limits of b = norm sin(a r) / r and its derivatives
        for k in range(num_basis):
            a = (k + 1) * math.pi / cutoff
            _put_orders(out, e, k, n, norm * a, 0.0, -norm * a**3 / 3.0)
        return
    th = math.pi * r / cutoff
    c1 = math.cos(th)
    s_prev, s_cur = 0.0, math.sin(th)  # sin(k th), k = 0, 1
    co_prev, co_cur = 1.0, c1  # cos(k th)
    for k in range(num_basis):
        a = (k + 1) * math.pi / cutoff
        b = norm * s_cur / r
        b1 = norm * (a * co_cur * r - s_cur) / (r * r)
        _put_orders(out, e, k, n, b, b1, -a * a * b - 2.0 * b1 / r)
        s_prev, s_cur = s_cur, 2.0 * c1 * s_cur - s_prev
        co_prev, co_cur = co_cur, 2.0 * c1 * co_cur - co_prev


@njit(cache=True, parallel=True)
def _radial_basis(d, num_basis, cutoff, kind, env, order, out):
    for e in prange(d.shape[0]):
        r = np.float64(d[e])  # float() keeps a float32 a float32 in numba
        u = np.empty(order + 1)
        b = np.empty(order + 1)
        envelope_derivs(r, cutoff, env, order, u)
        for k in range(num_basis):
            basis_derivs(r, k, num_basis, cutoff, kind, order, b)
            acc = 0.0
            for m in range(order + 1):
                acc += _comb(order, m) * u[m] * b[order - m]
            out[e, k] = acc


def radial_basis(distances, num_basis: int, cutoff: float, kind: str, envelope: str, order: int):
    """Launcher: see README.md."""
    out = torch.empty(distances.shape[0], num_basis, dtype=distances.dtype)
    if distances.shape[0]:
        kernel = _radial_fast if order <= 2 else _radial_basis
        kernel(distances.detach().contiguous().numpy(), num_basis, float(cutoff), KINDS[kind],
               ENVELOPES[envelope], int(order), out.numpy())
    return out


def radial_orders(distances, num_basis: int, cutoff: float, kind: str, envelope: str,
                  order: int):
    """([b, b', ...], [u, u', ...]): the bare basis [E, K] and the envelope [E] at orders
    0..order, in one pass for order <= 2 (the orders share the exp / trig recurrences); the
    envelope is computed in float64 and stored in the dtype of ``distances``."""
    if not 0 <= order <= 2:
        raise ValueError(f"order must be 0, 1 or 2 (what the filter networks read), got {order}")
    out = torch.empty(order + 1, distances.shape[0], num_basis, dtype=distances.dtype)
    env = torch.empty(order + 1, distances.shape[0], dtype=distances.dtype)
    if not distances.shape[0]:
        return list(out.unbind(0)), list(env.unbind(0))
    d = distances.detach().contiguous().numpy()
    if kind == "gaussian" and distances.dtype == torch.float32:
        _gaussian_orders_f32(d, num_basis, float(cutoff), ENVELOPES[envelope], out.numpy(),
                             env.numpy())
    else:
        _bare_orders(d, num_basis, float(cutoff), KINDS[kind], ENVELOPES[envelope], out.numpy(),
                     env.numpy())
    return list(out.unbind(0)), list(env.unbind(0))
