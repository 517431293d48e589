"""Custom ops of the message-passing family (namespace ``fastff::``), fake impls and autograd.

Primitives, all over a FULL neighbor list sorted by receiver (CSR ``ptr``) with its mirror index
``rev`` (sender-side sums become receiver-side sums over mirrored edges: no atomics on CPU):

* ``gms(h, w)``: out[a] = sum_{e in row a} h[j_e] w_e (gather-multiply-segment-sum) and
  ``ggm(a, b)``: out[e] = a[i_e] b[j_e] (its edge-product partner). The backward of each is
  built from the two: closed under differentiation.
* ``cfconv``: gms with SchNet's filter network computed inside, once per unordered pair
  (the pair's two edges share ``(W(d_e) + W(d_rev e)) / 2``, which is W(d_e) for the mirrored
  distances of any geometry), a block of pairs at a time. Its backward is the fused
  ``cfconv_vjp`` (x, d and parameter gradients in one pass; the x-gradient alone is ``cfconv``
  on the gradient: the pair filter is symmetric). ``cfconv_vjp`` is differentiable: a
  cotangent on its distance gradient alone (force training) takes the fused
  ``cfconv_vjp_vjp``; anything else, and every higher order, autograd through the same
  formulas written with ``ggm``, ``radial_basis`` and torch ops (``composite_vjp``).
* ``spline_conv`` / ``spline_edge_dot``: the tabulated filter; the derivative of each at order
  n is the pair at orders n and n + 1, so every order works. ``spline_conv_vjp`` is
  spline_conv's backward (no scale) with both halves in one pass over the edges; its own
  backward is autograd through the unfused pair.
* ``spline_conv_positions``: spline_conv with the distances computed inside from positions,
  over a mirror-symmetric full list. Its backward is the fused, row-owned
  ``spline_conv_positions_vjp`` (x, position and cell gradients; no mirror index, no [E]
  tensor) when no graph is needed and, when it must be differentiable, autograd through
  ``pair_vectors``, the norm and ``spline_conv``, recomputed.
* ``painn_message``: PaiNN's message block with its linear radial filter computed inside, a
  block of edges at a time (the structure of ``cfconv``). Its backward is the fused
  ``painn_message_vjp`` when no graph is needed and, when it must be differentiable, autograd
  through the same message written with ``gms`` (``painn_composite``), recomputed.

Every op takes the already resolved backend name (see fastff.kernels._runtime.registry); only
this file knows all three paths. The first backwards of ``cfconv``, ``painn_message``,
``spline_conv`` and ``spline_conv_positions`` compute only the gradients the running backward
uses (``fastff.kernels._runtime.autograd.wanted_grads``): forces of a model with trainable
weights cost what they cost with frozen ones. So does ``cfconv_vjp``'s own backward
(``cfconv_vjp_vjp``), and both vjps skip the distance gradient (``need_d``) when it is not
wanted: force training asks for the weights' gradients, not the positions'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastff.kernels._runtime import registry
from fastff.kernels._runtime.autograd import wanted_grads
from fastff.kernels.message import dense
from fastff.kernels.neighbors import op as _neighbors
from fastff.kernels.radial import op as _radial

for _name in ("gms", "ggm", "cfconv_forward", "cfconv_vjp", "cfconv_vjp_vjp", "spline_conv",
              "spline_edge_dot", "spline_conv_vjp", "spline_conv_positions",
              "spline_conv_positions_vjp",
              "painn_forward", "painn_vjp"):
    registry.register(_name, "message", _name)


# ---------------------------------------------------------------- gms / ggm
@torch.library.custom_op("fastff::gms", mutates_args=())
def gms(h: Tensor, w: Tensor, i: Tensor, j: Tensor, ptr: Tensor, rev: Tensor,
        backend: str) -> Tensor:
    return registry.launcher("gms", backend)(h, w, i, j, ptr)


@gms.register_fake
def _(h, w, i, j, ptr, rev, backend):
    return h.new_empty(ptr.shape[0] - 1, h.shape[1])


@torch.library.custom_op("fastff::ggm", mutates_args=())
def ggm(a: Tensor, b: Tensor, i: Tensor, j: Tensor, ptr: Tensor, rev: Tensor,
        backend: str) -> Tensor:
    return registry.launcher("ggm", backend)(a, b, i, j)


@ggm.register_fake
def _(a, b, i, j, ptr, rev, backend):
    return a.new_empty(i.shape[0], a.shape[1])


def _graph_setup(ctx, inputs, output):
    first, second, i, j, ptr, rev, backend = inputs
    ctx.save_for_backward(first, second, i, j, ptr, rev)
    ctx.backend = backend


def _mirror(t: Tensor, rev: Tensor) -> Tensor:
    return t.index_select(0, rev)


def _gms_backward(ctx, grad):
    h, w, i, j, ptr, rev = ctx.saved_tensors
    grad = grad.contiguous()
    gh = gw = None
    if ctx.needs_input_grad[0]:  # sender side: rows of the mirrored edges
        gh = gms(grad, _mirror(w, rev), i, j, ptr, rev, ctx.backend)
    if ctx.needs_input_grad[1]:
        gw = ggm(grad, h, i, j, ptr, rev, ctx.backend)
    return gh, gw, None, None, None, None, None


def _ggm_backward(ctx, grad):
    a, b, i, j, ptr, rev = ctx.saved_tensors
    grad = grad.contiguous()
    ga = gb = None
    if ctx.needs_input_grad[0]:
        ga = gms(b, grad, i, j, ptr, rev, ctx.backend)
    if ctx.needs_input_grad[1]:
        gb = gms(a, _mirror(grad, rev), i, j, ptr, rev, ctx.backend)
    return ga, gb, None, None, None, None, None


gms.register_autograd(_gms_backward, setup_context=_graph_setup)
ggm.register_autograd(_ggm_backward, setup_context=_graph_setup)


# ---------------------------------------------------------------- cfconv
@torch.library.custom_op("fastff::cfconv", mutates_args=())
def cfconv(x: Tensor, d: Tensor, i: Tensor, j: Tensor, ptr: Tensor, rev: Tensor, w1: Tensor,
           b1: Tensor, w2: Tensor, b2: Tensor, cutoff: float, kind: str, envelope: str,
           activation: str, backend: str) -> Tensor:
    return registry.launcher("cfconv_forward", backend)(x, d, i, j, ptr, rev, w1, b1, w2, b2,
                                                         cutoff, kind, envelope, activation)


@cfconv.register_fake
def _(x, d, i, j, ptr, rev, w1, b1, w2, b2, cutoff, kind, envelope, activation, backend):
    return x.new_empty(ptr.shape[0] - 1, x.shape[1])


@torch.library.custom_op("fastff::cfconv_vjp", mutates_args=())
def cfconv_vjp(g: Tensor, x: Tensor, d: Tensor, i: Tensor, j: Tensor, ptr: Tensor, rev: Tensor,
               w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, cutoff: float, kind: str,
               envelope: str, activation: str, need_params: bool, need_x: bool,
               backend: str, need_d: bool = True
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_d, grad_w1, grad_b1, grad_w2, grad_b2) of sum <g, cfconv(x, d)>: grad_x
    (= cfconv(g, d)) empty [0] unless need_x, grad_d unless need_d, the parameters' unless
    need_params."""
    return registry.launcher("cfconv_vjp", backend)(g, x, d, i, j, ptr, rev, w1, b1, w2, b2,
                                                     cutoff, kind, envelope, activation,
                                                     need_params, need_x, need_d)


