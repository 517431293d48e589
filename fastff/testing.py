"""Helpers for testing fastff and code built on it: the tolerance table and pair-set comparison.

Every kernel is compared with the float64 torch reference; ``TOLERANCES`` is the one place where
the allowed differences live, each with the reason for its value.
"""

from __future__ import annotations

import torch
from torch import Tensor

# (rtol, atol) per dtype of the kernel under test, against the float64 reference.
TOLERANCES: dict[str, dict[torch.dtype, tuple[float, float]]] = {
    # Distances: one sqrt of a sum of three products; float32 loses ~1e-7 relative per op, and
    # wrapped vs unwrapped coordinates differ by up to |S @ cell| * eps.
    "distances": {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5)},
    # Pair vectors: differences of coordinates of size ~box length.
    "vectors": {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5)},
    # MM energies and gradients against the float64 reference, relative to the largest value
    # (see assert_close_scaled): float64 differs only by summation order over ~1e2-1e5 terms;
    # float32 positions carry ~6e-8 relative error, amplified up to 12x by r^-12, and sums of
    # pair energies of both signs cancel by ~10x in a neutral system.
    "mm": {torch.float64: (1e-10, 0.0), torch.float32: (1e-4, 0.0)},
    # Against OpenMM's Reference platform (its own float64 code, other summation order); the
    # bound the library promises: 1e-6 in float64 and 1e-4 in float32.
    "openmm": {torch.float64: (1e-6, 0.0), torch.float32: (1e-4, 0.0)},
    # Radial bases, compared after dividing by max|value|: the kernels use recurrences over k
    # (~K ulp of float64) and the Bessel derivatives cancel terms of size a^m / r^(n-m+1), so at
    # order 3, K = 12 and r = 0.2 the reference itself is only good to ~1e-9 relative. float32
    # kernels that compute in float32 (Triton) avoid both cancellations (the envelope as
    # (1 - x)^3 g(x), the Bessel derivatives by their series for a r < 2): measured < 2e-6.
    "radial": {torch.float64: (1e-8, 1e-8), torch.float32: (1e-5, 1e-5)},
    # Message passing (sums over ~50 neighbours of F-wide products, filter GEMMs with K + F terms):
    # float64 reorders sums (blocked GEMMs, row-wise segment sums) at ~1e-15 each; float32 loses
    # ~sqrt(K + F) * 6e-8 per GEMM and again in the segment sum, measured < 2e-6 relative.
    "message": {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 1e-5)},
    # Whole models in float32 (three interactions, the readout, energies summed over atoms, forces
    # and stress from the backward through all of it): the kernel-level errors above compound;
    # PaiNN (norms of vector features) measured up to 3.1e-5 relative over 300 random systems.
    "model": {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5)},
    # Accelerated mace-torch models against the unmodified model (fastff.interop.mace): the
    # promised bars, relative to the largest entry. float64 reorders sums only (~1e-15); float32
    # sums ~50 neighbours and ~800 monomials per atom in another order, measured ~2e-6.
    "mace": {torch.float64: (1e-10, 0.0), torch.float32: (1e-5, 0.0)},
    # The force-matching chain (outputs -> forces -> loss -> parameter gradients) in float64: the
    # required bar, 1e-8 relative to the largest entry.
    "training": {torch.float64: (1e-8, 1e-10)},
}

# Pairs whose distance lies this close to the cutoff may be found by one precision and not the
# other (the cutoff test is a strict comparison of rounded numbers); they are left out of set
# comparisons. float32 rounding of a distance ~10 A is ~1e-6 A.
BOUNDARY: dict[torch.dtype, float] = {torch.float64: 1e-9, torch.float32: 1e-4}


