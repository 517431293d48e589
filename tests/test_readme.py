"""The README: its Python snippets run as written (in a fresh process, in order), its Quick start
has exactly the two commands CI runs, it stays under 8,000 characters, and its results table is
what ``bench/report.py --readme`` generates from the committed JSON."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blocks(text, language):
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def test_readme_length():
    assert len(README.read_text()) <= 8000


def test_quick_start_has_the_two_commands_ci_runs():
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = _blocks(section, "bash")
    assert len(blocks) == 1, "the Quick start holds one bash block"
    commands = [line for line in blocks[0].splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert len(commands) == 2, commands
    assert commands[0].endswith("fastff bench"), commands[0]
    # the tests command is the one .ci/run runs
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = commands[1].split("&&")[-1].strip()
    assert test_command == "python -m pytest -q -n auto"
    assert re.search(rf"^{re.escape(test_command)}$", ci, re.M), ".ci/run runs another command"
    assert commands[1].startswith("pip install torch==2.13.0"), commands[1]
    assert 'pip install --quiet "torch==2.13.0"' in ci


def test_results_table_matches_the_committed_json():
    report = _report()
    text = README.read_text()
    assert report.START in text and report.END in text
    table = text.split(report.START, 1)[1].split(report.END, 1)[0].strip()
    assert table == report.readme_table().strip(), "run: python bench/report.py --readme"
    # every row names its machine and data file, and compares against a peer
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| case")]
    assert rows
    for row in rows:
        assert ".json`" in row and "x**" in row, row


def test_python_snippets_run(tmp_path):
    code = "\n".join(_blocks(README.read_text(), "python"))
    assert code.count("\n") > 20, "the README should hold its snippets"
    script = tmp_path / "readme_snippets.py"
    script.write_text(code + "\nprint('README snippets done')\n")
    # run outside the repository: the snippets must work from an installed fastff
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "README snippets done" in proc.stdout


def test_relative_links_exist():
    text = README.read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, "the README links to the docs"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


def test_report_survives_missing_files_and_fields(tmp_path):
    import json
    import shutil

    report = _report()
    # no JSON at all: a table with its header and no rows
    report.RESULTS = tmp_path
    assert report.readme_table().startswith("| case |")
    # the JSON with optional fields removed: rows stay, provenance reads "not recorded"
    for name in ("bench_mace_64x0e.json", "bench_3000.json"):
        shutil.copy(ROOT / "bench" / "results" / name, tmp_path / name)
    doc = json.loads((tmp_path / "bench_3000.json").read_text())
    doc.pop("commit", None)
    doc.pop("machine", None)
    for row in doc["results"][0]["rows"]:
        row.pop("force_error", None)
    (tmp_path / "bench_3000.json").write_text(json.dumps(doc))
    table = report.readme_table()
    assert "SchNet (torch_geometric)" in table and "commit not recorded" in table
    assert "SchNet (fastff, tabulated)" in table and "mace-torch MACE" in table
    # a results file that is not JSON drops its rows only
    (tmp_path / "bench_3000.json").write_text("{")
    assert "OpenMM" not in report.readme_table()
