"""Systems shared by the benchmarks (random, reproducible: benchmarks compare, not verify)."""

import numpy as np
import torch


def uniform_box(n_atoms, density=0.1, seed=0, dtype=torch.float64):
    """Random uniform positions at `density` atoms/A^3 in a periodic cubic box."""
    edge = (n_atoms / density) ** (1 / 3)
    rng = np.random.default_rng(seed)
    pos = torch.tensor(rng.random((n_atoms, 3)) * edge, dtype=dtype)
    return pos, torch.eye(3, dtype=dtype) * edge


def small_triclinic(seed=0, dtype=torch.float64):
    """8 atoms in a skewed cell of ~4 A edges."""
    rng = np.random.default_rng(seed)
    cell = torch.tensor([[4.0, 0.0, 0.0], [1.1, 3.9, 0.0], [-0.6, 0.8, 4.1]], dtype=dtype)
    pos = torch.tensor(rng.random((8, 3)), dtype=dtype) @ cell
    return pos, cell


def molecule_batch(n_molecules=256, atoms_per_molecule=20, seed=0, dtype=torch.float64):
    """Molecule-like clusters (~1.5 A spacing) without periodicity, as one batch."""
    rng = np.random.default_rng(seed)
    pos = torch.tensor(rng.normal(size=(n_molecules * atoms_per_molecule, 3)) * 2.0, dtype=dtype)
    batch = torch.arange(n_molecules).repeat_interleave(atoms_per_molecule)
    return pos, batch