def tolerance(kind: str, dtype: torch.dtype) -> dict[str, float]:
    rtol, atol = TOLERANCES[kind][dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close_scaled(actual: Tensor, expected: Tensor, kind: str, dtype: torch.dtype,
                        what: str = "") -> None:
    """max |actual - expected| <= rtol * max(|expected|, tiny): relative to the largest entry, so
    that near-zero components of forces are not held to a relative bound."""
    rtol, atol = TOLERANCES[kind][dtype]
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shapes differ, {list(a.shape)} vs {list(e.shape)}")
    if e.numel() == 0:
        return
    scale = float(e.abs().max())
    err = float((a - e).abs().max())
    if not err <= rtol * max(scale, 1e-30) + atol:
        raise AssertionError(f"{what}: max error {err:.3e} > {rtol:g} x max |expected| "
                             f"{scale:.3e} (relative {err / max(scale, 1e-300):.3e})")


def pair_keys(i: Tensor, j: Tensor, shifts: Tensor) -> list[tuple[int, ...]]:
    """Sorted (i, j, sx, sy, sz) tuples: a neighbor list as a set, independent of its order."""
    rows = torch.cat([i.view(-1, 1).long(), j.view(-1, 1).long(), shifts.long()], dim=1)
    return sorted(map(tuple, rows.cpu().tolist()))


def assert_same_pairs(actual, expected, *, cutoff: float, dtype: torch.dtype,
                      actual_distances: Tensor | None = None,
                      expected_distances: Tensor | None = None) -> None:
    """Assert two neighbor lists hold the same pairs, ignoring pairs within BOUNDARY of cutoff.

    ``actual`` and ``expected`` are (i, j, shifts) triples; the distances, when given, are used
    both to find boundary pairs and to compare values.
    """
    tol = BOUNDARY[dtype]

    def as_dict(ijs, dist):
        """{(i, j, sx, sy, sz): distance or None}."""
        rows = torch.cat([ijs[0].view(-1, 1).long(), ijs[1].view(-1, 1).long(),
                          ijs[2].long()], dim=1).cpu().tolist()
        values = ([None] * len(rows) if dist is None
                  else dist.detach().cpu().double().tolist())
        return {tuple(r): d for r, d in zip(rows, values, strict=True)}

    a = as_dict(actual, actual_distances)
    e = as_dict(expected, expected_distances)
    if len(a) != len(actual[0]):
        raise AssertionError(f"actual list holds duplicate pairs ({len(actual[0]) - len(a)})")

    def near_cutoff(key):
        d = e.get(key) if e.get(key) is not None else a.get(key)
        return d is not None and abs(d - cutoff) < tol * max(1.0, cutoff)

    missing = [k for k in e if k not in a and not near_cutoff(k)]
    extra = [k for k in a if k not in e and not near_cutoff(k)]
    if missing or extra:
        raise AssertionError(f"pair sets differ: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(extra)} extra (e.g. {extra[:3]}) of {len(e)} expected")
    if actual_distances is not None and expected_distances is not None:
        common = [k for k in e if k in a]
        da = torch.tensor([a[k] for k in common], dtype=torch.float64)
        de = torch.tensor([e[k] for k in common], dtype=torch.float64)
        rtol, atol = TOLERANCES["distances"][dtype]
        torch.testing.assert_close(da, de, rtol=rtol, atol=atol)


def neighbor_list_from_pairs(i, j, shifts, *, num_atoms: int, cutoff: float,
                             cell: Tensor | None = None, pbc=None):
    """A full :class:`fastff.NeighborList` from pairs found by any other code (e.g. vesin).

    ``i``, ``j``: [E] integer arrays, ``shifts``: [E, 3] with r_ij = x_j - x_i + shifts @ cell.
    The pairs are sorted by ``i`` (stable) and the CSR pointer is built; nothing is checked
    beyond shapes, so this is for tests and benchmarks that bring their own list.
    """
    from fastff.neighbors import NeighborList

    i = torch.as_tensor(i, dtype=torch.int64)
    j = torch.as_tensor(j, dtype=torch.int64)
    shifts = torch.as_tensor(shifts).to(torch.int32).reshape(-1, 3)
    order = torch.argsort(i, stable=True)
    i, j, shifts = i[order], j[order], shifts[order]
    ptr = torch.zeros(num_atoms + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(i, minlength=num_atoms), 0)
    dtype = cell.dtype if cell is not None else torch.float64
    cells = (cell.detach().reshape(1, 3, 3) if cell is not None
             else torch.zeros(1, 3, 3, dtype=dtype))
    periodic = torch.as_tensor(pbc if pbc is not None else [cell is not None] * 3,
                               dtype=torch.bool).reshape(1, 3)
    return NeighborList(i, j, shifts, ptr, cutoff=float(cutoff), half=False,
                        num_atoms=num_atoms, batch=None, cells=cells, pbc=periodic,
                        cell=None if cell is None else cell.detach(), backend="external")
