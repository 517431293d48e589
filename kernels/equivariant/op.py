"""Custom ops of the equivariant family (namespace ``fastff::``), fake impls and autograd.

* ``spherical_harmonics`` (e3nn's real harmonics of the unit vector, l <= 3, "component"
  normalisation). Its backward is ``spherical_harmonics_vjp``, whose backward in the gradient
  is ``spherical_harmonics_jvp`` (and the jvp's is the vjp); their derivatives in the vectors
  (second derivatives of Y, only a Hessian of the energy needs them) run autograd through the
  torch formulas of reference.py: every order exists.
* ``tp_conv`` (the channelwise tensor-product convolution), ``tp_conv_sender`` (its x-gradient)
  and ``tp_conv_vjp`` (its x-, y- and w-gradients in one pass) are partial contractions of one
  4-linear form F(g, x, y, w) = sum_e <g[receiver], w_e (x[sender] (x) y_e)>, each leaving
  arguments free. The derivative of any of them in any argument is another of them with the
  cotangent put in its argument's place: the set is closed, every order is exact and fused.
* ``radial_spline`` (a cubic table of the per-edge radial weights as a function of the
  distance, at any derivative order) and ``radial_spline_vjp`` (the distance gradient without
  forming the [E, F] derivative): the derivative of each at order n is the pair at order n + 1,
  and order >= 4 is exactly zero, so every order exists. The table itself has no gradient.
* ``tp_conv_spline``: ``tp_conv`` with the edge weights read from such a table inside the
  edge loop (no [E, P, C] tensor). Its backward without a graph is the fused
  ``tp_conv_spline_vjp`` (x-, y- and distance gradients in one pass; the senders' pass
  re-reads the table); with a graph (a Hessian), autograd through ``radial_spline`` and the
  tp ops, every order. ``tp_conv_spline_vjp`` itself refuses to be differentiated.
* ``silu_term`` (a * b * silu^(n)(x), the radial network's activation and every derivative of
  it in one pass each): its derivative in a factor is the op with the cotangent in the
  factor's place, in x the op at order n + 1; closed, any order.
* ``symmetric_contraction`` (per atom, a polynomial of degree <= 3 in the atom's features with
  its element's coefficients), its backward ``symmetric_contraction_vjp`` and that one's
  backward ``symmetric_contraction_vjp_vjp`` (force training); beyond that, autograd through the
  torch formulas of reference.py, recomputed.

Every op takes the already resolved backend name (see fastff.kernels._runtime.registry); only
this file knows all three paths. Backwards compute only the gradients the running backward
uses (``wanted_grads``). Maths in README.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastff.kernels._runtime import registry
from fastff.kernels._runtime.args import OpArgs
from fastff.kernels._runtime.autograd import wanted_grads
from fastff.kernels.equivariant import reference

# ops with a Triton kernel (gpu_triton.py); the others run the reference when the backend is
# triton (registry.launcher), and fastff.backends() says so
_TRITON = ("spherical_harmonics", "spherical_harmonics_vjp", "spherical_harmonics_jvp",
           "tp_conv", "tp_conv_sender", "tp_conv_vjp", "tp_conv_spline", "tp_conv_spline_vjp",
           "symmetric_contraction", "symmetric_contraction_vjp", "symmetric_contraction_vjp_vjp")
for _name in ("spherical_harmonics", "spherical_harmonics_vjp", "spherical_harmonics_jvp",
              "tp_conv", "tp_conv_sender", "tp_conv_vjp", "symmetric_contraction",
              "symmetric_contraction_vjp", "symmetric_contraction_vjp_vjp", "radial_spline",
              "radial_spline_vjp", "tp_conv_spline", "tp_conv_spline_vjp", "silu_term"):
    registry.register(_name, "equivariant", _name,
                      backends=("numba", "triton", "reference") if _name in _TRITON
                      else ("numba", "reference"))


# ---------------------------------------------------------------- saving named inputs
def _save(ctx, spec: OpArgs, inputs) -> None:
    """Keep every input of the call (tensors through save_for_backward) for ``_restore``."""
    ctx.set_materialize_grads(False)
    slots = spec.tensor_slots(inputs)
    ctx.tensor_slots = slots
    ctx.others = {k: v for k, v in enumerate(inputs) if not isinstance(v, Tensor)}
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(*(inputs[k] for k in slots))


def _restore(ctx, spec: OpArgs):
    """The call's inputs by name, and which inputs' gradients the running backward uses."""
    values: list = [None] * ctx.num_inputs
    for k, v in ctx.others.items():
        values[k] = v
    for k, t in zip(ctx.tensor_slots, ctx.saved_tensors, strict=True):
        values[k] = t
    return spec(values), spec(wanted_grads(ctx, ctx.tensor_slots))


def _alias(t: Tensor) -> Tensor:
    """A fresh graph node for t (a view: gradients still reach t)."""
    return t.view_as(t) if t.requires_grad else t.detach().requires_grad_(True)


def _composite(fn, inputs, names, cotangents) -> dict[str, Tensor]:
    """{name: d/d(input) sum <cotangent, fn(inputs)>} by autograd through ``fn`` (torch ops),
    with a graph when the caller builds one: every derivative order exists."""
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        aliased = {n: _alias(getattr(inputs, n)) for n in names}
        outputs = fn(inputs._replace(**aliased))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True)
                 if c is not None and o.numel() and o.requires_grad]
        if not pairs:
            return {}
        found = torch.autograd.grad([o for o, _ in pairs], list(aliased.values()),
                                    [c for _, c in pairs], create_graph=create,
                                    allow_unused=True)
    return {n: g for n, g in zip(names, found, strict=True) if g is not None}


def _add(result: dict, name: str, value: Tensor | None) -> None:
    if value is not None:
        result[name] = value if name not in result else result[name] + value


# ---------------------------------------------------------------- spherical harmonics
@torch.library.custom_op("fastff::spherical_harmonics", mutates_args=())
def spherical_harmonics(vectors: Tensor, lmax: int, backend: str) -> Tensor:
    """Y(v / |v|) [E, (lmax+1)^2] (e3nn order, "component" normalisation)."""
    return registry.launch("spherical_harmonics", SPHERICAL_HARMONICS, locals())


@spherical_harmonics.register_fake
def _(vectors, lmax, backend):
    return vectors.new_empty(vectors.shape[0], (lmax + 1) ** 2)


@torch.library.custom_op("fastff::spherical_harmonics_vjp", mutates_args=())
def spherical_harmonics_vjp(grad: Tensor, vectors: Tensor, lmax: int, backend: str) -> Tensor:
    """sum_m grad[e, m] dY_m/dv [E, 3]."""
    return registry.launch("spherical_harmonics_vjp", SPHERICAL_HARMONICS_VJP, locals())


@spherical_harmonics_vjp.register_fake
def _(grad, vectors, lmax, backend):
    return torch.empty_like(vectors)


@torch.library.custom_op("fastff::spherical_harmonics_jvp", mutates_args=())
def spherical_harmonics_jvp(tangent: Tensor, vectors: Tensor, lmax: int, backend: str) -> Tensor:
    """dY/dv . tangent [E, (lmax+1)^2]."""
    return registry.launch("spherical_harmonics_jvp", SPHERICAL_HARMONICS_JVP, locals())


@spherical_harmonics_jvp.register_fake
def _(tangent, vectors, lmax, backend):
    return vectors.new_empty(vectors.shape[0], (lmax + 1) ** 2)


SPHERICAL_HARMONICS = OpArgs(spherical_harmonics)
SPHERICAL_HARMONICS_VJP = OpArgs(spherical_harmonics_vjp)
SPHERICAL_HARMONICS_JVP = OpArgs(spherical_harmonics_jvp)


def _sh_setup(spec):
    return lambda ctx, inputs, output: _save(ctx, spec, inputs)


def _sh_backward(ctx, grad):
    x, want = _restore(ctx, SPHERICAL_HARMONICS)
    if grad is None or not want.vectors:
        return SPHERICAL_HARMONICS.grads()
    return SPHERICAL_HARMONICS.grads(
        vectors=spherical_harmonics_vjp(grad.contiguous(), x.vectors, x.lmax, x.backend))


def _sh_vjp_backward(ctx, cot):
    x, want = _restore(ctx, SPHERICAL_HARMONICS_VJP)
    if cot is None:
        return SPHERICAL_HARMONICS_VJP.grads()
    result = {}
    if want.grad:
        result["grad"] = spherical_harmonics_jvp(cot.contiguous(), x.vectors, x.lmax, x.backend)
    if want.vectors:  # second derivatives of Y: autograd through the torch formulas
        result |= _composite(lambda t: reference.spherical_harmonics_vjp(t.grad, t.vectors,
                                                                         t.lmax),
                             x, ("vectors",), (cot,))
    return SPHERICAL_HARMONICS_VJP.grads(**result)


def _sh_jvp_backward(ctx, cot):
    x, want = _restore(ctx, SPHERICAL_HARMONICS_JVP)
    if cot is None:
        return SPHERICAL_HARMONICS_JVP.grads()
    result = {}
    if want.tangent:
        result["tangent"] = spherical_harmonics_vjp(cot.contiguous(), x.vectors, x.lmax,
                                                    x.backend)
    if want.vectors:
        result |= _composite(lambda t: reference.spherical_harmonics_jvp(t.tangent, t.vectors,
                                                                         t.lmax),
                             x, ("vectors",), (cot,))
    return SPHERICAL_HARMONICS_JVP.grads(**result)


spherical_harmonics.register_autograd(_sh_backward, setup_context=_sh_setup(SPHERICAL_HARMONICS))
spherical_harmonics_vjp.register_autograd(_sh_vjp_backward,
                                          setup_context=_sh_setup(SPHERICAL_HARMONICS_VJP))
spherical_harmonics_jvp.register_autograd(_sh_jvp_backward,
                                          setup_context=_sh_setup(SPHERICAL_HARMONICS_JVP))


# ---------------------------------------------------------------- tensor-product convolution
@torch.library.custom_op("fastff::tp_conv", mutates_args=())
def tp_conv(x: Tensor, y: Tensor, w: Tensor, senders: Tensor, receivers: Tensor,
            by_receiver: Tensor, receiver_ptr: Tensor, by_sender: Tensor, sender_ptr: Tensor,
            w_row: Tensor, w_partner: Tensor, coupling: Tensor, out_path: Tensor,
            backend: str) -> Tensor:
    """out[r, b, c] = sum_{e: receivers_e = r} w[row_e, out_path[b], c]
    sum_{a, m} coupling[a, m, b] x[senders_e, a, c] y[e, m], [N, Dout, C].

    row_e is w_row[e], or e when w_row is empty. A row of w may serve two edges (an edge and
    its mirror have one distance, so one radial weight row): w_partner[e] is the other edge
    reading w_row[e], or -1 (empty with an empty w_row); the kernels use it to sum a shared
    row's gradient without two threads writing it (README.md, Shared weight rows)."""
    return registry.launch("tp_conv", TP_CONV, locals())


