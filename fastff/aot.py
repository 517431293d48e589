"""Ahead-of-time compilation report of every Triton kernel in fastff, without a GPU.

Run ``python -m fastff.aot [--json FILE] [--arch 80 90]``. Every ``fastff.kernels.<family>``
package that has a ``gpu_triton`` module is imported (families are discovered, so new ones are
picked up without changes here); each entry of its module-level ``AOT_SPECS`` list is compiled
with ``triton.compile`` for an explicit ``GPUTarget`` (sm_80 and sm_90 by default) and the PTX is
assembled by the ``ptxas`` shipped in the Triton wheel, whose ``-v`` report gives registers,
spills and stack frame; shared memory comes from Triton's metadata. Prints one row per
(kernel, arch), and exits with status 1 if any module fails to import or any kernel fails to
compile (naming it and why).

An ``AOT_SPECS`` entry is a dict::

    {"kernel": fn,                                  # a @triton.jit function
     "signature": {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr", ...},
     "constexprs": {"BLOCK": 128},
     "name": "fn[fp32]",                            # optional label, default fn.__name__
     "options": {"num_warps": 4}}                   # optional triton.compile options

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
    """([(module name, module)], [failure rows]) for every fastff.kernels.*.gpu_triton."""
    import fastff.kernels as kernels

    modules, failures = [], []
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda m: m.name):
        if not info.ispkg:
            continue
        name = f"{kernels.__name__}.{info.name}.gpu_triton"
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


_PTXAS_FIELDS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


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
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        done = subprocess.run([_ptxas(), "-v", "--gpu-name", gpu, ptx, "-o",
                               os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}:\n{done.stderr.strip()}")
    row: dict = {"ptx_function": kernel.metadata.name}
    for key, pattern in _PTXAS_FIELDS.items():
        found = pattern.search(done.stderr)
        row[key] = int(found.group(1)) if found else 0
    row["shared_bytes"] = int(getattr(kernel.metadata, "shared", 0) or 0)
    row["num_warps"] = int(getattr(kernel.metadata, "num_warps", 0) or 0)
    return row


def run(archs=ARCHS) -> list[dict]:
    """Compile everything; one row per (module, kernel, arch), failures included."""
    modules, rows = discover()
    for module_name, module in modules:
        specs = getattr(module, "AOT_SPECS", None)
        if not isinstance(specs, (list, tuple)) or not specs:
            rows.append({"module": module_name, "kernel": "-", "arch": "-", "ok": False,
                         "error": "no AOT_SPECS list (every Triton kernel must be listed)"})
            continue
        for spec in specs:
            fn = spec.get("kernel")
            base = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__",
                                                            "?")
            label = spec.get("name", base)
            for arch in archs:
                row = {"module": module_name, "kernel": base, "name": label, "arch": f"sm_{arch}"}
                start = time.perf_counter()
                try:
                    row.update(compile_spec(spec, arch))
                    row["ok"] = True
                except Exception as exc:
                    row["ok"] = False
                    lines = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                    row["error"] = lines[-2000:]
                row["seconds"] = round(time.perf_counter() - start, 2)
                rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("module", "kernel", "arch", "regs", "spill st", "spill ld", "smem", "stack", "warps")
    table = [head]
    for r in rows:
        short = r["module"].removeprefix("fastff.kernels.")
        if r.get("ok"):
            table.append((short, r.get("name", r["kernel"]), r["arch"], str(r["registers"]),
                          str(r["spill_stores"]), str(r["spill_loads"]), str(r["shared_bytes"]),
                          str(r["stack_bytes"]), str(r["num_warps"])))
        else:
            table.append((short, r.get("name", r["kernel"]), r["arch"], "FAILED", "", "", "", "",
                          ""))
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
    args = parser.parse_args(argv)
    rows = run(tuple(args.arch))
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
