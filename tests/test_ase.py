"""fastff.ase.Calculator: units, forces and stress against direct calls and finite differences,
NVE energy conservation with ASE's VelocityVerlet, Verlet-list reuse and bad-input errors."""

import os

import ase
import numpy as np
import pytest
import torch
from ase import units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import (
    calculate_numerical_forces,
    calculate_numerical_stress,
)
from ase.calculators.mixing import SumCalculator
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.md.verlet import VelocityVerlet

from fastff.ase import Calculator
from fastff.mm import water_force_field
from fastff.models import PaiNN, SchNet, energy_and_forces
from fastff.systems import water_box

KJ_PER_MOL = units.kJ / units.mol  # eV
NM = units.nm  # Angstrom
MM_CUTOFF = 0.6  # nm: periodic reaction field needs cutoff <= half the 1.25 nm box of 64 waters


@pytest.fixture(scope="module")
def water():
    """64 relaxed TIP3P waters (192 atoms, 1.25 nm box), float64; a fresh seed per run."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"water box seed: {seed}")
    return water_box(64, seed=seed, dtype=torch.float64)


def small_schnet(seed: int, *, size: int = 16, interactions: int = 2, cutoff: float = 0.4,
                 dtype=torch.float64, **kwargs) -> SchNet:
    torch.manual_seed(seed)
    return SchNet(size, interactions, size, cutoff=cutoff, **kwargs).to(dtype)


def random_atoms(rng, n=30, *, edge=10.0, pbc=True, skew=True) -> ase.Atoms:
    """Random H/C/N/O atoms in a (skewed) box of ``edge`` Angstrom."""
    cell = np.eye(3) * edge
    if skew:
        cell = cell + rng.uniform(-0.15, 0.15, (3, 3)) * edge
    positions = rng.random((n, 3)) @ cell
    numbers = rng.choice([1, 6, 7, 8], n)
    return ase.Atoms(numbers=numbers, positions=positions, cell=cell if pbc else None, pbc=pbc)


def assert_close(actual, expected, rtol=1e-11):
    """Equal up to summation order: relative to the largest entry."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


# --- energy and forces against the direct call ----------------------------------------------

@pytest.mark.parametrize("pbc", [True, False])
@pytest.mark.parametrize("kind", ["schnet", "painn"])
def test_model_matches_direct_call_in_nm_and_kj_per_mol(rng, kind, pbc):
    seed = int(rng.integers(2**31))
    if kind == "schnet":
        model = small_schnet(seed)
    else:
        torch.manual_seed(seed)
        model = PaiNN(16, 2, 8, cutoff=0.4).double()
    atoms = random_atoms(rng, pbc=pbc)
    atoms.calc = Calculator(model)  # default units: nm and kJ/mol
    species = torch.as_tensor(atoms.numbers)
    positions = torch.as_tensor(atoms.positions / NM)
    cell = torch.as_tensor(np.asarray(atoms.cell) / NM) if pbc else None
    energy, forces = energy_and_forces(model, species, positions, cell)
    assert_close(atoms.get_potential_energy(), float(energy[0]) * KJ_PER_MOL)
    assert_close(atoms.get_forces(), forces.numpy() * KJ_PER_MOL / NM)
    assert atoms.get_potential_energy(force_consistent=True) == atoms.get_potential_energy()
    # forces need no parameter gradients; the model's requires_grad flags are restored
    assert all(p.requires_grad for p in model.parameters())


