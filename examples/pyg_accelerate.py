"""A torch_geometric SchNet served by fastff kernels, in place, then converted to a fastff model.
Run: python examples/pyg_accelerate.py

accelerate(model) keeps the same object (parameters, state_dict, optimizer, call); from_pyg
copies the weights into fastff.models.SchNet, which also handles periodic cells and MD engines.
"""

import copy
import time

import torch
from torch_geometric.nn.models import SchNet

import fastff
from fastff.interop.pyg import accelerate
from fastff.models import energy_and_forces
from fastff.systems import water_box

# 1. A water box in Angstrom and a torch_geometric SchNet fed fastff's periodic pairs (its own
#    radius graph has no periodic images).
box = water_box(1000, seed=0)
pos, cell = box.positions * 10.0, box.cell * 10.0


def periodic_graph(p, batch):
    nl = fastff.neighbor_list(p, 5.0, cell)
    return torch.stack([nl.j, nl.i]), nl.distances(p, cell)


torch.manual_seed(0)
model = SchNet(hidden_channels=64, num_filters=64, num_interactions=3, num_gaussians=32,
               cutoff=5.0, interaction_graph=periodic_graph)
original = copy.deepcopy(model)


def energy_and_forces_of(m):
    x = pos.clone().requires_grad_(True)
    energy = m(box.species, x).sum()
    return energy.detach(), -torch.autograd.grad(energy, x)[0]


# 2. In place: the same parameters, now on fastff's fused filter convolutions.
accelerate(model)
for name, m in (("torch_geometric", original), ("accelerated", model)):
    energy_and_forces_of(m)  # warm-up (JIT compilation)
    t0 = time.perf_counter()
    energy, forces = energy_and_forces_of(m)
    print(f"{name:>16}: E = {float(energy):.6f}, {time.perf_counter() - t0:.3f} s")

# 3. Training works as before: the optimizer holds the same Parameter objects.
optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
x = pos.clone().requires_grad_(True)
forces = -torch.autograd.grad(model(box.species, x).sum(), x, create_graph=True)[0]
forces.square().mean().backward()
optimizer.step()

# 4. A fastff model with the same weights: units are required (this one: Angstrom, eV).
converted = fastff.models.SchNet.from_pyg(original, energy_unit="eV")
e, f = energy_and_forces(converted, box.species, pos, cell)
print(f"from_pyg: E = {float(e[0]):.6f} {converted.energy_unit}, cutoff {converted.cutoff} "
      f"{converted.length_unit}")
