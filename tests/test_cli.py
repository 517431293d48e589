"""The ``fastff`` command: bad options fail in one line before measuring; a small real run of
``fastff bench`` and ``fastff profile`` writes what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastff import allocator, benchmark, cli, profiling


def _run(argv, capsys):
    threads = torch.get_num_threads()
    try:
        code = cli.main(argv)
    finally:  # --threads changes the process; keep the rest of the suite as it was
        benchmark.set_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--atoms", "-5"], "--atoms"),
    (["bench", "--atoms", "2"], "at least 3 atoms"),
    (["bench", "--model", "nequip"], "--model"),
    (["bench", "--backend", "cuda"], "--backend"),
    (["bench", "--dtype", "float16"], "--dtype"),
    (["bench", "--repeat", "0"], "--repeat"),
    (["bench", "--budget", "-1"], "--budget"),
    (["bench", "--threads", "x"], "--threads"),
    (["bench", "--sweep", "300,-1"], "--sweep"),
    (["bench", "--json", "/nonexistent-dir/out.json"], "--json"),
    (["bench", "--plot", "/nonexistent-dir/out.png"], "--plot"),
    (["profile", "--model", "dimenet"], "--model"),
    (["profile", "--trace", "/nonexistent-dir/t.json"], "--trace"),
    ([], "command"),
])
def test_bad_options_fail_in_one_line_before_measuring(argv, message, capsys, monkeypatch):
    def no_measurement(*args, **kwargs):
        raise AssertionError("measured despite a bad option")

    monkeypatch.setattr(benchmark, "run", no_measurement)
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastff: error:"), err
    assert message in lines[0]


def test_unavailable_backend_is_a_usage_error(capsys, monkeypatch):
    # Triton on CPU tensors needs the interpreter; without it the backend cannot run here
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes the triton backend available")
    code, _, err = _run(["bench", "--backend", "triton", "--device", "cpu"], capsys)
    assert code == 2 and "--backend triton" in err and len(err.strip().splitlines()) == 1


def test_command_line_entry_point_exits_nonzero_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "fastff", "bench", "--atoms", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("fastff: error:")


def test_bench_small_run_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code, out, _ = _run(["bench", "--sweep", "300,600", "--model", "schnet", "--repeat", "2",
                         "--steps", "1", "--threads", "1", "--json", str(out_json),
                         "--plot", str(out_png)], capsys)
    assert code == 0
    assert "SchNet (fastff)" in out and "headline" in out
    doc = json.loads(out_json.read_text())
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["settings"]["threads"] == 1 and doc["settings"]["dtype"] == "float32"
    # glibc's defaults unless --tune-malloc (or an earlier call in this process) tuned it
    assert doc["malloc_tuned"] is allocator.malloc_tuned()
    assert ("malloc tuned" if doc["malloc_tuned"] else "malloc default") in out
    assert [r["atoms"] for r in doc["results"]] == [300, 600]
    assert doc["command"].startswith("fastff bench --sweep 300,600")
    assert doc["commit"] is None or len(doc["commit"].split("+")[0]) == 40
    small, large = doc["results"]
    by_name = {r["component"]: r for r in large["rows"]}
    for name in ("neighbor list", "MM (fastff)", "MM (OpenMM)", "SchNet (fastff)",
                 "SchNet (fastff, tabulated)", "SchNet (torch_geometric)",
                 "SchNet reference (correctness oracle)"):
        row = by_name[name]
        assert row["skipped"] is None, name
        assert row["samples"] == len(row["per_atom_step"]) >= 2 and row["mean_s"] > 0, name
        assert row["mean_s"] == pytest.approx(sum(row["per_atom_step"]) / row["samples"])
    # the 300-atom box (1.45 nm) is too small for the 0.9 nm MM cutoff: said, not measured
    mm_small = next(r for r in small["rows"] if r["component"] == "MM (fastff)")
    assert mm_small["skipped"] and "cutoff" in mm_small["skipped"]
    # frames of real dynamics, with the rebuild rate of the lists recorded and printed
    traj = large["trajectory"]
    assert traj["integrator"] == "velocity Verlet" and traj["temperature_K"] == 300.0
    assert len(traj["kinetic_energy_kj_mol"]) == traj["frames"] == 2 * 1 + 2
    assert all(0 <= v <= 1 for v in traj["rebuilds_per_step"].values())
    assert "Verlet-list rebuilds per step: model list (0.5 + 0.1 nm)" in out
    # the tabulated row beside its force error against the exact network
    error = by_name["SchNet (fastff, tabulated)"]["force_error"]
    assert by_name["SchNet (fastff, tabulated)"]["filters"] == "tabulated (cubic spline)"
    assert by_name["SchNet (fastff)"]["filters"] == "exact"
    assert 0 < error["rms"] <= error["max_abs"] < 1e-3 * error["max_abs_force"]
    assert "tabulated (cubic spline) against exact" in out
    # the peer computes the same energy; the speed-up names it; none against the oracle
    assert by_name["SchNet (torch_geometric)"]["agreement"]["ok"]
    head = large["headline"]
    ratio = by_name["SchNet (fastff)"]["mean_s"] / by_name["MM (fastff)"]["mean_s"]
    assert head["SchNet (fastff) / MM (fastff)"] == pytest.approx(ratio)
    speedup = by_name["SchNet (torch_geometric)"]["mean_s"] / by_name["SchNet (fastff)"]["mean_s"]
    assert head["SchNet fastff vs torch_geometric"] == pytest.approx(speedup)
    openmm = by_name["MM (OpenMM)"]["mean_s"] / by_name["MM (fastff)"]["mean_s"]
    assert head["MM fastff vs OpenMM CPU"] == pytest.approx(openmm)
    assert not any("reference" in key for key in head)
    assert "SchNet fastff vs torch_geometric" in out and "correctness oracle" in out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # bench/report.py turns the saved JSON into the README's table and redraws the plot
    report = os.path.join(os.path.dirname(__file__), "..", "bench", "report.py")
    again = tmp_path / "again.png"
    proc = subprocess.run([sys.executable, report, str(out_json), "--plot", str(again)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| SchNet (fastff) |" in proc.stdout
    assert "| component | 300 atoms | 600 atoms |" in proc.stdout
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_command_writes_a_chrome_trace_with_fastff_ops(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    code, out, _ = _run(["profile", "--model", "schnet", "--atoms", "300", "--steps", "1",
                         "--trace", str(trace), "--tune-malloc"], capsys)
    assert code == 0
    assert "fastff::cfconv" in out and "peak memory" in out
    assert allocator.malloc_tuned() is (allocator._libc() is not None)  # --tune-malloc did
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert "fastff::cfconv" in names and "fastff.SchNet.interaction" in names


def test_profile_context_names_every_fastff_op():
    from fastff import models, systems

    box = systems.water_box(40, dtype=torch.float64)
    model = models.SchNet(num_features=8, num_interactions=1).double()
    with profiling.profile() as prof:
        models.energy_and_forces(model, box.species, box.positions, box.cell)
    names = {r["name"] for r in prof.rows()}
    for op in ("fastff::neighbor_list", "fastff::cfconv", "fastff::cfconv_vjp",
               "fastff.SchNet.interaction"):
        assert op in names, op
    assert all(r["self_s"] >= 0 for r in prof.rows())
    if os.path.exists("/proc/self/clear_refs"):
        assert prof.memory.extra is not None and prof.memory.extra >= 0
    assert "fastff ops" in prof.summary()


def test_sweep_skips_a_component_predicted_over_budget():
    """A component that was slow at the previous size is not started at a larger one, and
    stays skipped at the sizes after (its estimate carries over)."""
    slow = benchmark.Row("neighbor list", "auto", 300, per_atom_step=[1.0])  # 1 s per atom
    settings = benchmark.Settings(atoms=600, models=(), openmm=False, reference=False,
                                  repeat=2, steps=1, budget=1.0)
    rows = benchmark.run(settings, previous=[slow])
    by_name = {r.component: r for r in rows}
    skipped = by_name["neighbor list"]
    assert skipped.skipped and "time budget" in skipped.skipped and skipped.estimate == 1.0
    assert by_name["MM (fastff)"].skipped is None and by_name["MM (fastff)"].samples >= 2
    again = benchmark.run(benchmark.Settings(atoms=900, models=(), openmm=False,
                                             reference=False, repeat=2, steps=1, budget=1.0),
                          previous=rows)
    assert next(r for r in again if r.component == "neighbor list").skipped


def test_progress_units_match_the_samples_a_run_reports():
    """``samples_per_size`` is the number of ``on_sample`` calls of one run (timed and skipped
    components alike), so the progress bar of ``fastff bench`` ends full, not past its end."""
    settings = benchmark.Settings(atoms=300, models=("schnet",), openmm=False, reference=False,
                                  repeat=2, steps=1, budget=1.0)
    calls = []
    rows = benchmark.run(settings, on_sample=lambda: calls.append(1))
    assert any(r.skipped for r in rows) and any(not r.skipped for r in rows)  # MM: box too small
    assert len(calls) == benchmark.samples_per_size(settings)


def test_progress_bar_is_tqdm_with_a_settable_label():
    import io

    from tqdm import tqdm

    from fastff._cliargs import ProgressBar

    stream = io.StringIO()
    with ProgressBar(4, "first", stream=stream) as bar:
        assert isinstance(bar, tqdm)
        bar.label = "second"
        for _ in range(4):
            bar.update()
    assert bar.label == "second" and "second" in stream.getvalue()
    assert "4/4" in stream.getvalue()
    silent = io.StringIO()
    with ProgressBar(3, "off", enabled=False, stream=silent) as bar:
        bar.label = "still off"
        bar.update()
    assert silent.getvalue() == ""


def test_compile_notice_names_fastff_kernels_as_numba_compiles_them():
    """The bench's bar says which fastff kernel numba is compiling, and counts them; numba's
    own helpers and other packages' functions are not counted."""
    import io

    import numpy as np
    from numba import njit

    from fastff._cliargs import CompileNotice, ProgressBar

    def probe(x):
        return x.sum() * 2.0

    def outsider(x):
        return x.sum() + 1.0

    probe.__module__ = "fastff.kernels.probe_family"  # as numba reports a fastff kernel
    outsider.__module__ = "somebody_else"
    stream = io.StringIO()
    values = np.random.default_rng().random(5)
    with ProgressBar(2, "fastff bench", stream=stream) as bar, CompileNotice(bar) as notice:
        assert njit(probe)(values) == 2.0 * values.sum()  # compiled here: a new dispatcher
        assert njit(outsider)(values) == values.sum() + 1.0
        assert bar.label == "fastff bench"  # restored once the compile ended
    assert notice.compiled == 1 and notice.seconds > 0.0
    assert "compiling probe_family.probe" in stream.getvalue()
    assert "outsider" not in stream.getvalue()


