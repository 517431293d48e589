"""Custom ops of the message-passing family (namespace ``fastff::``), fake impls and autograd.

All work over a FULL neighbor list sorted by receiver (CSR ``ptr``) with its mirror index
``rev``, so sender-side sums are receiver-side sums over mirrored edges: ``gms`` / ``ggm`` (closed
under differentiation), ``cfconv`` (SchNet's filter network inside, one filter per unordered pair
of ``pairs``, the list's ``mirror_pairs``), the tabulated ``spline_*`` ops and ``painn_message``.
Each first backward is a fused ``*_vjp`` op that computes only the gradients the running backward
uses (``wanted_grads``); each is differentiable again, through a fused op or through the same
formulas written with differentiable ops, so every order exists. What a forward keeps for its
backward (cfconv's pair filters, the first backward's products) are extra outputs of the op,
saved by its autograd. Inputs are addressed by name (``OpArgs``); every op takes the already
resolved backend. The maths, the gradients and the launcher signatures: README.md beside this
file.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastff.kernels._runtime import registry
from fastff.kernels._runtime.args import OpArgs
from fastff.kernels._runtime.autograd import (
    alias,
    refuse_derivative,
    save_inputs,
    saved_inputs,
    wanted_grads,
)
from fastff.kernels.message import dense
from fastff.kernels.neighbors import op as _neighbors
from fastff.kernels.radial import op as _radial

for _name in ("gms", "ggm", "cfconv", "cfconv_vjp", "cfconv_vjp_vjp", "spline_conv",
              "spline_edge_dot", "spline_conv_vjp", "spline_conv_positions",
              "spline_conv_positions_vjp", "painn_message", "painn_message_vjp"):
    registry.register(_name, "message", _name)
# the same torch code serves every device (one nonzero per list)
registry.register("mirror_pairs", "message", "mirror_pairs", backends=("reference",))

_WEIGHTS = ("w1", "b1", "w2", "b2")


def _save(spec: OpArgs):
    """A setup_context that keeps every input of the op (``save_inputs``)."""
    def setup_context(ctx, inputs, output):
        save_inputs(ctx, spec, inputs)
    return setup_context


def _graph(x) -> dict:
    """The list's tensors of an op's named inputs, as keyword arguments of another op."""
    return {"i": x.i, "j": x.j, "ptr": x.ptr, "rev": x.rev}


def _mirror(t: Tensor, rev: Tensor) -> Tensor:
    return t.index_select(0, rev)


def _differentiate(fn, values: dict, names, cotangents, create_graph: bool) -> dict:
    """{name: gradient} of ``sum <cotangent, output>`` over ``fn(values)``'s outputs in the
    inputs ``names`` (each a fresh graph node: ``alias``), recomputed with autograd; the
    gradient of an input no output depends on is None (a true zero)."""
    with torch.enable_grad():
        values = {k: alias(v) if k in names else v for k, v in values.items()}
        outputs = fn(values)
        pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True)
                 if o is not None and c is not None and c.numel()]
        if not pairs or not names:
            return {}
        found = torch.autograd.grad([o for o, _ in pairs], [values[k] for k in names],
                                    [c for _, c in pairs], create_graph=create_graph,
                                    allow_unused=True)
    return dict(zip(names, found, strict=True))


# ---------------------------------------------------------------- gms / ggm
@torch.library.custom_op("fastff::gms", mutates_args=())
def gms(h: Tensor, w: Tensor, i: Tensor, j: Tensor, ptr: Tensor, rev: Tensor,
        backend: str) -> Tensor:
    """out [N, F]: out[a] = sum_{e in row a} h[j_e] w_e."""
    return registry.launch("gms", GMS, locals())


@gms.register_fake
def _(h, w, i, j, ptr, rev, backend):
    return h.new_empty(ptr.shape[0] - 1, h.shape[1])


@torch.library.custom_op("fastff::ggm", mutates_args=())
def ggm(a: Tensor, b: Tensor, i: Tensor, j: Tensor, ptr: Tensor, rev: Tensor,
        backend: str) -> Tensor:
    """out [E, F]: out[e] = a[i_e] b[j_e]."""
    return registry.launch("ggm", GGM, locals())


@ggm.register_fake
def _(a, b, i, j, ptr, rev, backend):
    return a.new_empty(i.shape[0], a.shape[1])


GMS, GGM = OpArgs(gms), OpArgs(ggm)


def _gms_backward(ctx, grad):
    x, _ = saved_inputs(ctx, GMS)
    needs = GMS(ctx.needs_input_grad)
    grad = grad.contiguous()
    return GMS.grads(  # the sender side of h: rows of the mirrored edges
        h=gms(grad, _mirror(x.w, x.rev), **_graph(x), backend=x.backend) if needs.h else None,
        w=ggm(grad, x.h, **_graph(x), backend=x.backend) if needs.w else None)


def _ggm_backward(ctx, grad):
    x, _ = saved_inputs(ctx, GGM)
    needs = GGM(ctx.needs_input_grad)
    grad = grad.contiguous()
    return GGM.grads(
        a=gms(x.b, grad, **_graph(x), backend=x.backend) if needs.a else None,
        b=gms(x.a, _mirror(grad, x.rev), **_graph(x), backend=x.backend) if needs.b else None)


gms.register_autograd(_gms_backward, setup_context=_save(GMS))
ggm.register_autograd(_ggm_backward, setup_context=_save(GGM))


# ---------------------------------------------------------------- mirror pairs
@torch.library.custom_op("fastff::mirror_pairs", mutates_args=())
def mirror_pairs(i: Tensor, j: Tensor, rev: Tensor, backend: str) -> Tensor:
    """int64 [4, P]: the unordered pairs of a full list as rows (c, m, a, b) (canonical edge,
    its mirror, their ends; ``dense.mirror_pairs``). P depends on the data: under
    torch.compile it is a new symbolic size."""
    return registry.launch("mirror_pairs", MIRROR_PAIRS, locals())


@mirror_pairs.register_fake
def _(i, j, rev, backend):
    return i.new_empty(4, torch.library.get_ctx().new_dynamic_size())


MIRROR_PAIRS = OpArgs(mirror_pairs)


def _kept_like(like: Tensor, pairs: Tensor, budget: int) -> Tensor:
    """The fake of a kept [P, F] tensor (an empty [0, F] when not kept), decided as
    ``dense.keeps`` decides, from shapes; where symbolic shapes cannot tell without a guard on
    P, a new symbolic size (the real op then returns either)."""
    # imported here: symbolic_shapes brings sympy (about 1 s), needed only while tracing
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    num_pairs, nf = pairs.shape[1], like.shape[1]
    if budget <= 0:
        return like.new_empty(0, nf)
    nbytes = num_pairs * nf * like.element_size()
    if statically_known_true(nbytes <= budget):
        return like.new_empty(num_pairs, nf)
    if statically_known_true(nbytes > budget):
        return like.new_empty(0, nf)
    return like.new_empty(torch.library.get_ctx().new_dynamic_size(), nf)


# ---------------------------------------------------------------- cfconv
@torch.library.custom_op("fastff::cfconv", mutates_args=())
def cfconv(x: Tensor, d: Tensor, i: Tensor, j: Tensor, ptr: Tensor, rev: Tensor, pairs: Tensor,
           w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, cutoff: float, kind: str,
           envelope: str, activation: str, keep_filters: bool, keep_budget: int,
           backend: str) -> tuple[Tensor, Tensor]:
    """(out [N, F], filters): out[a] = sum_{e in row a} x[j_e] (W(d_e) + W(d_rev e)) / 2;
    filters are the pair filters [P, F] when ``keep_filters`` and they fit in ``keep_budget``
    bytes (the backward's x-gradient reads them), else an empty [0, F]. ``keep_budget`` also
    bounds what a differentiated backward keeps (``cfconv_vjp``)."""
    return registry.launch("cfconv", CFCONV, locals())


@cfconv.register_fake
def _(x, d, i, j, ptr, rev, pairs, w1, b1, w2, b2, cutoff, kind, envelope, activation,
      keep_filters, keep_budget, backend):
    return (x.new_empty(ptr.shape[0] - 1, x.shape[1]),
            _kept_like(x, pairs, keep_budget if keep_filters else 0))


@torch.library.custom_op("fastff::cfconv_vjp", mutates_args=())
def cfconv_vjp(g: Tensor, x: Tensor, d: Tensor, i: Tensor, j: Tensor, ptr: Tensor, rev: Tensor,
               pairs: Tensor, filters: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
               cutoff: float, kind: str, envelope: str, activation: str, need_params: bool,
               need_x: bool, need_d: bool, keep_budget: int, backend: str
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_d, grad_w1, grad_b1, grad_w2, grad_b2, products) of sum <g, cfconv(x, d)>:
    grad_x (= cfconv(g, d), from the forward's ``filters`` when kept) empty [0] unless need_x,
    grad_d unless need_d, the parameters' unless need_params; products are every pair's
    t = u w2 [P, F] when they fit in ``keep_budget`` bytes (``cfconv_vjp_vjp`` reads them),
    else an empty [0, F]."""
    return registry.launch("cfconv_vjp", CFCONV_VJP, locals())


@cfconv_vjp.register_fake
def _(g, x, d, i, j, ptr, rev, pairs, filters, w1, b1, w2, b2, cutoff, kind, envelope,
      activation, need_params, need_x, need_d, keep_budget, backend):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            d.new_empty(d.shape[0] if need_d else 0),
            *(torch.empty_like(p) if need_params else d.new_empty(0) for p in (w1, b1, w2, b2)),
            _kept_like(g, pairs, keep_budget))