def test_model_in_ev_and_angstrom_needs_no_conversion(rng):
    model = small_schnet(int(rng.integers(2**31)), cutoff=4.0)  # a model trained in eV, A
    model.length_unit, model.energy_unit = "Angstrom", "eV"
    atoms = random_atoms(rng)
    atoms.calc = Calculator(model)  # the model's own units
    energy, forces, stress = energy_and_forces(
        model, torch.as_tensor(atoms.numbers), torch.as_tensor(atoms.positions),
        torch.as_tensor(np.asarray(atoms.cell)), stress=True)
    assert_close(atoms.get_potential_energy(), float(energy[0]))
    assert_close(atoms.get_forces(), forces.numpy())
    s = stress[0].numpy()
    assert_close(atoms.get_stress(), s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]])
    # stated units that agree with the model's are accepted (names or numbers)
    same = atoms.copy()
    same.calc = Calculator(model, energy_unit="eV", length_unit=1.0)
    assert_close(same.get_potential_energy(), float(energy[0]))
    # a model without units takes them from the arguments: eV per model energy unit, Angstrom
    # per model length unit
    model.length_unit = model.energy_unit = None
    numeric = atoms.copy()
    numeric.calc = Calculator(model, energy_unit=2.0, length_unit=1.0)
    assert_close(numeric.get_potential_energy(), 2.0 * float(energy[0]))


def test_units_must_agree_with_the_model(rng):
    model = small_schnet(int(rng.integers(2**31)))  # fastff's units: nm, kJ/mol
    with pytest.raises(ValueError, match="length_unit='A' contradicts the model's length_unit"):
        Calculator(model, length_unit="A")
    with pytest.raises(ValueError, match="energy_unit=1.0 contradicts"):
        Calculator(model, energy_unit=1.0)
    assert Calculator(model, length_unit="nanometer", energy_unit="kJ/mol").length_scale == NM
    model.length_unit = None
    with pytest.raises(ValueError, match="has no length_unit and none was given"):
        Calculator(model)
    with pytest.raises(ValueError, match="contradicts"):
        Calculator(water_force_field(water_box(8, seed=1), cutoff=0.3), energy_unit="eV")


def test_cutoff_in_the_wrong_unit_is_caught(rng):
    """fastff's SchNet() has cutoff 0.5 (nm); labelled Angstrom it would find no pairs."""
    model = small_schnet(int(rng.integers(2**31)), cutoff=0.5)
    model.length_unit = "Angstrom"
    with pytest.raises(ValueError, match=r"cutoff 0.5 Angstrom is shorter than any bond"):
        Calculator(model)
    model.length_unit = None
    with pytest.raises(ValueError, match="shorter than any bond"):
        Calculator(model, length_unit=1.0)


def test_forcefield_matches_direct_call(water):
    ff = water_force_field(water, cutoff=MM_CUTOFF)
    atoms = water.to_ase()
    atoms.calc = Calculator(ff)
    positions = water.positions.clone().requires_grad_(True)
    energy = ff(positions, water.cell)
    (grad,) = torch.autograd.grad(energy, positions)
    assert_close(atoms.get_potential_energy(), float(energy.detach()) * KJ_PER_MOL)
    assert_close(atoms.get_forces(), -grad.numpy() * KJ_PER_MOL / NM)
    # a list the calculator owns (skin in Angstrom) instead of the force field's own
    owned = water.to_ase()
    owned.calc = Calculator(ff, skin=2.0)
    assert owned.calc.verlet is not None and owned.calc.verlet.skin == pytest.approx(0.2)
    assert_close(owned.get_potential_energy(), atoms.get_potential_energy())
    assert_close(owned.get_forces(), atoms.get_forces())


def test_float32_close_to_float64(rng, water):
    atoms = water.to_ase()
    atoms.positions += rng.normal(scale=0.01, size=atoms.positions.shape)
    ff64 = water_force_field(water, cutoff=MM_CUTOFF)
    ff32 = water_force_field(water, cutoff=MM_CUTOFF, dtype=torch.float32)
    calc64, calc32 = Calculator(ff64), Calculator(ff32)
    assert calc32.dtype == torch.float32
    e64, f64 = calc64.get_potential_energy(atoms), calc64.get_forces(atoms)
    e32, f32 = calc32.get_potential_energy(atoms), calc32.get_forces(atoms)
    print("float32 vs float64: energy", abs(e32 - e64) / abs(e64), "forces",
          np.abs(f32 - f64).max() / np.abs(f64).max())
    assert abs(e32 - e64) < 1e-5 * abs(e64)
    assert_close(f32, f64, rtol=1e-4)


# --- finite differences -----------------------------------------------------------------------

