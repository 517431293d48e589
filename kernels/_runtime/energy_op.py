"""Autograd for fused energy ops: ops that return an energy per system together with its
gradients with respect to some of their inputs, computed in the same pass.

* First derivatives cost a multiply: ``grad_input = grad_energy[system of row] * saved gradient``.
* The saved gradients are outputs of the op, so a second backward (force matching: derivatives
  of forces with respect to parameters and positions) flows into them. Their backward is a
  vector-Jacobian product through the op's float64-safe torch reference energy (a
  Hessian-vector product by double autograd). It is built with ``create_graph`` whenever the
  caller asks for a graph, so derivatives of any order exist; none is ever silently zero.

Inputs are named (``OpArgs``): ``diff`` lists the names whose gradients the op returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastff.kernels._runtime.args import OpArgs


def register_energy_autograd(op, *, diff: Sequence[str],
                             rows: Callable[[object, str], Tensor | None],
                             reference: Callable[[object], Tensor], params: Sequence[str] = (),
                             param_flag: str | None = None, name: str) -> OpArgs:
    """Register the autograd of ``op(...) -> (energy [B], grad_0, ..., grad_{m-1})``.

    Args:
        op: the custom op.
        diff: names of the inputs whose gradients the op returns, in output order.
        rows: ``rows(inputs, name)`` gives the int64 system index of each row of that input (to
            scale by the per-system output gradient), or None for [B, ...] inputs (cells);
            ``inputs`` is the named tuple of the call's inputs.
        reference: ``reference(inputs) -> energy [B]``, the torch energy of the named inputs,
            differentiable to any order.
        params: names (within ``diff``) of parameter inputs whose gradients the op computes only
            when the bool input ``param_flag`` is set.
        param_flag: name of that bool input.
        name: the op's public name, for error messages.

    Returns:
        The op's ``OpArgs``.
    """
    spec = OpArgs(op)
    diff = tuple(diff)
    slots = spec.positions(diff)
    param_set = frozenset(params)
    if param_set and param_flag is None:
        raise ValueError("params needs param_flag")

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        tensor_slots = spec.tensor_slots(inputs)
        ctx.tensor_slots = tensor_slots
        ctx.others = {k: x for k, x in enumerate(inputs) if not isinstance(x, Tensor)}
        ctx.num_inputs = len(inputs)
        ctx.save_for_backward(*(inputs[k] for k in tensor_slots), *output[1:])

    def backward(ctx, grad_energy, *grad_grads):
        saved = ctx.saved_tensors
        values: list = [None] * ctx.num_inputs
        for k, x in ctx.others.items():
            values[k] = x
        for slot, k in enumerate(ctx.tensor_slots):
            values[k] = saved[slot]
        inputs = spec(values)
        gradients = saved[len(ctx.tensor_slots):]
        needs = [ctx.needs_input_grad[k] for k in slots]
        for input_name, need in zip(diff, needs, strict=True):
            if need and input_name in param_set and not getattr(inputs, param_flag):
                raise RuntimeError(f"{name}: {input_name} needs a gradient but the op ran "
                                   "without parameter gradients (param_grads=False)")
        result: dict[str, Tensor] = {}
        if grad_energy is not None:
            for input_name, g, need in zip(diff, gradients, needs, strict=True):
                if not need:
                    continue
                idx = rows(inputs, input_name) if grad_energy.shape[0] > 1 else None
                scale = grad_energy if idx is None else grad_energy[idx]
                result[input_name] = scale.view(-1, *([1] * (g.dim() - 1))) * g
        if any(g is not None for g in grad_grads):
            extra = _reference_vjp(reference, spec, inputs, diff, grad_grads, needs)
            for input_name, g in zip(diff, extra, strict=True):
                if g is not None:
                    result[input_name] = g if input_name not in result else result[input_name] + g
        return spec.grads(**result)

    op.register_autograd(backward, setup_context=setup_context)
    return spec


def _reference_vjp(reference, spec: OpArgs, inputs, diff: tuple[str, ...], cotangents, needs):
    """sum_k <cotangent_k, d/dx grad_k E(x)> for every differentiable input x (a Hessian-vector
    product through the torch reference), with a graph when the caller builds one."""
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        replaced = {}
        for input_name in diff:
            x = getattr(inputs, input_name)
            replaced[input_name] = x if x.requires_grad else x.detach().requires_grad_(True)
        xs = inputs._replace(**replaced)
        variables = [replaced[n] for n in diff]
        energy = reference(xs)
        grads = torch.autograd.grad(energy.sum(), variables, create_graph=True, allow_unused=True)
        total = None
        for g, c in zip(grads, cotangents, strict=False):
            if g is None or c is None or not g.requires_grad:
                continue  # g does not depend on any input: its derivative is exactly zero
            term = (g * c).sum()
            total = term if total is None else total + term
        wanted = [v for v, need in zip(variables, needs, strict=True) if need]
        found: list[Tensor | None] = [None] * len(wanted)
        if total is not None and wanted:
            found = list(torch.autograd.grad(total, wanted, allow_unused=True, create_graph=create))
    out: list[Tensor | None] = []
    it = iter(found)
    for v, need in zip(variables, needs, strict=True):
        if not need:
            out.append(None)
            continue
        found_g = next(it)
        out.append(torch.zeros_like(v) if found_g is None else found_g)
    return out


def _autograd_inside_op():
    """Context manager that turns autograd back on inside a custom op's implementation.

    A custom op's kernel runs below the autograd dispatch key (excluded in thread-local state),
    so the torch reference could not differentiate itself there; this restores autograd
    dispatch for the block. Used only by the reference launchers.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    exclude = exclude.remove(torch._C.DispatchKey.AutogradFunctionality)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def reference_gradients(energy_fn: Callable[..., Tensor], tensors: Sequence[Tensor],
                        wanted: Sequence[bool]) -> tuple[Tensor, list[Tensor]]:
    """(energy, gradients) of ``energy_fn(*tensors)`` by autograd, for reference launchers.

    Gradients of inputs not ``wanted`` are returned as zeros (the launcher contract says they
    are unspecified); gradients of wanted inputs the energy does not depend on are zeros too.
    """
    with _autograd_inside_op(), torch.enable_grad():
        xs = [t.detach().requires_grad_(bool(w)) for t, w in zip(tensors, wanted, strict=False)]
        energy = energy_fn(*xs)
        variables = [x for x, w in zip(xs, wanted, strict=False) if w]
        found = iter(torch.autograd.grad(energy.sum(), variables, allow_unused=True)
                     if variables and energy.requires_grad else [None] * len(variables))
    grads = []
    for x, w in zip(xs, wanted, strict=False):
        g = next(found) if w else None
        grads.append(torch.zeros_like(x) if g is None else g.detach())
    return energy.detach(), grads