@torch.library.custom_op("fastff::cfconv_vjp_vjp", mutates_args=())
def cfconv_vjp_vjp(v: Tensor, g: Tensor, x: Tensor, d: Tensor, i: Tensor, j: Tensor, ptr: Tensor,
                   rev: Tensor, pairs: Tensor, products: Tensor, w1: Tensor, b1: Tensor,
                   w2: Tensor, b2: Tensor, cutoff: float, kind: str, envelope: str,
                   activation: str, need_g: bool, need_x: bool, need_params: bool, need_d: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_g, grad_x, grad_d, grad_w1, grad_b1, grad_w2, grad_b2) of sum_e v_e grad_d_e,
    grad_d = cfconv_vjp(g, x, d, ...)'s: the second backward of force training. grad_g, grad_x
    and grad_d are empty [0] unless need_g / need_x / need_d, the parameters' unless
    need_params; ``products`` are cfconv_vjp's (or an empty [0, F]: recomputed)."""
    return registry.launch("cfconv_vjp_vjp", CFCONV_VJP_VJP, locals())


@cfconv_vjp_vjp.register_fake
def _(v, g, x, d, i, j, ptr, rev, pairs, products, w1, b1, w2, b2, cutoff, kind, envelope,
      activation, need_g, need_x, need_params, need_d, backend):
    return (torch.empty_like(g) if need_g else g.new_empty(0),
            torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(d) if need_d else d.new_empty(0),
            *(torch.empty_like(p) if need_params else d.new_empty(0) for p in (w1, b1, w2, b2)))


