"""Custom op of the radial family (namespace ``fastff::``): ``radial_basis`` at any derivative
order. Its backward is the same op at the next order, so derivatives of every order exist.

Takes the already resolved backend name (see fastff.kernels._runtime.registry); only this file
knows all three paths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastff.kernels._runtime import registry
from fastff.kernels._runtime.args import OpArgs

registry.register("radial_basis", "radial", "radial_basis")


@torch.library.custom_op("fastff::radial_basis", mutates_args=())
def radial_basis(distances: Tensor, num_basis: int, cutoff: float, kind: str, envelope: str,
                 order: int, backend: str) -> Tensor:
    return registry.launch("radial_basis", RADIAL_BASIS, locals())


@radial_basis.register_fake
def _(distances, num_basis, cutoff, kind, envelope, order, backend):
    return distances.new_empty(distances.shape[0], num_basis)


RADIAL_BASIS = OpArgs(radial_basis)


def _setup(ctx, inputs, output):
    x = RADIAL_BASIS(inputs)
    ctx.save_for_backward(x.distances)
    ctx.inputs = x._replace(distances=None, order=x.order + 1)  # the slope's call


def _backward(ctx, grad):
    (distances,) = ctx.saved_tensors
    slope = radial_basis(**ctx.inputs._replace(distances=distances)._asdict())
    return RADIAL_BASIS.grads(distances=(grad * slope).sum(1))


radial_basis.register_autograd(_backward, setup_context=_setup)
