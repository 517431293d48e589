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
"""

from __future__ import annotations

import torch
from torch import Tensor

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