CFCONV, CFCONV_VJP, CFCONV_VJP_VJP = OpArgs(cfconv), OpArgs(cfconv_vjp), OpArgs(cfconv_vjp_vjp)


def _weights(x) -> dict:
    return {name: getattr(x, name) for name in _WEIGHTS}


def _settings(x) -> dense.FilterSettings:
    """The filter network's settings of any cfconv op's named inputs."""
    return dense.FilterSettings(*(getattr(x, name) for name in dense.FilterSettings._fields))


def _filter(x) -> dict:
    """The filter network's settings of an op's named inputs, as keyword arguments."""
    return _settings(x)._asdict()


def composite_vjp(g, x, d, i, j, ptr, rev, w1, b1, w2, b2, settings: dense.FilterSettings,
                  need_params: bool, backend: str):
    """The (d, parameter) gradients of cfconv from differentiable ops (materialises [E, F]):
    (grad_d, grad_w1, grad_b1, grad_w2, grad_b2), the parameter gradients None unless
    ``need_params``. cfconv's filter is the mirror mean (W(d_e) + W(d_rev e)) / 2, so its loss
    is sum_e <(u_e + u_rev(e)) / 2, W(d_e)> with u = ggm(g, x), and u_rev(e) = ggm(x, g)_e."""
    num_basis = w1.shape[1]
    cutoff, kind = settings.cutoff, settings.kind
    basis = _radial.radial_basis(d, num_basis, cutoff, kind, "none", 0, backend)
    slope = _radial.radial_basis(d, num_basis, cutoff, kind, "none", 1, backend)
    env, env_slope = dense.envelope(d, cutoff, settings.envelope, 1)
    # u + u_rev in place (ggm's backward reads its inputs only), and the 1/2 on the outputs (the
    # gradients are linear in u)
    u = ggm(g, x, i, j, ptr, rev, backend).add_(ggm(x, g, i, j, ptr, rev, backend))
    gd, *gp, _ = dense.filter_vjp(u, basis, slope, env, env_slope, w1, b1, w2, b2,
                                  settings.activation, need_params)
    return 0.5 * gd, *(None if t is None else 0.5 * t for t in gp)


