"""``fastff bench``'s measurements: real dynamics for the frames, the peers' rows (same weights,
same energies), means with the Verlet-list rebuild rate, and the tabulated rows' force errors.
Quick runs: small boxes, one or two steps."""

from __future__ import annotations

import math

import pytest
import torch

from fastff import VerletList, benchmark, models, systems
from fastff import mm as fmm
from fastff._bench_peers import EagerPaiNN


def _total_energies(record):
    return [k + u for k, u in zip(record["kinetic_energy_kj_mol"],
                                  record["potential_energy_kj_mol"], strict=True)]


def test_md_frames_conserve_energy_and_start_at_300_kelvin():
    """Velocity Verlet on the MM forces: the total energy stays within a few percent of the
    kinetic energy over 1 fs steps, and its error shrinks as dt^2 (an integrator's error, not
    a wrong force); the Maxwell-Boltzmann start is at 300 K."""
    box = systems.water_box(100, seed=int(torch.randint(0, 1000, ())), dtype=torch.float32)
    ff = fmm.water_force_field(box, cutoff=0.7, dtype=torch.float64).requires_grad_(False)
    cell = box.cell.double()
    seed = int(torch.randint(0, 1000, ()))
    deviation = {}
    for dt, frames in ((0.001, 9), (0.0005, 17)):  # the same 8 fs
        xs, record = benchmark.md_trajectory(lambda x: ff(x, cell), box.positions, box.masses,
                                             frames, seed, timestep=dt)
        assert len(xs) == frames and torch.equal(xs[0], box.positions.double())
        total = _total_energies(record)
        kinetic = sum(record["kinetic_energy_kj_mol"]) / frames
        deviation[dt] = max(abs(t - total[0]) for t in total)
        assert deviation[dt] < 0.05 * kinetic, (dt, deviation[dt], kinetic)
        assert record["total_energy_drift_kj_mol"] == pytest.approx(total[-1] - total[0])
    assert 2.0 < deviation[0.001] / deviation[0.0005] < 8.0  # ~4: second order in dt
    # 3N - 3 degrees of freedom (no net momentum) at 300 K, within sampling noise (~5%)
    n = box.num_atoms
    expected = 0.5 * (3 * n - 3) * benchmark.BOLTZMANN * benchmark.MD_TEMPERATURE
    assert record["kinetic_energy_kj_mol"][0] == pytest.approx(expected, rel=0.2)


def test_eager_painn_is_fastff_painn_with_schnetpack_layout():
    """The eager peer computes fastff's PaiNN from the copied weights (float64, forces too)."""
    box = systems.water_box(40, seed=int(torch.randint(0, 1000, ())), dtype=torch.float64)
    model = models.PaiNN(num_features=8, num_interactions=2, num_basis=6).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    eager = EagerPaiNN.from_fastff(model)
    x = (box.positions + 0.01 * torch.randn_like(box.positions)).requires_grad_(True)
    nl = VerletList(model.cutoff, 0.1, compact=True).update(x, box.cell, box.pbc)
    e_fast = model(box.species, x, box.cell, box.pbc, nl=nl).sum()
    e_eager = eager(box.species, nl.vectors(x, box.cell), nl)
    torch.testing.assert_close(e_eager, e_fast, rtol=1e-10, atol=1e-10)
    f_fast, f_eager = (torch.autograd.grad(e, x)[0] for e in (e_fast, e_eager))
    torch.testing.assert_close(f_eager, f_fast, rtol=1e-9, atol=1e-9)


def _quick(models_, **kwargs):
    settings = benchmark.Settings(atoms=300, models=models_, repeat=2, steps=1, budget=0.5,
                                  threads=1, openmm=False, seed=int(torch.randint(0, 100, ())),
                                  **kwargs)
    return benchmark.run(settings)


