"""NVE stability of fastff through ASE: 0.5 fs VelocityVerlet on the built-in TIP3P water box.

Runs the MM force field (float64 and float32), a SchNet with fixed random weights on top of the
MM force field, and that SchNet alone, and reports the total-energy drift (linear fit, per ps
and per atom) and fluctuation. Writes a markdown table (default bench/results_md.md).

    python bench/md_stability.py                      # 216 molecules, 2,000 steps
    python bench/md_stability.py --molecules 512 --steps 4000 --out /tmp/md.md

Not part of the test suite (tests/test_ase.py checks short runs).
"""

import os

# Idle OpenMP threads of torch and numba spin by default; on a shared 2-core machine that
# slowed each MD step 5-10x in CPU time. Must be set before torch / numba load OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase import units  # noqa: E402
from ase.calculators.mixing import SumCalculator  # noqa: E402
from ase.md.velocitydistribution import Stationary, thermalize_momenta  # noqa: E402
from ase.md.verlet import VelocityVerlet  # noqa: E402

from fastff.ase import Calculator  # noqa: E402
from fastff.mm import water_force_field  # noqa: E402
from fastff.models import SchNet  # noqa: E402
from fastff.systems import water_box  # noqa: E402

TEMPERATURE = 300.0  # K, initial Maxwell-Boltzmann velocities
TIMESTEP_FS = 0.5
MM_CUTOFF = 0.9  # nm, reaction field (needs a box edge >= 1.8 nm: >= 200 molecules)
SCHNET = dict(num_features=16, num_interactions=2, num_basis=16, cutoff=0.4)  # nm
SCHNET_FORCE_SHARE = 0.2  # RMS SchNet force / RMS MM force in the MM + SchNet run


def schnet(seed: int) -> SchNet:
    torch.manual_seed(seed)
    return SchNet(**SCHNET).double()


def rms_force(calc, atoms) -> float:
    return float(np.sqrt((calc.get_forces(atoms) ** 2).mean()))


def make_calculator(case: str, box_f64, box_f32, seed: int):
    """(calculator, the Verlet list it reuses, description)."""
    if case == "mm_f64":
        ff = water_force_field(box_f64, cutoff=MM_CUTOFF)
        return Calculator(ff), ff.verlet, f"MM (TIP3P, reaction field {MM_CUTOFF} nm), float64"
    if case == "mm_f32":
        ff = water_force_field(box_f32, cutoff=MM_CUTOFF)
        return Calculator(ff), ff.verlet, "MM, float32"
    model = schnet(seed)
    ml = Calculator(model)
    if case == "schnet":
        return ml, ml.verlet, "SchNet alone, random weights as initialised, float64"
    mm = Calculator(water_force_field(box_f64, cutoff=MM_CUTOFF))
    atoms = box_f64.to_ase()
    with torch.no_grad():  # forces are linear in the last readout layer
        model.readout[-1].weight.mul_(SCHNET_FORCE_SHARE * rms_force(mm, atoms)
                                      / rms_force(ml, atoms))
    ml.reset()
    return (SumCalculator([mm, ml]), ml.verlet,
            f"MM + SchNet (random weights, RMS force {SCHNET_FORCE_SHARE:.0%} of MM), float64")


def run(atoms, steps: int, seed: int):
    thermalize_momenta(atoms, TEMPERATURE, rng=np.random.default_rng(seed))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs)
    total = np.empty(steps + 1)
    kinetic = np.empty(steps + 1)
    k = 0

    def record():
        nonlocal k
        kinetic[k] = atoms.get_kinetic_energy()
        total[k] = atoms.get_potential_energy() + kinetic[k]
        k += 1

    dyn.attach(record, interval=1)
    start = time.perf_counter()
    dyn.run(steps)
    return total[:k], kinetic[:k], time.perf_counter() - start


def analyse(total, kinetic, num_atoms: int, seconds: float, rebuilds: int | None,
            rms_force0: float) -> dict:
    kT = units.kB * TEMPERATURE
    t_ps = np.arange(len(total)) * TIMESTEP_FS * 1e-3
    slope = np.polyfit(t_ps, total, 1)[0]  # eV / ps
    half = len(total) // 2  # after the first half: past the initial exchange of kinetic energy
    slope_late = np.polyfit(t_ps[half:], total[half:], 1)[0]
    steps = len(total) - 1
    return {
        "drift_mev_ps_atom": 1e3 * slope / num_atoms,
        "drift_kt_ps_atom": slope / num_atoms / kT,
        "late_drift_mev_ps_atom": 1e3 * slope_late / num_atoms,
        "std_mev_atom": 1e3 * total.std() / num_atoms,
        "max_dev_mev_atom": 1e3 * np.abs(total - total[0]).max() / num_atoms,
        "std_ratio": total.std() / kinetic.std(),
        "temperature": kinetic.mean() / (1.5 * num_atoms * units.kB),
        "ms_per_step": 1e3 * seconds / max(steps, 1),
        "rebuilds": rebuilds,
        "rms_force": rms_force0,
        "finite": bool(np.isfinite(total).all()),
    }