def test_schnet_forces_and_stress_match_finite_differences(rng):
    model = small_schnet(int(rng.integers(2**31)))
    with torch.no_grad():
        model.readout[-1].weight.mul_(100.0)  # forces well above the finite-difference noise
    atoms = random_atoms(rng, n=24, edge=9.0)
    atoms.calc = Calculator(model)
    picked = rng.choice(len(atoms), 6, replace=False)
    # central differences: error ~ eps^2 f''' (large for close random atoms), plus ~ eps f''
    # where a step moves a pair across the cutoff (the cosine envelope's second derivative jumps
    # there). eps = 1e-4 A put one component 3e-6 of the force scale off (seed 3114223953, on
    # every version of the kernels); 1e-5 keeps the round-off (~1e-9 of it) far below 1e-6.
    numeric = calculate_numerical_forces(atoms, eps=1e-5, iatoms=picked)
    assert_close(atoms.get_forces()[picked], numeric, rtol=1e-6)
    assert_close(atoms.get_stress(), calculate_numerical_stress(atoms, eps=1e-5), rtol=1e-6)


def _cutoff_clear_of_pairs(box, near: float, clearance: float = 2e-5) -> float:
    """A cutoff at or just below ``near`` with no pair distance within ``clearance`` nm of it.
    The reaction-field force jumps at the cutoff (OpenMM's definition), and a finite-difference
    step that moves a pair across it measures that jump, not the derivative."""
    pos, edge = box.positions.double(), float(box.cell[0, 0])
    r = pos[:, None] - pos[None]
    d = torch.linalg.vector_norm(r - edge * torch.round(r / edge), dim=-1)
    for k in range(1000):
        cutoff = near - 1e-4 * k
        if bool(((d - cutoff).abs() > clearance).all()):
            return cutoff
    raise AssertionError("no cutoff clear of the pair distances")


def test_forcefield_forces_and_stress_match_finite_differences(rng, water):
    ff = water_force_field(water, cutoff=_cutoff_clear_of_pairs(water, MM_CUTOFF),
                           switch_distance=0.5, dispersion_correction=True)
    atoms = water.to_ase()
    atoms.calc = Calculator(ff)
    picked = rng.choice(len(atoms), 6, replace=False)
    numeric = calculate_numerical_forces(atoms, eps=1e-5, iatoms=picked)
    assert_close(atoms.get_forces()[picked], numeric, rtol=1e-6)
    stress = atoms.get_stress()
    assert_close(stress, calculate_numerical_stress(atoms, eps=1e-6), rtol=1e-6)


def test_stress_not_offered_without_full_periodicity(rng):
    model = small_schnet(int(rng.integers(2**31)))
    atoms = random_atoms(rng, pbc=False)
    atoms.calc = Calculator(model)
    with pytest.raises(PropertyNotImplementedError, match="fully periodic"):
        atoms.get_stress()
    atoms.set_cell(np.eye(3) * 10.0)
    atoms.pbc = [True, True, False]
    assert np.isfinite(atoms.get_forces()).all()  # mixed pbc: energy and forces work
    with pytest.raises(PropertyNotImplementedError, match="fully periodic"):
        atoms.get_stress()


# --- state changes and neighbor-list reuse ----------------------------------------------------

def test_changes_of_numbers_and_cell_are_seen(rng):
    model = small_schnet(int(rng.integers(2**31)))
    atoms = random_atoms(rng)
    calc = Calculator(model)
    atoms.calc = calc
    atoms.get_forces()
    atoms.numbers[3] = 9 if atoms.numbers[3] != 9 else 6
    atoms.set_cell(np.asarray(atoms.cell) * 1.03, scale_atoms=True)
    fresh = atoms.copy()
    fresh.calc = Calculator(model)
    assert_close(atoms.get_potential_energy(), fresh.get_potential_energy())
    assert_close(atoms.get_stress(), fresh.get_stress())


