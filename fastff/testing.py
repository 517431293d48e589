"""Helpers for testing fastff and code built on it: the tolerance table and pair-set comparison.

Every kernel is compared with the float64 torch reference; ``TOLERANCES`` is the one place where
the allowed differences live, each with the reason for its value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
    # A model served by fastff against the same model in another package (torch_geometric's
    # SchNet): float64 differs only by summation order (fused filters, row sums); float32 by
    # ~sqrt(K + F) * 6e-8 per GEMM through a few interactions, measured < 2e-6 relative.
    "interop": {torch.float64: (1e-10, 0.0), torch.float32: (1e-5, 0.0)},
    # Accelerated mace-torch models against the unmodified model (fastff.interop.mace): the
    # promised bars, relative to the largest entry. float64 reorders sums only (~1e-15); float32
    # sums ~50 neighbours and ~800 monomials per atom in another order: against float64 on 60
    # random 20-atom boxes (atoms >= 0.8 A apart) forces are within 2.6e-6 (mace-torch itself in
    # float32: 2.9e-6). Unphysical contacts (0.2 A, forces ~350 eV/A) amplify rounding: up to
    # 5e-5 there (mace-torch 1.3e-5; the kernels' long float32 sums), so float32 tests use
    # physical configurations.
    "mace": {torch.float64: (1e-10, 0.0), torch.float32: (1e-5, 0.0)},
    # The stress of those models in float32: a virial sum of r (x) f over pairs that cancels, so
    # max |stress| understates the terms. Against float64 on 60 random 20-atom boxes (atoms
    # >= 0.8 A apart), the unmodified mace-torch model in float32 reaches 7.1e-6, fastff 6.2e-6.
    "mace-stress": {torch.float64: (1e-10, 0.0), torch.float32: (3e-5, 0.0)},
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
    A thin wrapper of :meth:`fastff.NeighborList.from_edge_index` (which checks the pairs and
    sorts them by ``i``) for arrays in ASE's (i, j, S) layout.
    """
    from fastff.neighbors import NeighborList

    edge_index = torch.stack([torch.as_tensor(i).long(), torch.as_tensor(j).long()])
    s = torch.as_tensor(shifts).to(torch.int32).reshape(-1, 3)
    # zero shifts without a cell: every pair in the home cell
    given = None if cell is None and not bool(s.any()) else s
    return NeighborList.from_edge_index(edge_index, num_atoms, shifts=given, cell=cell, pbc=pbc,
                                        cutoff=cutoff, flow="target_to_source")

# ---------------------------------------------------------------------------------------------
# Host synchronisations


# Operators whose result the host must wait for on a GPU: scalar reads, comparisons that return
# a Python bool, and ops whose output size depends on the data (the size comes back to the host
# before the output can be allocated). Names are aten overload packets.
_READS = frozenset({"_local_scalar_dense", "item", "equal", "is_nonzero", "allclose",
                    "_linalg_check_errors", "nonzero", "nonzero_numpy", "argwhere",
                    "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                    "unique_dim_consecutive", "bincount"})


def _is_data_dependent(func, args, kwargs) -> str | None:
    """Why ``func(*args, **kwargs)`` makes the host wait for the device, or None."""
    name = func._overloadpacket.__name__
    if name in _READS:
        return name
    if name == "repeat_interleave" and kwargs.get("output_size") is None and (
            len(args) < 4 or args[3] is None):
        return "repeat_interleave without output_size"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
        if any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
               for t in args[1] if t is not None):
            return f"{name} with a boolean mask"
    if name in ("masked_fill", "masked_fill_") and len(args) > 2 and isinstance(args[2],
                                                                                torch.Tensor):
        return f"{name} with a tensor value"  # the value is read back (.item()) on CUDA
    if name in ("_to_copy", "copy_"):
        src = args[1] if name == "copy_" else args[0]
        dst_dev = args[0].device if name == "copy_" else kwargs.get("device")
        if (isinstance(src, torch.Tensor) and dst_dev is not None
                and torch.device(dst_dev).type != src.device.type and not _is_host(args[0])):
            return f"{name} from {src.device.type} to {torch.device(dst_dev).type}"
    return None


def mark_host_buffer(t: torch.Tensor) -> torch.Tensor:
    """Declare ``t`` host memory (a pinned buffer that the device copies into asynchronously):
    reading it is never a device synchronisation, and :func:`count_host_syncs` ignores it."""
    t._fastff_host_buffer = True  # type: ignore[attr-defined]
    return t


def _is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, "_fastff_host_buffer", False)


