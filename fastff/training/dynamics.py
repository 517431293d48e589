"""Langevin molecular dynamics (BAOAB) for generating training frames.

BAOAB (Leimkuhler and Matthews, Appl. Math. Res. Express 2013): half kick, half drift, exact
Ornstein-Uhlenbeck velocity update, half drift, half kick. One force evaluation per step, and
configurational averages accurate to second order in the time step, which is what labelled
frames need. Units: nm, ps, dalton, kJ/mol, K.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

#: Boltzmann constant, kJ/mol/K.
BOLTZMANN = 0.00831446261815324

EnergyAndForces = Callable[[Tensor], tuple[Tensor, Tensor]]


def baoab_langevin(energy_and_forces: EnergyAndForces, positions: Tensor, masses: Tensor, *,
                   temperature: float, time_step: float, friction: float, steps: int,
                   generator: torch.Generator) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """Run ``steps`` BAOAB steps from ``positions`` with Maxwell-Boltzmann velocities.

    Args:
        energy_and_forces: positions [N, 3] -> (energy [] in kJ/mol, forces [N, 3] in
            kJ/mol/nm), detached.
        positions: float64 [N, 3] (nm), the start (not modified).
        masses: float64 [N] (dalton).
        temperature: K. time_step: ps. friction: 1/ps.
        steps: number of steps.
        generator: the source of the initial velocities and of the thermostat noise (one
            [N, 3] normal draw for the velocities, then one per step).

    Yields:
        ``(step, positions, energy, forces)`` after each step, step counted from 1.
    """
    kt = BOLTZMANN * temperature
    mass = masses[:, None]
    dt = float(time_step)
    fade = math.exp(-friction * dt)
    kick = torch.sqrt((1 - fade**2) * kt / mass)
    x = positions.clone()
    v = torch.randn(x.shape, generator=generator, dtype=torch.float64) * torch.sqrt(kt / mass)
    energy, forces = energy_and_forces(x)
    for step in range(1, steps + 1):
        v = v + 0.5 * dt * forces / mass
        x = x + 0.5 * dt * v
        v = fade * v + kick * torch.randn(x.shape, generator=generator, dtype=torch.float64)
        x = x + 0.5 * dt * v
        energy, forces = energy_and_forces(x)
        v = v + 0.5 * dt * forces / mass
        yield step, x, energy, forces
