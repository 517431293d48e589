"""bench/bench_mace.py in its smallest mode against the real mace-torch: the JSON it writes has
every field a published figure needs, and the accelerated model's energy and forces at the first
step agree with the unmodified model's (float64)."""

import importlib.util
import json
import os

import pytest

pytest.importorskip("mace.modules")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_mace.py")


def _script():
    spec = importlib.util.spec_from_file_location("bench_mace", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_complete_json_and_models_agree(tmp_path):
    bench = _script()
    out = tmp_path / "mace.json"
    doc = bench.main(["--atoms", "60", "--steps", "1", "--dtype", "float64", "--cases", "64x0e",
                      "--no-memory", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["summary"] == json.loads(json.dumps(doc["summary"]))
    for key in ("machine", "versions", "commit", "command", "load_before", "load_after",
                "settings", "cases", "mm", "cueq"):
        assert key in saved, key
    assert saved["versions"]["mace"] and saved["versions"]["e3nn"]
    assert "bench_mace.py --atoms 60" in saved["command"]
    (case,) = saved["cases"]
    assert case["case"] == "64x0e" and case["atoms"] == 60 and case["target"] == ">= 10x"
    for impl in ("original", "accelerated"):
        row = case[impl]
        assert row["median_s_per_step"] > 0 and row["us_per_atom_step_median"] > 0
        assert row["us_per_atom_step_median"] == pytest.approx(
            row["median_s_per_step"] / 60 * 1e6)
    side = case["rounds"][0]["sides"]
    assert side["original"]["pairs"] == side["accelerated"]["pairs"] > 60
    assert case["ratio"] == pytest.approx(side["original"]["median_s"]
                                          / side["accelerated"]["median_s"])
    assert case["energy_rel_diff"] <= 1e-8
    assert case["interaction_energy_rel_diff"] <= 1e-8  # the part E0 does not dominate
    assert case["forces_max_diff_over_max"] <= 1e-8
    assert "skipped" in saved["mm"]  # a 20-water box is smaller than twice the MM cutoff
    assert isinstance(saved["cueq"]["status"], str) and saved["cueq"]["status"]


def test_fastff_bench_mace_rows(tmp_path, capsys):
    """``fastff bench --model mace``: both MACE rows measured on the same steps, the headline's
    speed-up is their ratio, and the progress units match the rows the run reports."""
    import torch

    from fastff import benchmark, cli

    threads = torch.get_num_threads()
    out_json = tmp_path / "bench.json"
    try:
        code = cli.main(["bench", "--model", "mace", "--atoms", "60", "--steps", "1",
                         "--repeat", "1", "--no-openmm", "--json", str(out_json)])
    finally:  # keep the rest of the suite's threads as they were
        benchmark.set_threads(threads)
    assert code == 0
    out = capsys.readouterr().out
    assert "MACE (mace-torch)" in out and "MACE (fastff)" in out
    doc = json.loads(out_json.read_text())
    (res,) = doc["results"]
    rows = {r["component"]: r for r in res["rows"]}
    assert not any(name.startswith(("SchNet", "PaiNN")) for name in rows)
    original, fast = rows["MACE (mace-torch)"], rows["MACE (fastff)"]
    for row in (original, fast):
        assert row["skipped"] is None and row["samples"] == 1 and row["median_s"] > 0
    assert original["backend"] == "mace-torch"
    assert res["headline"]["MACE fastff vs mace-torch"] == pytest.approx(
        original["mean_s"] / fast["mean_s"])
    assert rows["MM (fastff)"]["skipped"]  # the 20-water box is under twice the MM cutoff
    settings = benchmark.Settings(atoms=60, models=("mace",), openmm=False, repeat=1)
    assert benchmark.samples_per_size(settings) == len(res["rows"]) * (settings.repeat + 1)
