"""SchNet's gaussian filter network fused from the distances to its second GEMM (numba, float32).

With the gaussian basis ``b_k(r) = exp(-(x - k)^2 / 2)``, ``x = r / Δ`` (kernels/radial), the
first layer ``h = w1 b(r) + b1`` is a sum over a band: the 16 functions ``k = floor(x) - 7 ..
floor(x) + 8`` hold every term above ``exp(-32) ≈ 1.3e-14`` of the largest (the others have
``|x - k| >= 8``), far below float32 rounding. So per pair the first layer costs 16
multiply-adds per feature instead of K, in the loop that also evaluates the basis, the envelope
and the activation: no [b, K] basis and no [b, F] hidden layer is written, and the first
layer's GEMM is gone. Energy and forces' backward also needs ``h' = w1 b'(r)`` (the same band,
``b_k' = (k - x) b_k / Δ``); its distance gradient is then one more dot per pair,

    ∂L/∂d = u' (<t, act(h)> + <ū, b2>) + u <t, act'(h) h'>,   t = w2^T ū   (dense.filter_vjp)

and the hidden layer's gradient times w1 (a [b, F] x [F, K] GEMM) is never formed. What stays
a GEMM is the F x F part: ``[u act(h) | u] [w2^T; b2]`` forward and ``t = ū w2`` backward.

w1 is read as a padded transpose [K + 2 PAD, F] (zero rows around w1^T), so the band's rows
are always in bounds and the sum over the band is one fixed expression per feature. Each pair
is computed alone, in a fixed order: deterministic. Parameter gradients (training), float64,
bessel bases and operands that require grad take dense's basis + GEMM path (``FusedFilter``
falls back to it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from fastff.kernels.cpu_math import exp_neg
from fastff.kernels.message.cpu_numba_activation import KINDS, FusedActivation, _value_and_slope
from fastff.kernels.radial.cpu_numba import ENVELOPES, envelope_run_f32
from fastff.kernels.radial.reference import gaussian_grid

F32 = np.float32
BAND = 16  # basis functions per pair: k = floor(x) - _BELOW .. floor(x) + BAND - 1 - _BELOW
_BELOW = 7
PAD = 16  # zero rows before and after w1^T: the band of any x in (-8, K + 7) stays inside
# k - floor(x) over the band, as float32 (AVX2 has no int64 -> float32 vector conversion)
_OFFSETS = np.arange(-_BELOW, BAND - _BELOW).astype(np.float32)
# Pairs per prange task: the envelope of a run of pairs is one vectorized loop.
_CHUNK = 256


def padded_first_layer(w1: torch.Tensor) -> torch.Tensor:
    """[K + 2 PAD, F]: w1^T [K, F] between PAD zero rows on each side."""
    nf, num_basis = w1.shape
    out = w1.new_zeros(num_basis + 2 * PAD, nf)
    out[PAD:PAD + num_basis] = w1.t()
    return out


@njit(cache=True, inline="always", fastmath={"contract"})
def _band(r, inv_delta, num_basis, inv_delta32, values, slopes):
    """First padded row of the band of distance r, with the band's basis values (and slopes
    db/dr) in ``values`` (``slopes``, if it has BAND entries). A band that misses every basis
    function (x <= -8, x >= K + 7, or NaN) gets zero values at the all-zero rows 0..BAND-1."""
    x = r * inv_delta
    if not (x > -8.0 and x < num_basis + 7.0):
        for m in range(BAND):
            values[m] = F32(0.0)
        for m in range(slopes.shape[0]):
            slopes[m] = F32(0.0)
        return 0
    whole = math.floor(x)
    frac = F32(x - whole)
    for m in range(BAND):
        t = _OFFSETS[m] - frac  # k - x
        values[m] = exp_neg(F32(0.5) * t * t)
    for m in range(slopes.shape[0]):
        slopes[m] = (_OFFSETS[m] - frac) * inv_delta32 * values[m]
    return int(whole) - _BELOW + PAD


@njit(cache=True, inline="always")
def _band_of(a, start):
    """(a[start], ..., a[start + 15]): the band's 16 values or rows, as a tuple of scalars
    or arrays that the feature loops index with constants."""
    return (a[start], a[start + 1], a[start + 2], a[start + 3], a[start + 4], a[start + 5],
            a[start + 6], a[start + 7], a[start + 8], a[start + 9], a[start + 10],
            a[start + 11], a[start + 12], a[start + 13], a[start + 14], a[start + 15])


@njit(cache=True, inline="always", fastmath={"contract"})
def _band_dot(c, r, f):
    """sum_m c[m] r[m][f] over the band, as a balanced tree: one pass over the features
    loads each of the 16 rows once and stores once (four passes of four rows took 1.4x the
    time of the first layer at F = 64)."""
    return ((((c[0] * r[0][f] + c[1] * r[1][f]) + (c[2] * r[2][f] + c[3] * r[3][f]))
             + ((c[4] * r[4][f] + c[5] * r[5][f]) + (c[6] * r[6][f] + c[7] * r[7][f])))
            + (((c[8] * r[8][f] + c[9] * r[9][f]) + (c[10] * r[10][f] + c[11] * r[11][f]))
               + ((c[12] * r[12][f] + c[13] * r[13][f]) + (c[14] * r[14][f] + c[15] * r[15][f]))))


@njit(cache=True, inline="always", fastmath={"contract"})
def _first_layer(w, start, b, b1, nf, h):
    """h[:nf] = b1 + sum_m b[m] w[start + m]."""
    c, r = _band_of(b, 0), _band_of(w, start)
    for f in range(nf):
        h[f] = b1[f] + _band_dot(c, r, f)


@njit(cache=True, inline="always", fastmath={"contract"})
def _first_layer_and_slope(w, start, b, s, b1, nf, h, hs):
    """_first_layer, and hs = sum_m s[m] w[start + m] (the layer's d/dr) from the same rows."""
    c, cs, r = _band_of(b, 0), _band_of(s, 0), _band_of(w, start)
    for f in range(nf):  # two loops: one with both sums spilled its 32 broadcast coefficients
        h[f] = b1[f] + _band_dot(c, r, f)
    for f in range(nf):
        hs[f] = _band_dot(cs, r, f)


@njit(cache=True, parallel=True, fastmath={"contract"})
def _hidden_values(d, w, b1, inv_delta, cutoff, env, kind, env_out, aug):
    """aug[p] = [u act(h) | u] for the distances d [b] (float32): the left factor of W's GEMM,
    as cpu_numba_activation._scaled_values writes it from a GEMM's h."""
    num_basis, nf = w.shape[0] - 2 * PAD, aug.shape[1] - 1
    inv_delta32 = F32(inv_delta)
    for c in prange((d.shape[0] + _CHUNK - 1) // _CHUNK):
        lo, hi = c * _CHUNK, min((c + 1) * _CHUNK, d.shape[0])
        envelope_run_f32(d, lo, hi, cutoff, env, 0, env_out)
        b, no_slopes = np.empty(BAND, F32), np.empty(0, F32)
        for p in range(lo, hi):
            row = aug[p]
            start = _band(np.float64(d[p]), inv_delta, num_basis, inv_delta32, b, no_slopes)
            _first_layer(w, start, b, b1, nf, row)
            u = env_out[0, p]
            for f in range(nf):
                row[f] = u * _value_and_slope(row[f], kind)[0]
            row[nf] = u


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _hidden_vjp(d, w, b1, inv_delta, cutoff, env, kind, t, u, b2, env_out, grad_d, aug,
                want_values):
    """grad_d[p] = u' (<t, act(h)> + <u_p, b2>) + u <t, act'(h) h'> for the distances d [b]
    and t = u w2 [b, F] (float32), and, if want_values, aug as ``_hidden_values`` writes it."""
    num_basis, nf = w.shape[0] - 2 * PAD, t.shape[1]
    inv_delta32 = F32(inv_delta)
    for c in prange((d.shape[0] + _CHUNK - 1) // _CHUNK):
        lo, hi = c * _CHUNK, min((c + 1) * _CHUNK, d.shape[0])
        envelope_run_f32(d, lo, hi, cutoff, env, 1, env_out)
        b, s = np.empty(BAND, F32), np.empty(BAND, F32)
        h, hs = np.empty(nf, F32), np.empty(nf, F32)
        for p in range(lo, hi):
            start = _band(np.float64(d[p]), inv_delta, num_basis, inv_delta32, b, s)
            _first_layer_and_slope(w, start, b, s, b1, nf, h, hs)
            u0, u1 = env_out[0, p], env_out[1, p]
            tp, up = t[p], u[p]
            ta = ths = ub = F32(0.0)
            if want_values:
                row = aug[p]
                for f in range(nf):
                    a, slope = _value_and_slope(h[f], kind)
                    ta += tp[f] * a
                    ths += tp[f] * slope * hs[f]
                    ub += up[f] * b2[f]
                    row[f] = u0 * a
                row[nf] = u0
            else:
                for f in range(nf):
                    a, slope = _value_and_slope(h[f], kind)
                    ta += tp[f] * a
                    ths += tp[f] * slope * hs[f]
                    ub += up[f] * b2[f]
            grad_d[p] = u1 * (ta + ub) + u0 * ths


class FusedFilter(FusedActivation):
    """FusedActivation with the filter network evaluated from the distances by the kernels
    above: gaussian basis, float32 CPU operands that require no grad, and for the backward no
    parameter gradients. Anything else takes dense's basis + GEMM path."""

    def _fusable(self, kind: str, d: torch.Tensor, params) -> bool:
        return kind == "gaussian" and self._fused_with(d, *params)

    def _padded_first_layer(self, w1: torch.Tensor) -> torch.Tensor:
        return self._cached("_w1_padded", lambda: padded_first_layer(w1), w1)

    def _launch_args(self, d, params, cutoff, env_kind):
        w1, b1 = params[0], params[1]
        delta, _ = gaussian_grid(w1.shape[1], cutoff)
        return (d.numpy(), self._padded_first_layer(w1).numpy(), b1.contiguous().numpy(),
                1.0 / delta, float(cutoff), ENVELOPES[env_kind], KINDS[self.kind])

    def filter_from_distances(self, d, params, cutoff, kind, env_kind, radial_fn):
        if not self._fusable(kind, d, params):
            return super().filter_from_distances(d, params, cutoff, kind, env_kind, radial_fn)
        nf = params[0].shape[0]
        aug, env = d.new_empty(d.shape[0], nf + 1), d.new_empty(1, d.shape[0])
        if d.shape[0]:
            _hidden_values(*self._launch_args(d, params, cutoff, env_kind), env.numpy(),
                           aug.numpy())
        return aug @ self._second_layer(params[2], params[3])

    def filter_vjp_from_distances(self, u, d, params, cutoff, kind, env_kind, need_params,
                                  need_values, radial_fn):
        if need_params or not (self._fusable(kind, d, params) and self._fused(u)):
            return super().filter_vjp_from_distances(u, d, params, cutoff, kind, env_kind,
                                                     need_params, need_values, radial_fn)
        w2, b2 = params[2], params[3]
        b, nf = u.shape
        t = u @ w2  # d<u, a w2^T>/da
        grad_d, env = d.new_empty(b), d.new_empty(2, b)
        aug = d.new_empty(b if need_values else 0, nf + 1)
        if b:
            _hidden_vjp(*self._launch_args(d, params, cutoff, env_kind), t.numpy(), u.numpy(),
                        b2.contiguous().numpy(), env.numpy(), grad_d.numpy(), aug.numpy(),
                        bool(need_values))
        values = aug @ self._second_layer(w2, b2) if need_values else None
        return grad_d, None, None, None, None, values