# --- the user's system and model: --structure FILE, --model FILE ---------------------------------

@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A water structure (extended XYZ, Angstrom), OpenMM's TIP3P box (PDB), a torch-saved
    torch_geometric SchNet, a fastff SchNet in Angstrom, a state_dict and a garbage file."""
    import ase.io

    from fastff import models, systems

    pyg = pytest.importorskip("torch_geometric.nn.models")
    out = tmp_path_factory.mktemp("user")
    ase.io.write(out / "water.xyz", systems.water_box(60, seed=2).to_ase(), format="extxyz")
    torch.manual_seed(0)
    torch.save(pyg.SchNet(16, 16, 1, 8, cutoff=4.0), out / "pyg.pt")
    fast = models.SchNet(16, 1, 8, cutoff=4.0)
    fast.length_unit, fast.energy_unit = "Angstrom", "eV"
    torch.save(fast, out / "fastff.pt")
    torch.save(fast.state_dict(), out / "state.pt")
    (out / "garbage.xyz").write_text("this is not a structure\n")
    openmm_app = pytest.importorskip("openmm.app")
    pdb = os.path.join(os.path.dirname(openmm_app.__file__), "data", "tip3p.pdb")
    return {name.split(".")[0]: str(out / name) for name in (
        "water.xyz", "pyg.pt", "fastff.pt", "state.pt", "garbage.xyz")} | {"tip3p": pdb}


@pytest.mark.parametrize("argv, message", [
    (["--structure", "/nonexistent/water.xyz"], "--structure /nonexistent/water.xyz: no such"),
    (["--structure", "{water}", "--atoms", "300"], "drop --atoms"),
    (["--structure", "{garbage}"], "ASE cannot read it"),
    (["--model", "/nonexistent/model.pt"], "--model"),
    (["--model", "{state}"], "state_dict"),
    (["--model", "{water}"], "torch.load cannot read it"),
])
def test_bad_system_options_fail_before_measuring(argv, message, user_files, capsys,
                                                  monkeypatch):
    def no_measurement(*args, **kwargs):
        raise AssertionError("measured despite a bad option")

    monkeypatch.setattr(benchmark, "run", no_measurement)
    code, out, err = _run(["bench", *(a.format(**user_files) for a in argv)], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastff: error:"), err
    assert message in lines[0]


def test_bench_torch_geometric_model_on_a_structure(user_files, tmp_path, capsys):
    out_json = tmp_path / "user.json"
    code, out, _ = _run(["bench", "--structure", user_files["water"], "--model",
                         user_files["pyg"], "--repeat", "2", "--steps", "1", "--threads", "1",
                         "--json", str(out_json)], capsys)
    assert code == 0
    assert "180 atoms (water.xyz, H120O60)" in out
    doc = json.loads(out_json.read_text())
    (result,) = doc["results"]
    assert result["system"] == "water.xyz, H120O60"
    by_name = {r["component"]: r for r in result["rows"]}
    for name in ("torch_geometric SchNet", "torch_geometric SchNet (fastff)",
                 "torch_geometric SchNet (fastff, tabulated)"):
        assert by_name[name]["skipped"] is None and by_name[name]["median_s"] > 0, name
    # an XYZ file carries no force field: MM is said to be missing, not measured
    assert "PDB" in by_name["MM (fastff)"]["skipped"]
    ratio = (by_name["torch_geometric SchNet"]["mean_s"]
             / by_name["torch_geometric SchNet (fastff)"]["mean_s"])
    key = "torch_geometric SchNet accelerated (fastff) vs torch_geometric"
    assert result["headline"][key] == pytest.approx(ratio)
    assert key in out and "target >= 5x" in out
    # no MM force field in an XYZ file: the frames are a random walk, and say so
    assert result["trajectory"]["integrator"].startswith("random walk")
    error = by_name["torch_geometric SchNet (fastff, tabulated)"]["force_error"]
    assert error["against"] == "torch_geometric SchNet (fastff)" and error["max_abs"] > 0


def test_bench_fastff_model_on_a_pdb_with_mm(user_files, capsys):
    code, out, _ = _run(["bench", "--structure", user_files["tip3p"], "--model",
                         user_files["fastff"], "--repeat", "2", "--steps", "1", "--threads",
                         "1", "--no-reference"], capsys)
    assert code == 0
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    for name in ("MM (fastff)", "MM (OpenMM)", "SchNet (fastff)", "SchNet (fastff, tabulated)"):
        assert name in rows and "skipped" not in rows[name], out
    assert "SchNet (fastff) / MM (fastff)" in out
    # dynamics on the file's own amber14/TIP3P System
    assert "frames: velocity Verlet" in out and "amber14/TIP3P" in out
