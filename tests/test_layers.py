"""The layering of the package: ``fastff.kernels`` is the bottom layer, every op's launchers share
one signature, and no op addresses its inputs by literal position."""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

from fastff.kernels._runtime import registry

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
MODULES = {"numba": "cpu_numba", "triton": "gpu_triton", "reference": "reference"}


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file under kernels/ (relative imports
    resolved against fastff.kernels)."""
    package = "fastff.kernels." + ".".join(path.relative_to(KERNELS).parts[:-1])
    package = package.rstrip(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            if module == "fastff":  # from fastff import X: X is a module of fastff
                found += [(node.lineno, f"fastff.{alias.name}") for alias in node.names]
    return found


def test_kernels_import_nothing_from_fastff_above_them():
    """Every file under kernels/ imports from fastff only fastff.kernels.* (the kernels are the
    bottom layer; fastff builds on them, never the other way)."""
    offenders = []
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) > 20, files
    for path in files:
        for line, module in _imported_modules(path):
            top = module.split(".")[0]
            if top == "kernels":
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module} (the "
                                 "package is fastff.kernels)")
            elif top == "fastff" and not (module == "fastff.kernels"
                                          or module.startswith("fastff.kernels.")):
                if module == "fastff":
                    continue  # the names are checked one by one above
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_import_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The AST walk above finds the imports it must refuse (plain, from, relative, nested)."""
    fake = KERNELS / "radial" / "_probe.py"
    source = ("import fastff.nn\nfrom fastff import _checks\n"
              "def f():\n    from fastff.models import SchNet\n"
              "from ..message import dense\nfrom fastff.kernels._runtime import registry\n")
    monkeypatch.setattr(Path, "read_text", lambda self: source)
    found = [m for _, m in _imported_modules(fake)]
    assert "fastff.nn" in found and "fastff._checks" in found and "fastff.models" in found
    assert "fastff.kernels.message" in found and "fastff.kernels._runtime" in found


def _launchers():
    registry.import_all_ops()
    for name in registry.op_names():
        family, launcher, backends = registry.op_family(name)
        yield name, family, launcher, backends


def _schema_signature(name: str) -> list[tuple[str, object]]:
    """(name, default) of every input of the custom op ``fastff::<name>`` but ``backend``."""
    schema = getattr(torch.ops.fastff, name).default._schema
    return [(a.name, a.default_value if a.has_default_value() else inspect.Parameter.empty)
            for a in schema.arguments if a.name != "backend"]


@pytest.mark.parametrize("name", [n for n, *_ in _launchers()])
def test_launchers_of_an_op_share_one_signature(name):
    """The reference, numba and Triton launchers of an op take the same parameters, in the same
    order, with the same defaults: the op's inputs less ``backend`` (the registry name is the
    custom op's name). That signature is the contract between the backend files and op.py,
    whose body passes its inputs to the launcher by name (``registry.launch``)."""
    family, launcher, backends = registry.op_family(name)
    assert launcher == name, f"{name} is launched by {launcher}: one name for both"
    assert hasattr(torch.ops.fastff, name), f"no custom op fastff::{name}"
    signatures = {}
    for backend in backends:
        module = importlib.import_module(f"fastff.kernels.{family}.{MODULES[backend]}")
        fn = getattr(module, launcher)
        params = inspect.signature(fn).parameters.values()
        assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params), (
            f"{family}/{MODULES[backend]}.{launcher} takes *args or keyword-only parameters")
        signatures[backend] = [(p.name, p.default) for p in params]
    want = _schema_signature(name)
    for backend, sig in signatures.items():
        assert sig == want, f"{name}: {backend} launcher {sig} != op schema {want}"


def test_no_op_reads_inputs_by_literal_position():
    """op.py files name their inputs (OpArgs): no ``inputs[3]``, ``[None] * 21`` or
    ``needs[6:10]``."""
    pattern = re.compile(r"(inputs|needs|saved|args)\[[0-9:]+\]|\[None\] \* [0-9]")
    offenders = []
    paths = sorted(KERNELS.glob("*/op.py"))
    assert {p.parent.name for p in paths} >= set(registry.FAMILIES)
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
