"""Pair distances without pair vectors: a sub-family of the neighbor-list kernels (see op.py)."""