@cfconv_vjp.register_fake
def _(g, x, d, i, j, ptr, rev, w1, b1, w2, b2, cutoff, kind, envelope, activation,
      need_params, need_x, backend, need_d=True):
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    grad_d = d.new_empty(d.shape[0] if need_d else 0)
    if need_params:
        return (grad_x, grad_d, torch.empty_like(w1), torch.empty_like(b1),
                torch.empty_like(w2), torch.empty_like(b2))
    return (grad_x, grad_d, *(d.new_empty(0) for _ in range(4)))


@torch.library.custom_op("fastff::cfconv_vjp_vjp", mutates_args=())
def cfconv_vjp_vjp(v: Tensor, g: Tensor, x: Tensor, d: Tensor, i: Tensor, j: Tensor, ptr: Tensor,
                   rev: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, cutoff: float,
                   kind: str, envelope: str, activation: str, need_g: bool, need_x: bool,
                   need_params: bool, backend: str, need_d: bool = True
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_g, grad_x, grad_d, grad_w1, grad_b1, grad_w2, grad_b2) of sum_e v_e grad_d_e,
    grad_d = cfconv_vjp(g, x, d, ...)[1]: the second backward of force training. grad_g,
    grad_x and grad_d are empty [0] unless need_g / need_x / need_d, the parameters' unless
    need_params."""
    return registry.launcher("cfconv_vjp_vjp", backend)(v, g, x, d, i, j, ptr, rev, w1, b1, w2,
                                                         b2, cutoff, kind, envelope, activation,
                                                         need_g, need_x, need_params, need_d)


@cfconv_vjp_vjp.register_fake
def _(v, g, x, d, i, j, ptr, rev, w1, b1, w2, b2, cutoff, kind, envelope, activation, need_g,
      need_x, need_params, backend, need_d=True):
    return (torch.empty_like(g) if need_g else g.new_empty(0),
            torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(d) if need_d else d.new_empty(0),
            *(torch.empty_like(p) if need_params else d.new_empty(0) for p in (w1, b1, w2, b2)))


def _refuse_derivative(vjp_op, parent: str) -> None:
    """A fused no-graph backward raises when differentiated (it never returns zeros): with
    create_graph=True its parent's backward takes a differentiable path instead."""
    def backward(ctx, *grads):
        raise RuntimeError(f"fastff::{vjp_op._name} is the no-graph fast path of {parent}'s "
                           f"backward and has no derivative; differentiate {parent} with "
                           "create_graph=True instead (that backward is built from "
                           "differentiable ops)")
    vjp_op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)


