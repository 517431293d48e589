"""SchNet's gaussian filter network fused from the distances to its second GEMM (numba, float32).

With the gaussian basis ``b_k(r) = exp(-(x - k)^2 / 2)``, ``x = r / Δ``, only the 16 functions
``k = floor(x) - 7 .. floor(x) + 8`` are above float32 rounding (the rest are below 1.3e-14 of
the largest), so the first layer ``h = w1 b(r) + b1`` is a 16-term band sum per feature,
computed in one loop with the basis, the envelope and the activation: no [b, K] basis, no
[b, F] hidden layer and no first GEMM. The backward takes ``h' = w1 b'(r)`` from the same band,
and force training's second backward ``h''`` too, with every elementwise term in the same pass;
what stays a GEMM is the F x F part. w1 is read as a padded transpose (zero rows around w1^T),
so the band never leaves it. Each pair is computed alone, in a fixed order: deterministic.
Float64, bessel bases and operands that require grad take dense's basis + GEMM path
(``FusedFilter`` falls back). The maths: README.md beside this file, "Gaussian band".
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

import fastff.kernels.cpu_threads  # noqa: F401  (numba's OpenMP layer first)
from fastff.kernels.cpu_math import exp_neg
from fastff.kernels.message.cpu_numba_activation import (
    KINDS,
    FusedActivation,
    _value_and_slope,
    _value_slope_curvature,
)
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
def _band(r, inv_delta, num_basis, inv_delta32, order, vals):
    """First padded row of the band of distance r, with the band's basis functions and their
    r-derivatives up to ``order`` <= 2 in ``vals[n, m]`` (b' = z b, b'' = (z^2 - 1/Δ^2) b with
    z = (k - x) / Δ). A band that misses every function (x <= -8, x >= K + 7, or NaN) gets zero
    values at the all-zero rows 0..BAND-1."""
    x = r * inv_delta
    if not (x > -8.0 and x < num_basis + 7.0):
        for n in range(order + 1):
            for m in range(BAND):
                vals[n, m] = F32(0.0)
        return 0
    whole = math.floor(x)
    frac = F32(x - whole)
    for m in range(BAND):
        t = _OFFSETS[m] - frac  # k - x
        vals[0, m] = exp_neg(F32(0.5) * t * t)
    if order >= 1:
        for m in range(BAND):
            vals[1, m] = (_OFFSETS[m] - frac) * inv_delta32 * vals[0, m]
    if order >= 2:
        curv = inv_delta32 * inv_delta32
        for m in range(BAND):
            z = (_OFFSETS[m] - frac) * inv_delta32
            vals[2, m] = (z * z - curv) * vals[0, m]
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
    loads each of the 16 rows once and stores once (faster than four passes of four rows:
    README.md, Tuning)."""
    return ((((c[0] * r[0][f] + c[1] * r[1][f]) + (c[2] * r[2][f] + c[3] * r[3][f]))
             + ((c[4] * r[4][f] + c[5] * r[5][f]) + (c[6] * r[6][f] + c[7] * r[7][f])))
            + (((c[8] * r[8][f] + c[9] * r[9][f]) + (c[10] * r[10][f] + c[11] * r[11][f]))
               + ((c[12] * r[12][f] + c[13] * r[13][f]) + (c[14] * r[14][f] + c[15] * r[15][f]))))


@njit(cache=True, inline="always", fastmath={"contract"})
def _band_sum(rows, vals, n, bias, nf, out):
    """out[:nf] = bias + sum_m vals[n, m] rows[m]: the first layer (n = 0, bias b1) or its
    n-th r-derivative (bias zero). One loop per order: two sums in one loop spilled their 32
    broadcast coefficients."""
    c = _band_of(vals[n], 0)
    for f in range(nf):
        out[f] = bias[f] + _band_dot(c, rows, f)


@njit(cache=True, inline="always")
def _put_basis(row, start, vals, bias):
    """row [K + 1] = the basis as the band holds it (zero outside: < 1.3e-14 of the largest),
    then ``bias``: a GEMM with rows of these gives a layer's weight and bias gradients at once."""
    num_basis = row.shape[0] - 1
    for k in range(num_basis):
        row[k] = F32(0.0)
    for m in range(BAND):
        k = start - PAD + m
        if 0 <= k < num_basis:
            row[k] = vals[m]
    row[num_basis] = bias


