"""The wheel: `fastff` is its only top-level name (kernels/ ships as fastff.kernels), the family
READMEs are included, and the installed copy works from an unrelated directory."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=600)
    (path,) = out.glob("fastff-*.whl")
    return path


def test_only_top_level_name_is_fastff(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fastff"}, top
    assert "fastff/kernels/neighbors/cpu_numba.py" in names
    assert "fastff/kernels/neighbors/README.md" in names
    assert not any(n.startswith(("kernels/", "tests/", "bench/")) for n in names)


def test_installed_wheel_runs(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=600)
    code = ("import torch, fastff; p = torch.rand(20, 3, dtype=torch.float64) * 4; "
            "nl = fastff.neighbor_list(p, 2.0, torch.eye(3, dtype=torch.float64) * 4); "
            "print(fastff.__file__, len(nl))")
    env = dict(os.environ, PYTHONPATH=str(target))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(str(target))


def test_every_package_folder_is_listed():
    """pyproject.toml lists packages by hand (kernels/ installs as fastff.kernels): every folder
    with an __init__.py under fastff/ and kernels/ must be among them, or the wheel lacks it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = set()
    for top, name in (("fastff", "fastff"), ("kernels", "fastff.kernels")):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *parts)))
    assert found - listed == set(), f"not in pyproject.toml's packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed but absent: {sorted(listed - found)}"
