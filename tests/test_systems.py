"""fastff.systems (water_box, random_gas) and fastff.mm.water_force_field: box layout and
parameters against OpenMM's own tip3p.xml, geometry and contacts checked with ASE, energies and
forces against OpenMM's Reference platform on ``box.to_openmm()``."""

import math
import os
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

import fastff.mm as fmm
from fastff.systems import WaterBox, random_gas, water_box
from fastff.testing import TOLERANCES, assert_close_scaled

AVOGADRO = 6.02214076e23


def _seed(rng) -> int:
    return int(rng.integers(0, 2**31))


def _molecules_per_nm3(box: WaterBox) -> float:
    return box.num_molecules / float(torch.linalg.det(box.cell.double()))


@pytest.fixture(scope="module")
def tip3p_xml():
    app = pytest.importorskip("openmm.app")
    root = ET.parse(os.path.join(os.path.dirname(app.__file__), "data", "tip3p.xml")).getroot()
    types = {t.get("name"): t.attrib for t in root.iter("Type")}
    nonbonded = {a.get("type"): a.attrib for a in root.find("NonbondedForce").iter("Atom")}
    return dict(types=types, nonbonded=nonbonded, bond=root.find("HarmonicBondForce/Bond").attrib,
                angle=root.find("HarmonicAngleForce/Angle").attrib)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_water_box_layout_and_parameters_match_openmm_tip3p(rng, dtype, tip3p_xml):
    n = int(rng.integers(5, 40))
    box = water_box(n, seed=_seed(rng), dtype=dtype, relax_steps=0)
    N = 3 * n
    assert (box.num_atoms, box.num_molecules) == (N, n)
    assert box.positions.shape == (N, 3) and box.cell.shape == (3, 3)
    for name in ("positions", "cell", "masses", "charges", "sigma", "epsilon", "bond_k",
                 "bond_r0", "angle_k", "angle_theta0"):
        assert getattr(box, name).dtype == dtype, name
    for name, shape in (("species", (N,)), ("bonds", (2 * n, 2)), ("angles", (n, 3)),
                        ("exclusions", (3 * n, 2))):
        t = getattr(box, name)
        assert t.dtype == torch.int64 and t.shape == shape, name
    assert box.pbc.tolist() == [True] * 3
    assert torch.equal(box.cell, torch.diag(box.cell.diagonal()))  # cubic
    assert float(box.cell[0, 0]) == float(box.cell[1, 1]) == float(box.cell[2, 2])
    o = torch.arange(n) * 3
    assert box.species.tolist() == [8, 1, 1] * n
    assert torch.equal(box.bonds, torch.stack([o, o + 1, o, o + 2], 1).reshape(-1, 2))
    assert torch.equal(box.angles, torch.stack([o + 1, o, o + 2], 1))
    pairs = {tuple(sorted(p)) for p in box.exclusions.tolist()}
    assert pairs == {(a, a + d) for a in o.tolist() for d in (1, 2)} | {
        (a + 1, a + 2) for a in o.tolist()}
    types, nb = tip3p_xml["types"], tip3p_xml["nonbonded"]
    for k, element in enumerate(("O", "H", "H")):
        t = f"tip3p-{element}"
        expected = dict(masses=float(types[t]["mass"]), charges=float(nb[t]["charge"]),
                        sigma=float(nb[t]["sigma"]), epsilon=float(nb[t]["epsilon"]))
        for name, value in expected.items():
            torch.testing.assert_close(getattr(box, name)[k::3],
                                       torch.full((n,), value, dtype=dtype), rtol=0, atol=0)
    for name, key in (("bond_k", "k"), ("bond_r0", "length")):
        assert torch.all(getattr(box, name) == torch.tensor(float(tip3p_xml["bond"][key]),
                                                            dtype=dtype)), name
    for name, key in (("angle_k", "k"), ("angle_theta0", "angle")):
        assert torch.all(getattr(box, name) == torch.tensor(float(tip3p_xml["angle"][key]),
                                                            dtype=dtype)), name
    assert abs(float(box.charges.double().sum())) < 1e-5 * n  # neutral
    centroids = box.positions.double().reshape(n, 3, 3).mean(1)
    edge = float(box.cell[0, 0])
    assert bool((centroids >= 0).all()) and bool((centroids < edge).all())


