"""fastff.mm against OpenMM's Reference platform, on systems built from files shipped inside
the openmm package: the villin headpiece (amber14) in vacuum and in TIP3P water, and a water
box; energies and forces per force group and in total."""

import os

import numpy as np
import pytest
import torch

import fastff
from fastff.testing import TOLERANCES, assert_close_scaled, neighbor_list_from_pairs

mm = pytest.importorskip("openmm")
app = pytest.importorskip("openmm.app")
unit = mm.unit
import fastff.mm as fmm  # noqa: E402

DATA = os.path.join(os.path.dirname(app.__file__), "data")
GROUPS = {"NonbondedForce": "nonbonded", "HarmonicBondForce": "harmonic_bonds",
          "HarmonicAngleForce": "harmonic_angles", "PeriodicTorsionForce": "periodic_torsions"}


def _forcefield():
    return app.ForceField("amber14-all.xml", "amber14/tip3p.xml")


def _openmm(system, positions, box=None):
    """{name: (energy, forces [N,3])} per force and "total", from the Reference platform."""
    system = mm.XmlSerializer.deserialize(mm.XmlSerializer.serialize(system))
    for k, f in enumerate(system.getForces()):
        f.setForceGroup(k)
    ctx = mm.Context(system, mm.VerletIntegrator(1.0), mm.Platform.getPlatformByName("Reference"))
    if box is not None:
        ctx.setPeriodicBoxVectors(*box)
    ctx.setPositions(positions)
    out = {}
    kj, kjnm = unit.kilojoule_per_mole, unit.kilojoule_per_mole / unit.nanometer
    for k, f in enumerate(system.getForces()):
        name = GROUPS.get(f.__class__.__name__)
        if name is None:
            continue
        st = ctx.getState(getEnergy=True, getForces=True, groups={k})
        out[name] = (st.getPotentialEnergy().value_in_unit(kj),
                     st.getForces(asNumpy=True).value_in_unit(kjnm))
    st = ctx.getState(getEnergy=True, getForces=True)
    out["total"] = (st.getPotentialEnergy().value_in_unit(kj),
                    st.getForces(asNumpy=True).value_in_unit(kjnm))
    return out


def _positions(positions, dtype):
    """Positions (nm) rounded to dtype: OpenMM gets the same rounded numbers, so float32 runs
    measure the kernels' arithmetic, not the rounding of the input (a stiff bond turns 1e-7 nm
    into 0.05 kJ/mol/nm)."""
    return np.asarray(positions.value_in_unit(unit.nanometer)).astype(
        np.float32 if dtype == torch.float32 else np.float64).astype(np.float64)


def _compare(model, positions, expected, dtype, cell=None, nl=None):
    pos = torch.tensor(positions, dtype=dtype, requires_grad=True)
    energies = model.energies(pos, cell, nl=nl)
    total = sum(energies.values())
    energies["total"] = total
    assert set(energies) == set(expected)
    for name, e in energies.items():
        (g,) = torch.autograd.grad(e, pos, retain_graph=True)
        e_ref, f_ref = expected[name]
        rtol = TOLERANCES["openmm"][dtype][0]
        assert abs(float(e) - e_ref) <= rtol * max(abs(e_ref), 1e-8), (name, float(e), e_ref)
        assert_close_scaled(-g, torch.as_tensor(f_ref), "openmm", dtype, f"{name} forces")
    # forward: the same total with the bonded terms in one fused op
    e = model(pos, cell, nl=nl)
    (g,) = torch.autograd.grad(e, pos)
    e_ref, f_ref = expected["total"]
    assert abs(float(e) - e_ref) <= TOLERANCES["openmm"][dtype][0] * max(abs(e_ref), 1e-8)
    assert_close_scaled(-g, torch.as_tensor(f_ref), "openmm", dtype, "forward forces")


@pytest.fixture(scope="module")
def villin():
    pdb = app.PDBFile(os.path.join(DATA, "test.pdb"))
    mod = app.Modeller(pdb.topology, pdb.positions)
    mod.deleteWater()
    return mod


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["NoCutoff", "CutoffNonPeriodic"])
def test_protein_in_vacuum(villin, method, dtype):
    system = _forcefield().createSystem(villin.topology, nonbondedMethod=getattr(app, method),
                                        nonbondedCutoff=1.0 * unit.nanometer, constraints=None)
    model = fmm.ForceField.from_openmm(system, dtype=dtype)
    pos = _positions(villin.positions, dtype)
    _compare(model, pos, _openmm(system, pos), dtype)