def _cfconv_vjp_vjp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:12])
    ctx.args = (*inputs[12:16], inputs[19])  # the filter's settings and the backend
    ctx.set_materialize_grads(False)


def _cfconv_vjp_vjp_backward(ctx, *cotangents):
    """Third order and beyond (rare: the Hessian of a force loss, say): autograd twice through
    the d-gradient written with differentiable ops (``composite_vjp``), recomputed."""
    v, g, x, d, i, j, ptr, rev, w1, b1, w2, b2 = ctx.saved_tensors
    *filt, backend = ctx.args
    differentiable = (0, 1, 2, 3, 8, 9, 10, 11)
    wanted = [k for k in differentiable if ctx.needs_input_grad[k]]
    result: list = [None] * 21  # one per input of cfconv_vjp_vjp
    with torch.enable_grad():
        inputs = list(ctx.saved_tensors)
        for k in differentiable:  # every one: the inner gradient is taken in all of them
            inputs[k] = _alias(inputs[k])
        v_, g_, x_, d_, *_, w1_, b1_, w2_, b2_ = inputs
        (grad_d,) = composite_vjp(g_, x_, d_, i, j, ptr, rev, w1_, b1_, w2_, b2_, *filt, False,
                                  backend)[:1]
        inner = torch.autograd.grad(grad_d, [g_, x_, d_, w1_, b1_, w2_, b2_], v_,
                                    create_graph=True, allow_unused=True)
        pairs = [(out, cot) for out, cot in zip(inner, cotangents, strict=True)
                 if out is not None and cot is not None and cot.numel()]
        if not pairs:
            return tuple(result)
        found = torch.autograd.grad([o for o, _ in pairs], [inputs[k] for k in wanted],
                                    [c for _, c in pairs],
                                    create_graph=torch.is_grad_enabled(), allow_unused=True)
    for k, t in zip(wanted, found, strict=True):
        result[k] = t
    return tuple(result)


cfconv_vjp_vjp.register_autograd(_cfconv_vjp_vjp_backward, setup_context=_cfconv_vjp_vjp_setup)


def composite_vjp(g, x, d, i, j, ptr, rev, w1, b1, w2, b2, cutoff, kind, envelope, activation,
                  need_params, backend):
    """The (d, parameter) gradients of cfconv from differentiable ops (materialises [E, F]):
    (grad_d, grad_w1, grad_b1, grad_w2, grad_b2), the parameter gradients None unless
    ``need_params``. cfconv's filter is the mirror mean (W(d_e) + W(d_rev e)) / 2, so its loss
    is sum_e <(u_e + u_rev(e)) / 2, W(d_e)> with u = ggm(g, x), and u_rev(e) = ggm(x, g)_e."""
    num_basis = w1.shape[1]
    basis = _radial.radial_basis(d, num_basis, cutoff, kind, "none", 0, backend)
    slope = _radial.radial_basis(d, num_basis, cutoff, kind, "none", 1, backend)
    env, env_slope = dense.envelope(d, cutoff, envelope, 1)
    # u + u_rev in place (ggm's backward reads its inputs only), and the 1/2 on the outputs (the
    # gradients are linear in u)
    u = ggm(g, x, i, j, ptr, rev, backend).add_(ggm(x, g, i, j, ptr, rev, backend))
    gd, *gp, _ = dense.filter_vjp(u, basis, slope, env, env_slope, w1, b1, w2, b2, activation,
                                  need_params)
    return 0.5 * gd, *(None if t is None else 0.5 * t for t in gp)


