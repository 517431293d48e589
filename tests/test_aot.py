"""``python -m fastff.aot`` compiles every Triton kernel for sm_80 and sm_90 without a GPU, and
what it reports from the compiled code holds for every kernel: relaxed atomics only, no
GPU-wide barriers, 64-bit offsets, at most 128 registers and no spills on sm_90, float32 and
float64 alike. The detectors themselves are checked on planted kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastff.kernels.neighbors import gpu_triton

_NO_INTERPRETER = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One run of the whole report (both architectures), shared by the tests below."""
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    done = subprocess.run([sys.executable, "-m", "fastff.aot", "--json", str(out)],
                          env=_NO_INTERPRETER, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    return json.loads(out.read_text()), done.stdout


def test_aot_compiles_every_kernel_for_both_architectures(report):
    rows, stdout = report
    assert rows and all(r["ok"] for r in rows)
    names = {(r["module"], r["name"]) for r in rows}
    for module, name in names:
        for arch in ("sm_80", "sm_90"):
            assert any(r["module"] == module and r["name"] == name and r["arch"] == arch
                       and r["registers"] > 0 for r in rows), (name, arch)
    module = gpu_triton.__name__
    kernels = {spec["kernel"].__name__ for spec in gpu_triton.AOT_SPECS}
    assert {"neighbor_count_kernel", "neighbor_fill_kernel", "pair_vectors_kernel",
            "pair_vectors_transpose_kernel", "neighbor_reverse_kernel", "verlet_check_kernel",
            "neighbor_pad_kernel"} <= kernels
    assert kernels <= {r["kernel"] for r in rows if r["module"] == module}
    compiled = {r["kernel"] for r in rows}
    assert {"_spline_conv_vjp_kernel", "nonbonded_tiles_kernel", "_nonbonded_rows",
            "tile_fill_kernel", "_bin_kernel", "scan_kernel"} <= compiled
    for row in rows:  # the printed table names every compiled row
        assert row["name"] in stdout


def test_every_float_kernel_compiles_in_float32_and_float64(report):
    rows, _ = report
    dtypes: dict[str, set] = {}
    for r in rows:
        dtypes.setdefault(r["kernel"], set()).add(r["dtype"])
        assert r["dtype"] in r["name"] or r["dtype"] in ("int", "fp32+fp64"), r["name"]
    for kernel, seen in dtypes.items():
        floats = {part for d in seen for part in d.split("+")} - {"int"}
        if floats:  # a mixed variant (fp32 positions, fp64 frames) counts for both
            assert floats == {"fp32", "fp64"}, (kernel, seen)
    for family in ("message", "radial"):  # float64 variants the launchers call
        assert any(r["module"].endswith(f"{family}.gpu_triton") and r["dtype"] == "fp64"
                   for r in rows), family


def test_no_ordered_atomics_and_no_gpu_wide_barriers(report):
    rows, _ = report
    assert any(r["atomics"] for r in rows)  # the detector sees atomics at all
    for r in rows:
        assert r["acq_rel_atomics"] == 0, (r["name"], r["arch"], "acquire/release atomics")
        assert r["membar_gpu"] == 0, (r["name"], r["arch"], "MEMBAR.*.GPU in the SASS")
    from fastff.aot import _tool

    if _tool("cuobjdump") is not None:  # SASS read, not only PTX
        assert all(r["membar_source"] == "sass" for r in rows)


def test_offsets_are_64_bit(report):
    rows, _ = report
    for r in rows:
        assert not r["i32_offsets"], (r["name"], r["arch"], r["i32_offsets"][:3])


def test_registers_and_spills_on_sm_90(report):
    rows, _ = report
    for r in rows:
        if r["arch"] == "sm_90":
            assert r["registers"] <= 128, (r["name"], r["registers"])
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (r["name"], "spills")


def test_aot_reruns_itself_without_the_interpreter(monkeypatch):
    # Under TRITON_INTERPRET=1 (as in this process when no GPU exists) kernels cannot be
    # compiled: the command runs itself again in a fresh process without it, same arguments.
    import fastff.aot as aot

    calls = []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(aot.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    assert aot.main(["--arch", "80", "--json", "out.json"]) == 0
    (cmd, env), = calls
    assert cmd[1:] == ["-m", "fastff.aot", "--arch", "80", "--json", "out.json"]
    assert "TRITON_INTERPRET" not in env


_PLANTED = '''
import sys, types
import triton
import triton.language as tl
import fastff.aot as aot

@triton.jit
def good(x_ptr, i_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    i = tl.load(i_ptr + offs, mask=offs < n, other=0)
    tl.atomic_add(x_ptr + i, 1.0, mask=offs < n, sem="relaxed")

@triton.jit
def ordered(x_ptr, i_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    i = tl.load(i_ptr + offs, mask=offs < n, other=0)
    tl.atomic_add(x_ptr + i, 1.0, mask=offs < n)  # default sem: acquire/release

@triton.jit
def narrow(x_ptr, i_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # 32-bit: wraps past 2^31
    tl.store(x_ptr + offs * n, 1.0, mask=offs < n)

sig = {"x_ptr": "*fp32", "i_ptr": "*i64", "n": "i32", "BLOCK": "constexpr"}
module = types.SimpleNamespace(AOT_SPECS=[
    {"kernel": k, "signature": sig, "constexprs": {"BLOCK": 32}} for k in (good, ordered, narrow)])
aot.discover = lambda: ([("fastff.kernels.fake.gpu_triton", module)], [])
'''


def test_the_detectors_catch_planted_kernels(tmp_path):
    script = tmp_path / "planted_family.py"  # @triton.jit needs a source file
    out = tmp_path / "planted.json"
    script.write_text(_PLANTED + f"\nsys.exit(aot.main(['--arch', '90', '--jobs', '1', "
                                 f"'--json', {str(out)!r}]))\n")
    done = subprocess.run([sys.executable, str(script)], env=_NO_INTERPRETER,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r["kernel"]: r for r in json.loads(out.read_text())}
    assert rows["good"]["atomics"] > 0 and rows["good"]["acq_rel_atomics"] == 0
    assert rows["good"]["membar_gpu"] == 0 and not rows["good"]["i32_offsets"]
    assert rows["ordered"]["acq_rel_atomics"] > 0 and rows["ordered"]["membar_gpu"] > 0
    assert rows["narrow"]["i32_offsets"] and not rows["good"]["i32_offsets"]


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
    done = subprocess.run([sys.executable, str(script)], env=_NO_INTERPRETER,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED fastff.kernels.fake.gpu_triton broken[fp32] sm_80" in done.stderr
    assert "undefined_name" in done.stderr
    good_rows = [line for line in done.stdout.splitlines() if line.startswith("fake.gpu_triton")]
    assert any(" good[fp32] " in f" {line} " and "FAILED" not in line for line in good_rows)