def _cfconv_setup(ctx, inputs, output):
    _, filters = output
    ctx.mark_non_differentiable(filters)
    ctx.set_materialize_grads(False)
    save_inputs(ctx, CFCONV, inputs, extra=(filters,))


def _cfconv_backward(ctx, grad, _grad_filters):
    x, (filters,) = saved_inputs(ctx, CFCONV)
    if grad is None:
        return CFCONV.grads()
    grad = grad.contiguous()
    needs = CFCONV(wanted_grads(ctx, ctx.tensor_slots))  # forces: no weight gradients
    need_params = any(getattr(needs, name) for name in _WEIGHTS)
    create_graph = torch.is_grad_enabled()
    # the pair filter is symmetric, so the x-gradient (a sum over senders) is the op on grad;
    # with create_graph (force training) it stays a separate cfconv, so that cfconv_vjp's own
    # backward sees the distance gradient's cotangent alone (its fused path)
    fused_x = needs.x and not create_graph
    grads: dict = {}
    if needs.d or need_params:  # one pass: the hidden layer serves the x- and d-gradients
        gx, gd, *gp, _ = cfconv_vjp(
            grad, x.x, x.d, **_graph(x), pairs=x.pairs, filters=filters, **_weights(x),
            **_filter(x), need_params=need_params, need_x=fused_x, need_d=needs.d,
            keep_budget=x.keep_budget if create_graph else 0, backend=x.backend)
        grads.update(x=gx if fused_x else None, d=gd if needs.d else None)
        grads.update({name: t for name, t in zip(_WEIGHTS, gp, strict=True)
                      if need_params and getattr(needs, name)})
    if needs.x and grads.get("x") is None:
        grads["x"], _ = cfconv(grad, x.d, **_graph(x), pairs=x.pairs, **_weights(x),
                               **_filter(x), keep_filters=grad.requires_grad,
                               keep_budget=x.keep_budget, backend=x.backend)
    return CFCONV.grads(**grads)


cfconv.register_autograd(_cfconv_backward, setup_context=_cfconv_setup)


def _cfconv_vjp_setup(ctx, inputs, output):
    *_, products = output
    ctx.mark_non_differentiable(products)
    ctx.set_materialize_grads(False)  # None for the outputs nobody used: no zero tensors
    save_inputs(ctx, CFCONV_VJP, inputs, extra=(products,))


_VJP_OUT = ("x", "d", *_WEIGHTS)  # the inputs whose gradients cfconv_vjp returns, in order
_VJP_IN = ("g", "x", "d", *_WEIGHTS)  # cfconv_vjp's differentiable inputs