def _cfconv_vjp_setup(ctx, inputs, output):
    (g, x, d, i, j, ptr, rev, w1, b1, w2, b2, cutoff, kind, envelope, activation, need_params,
     need_x, backend, *_) = inputs
    ctx.save_for_backward(g, x, d, i, j, ptr, rev, w1, b1, w2, b2)
    ctx.args = (cutoff, kind, envelope, activation, need_params, need_x, backend)
    ctx.set_materialize_grads(False)  # None for the outputs nobody used: no zero tensors


def _cfconv_vjp_backward(ctx, ggx, ggd, *ggp):
    """Force training differentiates the distance gradient alone (its cotangent ggd): the fused
    ``cfconv_vjp_vjp``. Any other use (cotangents on grad_x or the parameter gradients, or a
    graph for a third derivative) runs autograd through the same gradients written with
    differentiable ops, recomputed."""
    g, x, d, i, j, ptr, rev, w1, b1, w2, b2 = ctx.saved_tensors
    cutoff, kind, envelope, activation, need_params, need_x, backend = ctx.args
    needs = ctx.needs_input_grad
    filt = (cutoff, kind, envelope, activation)
    result: list = [None] * 19  # one per input of cfconv_vjp
    differentiable = (0, 1, 2, 7, 8, 9, 10)
    others = [t for t in (ggx, *ggp) if t is not None and t.numel()]
    if ggd is None and not others:
        return tuple(result)
    if not others and not torch.is_grad_enabled():
        # force training wants the weights' gradients, not the distances' (the positions')
        wanted = wanted_grads(ctx, 11)
        grads = cfconv_vjp_vjp(ggd.contiguous(), g, x, d, i, j, ptr, rev, w1, b1, w2, b2, *filt,
                               wanted[0], wanted[1], any(wanted[7:11]), backend,
                               need_d=wanted[2])
        for k, t in zip(differentiable, grads, strict=True):
            result[k] = t if wanted[k] else None
        return tuple(result)
    wanted = [k for k in differentiable if needs[k]]
    with torch.enable_grad():
        inputs = list(ctx.saved_tensors)
        for k in wanted:
            inputs[k] = _alias(inputs[k])
        g_, x_, d_, *_, w1_, b1_, w2_, b2_ = inputs
        outputs, cotangents = [], []
        if ggd is not None or need_params:
            gd, *gp = composite_vjp(g_, x_, d_, i, j, ptr, rev, w1_, b1_, w2_, b2_, *filt,
                                    need_params, backend)
            for out, cot in zip((gd, *gp), (ggd, *ggp), strict=True):
                if out is not None and cot is not None and cot.numel():
                    outputs.append(out)
                    cotangents.append(cot)
        if need_x and ggx is not None:
            outputs.append(cfconv(g_, d_, i, j, ptr, rev, w1_, b1_, w2_, b2_, *filt, backend))
            cotangents.append(ggx)
        found = torch.autograd.grad(outputs, [inputs[k] for k in wanted], cotangents,
                                    create_graph=torch.is_grad_enabled(), allow_unused=True)
    for k, t in zip(wanted, found, strict=True):
        result[k] = t
    return tuple(result)


cfconv_vjp.register_autograd(_cfconv_vjp_backward, setup_context=_cfconv_vjp_setup)


def _cfconv_setup(ctx, inputs, output):
    x, d, i, j, ptr, rev, w1, b1, w2, b2, cutoff, kind, envelope, activation, backend = inputs
    ctx.save_for_backward(x, d, i, j, ptr, rev, w1, b1, w2, b2)
    ctx.args = (cutoff, kind, envelope, activation, backend)


def _cfconv_backward(ctx, grad):
    x, d, i, j, ptr, rev, w1, b1, w2, b2 = ctx.saved_tensors
    cutoff, kind, envelope, activation, backend = ctx.args
    grad = grad.contiguous()
    needs = wanted_grads(ctx, 10)  # forces of a trainable model: no weight gradients
    need_params = any(needs[6:10])
    gx = gd = gp = None
    # the pair filter is symmetric, so the x-gradient (a sum over senders) is the op on grad;
    # with create_graph (force training) it stays a separate cfconv, so that cfconv_vjp's own
    # backward sees the distance gradient's cotangent alone (its fused path)
    fused_x = needs[0] and not torch.is_grad_enabled()
    if needs[1] or need_params:  # one pass: the hidden layer serves the x- and d-gradients
        gx, gd, *gp = cfconv_vjp(grad, x, d, i, j, ptr, rev, w1, b1, w2, b2, cutoff, kind,
                                 envelope, activation, need_params, fused_x, backend,
                                 need_d=needs[1])
    if needs[0] and not fused_x:
        gx = cfconv(grad, d, i, j, ptr, rev, w1, b1, w2, b2, cutoff, kind, envelope, activation,
                    backend)
    gparams = [p if (need_params and n) else None
               for p, n in zip(gp or [None] * 4, needs[6:10], strict=True)]
    return (gx if needs[0] else None, gd if needs[1] else None, None, None, None, None,
            *gparams, None, None, None, None, None)