def _water_box(size, switch, cutoff=0.9):
    ff = _forcefield()
    mod = app.Modeller(app.Topology(), [])
    mod.addSolvent(ff, model="tip3p", boxSize=mm.Vec3(size, size, size) * unit.nanometer)
    system = ff.createSystem(mod.topology, nonbondedMethod=app.CutoffPeriodic,
                             nonbondedCutoff=cutoff * unit.nanometer, constraints=None,
                             rigidWater=False, switchDistance=switch)
    return mod, system


def _vesin_list(pos, cell, cutoff):
    vesin = pytest.importorskip("vesin")
    i, j, s = vesin.NeighborList(cutoff=cutoff, full_list=True).compute(
        pos, cell.double().numpy(), True, "ijS")
    return neighbor_list_from_pairs(i, j, s, num_atoms=len(pos), cutoff=cutoff, cell=cell)


def test_small_water_box_owned_verlet_list():
    """~580 atoms of flexible TIP3P in a 1.8 nm box with the module's own Verlet list:
    periodic reaction field, switching, dispersion correction."""
    mod, system = _water_box(1.8, 0.6, cutoff=0.8)
    model = fmm.ForceField.from_openmm(system)
    assert model.dispersion_correction
    pos = _positions(mod.positions, torch.float64)
    _compare(model, pos, _openmm(system, pos), torch.float64)
    assert model.verlet.rebuilds == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("switch", [None, 0.7])
def test_water_box(dtype, switch):
    """Flexible TIP3P in a 2.5 nm box, periodic reaction field with and without switching."""
    mod, system = _water_box(2.5, switch)
    model = fmm.ForceField.from_openmm(system, dtype=dtype)
    pos = _positions(mod.positions, dtype)
    nl = _vesin_list(pos, model.box, 1.0)
    _compare(model, pos, _openmm(system, pos), dtype, nl=nl)


def test_protein_in_water(villin):
    """The villin headpiece in its TIP3P box (8,867 atoms, the one larger comparison); pairs
    from vesin as the neighbor list."""
    pdb = app.PDBFile(os.path.join(DATA, "test.pdb"))
    system = _forcefield().createSystem(pdb.topology, nonbondedMethod=app.CutoffPeriodic,
                                        nonbondedCutoff=0.9 * unit.nanometer, constraints=None,
                                        rigidWater=False)
    model = fmm.ForceField.from_openmm(system)
    pos = _positions(pdb.positions, torch.float64)
    nl = _vesin_list(pos, model.box, 0.95)
    _compare(model, pos, _openmm(system, pos), torch.float64, nl=nl)


def test_virial_matches_openmm_finite_differences():
    """dE/dcell from the kernels against central differences of OpenMM energies under an
    isotropic scaling of box and positions (the pressure virial)."""
    mod, system = _water_box(2.5, 0.7)
    model = fmm.ForceField.from_openmm(system)
    pos = torch.tensor(np.asarray(mod.positions.value_in_unit(unit.nanometer)))
    cell = model.box.clone()
    nl = _vesin_list(pos.numpy(), cell, 1.0)  # the same pairs (with shifts) after scaling
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    energy = model(pos * scale, cell * scale, nl=nl)
    (de_ds,) = torch.autograd.grad(energy, scale)

    def openmm_energy(f):
        box = [mm.Vec3(*(f * model.box[k]).tolist()) * unit.nanometer for k in range(3)]
        return _openmm(system, (pos.numpy() * f) * unit.nanometer, box)["total"][0]

    h = 1e-5
    fd = (openmm_energy(1 + h) - openmm_energy(1 - h)) / (2 * h)
    assert abs(float(de_ds) - fd) <= 1e-5 * abs(fd) + 1e-3, (float(de_ds), fd)