class HostSyncs:
    """What :func:`count_host_syncs` saw: ``int(syncs)`` is the number of device-to-host
    synchronisations (and host-to-device uploads); ``events`` lists (kind, where) for each."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def __int__(self) -> int:
        return len(self.events)

    def __index__(self) -> int:
        return len(self.events)

    def __repr__(self) -> str:
        return f"HostSyncs({len(self.events)}: {[kind for kind, _ in self.events]})"

    def report(self) -> str:
        """One line per event: its kind and the innermost fastff frame that caused it."""
        return "\n".join(f"{kind}  at {where}" for kind, where in self.events) or "no syncs"


class _Counter:
    """The state of one count_host_syncs block (a stack: blocks may nest)."""

    def __init__(self, syncs: HostSyncs):
        self.syncs = syncs
        self.suspended = 0

    def record(self, kind: str) -> None:
        if not self.suspended:
            self.syncs.events.append((kind, _caller()))


_ACTIVE: list[_Counter] = []


def _record(kind: str) -> None:
    for counter in _ACTIVE:
        counter.record(kind)


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module."""
    import traceback

    here = __file__
    for frame in reversed(traceback.extract_stack()[:-3]):
        f = frame.filename
        if f == here or "/torch/" in f or "/triton/" in f or f.startswith("<"):
            continue
        return f"{f}:{frame.lineno} ({frame.name})"
    return "?"


def _wrap_method(cls, name: str, kind: str, when=None):
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        if not _is_host(self) and (when is None or when(self, *args, **kwargs)):
            _record(kind)
            for counter in _ACTIVE:
                counter.suspended += 1  # what the read does inside is not counted again
            try:
                return original(self, *args, **kwargs)
            finally:
                for counter in _ACTIVE:
                    counter.suspended -= 1
        return original(self, *args, **kwargs)

    return original, wrapper


def _upload(data) -> bool:
    """torch.tensor / torch.as_tensor of host data (not a tensor already on a device)."""
    return not isinstance(data, torch.Tensor)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Count the device-to-host synchronisations made inside the block: ``int(syncs)`` after.

    Counted: scalar reads (``.item()``, ``int()``, ``float()``, ``bool()``, ``if t:``),
    ``.tolist()``, ``.numpy()`` (and ``np.asarray``), ``.cpu()``, printing a tensor,
    comparisons that return a bool (``torch.equal``, ``allclose``), ops whose output size depends
    on the data (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``,
    ``repeat_interleave`` without ``output_size``, ``bincount``), linalg error checks,
    ``masked_fill`` with a tensor value, ``torch.cuda.synchronize`` and event or stream
    synchronisation, cross-device copies (visible on a GPU), and uploads of host data with
    ``torch.tensor`` / ``torch.as_tensor`` (a pageable host-to-device copy waits for the
    stream, and none may run inside a CUDA graph capture).

    Aten operators are seen by a dispatch mode; reads that bypass the dispatcher on CPU tensors
    (``tolist``, ``numpy``, ``cpu``, printing, uploads) by wrapping those methods for the
    duration of the block. Every tensor is treated as a device tensor, so that steps run on CPU
    tensors with the Triton backend under ``TRITON_INTERPRET=1`` (the route CUDA takes) count
    what they would count on a GPU; the interpreter's own reads while it runs a kernel are
    not counted (a kernel launch is asynchronous on a GPU). Buffers declared with
    :func:`mark_host_buffer` are host memory and never counted.

    Not counted on CPU tensors: ``.to(device)`` between devices (all tensors share one device
    there; on a GPU the dispatch mode sees the copy).

    Yields:
        :class:`HostSyncs`; ``syncs.report()`` says where each one happened.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    syncs = HostSyncs()
    counter = _Counter(syncs)

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            why = _is_data_dependent(func, args, kwargs)
            if why is not None and not any(_is_host(a) for a in args):
                _record(why)
            return func(*args, **kwargs)

    patches = []

    def patch(owner, name, replacement):
        patches.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    for name in ("tolist", "numpy", "cpu", "__repr__"):
        _, wrapper = _wrap_method(torch.Tensor, name, name)
        patch(torch.Tensor, name, wrapper)
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)

        def creator(data, *args, _original=original, _name=name, **kwargs):
            if _upload(data):
                _record(f"torch.{_name} upload")
            return _original(data, *args, **kwargs)

        patch(torch, name, creator)
    for owner, name in ((torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"),
                        (torch.cuda.Stream, "synchronize")):
        original = getattr(owner, name)

        def waiting(*args, _original=original, _name=name, **kwargs):
            _record(f"cuda {_name}")
            return _original(*args, **kwargs)

        patch(owner, name, waiting)
    try:  # the interpreter reads every argument while it runs a kernel: not a sync
        from triton.runtime.interpreter import GridExecutor

        run = GridExecutor.__call__

        def interpreted(self, *args, **kwargs):
            for c in _ACTIVE:
                c.suspended += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                for c in _ACTIVE:
                    c.suspended -= 1

        patch(GridExecutor, "__call__", interpreted)
    except ImportError:
        pass
    _ACTIVE.append(counter)
    try:
        with _Mode():
            yield syncs
    finally:
        _ACTIVE.remove(counter)
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)