def _cfconv_vjp_backward(ctx, ggx, ggd, ggw1, ggb1, ggw2, ggb2, _gproducts):
    """Force training differentiates the distance gradient alone (its cotangent ggd): the fused
    ``cfconv_vjp_vjp``. Any other use (cotangents on grad_x or the parameter gradients, or a
    graph for a third derivative) runs autograd through the same gradients written with
    differentiable ops, recomputed."""
    x, (products,) = saved_inputs(ctx, CFCONV_VJP)
    cotangents = (ggx, ggd, ggw1, ggb1, ggw2, ggb2)
    others = [t for t in (ggx, ggw1, ggb1, ggw2, ggb2) if t is not None and t.numel()]
    if ggd is None and not others:
        return CFCONV_VJP.grads()
    create_graph = torch.is_grad_enabled()
    if not others and not create_graph:
        # force training wants the weights' gradients, not the distances' (the positions')
        wanted = CFCONV_VJP(wanted_grads(ctx, ctx.tensor_slots))
        grads = cfconv_vjp_vjp(
            ggd.contiguous(), x.g, x.x, x.d, **_graph(x), pairs=x.pairs, products=products,
            **_weights(x), **_filter(x), need_g=wanted.g, need_x=wanted.x,
            need_params=any(getattr(wanted, name) for name in _WEIGHTS), need_d=wanted.d,
            backend=x.backend)
        return CFCONV_VJP.grads(**{name: t for name, t in zip(_VJP_IN, grads, strict=True)
                                   if getattr(wanted, name)})
    needs = CFCONV_VJP(ctx.needs_input_grad)

    def gradients(v):
        outputs = [None] * len(cotangents)
        if ggd is not None or x.need_params:
            gd, *gp = composite_vjp(v["g"], v["x"], v["d"], x.i, x.j, x.ptr, x.rev, v["w1"],
                                    v["b1"], v["w2"], v["b2"],
                                    _settings(x), x.need_params,
                                    x.backend)
            outputs[1:] = [gd, *gp]
        if x.need_x and ggx is not None:
            outputs[0], _ = cfconv(v["g"], v["d"], **_graph(x), pairs=x.pairs, w1=v["w1"],
                                   b1=v["b1"], w2=v["w2"], b2=v["b2"], **_filter(x),
                                   keep_filters=False, keep_budget=0, backend=x.backend)
        return outputs

    values = {name: getattr(x, name) for name in _VJP_IN}
    wanted = [name for name in _VJP_IN if getattr(needs, name)]
    return CFCONV_VJP.grads(**_differentiate(gradients, values, wanted, cotangents,
                                             create_graph))


cfconv_vjp.register_autograd(_cfconv_vjp_backward, setup_context=_cfconv_vjp_setup)


def _cfconv_vjp_vjp_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    save_inputs(ctx, CFCONV_VJP_VJP, inputs)


def _cfconv_vjp_vjp_backward(ctx, *cotangents):
    """Third order and beyond (rare: the Hessian of a force loss, say): autograd twice through
    the d-gradient written with differentiable ops (``composite_vjp``), recomputed."""
    x, _ = saved_inputs(ctx, CFCONV_VJP_VJP)
    needs = CFCONV_VJP_VJP(ctx.needs_input_grad)
    names = ("v", *_VJP_IN)

    def gradients(v):
        grad_d, *_ = composite_vjp(v["g"], v["x"], v["d"], x.i, x.j, x.ptr, x.rev, v["w1"],
                                   v["b1"], v["w2"], v["b2"],
                                   _settings(x), False, x.backend)
        return torch.autograd.grad(grad_d, [v[name] for name in _VJP_IN], v["v"],
                                   create_graph=True, allow_unused=True)

    values = {name: getattr(x, name) for name in names}
    # every input a fresh node: the inner gradient is taken in all of them
    with torch.enable_grad():
        values = {name: alias(t) for name, t in values.items()}
    wanted = [name for name in names if getattr(needs, name)]
    return CFCONV_VJP_VJP.grads(**_differentiate(gradients, values, wanted, cotangents,
                                                 torch.is_grad_enabled()))


cfconv_vjp_vjp.register_autograd(_cfconv_vjp_vjp_backward, setup_context=_cfconv_vjp_vjp_setup)


# ---------------------------------------------------------------- tabulated filter
@torch.library.custom_op("fastff::spline_conv", mutates_args=())
def spline_conv(x: Tensor, d: Tensor, scale: Tensor | None, coeffs: Tensor, i: Tensor, j: Tensor,
                ptr: Tensor, rev: Tensor, cutoff: float, order: int, backend: str) -> Tensor:
    """out [N, F]: out[a] = sum_{e in row a} scale_e x[j_e] W^(order)(d_e) (scale optional)."""
    return registry.launch("spline_conv", SPLINE_CONV, locals())


@spline_conv.register_fake
def _(x, d, scale, coeffs, i, j, ptr, rev, cutoff, order, backend):
    return x.new_empty(ptr.shape[0] - 1, x.shape[1])


@torch.library.custom_op("fastff::spline_edge_dot", mutates_args=())
def spline_edge_dot(g: Tensor, x: Tensor, d: Tensor, coeffs: Tensor, i: Tensor, j: Tensor,
                    ptr: Tensor, rev: Tensor, cutoff: float, order: int, backend: str) -> Tensor:
    """out [E]: out[e] = <g[i_e] x[j_e], W^(order)(d_e)>."""
    return registry.launch("spline_edge_dot", SPLINE_EDGE_DOT, locals())


