"""The kernel runtime: what every family's ``op.py`` uses, and nothing above it.

* ``registry``: which launcher runs an op (numba, Triton or the torch reference) and why.
* ``args``: an op's inputs by name, from its schema (no literal input positions).
* ``autograd``: which gradients a backward will use, graph-node aliases, refusing derivatives.
* ``energy_op``: the shared autograd of fused energy ops (first backward a multiply, second
  through the reference).
* ``checks``: the thread-local switch for value checks; ``memory``: free-memory estimates;
  ``status``: the flags of capacity-mode lists.

This package imports only torch and the standard library; ``fastff.kernels`` as a whole imports
nothing from ``fastff`` outside ``fastff.kernels`` (tests/test_layers.py enforces it).
"""
