"""The dense part of the message-passing filters, in pure torch, shared by every backend.

SchNet's filter network ``W(r) = u(r) (act(b(r) W1^T + b1) W2^T + b2)`` is GEMM work, so every
backend runs it as small GEMMs (BLAS on CPU, cuBLAS on CUDA) over blocks of pairs that stay in
cache, and fuses the gathers and sums into its own kernels. The filter depends on the distance
alone, so ``blocked_forward`` and ``blocked_vjp`` evaluate it once per unordered pair of the full
list (``MirrorPairs``) for both of its edges. A forward may return its pair filters W, and a
first backward its products ``t = u w2``, as one [P, F] tensor each, which the op's autograd
hands to the next pass (README.md: "Kept filters").

The formulas (README.md beside this file) are plain torch ops, so ``filter_vjp`` on tensors that
require grad is itself differentiable to any order: the custom ops use it that way when a
backward must build a graph (force training).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as tf
from torch import Tensor

from fastff.kernels.radial.reference import envelope_derivatives


class RadialSettings(NamedTuple):
    """A radial filter's settings besides its weights: the cutoff (length unit of the
    distances), the basis kind ("gaussian", "bessel") and the envelope ("cosine",
    "polynomial", "none"); kernels/radial/README.md."""

    cutoff: float
    kind: str
    envelope: str


class FilterSettings(NamedTuple):
    """SchNet's filter network's settings besides its weights: ``RadialSettings`` and the
    activation of its hidden layer (``ACTIVATIONS``)."""

    cutoff: float
    kind: str
    envelope: str
    activation: str


ACTIVATIONS = ("shifted_softplus", "silu")
LOG2 = math.log(2.0)


def activation(h: Tensor, kind: str) -> Tensor:
    if kind == "shifted_softplus":
        # in place on softplus' fresh output (its backward reads only h): one [N, F] tensor less
        return tf.softplus(h).sub_(LOG2)
    if kind == "silu":
        return tf.silu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


def activation_slope(h: Tensor, kind: str) -> Tensor:
    s = torch.sigmoid(h)
    if kind == "shifted_softplus":
        return s
    return s * (1 + h * (1 - s))


def activation_curvature(h: Tensor, kind: str) -> Tensor:
    """The activation's second derivative at h."""
    s = torch.sigmoid(h)
    if kind == "shifted_softplus":
        return s * (1 - s)
    return s * (1 - s) * (2 + h * (1 - 2 * s))


def each_order(radial_basis):
    """The ``radial_fn`` of the blocked functions, (d, K, cutoff, kind, env_kind, order) ->
    ([b, b', ...], [u, u', ...]): the bare basis and the envelope up to ``order``, from a
    backend's single-order ``radial_basis`` launcher (one call per order) and ``envelope``
    (numba has a one-pass version of both)."""

    def radial_fn(d: Tensor, num_basis: int, cutoff: float, kind: str, env_kind: str,
                  order: int) -> tuple[list, list]:
        return ([radial_basis(d, num_basis, cutoff, kind, "none", n) for n in range(order + 1)],
                envelope(d, cutoff, env_kind, order))

    return radial_fn


