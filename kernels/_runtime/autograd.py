"""Which input gradients the running backward will actually use.

A custom op's ``ctx.needs_input_grad`` says which inputs require grad, not which gradients the
current ``autograd.grad`` call asked for: forces (``autograd.grad(E, positions)``) of a model
with trainable weights would make every fused backward compute weight gradients that are
thrown away, and force training's first backward (``create_graph=True``) pays the same. The
autograd engine knows which graph nodes it will execute; ``wanted_grads`` asks it.

The engine cannot answer for a leaf's gradient accumulator during ``autograd.grad``, so modules
pass their weights through ``track`` (a view: one graph node, no copy), whose node it can
answer for. Where it cannot answer at all (outside a backward, e.g. while a compiler traces the
joint graph), every input that requires grad counts as wanted: the fallback is the plain
``needs_input_grad``, never a missing gradient.

Also here, for any op's autograd: ``save_inputs`` / ``saved_inputs`` (an op's inputs kept for
its backward and given back by name), ``alias`` (a fresh graph node for a recomputed
expression) and ``refuse_derivative`` (a fused no-graph backward that raises when
differentiated, never returning zeros).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastff.kernels._runtime.args import OpArgs

_will_execute = getattr(torch._C, "_will_engine_execute_node", None)


def track(t: Tensor) -> Tensor:
    """``t``, as a view when it is a leaf that requires grad (see the module docstring)."""
    return t.view_as(t) if t.requires_grad and t.is_leaf else t


def wanted_grads(ctx, slots) -> tuple[bool, ...]:
    """``ctx.needs_input_grad``, minus the inputs whose gradient the running backward pass will
    not use. ``slots``: the positions of the op's tensor inputs (an int n for "the first n"),
    since the engine lists graph edges for tensor inputs only."""
    needs = tuple(ctx.needs_input_grad)
    slots = range(slots) if isinstance(slots, int) else slots
    nodes = getattr(ctx, "next_functions", None)
    if _will_execute is None or nodes is None or len(nodes) != len(slots):
        return needs
    wanted = list(needs)
    for k, (node, _) in zip(slots, nodes, strict=True):
        if needs[k] and node is not None:
            try:
                wanted[k] = bool(_will_execute(node))
            except RuntimeError:  # a leaf during autograd.grad, or not inside a backward
                pass
    return tuple(wanted)


def alias(t: Tensor) -> Tensor:
    """A fresh graph node for ``t`` (a view: gradients still reach t), so that a tensor passed
    as two inputs of a recomputed expression gets the gradient of each use separately."""
    return t.view_as(t) if t.requires_grad else t.detach().requires_grad_(True)


def refuse_derivative(vjp_op, parent: str) -> None:
    """Register a backward for ``vjp_op`` (a fused, no-graph fast path of ``parent``'s backward)
    that raises: such an op is never differentiated into zeros. With ``create_graph=True`` the
    parent's backward takes a differentiable path instead."""
    def backward(ctx, *grads):
        raise RuntimeError(f"fastff::{vjp_op._name} is the no-graph fast path of {parent}'s "
                           f"backward and has no derivative; differentiate {parent} with "
                           "create_graph=True instead (that backward is built from "
                           "differentiable ops)")
    vjp_op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)


def save_inputs(ctx, spec: OpArgs, inputs, extra: tuple = ()) -> None:
    """Keep every input of an op for its backward: tensors through ``save_for_backward`` (with
    autograd's in-place checks), the rest on ``ctx``; ``extra`` tensors (outputs the backward
    reads) after them. ``saved_inputs`` gives them back by name."""
    named = spec(inputs)
    slots = spec.tensor_slots(named)
    ctx.tensor_slots = slots
    ctx.other_inputs = {k: x for k, x in enumerate(named) if k not in slots}
    ctx.save_for_backward(*(named[k] for k in slots), *extra)


def saved_inputs(ctx, spec: OpArgs) -> tuple:
    """(the op's inputs as ``spec``'s named tuple, the ``extra`` tensors) kept by
    ``save_inputs``."""
    saved = ctx.saved_tensors
    values: list = [None] * len(spec.names)
    for k, x in ctx.other_inputs.items():
        values[k] = x
    for position, k in enumerate(ctx.tensor_slots):
        values[k] = saved[position]
    return spec(values), saved[len(ctx.tensor_slots):]