cfconv.register_autograd(_cfconv_backward, setup_context=_cfconv_setup)


# ---------------------------------------------------------------- tabulated filter
@torch.library.custom_op("fastff::spline_conv", mutates_args=())
def spline_conv(x: Tensor, d: Tensor, scale: Tensor | None, coeffs: Tensor, i: Tensor, j: Tensor,
                ptr: Tensor, rev: Tensor, cutoff: float, order: int, backend: str) -> Tensor:
    return registry.launcher("spline_conv", backend)(x, d, scale, coeffs, i, j, ptr, cutoff,
                                                      order)


@spline_conv.register_fake
def _(x, d, scale, coeffs, i, j, ptr, rev, cutoff, order, backend):
    return x.new_empty(ptr.shape[0] - 1, x.shape[1])


@torch.library.custom_op("fastff::spline_edge_dot", mutates_args=())
def spline_edge_dot(g: Tensor, x: Tensor, d: Tensor, coeffs: Tensor, i: Tensor, j: Tensor,
                    ptr: Tensor, rev: Tensor, cutoff: float, order: int, backend: str) -> Tensor:
    return registry.launcher("spline_edge_dot", backend)(g, x, d, coeffs, i, j, cutoff, order)


@spline_edge_dot.register_fake
def _(g, x, d, coeffs, i, j, ptr, rev, cutoff, order, backend):
    return d.new_empty(d.shape[0])


# spline_conv's backward as two passes (dL/dx, dL/dd) reads every edge's 1 KB table interval
# twice; with the forward they were ~54% of a tabulated SchNet step. Fused, mirrored pairs
# (bitwise equal distances) read it once: 1.38x faster backward at 30,000 atoms on 2 cores
# (kernels/message/cpu_numba.py).
@torch.library.custom_op("fastff::spline_conv_vjp", mutates_args=())
def spline_conv_vjp(grad: Tensor, x: Tensor, d: Tensor, d_rev: Tensor, coeffs: Tensor, i: Tensor,
                    j: Tensor, ptr: Tensor, rev: Tensor, cutoff: float, order: int,
                    backend: str) -> tuple[Tensor, Tensor]:
    """(spline_conv(grad, d_rev, None, order), spline_edge_dot(grad, x, d, order + 1))."""
    return registry.launcher("spline_conv_vjp", backend)(grad, x, d, d_rev, coeffs, i, j, ptr,
                                                          cutoff, order)


@spline_conv_vjp.register_fake
def _(grad, x, d, d_rev, coeffs, i, j, ptr, rev, cutoff, order, backend):
    return grad.new_empty(ptr.shape[0] - 1, grad.shape[1]), d.new_empty(d.shape[0])


def _conv_vjp_setup(ctx, inputs, output):
    grad, x, d, d_rev, coeffs, i, j, ptr, rev, cutoff, order, backend = inputs
    ctx.save_for_backward(grad, x, d, d_rev, coeffs, i, j, ptr, rev)
    ctx.args = (cutoff, order, backend)


def _alias(t: Tensor) -> Tensor:
    """A fresh graph node for t (a view: gradients still reach t), so that a tensor passed as
    two inputs gets the gradient of each use separately."""
    return t.view_as(t) if t.requires_grad else t.detach().requires_grad_(True)


def _conv_vjp_backward(ctx, grad_gx, grad_gd):
    """Autograd through the unfused pair, recomputed: every derivative order of the pair exists,
    and with create_graph the result stays connected to the saved inputs."""
    grad, x, d, d_rev, coeffs, i, j, ptr, rev = ctx.saved_tensors
    cutoff, order, backend = ctx.args
    needs = ctx.needs_input_grad
    _no_table_grad(needs[4])
    create_graph = torch.is_grad_enabled()  # read before enable_grad below
    wanted = [k for k in range(4) if needs[k]]
    result: list = [None] * 12  # None where an input reaches no used output: a true zero
    with torch.enable_grad():
        inputs = [_alias(t) if k in wanted else t for k, t in enumerate((grad, x, d, d_rev))]
        g_, x_, d_, dr_ = inputs
        outputs, cotangents = [], []
        if grad_gx is not None:
            outputs.append(spline_conv(g_, dr_, None, coeffs, i, j, ptr, rev, cutoff, order,
                                       backend))
            cotangents.append(grad_gx)
        if grad_gd is not None:
            outputs.append(spline_edge_dot(g_, x_, d_, coeffs, i, j, ptr, rev, cutoff, order + 1,
                                           backend))
            cotangents.append(grad_gd)
        if not outputs:
            return tuple(result)
        found = torch.autograd.grad(outputs, [inputs[k] for k in wanted], cotangents,
                                    create_graph=create_graph, allow_unused=True)
    for k, g in zip(wanted, found, strict=True):
        result[k] = g
    return tuple(result)