@tp_conv.register_fake
def _(x, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender, sender_ptr, w_row,
      w_partner, coupling, out_path, backend):
    return x.new_empty(receiver_ptr.shape[0] - 1, coupling.shape[2], x.shape[2])


@torch.library.custom_op("fastff::tp_conv_sender", mutates_args=())
def tp_conv_sender(g: Tensor, y: Tensor, w: Tensor, senders: Tensor, receivers: Tensor,
                   by_receiver: Tensor, receiver_ptr: Tensor, by_sender: Tensor,
                   sender_ptr: Tensor, w_row: Tensor, w_partner: Tensor, coupling: Tensor,
                   out_path: Tensor, backend: str) -> Tensor:
    """The x-gradient of sum <g, tp_conv(x, y, w)>, [N, Din, C] (a sum over each sender's
    edges)."""
    return registry.launch("tp_conv_sender", TP_CONV_SENDER, locals())


@tp_conv_sender.register_fake
def _(g, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender, sender_ptr, w_row,
      w_partner, coupling, out_path, backend):
    return g.new_empty(sender_ptr.shape[0] - 1, coupling.shape[0], g.shape[2])


@torch.library.custom_op("fastff::tp_conv_vjp", mutates_args=())
def tp_conv_vjp(g: Tensor, x: Tensor, y: Tensor, w: Tensor, senders: Tensor, receivers: Tensor,
                by_receiver: Tensor, receiver_ptr: Tensor, by_sender: Tensor,
                sender_ptr: Tensor, w_row: Tensor, w_partner: Tensor, coupling: Tensor,
                out_path: Tensor, need_x: bool, need_y: bool, need_w: bool,
                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(x-gradient [N, Din, C], y-gradient [E, nY], w-gradient [rows of w, P, C]) of
    sum <g, tp_conv(x, y, w)> in one pass over the edges; each an empty [0] tensor unless
    need_x / need_y / need_w."""
    return registry.launch("tp_conv_vjp", TP_CONV_VJP, locals())


@tp_conv_vjp.register_fake
def _(g, x, y, w, senders, receivers, by_receiver, receiver_ptr, by_sender, sender_ptr, w_row,
      w_partner, coupling, out_path, need_x, need_y, need_w, backend):
    return (g.new_empty(sender_ptr.shape[0] - 1, coupling.shape[0], g.shape[2]) if need_x
            else g.new_empty(0),
            torch.empty_like(y) if need_y else y.new_empty(0),
            torch.empty_like(w) if need_w else w.new_empty(0))


TP_CONV = OpArgs(tp_conv)
TP_CONV_SENDER = OpArgs(tp_conv_sender)
TP_CONV_VJP = OpArgs(tp_conv_vjp)
_GRAPH = ("senders", "receivers", "by_receiver", "receiver_ptr", "by_sender", "sender_ptr",
          "coupling", "out_path", "backend")
_ROWS = ("w_row", "w_partner")


def _graph(x) -> dict:
    """The structure every tp op shares, by name, from any of their input tuples, with the
    weight rows where the op has them (the tabulated ops' weights are per edge)."""
    return {n: getattr(x, n) for n in (*_GRAPH, *_ROWS) if hasattr(x, n)}


def _rows_per_edge(like: Tensor) -> dict:
    """Weight rows for weights per edge: every edge its own row."""
    none = like.new_empty(0)
    return {"w_row": none, "w_partner": none}


def _no_coupling_grad(want) -> None:
    if want.coupling:
        raise RuntimeError("fastff tensor-product ops: the coupling coefficients are constants "
                           "and have no gradient; pass a tensor that does not require grad")


def _tp_conv_backward(ctx, g):
    x, want = _restore(ctx, TP_CONV)
    _no_coupling_grad(want)
    if g is None or not (want.x or want.y or want.w):
        return TP_CONV.grads()
    gx, gy, gw = tp_conv_vjp(g.contiguous(), x.x, x.y, x.w, **_graph(x), need_x=want.x,
                             need_y=want.y, need_w=want.w)
    return TP_CONV.grads(x=gx if want.x else None, y=gy if want.y else None,
                         w=gw if want.w else None)


def _tp_sender_backward(ctx, v):
    """<v, tp_conv_sender(g, y, w)> = F(g, v, y, w)."""
    x, want = _restore(ctx, TP_CONV_SENDER)
    _no_coupling_grad(want)
    if v is None:
        return TP_CONV_SENDER.grads()
    v = v.contiguous()
    result = {}
    if want.g:
        result["g"] = tp_conv(v, x.y, x.w, **_graph(x))
    if want.y or want.w:
        _, gy, gw = tp_conv_vjp(x.g, v, x.y, x.w, **_graph(x), need_x=False, need_y=want.y,
                                need_w=want.w)
        result |= {"y": gy if want.y else None, "w": gw if want.w else None}
    return TP_CONV_SENDER.grads(**result)


def _tp_vjp_backward(ctx, cx, cy, cw):
    """<cx, gx> + <cy, gy> + <cw, gw> = F(g, cx, y, w) + F(g, x, cy, w) + F(g, x, y, cw): each
    term's gradients are the forward, the sender sum or the vjp with the cotangent in its
    argument's place."""
    x, want = _restore(ctx, TP_CONV_VJP)
    _no_coupling_grad(want)
    cx, cy, cw = (c.contiguous() if c is not None and c.numel() else None for c in (cx, cy, cw))
    graph = _graph(x)
    result: dict = {}
    terms = [t for t in ((cx, x.y, x.w), (x.x, cy, x.w), (x.x, x.y, cw)) if None not in t]
    if want.g:
        for xs, ys, ws in terms:
            _add(result, "g", tp_conv(xs, ys, ws, **graph))
    if want.x:
        for ys, ws in ((cy, x.w), (x.y, cw)):
            if ys is not None and ws is not None:
                _add(result, "x", tp_conv_sender(x.g, ys, ws, **graph))
    if cx is not None and (want.y or want.w):  # the y and w of F(g, cx, y, w)
        _, gy, gw = tp_conv_vjp(x.g, cx, x.y, x.w, **graph, need_x=False, need_y=want.y,
                                need_w=want.w)
        _add(result, "y", gy if want.y else None)
        _add(result, "w", gw if want.w else None)
    if cw is not None and want.y:  # the y of F(g, x, y, cw)
        _add(result, "y", tp_conv_vjp(x.g, x.x, x.y, cw, **graph, need_x=False, need_y=True,
                                      need_w=False)[1])
    if cy is not None and want.w:  # the w of F(g, x, cy, w)
        _add(result, "w", tp_conv_vjp(x.g, x.x, cy, x.w, **graph, need_x=False, need_y=False,
                                      need_w=True)[2])
    return TP_CONV_VJP.grads(**result)


tp_conv.register_autograd(_tp_conv_backward, setup_context=lambda ctx, inputs, output:
                          _save(ctx, TP_CONV, inputs))
tp_conv_sender.register_autograd(_tp_sender_backward, setup_context=lambda ctx, inputs, output:
                                 _save(ctx, TP_CONV_SENDER, inputs))
tp_conv_vjp.register_autograd(_tp_vjp_backward, setup_context=lambda ctx, inputs, output:
                              _save(ctx, TP_CONV_VJP, inputs))


# ---------------------------------------------------------------- symmetric contraction
@torch.library.custom_op("fastff::symmetric_contraction", mutates_args=())
def symmetric_contraction(x: Tensor, elements: Tensor, weights: Tensor, tuples: Tensor,
                          backend: str) -> Tensor:
    """out[n, m, c] = sum_k weights[elements_n, k, m, c] prod_q x[n, tuples[k, q], c] (entries
    -1 read 1), [N, M, C]."""
    return registry.launch("symmetric_contraction", SYMMETRIC_CONTRACTION, locals())


@symmetric_contraction.register_fake
def _(x, elements, weights, tuples, backend):
    return x.new_empty(x.shape[0], weights.shape[2], x.shape[2])


@torch.library.custom_op("fastff::symmetric_contraction_vjp", mutates_args=())
def symmetric_contraction_vjp(g: Tensor, x: Tensor, elements: Tensor, weights: Tensor,
                              tuples: Tensor, need_x: bool, need_weights: bool,
                              backend: str) -> tuple[Tensor, Tensor]:
    """(x-gradient [N, D, C], weights-gradient [Z, K, M, C]) of
    sum <g, symmetric_contraction(x)>; each an empty [0] tensor unless asked for."""
    return registry.launch("symmetric_contraction_vjp", SYMMETRIC_CONTRACTION_VJP, locals())


@symmetric_contraction_vjp.register_fake
def _(g, x, elements, weights, tuples, need_x, need_weights, backend):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weights) if need_weights else x.new_empty(0))