def test_water_box_density(rng):
    """Number density from the requested g/cm^3, and mass / volume as ASE computes it."""
    pytest.importorskip("ase")
    density = float(rng.uniform(0.8, 1.05))
    box = water_box(int(rng.integers(10, 60)), seed=_seed(rng), density=density,
                    dtype=torch.float64, relax_steps=0)
    molar_mass = float(box.masses[:3].sum())
    assert math.isclose(_molecules_per_nm3(box), density * 1e-21 * AVOGADRO / molar_mass,
                        rel_tol=1e-12)
    atoms = box.to_ase()
    grams_per_cm3 = atoms.get_masses().sum() / AVOGADRO / (atoms.get_volume() * 1e-24)
    assert math.isclose(grams_per_cm3, density, rel_tol=1e-12)
    default = water_box(50, relax_steps=0)
    assert 32.5 < _molecules_per_nm3(default) < 33.5  # TIP3P near 300 K


def test_to_ase_units_and_contents(rng):
    pytest.importorskip("ase")
    box = water_box(int(rng.integers(5, 30)), seed=_seed(rng), dtype=torch.float64,
                    relax_steps=0)
    atoms = box.to_ase()
    np.testing.assert_array_equal(atoms.get_atomic_numbers(), box.species.numpy())
    np.testing.assert_allclose(atoms.get_positions(), box.positions.numpy() * 10, rtol=1e-15)
    np.testing.assert_allclose(np.asarray(atoms.get_cell()), box.cell.numpy() * 10, rtol=1e-15)
    assert atoms.pbc.all()
    np.testing.assert_allclose(atoms.get_masses(), box.masses.numpy())
    np.testing.assert_allclose(atoms.get_initial_charges(), box.charges.numpy())


def _intermolecular_minimum(box: WaterBox) -> dict[str, float]:
    """Closest intermolecular O-O, O-H and H-H distances (nm), from ASE's minimum-image
    distance matrix."""
    atoms = box.to_ase()
    d = atoms.get_all_distances(mic=True) / 10.0
    mol = np.arange(box.num_atoms) // 3
    other = mol[:, None] != mol[None, :]
    oxygen = box.species.numpy() == 8
    kinds = {"OO": oxygen[:, None] & oxygen[None, :],
             "OH": oxygen[:, None] & ~oxygen[None, :],
             "HH": ~oxygen[:, None] & ~oxygen[None, :]}
    return {k: float(d[m & other].min()) for k, m in kinds.items()}


def test_placement_leaves_no_contacts(rng):
    """Before relaxation: the placement guarantee (O-O >= 0.25 nm, others >= 0.17 nm) holds
    in ASE's minimum-image distances; geometry is exactly TIP3P's."""
    pytest.importorskip("ase")
    box = water_box(int(rng.integers(60, 100)), seed=_seed(rng), dtype=torch.float64,
                    relax_steps=0)
    closest = _intermolecular_minimum(box)
    assert closest["OO"] >= 0.25 and closest["OH"] >= 0.17 and closest["HH"] >= 0.17, closest


