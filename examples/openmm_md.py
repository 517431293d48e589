"""Molecular dynamics in OpenMM with a fastff model: as_force, then openmmml's MLPotential.
Run: python examples/openmm_md.py

The model runs in Python inside OpenMM's step (an openmm.PythonForce), with its own Verlet list;
units come from the model (fastff's SchNet: nm and kJ/mol, OpenMM's own).
"""

import openmm
import torch
from openmm import app, unit

from fastff.models import SchNet
from fastff.openmm import as_force
from fastff.systems import water_box

# 1. 216 TIP3P waters: the MM System from fastff's water box, plus a (random) SchNet on top,
#    its forces scaled down: an untrained model is a stand-in for a trained correction.
box = water_box(216, seed=0, dtype=torch.float64)
torch.manual_seed(0)
model = SchNet(32, 2, 16, cutoff=0.4).double()
with torch.no_grad():
    model.readout[-1].weight.mul_(0.1)
system = box.to_openmm(cutoff=0.9)
force = as_force(model, box.species, periodic=True)
force.setForceGroup(1)
system.addForce(force)

# 2. NVE at 0.5 fs from 300 K on OpenMM's CPU platform.
integrator = openmm.VerletIntegrator(0.5 * unit.femtoseconds)
simulation = app.Simulation(app.Topology(), system, integrator,
                            openmm.Platform.getPlatformByName("CPU"))
simulation.context.setPositions(box.positions.numpy())
simulation.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
for step in range(0, 60, 20):
    simulation.step(20)
    state = simulation.context.getState(getEnergy=True)
    ml = simulation.context.getState(getEnergy=True, groups={1}).getPotentialEnergy()
    e_pot, e_kin = state.getPotentialEnergy(), state.getKineticEnergy()
    print(f"step {step + 20:3d}  E_pot {e_pot.value_in_unit(unit.kilojoule_per_mole):10.2f}  "
          f"E_tot {(e_pot + e_kin).value_in_unit(unit.kilojoule_per_mole):10.2f} kJ/mol  "
          f"(SchNet {ml.value_in_unit(unit.kilojoule_per_mole):9.4f})")
verlet = force.computation.verlet
print(f"{verlet.steps} model calls, {verlet.rebuilds} neighbor-list builds")

# 3. The same model through openmmml: MLPotential("fastff", model=...) for any Topology
#    (createMixedSystem(topology, mm_system, ml_atoms) puts only some atoms on the model).
try:
    from openmmml import MLPotential
except ImportError:
    raise SystemExit("openmmml is not installed: skipping MLPotential") from None
topology = app.Topology()
chain = topology.addChain()
for _ in range(box.num_molecules):
    residue = topology.addResidue("HOH", chain)
    oxygen = topology.addAtom("O", app.element.oxygen, residue)
    for name in ("H1", "H2"):
        topology.addBond(oxygen, topology.addAtom(name, app.element.hydrogen, residue))
topology.setPeriodicBoxVectors(box.cell.numpy() * unit.nanometer)
ml_system = MLPotential("fastff", model=model).createSystem(topology)
context = openmm.Context(ml_system, openmm.VerletIntegrator(0.0005))
context.setPositions(box.positions.numpy())
print("MLPotential('fastff') energy:", context.getState(getEnergy=True).getPotentialEnergy())