@spline_edge_dot.register_fake
def _(g, x, d, coeffs, i, j, ptr, rev, cutoff, order, backend):
    return d.new_empty(d.shape[0])


@torch.library.custom_op("fastff::spline_conv_vjp", mutates_args=())
def spline_conv_vjp(grad: Tensor, x: Tensor, d: Tensor, d_rev: Tensor, coeffs: Tensor, i: Tensor,
                    j: Tensor, ptr: Tensor, rev: Tensor, cutoff: float, order: int,
                    backend: str) -> tuple[Tensor, Tensor]:
    """(spline_conv(grad, d_rev, None, order), spline_edge_dot(grad, x, d, order + 1)) in one
    pass: each edge's table interval is read once for both (README.md)."""
    return registry.launch("spline_conv_vjp", SPLINE_CONV_VJP, locals())


@spline_conv_vjp.register_fake
def _(grad, x, d, d_rev, coeffs, i, j, ptr, rev, cutoff, order, backend):
    return grad.new_empty(ptr.shape[0] - 1, grad.shape[1]), d.new_empty(d.shape[0])


SPLINE_CONV, SPLINE_EDGE_DOT = OpArgs(spline_conv), OpArgs(spline_edge_dot)
SPLINE_CONV_VJP = OpArgs(spline_conv_vjp)


def _table(x) -> dict:
    """The table and the list of a spline op's named inputs, as keyword arguments."""
    return {"coeffs": x.coeffs, **_graph(x), "cutoff": x.cutoff, "backend": x.backend}


def _no_table_grad(needs_coeffs: bool) -> None:
    if needs_coeffs:
        raise RuntimeError("a tabulated filter (spline coeffs) has no gradient: tables are for "
                           "inference; train with the MLP filter")


def _conv_vjp_backward(ctx, grad_gx, grad_gd):
    """Autograd through the unfused pair, recomputed: every derivative order of the pair exists,
    and with create_graph the result stays connected to the saved inputs."""
    x, _ = saved_inputs(ctx, SPLINE_CONV_VJP)
    needs = SPLINE_CONV_VJP(ctx.needs_input_grad)
    _no_table_grad(needs.coeffs)

    def pair(v):
        return (spline_conv(v["grad"], v["d_rev"], None, order=x.order, **_table(x)),
                spline_edge_dot(v["grad"], v["x"], v["d"], order=x.order + 1, **_table(x)))

    values = {name: getattr(x, name) for name in ("grad", "x", "d", "d_rev")}
    wanted = [name for name in values if getattr(needs, name)]
    return SPLINE_CONV_VJP.grads(**_differentiate(pair, values, wanted, (grad_gx, grad_gd),
                                                  torch.is_grad_enabled()))


def _spline_conv_backward(ctx, grad):
    x, _ = saved_inputs(ctx, SPLINE_CONV)
    needs = SPLINE_CONV(wanted_grads(ctx, ctx.tensor_slots))
    _no_table_grad(needs.coeffs)
    grad = grad.contiguous()
    if x.scale is None and needs.x and needs.d:  # forces: both halves in one pass
        gx, gd = spline_conv_vjp(grad, x.x, x.d, _mirror(x.d, x.rev), order=x.order,
                                 **_table(x))
        return SPLINE_CONV.grads(x=gx, d=gd)
    grads = {}
    if needs.x:
        scale = None if x.scale is None else _mirror(x.scale, x.rev)
        grads["x"] = spline_conv(grad, _mirror(x.d, x.rev), scale, order=x.order, **_table(x))
    if needs.d:
        gd = spline_edge_dot(grad, x.x, x.d, order=x.order + 1, **_table(x))
        grads["d"] = gd if x.scale is None else gd * x.scale
    if x.scale is not None and needs.scale:
        grads["scale"] = spline_edge_dot(grad, x.x, x.d, order=x.order, **_table(x))
    return SPLINE_CONV.grads(**grads)


def _edge_dot_backward(ctx, grad):
    x, _ = saved_inputs(ctx, SPLINE_EDGE_DOT)
    needs = SPLINE_EDGE_DOT(ctx.needs_input_grad)
    _no_table_grad(needs.coeffs)
    grad = grad.contiguous()
    grads = {}
    if needs.g:
        grads["g"] = spline_conv(x.x, x.d, grad, order=x.order, **_table(x))
    if needs.x:
        grads["x"] = spline_conv(x.g, _mirror(x.d, x.rev), _mirror(grad, x.rev), order=x.order,
                                 **_table(x))
    if needs.d:
        grads["d"] = grad * spline_edge_dot(x.g, x.x, x.d, order=x.order + 1, **_table(x))
    return SPLINE_EDGE_DOT.grads(**grads)


