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
