"""fastff inside OpenMM: fastff.openmm.as_force against fastff's direct call, units, NVE energy
conservation of the water box, the openmmml plugin (createSystem, createMixedSystem with a
molecule on the model in water), serialization and bad input."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from fastff.models import SchNet, energy_and_forces
from fastff.systems import water_box
from fastff.testing import assert_close_scaled

openmm = pytest.importorskip("openmm")
app = pytest.importorskip("openmm.app")
from openmm import unit  # noqa: E402

from fastff.openmm import as_force  # noqa: E402

KJ_PER_MOL_PER_EV = 96.48533212331002  # CODATA 2018, as OpenMM
KB = 0.0083144626  # kJ/mol/K
MM_CUTOFF = 0.6  # nm: reaction field needs cutoff <= half the 1.25 nm box of 64 waters


@pytest.fixture(scope="module")
def water():
    """64 relaxed TIP3P waters (192 atoms, 1.25 nm box), float64; a fresh seed per run."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"water box seed: {seed}")
    return water_box(64, seed=seed, dtype=torch.float64)


def small_schnet(rng, *, size=16, interactions=2, cutoff=0.4) -> SchNet:
    torch.manual_seed(int(rng.integers(2**31)))
    return SchNet(size, interactions, size, cutoff=cutoff).double()


def context(system, platform="Reference"):
    return openmm.Context(system, openmm.VerletIntegrator(0.0005),
                          openmm.Platform.getPlatformByName(platform))


def energy_forces(ctx, group=None):
    """(kJ/mol, kJ/mol/nm [N, 3]) of the Context's force group (or every force)."""
    kwargs = {} if group is None else {"groups": {group}}
    state = ctx.getState(getEnergy=True, getForces=True, **kwargs)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def ml_only_system(box) -> openmm.System:
    """The water box's particles and cell, no forces."""
    system = box.to_openmm(cutoff=MM_CUTOFF)
    for k in reversed(range(system.getNumForces())):
        system.removeForce(k)
    return system


def water_topology(box) -> app.Topology:
    top = app.Topology()
    chain = top.addChain()
    for _ in range(box.num_molecules):
        residue = top.addResidue("HOH", chain)
        o = top.addAtom("O", app.element.oxygen, residue)
        for name in ("H1", "H2"):
            top.addBond(o, top.addAtom(name, app.element.hydrogen, residue))
    top.setPeriodicBoxVectors(box.cell.numpy() * unit.nanometer)
    return top


def assert_matches(energy, forces, expected_energy, expected_forces):
    # float64 on both sides; OpenMM only converts: 1e-8 relative is the bar
    assert abs(energy - expected_energy) <= 1e-8 * abs(expected_energy)
    assert_close_scaled(torch.as_tensor(forces), torch.as_tensor(expected_forces), "training",
                        torch.float64, "forces")


# --- the force against the direct call ----------------------------------------------------------

def test_periodic_force_matches_direct_call(rng, water):
    model = small_schnet(rng)
    system = ml_only_system(water)
    force = as_force(model, water.species, periodic=True)
    assert isinstance(force, openmm.PythonForce) and force.usesPeriodicBoundaryConditions()
    system.addForce(force)
    ctx = context(system)
    positions = water.positions.clone()
    positions[::7] += water.cell[0]  # unwrapped atoms: images come from the cell
    ctx.setPositions(positions.numpy())
    e0, f0 = energy_and_forces(model, water.species, positions, water.cell)
    assert_matches(*energy_forces(ctx), float(e0), f0.numpy())
    assert all(p.requires_grad for p in model.parameters())  # restored after the call


def test_subset_of_atoms_nonperiodic(rng, water):
    """A force on some atoms of a larger System, as an isolated cluster: zero force elsewhere."""
    model = small_schnet(rng)
    atoms = sorted(rng.choice(water.num_atoms, 40, replace=False).tolist())
    system = ml_only_system(water)
    system.addForce(as_force(model, water.species[atoms], atoms=atoms))
    ctx = context(system)
    ctx.setPositions(water.positions.numpy())
    energy, forces = energy_forces(ctx)
    e0, f0 = energy_and_forces(model, water.species[atoms], water.positions[atoms])
    assert_matches(energy, forces[atoms], float(e0), f0.numpy())
    others = np.setdiff1d(np.arange(water.num_atoms), atoms)
    assert not forces[others].any()


