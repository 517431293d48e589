"""Custom op of the radial family (namespace ``fastff::``): ``radial_basis`` at any derivative
order. Its backward is the same op at the next order, so derivatives of every order exist.

Takes the already resolved backend name (see fastff._backend); only this file knows all three
paths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastff import _backend

_backend.register("radial_basis", "radial", "radial_basis")


@torch.library.custom_op("fastff::radial_basis", mutates_args=())
def radial_basis(distances: Tensor, num_basis: int, cutoff: float, kind: str, envelope: str,
                 order: int, backend: str) -> Tensor:
    launch = _backend.launcher("radial_basis", backend)
    return launch(distances, num_basis, cutoff, kind, envelope, order)


@radial_basis.register_fake
def _(distances, num_basis, cutoff, kind, envelope, order, backend):
    return distances.new_empty(distances.shape[0], num_basis)


def _setup(ctx, inputs, output):
    distances, num_basis, cutoff, kind, envelope, order, backend = inputs
    ctx.save_for_backward(distances)
    ctx.args = (num_basis, cutoff, kind, envelope, order + 1, backend)


def _backward(ctx, grad):
    (distances,) = ctx.saved_tensors
    slope = radial_basis(distances, *ctx.args)
    return (grad * slope).sum(1), None, None, None, None, None, None


radial_basis.register_autograd(_backward, setup_context=_setup)
