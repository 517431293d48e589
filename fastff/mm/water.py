"""The MM force field of a box of flexible TIP3P water, without OpenMM.

:func:`water_force_field` reads the box's topology and parameters through the
:class:`WaterTopology` protocol, which :class:`fastff.systems.WaterBox` satisfies: fastff.mm
does not import fastff.systems (the systems module builds on mm, to relax its boxes, never the
other way).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from fastff.mm._terms import Exceptions
from fastff.mm.forcefield import (
    OPENMM_COULOMB_CONSTANT,
    AngleParameters,
    BondParameters,
    ForceField,
    NonbondedParameters,
)


class WaterTopology(Protocol):
    """What :func:`water_force_field` reads from a water box (shapes as in
    :class:`fastff.systems.WaterBox`; M molecules, N = 3M atoms)."""

    positions: Tensor  # [N, 3] (nm); only its dtype is read
    cell: Tensor  # [3, 3] (nm)
    charges: Tensor  # [N] (e)
    sigma: Tensor  # [N] (nm)
    epsilon: Tensor  # [N] (kJ/mol)
    exclusions: Tensor  # int64 [3M, 2]
    bonds: Tensor  # int64 [2M, 2]
    bond_k: Tensor  # [2M] (kJ/mol/nm^2)
    bond_r0: Tensor  # [2M] (nm)
    angles: Tensor  # int64 [M, 3]
    angle_k: Tensor  # [M] (kJ/mol/rad^2)
    angle_theta0: Tensor  # [M] (rad)

    @property
    def num_atoms(self) -> int: ...


def water_force_field(box: WaterTopology, *, cutoff: float = 0.9, skin: float = 0.1,
                      method: str = "reaction_field", dielectric: float = 78.3,
                      switch_distance: float | None = None, dispersion_correction: bool = False,
                      backend: str | None = None, dtype: torch.dtype | None = None,
                      bonded: bool = True) -> ForceField:
    """Lennard-Jones + Coulomb within ``cutoff`` + harmonic bonds + harmonic angles of a water
    box, with the intramolecular pairs excluded: the energy of ``box.to_openmm(...)`` with the
    same arguments, computed by fastff's kernels.

    Bonds and angles take the minimum image, so positions may be wrapped per atom. Coulomb uses
    OpenMM's constant (138.935457 kJ mol^-1 nm e^-2).

    Args:
        box: a :class:`fastff.systems.WaterBox` (or any :class:`WaterTopology`); its cell is
            the default cell.
        cutoff: nm; periodic reaction field needs cutoff <= half the box edge.
        skin: Verlet skin (nm) of the module's neighbor list.
        method: "reaction_field" (OpenMM's CutoffPeriodic) or "plain" (truncated 1/r).
        dielectric: reaction-field dielectric constant.
        switch_distance: nm, Lennard-Jones switching from here to the cutoff; None: none.
        dispersion_correction: OpenMM's long-range Lennard-Jones correction.
        backend: kernel path ("numba", "triton", "reference"; None: by device).
        dtype: float32 or float64 for the parameters (and the positions passed in); None: the
            box's dtype.
        bonded: False leaves out the bonds and angles: for rigid molecules, whose bonded forces
            are internal and cancel in each molecule's net force and torque (and whose first
            call then compiles no bonded kernel).

    Returns:
        :class:`fastff.mm.ForceField`; ``ff(positions)`` is the energy (kJ/mol), forces by
        autograd.
    """
    if not isinstance(bonded, bool):
        raise TypeError(f"water_force_field: bonded must be a bool, got {bonded!r}")
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
        bonds=BondParameters(box.bonds, box.bond_k, box.bond_r0, periodic=True) if bonded
        else None,
        angles=AngleParameters(box.angles, box.angle_k, box.angle_theta0, periodic=True)
        if bonded else None,
        dtype=dtype, skin=skin, backend=backend)