spline_conv_vjp.register_autograd(_conv_vjp_backward, setup_context=_conv_vjp_setup)


def _no_table_grad(needs_coeffs: bool) -> None:
    if needs_coeffs:
        raise RuntimeError("a tabulated filter (spline coeffs) has no gradient: tables are for "
                           "inference; train with the MLP filter")


def _spline_conv_setup(ctx, inputs, output):
    x, d, scale, coeffs, i, j, ptr, rev, cutoff, order, backend = inputs
    ctx.save_for_backward(x, d, scale, coeffs, i, j, ptr, rev)
    ctx.args = (cutoff, order, backend)
    ctx.tensor_slots = tuple(k for k, t in enumerate(inputs) if isinstance(t, Tensor))


def _spline_conv_backward(ctx, grad):
    x, d, scale, coeffs, i, j, ptr, rev = ctx.saved_tensors
    cutoff, order, backend = ctx.args
    needs = wanted_grads(ctx, ctx.tensor_slots)
    _no_table_grad(needs[3])
    grad = grad.contiguous()
    gx = gd = gs = None
    if scale is None and needs[0] and needs[1]:  # forces: both halves in one pass
        gx, gd = spline_conv_vjp(grad, x, d, _mirror(d, rev), coeffs, i, j, ptr, rev, cutoff,
                                 order, backend)
        return gx, gd, None, None, None, None, None, None, None, None, None
    if needs[0]:
        gx = spline_conv(grad, _mirror(d, rev), None if scale is None else _mirror(scale, rev),
                         coeffs, i, j, ptr, rev, cutoff, order, backend)
    if needs[1]:
        gd = spline_edge_dot(grad, x, d, coeffs, i, j, ptr, rev, cutoff, order + 1, backend)
        if scale is not None:
            gd = gd * scale
    if scale is not None and needs[2]:
        gs = spline_edge_dot(grad, x, d, coeffs, i, j, ptr, rev, cutoff, order, backend)
    return gx, gd, gs, None, None, None, None, None, None, None, None


def _edge_dot_setup(ctx, inputs, output):
    g, x, d, coeffs, i, j, ptr, rev, cutoff, order, backend = inputs
    ctx.save_for_backward(g, x, d, coeffs, i, j, ptr, rev)
    ctx.args = (cutoff, order, backend)


def _edge_dot_backward(ctx, grad):
    g, x, d, coeffs, i, j, ptr, rev = ctx.saved_tensors
    cutoff, order, backend = ctx.args
    needs = ctx.needs_input_grad
    _no_table_grad(needs[3])
    grad = grad.contiguous()
    gg = gx = gd = None
    if needs[0]:
        gg = spline_conv(x, d, grad, coeffs, i, j, ptr, rev, cutoff, order, backend)
    if needs[1]:
        gx = spline_conv(g, _mirror(d, rev), _mirror(grad, rev), coeffs, i, j, ptr, rev, cutoff,
                         order, backend)
    if needs[2]:
        gd = grad * spline_edge_dot(g, x, d, coeffs, i, j, ptr, rev, cutoff, order + 1, backend)
    return gg, gx, gd, None, None, None, None, None, None, None, None


spline_conv.register_autograd(_spline_conv_backward, setup_context=_spline_conv_setup)
spline_edge_dot.register_autograd(_edge_dot_backward, setup_context=_edge_dot_setup)


# ---------------------------------------------------------------- tabulated filter from positions
@torch.library.custom_op("fastff::spline_conv_positions", mutates_args=())
def spline_conv_positions(x: Tensor, positions: Tensor, cells: Tensor, atom_system: Tensor | None,
                          i: Tensor, j: Tensor, shifts: Tensor, ptr: Tensor, coeffs: Tensor,
                          cutoff: float, backend: str) -> Tensor:
    """out[a] = sum_{e in row a} x[j_e] W(|r_e|), r_e = positions[j] - positions[i] + S @ cell,
    over a full list in which every pair has its mirror (fastff.neighbor_list's)."""
    return registry.launcher("spline_conv_positions", backend)(
        x, positions, cells, atom_system, i, j, shifts, ptr, coeffs, cutoff)


