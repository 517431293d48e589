"""``python -m fastff.aot`` compiles every Triton kernel for sm_80 and sm_90 without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fastff.kernels.neighbors import gpu_triton


def test_aot_compiles_every_neighbor_kernel(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    done = subprocess.run([sys.executable, "-m", "fastff.aot", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())
    assert all(r["ok"] for r in rows)
    compiled = {(r["module"], r["kernel"], r["arch"]) for r in rows if r["registers"] > 0}
    module = gpu_triton.__name__
    kernels = {spec["kernel"].__name__ for spec in gpu_triton.AOT_SPECS}
    assert {"neighbor_count_kernel", "neighbor_fill_kernel", "pair_vectors_kernel",
            "pair_vectors_transpose_kernel", "neighbor_reverse_kernel"} <= kernels
    for name in kernels:
        for arch in ("sm_80", "sm_90"):
            assert (module, name, arch) in compiled, (name, arch)
    for arch in ("sm_80", "sm_90"):  # the fused spline backward (kernels/message)
        assert ("fastff.kernels.message.gpu_triton", "_spline_conv_vjp_kernel", arch) in compiled
    for row in rows:  # the printed table names every compiled row
        assert row["name"] in done.stdout


def test_aot_reruns_itself_without_the_interpreter(tmp_path):
    # Under TRITON_INTERPRET=1 (as in this test process) kernels cannot be compiled; the command
    # must notice and run itself again without it. --arch 80 keeps this one short.
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = tmp_path / "aot.json"
    done = subprocess.run([sys.executable, "-m", "fastff.aot", "--arch", "80", "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())
    assert rows and all(r["ok"] and r["arch"] == "sm_80" for r in rows)


_BROKEN = '''
import sys, types
import triton
import triton.language as tl
import fastff.aot as aot

@triton.jit
def good(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, offs.to(tl.float32), mask=offs < n)

@triton.jit
def broken(x_ptr, n, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), undefined_name)

sig = {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
module = types.SimpleNamespace(AOT_SPECS=[
    {"kernel": good, "signature": sig, "constexprs": {"BLOCK": 32}},
    {"kernel": broken, "signature": sig, "constexprs": {"BLOCK": 32}}])
aot.discover = lambda: ([("fastff.kernels.fake.gpu_triton", module)], [])
sys.exit(aot.main(["--arch", "80"]))
'''


def test_aot_fails_loudly_on_a_broken_kernel(tmp_path):
    script = tmp_path / "broken_family.py"  # @triton.jit needs a source file
    script.write_text(_BROKEN)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED fastff.kernels.fake.gpu_triton broken sm_80" in done.stderr
    assert "undefined_name" in done.stderr
    good_rows = [line for line in done.stdout.splitlines() if line.startswith("fake.gpu_triton")]
    assert any(" good " in f" {line} " and "FAILED" not in line for line in good_rows)
