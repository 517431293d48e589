"""Ahead-of-time compilation report of every Triton kernel in fastff, without a GPU.

Run ``python -m fastff.aot [--json FILE] [--arch 80 90] [--jobs N]``. Every
``fastff.kernels.<family>`` package that has a ``gpu_triton`` module is imported, and every
``fastff.kernels.gpu_*`` module of shared helpers (families are discovered, so new ones are
picked up without changes here); each entry of its module-level ``AOT_SPECS`` list is compiled
with ``triton.compile`` for an explicit ``GPUTarget`` (sm_80 and sm_90 by default) and the PTX
is assembled by the ``ptxas`` shipped in the Triton wheel, whose ``-v`` report gives registers,
spills and stack frame; shared memory comes from Triton's metadata. Prints one row per
(kernel, dtype, arch), and exits with status 1 if any module fails to import or any kernel fails
to compile (naming it and why).

Each row also reports what the GPU will execute, read from the compiled code:

* ``atomics``: atomic instructions in the PTX; ``acq_rel``: those with acquire/release order
  (Triton's default ``sem``; each becomes ``MEMBAR.ALL.GPU + ATOMG + CCTL.IVALL`` in SASS, where
  ``sem="relaxed"`` gives one ``RED``); ``membar``: GPU-wide memory barriers in the SASS
  (``cuobjdump -sass`` from the Triton wheel; the PTX's ``membar.gl`` / ``fence.*.gpu`` where
  cuobjdump is absent).
* ``i32 offs``: pointer offsets computed in 32-bit arithmetic that can wrap past 2^31: a
  product with a run-time factor (index x stride, program id x block) or a sum of two run-time
  values, found in the Triton IR (``tt.addptr`` with an ``i32`` offset). Kernels compute such
  offsets in 64 bits.

An ``AOT_SPECS`` entry is a dict::

    {"kernel": fn,                                  # a @triton.jit function
     "signature": {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr", ...},
     "constexprs": {"BLOCK": 128},
     "name": "fn[fp32]",                            # optional label, default fn.__name__
     "options": {"num_warps": 4},                   # optional triton.compile options
     "dtypes": ("fp32", "fp64")}                    # optional: one variant per float dtype

``dtypes`` compiles the spec once per listed dtype, replacing every ``fp32`` in the signature;
without it the spec is compiled as written. Each row names its dtype (``fp32``, ``fp64``,
``fp32+fp64`` for mixed signatures, ``int`` for none).

``TRITON_INTERPRET`` is read when kernels are decorated and makes compilation impossible, so
when it is set this command runs itself again in a fresh process without it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

ARCHS = (80, 90)


def _reexec_without_interpreter(argv: list[str]) -> int:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.call([sys.executable, "-m", "fastff.aot", *argv], env=env)


def discover() -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
    """([(module name, module)], [failure rows]) for every fastff.kernels.*.gpu_triton and
    fastff.kernels.gpu_*."""
    import fastff.kernels as kernels

    modules, failures = [], []
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda m: m.name):
        if info.ispkg:
            name = f"{kernels.__name__}.{info.name}.gpu_triton"
        elif info.name.startswith("gpu_"):  # Triton helpers shared by the families
            name = f"{kernels.__name__}.{info.name}"
        else:
            continue
        try:
            if importlib.util.find_spec(name) is None:
                continue
            modules.append((name, importlib.import_module(name)))
        except Exception as exc:  # report every broken module, keep going
            failures.append({"module": name, "kernel": "-", "arch": "-", "ok": False,
                             "error": f"import failed: {type(exc).__name__}: {exc}"})
    return modules, failures


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _tool(name: str) -> str | None:
    """A CUDA binary tool shipped in the Triton wheel (cuobjdump, nvdisasm), or None."""
    path = os.path.join(os.path.dirname(_ptxas()), name)
    return path if os.path.exists(path) else None


_PTXAS_FIELDS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


_FLOATS = ("fp16", "bf16", "fp32", "fp64")
# PTX instructions: atomics (atom.* returns the old value, red.* does not), and the memory
# orders and fences that serialise them.
_PTX_ATOMIC = re.compile(r"^\s*(@!?%p\d+\s+)?(atom|red)\.", re.M)
_PTX_ORDERED = re.compile(r"^\s*(@!?%p\d+\s+)?(atom|red)\.\S*\.(acq_rel|acquire|release|sc)\.",
                          re.M)
_PTX_FENCE = re.compile(r"^\s*(@!?%p\d+\s+)?(membar\.gl|membar\.sys|fence\.\S*(gpu|sys))", re.M)
_SASS_MEMBAR = re.compile(r"MEMBAR\.[A-Z.]*(GPU|SYS)")


def dtype_of(signature: dict) -> str:
    """The float dtype(s) of a kernel signature's pointers and scalars: fp32, fp64, fp32+fp64."""
    found = sorted({t.lstrip("*") for t in signature.values() if t.lstrip("*") in _FLOATS})
    return "+".join(found) if found else "int"


