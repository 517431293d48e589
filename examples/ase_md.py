"""Molecular dynamics with ASE on fastff's MM water: water box -> force field -> ASE calculator
-> a few NVE steps. Run: python examples/ase_md.py

fastff works in nm and kJ/mol; fastff.ase.Calculator converts to ASE's Angstrom and eV.
"""

import numpy as np
import torch
from ase import units
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.md.verlet import VelocityVerlet

from fastff.ase import Calculator
from fastff.mm import water_force_field
from fastff.systems import water_box

# 1. 216 relaxed flexible TIP3P waters and their MM energy (reaction field, 0.9 nm cutoff).
box = water_box(216, seed=0, dtype=torch.float64)
ff = water_force_field(box, cutoff=0.9)

# 2. As ASE Atoms (Angstrom) with the fastff calculator (energies in eV, forces in eV/A).
atoms = box.to_ase()
atoms.calc = Calculator(ff)
print(f"{len(atoms)} atoms, E_pot {atoms.get_potential_energy():.4f} eV, "
      f"pressure {-atoms.get_stress()[:3].mean() / units.bar:.0f} bar")

# 3. NVE: 0.5 fs velocity Verlet from 300 K; the force field's Verlet list is reused.
thermalize_momenta(atoms, 300.0, rng=np.random.default_rng(0))
Stationary(atoms)
dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)


def report():
    e_pot, e_kin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
    print(f"step {dyn.nsteps:3d}  E_pot {e_pot:10.4f}  E_kin {e_kin:8.4f}  "
          f"E_tot {e_pot + e_kin:10.4f} eV  T {atoms.get_temperature():6.1f} K")


dyn.attach(report, interval=10)
dyn.run(50)
print(f"{ff.verlet.steps} force calls, {ff.verlet.rebuilds} neighbor-list builds")