def test_verlet_list_reused_between_steps(rng, water):
    model = small_schnet(int(rng.integers(2**31)))
    atoms = water.to_ase()
    calc = Calculator(model)
    atoms.calc = calc
    assert calc.verlet is not None  # the model has no list of its own: the calculator owns one
    for _ in range(6):
        atoms.positions += rng.normal(scale=0.02, size=atoms.positions.shape)
        atoms.get_forces()
    assert calc.verlet.rebuilds == 1 and calc.verlet.steps == 6
    fresh = atoms.copy()
    fresh.calc = Calculator(model, skin=0.0)
    assert_close(atoms.get_forces(), fresh.get_forces())
    # a model with its own Verlet list keeps using it
    own = small_schnet(0, skin=0.05)
    assert Calculator(own).verlet is None


def test_model_without_envelope_gets_a_compact_list(rng, water):
    """A model without an envelope needs exactly the pairs within its cutoff: the list the
    calculator owns is compacted, so it is reused and matches fresh lists."""
    model = small_schnet(int(rng.integers(2**31)), envelope=None)
    atoms = water.to_ase()
    calc = Calculator(model)
    atoms.calc = calc
    assert calc.verlet is not None and calc.verlet.compact
    for _ in range(4):
        atoms.positions += rng.normal(scale=0.02, size=atoms.positions.shape)
        forces = atoms.get_forces()
        fresh = atoms.copy()
        fresh.calc = Calculator(model, skin=0.0)
        assert_close(forces, fresh.get_forces())
        assert_close(atoms.get_potential_energy(), fresh.get_potential_energy())
    assert calc.verlet.rebuilds == 1 and calc.verlet.steps == 4


# --- NVE molecular dynamics -------------------------------------------------------------------