def _geometry(box: WaterBox):
    x = box.positions.double().reshape(-1, 3, 3)
    a, b = x[:, 1] - x[:, 0], x[:, 2] - x[:, 0]
    r = torch.cat([a.norm(dim=1), b.norm(dim=1)])
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return r, torch.acos(cos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relaxed_box_geometry_contacts_and_energy(rng, dtype):
    """After relaxation: bonds and angles at r0 / theta0 (rigid-molecule relaxation), no close
    intermolecular contact, a liquid-like energy per molecule (TIP3P with reaction field:
    about -40 kJ/mol) below that of the unrelaxed box, finite forces."""
    pytest.importorskip("ase")
    n, seed = int(rng.integers(200, 240)), _seed(rng)
    box = water_box(n, seed=seed, dtype=dtype)
    r, theta = _geometry(box)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(r, torch.full_like(r, float(box.bond_r0[0])), rtol=tol, atol=0)
    torch.testing.assert_close(theta, torch.full_like(theta, float(box.angle_theta0[0])),
                               rtol=tol, atol=0)
    # hydrogen bonds pull H...O in to ~0.16-0.17 nm; over 25 random boxes the closest pairs
    # were O-O 0.254, O-H 0.159 and H-H 0.182 nm
    closest = _intermolecular_minimum(box)
    assert closest["OO"] > 0.23 and closest["OH"] > 0.145 and closest["HH"] > 0.165, closest
    ff = fmm.water_force_field(box)
    x = box.positions.clone().requires_grad_(True)
    energy = ff(x)
    (grad,) = torch.autograd.grad(energy, x)
    per_molecule = energy.item() / n
    assert -60.0 < per_molecule < -20.0, per_molecule
    assert bool(torch.isfinite(grad).all()) and float(grad.norm(dim=1).max()) < 1e4
    unrelaxed = water_box(n, seed=seed, dtype=dtype, relax_steps=0)
    assert fmm.water_force_field(unrelaxed)(unrelaxed.positions).item() / n > per_molecule + 10


def test_water_box_deterministic_per_seed(rng):
    seed, n = _seed(rng), int(rng.integers(20, 70))
    a = water_box(n, seed=seed, dtype=torch.float64, relax_steps=5)
    b = water_box(n, seed=seed, dtype=torch.float64, relax_steps=5)
    for name in WaterBox.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = water_box(n, seed=seed + 1, dtype=torch.float64, relax_steps=5)
    assert not torch.equal(a.positions, c.positions)
    assert torch.equal(a.cell, c.cell)
    # generated in float64 for either dtype: float32 is the same box, rounded
    single = water_box(n, seed=seed, dtype=torch.float32, relax_steps=5)
    assert torch.equal(single.positions, a.positions.float())


def test_small_and_large_box_relaxations_agree(rng, monkeypatch):
    """Small boxes relax on the float64 reference term over a float32 cell list, large ones on
    the fused cluster kernels: the same descent, so the same box up to rounding."""
    from fastff import systems

    seed, n = _seed(rng), int(rng.integers(60, 120))
    reference = water_box(n, seed=seed, dtype=torch.float64, relax_steps=8)
    monkeypatch.setattr(systems, "_REFERENCE_RELAX_MOLECULES", 0)
    fused = water_box(n, seed=seed, dtype=torch.float64, relax_steps=8)
    unrelaxed = water_box(n, seed=seed, dtype=torch.float64, relax_steps=0)
    assert float((reference.positions - unrelaxed.positions).abs().max()) > 1e-3  # it moved
    torch.testing.assert_close(reference.positions, fused.positions, rtol=0, atol=1e-7)


def test_water_box_bad_arguments():
    for bad in (0, -3, 2.5, True, "10", None):
        with pytest.raises(ValueError, match="n_molecules"):
            water_box(bad)
    for bad in (0.0, -1.0, math.nan, math.inf, "1"):
        with pytest.raises(ValueError, match="density"):
            water_box(10, density=bad)
    for bad in (torch.int64, torch.float16, "float32"):
        with pytest.raises(TypeError, match="dtype"):
            water_box(10, dtype=bad)
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="seed"):
            water_box(10, seed=bad)
    with pytest.raises(ValueError, match="relax_steps"):
        water_box(10, relax_steps=-1)
    with pytest.raises(RuntimeError, match="density"):
        water_box(27, density=3.0, relax_steps=0)  # no room: O-O would be < 0.25 nm


# --- the MM energy against OpenMM ----------------------------------------------------------