def _check_peer_run(rows, label, peer):
    by = {r.component: r for r in rows}
    for name in (f"{label} (fastff)", f"{label} (fastff, tabulated)", peer):
        assert by[name].skipped is None and by[name].samples >= 1, name
        d = by[name].as_dict()
        assert d["mean_s"] == pytest.approx(sum(d["per_atom_step"]) / len(d["per_atom_step"]))
    assert by[f"{label} (fastff)"].filters == "exact"
    tab = by[f"{label} (fastff, tabulated)"]
    assert tab.filters == "tabulated (cubic spline)"
    fe = tab.force_error
    assert fe is not None and fe["against"] == f"{label} (fastff)" and fe["unit"] == "kJ/mol/nm"
    assert 0 < fe["rms"] <= fe["max_abs"] < 1e-3 * fe["max_abs_force"], fe
    agreement = by[peer].agreement
    assert agreement["ok"] and agreement["relative_difference"] < 1e-4, agreement
    assert agreement["against"] == f"{label} (fastff)"
    head = benchmark.headline(rows)
    ratio = by[peer].mean / by[f"{label} (fastff)"].mean
    key = by[f"{label} (fastff)"].ratio
    assert key is not None and head[key] == pytest.approx(ratio)
    assert not any("reference" in k for k in head)  # the oracle is never a denominator
    traj = rows.trajectory
    assert traj["integrator"] == "velocity Verlet" and traj["timestep_fs"] == 1.0
    assert set(traj["rebuilds_per_step"]) == {"model list (0.5 + 0.1 nm)",
                                              "MM list (0.9 + 0.1 nm)"}
    assert all(0.0 <= v <= 1.0 for v in traj["rebuilds_per_step"].values())


def test_schnet_rows_time_torch_geometric_with_the_same_weights():
    rows = _quick(("schnet",), reference=True)
    _check_peer_run(rows, "SchNet", "SchNet (torch_geometric)")
    oracle = next(r for r in rows if r.component == "SchNet reference (correctness oracle)")
    assert oracle.oracle and oracle.backend == "reference" and oracle.skipped is None


def test_painn_rows_time_the_eager_schnetpack_peer():
    rows = _quick(("painn",), reference=False)
    _check_peer_run(rows, "PaiNN", "PaiNN eager (torch, schnetpack's equations)")
    assert not any("reference" in r.component for r in rows)


def test_a_peer_with_another_energy_is_reported_and_not_timed():
    x = torch.randn(30, 3)
    same = benchmark._agreement(lambda y: y.square().sum(), lambda y: y.square().sum(), x, "a")
    assert same["ok"] and same["relative_difference"] == 0.0
    off = benchmark._agreement(lambda y: 1.001 * y.square().sum(), lambda y: y.square().sum(),
                               x, "a")
    assert not off["ok"] and off["relative_difference"] == pytest.approx(1e-3, rel=1e-3)


def test_headline_names_its_peer_and_skips_the_oracle():
    rows = [benchmark.Row("MM (fastff)", "auto", 3, [2.0, 4.0], peer="MM (OpenMM)",
                          ratio="MM fastff vs OpenMM CPU"),
            benchmark.Row("MM (OpenMM)", "OpenMM CPU", 3, [1.0, 2.0]),
            benchmark.Row("X (fastff)", "auto", 3, [1.0, 1.0, 4.0], peer="X reference",
                          ratio="X fastff vs reference"),
            benchmark.Row("X reference", "reference", 3, [60.0], oracle=True)]
    head = benchmark.headline(rows)
    assert head == {"MM fastff vs OpenMM CPU": pytest.approx(0.5),
                    "X (fastff) / MM (fastff)": pytest.approx(2.0 / 3.0)}
    assert math.isnan(benchmark.Row("y", "auto", 1).mean)


def test_openmm_peer_platform_follows_the_device():
    assert benchmark._openmm_platform(benchmark.Settings(device="cpu")) == "CPU"
    if torch.cuda.is_available():
        openmm = pytest.importorskip("openmm")
        names = [openmm.Platform.getPlatform(k).getName()
                 for k in range(openmm.Platform.getNumPlatforms())]
        want = "CUDA" if "CUDA" in names else "CPU"
        assert benchmark._openmm_platform(benchmark.Settings(device="cuda")) == want
