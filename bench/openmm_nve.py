"""Energy conservation of NVE runs in OpenMM with a fastff SchNet: the measurement behind the
bounds of tests/test_openmm_force.py::test_nve_water_box_with_schnet_conserves_energy.

64 relaxed TIP3P waters (fastff.systems.water_box, box.to_openmm(cutoff=0.6)), float64, OpenMM's
Reference platform, 200 VerletIntegrator steps of 0.5 fs from 300 K. Modes: "mm" (MM alone),
"ml" (MM + a random SchNet via fastff.openmm.as_force, its forces scaled to 20% of MM's RMS),
"perturbed" (the same with the SchNet forces, not its energy, multiplied by 1.1: a
non-conservative force the bounds must catch). Prints per seed: max |E(t) - E(0)| / (N kT),
std(E) / std(E_kin), |mean of last tenth - mean of first tenth| / (N kT).

Run: python bench/openmm_nve.py {mm|ml|perturbed} FIRST_SEED LAST_SEED
"""

import sys

import numpy as np
import openmm
import torch
from openmm import unit

from fastff.models import SchNet, energy_and_forces
from fastff.openmm import ModelComputation, as_force
from fastff.systems import water_box

KB = 0.0083144626  # kJ/mol/K
STEPS = 200


class Perturbed(ModelComputation):
    """Forces 1.1x the energy's gradient."""

    def __call__(self, state):
        energy, forces = super().__call__(state)
        return energy, 1.1 * forces


def schnet_force(box, seed: int, perturb: bool) -> openmm.PythonForce:
    torch.manual_seed(seed)
    model = SchNet(8, 1, 8, cutoff=0.3).double()
    ctx = openmm.Context(box.to_openmm(cutoff=0.6), openmm.VerletIntegrator(0.0005),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(box.positions.numpy())
    f_mm = ctx.getState(getForces=True).getForces(asNumpy=True)._value
    _, f_ml = energy_and_forces(model, box.species, box.positions, box.cell)
    scale = 0.2 * np.sqrt((f_mm**2).mean()) / float(f_ml.square().mean().sqrt())
    with torch.no_grad():
        model.readout[-1].weight.mul_(scale)
        model.readout[-1].bias.mul_(scale)
    force = as_force(model, box.species, periodic=True)
    if perturb:
        state = force.computation.__getstate__()
        computation = Perturbed.__new__(Perturbed)
        computation.__setstate__(state)
        force = openmm.PythonForce(computation)
        force.setUsesPeriodicBoundaryConditions(True)
    return force


def run(seed: int, mode: str) -> tuple[float, float, float]:
    box = water_box(64, seed=seed, dtype=torch.float64)
    system = box.to_openmm(cutoff=0.6)
    if mode != "mm":
        system.addForce(schnet_force(box, seed + 1000, mode == "perturbed"))
    integrator = openmm.VerletIntegrator(0.0005)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(box.positions.numpy())
    ctx.setVelocitiesToTemperature(300.0, seed + 50)
    total, kinetic = [], []
    for _ in range(STEPS):
        integrator.step(1)
        state = ctx.getState(getEnergy=True)
        kinetic.append(state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
        total.append(kinetic[-1] + state.getPotentialEnergy().value_in_unit(
            unit.kilojoule_per_mole))
    e, k = np.array(total), np.array(kinetic)
    n_kt, tenth = box.num_atoms * KB * 300.0, STEPS // 10
    return (np.abs(e - e[0]).max() / n_kt, e.std() / k.std(),
            abs(e[-tenth:].mean() - e[:tenth].mean()) / n_kt)


if __name__ == "__main__":
    mode, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for seed in range(first, last + 1):
        print(mode, seed, " ".join(f"{x:.4g}" for x in run(seed, mode)), flush=True)