def test_verlet_list_is_reused_across_steps(rng, water):
    model = small_schnet(rng)
    system = water.to_openmm(cutoff=MM_CUTOFF)
    force = as_force(model, water.species, periodic=True)
    force.setForceGroup(1)
    system.addForce(force)
    ctx = context(system, "CPU")
    ctx.setPositions(water.positions.numpy())
    ctx.setVelocitiesToTemperature(300.0, int(rng.integers(2**31)))
    ctx.getIntegrator().step(40)
    verlet = force.computation.verlet
    assert verlet is not None and verlet.steps >= 40
    assert verlet.rebuilds < 10  # 0.05 nm skin; 40 rebuilds without reuse
    # after the steps, the force still equals the direct call at the current positions
    positions = torch.as_tensor(ctx.getState(getPositions=True).getPositions(asNumpy=True)
                                .value_in_unit(unit.nanometer))
    e0, f0 = energy_and_forces(model, water.species, positions, water.cell)
    assert_matches(*energy_forces(ctx, 1), float(e0), f0.numpy())


# --- units --------------------------------------------------------------------------------------

def test_model_units_are_converted(rng, water):
    """A model in Angstrom and eV: OpenMM sees kJ/mol and nm."""
    model = small_schnet(rng, cutoff=4.0)
    model.length_unit, model.energy_unit = "Angstrom", "eV"
    system = ml_only_system(water)
    system.addForce(as_force(model, water.species, periodic=True))
    ctx = context(system)
    ctx.setPositions(water.positions.numpy())
    e0, f0 = energy_and_forces(model, water.species, water.positions * 10, water.cell * 10)
    assert_matches(*energy_forces(ctx), float(e0) * KJ_PER_MOL_PER_EV,
                   f0.numpy() * KJ_PER_MOL_PER_EV * 10)


def test_units_must_agree_and_exist(rng):
    model = small_schnet(rng)  # nm, kJ/mol
    species = [8, 1, 1]
    with pytest.raises(ValueError, match="length_unit='Angstrom' contradicts"):
        as_force(model, species, length_unit="Angstrom")
    as_force(model, species, length_unit="nm", energy_unit="kJ/mol")
    model.energy_unit = None
    with pytest.raises(ValueError, match="no energy_unit and none was given"):
        as_force(model, species)
    as_force(model, species, energy_unit="kcal/mol")
    model.length_unit = "Angstrom"  # a 0.4 cutoff meant for nm
    with pytest.raises(ValueError, match="shorter than any bond"):
        as_force(model, species, energy_unit="eV")


# --- NVE ------------------------------------------------------------------------------------------