def markdown(results: list[tuple[str, dict]], args, num_atoms: int, edge_nm: float) -> str:
    lines = [
        "# NVE stability through the ASE calculator (bench/md_stability.py)",
        "",
        f"Flexible TIP3P water box, {args.molecules} molecules ({num_atoms} atoms, cubic edge "
        f"{edge_nm:.3f} nm, box seed {args.seed}), ASE VelocityVerlet, {TIMESTEP_FS} fs, "
        f"{args.steps} steps ({args.steps * TIMESTEP_FS / 1000:g} ps), velocities drawn at "
        f"{TEMPERATURE:g} K, no thermostat. SchNet: {SCHNET} with fixed random weights "
        f"(torch seed {args.seed}); the calculator's Verlet list (skin 0.5 A) is reused.",
        "",
        "Drift: slope of a linear fit of E_total(t), per atom, over the whole run and over its "
        "second half (the first 0.1-0.2 ps carry the energy flowing from the initial "
        "velocities into the bond vibrations, which shifts Verlet's energy error). "
        "Fluctuation: standard deviation of E_total per atom, and relative to the standard "
        "deviation of the kinetic energy. "
        "kT at 300 K is 25.85 meV. Times are wall clock on a shared 2-core CPU (other work "
        "running), numba and torch threads as set by the environment.",
        "",
        "Command:",
        "",
        f"    {args.command}",
        "",
        f"Environment: Python {platform.python_version()}, torch {torch.__version__}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}. The whole run took "
        f"{args.minutes:.1f} min.",
        "",
        "| run | drift meV/ps/atom | drift kT/ps/atom | drift, 2nd half, meV/ps/atom | "
        "std(E) meV/atom | max abs(E-E0) meV/atom | std(E)/std(Ekin) | mean T (K) | "
        "RMS force at t=0 (eV/A) | list builds | ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results:
        builds = "-" if r["rebuilds"] is None else str(r["rebuilds"])
        lines.append(
            f"| {name} | {r['drift_mev_ps_atom']:+.4f} | {r['drift_kt_ps_atom']:+.2e} | "
            f"{r['late_drift_mev_ps_atom']:+.4f} | "
            f"{r['std_mev_atom']:.4f} | {r['max_dev_mev_atom']:.4f} | {r['std_ratio']:.4f} | "
            f"{r['temperature']:.1f} | {r['rms_force']:.3g} | {builds} | "
            f"{r['ms_per_step']:.1f} |")
    lines += [
        "",
        "The SchNet-alone run is nearly a free gas: its random weights give much smaller forces "
        "than MM's (RMS force column) and do not bind the molecules, so that run mostly shows "
        "the integrator on almost straight lines. The MM + SchNet run is the meaningful test of "
        "SchNet forces: liquid water held together by MM, with SchNet adding "
        f"{SCHNET_FORCE_SHARE:.0%} of the MM RMS force.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--molecules", type=int, default=216)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default="mm_f64,mm_f32,mm_schnet,schnet",
                        help="comma-separated subset of mm_f64, mm_f32, mm_schnet, schnet")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                      "results_md.md"))
    args = parser.parse_args(argv)
    args.command = " ".join(["python bench/md_stability.py",
                             *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    box64 = water_box(args.molecules, seed=args.seed, dtype=torch.float64)
    box32 = water_box(args.molecules, seed=args.seed, dtype=torch.float32)
    num_atoms = box64.num_atoms
    results = []
    for case in args.cases.split(","):
        calc, verlet, name = make_calculator(case, box64, box32, args.seed)
        atoms = box64.to_ase()
        atoms.calc = calc
        rms0 = rms_force(calc, atoms)  # also compiles the kernels outside the timed run
        before = 0 if verlet is None else verlet.rebuilds
        total, kinetic, seconds = run(atoms, args.steps, args.seed)
        rebuilds = None if verlet is None else verlet.rebuilds - before
        r = analyse(total, kinetic, num_atoms, seconds, rebuilds, rms0)
        results.append((name, r))
        print(f"{name}: drift {r['drift_mev_ps_atom']:+.4f} meV/ps/atom "
              f"({r['drift_kt_ps_atom']:+.2e} kT/ps/atom), std {r['std_mev_atom']:.4f} "
              f"meV/atom, max dev {r['max_dev_mev_atom']:.4f} meV/atom, std(E)/std(Ekin) "
              f"{r['std_ratio']:.4f}, T {r['temperature']:.1f} K, {r['ms_per_step']:.1f} ms/step",
              flush=True)
    args.minutes = (time.perf_counter() - started) / 60
    with open(args.out, "w") as f:
        f.write(markdown(results, args, num_atoms, float(box64.cell[0, 0])))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
