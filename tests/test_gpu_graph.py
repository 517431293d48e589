"""An MD step of the MM force field captured in a CUDA graph (fastff.compile.cuda_graph_step):
replays give the eager step's energies and forces, lists rebuilt on the device included.
Needs a CUDA device (skipped elsewhere: the capture itself is what is tested)."""

from __future__ import annotations

import pytest
import torch

from fastff.compile import cuda_graph_step
from fastff.mm import water_force_field
from fastff.systems import water_box
from fastff.testing import assert_close_scaled


@pytest.mark.gpu
@pytest.mark.parametrize("use_clusters", [True, False])
def test_md_step_in_a_cuda_graph(use_clusters):
    box = water_box(300, seed=0, dtype=torch.float64, relax_steps=0)
    ff = water_force_field(box, cutoff=0.6, skin=0.1, backend="triton").to("cuda")
    ff.requires_grad_(False)
    ff.use_clusters = use_clusters
    eager = water_force_field(box, cutoff=0.6, skin=0.1, backend="triton").to("cuda")
    eager.requires_grad_(False)

    def step(positions):
        x = positions.detach().requires_grad_(True)
        energy = ff(x)
        (grad,) = torch.autograd.grad(energy, x)
        return energy.detach(), -grad

    positions = box.positions.to("cuda")
    graph = cuda_graph_step(step, positions)
    generator = torch.Generator(device="cuda").manual_seed(0)
    for kick in (0.001, 0.001, 0.08, 0.001):  # the third rebuilds the lists on the device
        positions = positions + kick * torch.randn(positions.shape, dtype=positions.dtype,
                                                   device="cuda", generator=generator)
        energy, forces = (t.clone() for t in graph(positions))
        x = positions.clone().requires_grad_(True)
        want = eager(x)
        (grad,) = torch.autograd.grad(want, x)
        assert_close_scaled(energy, want, "mm", torch.float64, "energy")
        assert_close_scaled(forces, -grad, "mm", torch.float64, "forces")
    ff.check()
