"""The filter networks' activation and the elementwise terms around it, one float32 pass each
on CPU (numba).

torch evaluates softplus as exp then log1p, and its slope (a sigmoid) in another pass: together
a fifth of exact SchNet's energy + forces. Here value and slope share one e = exp(-|h|) per
element, with exp and log1p as polynomials that LLVM vectorizes (kernels/cpu_math.py), within a
few float32 ulp. Around the activation, one-pass kernels write what the blocked filter networks
need without extra [b, F] passes: ``[env act(h) | env]`` (one GEMM against [w2^T; b2] then
gives W with the envelope and bias folded in), energy + forces' backward terms, both at once,
and force training's ~20 second-order terms (``second_order_terms``, any float dtype). Each
reads the first layer's bias apart and adds it to h as it loads it. float64 and non-CPU tensors
keep torch's functions. Measurements: README.md beside this file, Tuning.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from numba import njit, prange

import fastff.kernels.cpu_threads  # noqa: F401  (numba's OpenMP layer first)
from fastff.kernels.cpu_math import exp_neg, log1p_unit
from fastff.kernels.message import dense

F32 = np.float32
KINDS = {"shifted_softplus": 0, "silu": 1}
_LN2 = F32(math.log(2.0))
# Elements per prange task: a few KB per array, so each task's loop runs vectorized in L1.
_CHUNK = 2048


@njit(cache=True, inline="always", fastmath={"contract"})
def _sigmoid(x, e):
    """sigmoid(x) from e = exp(-|x|)."""
    inv = F32(1.0) / (F32(1.0) + e)
    return inv if x >= F32(0.0) else e * inv


@njit(cache=True, inline="always", fastmath={"contract"})
def _value_and_slope(x, kind):
    """(act(x), act'(x)) from one exp: shifted softplus (kind 0) or silu (kind 1)."""
    e = exp_neg(abs(x))
    s = _sigmoid(x, e)
    if kind == 0:
        return max(x, F32(0.0)) + log1p_unit(e) - _LN2, s
    return x * s, s * (F32(1.0) + x * (F32(1.0) - s))


@njit(cache=True, inline="always", fastmath={"contract"})
def _value_slope_curvature(x, kind):
    """(act(x), act'(x), act''(x)) from one exp, with s (1 - s) = e / (1 + e)^2 (no
    cancellation in 1 - s for large |x|)."""
    e = exp_neg(abs(x))
    inv = F32(1.0) / (F32(1.0) + e)
    s, sm = (inv, e * inv) if x >= F32(0.0) else (e * inv, inv)  # sigmoid(x), 1 - sigmoid(x)
    ss = e * inv * inv
    if kind == 0:
        return max(x, F32(0.0)) + log1p_unit(e) - _LN2, s, ss
    return x * s, s * (F32(1.0) + x * sm), ss * (F32(2.0) + x * (sm - s))


@njit(cache=True, parallel=True, fastmath={"contract"})
def _activation(h, kind, values, slopes, want_slopes):
    """values = act(h) and, if want_slopes, slopes = act'(h), over flat float32 arrays; the
    two share each element's exp."""
    n = h.shape[0]
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo = c * _CHUNK
        hi = min(lo + _CHUNK, n)
        hc, vc = h[lo:hi], values[lo:hi]
        if want_slopes:
            sc = slopes[lo:hi]
            for f in range(hc.shape[0]):
                vc[f], sc[f] = _value_and_slope(hc[f], kind)
        else:
            for f in range(hc.shape[0]):
                vc[f] = _value_and_slope(hc[f], kind)[0]


@njit(cache=True, parallel=True, fastmath={"contract"})
def _scaled_values(h, b1, env, kind, aug):
    """aug[r] = [env_r act(h[r] + b1) | env_r] for float32 h [b, F]: the left factor of the
    filter's second GEMM with the bias as one more inner column, so W needs no pass of its own
    for the envelope."""
    nf = h.shape[1]
    for r in prange(h.shape[0]):
        hr, ar, u = h[r], aug[r], env[r]
        for f in range(nf):
            ar[f] = u * _value_and_slope(hr[f] + b1[f], kind)[0]
        ar[nf] = u


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _vjp_terms(h, b1, t, env, kind, g, ta):
    """g = env t act'(h + b1) and ta = <t, act(h + b1)> per row, for float32 [b, F] h and t."""
    nf = h.shape[1]
    for r in prange(h.shape[0]):
        hr, tr, gr, u = h[r], t[r], g[r], env[r]
        acc = F32(0.0)
        for f in range(nf):
            a, s = _value_and_slope(hr[f] + b1[f], kind)
            acc += tr[f] * a
            gr[f] = u * tr[f] * s
        ta[r] = acc


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _vjp_terms_and_scaled_values(h, b1, t, env, kind, g, ta, aug):
    """_vjp_terms and _scaled_values of the same rows in one pass (one exp per element)."""
    nf = h.shape[1]
    for r in prange(h.shape[0]):
        hr, tr, gr, ar, u = h[r], t[r], g[r], aug[r], env[r]
        ar[nf] = u
        acc = F32(0.0)
        for f in range(nf):
            v, s = _value_and_slope(hr[f] + b1[f], kind)
            acc += tr[f] * v
            gr[f] = u * tr[f] * s
            ar[f] = u * v
        ta[r] = acc


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _second_order_terms(t, a0, a1, a2, h1, h2, e0, e1, wk, need_params, sums, wq, dh, dh1):
    """dense.Activation.second_order_terms in one pass over the rows (any float dtype)."""
    nf = t.shape[1]
    for r in prange(t.shape[0]):
        tr, a0r, a1r, a2r, h1r, h2r = t[r], a0[r], a1[r], a2[r], h1[r], h2[r]
        u0, u1, w = e0[r], e1[r], wk[r]
        s0 = s1 = s2 = tr[0] - tr[0]
        wqr = wq[r]
        for f in range(nf):
            p = a1r[f] * h1r[f]
            s0 += tr[f] * a0r[f]
            s1 += tr[f] * p
            s2 += tr[f] * (a2r[f] * h1r[f] * h1r[f] + a1r[f] * h2r[f])
            wqr[f] = w * (u1 * a0r[f] + u0 * p)
        sums[r, 0], sums[r, 1], sums[r, 2] = s0, s1, s2
        if need_params:
            dhr, dh1r = dh[r], dh1[r]
            for f in range(nf):
                wt = w * tr[f]
                dhr[f] = wt * (u1 * a1r[f] + u0 * a2r[f] * h1r[f])
                dh1r[f] = wt * u0 * a1r[f]


def _np(t: torch.Tensor):
    return t.contiguous().numpy()


def _same_tensors(marks: tuple, tensors: tuple) -> bool:
    """Whether ``tensors`` are the very tensors ``marks`` (weak reference, version) were taken
    of, unchanged in place since."""
    return len(marks) == len(tensors) and all(
        ref() is t and version == t._version
        for (ref, version), t in zip(marks, tensors, strict=True))


class FusedActivation(dense.Activation):
    """dense.Activation with the one-pass kernels above for contiguous CPU tensors (the
    activation in float32; the second-order terms in any float dtype)."""

    def _fused(self, h: torch.Tensor) -> bool:
        return (h.dtype == torch.float32 and h.device.type == "cpu" and h.is_contiguous()
                and not h.requires_grad)

    def values(self, h: torch.Tensor) -> torch.Tensor:
        if not self._fused(h):
            return super().values(h)
        out = torch.empty_like(h)
        _activation(h.view(-1).numpy(), KINDS[self.kind], out.view(-1).numpy(),
                    out.view(-1).numpy(), False)
        return out

    def values_and_slope(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._fused(h):
            return super().values_and_slope(h)
        out, slope = torch.empty_like(h), torch.empty_like(h)
        _activation(h.view(-1).numpy(), KINDS[self.kind], out.view(-1).numpy(),
                    slope.view(-1).numpy(), True)
        return out, slope

    def _fused_with(self, h: torch.Tensor, *others: torch.Tensor) -> bool:
        """h fused, and the other operands plain CPU tensors of its dtype without grad."""
        return self._fused(h) and all(x.dtype == h.dtype and x.device.type == "cpu"
                                      and not x.requires_grad for x in others)

    def _cached(self, name: str, build, *weights: torch.Tensor) -> torch.Tensor:
        """``build()``, a layout of ``weights`` made once per instance (an instance serves one
        op's pass over its blocks) and rebuilt if a weight is another tensor (recognized by weak
        reference: a new tensor at a freed one's address never matches) or changed in place
        (``_version``; no ``.data`` edit can happen within one pass)."""
        cached = self.__dict__.get(name)
        if cached is None or not _same_tensors(cached[0], weights):
            cached = (tuple((weakref.ref(w), w._version) for w in weights), build())
            self.__dict__[name] = cached
        return cached[1]

    def _second_layer(self, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        """[w2^T; b2], the right factor of W's GEMM (the cat of a transposed weight, made
        once per op instead of once per block)."""
        return self._cached("_w2_aug", lambda: torch.cat([w2.t(), b2.unsqueeze(0)]), w2, b2)

    def filter_values(self, h, b1, env, w2, b2, out=None):
        if not self._fused_with(h, b1, env, w2, b2):
            return super().filter_values(h, b1, env, w2, b2, out)
        b, nf = h.shape
        aug = h.new_empty(b, nf + 1)
        _scaled_values(h.numpy(), _np(b1), _np(env), KINDS[self.kind], aug.numpy())
        return torch.mm(aug, self._second_layer(w2, b2), out=out)

    def vjp_terms_and_values(self, h, b1, t, env, w2, b2):
        if not (self._fused_with(h, b1, env, w2, b2) and self._fused(t)):
            return super().vjp_terms_and_values(h, b1, t, env, w2, b2)
        b, nf = h.shape
        g, ta, aug = torch.empty_like(h), h.new_empty(b), h.new_empty(b, nf + 1)
        _vjp_terms_and_scaled_values(h.numpy(), _np(b1), t.numpy(), _np(env), KINDS[self.kind],
                                     g.numpy(), ta.numpy(), aug.numpy())
        return g, ta, aug @ self._second_layer(w2, b2)

    def vjp_terms(self, h, b1, t, env):
        if not (self._fused_with(h, b1, env) and self._fused(t)):
            return super().vjp_terms(h, b1, t, env)
        g, ta = torch.empty_like(h), h.new_empty(h.shape[0])
        _vjp_terms(h.numpy(), _np(b1), t.numpy(), _np(env), KINDS[self.kind], g.numpy(),
                   ta.numpy())
        return g, ta

    def second_order_terms(self, t, a0, a1, a2, h1, h2, e0, e1, wk, need_params):
        arrays = (t, a0, a1, a2, h1, h2, e0, e1, wk)
        if not all(x.device.type == "cpu" and x.dtype == t.dtype and not x.requires_grad
                   and x.dtype in (torch.float32, torch.float64) for x in arrays):
            return super().second_order_terms(t, a0, a1, a2, h1, h2, e0, e1, wk, need_params)
        b, nf = t.shape
        sums, wq = t.new_empty(b, 3), torch.empty_like(t)
        dh, dh1 = (torch.empty_like(t), torch.empty_like(t)) if need_params else (None, None)
        spare = t.new_empty(0, nf)
        _second_order_terms(*(x.contiguous().numpy() for x in arrays), bool(need_params),
                            sums.numpy(), wq.numpy(), (dh if need_params else spare).numpy(),
                            (dh1 if need_params else spare).numpy())
        return sums, wq, dh, dh1
