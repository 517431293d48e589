"""The MM force field of a :class:`fastff.systems.WaterBox` (flexible TIP3P), without OpenMM."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastff.mm._terms import Exceptions
from fastff.mm.forcefield import (
    OPENMM_COULOMB_CONSTANT,
    AngleParameters,
    BondParameters,
    ForceField,
    NonbondedParameters,
)

if TYPE_CHECKING:
    from fastff.systems import WaterBox


def water_force_field(box: WaterBox, *, cutoff: float = 0.9, skin: float = 0.1,
                      method: str = "reaction_field", dielectric: float = 78.3,
                      switch_distance: float | None = None, dispersion_correction: bool = False,
                      backend: str | None = None, dtype: torch.dtype | None = None) -> ForceField:
    """Lennard-Jones + Coulomb within ``cutoff`` + harmonic bonds + harmonic angles of a water
    box, with the intramolecular pairs excluded: the energy of ``box.to_openmm(...)`` with the
    same arguments, computed by fastff's kernels.

    Bonds and angles take the minimum image, so positions may be wrapped per atom. Coulomb uses
    OpenMM's constant (138.935457 kJ mol^-1 nm e^-2).

    Args:
        box: the :class:`fastff.systems.WaterBox`; its cell is the default cell.
        cutoff: nm; periodic reaction field needs cutoff <= half the box edge.
        skin: Verlet skin (nm) of the module's neighbor list.
        method: "reaction_field" (OpenMM's CutoffPeriodic) or "plain" (truncated 1/r).
        dielectric: reaction-field dielectric constant.
        switch_distance: nm, Lennard-Jones switching from here to the cutoff; None: none.
        dispersion_correction: OpenMM's long-range Lennard-Jones correction.
        backend: kernel path ("numba", "triton", "reference"; None: by device).
        dtype: float32 or float64 for the parameters (and the positions passed in); None: the
            box's dtype.

    Returns:
        :class:`fastff.mm.ForceField`; ``ff(positions)`` is the energy (kJ/mol), forces by
        autograd.
    """
    dtype = box.positions.dtype if dtype is None else dtype
    x = box.exclusions.shape[0]
    zeros = torch.zeros(x, dtype=torch.float64)
    nonbonded = NonbondedParameters(
        box.charges, box.sigma, box.epsilon,
        exceptions=Exceptions(box.exclusions, zeros, torch.ones_like(zeros), zeros),
        cutoff=cutoff, method=method, dielectric=dielectric, switch_distance=switch_distance,
        dispersion_correction=dispersion_correction, periodic=True, exceptions_use_pbc=True,
        coulomb_constant=OPENMM_COULOMB_CONSTANT)
    return ForceField.from_parameters(
        box.num_atoms, box=box.cell, nonbonded=nonbonded,
        bonds=BondParameters(box.bonds, box.bond_k, box.bond_r0, periodic=True),
        angles=AngleParameters(box.angles, box.angle_k, box.angle_theta0, periodic=True),
        dtype=dtype, skin=skin, backend=backend)