def expand(spec: dict) -> list[dict]:
    """One spec per dtype of its ``dtypes`` (every fp32 in the signature replaced), else the
    spec itself; each named ``kernel[dtype]`` unless it has a name."""
    variants = []
    for dtype in spec.get("dtypes", (None,)):
        out = dict(spec)
        if dtype is not None:
            out["signature"] = {k: v.replace("fp32", dtype) for k, v in spec["signature"].items()}
        fn = spec.get("kernel")
        base = str(getattr(fn, "__name__", None)
                   or getattr(getattr(fn, "fn", None), "__name__", "?"))
        label: str = spec.get("name") or base
        if dtype is not None and "name" in spec:
            label = f"{label}[{dtype}]" if "[" not in label else label.replace("]", f",{dtype}]")
        elif "[" not in label:
            label = f"{label}[{dtype_of(out['signature'])}]"
        out["name"] = label
        variants.append(out)
    return variants


_ADDPTR = re.compile(r"tt\.addptr\s+(%[\w.#]+),\s*(%[\w.#]+)\s*:.*,\s*(tensor<[^>]*xi32>|i32)\s")
_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_STATIC = frozenset({"arith.constant", "tt.make_range"})
# i32 arithmetic that can wrap: a product with a run-time factor (index x stride, program id x
# block), or a sum of two run-time values (base + index)
_PRODUCTS = frozenset({"arith.muli", "arith.shli"})
_SUMS = frozenset({"arith.addi", "arith.subi"})
# ops that pass their operands' values on (shape changes, selections, other integer arithmetic)
_TRANSPARENT = frozenset({"tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape",
                          "tt.trans", "arith.andi", "arith.ori", "arith.xori", "arith.remsi",
                          "arith.remui", "arith.divsi", "arith.divui", "arith.shrsi",
                          "arith.shrui", "arith.minsi", "arith.maxsi", "arith.trunci",
                          "arith.select", "arith.extsi", "arith.extui"})


def runtime_i32_offsets(ttir: str) -> list[str]:
    """The ``tt.addptr`` lines of Triton IR whose 32-bit offset comes from arithmetic that can
    wrap past 2^31: an i32 product with a run-time factor, or an i32 sum of two run-time values
    (sizes, program ids, loaded indices, loop variables). Offsets that are plain run-time i32
    values, or compile-time ranges and constants, cannot wrap and are not reported."""
    defs: dict[str, tuple[str, list[str]]] = {}
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if m:
            defs[m.group(1)] = (m.group(2), re.findall(r"%[\w.]+", m.group(3).split(":")[0]))

    def static(name: str, depth: int = 0) -> bool:
        op = defs.get(name.split("#")[0])
        if op is None or depth > 64:
            return False  # a kernel argument, loop variable or block argument
        if op[0] in _STATIC:
            return True
        return op[0] in (_TRANSPARENT | _PRODUCTS | _SUMS) and all(
            static(v, depth + 1) for v in op[1])

    def wraps(name: str, depth: int = 0) -> bool:
        op = defs.get(name.split("#")[0])
        if op is None or depth > 64 or op[0] in _STATIC:
            return False
        operands = op[1]
        if op[0] in _PRODUCTS and not all(static(v) for v in operands):
            return True
        if op[0] in _SUMS and sum(not static(v) for v in operands) >= 2:
            return True
        return (op[0] in (_TRANSPARENT | _PRODUCTS | _SUMS)
                and any(wraps(v, depth + 1) for v in operands))

    bad = []
    for line in ttir.splitlines():
        m = _ADDPTR.search(line)
        if m and wraps(m.group(2)):
            bad.append(line.strip().split(" loc(")[0])
    return bad


