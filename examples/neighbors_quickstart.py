"""Neighbor lists with fastff: pairs, a pair energy with forces and stress, and a Verlet list
reused across MD steps. Run: python examples/neighbors_quickstart.py
"""

import torch

import fastff

torch.manual_seed(0)
n, edge, cutoff = 500, 17.0, 5.0  # ~0.1 atoms/A^3
cell = torch.eye(3, dtype=torch.float64) * edge
positions = torch.rand(n, 3, dtype=torch.float64) * edge

# 1. All pairs within the cutoff (numba on CPU, Triton on CUDA, chosen by device).
nl = fastff.neighbor_list(positions, cutoff, cell)
print(nl)
print("pairs of atom 0:", nl.j[nl.ptr[0]:nl.ptr[1]].tolist()[:8], "...")


# 2. A smooth pair energy: forces from positions, stress from a strain of cell and positions.
def energy(positions, cell, nl):
    r = nl.distances(positions, cell)
    inside = r < cutoff
    return (torch.exp(-r) * (1 - r / cutoff) ** 2 * inside).sum() / 2  # full list: halve


pos = positions.clone().requires_grad_(True)
strain = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
deform = torch.eye(3, dtype=torch.float64) + strain
e = energy(pos @ deform, cell @ deform, nl)
grad_pos, virial = torch.autograd.grad(e, (pos, strain))
forces = -grad_pos
stress = virial / torch.linalg.det(cell)  # dE/d(strain) / volume, as ASE defines it
print(f"energy {e.item():.4f}, |F|max {forces.norm(dim=1).max():.4f}, "
      f"pressure {-stress.trace().item() / 3:.3e}")

# 3. A Verlet list reused across steps: rebuilt only when an atom moved more than skin / 2.
verlet = fastff.VerletList(cutoff, skin=0.5)
for _ in range(20):
    positions = positions + 0.01 * torch.randn_like(positions)
    nl = verlet.update(positions, cell)
    e = energy(positions, cell, nl)
print(f"20 steps, {verlet.rebuilds} builds; final energy {e.item():.4f}")

# 4. Which kernel path each op takes here, and why.
fastff.backends()