def run_nve(system, box, seed: int, steps: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(total, kinetic) energy (kJ/mol) after each of ``steps`` 0.5 fs Verlet steps from 300 K."""
    integrator = openmm.VerletIntegrator(0.0005)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(box.positions.numpy())
    ctx.setVelocitiesToTemperature(300.0, seed)
    total, kinetic = [], []
    for _ in range(steps):
        integrator.step(1)
        state = ctx.getState(getEnergy=True)
        kinetic.append(state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
        total.append(kinetic[-1] + state.getPotentialEnergy().value_in_unit(
            unit.kilojoule_per_mole))
    return np.array(total), np.array(kinetic)


def test_nve_water_box_with_schnet_conserves_energy(rng, water):
    # A SchNet with random weights does not bind water, so it runs on top of the MM force field
    # (as in tests/test_ase.py), its forces scaled to 20% of the MM forces (RMS).
    model = small_schnet(rng, size=8, interactions=1, cutoff=0.3)
    mm = context(water.to_openmm(cutoff=MM_CUTOFF))
    mm.setPositions(water.positions.numpy())
    _, f_mm = energy_forces(mm)
    _, f_ml = energy_and_forces(model, water.species, water.positions, water.cell)
    scale = 0.2 * np.sqrt((f_mm**2).mean()) / float(f_ml.square().mean().sqrt())
    with torch.no_grad():
        model.readout[-1].weight.mul_(scale)
        model.readout[-1].bias.mul_(scale)
    system = water.to_openmm(cutoff=MM_CUTOFF)
    system.addForce(as_force(model, water.species, periodic=True))
    total, kinetic = run_nve(system, water, int(rng.integers(2**31)))
    # Bounds from bench/openmm_nve.py (this setup: 64 waters, 200 steps of 0.5 fs, float64,
    # Reference platform), box seeds 0-5: max |E(t) - E(0)| <= 0.0099 N kT, std(E) / std(E_kin)
    # <= 0.025, |last tenth - first tenth| <= 0.0041 N kT, MM alone and MM + SchNet alike
    # (Verlet's error on the O-H stretch). The bounds leave 3.0x, 3.2x and 3.7x; SchNet forces
    # scaled by 1.1 (its energy not) gave at least 0.084, 0.148 and 0.070 on every seed.
    n_kt = water.num_atoms * KB * 300.0
    tenth = len(total) // 10
    assert np.isfinite(total).all()
    assert np.abs(total - total[0]).max() < NVE_MAX * n_kt
    assert total.std() < NVE_STD * kinetic.std()
    assert abs(total[-tenth:].mean() - total[:tenth].mean()) < NVE_DRIFT * n_kt


NVE_MAX, NVE_STD, NVE_DRIFT = 0.03, 0.08, 0.015


# --- openmmml ----------------------------------------------------------------------------------

def test_openmmml_create_system(rng, water):
    from openmmml import MLPotential

    model = small_schnet(rng)
    potential = MLPotential("fastff", model=model)
    system = potential.createSystem(water_topology(water))
    ctx = context(system)
    ctx.setPositions(water.positions.numpy())
    e0, f0 = energy_and_forces(model, water.species, water.positions, water.cell)
    assert_matches(*energy_forces(ctx), float(e0), f0.numpy())


def test_openmmml_takes_a_torch_geometric_schnet(rng, water):
    from openmmml import MLPotential

    pyg = pytest.importorskip("torch_geometric.nn.models.schnet")
    torch.manual_seed(int(rng.integers(2**31)))
    original = pyg.SchNet(16, 16, 2, 10, cutoff=4.0).double()
    with pytest.raises(ValueError, match="energy_unit"):
        MLPotential("fastff", model=original)
    system = MLPotential("fastff", model=original, energy_unit="eV").createSystem(
        water_topology(water))
    ctx = context(system)
    ctx.setPositions(water.positions.numpy())
    converted = SchNet.from_pyg(original, energy_unit="eV")
    e0, f0 = energy_and_forces(converted, water.species, water.positions * 10, water.cell * 10)
    assert_matches(*energy_forces(ctx), float(e0) * KJ_PER_MOL_PER_EV,
                   f0.numpy() * KJ_PER_MOL_PER_EV * 10)


def alanine_dipeptide_in_water(edge: float = 2.2):
    """ACE-ALA-NME cut from OpenMM's villin (test.pdb: residues LYS-ALA-VAL, the neighbours'
    backbone atoms becoming the caps), hydrogens added and solvated in a cubic TIP3P box of
    ``edge`` nm. Returns (topology, positions, amber14 force field)."""
    pdb = app.PDBFile(os.path.join(os.path.dirname(app.__file__), "data", "test.pdb"))
    xyz = pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    before, ala, after = list(pdb.topology.residues())[6:9]
    assert ala.name == "ALA"
    top, positions = app.Topology(), []
    chain = top.addChain()

    def add(residue, name, element, source, atom_name):
        positions.append(xyz[next(a for a in source.atoms() if a.name == atom_name).index])
        return top.addAtom(name, element, residue)

    ace = top.addResidue("ACE", chain)
    add(ace, "CH3", app.element.carbon, before, "CA")
    add(ace, "C", app.element.carbon, before, "C")
    add(ace, "O", app.element.oxygen, before, "O")
    middle = top.addResidue("ALA", chain)
    for atom in ala.atoms():
        add(middle, atom.name, atom.element, ala, atom.name)
    nme = top.addResidue("NME", chain)
    add(nme, "N", app.element.nitrogen, after, "N")
    add(nme, "H", app.element.hydrogen, after, "H")
    add(nme, "C", app.element.carbon, after, "CA")
    top.createStandardBonds()
    forcefield = app.ForceField("amber14-all.xml", "amber14/tip3p.xml")
    modeller = app.Modeller(top, np.array(positions) * unit.nanometer)
    modeller.addHydrogens(forcefield)
    modeller.addSolvent(forcefield, boxSize=openmm.Vec3(edge, edge, edge) * unit.nanometer)
    return modeller.topology, modeller.getPositions(), forcefield


def test_openmmml_mixed_system_runs(rng):
    """ML/MM: alanine dipeptide on the model, water and the coupling on amber14/TIP3P."""
    from openmmml import MLPotential

    topology, positions, forcefield = alanine_dipeptide_in_water()
    mm_system = forcefield.createSystem(topology, nonbondedMethod=app.CutoffPeriodic,
                                        nonbondedCutoff=0.9 * unit.nanometer)
    ml_atoms = [a.index for a in topology.atoms() if a.residue.name != "HOH"]
    assert len(ml_atoms) == 22
    model = small_schnet(rng, cutoff=0.5)
    with torch.no_grad():  # forces of the size of MM's: the model replaces the bonded terms
        model.readout[-1].weight.mul_(0.1)
    system = MLPotential("fastff", model=model).createMixedSystem(
        topology, mm_system, ml_atoms, forceGroup=1)
    integrator = openmm.VerletIntegrator(0.0005)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    ctx.setPositions(positions)
    ctx.setVelocitiesToTemperature(300.0, int(rng.integers(2**31)))
    integrator.step(20)
    state = ctx.getState(getEnergy=True, getPositions=True)
    assert np.isfinite(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    # the ML group is the model's energy of the molecule at the current positions
    x = torch.as_tensor(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))[ml_atoms]
    species = torch.tensor([a.element.atomic_number for a in topology.atoms()])[ml_atoms]
    box = torch.as_tensor(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(
        unit.nanometer))
    e0, f0 = energy_and_forces(model, species, x, box)
    energy, forces = energy_forces(ctx, 1)
    assert_matches(energy, forces[ml_atoms], float(e0), f0.numpy())
    assert not np.delete(forces, ml_atoms, axis=0).any()


# --- serialization and bad input ----------------------------------------------------------------

def test_system_serializes_with_the_model(rng, water):
    model = small_schnet(rng)
    system = ml_only_system(water)
    system.addForce(as_force(model, water.species, periodic=True))
    copied = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    for s in (copy.deepcopy(system), copied):
        ctx = context(s)
        ctx.setPositions(water.positions.numpy())
        e0, f0 = energy_and_forces(model, water.species, water.positions, water.cell)
        assert_matches(*energy_forces(ctx), float(e0), f0.numpy())


def test_model_with_a_used_verlet_list_serializes(rng, water):
    """A model that keeps its own Verlet list (skin > 0), already used: the System still
    serializes (the list's weak references stay behind)."""
    torch.manual_seed(int(rng.integers(2**31)))
    model = SchNet(16, 2, 16, cutoff=0.4, skin=0.05).double()
    e0, f0 = energy_and_forces(model, water.species, water.positions, water.cell)
    system = ml_only_system(water)
    system.addForce(as_force(model, water.species, periodic=True))
    copied = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    ctx = context(copied)
    ctx.setPositions(water.positions.numpy())
    assert_matches(*energy_forces(ctx), float(e0), f0.numpy())
    assert model.verlet.skin_list is not None  # the original keeps its list


def test_bad_input(rng):
    model = small_schnet(rng)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        as_force(lambda s: 0, [1])
    with pytest.raises(ValueError, match=r"species\[1\] = 300"):
        as_force(model, [1, 300])
    with pytest.raises(ValueError, match="atoms has 2 indices but species has 3"):
        as_force(model, [8, 1, 1], atoms=[0, 1])
    with pytest.raises(ValueError, match="distinct"):
        as_force(model, [8, 1], atoms=[3, 3])
    with pytest.raises(TypeError, match="periodic"):
        as_force(model, [8, 1], periodic="yes")
    with pytest.raises(ValueError, match="skin"):
        as_force(model, [8, 1], skin=-1.0)
    pyg = pytest.importorskip("torch_geometric.nn.models.schnet")
    with pytest.raises(TypeError, match="from_pyg"):
        as_force(pyg.SchNet(8, 8, 1, 4), [8, 1])
    from openmmml import MLPotential

    with pytest.raises(ValueError, match="needs model="):
        MLPotential("fastff")
    with pytest.raises(TypeError, match="unexpected arguments"):
        MLPotential("fastff", model=model, precision="single")