@torch.library.custom_op("fastff::symmetric_contraction_vjp_vjp", mutates_args=())
def symmetric_contraction_vjp_vjp(v: Tensor, g: Tensor, x: Tensor, elements: Tensor,
                                  weights: Tensor, tuples: Tensor, need_g: bool, need_x: bool,
                                  need_weights: bool, backend: str
                                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(g, x, weights)-gradients of sum <v, gx>, gx = symmetric_contraction_vjp(g, x)[0]: the
    second backward of force training; each an empty [0] tensor unless asked for."""
    return registry.launch("symmetric_contraction_vjp_vjp", SYMMETRIC_CONTRACTION_VJP_VJP,
                           locals())


@symmetric_contraction_vjp_vjp.register_fake
def _(v, g, x, elements, weights, tuples, need_g, need_x, need_weights, backend):
    return (torch.empty_like(g) if need_g else x.new_empty(0),
            torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weights) if need_weights else x.new_empty(0))


SYMMETRIC_CONTRACTION = OpArgs(symmetric_contraction)
SYMMETRIC_CONTRACTION_VJP = OpArgs(symmetric_contraction_vjp)
SYMMETRIC_CONTRACTION_VJP_VJP = OpArgs(symmetric_contraction_vjp_vjp)


def _no_index_grad(want) -> None:
    if want.elements or want.tuples:
        raise RuntimeError("fastff.symmetric_contraction: elements and tuples are indices and "
                           "have no gradient")


def _symc_backward(ctx, g):
    x, want = _restore(ctx, SYMMETRIC_CONTRACTION)
    if g is None or not (want.x or want.weights):
        return SYMMETRIC_CONTRACTION.grads()
    gx, gw = symmetric_contraction_vjp(g.contiguous(), x.x, x.elements, x.weights, x.tuples,
                                       want.x, want.weights, x.backend)
    return SYMMETRIC_CONTRACTION.grads(x=gx if want.x else None,
                                       weights=gw if want.weights else None)


def _symc_vjp_backward(ctx, cx, cw):
    """<cx, gx> is the fused vjp_vjp; <cw, gw(g, x)> = sum <g, symmetric_contraction(x) with
    weights cw>, so its gradients are the forward and the vjp with cw for weights."""
    x, want = _restore(ctx, SYMMETRIC_CONTRACTION_VJP)
    _no_index_grad(want)
    cx = cx.contiguous() if cx is not None and cx.numel() else None
    cw = cw.contiguous() if cw is not None and cw.numel() else None
    result: dict = {}
    if cx is not None and (want.g or want.x or want.weights):
        gg, gx, gw = symmetric_contraction_vjp_vjp(cx, x.g, x.x, x.elements, x.weights,
                                                   x.tuples, want.g, want.x, want.weights,
                                                   x.backend)
        for name, t in (("g", gg), ("x", gx), ("weights", gw)):
            _add(result, name, t if getattr(want, name) else None)
    if cw is not None:
        if want.g:
            _add(result, "g", symmetric_contraction(x.x, x.elements, cw, x.tuples, x.backend))
        if want.x:
            _add(result, "x", symmetric_contraction_vjp(x.g, x.x, x.elements, cw, x.tuples,
                                                        True, False, x.backend)[0])
    return SYMMETRIC_CONTRACTION_VJP.grads(**result)


def _symc_vjp_vjp_backward(ctx, cg, cx, cw):
    """Third order: autograd through the torch formulas of reference.py, recomputed."""
    x, want = _restore(ctx, SYMMETRIC_CONTRACTION_VJP_VJP)
    _no_index_grad(want)
    names = tuple(n for n in ("v", "g", "x", "weights") if getattr(want, n))
    if not names:
        return SYMMETRIC_CONTRACTION_VJP_VJP.grads()

    def formulas(t):
        return reference.symmetric_contraction_vjp_vjp(t.v, t.g, t.x, t.elements, t.weights,
                                                       t.tuples, t.need_g, t.need_x,
                                                       t.need_weights)

    return SYMMETRIC_CONTRACTION_VJP_VJP.grads(**_composite(formulas, x, names, (cg, cx, cw)))


symmetric_contraction.register_autograd(
    _symc_backward, setup_context=lambda ctx, inputs, output:
    _save(ctx, SYMMETRIC_CONTRACTION, inputs))
symmetric_contraction_vjp.register_autograd(
    _symc_vjp_backward, setup_context=lambda ctx, inputs, output:
    _save(ctx, SYMMETRIC_CONTRACTION_VJP, inputs))
symmetric_contraction_vjp_vjp.register_autograd(
    _symc_vjp_vjp_backward, setup_context=lambda ctx, inputs, output:
    _save(ctx, SYMMETRIC_CONTRACTION_VJP_VJP, inputs))


# ---------------------------------------------------------------- tabulated radial weights
@torch.library.custom_op("fastff::radial_spline", mutates_args=())
def radial_spline(distances: Tensor, coeffs: Tensor, step: float, order: int,
                  backend: str) -> Tensor:
    """d^order/dr^order of the cubic table coeffs [P-1, 4, F] (knots every ``step``) at each
    distance, [E, F]; zero outside the table."""
    return registry.launch("radial_spline", RADIAL_SPLINE, locals())


@radial_spline.register_fake
def _(distances, coeffs, step, order, backend):
    return coeffs.new_empty(distances.shape[0], coeffs.shape[2])


@torch.library.custom_op("fastff::radial_spline_vjp", mutates_args=())
def radial_spline_vjp(grad: Tensor, distances: Tensor, coeffs: Tensor, step: float, order: int,
                      backend: str) -> Tensor:
    """sum_f grad[e, f] d^(order+1)/dr^(order+1) table_f(r_e), [E]: the distance gradient of
    sum <grad, radial_spline(distances, order)>."""
    return registry.launch("radial_spline_vjp", RADIAL_SPLINE_VJP, locals())


@radial_spline_vjp.register_fake
def _(grad, distances, coeffs, step, order, backend):
    return distances.new_empty(distances.shape[0])


RADIAL_SPLINE = OpArgs(radial_spline)
RADIAL_SPLINE_VJP = OpArgs(radial_spline_vjp)


def _no_table_grad(want) -> None:
    if want.coeffs:
        raise RuntimeError("fastff.radial_spline: the table has no gradient (tabulate from "
                           "frozen weights; train with the exact radial network)")


def _radial_spline_backward(ctx, grad):
    x, want = _restore(ctx, RADIAL_SPLINE)
    _no_table_grad(want)
    if grad is None or not want.distances:
        return RADIAL_SPLINE.grads()
    return RADIAL_SPLINE.grads(distances=radial_spline_vjp(grad.contiguous(), x.distances,
                                                           x.coeffs, x.step, x.order,
                                                           x.backend))


def _radial_spline_vjp_backward(ctx, cot):
    x, want = _restore(ctx, RADIAL_SPLINE_VJP)
    _no_table_grad(want)
    if cot is None:
        return RADIAL_SPLINE_VJP.grads()
    result = {}
    if want.grad:
        result["grad"] = cot.unsqueeze(1) * radial_spline(x.distances, x.coeffs, x.step,
                                                          x.order + 1, x.backend)
    if want.distances:
        result["distances"] = cot * radial_spline_vjp(x.grad, x.distances, x.coeffs, x.step,
                                                      x.order + 1, x.backend)
    return RADIAL_SPLINE_VJP.grads(**result)


radial_spline.register_autograd(
    _radial_spline_backward, setup_context=lambda ctx, inputs, output:
    _save(ctx, RADIAL_SPLINE, inputs))
radial_spline_vjp.register_autograd(
    _radial_spline_vjp_backward, setup_context=lambda ctx, inputs, output:
    _save(ctx, RADIAL_SPLINE_VJP, inputs))


# ---------------------------------------------------------------- tabulated convolution
@torch.library.custom_op("fastff::tp_conv_spline", mutates_args=())
def tp_conv_spline(x: Tensor, y: Tensor, distances: Tensor, coeffs: Tensor, step: float,
                   senders: Tensor, receivers: Tensor, by_receiver: Tensor,
                   receiver_ptr: Tensor, by_sender: Tensor, sender_ptr: Tensor,
                   coupling: Tensor, out_path: Tensor, backend: str) -> Tensor:
    """tp_conv(x, y, w) with w = radial_spline(distances, coeffs, step, 0) viewed [E, P, C],
    evaluated inside the edge loop, [N, Dout, C]."""
    return registry.launch("tp_conv_spline", TP_CONV_SPLINE, locals())


@tp_conv_spline.register_fake
def _(x, y, distances, coeffs, step, senders, receivers, by_receiver, receiver_ptr, by_sender,
      sender_ptr, coupling, out_path, backend):
    return x.new_empty(receiver_ptr.shape[0] - 1, coupling.shape[2], x.shape[2])


@torch.library.custom_op("fastff::tp_conv_spline_vjp", mutates_args=())
def tp_conv_spline_vjp(g: Tensor, x: Tensor, y: Tensor, distances: Tensor, coeffs: Tensor,
                       step: float, senders: Tensor, receivers: Tensor, by_receiver: Tensor,
                       receiver_ptr: Tensor, by_sender: Tensor, sender_ptr: Tensor,
                       coupling: Tensor, out_path: Tensor, need_x: bool, need_y: bool,
                       need_d: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(x-gradient [N, Din, C], y-gradient [E, nY], distance gradient [E]) of
    sum <g, tp_conv_spline(...)>; each an empty [0] tensor unless asked for."""
    return registry.launch("tp_conv_spline_vjp", TP_CONV_SPLINE_VJP, locals())


@tp_conv_spline_vjp.register_fake
def _(g, x, y, distances, coeffs, step, senders, receivers, by_receiver, receiver_ptr,
      by_sender, sender_ptr, coupling, out_path, need_x, need_y, need_d, backend):
    return (g.new_empty(sender_ptr.shape[0] - 1, coupling.shape[0], g.shape[2]) if need_x
            else g.new_empty(0),
            torch.empty_like(y) if need_y else y.new_empty(0),
            torch.empty_like(distances) if need_d else distances.new_empty(0))


TP_CONV_SPLINE = OpArgs(tp_conv_spline)
TP_CONV_SPLINE_VJP = OpArgs(tp_conv_spline_vjp)


def _tp_spline_backward(ctx, g):
    x, want = _restore(ctx, TP_CONV_SPLINE)
    _no_coupling_grad(want)
    _no_table_grad(want)
    if g is None or not (want.x or want.y or want.distances):
        return TP_CONV_SPLINE.grads()
    g = g.contiguous()
    graph = _graph(x)
    if not torch.is_grad_enabled():  # no graph wanted: one fused pass
        gx, gy, gd = tp_conv_spline_vjp(g, x.x, x.y, x.distances, x.coeffs, x.step, **graph,
                                        need_x=want.x, need_y=want.y, need_d=want.distances)
    else:  # differentiable: the table's weights, then the tp ops' own (closed) backward
        num_edges = x.distances.shape[0]
        w = radial_spline(x.distances, x.coeffs, x.step, 0, x.backend)
        gx, gy, gw = tp_conv_vjp(g, x.x, x.y, w.reshape(num_edges, -1, x.x.shape[2]), **graph,
                                 **_rows_per_edge(x.senders),
                                 need_x=want.x, need_y=want.y, need_w=want.distances)
        gd = radial_spline_vjp(gw.reshape(num_edges, -1), x.distances, x.coeffs, x.step, 0,
                               x.backend) if want.distances else None
    return TP_CONV_SPLINE.grads(x=gx if want.x else None, y=gy if want.y else None,
                                distances=gd if want.distances else None)


def _refuse_spline_vjp_derivative(ctx, *cotangents):
    raise RuntimeError("fastff::tp_conv_spline_vjp is the no-graph fast path of tp_conv_spline's "
                       "backward and has no derivative; differentiate tp_conv_spline with "
                       "create_graph=True instead (that backward is built from differentiable "
                       "ops)")


tp_conv_spline.register_autograd(
    _tp_spline_backward, setup_context=lambda ctx, inputs, output:
    _save(ctx, TP_CONV_SPLINE, inputs))
tp_conv_spline_vjp.register_autograd(_refuse_spline_vjp_derivative,
                                     setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------- the radial network's SiLU
@torch.library.custom_op("fastff::silu_term", mutates_args=())
def silu_term(x: Tensor, order: int, a: Tensor | None, b: Tensor | None,
              backend: str) -> Tensor:
    """a * b * d^order/dx^order silu(x), elementwise (a missing factor is 1)."""
    return registry.launch("silu_term", SILU_TERM, locals())


@silu_term.register_fake
def _(x, order, a, b, backend):
    return torch.empty_like(x)


SILU_TERM = OpArgs(silu_term)


def _silu_backward(ctx, cot):
    x, want = _restore(ctx, SILU_TERM)
    if cot is None:
        return SILU_TERM.grads()
    cot = cot.contiguous()
    result = {}
    if want.a:
        result["a"] = silu_term(x.x, x.order, cot, x.b, x.backend)
    if want.b:
        result["b"] = silu_term(x.x, x.order, x.a, cot, x.backend)
    if want.x:
        if x.a is not None and x.b is not None:
            result["x"] = silu_term(x.x, x.order + 1, cot * x.a, x.b, x.backend)
        else:
            other = x.a if x.a is not None else x.b
            result["x"] = silu_term(x.x, x.order + 1, cot, other, x.backend)
    return SILU_TERM.grads(**result)


silu_term.register_autograd(_silu_backward, setup_context=lambda ctx, inputs, output:
                            _save(ctx, SILU_TERM, inputs))
