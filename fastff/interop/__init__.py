"""Adapters between fastff and other people's code (models, data pipelines, MD engines).

Each adapter is a submodule that imports its outside package only when used, so
``import fastff.interop`` costs nothing: ``fastff.interop.pyg`` and ``fastff.interop.mace``
accelerate torch_geometric and mace-torch models in place, ``fastff.interop.pipelines`` holds
the neighbor lists of data pipelines (MACE, NequIP). Submodules load on first attribute
access.
"""

import importlib


def __getattr__(name: str):
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise
