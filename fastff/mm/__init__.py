"""Molecular-mechanics terms (``fastff.mm``): fused nonbonded and bonded energies with gradients
for positions, cell and every parameter, and :class:`ForceField` built from an OpenMM System.

Units default to OpenMM's (nm, kJ/mol, e); see :mod:`fastff.mm._terms` for the conventions.
"""

from fastff.mm._terms import (
    COULOMB_CONSTANT,
    Exceptions,
    coulomb,
    harmonic_angles,
    harmonic_bonds,
    lennard_jones,
    nonbonded,
    periodic_torsions,
)
from fastff.mm.forcefield import ForceField

__all__ = ["COULOMB_CONSTANT", "Exceptions", "ForceField", "coulomb", "harmonic_angles",
           "harmonic_bonds", "lennard_jones", "nonbonded", "periodic_torsions"]