@njit(cache=True, inline="always", fastmath={"contract"})
def _hidden_orders(r, w, b1, inv_delta, num_basis, inv_delta32, order, vals, zero, h):
    """h[n] = d^n/dr^n (w1 b(r) + b1) for n <= order (h [order + 1, F], vals [order + 1,
    BAND] scratch); returns the band's first padded row."""
    start = _band(r, inv_delta, num_basis, inv_delta32, order, vals)
    rows = _band_of(w, start)
    _band_sum(rows, vals, 0, b1, h.shape[1], h[0])
    for n in range(1, order + 1):
        _band_sum(rows, vals, n, zero, h.shape[1], h[n])
    return start


@njit(cache=True, inline="always")
def _chunk_with_envelope(d, c, cutoff, env, order, env_out):
    """(lo, hi): the pairs of prange task c, with their envelope up to ``order`` in env_out."""
    lo, hi = c * _CHUNK, min((c + 1) * _CHUNK, d.shape[0])
    envelope_run_f32(d, lo, hi, cutoff, env, order, env_out)
    return lo, hi


@njit(cache=True, parallel=True, fastmath={"contract"})
def _hidden_values(d, w, b1, inv_delta, cutoff, env, kind, env_out, aug):
    """aug[p] = [u act(h) | u] for the distances d [b] (float32): the left factor of W's GEMM,
    as cpu_numba_activation._scaled_values writes it from a GEMM's h."""
    num_basis, nf = w.shape[0] - 2 * PAD, aug.shape[1] - 1
    inv_delta32 = F32(inv_delta)
    for c in prange((d.shape[0] + _CHUNK - 1) // _CHUNK):
        lo, hi = _chunk_with_envelope(d, c, cutoff, env, 0, env_out)
        vals = np.empty((1, BAND), F32)
        for p in range(lo, hi):
            row = aug[p]
            start = _band(np.float64(d[p]), inv_delta, num_basis, inv_delta32, 0, vals)
            _band_sum(_band_of(w, start), vals, 0, b1, nf, row)
            u = env_out[0, p]
            for f in range(nf):
                row[f] = u * _value_and_slope(row[f], kind)[0]
            row[nf] = u


def _make_hidden_vjp(want_values, want_params, want_d):
    """_hidden_vjp for one set of outputs: the flags are constants of the closure, so numba
    compiles only their branch (a third of the code; the energy + forces variant compiles in
    ~4 s where all branches took ~12 s of a cold start)."""

    @njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
    def _hidden_vjp(d, w, b1, inv_delta, cutoff, env, kind, t, u, b2, env_out, grad_d, aug,
                    g_out, basis_out):
        """grad_d[p] = u' (<t, act(h)> + <u_p, b2>) + u <t, act'(h) h'> for the distances d [b]
        and t = u w2 [b, F] (float32), if want_d; aug as ``_hidden_values`` writes it if want_values
        or want_params, and if want_params g_out = u t act'(h) (dL/dh) and basis_out [b, K + 1]
        (the basis, then 1). Without want_d (parameter gradients only: the second backward of
        force training) neither h' nor grad_d is computed."""
        num_basis, nf = w.shape[0] - 2 * PAD, t.shape[1]
        inv_delta32 = F32(inv_delta)
        order = 1 if want_d else 0
        for c in prange((d.shape[0] + _CHUNK - 1) // _CHUNK):
            lo, hi = _chunk_with_envelope(d, c, cutoff, env, order, env_out)
            vals, hidden, zero = np.empty((2, BAND), F32), np.empty((2, nf), F32), np.zeros(nf, F32)
            h, hs = hidden[0], hidden[1]
            for p in range(lo, hi):
                start = _hidden_orders(np.float64(d[p]), w, b1, inv_delta, num_basis, inv_delta32,
                                       order, vals, zero, hidden)
                u0 = env_out[0, p]
                tp, up = t[p], u[p]
                if not want_d:  # want_params (FusedFilter asks for the d-gradient otherwise)
                    row, gp = aug[p], g_out[p]
                    for f in range(nf):
                        a, slope = _value_and_slope(h[f], kind)
                        row[f] = u0 * a
                        gp[f] = u0 * tp[f] * slope
                    row[nf] = u0
                    _put_basis(basis_out[p], start, vals[0], F32(1.0))
                    continue
                u1 = env_out[1, p]
                ta = ths = ub = F32(0.0)
                # one loop per set of outputs: a branch inside the feature loop kept it scalar
                if want_params:
                    row, gp = aug[p], g_out[p]
                    for f in range(nf):
                        a, slope = _value_and_slope(h[f], kind)
                        ta += tp[f] * a
                        ths += tp[f] * slope * hs[f]
                        ub += up[f] * b2[f]
                        row[f] = u0 * a
                        gp[f] = u0 * tp[f] * slope
                    row[nf] = u0
                    _put_basis(basis_out[p], start, vals[0], F32(1.0))
                elif want_values:
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

    return _hidden_vjp


_HIDDEN_VJP: dict = {}


def _hidden_vjp_kernel(want_values: bool, want_params: bool, want_d: bool):
    """The _hidden_vjp variant for these outputs, made on first use."""
    key = (bool(want_values), bool(want_params), bool(want_d))
    kernel = _HIDDEN_VJP.get(key)
    if kernel is None:
        kernel = _HIDDEN_VJP[key] = _make_hidden_vjp(*key)
    return kernel


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _hidden_vjp_vjp(d, w, b1, inv_delta, cutoff, env, kind, t, u, b2, weight, env_out, slope_out,
                    wq, dh, dh1, basis_out, want_params, want_d):
    """Force training's second backward through the filter (dense.filter_vjp_vjp) for the
    distances d [b], t = u w2 and the pair weights [b] (float32): slope_out = ds/dr,
    wq [b, F + 1] = [weight (u' a + u act'(h) h') | weight u'], and if want_params
    dh = weight t (u' act'(h) + u act''(h) h'), dh1 = weight u t act'(h) and basis_out
    [2, b, K + 1] ([b | 1] and [b' | 0]). slope_out only if want_d: without it (force
    training's parameter gradients) neither h'' nor ds/dr is computed."""
    num_basis, nf = w.shape[0] - 2 * PAD, t.shape[1]
    inv_delta32 = F32(inv_delta)
    order = 2 if want_d else 1
    for c in prange((d.shape[0] + _CHUNK - 1) // _CHUNK):
        lo, hi = _chunk_with_envelope(d, c, cutoff, env, order, env_out)
        vals, hidden, zero = np.empty((3, BAND), F32), np.empty((3, nf), F32), np.zeros(nf, F32)
        h0, h1, h2 = hidden[0], hidden[1], hidden[2]
        for p in range(lo, hi):
            start = _hidden_orders(np.float64(d[p]), w, b1, inv_delta, num_basis, inv_delta32,
                                   order, vals, zero, hidden)
            u0, u1, wk = env_out[0, p], env_out[1, p], weight[p]
            tp, up, wqp = t[p], u[p], wq[p]
            s0 = s1 = s2 = ub = F32(0.0)
            if want_d:
                for f in range(nf):
                    a0, a1, a2 = _value_slope_curvature(h0[f], kind)
                    q = a1 * h1[f]
                    s0 += tp[f] * a0
                    s1 += tp[f] * q
                    s2 += tp[f] * (a2 * h1[f] * h1[f] + a1 * h2[f])
                    ub += up[f] * b2[f]
                    wqp[f] = wk * (u1 * a0 + u0 * q)
                slope_out[p] = env_out[2, p] * (s0 + ub) + 2 * u1 * s1 + u0 * s2
            else:
                for f in range(nf):
                    a0, a1 = _value_and_slope(h0[f], kind)
                    wqp[f] = wk * (u1 * a0 + u0 * a1 * h1[f])
            wqp[nf] = wk * u1
            if want_params:
                dhp, dh1p = dh[p], dh1[p]
                for f in range(nf):
                    a0, a1, a2 = _value_slope_curvature(h0[f], kind)
                    wt = wk * tp[f]
                    dhp[f] = wt * (u1 * a1 + u0 * a2 * h1[f])
                    dh1p[f] = wt * u0 * a1
                _put_basis(basis_out[0, p], start, vals[0], F32(1.0))
                _put_basis(basis_out[1, p], start, vals[1], F32(0.0))


class FusedFilter(FusedActivation):
    """FusedActivation with the filter network evaluated from the distances by the kernels
    above, for a gaussian basis and float32 CPU operands that require no grad; anything else
    takes dense's basis + GEMM path."""

    def _fusable(self, kind: str, d: torch.Tensor, params, *others: torch.Tensor) -> bool:
        return (kind == "gaussian" and self._fused_with(d, *params, *others)
                and all(x.is_contiguous() for x in others))

    def _padded_first_layer(self, w1: torch.Tensor) -> torch.Tensor:
        return self._cached("_w1_padded", lambda: padded_first_layer(w1), w1)

    def _launch_args(self, d, params, settings):
        w1, b1 = params[0], params[1]
        delta, _ = gaussian_grid(w1.shape[1], settings.cutoff)
        return (d.numpy(), self._padded_first_layer(w1).numpy(), b1.contiguous().numpy(),
                1.0 / delta, float(settings.cutoff), ENVELOPES[settings.envelope],
                KINDS[self.kind])

    def filter_from_distances(self, d, params, settings, radial_fn, out=None):
        if not self._fusable(settings.kind, d, params):
            return super().filter_from_distances(d, params, settings, radial_fn, out)
        nf = params[0].shape[0]
        aug, env = d.new_empty(d.shape[0], nf + 1), d.new_empty(1, d.shape[0])
        if d.shape[0]:
            _hidden_values(*self._launch_args(d, params, settings), env.numpy(), aug.numpy())
        return torch.mm(aug, self._second_layer(params[2], params[3]), out=out)

    def filter_vjp_from_distances(self, u, d, params, settings, need_params, need_values,
                                  radial_fn, t=None, need_d=True):
        t = u @ params[2] if t is None else t  # d<u, a w2^T>/da
        if not self._fusable(settings.kind, d, params, u, t):
            return super().filter_vjp_from_distances(u, d, params, settings, need_params,
                                                     need_values, radial_fn, t)
        need_d = need_d or not need_params  # the kernel's only variant without grad_d
        (nf, num_basis), w2, b2 = params[0].shape, params[2], params[3]
        b = d.shape[0]
        grad_d, env = d.new_empty(b), d.new_empty(2, b)
        aug = d.new_empty(b if (need_values or need_params) else 0, nf + 1)
        g_out = d.new_empty(b if need_params else 0, nf)
        basis = d.new_empty(b if need_params else 0, num_basis + 1)
        if b:
            kernel = _hidden_vjp_kernel(need_values, need_params, need_d)
            kernel(*self._launch_args(d, params, settings), t.numpy(), u.numpy(),
                   b2.contiguous().numpy(), env.numpy(), grad_d.numpy(), aug.numpy(),
                   g_out.numpy(), basis.numpy())
        grad_d = grad_d if need_d else None
        values = aug @ self._second_layer(w2, b2) if need_values else None
        if not need_params:
            return grad_d, None, None, None, None, values
        # each layer's weight and bias gradients in one GEMM, from [rows | 1]: [b | 1]^T G and
        # [u a | u]^T u (in the orientation BLAS runs fastest: README.md, Tuning)
        first, second = basis.t() @ g_out, aug.t() @ u
        return (grad_d, first[:num_basis].t(), first[num_basis], second[:nf].t(), second[nf],
                values)

    def filter_vjp_vjp_from_distances(self, u, weight, d, params, settings, need_params,
                                      radial_fn, t=None, need_d=True):
        t = u @ params[2] if t is None else t
        if not self._fusable(settings.kind, d, params, u, weight, t):
            return super().filter_vjp_vjp_from_distances(u, weight, d, params, settings,
                                                         need_params, radial_fn, t)
        (nf, num_basis), w2, b2 = params[0].shape, params[2], params[3]
        b = d.shape[0]
        slope, env, wq = d.new_empty(b), d.new_empty(3, b), d.new_empty(b, nf + 1)
        rows = b if need_params else 0
        # [dh, dh1] and [[b | 1], [b' | 0]]
        dh, basis = d.new_empty(2, rows, nf), d.new_empty(2, rows, num_basis + 1)
        if b:
            _hidden_vjp_vjp(*self._launch_args(d, params, settings), t.numpy(),
                            u.numpy(), b2.contiguous().numpy(), weight.numpy(), env.numpy(),
                            slope.numpy(), wq.numpy(), dh[0].numpy(), dh[1].numpy(),
                            basis.numpy(), bool(need_params), bool(need_d))
        slope = slope if need_d else None
        # weight dW/dd = weight (q w2^T + u' b2) = [weight q | weight u'] [w2^T; b2]
        w_slope = wq @ self._second_layer(w2, b2)
        if not need_params:
            return slope, w_slope, None, None, None, None
        # sum_p dh_p [b_p | 1]^T + dh1_p [b'_p | 0]^T as one GEMM over both stacks, transposed
        # as above; u^T [weight q | weight u'] holds grad_w2 and grad_b2
        first = basis.view(2 * rows, num_basis + 1).t() @ dh.view(2 * rows, nf)
        second = u.t() @ wq
        return slope, w_slope, first[:num_basis].t(), first[num_basis], second[:, :nf], \
            second[:, nf]
