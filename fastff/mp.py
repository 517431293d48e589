"""Message-passing ops: fused radial bases (and, in ``fastff.nn``, the modules built on them)."""

from __future__ import annotations

from torch import Tensor

from fastff import _checks
from fastff.kernels._runtime import registry
from fastff.kernels.radial import op as _radial_op

KINDS = ("gaussian", "bessel")
ENVELOPES = ("cosine", "polynomial", None)


def check_basis_args(num_basis, cutoff, kind, envelope) -> tuple[int, float, str, str]:
    """Validate (num_basis, cutoff, kind, envelope); returns them normalised."""
    if isinstance(num_basis, bool) or not isinstance(num_basis, int) or num_basis < 1:
        raise ValueError(f"num_basis must be a positive int, got {num_basis!r}")
    c = _checks.cutoff(cutoff)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if envelope not in ENVELOPES and envelope != "none":
        raise ValueError(f"envelope must be one of {ENVELOPES}, got {envelope!r}")
    return num_basis, c, kind, "none" if envelope is None else envelope


def radial_basis(distances: Tensor, *, num_basis: int, cutoff: float, kind: str = "gaussian",
                 envelope: str | None = "cosine", backend: str | None = None) -> Tensor:
    """Radial basis functions times an envelope, fused in one kernel.

    Args:
        distances: [E] float32 or float64, pair distances (any length unit, the cutoff's);
            while value checks are on, negative or NaN distances raise ValueError.
        num_basis: K, number of basis functions (> 0).
        cutoff: radius where the envelope reaches zero (> 0, same unit as distances).
        kind: "gaussian" (SchNet's grid: centres 0..cutoff, width the spacing) or "bessel"
            (sqrt(2/c) sin(k pi r / c) / r, k = 1..K).
        envelope: "cosine", "polynomial" (DimeNet, p = 6) or None (no envelope, no cutoff).
        backend: "numba", "triton", "reference" or None (``FASTFF_BACKEND``, then by device).

    Returns:
        [E, K] tensor of the dtype of ``distances``: ``u(r) b_k(r)``, zero beyond the cutoff when
        an envelope is given. Differentiable to any order in ``distances`` (the backward is the
        same kernel at the next derivative order). Deterministic; safe under torch.compile
        (fake impl with symbolic E).
    """
    k, c, kind, env = check_basis_args(num_basis, cutoff, kind, envelope)
    _checks.distances(distances)
    name, _ = registry.resolve("radial_basis", distances.device, backend)
    return _radial_op.radial_basis(distances.contiguous(), k, c, kind, env, 0, name)