@spline_conv_positions.register_fake
def _(x, positions, cells, atom_system, i, j, shifts, ptr, coeffs, cutoff, backend):
    return x.new_empty(ptr.shape[0] - 1, x.shape[1])


@torch.library.custom_op("fastff::spline_conv_positions_vjp", mutates_args=())
def spline_conv_positions_vjp(grad: Tensor, x: Tensor, positions: Tensor, cells: Tensor,
                              atom_system: Tensor | None, i: Tensor, j: Tensor, shifts: Tensor,
                              ptr: Tensor, coeffs: Tensor, cutoff: float, need_x: bool,
                              need_cell: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (x, positions, cells) of <grad, spline_conv_positions(...)>; the x and cell
    gradients are empty [0] tensors unless need_x / need_cell."""
    return registry.launcher("spline_conv_positions_vjp", backend)(
        grad, x, positions, cells, atom_system, i, j, shifts, ptr, coeffs, cutoff, need_x,
        need_cell)


@spline_conv_positions_vjp.register_fake
def _(grad, x, positions, cells, atom_system, i, j, shifts, ptr, coeffs, cutoff, need_x,
      need_cell, backend):
    return (x.new_empty(x.shape if need_x else (0,)), torch.empty_like(positions),
            cells.new_empty(cells.shape if need_cell else (0,)))


_refuse_derivative(spline_conv_positions_vjp, "spline_conv_positions")


def spline_conv_positions_composite(x, positions, cells, atom_system, i, j, shifts, ptr, coeffs,
                                    cutoff, backend):
    """spline_conv_positions from differentiable ops (pair_vectors, the norm, spline_conv)."""
    vectors = _neighbors.pair_vectors(positions, cells, atom_system, i, j, shifts, backend)
    d = torch.linalg.vector_norm(vectors, dim=1)
    rev = _neighbors.neighbor_reverse(i, j, shifts, ptr, backend)
    return spline_conv(x, d, None, coeffs, i, j, ptr, rev, cutoff, 0, backend)


def _positions_setup(ctx, inputs, output):
    x, positions, cells, atom_system, i, j, shifts, ptr, coeffs, cutoff, backend = inputs
    ctx.save_for_backward(x, positions, cells, atom_system, i, j, shifts, ptr, coeffs)
    ctx.args = (cutoff, backend)
    ctx.tensor_slots = tuple(k for k, t in enumerate(inputs) if isinstance(t, Tensor))


def _positions_backward(ctx, grad):
    x, positions, cells, atom_system, i, j, shifts, ptr, coeffs = ctx.saved_tensors
    cutoff, backend = ctx.args
    needs = wanted_grads(ctx, ctx.tensor_slots)
    _no_table_grad(needs[8])
    grad = grad.contiguous()
    result: list = [None] * 11
    geometry = (i, j, shifts, ptr, coeffs, cutoff, backend)
    if torch.is_grad_enabled():  # the backward itself is being differentiated
        wanted = [k for k in (0, 1, 2) if needs[k]]
        with torch.enable_grad():
            inputs = [_alias(t) if k in wanted else t
                      for k, t in enumerate((x, positions, cells))]
            out = spline_conv_positions_composite(*inputs, atom_system, *geometry)
            found = torch.autograd.grad(out, [inputs[k] for k in wanted], grad,
                                        create_graph=True, allow_unused=True)
        for k, g in zip(wanted, found, strict=True):
            result[k] = g
        return tuple(result)
    if not (needs[1] or needs[2]):  # the x-gradient alone: the same op (mirrored pairs)
        result[0] = spline_conv_positions(grad, positions, cells, atom_system, *geometry)
        return tuple(result)
    gx, gpos, gcell = spline_conv_positions_vjp(grad, x, positions, cells, atom_system, i, j,
                                                shifts, ptr, coeffs, cutoff, needs[0], needs[2],
                                                backend)
    result[0] = gx if needs[0] else None
    result[1] = gpos if needs[1] else None
    result[2] = gcell if needs[2] else None
    return tuple(result)


spline_conv_positions.register_autograd(_positions_backward, setup_context=_positions_setup)


# ---------------------------------------------------------------- PaiNN message
@torch.library.custom_op("fastff::painn_message", mutates_args=())
def painn_message(phi: Tensor, v: Tensor, d: Tensor, unit: Tensor, i: Tensor, j: Tensor,
                  ptr: Tensor, rev: Tensor, wf: Tensor, bf: Tensor, cutoff: float, kind: str,
                  envelope: str, backend: str) -> tuple[Tensor, Tensor]:
    """(ds [N, F], dv [N, 3, F]) for phi [N, 3F] (s | vs | vv blocks), v [N, 3, F], d [E],
    unit [E, 3] and the filter W(d) = u(d) (wf b(d) + bf), wf [3F, K]."""
    return registry.launcher("painn_forward", backend)(phi, v, d, unit, i, j, ptr, wf, bf, cutoff,
                                                        kind, envelope)


@painn_message.register_fake
def _(phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope, backend):
    n = ptr.shape[0] - 1
    return phi.new_empty(n, v.shape[2]), v.new_empty(n, 3, v.shape[2])


@torch.library.custom_op("fastff::painn_message_vjp", mutates_args=())
def painn_message_vjp(gs: Tensor, gv: Tensor, phi: Tensor, v: Tensor, d: Tensor, unit: Tensor,
                      i: Tensor, j: Tensor, ptr: Tensor, rev: Tensor, wf: Tensor, bf: Tensor,
                      cutoff: float, kind: str, envelope: str, need_params: bool,
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (phi, v, d, unit, wf, bf) of <gs, ds> + <gv, dv>; the last two are empty [0]
    tensors unless need_params."""
    return registry.launcher("painn_vjp", backend)(gs, gv, phi, v, d, unit, i, j, ptr, rev, wf,
                                                    bf, cutoff, kind, envelope, need_params)


@painn_message_vjp.register_fake
def _(gs, gv, phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope, need_params,
      backend):
    return (torch.empty_like(phi), torch.empty_like(v), torch.empty_like(d),
            torch.empty_like(unit), wf.new_empty(wf.shape if need_params else (0,)),
            bf.new_empty(bf.shape if need_params else (0,)))


_refuse_derivative(painn_message_vjp, "painn_message")


def painn_composite(phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope, backend):
    """painn_message from differentiable ops (materialises the [E, 7F] filter products): one
    ``gms`` over [N, 7F] x [E, 7F] gives (ds | vv-messages per axis | vs-messages per axis)."""
    nf = v.shape[2]
    basis = _radial.radial_basis(d, wf.shape[1], cutoff, kind, "none", 0, backend)
    (env,) = dense.envelope(d, cutoff, envelope, 0)
    w_s, w_vs, w_vv = dense.painn_filter(basis, env, wf, bf).split(nf, dim=1)
    p_s, p_vs, p_vv = phi.split(nf, dim=1)
    h = torch.cat([p_s, (p_vv.unsqueeze(1) * v).flatten(1), p_vs.repeat(1, 3)], 1)
    we = torch.cat([w_s, w_vv.repeat(1, 3), (unit.unsqueeze(2) * w_vs.unsqueeze(1)).flatten(1)],
                   1)
    out = gms(h.contiguous(), we.contiguous(), i, j, ptr, rev, backend)
    return out[:, :nf], (out[:, nf:4 * nf] + out[:, 4 * nf:]).view(-1, 3, nf)


def _painn_setup(ctx, inputs, output):
    phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope, backend = inputs
    ctx.save_for_backward(phi, v, d, unit, i, j, ptr, rev, wf, bf)
    ctx.args = (cutoff, kind, envelope, backend)


def _painn_backward(ctx, gs, gv):
    phi, v, d, unit, i, j, ptr, rev, wf, bf = ctx.saved_tensors
    cutoff, kind, envelope, backend = ctx.args
    needs = wanted_grads(ctx, 10)
    differentiable = (0, 1, 2, 3, 8, 9)
    result: list = [None] * 14
    gs = torch.zeros_like(phi[:, :v.shape[2]]) if gs is None else gs.contiguous()
    gv = torch.zeros_like(v) if gv is None else gv.contiguous()
    if torch.is_grad_enabled():  # the backward itself is being differentiated
        wanted = [k for k in differentiable if needs[k]]
        with torch.enable_grad():
            inputs = list(ctx.saved_tensors)
            for k in wanted:
                inputs[k] = _alias(inputs[k])
            outs = painn_composite(*inputs, cutoff, kind, envelope, backend)
            found = torch.autograd.grad(outs, [inputs[k] for k in wanted], (gs, gv),
                                        create_graph=True, allow_unused=True)
        for k, g in zip(wanted, found, strict=True):
            result[k] = g
        return tuple(result)
    need_params = needs[8] or needs[9]
    grads = painn_message_vjp(gs, gv, phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind,
                              envelope, need_params, backend)
    for k, g in zip(differentiable, grads, strict=True):
        result[k] = g if needs[k] else None
    return tuple(result)


painn_message.register_autograd(_painn_backward, setup_context=_painn_setup)