def test_batch_of_molecules_matches_separate_calls(villin):
    """Two copies of the protein (different conformations by noise) in one batch: energies per
    system equal separate calls, for every term."""
    system = _forcefield().createSystem(villin.topology, nonbondedMethod=app.NoCutoff,
                                        constraints=None)
    model = fmm.ForceField.from_openmm(system)
    base = torch.tensor(np.asarray(villin.positions.value_in_unit(unit.nanometer)))
    n = base.shape[0]
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    confs = [base + 0.01 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
             for _ in range(2)]
    pos = torch.cat(confs)
    batch = torch.arange(2).repeat_interleave(n)

    def repeat(index):
        return torch.cat([index + k * n for k in range(2)])

    nl = fastff.neighbor_list(pos, 3.0, batch=batch)  # within each molecule: every pair
    ex = model.exception_index
    exceptions = (repeat(ex), model.exception_charge_prod.repeat(2),
                  model.exception_sigma.repeat(2), model.exception_epsilon.repeat(2))
    batched = {
        "nonbonded": fmm.nonbonded(pos, nl, model.charges.repeat(2), model.sigma.repeat(2),
                                   model.epsilon.repeat(2), cutoff=3.0, method="plain",
                                   exceptions=exceptions, batch=batch,
                                   coulomb_constant=fmm.forcefield.OPENMM_COULOMB_CONSTANT),
        "harmonic_bonds": fmm.harmonic_bonds(pos, repeat(model.bond_index),
                                             model.bond_k.repeat(2), model.bond_r0.repeat(2),
                                             batch=batch),
        "harmonic_angles": fmm.harmonic_angles(pos, repeat(model.angle_index),
                                               model.angle_k.repeat(2),
                                               model.angle_theta0.repeat(2), batch=batch),
        "periodic_torsions": fmm.periodic_torsions(
            pos, repeat(model.torsion_index), model.torsion_k.repeat(2),
            model.torsion_periodicity.repeat(2), model.torsion_phase.repeat(2), batch=batch),
    }
    for b, conf in enumerate(confs):
        single = model.energies(conf)
        for name, e in batched.items():
            assert e.shape == (2,)
            if name == "nonbonded":
                # the 3 nm list may miss pairs of this 584-atom protein: compare with the same
                # cutoff on a single-system list
                one = fastff.neighbor_list(conf, 3.0)
                single[name] = fmm.nonbonded(
                    conf, one, model.charges, model.sigma, model.epsilon, cutoff=3.0,
                    method="plain", exceptions=(ex, model.exception_charge_prod,
                                                model.exception_sigma, model.exception_epsilon),
                    coulomb_constant=fmm.forcefield.OPENMM_COULOMB_CONSTANT)
            assert_close_scaled(e[b], single[name], "mm", torch.float64, f"{name} system {b}")


def test_unsupported_forces_and_methods_are_named(villin):
    ff = _forcefield()
    system = ff.createSystem(villin.topology, nonbondedMethod=app.NoCutoff)
    pme = ff.createSystem(villin.topology, nonbondedMethod=app.NoCutoff)
    for f in pme.getForces():
        if isinstance(f, mm.NonbondedForce):
            f.setNonbondedMethod(mm.NonbondedForce.PME)
    with pytest.raises(ValueError, match="PME"):
        fmm.ForceField.from_openmm(pme)
    system.addForce(mm.CustomBondForce("k*r^2"))
    with pytest.raises(ValueError, match="CustomBondForce"):
        fmm.ForceField.from_openmm(system)


def test_parameters_learnable_and_second_derivatives_match_reference(villin):
    """Force matching on the protein: d/dparams of |F|^2 with the fused kernels equals the
    torch reference path, for every parameter."""
    system = _forcefield().createSystem(villin.topology, nonbondedMethod=app.CutoffNonPeriodic,
                                        nonbondedCutoff=1.0 * unit.nanometer, constraints=None)
    pos0 = torch.tensor(np.asarray(villin.positions.value_in_unit(unit.nanometer)))
    grads = {}
    for backend in ("numba", "reference"):
        model = fmm.ForceField.from_openmm(system, backend=backend)
        pos = pos0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(pos), pos, create_graph=True)
        loss = (g * g).sum()
        names = [n for n, _ in model.named_parameters()]
        found = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        grads[backend] = dict(zip(names, found, strict=False))
    assert len(grads["numba"]) == 12
    for name, g in grads["numba"].items():
        expected = grads["reference"][name]
        assert g is not None and expected is not None, name
        if name == "epsilon":  # sqrt combining rule: undefined where epsilon == 0
            keep = torch.isfinite(expected)
            g, expected = g[keep], expected[keep]
        assert_close_scaled(g, expected, "mm", torch.float64, name)
