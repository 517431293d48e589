"""Adapters to other people's code (torch_geometric models, data pipelines).

Each adapter is a submodule imported on demand (``import fastff.interop.pyg``), so importing
fastff never imports the package it adapts.
"""