spline_conv.register_autograd(_spline_conv_backward, setup_context=_save(SPLINE_CONV))
spline_edge_dot.register_autograd(_edge_dot_backward, setup_context=_save(SPLINE_EDGE_DOT))
spline_conv_vjp.register_autograd(_conv_vjp_backward, setup_context=_save(SPLINE_CONV_VJP))


# ---------------------------------------------------------------- tabulated filter from positions
@torch.library.custom_op("fastff::spline_conv_positions", mutates_args=())
def spline_conv_positions(x: Tensor, positions: Tensor, cells: Tensor, atom_system: Tensor | None,
                          i: Tensor, j: Tensor, shifts: Tensor, ptr: Tensor, coeffs: Tensor,
                          cutoff: float, backend: str) -> Tensor:
    """out[a] = sum_{e in row a} x[j_e] W(|r_e|), r_e = positions[j] - positions[i] + S @ cell,
    over a full list in which every pair has its mirror (fastff.neighbor_list's)."""
    return registry.launch("spline_conv_positions", SPLINE_CONV_POSITIONS, locals())


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
    return registry.launch("spline_conv_positions_vjp", SPLINE_CONV_POSITIONS_VJP, locals())


@spline_conv_positions_vjp.register_fake
def _(grad, x, positions, cells, atom_system, i, j, shifts, ptr, coeffs, cutoff, need_x,
      need_cell, backend):
    return (x.new_empty(x.shape if need_x else (0,)), torch.empty_like(positions),
            cells.new_empty(cells.shape if need_cell else (0,)))


SPLINE_CONV_POSITIONS = OpArgs(spline_conv_positions)
SPLINE_CONV_POSITIONS_VJP = OpArgs(spline_conv_positions_vjp)
refuse_derivative(spline_conv_positions_vjp, "spline_conv_positions")


def spline_conv_positions_composite(x, positions, cells, atom_system, i, j, shifts, ptr, coeffs,
                                    cutoff, backend):
    """spline_conv_positions from differentiable ops (pair_vectors, the norm, spline_conv)."""
    vectors = _neighbors.pair_vectors(positions, cells, atom_system, i, j, shifts, backend)
    d = torch.linalg.vector_norm(vectors, dim=1)
    rev = _neighbors.neighbor_reverse(i, j, shifts, ptr, backend)
    return spline_conv(x, d, None, coeffs, i, j, ptr, rev, cutoff, 0, backend)


def _positions_backward(ctx, grad):
    x, _ = saved_inputs(ctx, SPLINE_CONV_POSITIONS)
    needs = SPLINE_CONV_POSITIONS(wanted_grads(ctx, ctx.tensor_slots))
    _no_table_grad(needs.coeffs)
    grad = grad.contiguous()
    inputs = x._asdict()
    if torch.is_grad_enabled():  # the backward itself is being differentiated

        def conv(v):
            return (spline_conv_positions_composite(**v),)

        wanted = [name for name in ("x", "positions", "cells") if getattr(needs, name)]
        return SPLINE_CONV_POSITIONS.grads(**_differentiate(conv, inputs, wanted, (grad,), True))
    if not (needs.positions or needs.cells):  # the x-gradient alone: the same op (mirror pairs)
        return SPLINE_CONV_POSITIONS.grads(x=spline_conv_positions(**{**inputs, "x": grad}))
    gx, gpos, gcell = spline_conv_positions_vjp(grad=grad, **inputs, need_x=needs.x,
                                                need_cell=needs.cells)
    return SPLINE_CONV_POSITIONS.grads(x=gx if needs.x else None,
                                       positions=gpos if needs.positions else None,
                                       cells=gcell if needs.cells else None)


spline_conv_positions.register_autograd(_positions_backward,
                                        setup_context=_save(SPLINE_CONV_POSITIONS))


# ---------------------------------------------------------------- PaiNN message
@torch.library.custom_op("fastff::painn_message", mutates_args=())
def painn_message(phi: Tensor, v: Tensor, d: Tensor, unit: Tensor, i: Tensor, j: Tensor,
                  ptr: Tensor, rev: Tensor, wf: Tensor, bf: Tensor, cutoff: float, kind: str,
                  envelope: str, backend: str) -> tuple[Tensor, Tensor]:
    """(ds [N, F], dv [N, 3, F]) for phi [N, 3F] (s | vs | vv blocks), v [N, 3, F], d [E],
    unit [E, 3] and the filter W(d) = u(d) (wf b(d) + bf), wf [3F, K]."""
    return registry.launch("painn_message", PAINN_MESSAGE, locals())


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
    return registry.launch("painn_message_vjp", PAINN_MESSAGE_VJP, locals())


@painn_message_vjp.register_fake
def _(gs, gv, phi, v, d, unit, i, j, ptr, rev, wf, bf, cutoff, kind, envelope, need_params,
      backend):
    return (torch.empty_like(phi), torch.empty_like(v), torch.empty_like(d),
            torch.empty_like(unit), wf.new_empty(wf.shape if need_params else (0,)),
            bf.new_empty(bf.shape if need_params else (0,)))


PAINN_MESSAGE, PAINN_MESSAGE_VJP = OpArgs(painn_message), OpArgs(painn_message_vjp)
refuse_derivative(painn_message_vjp, "painn_message")
_PAINN_IN = ("phi", "v", "d", "unit", "wf", "bf")  # differentiable inputs, in vjp output order


def painn_composite(phi, v, d, unit, i, j, ptr, rev, wf, bf, settings: dense.RadialSettings,
                    backend):
    """painn_message from differentiable ops (materialises the [E, 7F] filter products): one
    ``gms`` over [N, 7F] x [E, 7F] gives (ds | vv-messages per axis | vs-messages per axis)."""
    nf = v.shape[2]
    basis = _radial.radial_basis(d, wf.shape[1], settings.cutoff, settings.kind, "none", 0,
                                 backend)
    (env,) = dense.envelope(d, settings.cutoff, settings.envelope, 0)
    w_s, w_vs, w_vv = dense.painn_filter(basis, env, wf, bf).split(nf, dim=1)
    p_s, p_vs, p_vv = phi.split(nf, dim=1)
    h = torch.cat([p_s, (p_vv.unsqueeze(1) * v).flatten(1), p_vs.repeat(1, 3)], 1)
    we = torch.cat([w_s, w_vv.repeat(1, 3), (unit.unsqueeze(2) * w_vs.unsqueeze(1)).flatten(1)],
                   1)
    out = gms(h.contiguous(), we.contiguous(), i, j, ptr, rev, backend)
    return out[:, :nf], (out[:, nf:4 * nf] + out[:, 4 * nf:]).view(-1, 3, nf)


def _painn_backward(ctx, gs, gv):
    x, _ = saved_inputs(ctx, PAINN_MESSAGE)
    needs = PAINN_MESSAGE(wanted_grads(ctx, ctx.tensor_slots))
    nf = x.v.shape[2]
    gs = x.phi.new_zeros(x.phi.shape[0], nf) if gs is None else gs.contiguous()
    gv = torch.zeros_like(x.v) if gv is None else gv.contiguous()
    settings = PAINN_MESSAGE.settings(x, dense.RadialSettings)
    if torch.is_grad_enabled():  # the backward itself is being differentiated

        def message(v):
            return painn_composite(v["phi"], v["v"], v["d"], v["unit"], x.i, x.j, x.ptr, x.rev,
                                   v["wf"], v["bf"], settings, x.backend)

        values = {name: getattr(x, name) for name in _PAINN_IN}
        wanted = [name for name in _PAINN_IN if getattr(needs, name)]
        return PAINN_MESSAGE.grads(**_differentiate(message, values, wanted, (gs, gv), True))
    grads = painn_message_vjp(gs, gv, x.phi, x.v, x.d, x.unit, **_graph(x), wf=x.wf, bf=x.bf,
                              **settings._asdict(), need_params=needs.wf or needs.bf,
                              backend=x.backend)
    return PAINN_MESSAGE.grads(**{name: t for name, t in zip(_PAINN_IN, grads, strict=True)
                                  if getattr(needs, name)})


painn_message.register_autograd(_painn_backward, setup_context=_save(PAINN_MESSAGE))
