"""Molecular-mechanics terms (``fastff.mm``): fused nonbonded and bonded energies with gradients
for positions, cell and every parameter, and :class:`ForceField` built from parameter tensors or
an OpenMM System (:func:`water_force_field` builds the one of a :class:`fastff.systems.WaterBox`).

Units default to OpenMM's (nm, kJ/mol, e); see :mod:`fastff.mm._terms` for the conventions.
"""

from fastff.mm._terms import (
    COULOMB_CONSTANT,
    Exceptions,
    bonded,
    coulomb,
    harmonic_angles,
    harmonic_bonds,
    lennard_jones,
    nonbonded,
    periodic_torsions,
)
from fastff.mm.forcefield import (
    AngleParameters,
    BondParameters,
    ForceField,
    NonbondedParameters,
    TorsionParameters,
)
from fastff.mm.water import water_force_field

__all__ = ["COULOMB_CONSTANT", "AngleParameters", "BondParameters", "Exceptions", "ForceField",
           "NonbondedParameters", "TorsionParameters", "bonded", "coulomb", "harmonic_angles",
           "harmonic_bonds", "lennard_jones", "nonbonded", "periodic_torsions",
           "water_force_field"]