def _openmm_terms(system, positions: np.ndarray) -> dict[str, tuple[float, np.ndarray]]:
    """{term: (energy kJ/mol, forces [N, 3] kJ/mol/nm)} and "total", Reference platform."""
    mm = pytest.importorskip("openmm")
    names = {"NonbondedForce": "nonbonded", "HarmonicBondForce": "harmonic_bonds",
             "HarmonicAngleForce": "harmonic_angles"}
    for k, force in enumerate(system.getForces()):
        force.setForceGroup(k)
    ctx = mm.Context(system, mm.VerletIntegrator(1.0), mm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(positions * mm.unit.nanometer)
    kj = mm.unit.kilojoule_per_mole
    kjnm = kj / mm.unit.nanometer
    out = {}
    for k, force in enumerate(system.getForces()):
        st = ctx.getState(getEnergy=True, getForces=True, groups={k})
        out[names[force.__class__.__name__]] = (st.getPotentialEnergy().value_in_unit(kj),
                                                st.getForces(asNumpy=True).value_in_unit(kjnm))
    st = ctx.getState(getEnergy=True, getForces=True)
    out["total"] = (st.getPotentialEnergy().value_in_unit(kj),
                    st.getForces(asNumpy=True).value_in_unit(kjnm))
    return out


def _thermal(box: WaterBox, rng, sigma=0.002) -> torch.Tensor:
    """Positions with Gaussian noise (nm): relaxed molecules are rigid, so bonds and angles get
    energies well away from zero to compare."""
    noise = torch.as_tensor(rng.normal(0.0, sigma, box.positions.shape))
    return (box.positions.double() + noise).to(box.positions.dtype)


CASES = {  # (molecules range, to_openmm / water_force_field arguments); cutoff <= half the box
    "rc0.9": ((200, 240), dict(cutoff=0.9)),
    "rc0.9-switch": ((200, 240), dict(cutoff=0.9, switch_distance=0.75)),
    "rc0.6-switch-dispersion": ((64, 80), dict(cutoff=0.6, switch_distance=0.5,
                                               dispersion_correction=True, dielectric=60.0)),
}


def _atoms_at_the_cutoff(pos: torch.Tensor, edge: float, cutoff: float,
                         band: float) -> torch.Tensor:
    """Bool [N]: atoms of a pair whose minimum-image distance (float64, cubic box) is within
    ``band`` of ``cutoff``."""
    p = pos.double()
    v = p[None] - p[:, None]
    v -= edge * torch.round(v / edge)
    return ((v.norm(dim=2) - cutoff).abs() < band).any(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_water_force_field_matches_openmm(rng, case, dtype):
    pytest.importorskip("openmm")
    (low, high), kwargs = CASES[case]
    box = water_box(int(rng.integers(low, high)), seed=_seed(rng), dtype=dtype)
    pos = _thermal(box, rng)
    expected = _openmm_terms(box.to_openmm(**kwargs), pos.double().numpy())
    ff = fmm.water_force_field(box, **kwargs)
    assert ff.charges.dtype == dtype
    x = pos.clone().requires_grad_(True)
    energies = ff.energies(x)
    energies["total"] = sum(energies.values())
    assert set(energies) == set(expected)
    rtol = TOLERANCES["openmm"][dtype][0]
    # The reaction-field force jumps at the cutoff (by q_i q_j k 3 / ((2 eps + 1) rc^2), 0.57
    # kJ/mol/nm for two hydrogens at 0.9 nm): a pair closer to it than float32 resolves
    # distances (~2e-7 nm for coordinates up to 2 nm) falls on either side, in fastff's float32
    # arithmetic as against OpenMM's float64 (seen: r - rc = -5e-8 nm, force error 0.57). The
    # forces of such a pair's two atoms are not compared; the energy, continuous there, is.
    keep = torch.ones(box.num_atoms, dtype=torch.bool)
    if dtype == torch.float32:
        keep = ~_atoms_at_the_cutoff(pos, float(box.cell[0, 0]), kwargs["cutoff"], 1e-6)
    for name, energy in energies.items():
        (grad,) = torch.autograd.grad(energy, x, retain_graph=True)
        e_ref, f_ref = expected[name]
        assert abs(energy.item() - e_ref) <= rtol * abs(e_ref), (name, energy.item(), e_ref)
        assert_close_scaled(-grad[keep], torch.as_tensor(f_ref)[keep], "openmm", dtype,
                            f"{name} forces")


def test_from_parameters_and_from_openmm_agree(rng):
    """water_force_field (from tensors) and ForceField.from_openmm(box.to_openmm()) hold the
    same parameters and give the same energy and forces: one construction path."""
    pytest.importorskip("openmm")
    box = water_box(int(rng.integers(64, 80)), seed=_seed(rng), dtype=torch.float64)
    kwargs = dict(cutoff=0.55, switch_distance=0.45, dispersion_correction=True)
    direct = fmm.water_force_field(box, **kwargs)
    via_openmm = fmm.ForceField.from_openmm(box.to_openmm(**kwargs))
    assert direct.terms == via_openmm.terms
    assert direct.nonbonded_kwargs == via_openmm.nonbonded_kwargs
    pos = _thermal(box, rng)
    results = []
    for model in (direct, via_openmm):
        x = pos.clone().requires_grad_(True)
        energy = model(x)
        results.append((energy, *torch.autograd.grad(energy, x)))
    for a, b in zip(*results, strict=True):
        assert_close_scaled(a, b, "mm", torch.float64, "direct vs from_openmm")


def test_water_force_field_parameters_are_learnable(rng):
    box = water_box(int(rng.integers(64, 80)), seed=_seed(rng), dtype=torch.float64,
                    relax_steps=0)
    ff = fmm.water_force_field(box, cutoff=0.6)
    energy = ff(box.positions)
    grads = torch.autograd.grad(energy, [ff.charges, ff.bond_r0, ff.angle_theta0])
    assert all(bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0 for g in grads)


def test_water_force_field_without_bonded_terms(rng):
    """bonded=False is the nonbonded part alone; the bonded forces it leaves out have no net
    force or torque on any molecule (why the rigid relaxation may drop them)."""
    box = water_box(int(rng.integers(20, 40)), seed=_seed(rng), dtype=torch.float64,
                    relax_steps=0)
    pos = _thermal(box, rng)
    edge = float(box.cell[0, 0])
    full = fmm.water_force_field(box, cutoff=0.45 * edge)
    nonbonded_only = fmm.water_force_field(box, cutoff=0.45 * edge, bonded=False)
    x = pos.clone().requires_grad_(True)
    terms = full.energies(x)
    assert set(nonbonded_only.energies(pos)) == set(terms) - {"harmonic_bonds", "harmonic_angles"}
    bonded = terms["harmonic_bonds"] + terms["harmonic_angles"]
    energy = nonbonded_only(x)
    assert_close_scaled(energy, full(x) - bonded, "mm", torch.float64, "nonbonded part")
    (grad,) = torch.autograd.grad(bonded, x)
    molecules, arms = grad.reshape(-1, 3, 3), pos.reshape(-1, 3, 3)
    arms = arms - arms.mean(dim=1, keepdim=True)
    scale = float(grad.abs().max())
    assert scale > 0  # thermal positions: the bonds and angles are strained
    assert float(molecules.sum(dim=1).abs().max()) <= 1e-10 * scale
    torque = torch.linalg.cross(arms, molecules, dim=2).sum(dim=1)
    assert float(torque.abs().max()) <= 1e-10 * scale * float(arms.abs().max())
    with pytest.raises(TypeError, match="bonded"):
        fmm.water_force_field(box, cutoff=0.45 * edge, bonded=1)


def test_from_parameters_bad_input(rng):
    box = water_box(10, seed=_seed(rng), dtype=torch.float64, relax_steps=0)
    n = box.num_atoms
    good = fmm.NonbondedParameters(box.charges, box.sigma, box.epsilon, cutoff=0.4)
    with pytest.raises(ValueError, match="nonbonded.charges"):
        fmm.ForceField.from_parameters(n, box=box.cell, nonbonded=fmm.NonbondedParameters(
            box.charges[:-1], box.sigma, box.epsilon, cutoff=0.4))
    with pytest.raises(ValueError, match="bonds.index"):
        fmm.ForceField.from_parameters(n, bonds=fmm.BondParameters(
            box.bonds + n, box.bond_k, box.bond_r0))
    with pytest.raises(TypeError, match="angles.index"):
        fmm.ForceField.from_parameters(n, angles=fmm.AngleParameters(
            box.angles.double(), box.angle_k, box.angle_theta0))
    with pytest.raises(ValueError, match="method"):
        fmm.ForceField.from_parameters(n, box=box.cell, nonbonded=fmm.NonbondedParameters(
            box.charges, box.sigma, box.epsilon, cutoff=0.4, method="pme"))
    with pytest.raises(ValueError, match="cutoff=None"):
        fmm.ForceField.from_parameters(n, nonbonded=fmm.NonbondedParameters(
            box.charges, box.sigma, box.epsilon, cutoff=None))
    with pytest.raises(ValueError, match="box"):
        fmm.ForceField.from_parameters(n, nonbonded=fmm.NonbondedParameters(
            box.charges, box.sigma, box.epsilon, cutoff=0.4, periodic=True))
    with pytest.raises(ValueError, match="box"):
        fmm.ForceField.from_parameters(n, bonds=fmm.BondParameters(
            box.bonds, box.bond_k, box.bond_r0, periodic=True))
    with pytest.raises(ValueError, match="num_atoms"):
        fmm.ForceField.from_parameters(-1, nonbonded=good)
    with pytest.raises(TypeError, match="dtype"):
        fmm.ForceField.from_parameters(n, box=box.cell, nonbonded=good, dtype=torch.int32)


def test_water_force_field_needs_no_openmm(rng, monkeypatch):
    """With openmm and ase unimportable, the box and its force field still work; the
    converters say what is missing."""
    for name in ("openmm", "openmm.app", "ase"):
        monkeypatch.setitem(sys.modules, name, None)
    box = water_box(int(rng.integers(8, 30)), seed=_seed(rng), relax_steps=3)
    edge = float(box.cell[0, 0])
    energy = fmm.water_force_field(box, cutoff=0.45 * edge)(box.positions)
    assert bool(torch.isfinite(energy))
    with pytest.raises(ImportError, match="openmm"):
        box.to_openmm(cutoff=0.45 * edge)
    with pytest.raises(ImportError, match="ase"):
        box.to_ase()


def test_to_openmm_bad_arguments():
    pytest.importorskip("openmm")
    box = water_box(64, relax_steps=0)
    edge = float(box.cell[0, 0])
    with pytest.raises(ValueError, match="cutoff"):
        box.to_openmm(cutoff=0.51 * edge)
    with pytest.raises(ValueError, match="method"):
        box.to_openmm(cutoff=0.5, method="plain")


# --- random_gas ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_gas(rng, dtype):
    n, density, seed = int(rng.integers(1, 3000)), float(rng.uniform(10, 200)), _seed(rng)
    pos, cell = random_gas(n, density, seed=seed, dtype=dtype)
    assert pos.shape == (n, 3) and cell.shape == (3, 3)
    assert pos.dtype == cell.dtype == dtype
    edge = (n / density) ** (1 / 3)
    torch.testing.assert_close(cell.double(), torch.eye(3, dtype=torch.float64) * edge,
                               rtol=1e-7, atol=0)
    assert math.isclose(n / float(torch.linalg.det(cell.double())), density, rel_tol=1e-5)
    assert bool((pos >= 0).all()) and bool((pos <= cell[0, 0]).all())
    again, _ = random_gas(n, density, seed=seed, dtype=dtype)
    assert torch.equal(pos, again)
    if n > 1:
        other, _ = random_gas(n, density, seed=seed + 1, dtype=dtype)
        assert not torch.equal(pos, other)
    # uniform: each half of the box along x holds about half the atoms
    big, cell = random_gas(20000, seed=seed, dtype=dtype)
    share = float((big[:, 0] < cell[0, 0] / 2).double().mean())
    assert abs(share - 0.5) < 0.02
    assert math.isclose(20000 / float(torch.linalg.det(cell.double())), 100.0, rel_tol=1e-5)


def test_random_gas_bad_arguments():
    for bad in (0, -1, 1.5, False):
        with pytest.raises(ValueError, match="n_atoms"):
            random_gas(bad)
    for bad in (0.0, -5.0, math.inf):
        with pytest.raises(ValueError, match="density"):
            random_gas(10, bad)
    with pytest.raises(TypeError, match="dtype"):
        random_gas(10, dtype=torch.int32)


def test_mm_does_not_import_systems():
    """fastff.systems builds on fastff.mm (it relaxes its boxes on water_force_field); no file
    of fastff.mm imports fastff.systems back, not even for type checking."""
    import ast
    from pathlib import Path

    mm_dir = Path(fmm.__file__).parent
    files = sorted(mm_dir.glob("*.py"))
    assert len(files) >= 4, files
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            if any(n == "fastff.systems" or n.startswith("fastff.systems.") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