class Activation:
    """The filter network's activation by name (``ACTIVATIONS``) and the elementwise terms
    around it that the blocked functions need (values, slopes, W from the hidden layer, the
    backward's terms), in torch. A backend may pass a subclass with fused kernels
    (cpu_numba_activation.FusedActivation); every function here also accepts the name."""

    def __init__(self, kind: str):
        if kind not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")
        self.kind = kind

    def values(self, h: Tensor) -> Tensor:
        return activation(h, self.kind)

    def values_and_slope(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return activation(h, self.kind), activation_slope(h, self.kind)

    # The three functions below take the hidden layer without its bias, h = basis w1^T [b, F],
    # and the bias b1 [F] apart: the pre-activation is h + b1. torch.addmm would first copy the
    # bias into every row of its output; the fused kernels add it as they read h.
    def filter_values(self, h: Tensor, b1: Tensor, env: Tensor, w2: Tensor, b2: Tensor,
                      out: Tensor | None = None) -> Tensor:
        """W = env (act(h + b1) w2^T + b2) [b, F] from the hidden layer and env [b] (written
        into ``out`` if given: a slice of the pair filters a forward keeps)."""
        return torch.mul(torch.addmm(b2, self.values(h + b1), w2.t()), env.unsqueeze(1),
                         out=out)

    def vjp_terms(self, h: Tensor, b1: Tensor, t: Tensor, env: Tensor) -> tuple[Tensor, Tensor]:
        """(g = env t act'(h + b1) [b, F], <t, act(h + b1)> [b]): what ``filter_vjp`` reads of
        the activation when it needs neither W nor parameter gradients (energy and forces)."""
        a, slope = self.values_and_slope(h + b1)
        return t * slope * env.unsqueeze(1), (t * a).sum(1)

    def vjp_terms_and_values(self, h: Tensor, b1: Tensor, t: Tensor, env: Tensor, w2: Tensor,
                             b2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``vjp_terms`` and ``filter_values`` of the same h in one go: what ``filter_vjp``
        reads when the backward also scatters W (the x-gradient) but needs no parameter
        gradients."""
        a, slope = self.values_and_slope(h + b1)
        e = env.unsqueeze(1)
        return t * slope * e, (t * a).sum(1), torch.addmm(b2, a, w2.t()) * e

    # The two functions below are the filter network of a block of distances d [b] as the
    # blocked functions call it: the backend's radial basis (``radial_fn``), then the GEMMs and
    # the terms above. A backend may fuse the basis and the first layer
    # (cpu_numba_filter.FusedFilter).
    def filter_from_distances(self, d: Tensor, params, settings: FilterSettings, radial_fn,
                              out: Tensor | None = None) -> Tensor:
        """W(d) [b, F] (``filter_values``, into ``out`` if given)."""
        w1, b1, w2, b2 = params
        (basis,), (env,) = radial_fn(d, w1.shape[1], settings.cutoff, settings.kind,
                                       settings.envelope, 0)
        return self.filter_values(basis @ w1.t(), b1, env, w2, b2, out)

    def filter_vjp_from_distances(self, u: Tensor, d: Tensor, params, settings: FilterSettings,
                                  need_params: bool, need_values: bool, radial_fn,
                                  t: Tensor | None = None, need_d: bool = True):
        """``filter_vjp`` of sum_p <u_p, W(d_p)>: (grad_d [b], grad_w1, grad_b1, grad_w2,
        grad_b2, W); ``t = u w2`` if the caller has it. ``need_d=False`` allows grad_d to be
        None (a backend may then skip its terms)."""
        w1, b1, w2, b2 = params
        (basis, slope), (env, env_slope) = radial_fn(d, w1.shape[1], settings.cutoff,
                                                           settings.kind, settings.envelope, 1)
        return filter_vjp(u, basis, slope, env, env_slope, w1, b1, w2, b2, self, need_params,
                          need_values, t)

    def filter_vjp_vjp_from_distances(self, u: Tensor, weight: Tensor, d: Tensor, params,
                                      settings: FilterSettings, need_params: bool, radial_fn,
                                      t: Tensor | None = None, need_d: bool = True):
        """``filter_vjp_vjp``: (s' [b], weight dW/dd [b, F], grad_w1, grad_b1, grad_w2,
        grad_b2); ``t = u w2`` if the caller has it. ``need_d=False`` allows s' to be None."""
        return filter_vjp_vjp(u, weight, d, params, settings, self, need_params, radial_fn, t)

    def second_order_terms(self, t: Tensor, a0: Tensor, a1: Tensor, a2: Tensor, h1: Tensor,
                           h2: Tensor, e0: Tensor, e1: Tensor, wk: Tensor, need_params: bool):
        """The elementwise part of ``filter_vjp_vjp`` for [b, F] t, a, a', a'', h', h'' and
        [b] u, u', weight: (sums [b, 3] = (<t, a>, <t, a' h'>, <t, a'' h'^2 + a' h''>),
        wq = weight (u' a + u a' h'), and if need_params dh = weight t (u' a' + u a'' h'),
        dh1 = weight u t a' (else None)). ~20 [b, F] passes in torch; one in numba."""
        e0, e1, wk = e0.unsqueeze(1), e1.unsqueeze(1), wk.unsqueeze(1)
        p = a1 * h1
        sums = torch.stack([(t * a0).sum(1), (t * p).sum(1),
                            (t * (a2 * h1 * h1 + a1 * h2)).sum(1)], 1)
        wq = wk * (e1 * a0 + e0 * p)
        if not need_params:
            return sums, wq, None, None
        return sums, wq, wk * t * (e1 * a1 + e0 * a2 * h1), wk * e0 * t * a1


def as_activation(act: str | Activation) -> Activation:
    return act if isinstance(act, Activation) else Activation(act)


def envelope(d: Tensor, cutoff: float, kind: str, order: int) -> list[Tensor]:
    """u, u', ... up to ``order`` [b] each, evaluated in float64 (a vector: cheap): the
    polynomial envelope's expanded terms cancel near the cutoff and would keep only ~1e-5 of u'
    in float32."""
    if d.dtype == torch.float64:
        return envelope_derivatives(d, cutoff, kind, order)
    return [u.to(d.dtype) for u in envelope_derivatives(d.double(), cutoff, kind, order)]


def filter_values(basis: Tensor, env: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                  act: str | Activation) -> Tensor:
    """W [b, F] for basis [b, K], env [b]; w1 [F, K], w2 [F, F] (torch Linear layout)."""
    return as_activation(act).filter_values(basis @ w1.t(), b1, env, w2, b2)


def filter_vjp(u: Tensor, basis: Tensor, basis_slope: Tensor, env: Tensor, env_slope: Tensor,
               w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, act: str | Activation,
               need_params: bool, need_values: bool = False, t: Tensor | None = None):
    """Gradients of sum_e <u_e, W(d_e)> for u [b, F] (``t = u w2`` if the caller has it).

    Returns (grad_d [b], grad_w1 [F, K], grad_b1 [F], grad_w2 [F, F], grad_b2 [F], W [b, F]);
    the four parameter gradients are None unless ``need_params``, and W (from the same hidden
    layer, computed once for both) is None unless ``need_values``.
    """
    act = as_activation(act)
    h = basis @ w1.t()  # without b1: see Activation.filter_values
    t = u @ w2 if t is None else t  # d<u, a w2^T>/da
    values = None
    if need_params:
        a, slope = act.values_and_slope(h + b1)
        ta, g = (t * a).sum(1), t * slope * env.unsqueeze(1)  # g = dL/dh
        if need_values:
            values = torch.addmm(b2, a, w2.t()) * env.unsqueeze(1)
    elif need_values:  # forces and the x-gradient: g, <t, a> and W from one pass over h
        g, ta, values = act.vjp_terms_and_values(h, b1, t, env, w2, b2)
    else:  # energy and forces: one fused pass, a never stored
        g, ta = act.vjp_terms(h, b1, t, env)
    grad_d = env_slope * (ta + u @ b2) + ((g @ w1) * basis_slope).sum(1)
    if not need_params:
        return grad_d, None, None, None, None, values
    eu = u * env.unsqueeze(1)
    return grad_d, g.t() @ basis, g.sum(0), eu.t() @ a, eu.sum(0), values


def mirror_pairs(i: Tensor, j: Tensor, rev: Tensor) -> Tensor:
    """The unordered pairs of a full list, int64 [4, P]: rows (c, m, a, b) hold each pair's
    canonical edge ``c`` (the one with ``c < rev[c]``), its mirror ``m = rev[c]`` and its ends
    ``a = i[c]``, ``b = j[c]`` (P = E / 2 for a list whose ``rev`` is its mirror index). Edges
    whose ``rev`` is themselves or negative (possible only with value checks disabled) belong
    to no pair. One ``nonzero`` (a host sync on CUDA): computed once per list
    (``NeighborList.mirror_pairs``)."""
    edges = torch.arange(rev.shape[0], device=rev.device)
    c = torch.nonzero(edges < rev).squeeze(1)
    return torch.stack([c, rev.index_select(0, c), i.index_select(0, c), j.index_select(0, c)])


class MirrorPairs:
    """The rows of a ``mirror_pairs`` tensor by name: ``c``, ``m``, ``a``, ``b`` (int64 [P]
    each, contiguous views). A ``c`` or ``m`` beyond the list raises IndexError in the gathers;
    out-of-range ends are skipped by the kernels: nothing is read out of bounds."""

    def __init__(self, pairs: Tensor):
        self.c, self.m, self.a, self.b = pairs.unbind(0)

    def __len__(self) -> int:
        return int(self.c.shape[0])


def keeps(num_pairs: int, num_features: int, like: Tensor, budget: int) -> bool:
    """Whether a [num_pairs, num_features] tensor of ``like``'s dtype may be kept within
    ``budget`` bytes (0: keep nothing). The op's fake impl decides the same way."""
    return budget > 0 and num_pairs * num_features * like.element_size() <= budget


def _mirrored_distances(d: Tensor, pairs: MirrorPairs) -> tuple[Tensor, Tensor, bool]:
    """(d[c], d[m], whether they are equal): one comparison per call. Mirrored pairs of a list
    have bitwise equal distances (``nl.distances``), so one filter per pair is the norm; where
    any differ, every pair takes the mean of its two filters (the same values where they are
    equal)."""
    dc, dm = d.index_select(0, pairs.c), d.index_select(0, pairs.m)
    return dc, dm, torch.equal(dc, dm)


def _pair_filter(dc: Tensor, dm: Tensor, mirrored: bool, params, settings: FilterSettings,
                 act: Activation, radial_fn, out: Tensor | None) -> Tensor:
    """(W(dc) + W(dm)) / 2 [b, F] (into ``out`` if given): one filter per pair when the
    mirrored distances are equal."""
    w = act.filter_from_distances(dc, params, settings, radial_fn, out)
    if mirrored:
        return w
    return w.add_(act.filter_from_distances(dm, params, settings, radial_fn)).mul_(0.5)


def blocked_forward(x: Tensor, d: Tensor, num_atoms: int, pairs: MirrorPairs, params,
                    settings: FilterSettings, act: str | Activation, radial_fn, scatter_fn,
                    block: int, keep: bool) -> tuple[Tensor, Tensor]:
    """out_a = sum_{e in row a} x[j_e] (W(d_e) + W(d_rev e)) / 2, a block of pairs at a time.

    Each pair's filter serves both of its edges: ``scatter_fn(out, x, w_block, p0)`` is the
    backend's ``out[a_p] += x[b_p] w_p; out[b_p] += x[a_p] w_p`` over the pairs p0..p0+len(w)
    (deterministic on CPU: see cpu_numba.py). ``radial_fn(d_block, K, cutoff, kind, envelope,
    order)`` is the backend's bare radial basis and envelope at orders 0..order (two lists; see
    ``each_order``).

    Returns (out [N, F], the pair filters [P, F] if ``keep`` else an empty [0, F]): kept, each
    block's filter is written straight into its rows (no copy).
    """
    act = as_activation(act)
    out = x.new_zeros(num_atoms, x.shape[1])
    kept = x.new_empty(len(pairs) if keep else 0, x.shape[1])
    dc, dm, mirrored = _mirrored_distances(d, pairs)
    for p0 in range(0, len(pairs), block):
        p1 = min(p0 + block, len(pairs))
        w = _pair_filter(dc[p0:p1], dm[p0:p1], mirrored, params, settings, act, radial_fn,
                         kept[p0:p1] if keep else None)
        scatter_fn(out, x, w, p0)
    return out, kept


def blocked_vjp(g: Tensor, x: Tensor, d: Tensor, pairs: MirrorPairs, params,
                settings: FilterSettings, act: str | Activation, need_params: bool,
                need_x: bool, need_d: bool, radial_fn, product_fn, scatter_fn, block: int,
                filters: Tensor | None, keep_products: bool):
    """Gradients of sum_a <g_a, out_a> (``blocked_forward``) in x, d and the filter parameters.

    With ``u_p = g[a] x[b] + g[b] x[a]`` (``product_fn(g, x, p0, p1)``) the pair's share of the
    loss is ``<u_p, (W(d_c) + W(d_m)) / 2>``: one backward through the filter network per pair,
    whose hidden layer also gives W for the x-gradient (``scatter_fn(grad_x, g, w, p0)``: the
    op is symmetric in its pair ends). ``filters``: the forward's pair filters [P, F], which the
    x-gradient then reads instead. Parameter gradients are summed over blocks in a fixed
    order: deterministic.

    Returns (grad_x [N, F] or None, grad_d [E] or None, grad_w1, grad_b1, grad_w2, grad_b2,
    products): grad_x unless ``need_x``, grad_d unless ``need_d``, the parameter gradients
    unless ``need_params`` are None; products are every pair's ``t = u w2`` [P, F] if
    ``keep_products`` (what ``blocked_vjp_vjp`` of the same g and x reads), else empty [0, F].
    """
    act = as_activation(act)
    nf = g.shape[1]
    grad_d = d.new_zeros(d.shape[0]) if need_d else None
    grad_x = torch.zeros_like(x) if need_x else None
    sums = [torch.zeros_like(p) for p in params] if need_params else None
    products = g.new_empty(len(pairs) if keep_products else 0, nf)
    need_values = need_x and filters is None
    args = (params, settings, need_params, need_values, radial_fn)
    dc_all, dm_all, mirrored = _mirrored_distances(d, pairs)
    for p0 in range(0, len(pairs), block):
        p1 = min(p0 + block, len(pairs))
        c, m = pairs.c[p0:p1], pairs.m[p0:p1]
        dc, dm = dc_all[p0:p1], dm_all[p0:p1]
        u = product_fn(g, x, p0, p1)
        # t = d<u, a w2^T>/da, into the kept products' rows
        t = torch.mm(u, params[2], out=products[p0:p1] if keep_products else None)
        if mirrored:  # the normal case: one filter, half the gradient to each edge
            gd, *gp, w = act.filter_vjp_from_distances(u, dc, *args, t, need_d)
            if grad_d is not None:
                gd = 0.5 * gd
                grad_d.index_copy_(0, c, gd)
                grad_d.index_copy_(0, m, gd)
        else:
            u, t = 0.5 * u, 0.5 * t
            gd, *gp, w = act.filter_vjp_from_distances(u, dc, *args, t, need_d)
            gd_m, *gp_m, w_m = act.filter_vjp_from_distances(u, dm, *args, t, need_d)
            if grad_d is not None:
                grad_d.index_copy_(0, c, gd)
                grad_d.index_copy_(0, m, gd_m)
            if need_params:
                gp = [s + t for s, t in zip(gp, gp_m, strict=True)]
            if need_values:
                w = 0.5 * (w + w_m)
        if need_x:
            scatter_fn(grad_x, g, w if filters is None else filters[p0:p1], p0)
        if sums is not None:
            for s, p in zip(sums, gp, strict=True):
                s += p
    grads = sums if sums is not None else [None, None, None, None]
    return (grad_x, grad_d, *grads, products)


def filter_vjp_vjp(u: Tensor, weight: Tensor, d: Tensor, params, settings: FilterSettings,
                   act: str | Activation, need_params: bool, radial_fn,
                   t: Tensor | None = None):
    """The derivatives of sum_p weight_p s_p, s_p = d<u_p, W(d_p)>/dd_p (the distance gradient
    of ``filter_vjp``), for u [b, F], weight [b], d [b] (README.md beside this file; ``t = u
    w2`` if the caller has it):
    (s' [b] = ds_p/dd_p unweighted, weight_p dW(d_p)/dd [b, F] (the derivative in u_p), grad_w1,
    grad_b1, grad_w2, grad_b2), the parameter gradients None unless ``need_params``."""
    w1, b1, w2, b2 = params
    num_basis = w1.shape[1]
    phi, (e0, e1, e2) = radial_fn(d, num_basis, settings.cutoff, settings.kind,
                                  settings.envelope, 2)
    h0, h1, h2 = (torch.cat(phi) @ w1.t()).split(d.shape[0])  # h and its two d-derivatives
    h0 = h0 + b1
    act = as_activation(act)
    (a0, a1), a2 = act.values_and_slope(h0), activation_curvature(h0, act.kind)
    t = u @ w2 if t is None else t  # d<u, a w2^T>/da
    # s = u'(<t, a> + <u, b2>) + u <t, a' h'>, so
    # s' = u''(<t, a> + <u, b2>) + 2 u' <t, a' h'> + u <t, a'' h'^2 + a' h''>
    sums, wq, dh, dh1 = act.second_order_terms(t, a0, a1, a2, h1, h2, e0, e1, weight,
                                               need_params)
    slope = e2 * (sums[:, 0] + u @ b2) + 2 * e1 * sums[:, 1] + e0 * sums[:, 2]
    # dW/dd = q w2^T + u' b2 with q = u' a + u a' h' (wq = weight q)
    we1 = weight * e1
    w_slope = (wq @ w2.t()).addr_(we1, b2)
    if not need_params:
        return slope, w_slope, None, None, None, None
    grad_w1 = dh.t() @ phi[0] + dh1.t() @ phi[1]  # dh = weight ds/dh, dh1 = weight ds/dh'
    return slope, w_slope, grad_w1, dh.sum(0), u.t() @ wq, we1 @ u


def blocked_vjp_vjp(v: Tensor, g: Tensor, x: Tensor, d: Tensor, pairs: MirrorPairs, params,
                    settings: FilterSettings, act: str | Activation, need_g: bool,
                    need_x: bool, need_params: bool, need_d: bool, radial_fn, product_fn,
                    scatter_fn, block: int, products: Tensor | None):
    """Gradients of sum_e v_e grad_d_e, grad_d the distance gradient of ``blocked_vjp``, in g, x,
    d and the filter parameters: the second backward of force training, a block of pairs at a
    time and never more than ``block`` pairs x F features. ``products``: the ``t = u w2`` [P, F]
    that ``blocked_vjp`` of the same g and x kept, or None to compute them.

    A pair p with ends (a, b), edges (c, m) and u_p = g[a] x[b] + g[b] x[a] has grad_d_c =
    s(u_p, d_c) / 2 and grad_d_m = s(u_p, d_m) / 2, s(u, r) = d<u, W(r)>/dr. So the loss is
    linear in u_p with the pair filter ``w_p = (v_c W'(d_c) + v_m W'(d_m)) / 2``: the g- and
    x-gradients are ``scatter_fn(grad_g, x, w, p0)`` and ``scatter_fn(grad_x, g, w, p0)``
    (cfconv's own pair scatter), and one pass through the filter network's second derivatives
    gives the rest.

    Returns (grad_g, grad_x, grad_d [E] (each None unless asked for), grad_w1, grad_b1, grad_w2,
    grad_b2), the parameter gradients None unless ``need_params``.
    """
    act = as_activation(act)
    grad_d = d.new_zeros(d.shape[0]) if need_d else None
    grad_g = torch.zeros_like(g) if need_g else None
    grad_x = torch.zeros_like(x) if need_x else None
    sums = [torch.zeros_like(p) for p in params] if need_params else None
    args = (params, settings, need_params, radial_fn)
    dc_all, dm_all, mirrored = _mirrored_distances(d, pairs)
    for p0 in range(0, len(pairs), block):
        p1 = min(p0 + block, len(pairs))
        c, m = pairs.c[p0:p1], pairs.m[p0:p1]
        dc, dm = dc_all[p0:p1], dm_all[p0:p1]
        vc, vm = 0.5 * v.index_select(0, c), 0.5 * v.index_select(0, m)
        u = product_fn(g, x, p0, p1)
        t = products[p0:p1] if products is not None else u @ params[2]
        if mirrored:  # the normal case: one pass through the filter per pair
            slope, w, *gp = act.filter_vjp_vjp_from_distances(u, vc + vm, dc, *args, t, need_d)
            slope_m = slope
        else:
            slope, w, *gp = act.filter_vjp_vjp_from_distances(u, vc, dc, *args, t, need_d)
            slope_m, w_m, *gp_m = act.filter_vjp_vjp_from_distances(u, vm, dm, *args, t,
                                                                    need_d)
            w = w + w_m
            if need_params:
                gp = [s + t for s, t in zip(gp, gp_m, strict=True)]
        if grad_d is not None:
            grad_d.index_copy_(0, c, vc * slope)
            grad_d.index_copy_(0, m, vm * slope_m)
        if need_g:
            scatter_fn(grad_g, x, w, p0)
        if need_x:
            scatter_fn(grad_x, g, w, p0)
        if sums is not None:
            for s, t in zip(sums, gp, strict=True):
                s += t
    grads = sums if sums is not None else [None, None, None, None]
    return (grad_g, grad_x, grad_d, *grads)


# ---------------------------------------------------------------- PaiNN message (README.md)
# PaiNN's filter is linear in the basis: W = u (wf b + bf) = [u b, u] [wf, bf]^T. One GEMM with
# K + 1 inner columns then gives W without a pass over [b, 3F] for the envelope, and in the
# backward gw [wf, bf] gives both <gw, wf b'>-type dots and <gw, bf> (README.md: Tuning).
def painn_filter(basis: Tensor, env: Tensor, wf: Tensor, bf: Tensor) -> Tensor:
    """W [b, 3F] = env * (basis wf^T + bf) for basis [b, K], env [b]; wf [3F, K]."""
    return torch.addmm(bf, basis, wf.t()) * env.unsqueeze(1)


def _augmented_basis(d: Tensor, settings: RadialSettings, num_basis: int, radial_fn,
                     order: int):
    """([u b, u] [b, K + 1], b, b' or None, u, u' or None) of the distances d [b]."""
    (basis, *slope), (env, *env_slope) = radial_fn(d, num_basis, settings.cutoff, settings.kind,
                                                   settings.envelope, order)
    aug = torch.cat([basis * env.unsqueeze(1), env.unsqueeze(1)], 1)
    return aug, basis, (slope[0] if order else None), env, (env_slope[0] if order else None)


@torch.no_grad()
def blocked_painn_forward(phi: Tensor, v: Tensor, d: Tensor, i: Tensor, ptr: Tensor, wf: Tensor,
                          bf: Tensor, settings: RadialSettings, radial_fn, rows_fn,
                          block: int) -> tuple[Tensor, Tensor]:
    """(ds [N, F], dv [N, 3, F]) of the PaiNN message, a block of edges at a time.

    ``rows_fn(ds, dv, w_block, e0, a0, a1)`` is the backend's in-place message sum over the rows
    a0..a1 touched by edges e0..e0+len(w_block) (gathers of phi, v and the unit vectors inside).
    """
    n, nf = ptr.shape[0] - 1, v.shape[2]
    ds, dv = phi.new_zeros(n, nf), phi.new_zeros(n, 3, nf)
    d = d.detach()
    weight = torch.cat([wf.detach(), bf.detach().unsqueeze(1)], 1).t().contiguous()  # [K+1, 3F]
    for e0 in range(0, d.shape[0], block):
        e1 = min(e0 + block, d.shape[0])
        aug, *_ = _augmented_basis(d[e0:e1], settings, wf.shape[1], radial_fn, 0)
        rows_fn(ds, dv, aug @ weight, e0, int(i[e0]), int(i[e1 - 1]))
    return ds, dv


@torch.no_grad()
def blocked_painn_vjp(phi: Tensor, v: Tensor, d: Tensor, d_rev: Tensor, i: Tensor, ptr: Tensor,
                      wf: Tensor, bf: Tensor, settings: RadialSettings, need_params: bool,
                      radial_fn, rows_fn, block: int):
    """Gradients of <gs, ds> + <gv, dv> of the PaiNN message, a block of edges at a time.

    ``rows_fn(gphi, r, gunit, w, w_rev, e0, a0, a1) -> gw`` is the backend's pass over the rows
    a0..a1 (with gs, gv bound): it adds the sender-side gradients of each row's atom (through the
    mirrored edges, whose filter is ``w_rev``) into ``gphi`` [N, 3F] and ``r`` [N, 3, F]
    (``r[a, k] = sum_e gv[j_e, k] W_vv(d_rev_e)``), writes ``gunit`` [E, 3] and returns the
    filter gradient ``gw`` [b, 3F] of the block's edges. Mirrored pairs have bitwise equal
    distances, so ``w_rev`` is ``w`` unless the caller's distances say otherwise (one
    comparison per call).

    Returns (grad_phi [N, 3F], grad_v [N, 3, F], grad_d [E], grad_unit [E, 3], grad_wf [3F, K],
    grad_bf [3F]); the last two are None unless ``need_params``.
    """
    n, nf, num_basis = ptr.shape[0] - 1, v.shape[2], wf.shape[1]
    phi, v, d, d_rev = phi.detach(), v.detach(), d.detach(), d_rev.detach()
    gphi, r = phi.new_zeros(n, 3 * nf), phi.new_zeros(n, 3, nf)
    grad_d, gunit = d.new_zeros(d.shape[0]), d.new_zeros(d.shape[0], 3)
    weight_t = torch.cat([wf.detach(), bf.detach().unsqueeze(1)], 1)  # [3F, K + 1]
    weight = weight_t.t().contiguous()
    gweight = torch.zeros_like(weight_t) if need_params else None
    mirrored = torch.equal(d, d_rev)
    for e0 in range(0, d.shape[0], block):
        e1 = min(e0 + block, d.shape[0])
        aug, basis, slope, env, env_slope = _augmented_basis(d[e0:e1], settings, num_basis,
                                                             radial_fn, 1)
        w = aug @ weight
        w_rev = w
        if not mirrored:
            aug_rev, *_ = _augmented_basis(d_rev[e0:e1], settings, num_basis, radial_fn, 0)
            w_rev = aug_rev @ weight
        gw = rows_fn(gphi, r, gunit, w, w_rev, e0, int(i[e0]), int(i[e1 - 1]))
        # <gw, dW/dd> with W = u (wf b + bf): u' (<gw wf, b> + <gw, bf>) + u <gw wf, b'>
        gz = gw @ weight_t  # [b, K + 1]: (gw wf | gw bf)
        gzb = gz[:, :num_basis]
        grad_d[e0:e1] = env_slope * ((gzb * basis).sum(1) + gz[:, num_basis]) + env * (
            gzb * slope).sum(1)
        if gweight is not None:
            gweight += gw.t() @ aug  # sum_e u gw b^T | sum_e u gw
    gphi[:, 2 * nf:] = (v * r).sum(1)
    gwf, gbf = (None, None) if gweight is None else (gweight[:, :num_basis].contiguous(),
                                                      gweight[:, num_basis].contiguous())
    return gphi, phi[:, 2 * nf:].unsqueeze(1) * r, grad_d, gunit, gwf, gbf


def params_or_empty(grads: tuple, like: Tensor) -> tuple:
    """The launchers' return convention: parameter gradients not asked for (None) become
    empty [0] tensors."""
    return tuple(like.new_empty(0) if t is None else t for t in grads)


def cell_sums(cell_rows: Tensor, atom_system: Tensor | None, cells: Tensor) -> Tensor:
    """[B, 3, 3] cell gradients from per-atom rows [N, 9], summed over each system's atoms
    (in atom order on CPU: deterministic)."""
    num_systems = cells.shape[0]
    if atom_system is None:
        sums = cell_rows.sum(0, keepdim=True)
    else:
        sums = cell_rows.new_zeros(num_systems, 9).index_add_(0, atom_system, cell_rows)
    return sums.view(num_systems, 3, 3)