def compile_spec(spec: dict, arch: int) -> dict:
    """Compile one AOT_SPECS entry for sm_<arch>; returns the table row (raises on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec["kernel"], signature=spec["signature"],
                    constexprs=spec.get("constexprs", {}))
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(spec.get("options", {})))
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    ptx_text = kernel.asm["ptx"]
    sass = None
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(ptx, "w") as f:
            f.write(ptx_text)
        done = subprocess.run([_ptxas(), "-v", "--gpu-name", gpu, ptx, "-o", cubin],
                              capture_output=True, text=True)
        cuobjdump = _tool("cuobjdump")
        if done.returncode == 0 and cuobjdump is not None:
            dump = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
            sass = dump.stdout if dump.returncode == 0 else None
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}:\n{done.stderr.strip()}")
    row: dict = {"ptx_function": kernel.metadata.name, "dtype": dtype_of(spec["signature"])}
    for key, pattern in _PTXAS_FIELDS.items():
        found = pattern.search(done.stderr)
        row[key] = int(found.group(1)) if found else 0
    row["shared_bytes"] = int(getattr(kernel.metadata, "shared", 0) or 0)
    row["num_warps"] = int(getattr(kernel.metadata, "num_warps", 0) or 0)
    row["atomics"] = len(_PTX_ATOMIC.findall(ptx_text))
    row["acq_rel_atomics"] = len(_PTX_ORDERED.findall(ptx_text))
    if sass is not None:
        row["membar_gpu"] = len(_SASS_MEMBAR.findall(sass))
        row["membar_source"] = "sass"
    else:
        row["membar_gpu"] = len(_PTX_FENCE.findall(ptx_text))
        row["membar_source"] = "ptx"
    row["i32_offsets"] = runtime_i32_offsets(kernel.asm["ttir"])
    return row


_JOBS: list[tuple[str, dict, int]] = []  # (module, spec, arch): read by forked workers


def _compile_job(index: int) -> dict:
    module_name, spec, arch = _JOBS[index]
    fn = spec.get("kernel")
    base = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "?")
    row = {"module": module_name, "kernel": base, "name": spec["name"], "arch": f"sm_{arch}"}
    start = time.perf_counter()
    try:
        row.update(compile_spec(spec, arch))
        row["ok"] = True
    except Exception as exc:
        row["ok"] = False
        lines = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        row["error"] = lines[-2000:]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def run(archs=ARCHS, jobs: int = 1) -> list[dict]:
    """Compile everything; one row per (module, kernel, arch), failures included. ``jobs`` > 1
    compiles in that many forked processes (the rows keep their order)."""
    modules, rows = discover()
    _JOBS.clear()
    for module_name, module in modules:
        specs = getattr(module, "AOT_SPECS", None)
        if not isinstance(specs, (list, tuple)) or not specs:
            rows.append({"module": module_name, "kernel": "-", "arch": "-", "ok": False,
                         "error": "no AOT_SPECS list (every Triton kernel must be listed)"})
            continue
        for spec in (variant for entry in specs for variant in expand(entry)):
            _JOBS.extend((module_name, spec, arch) for arch in archs)
    if jobs > 1 and len(_JOBS) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            rows.extend(pool.map(_compile_job, range(len(_JOBS)), chunksize=1))
    else:
        rows.extend(_compile_job(k) for k in range(len(_JOBS)))
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("module", "kernel", "dtype", "arch", "regs", "spill st", "spill ld", "smem", "stack",
            "warps", "atomics", "acq_rel", "membar", "i32 offs")
    table: list[tuple[str, ...]] = [head]
    for r in rows:
        short = r["module"].removeprefix("fastff.kernels.")
        if r.get("ok"):
            table.append((short, r.get("name", r["kernel"]), r["dtype"], r["arch"],
                          str(r["registers"]), str(r["spill_stores"]), str(r["spill_loads"]),
                          str(r["shared_bytes"]), str(r["stack_bytes"]), str(r["num_warps"]),
                          str(r["atomics"]), str(r["acq_rel_atomics"]), str(r["membar_gpu"]),
                          str(len(r["i32_offsets"]))))
        else:
            table.append((short, r.get("name", r["kernel"]), "", r["arch"], "FAILED")
                         + ("",) * (len(head) - 5))
    widths = [max(len(row[k]) for row in table) for k in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "TRITON_INTERPRET" in os.environ:
        return _reexec_without_interpreter(argv)
    parser = argparse.ArgumentParser(prog="python -m fastff.aot",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON to FILE")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: one per CPU)")
    args = parser.parse_args(argv)
    rows = run(tuple(args.arch), jobs=max(1, args.jobs))
    print(format_table(rows))
    failed = [r for r in rows if not r.get("ok")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not rows:
        print("no Triton kernels found under fastff.kernels", file=sys.stderr)
        return 1
    for r in failed:
        print(f"\nFAILED {r['module']} {r.get('name', r['kernel'])} {r['arch']}:\n{r['error']}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
