"""Adapters to other people's code (each submodule imports its package only when imported):
``fastff.interop.mace`` accelerates mace-torch models in place."""