def run_nve(atoms, rng, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(total, kinetic) energy per step (eV) of VelocityVerlet at 0.5 fs from 300 K."""
    thermalize_momenta(atoms, 300.0, rng=rng)
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    total, kinetic = [], []

    def record():
        kinetic.append(atoms.get_kinetic_energy())
        total.append(atoms.get_potential_energy() + kinetic[-1])

    dyn.attach(record, interval=1)
    dyn.run(steps)
    return np.array(total), np.array(kinetic)


def assert_energy_conserved(total, kinetic, num_atoms):
    # Measured on 64 relaxed flexible TIP3P waters, 300 steps of 0.5 fs from 300 K, float64,
    # box seeds 0-10, MM alone and MM + SchNet (20% of the force): max |E(t) - E(0)| <= 0.012
    # N kT, std(E) / std(E_kin) <= 0.03, |last tenth - first tenth| <= 0.0042 N kT. That is
    # Verlet's error on the O-H stretch (period ~9 fs, 18 steps), of order (omega dt)^2. The
    # bounds leave 2.5-3.5x margin; scaling only the SchNet forces by 1.1 (2% of the total
    # force) broke them by 4.6x, 1.7x and 11x.
    kT = units.kB * 300.0
    assert np.isfinite(total).all()
    assert np.abs(total - total[0]).max() < 0.03 * num_atoms * kT
    assert total.std() < 0.1 * kinetic.std()
    # no systematic drift: the last tenth agrees with the first tenth
    tenth = len(total) // 10
    assert abs(total[-tenth:].mean() - total[:tenth].mean()) < 0.01 * num_atoms * kT


def test_nve_mm_water_conserves_energy(rng, water):
    atoms = water.to_ase()
    ff = water_force_field(water, cutoff=MM_CUTOFF)
    atoms.calc = Calculator(ff)
    total, kinetic = run_nve(atoms, rng, 300)
    assert_energy_conserved(total, kinetic, len(atoms))
    assert ff.verlet is not None and ff.verlet.rebuilds < 30  # the list is reused


def test_nve_mm_plus_schnet_conserves_energy(rng, water):
    # A SchNet with random weights does not bind water (its atoms fly apart or collapse), so it
    # runs on top of the MM force field: the MM terms keep the liquid physical and SchNet adds
    # forces of 20% of theirs (RMS; its readout rescaled), which must be as conservative.
    model = small_schnet(int(rng.integers(2**31)), size=8, interactions=1, cutoff=0.3)
    ml = Calculator(model)
    mm = Calculator(water_force_field(water, cutoff=MM_CUTOFF))
    atoms = water.to_ase()
    scale_forces_to(model, ml, mm, atoms, 0.2)
    atoms.calc = SumCalculator([mm, ml])
    total, kinetic = run_nve(atoms, rng, 300)
    assert_energy_conserved(total, kinetic, len(atoms))
    # the list is reused: its 0.5 A skin rebuilds every ~10-20 steps here (up to 30 seen);
    # rebuilding at every call would give 300
    assert ml.verlet is not None and ml.verlet.rebuilds < 60


def scale_forces_to(model, ml, mm, atoms, ratio: float) -> None:
    """Rescale the last readout layer (forces are linear in it) so that the RMS force of ``ml``
    is ``ratio`` times that of ``mm`` on ``atoms``."""
    def rms(calc):
        return np.sqrt((calc.get_forces(atoms) ** 2).mean())

    with torch.no_grad():
        model.readout[-1].weight.mul_(ratio * rms(mm) / rms(ml))
    ml.reset()
    np.testing.assert_allclose(rms(ml), ratio * rms(mm), rtol=1e-6)


# --- bad input ----------------------------------------------------------------------------------

def test_species_the_model_does_not_know(rng):
    model = small_schnet(0, max_species=10)
    atoms = random_atoms(rng)
    atoms.numbers[5] = 26
    atoms.calc = Calculator(model)
    with pytest.raises(ValueError, match=r"atoms.numbers\[5\] = 26 .*max_species"):
        atoms.get_potential_energy()


def test_forcefield_atoms_must_match(water):
    ff = water_force_field(water, cutoff=MM_CUTOFF)
    atoms = water.to_ase()
    with pytest.raises(ValueError, match="built for 192"):
        Calculator(ff).get_potential_energy(atoms[:-3])
    swapped = atoms.copy()
    swapped.numbers[[0, 1]] = swapped.numbers[[1, 0]]
    with pytest.raises(ValueError, match=r"atoms.numbers\[0\] = 1 .*order"):
        Calculator(ff, species=water.species).get_potential_energy(swapped)
    calc = Calculator(ff)  # without species: the first Atoms fix the order
    calc.get_potential_energy(atoms)
    with pytest.raises(ValueError, match="order"):
        calc.get_potential_energy(swapped)
    nonperiodic = atoms.copy()
    nonperiodic.pbc = False
    with pytest.raises(ValueError, match="periodic"):
        Calculator(ff).get_potential_energy(nonperiodic)


def test_singular_cell_with_pbc(rng):
    model = small_schnet(0)
    atoms = random_atoms(rng, skew=False)
    cell = np.asarray(atoms.cell).copy()
    cell[2] = cell[0] + cell[1]
    atoms.set_cell(cell)
    with pytest.raises(ValueError, match="singular"):
        Calculator(model).get_potential_energy(atoms)
    atoms.set_cell(np.diag([10.0, 10.0, 0.0]))
    atoms.pbc = [True, True, True]
    with pytest.raises(ValueError, match="singular"):
        Calculator(model).get_potential_energy(atoms)
    atoms.pbc = [True, True, False]  # a zero row along a non-periodic axis is fine
    assert np.isfinite(Calculator(model).get_potential_energy(atoms))


def test_nan_positions(rng):
    atoms = random_atoms(rng)
    atoms.calc = Calculator(small_schnet(0))
    atoms.get_forces()
    atoms.positions[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf \(first at atom 7\)"):
        atoms.get_forces()


def test_bad_arguments():
    model = small_schnet(0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        Calculator(lambda x: x)
    with pytest.raises(ValueError, match="energy_unit must be one of"):
        Calculator(model, energy_unit="Rydberg")
    with pytest.raises(ValueError, match="length_unit must be finite and positive"):
        Calculator(model, length_unit=-1.0)
    with pytest.raises(ValueError, match="skin must be"):
        Calculator(model, skin=-0.1)
    with pytest.raises(TypeError, match="dtype must be"):
        Calculator(model, dtype=torch.int64)
    with pytest.raises(ValueError, match="species is only for"):
        Calculator(model, species=[1, 1])
    with pytest.raises(ValueError, match="no cutoff attribute"):
        Calculator(torch.nn.Linear(3, 1), skin=0.5, length_unit="nm", energy_unit="kJ/mol")


# ---- fastff.ase.neighbor_list: ASE's function, same pairs -------------------------------------

from ase.neighborlist import neighbor_list as ase_neighbor_list  # noqa: E402

from fastff.ase import neighbor_list as fastff_neighbor_list  # noqa: E402
from fastff.testing import BOUNDARY  # noqa: E402


def _canonical(i, j, S, *rest):
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
    return (i[order], j[order], S[order], *(x[order] for x in rest))


def _without_pairs_near(cutoff, *lists):
    """The lists without the pairs either holds within BOUNDARY of the cutoff."""
    def keys(x):
        return [tuple(k) for k in np.column_stack(x[:3]).tolist()]

    near = {k for x in lists for k, d in zip(keys(x), x[3], strict=True)
            if abs(d - cutoff) < BOUNDARY[torch.float64]}
    out = []
    for x in lists:
        keep = np.array([k not in near for k in keys(x)], dtype=bool)
        out.append([v[keep] for v in x])
    return out


def _assert_same_as_ase(atoms, cutoff, self_interaction=False):
    """Same pairs as ASE (sets after a lexsort; a pair within BOUNDARY of its cutoff may fall on
    either side), same dtypes and shapes, distances and vectors to float64 rounding."""
    ours = fastff_neighbor_list("ijSdD", atoms, cutoff, self_interaction)
    theirs = ase_neighbor_list("ijSdD", atoms, cutoff, self_interaction)
    for a, b, q in zip(ours, theirs, "ijSdD", strict=True):
        assert a.dtype == b.dtype and a.shape[1:] == b.shape[1:], (q, a.dtype, b.dtype)
        assert a.flags["C_CONTIGUOUS"], q
    assert bool((ours[0][1:] >= ours[0][:-1]).all()), "sorted by i, as ASE"
    if isinstance(cutoff, float):
        ours, theirs = _without_pairs_near(cutoff, ours, theirs)
    a, b = _canonical(*ours), _canonical(*theirs)
    for x, y in zip(a[:3], b[:3], strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(a[3], b[3], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a[4], b[4], rtol=1e-12, atol=1e-12)
    positions, cell = atoms.positions, atoms.cell.array
    np.testing.assert_allclose(a[4], positions[a[1]] - positions[a[0]] + a[2] @ cell,
                               rtol=1e-12, atol=1e-12)
    return a


def _random_atoms(rng, n, cell, pbc, spread=1.0):
    frac = (rng.random((n, 3)) - 0.5) * spread + 0.5
    numbers = rng.choice([1, 6, 8], n)
    return ase.Atoms(numbers=numbers, positions=frac @ cell, cell=cell, pbc=pbc)


def _triclinic(rng, edge):
    cell = np.diag(edge * (1 + 0.2 * rng.random(3)))
    cell[1, 0], cell[2, 0], cell[2, 1] = 0.6 * edge * (rng.random(3) - 0.5)
    return cell


@pytest.mark.parametrize("pbc", [[True] * 3, [True, False, True], [False, True, False],
                                 [False] * 3])
@pytest.mark.parametrize("edge, cutoff", [(8.0, 3.0), (3.0, 4.5)], ids=["cell", "small cell"])
def test_neighbor_list_same_pairs_as_ase(rng, pbc, edge, cutoff):
    atoms = _random_atoms(rng, 30, _triclinic(rng, edge), pbc, spread=1.3)
    pairs = _assert_same_as_ase(atoms, cutoff)
    assert len(pairs[0]) > 0
    _assert_same_as_ase(atoms, cutoff, self_interaction=True)


def test_neighbor_list_without_cell(rng):
    atoms = ase.Atoms("H12", positions=rng.random((12, 3)) * 4)
    _assert_same_as_ase(atoms, 2.5)


def test_neighbor_list_dict_and_radii_cutoffs(rng):
    atoms = _random_atoms(rng, 40, _triclinic(rng, 7.0), [True, True, False])
    by_element = {("H", "O"): 2.0, (6, 6): 3.1, ("C", 8): 2.4, ("H", "H"): 1.2, (1, 8): 2.6}
    _assert_same_as_ase(atoms, by_element)  # (1, 8) overrides ("H", "O"), as in ASE
    _assert_same_as_ase(atoms, by_element, self_interaction=True)
    radii = rng.random(40) * 1.5
    _assert_same_as_ase(atoms, radii)
    _assert_same_as_ase(atoms, list(radii), self_interaction=True)
    _assert_same_as_ase(atoms, {("O", "O"): 0.0})  # no pairs at all


def test_neighbor_list_quantities_and_water(rng):
    """Any order of quantities, a single one as a bare array, and a periodic water box."""
    box = water_box(32, seed=int(rng.integers(2**31)), dtype=torch.float64)
    atoms = ase.Atoms(numbers=box.species.numpy(), positions=box.positions.numpy() * 10,
                      cell=box.cell.numpy() * 10, pbc=True)
    i, j, d, D, S = fastff_neighbor_list("ijdDS", atoms, 5.0)
    S2, i2 = fastff_neighbor_list("Si", atoms, 5.0)
    np.testing.assert_array_equal(S, S2)
    np.testing.assert_array_equal(i, i2)
    single = fastff_neighbor_list("d", atoms, 5.0)
    assert isinstance(single, np.ndarray) and single.shape == d.shape
    np.testing.assert_array_equal(single, d)
    _assert_same_as_ase(atoms, 5.0)


def test_neighbor_list_empty_atoms():
    empty = ase.Atoms()
    for ours, theirs in zip(fastff_neighbor_list("ijdDS", empty, 2.0),
                            ase_neighbor_list("ijdDS", empty, 2.0), strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape


@pytest.mark.parametrize("args, error, words", [
    (("ijx", 2.0), ValueError, "quantities must be a string of characters from 'ijdDS'"),
    (("ij", -1.0), ValueError, "cutoff must be finite and positive"),
    (("ij", float("nan")), ValueError, "cutoff must be finite and positive"),
    (("ij", None), TypeError, "cutoff must be a float, a dict"),
    (("ij", "5"), TypeError, "cutoff must be a float, a dict"),
    (("ij", {("H", "Xx"): 1.0}), ValueError, "unknown element 'Xx'"),
    (("ij", {"H": 1.0}), ValueError, "pairs of elements"),
    (("ij", {("H", "H"): -1.0}), ValueError, "must be finite and >= 0"),
    (("ij", {}), ValueError, "empty dict"),
    (("ij", [1.0, 2.0]), ValueError, "one number per atom"),
])
def test_neighbor_list_bad_arguments(rng, args, error, words):
    atoms = ase.Atoms("H4", positions=rng.random((4, 3)), cell=np.eye(3) * 3, pbc=True)
    with pytest.raises(error, match=words):
        fastff_neighbor_list(args[0], atoms, args[1])
    with pytest.raises(TypeError, match="a must be an ase.Atoms"):
        fastff_neighbor_list("ij", atoms.positions, 2.0)


def test_neighbor_list_periodic_axis_without_cell(rng):
    """ASE substitutes a 1 A unit vector for the missing lattice vector; fastff refuses."""
    atoms = ase.Atoms("H4", positions=rng.random((4, 3)), pbc=[True, False, False])
    with pytest.raises(ValueError, match=r"atoms.pbc is True along axis 0 but atoms.cell has no "
                                         r"lattice vector there"):
        fastff_neighbor_list("ijS", atoms, 2.0)
    atoms.cell = [[3.0, 0, 0], [0, 0, 0], [0, 0, 0]]  # the periodic axis has its vector now
    _assert_same_as_ase(atoms, 2.0)
