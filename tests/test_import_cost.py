"""``import fastff`` loads no kernel toolchain: numba and Triton (and sympy, which
torch.fx's symbolic shapes bring) load when an op first runs on their backend, through the op
registry. Checked in fresh interpreters, so nothing imported by this test process counts."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAZY = ("numba", "llvmlite", "triton", "sympy")


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_fastff_loads_no_toolchain():
    loaded = _run(
        "import json, sys; import fastff, fastff.mm, fastff.models, fastff.nn, fastff.mp; "
        f"print(json.dumps([m for m in {LAZY!r} if m in sys.modules]))")
    assert loaded == [], f"import fastff loaded {loaded}"


def test_first_op_loads_its_backend_through_the_registry():
    """The first CPU neighbor list loads numba (not Triton) and agrees with the reference."""
    result = _run(
        "import json, sys, torch, fastff\n"
        "torch.manual_seed(int.from_bytes(__import__('os').urandom(4), 'little'))\n"
        "pos = torch.rand(60, 3, dtype=torch.float64) * 2.0\n"
        "cell = torch.eye(3, dtype=torch.float64) * 2.0\n"
        "before = [m for m in ('numba', 'triton') if m in sys.modules]\n"
        "nl = fastff.neighbor_list(pos, 0.7, cell)\n"
        "ref = fastff.neighbor_list(pos, 0.7, cell, backend='reference')\n"
        "def key(x):\n"
        "    return sorted(zip(x.i.tolist(), x.j.tolist(), map(tuple, x.shifts.tolist())))\n"
        "print(json.dumps({'before': before, 'backend': nl.backend, 'same': key(nl) == key(ref),"
        " 'pairs': len(nl), 'after': [m for m in ('numba', 'triton') if m in sys.modules]}))")
    assert result["before"] == []
    assert result["backend"] == "numba" and result["same"] and result["pairs"] > 0, result
    assert result["after"] == ["numba"], result


def _threading_layer_priority(env: dict) -> list:
    import os

    code = ("import json, numba, fastff.kernels.neighbors.cpu_numba\n"
            "print(json.dumps(numba.config.THREADING_LAYER_PRIORITY))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, check=True, env={**clean, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_numba_threading_layer_openmp_first_unless_the_user_chose():
    """fastff's numba kernels put OpenMP before TBB (numba's own order prefers TBB whenever
    the tbb package is installed: slower on a quiet machine); a priority or layer set in the
    environment is left as the user set it."""
    assert _threading_layer_priority({}) == ["omp", "tbb", "workqueue"]
    chosen = {"NUMBA_THREADING_LAYER_PRIORITY": "workqueue tbb omp"}
    assert _threading_layer_priority(chosen) == ["workqueue", "tbb", "omp"]
    assert _threading_layer_priority({"NUMBA_THREADING_LAYER": "tbb"})[0] == "tbb"
