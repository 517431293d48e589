"""Molecular-mechanics terms with gradients for positions, cell and every parameter.

Units default to OpenMM's: nm, kJ/mol, elementary charge; the Coulomb constant is an argument
(``coulomb_constant``), so Angstrom/eV users pass theirs (14.399645 eV A e^-2). Energies are
scalars, or [B] per system when a batch is given. Every function is deterministic on CPU, and
differentiable to any order (forces, virial, parameter gradients, force matching).

Nonbonded terms read a neighbor list from :func:`fastff.neighbor_list` or
:class:`fastff.VerletList`, full or half, built with a cutoff at least ``cutoff`` (pairs up to
``cutoff + skin`` may be present; the kernels apply ``cutoff`` themselves). Half lists do half
the pair work. Positions may be unwrapped: pair vectors are ``r_j - r_i + shifts @ cell``.

Every kernel is a ``torch.library`` custom op with a fake implementation (``opcheck`` passes,
including AOT dispatch), so the functions trace under ``make_fx`` / ``torch.compile``. Input
validation reads values (NaN scans, index ranges) unless ``fastff.no_checks()`` is active, and
the Triton nonbonded launcher reads the longest exclusion row on the host: neither is CUDA-graph
capturable as is. Checks of indices, parameters and cells run once per tensor state (object
and version counter), and what is derived from them (exclusion rows, cell inverses) is kept
per state too (:class:`fastff._checks.TensorCache`); :func:`forget` drops it after an edit of
``.data``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from fastff import _checks
from fastff.kernels._runtime import registry
from fastff.kernels.bonded import op as _bonded
from fastff.kernels.nonbonded import op as _nonbonded
from fastff.kernels.nonbonded import reference as _nbref
from fastff.mm._clusters import ClusterList, TileList
from fastff.neighbors import NeighborList

#: 1/(4 pi eps0) in kJ mol^-1 nm e^-2, the default ``coulomb_constant``.
COULOMB_CONSTANT = 138.935456

_METHODS = {"plain": _nbref.COULOMB_PLAIN, "reaction_field": _nbref.COULOMB_REACTION_FIELD,
            "ewald_real": _nbref.COULOMB_EWALD_REAL}


class Exceptions(NamedTuple):
    """OpenMM-style nonbonded exceptions: pairs whose interaction replaces the combined one.

    Attributes:
        pairs: int64 [X, 2], the two atoms of each exception (each unordered pair at most once).
        charge_prod: [X] product of charges (e^2); 0 with ``epsilon`` 0 is a pure exclusion.
        sigma: [X] (nm). epsilon: [X] (kJ/mol).
    """

    pairs: Tensor
    charge_prod: Tensor
    sigma: Tensor
    epsilon: Tensor


def _param(x, name: str, length: int, positions: Tensor, *, nonnegative: bool = False) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {list(x.shape)}")
    _checks.same_float_dtype(name, x, "positions", positions)
    _checks.same_device(name, x, "positions", positions)
    if x.numel():
        _checked_once(x, ("parameter values", name, nonnegative),
                      lambda: _param_values(x.detach(), name, nonnegative))
    return x


def _param_values(x: Tensor, name: str, nonnegative: bool) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    if nonnegative and bool((x < 0).any()):
        bad = int((x < 0).nonzero()[0, 0])
        raise ValueError(f"{name} must be >= 0, got {float(x[bad])} at index {bad}")


def _systems(positions: Tensor, batch: Tensor | None, nl: NeighborList | ClusterList | None):
    """(atom_system int64 [N], batched?)"""
    if batch is None and nl is not None and nl.batch is not None:
        batch = nl.batch
    if batch is None:
        return torch.zeros(positions.shape[0], dtype=torch.int64, device=positions.device), False
    _checks.index_tensor(batch, "batch", positions.shape[0])
    _checks.same_device("batch", batch, "positions", positions)
    if nl is not None and nl.batch is not None and nl.batch is not batch and not torch.equal(
            batch, nl.batch):
        raise ValueError("batch differs from the batch the neighbor list was built with")
    if batch.numel():
        _checked_once(batch, ("sorted batch",), lambda: _sorted_batch(batch))
    return batch.contiguous(), True


def _sorted_batch(batch: Tensor) -> None:
    if bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch must be sorted (atoms of one system contiguous)")


def _finish(energy: Tensor, batched: bool) -> Tensor:
    return energy if batched else energy.sum()


def _cell_heights(cells: Tensor) -> Tensor:
    c = cells.detach()
    volume = torch.linalg.det(c).abs()
    cross = torch.stack([torch.linalg.cross(c[:, (k + 1) % 3], c[:, (k + 2) % 3])
                         for k in range(3)], dim=1)
    return volume[:, None] / torch.linalg.vector_norm(cross, dim=2)


#: value checks of tensors, made once per tensor state (again after any in-place change)
_CHECKED = _checks.TensorCache()
#: values derived from tensors (exclusion rows, cell inverses, the exceptions that count)
_DERIVED = _checks.TensorCache()


def _checked_once(t: Tensor | tuple[Tensor, ...], what, check: Callable[[], None]) -> None:
    """Run the value check ``check()`` of ``t`` (a tensor or a tuple of tensors) once per state
    of ``t`` (and ``what``).

    Term indices, parameters and the box are the same tensors step after step: their value
    checks run once, and again after an in-place change (an optimizer step). Skipped while the
    value checks are off; not kept while tracing.
    """
    if _checks.checks_enabled():
        _CHECKED.get(what, t if isinstance(t, tuple) else (t,), lambda: _passed(check))


def _passed(check: Callable[[], None]) -> bool:
    check()  # raises on bad values
    return True


def _derived(tensors: tuple[Tensor, ...], what, compute: Callable, *, values: bool = False):
    """``compute()``, a value derived from ``tensors``, kept per tensor state. ``values=True``
    (what parameters decide): kept while they hold the same values, so that ``.data`` edits and
    fused optimizer steps are seen; on CPU only, recomputed on other devices (comparing values
    there would be a host sync)."""
    return _DERIVED.get(what, tensors, compute, values=values)


def forget(*tensors: Tensor) -> None:
    """Drop what is kept for ``tensors`` (after an edit of their ``.data``, which their version
    counter does not see)."""
    _CHECKED.forget(tensors)
    _DERIVED.forget(tensors)


def exclusion_rows(pairs: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The exclusion CSR of exception pairs (kept per tensor version)."""
    return _derived((pairs,), ("exclusion rows", n), lambda: _exclusion_rows(pairs, n))


def _exclusion_rows(index: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """CSR of excluded partners per atom (both directions), sorted by atom then partner."""
    dev = index.device
    if index.numel() == 0:
        return torch.zeros(n + 1, dtype=torch.int64, device=dev), index.new_zeros(0)
    rows = torch.cat([index[:, 0], index[:, 1]])
    cols = torch.cat([index[:, 1], index[:, 0]])
    order = torch.argsort(rows * n + cols)
    # index_add, not bincount: its output size does not depend on the data (torch.compile)
    counts = torch.zeros(n, dtype=torch.int64, device=dev).index_add_(0, rows,
                                                                      torch.ones_like(rows))
    ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return ptr, cols[order].contiguous()


def _term_index(index, name: str, width: int, n: int, positions: Tensor) -> Tensor:
    if not isinstance(index, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {index.dtype}")
    if index.dim() != 2 or index.shape[1] != width:
        raise ValueError(f"{name} must have shape [T, {width}], got {list(index.shape)}")
    _checks.same_device(name, index, "positions", positions)
    _checked_once(index, (name, n), lambda: _term_values(index, name, width, n))
    return index.contiguous()


def _term_values(index: Tensor, name: str, width: int, n: int) -> None:
    _checks.index_range(index, name, n, "atom indices")
    if _checks.checks_enabled() and index.shape[0]:
        dup = torch.zeros(index.shape[0], dtype=torch.bool, device=index.device)
        for a in range(width):  # width <= 4: a few column comparisons beat a row sort
            for b in range(a + 1, width):
                dup |= index[:, a] == index[:, b]
        if bool(dup.any()):
            t = int(dup.nonzero()[0, 0])
            raise ValueError(f"{name}[{t}] = {index[t].tolist()} names one atom twice")


def _check_exceptions(exceptions, n: int, positions: Tensor) -> Exceptions:
    if isinstance(exceptions, Exceptions):
        ex = exceptions
    else:
        try:
            ex = Exceptions(*exceptions)
        except TypeError:
            raise TypeError("exceptions must be (pairs [X,2], charge_prod [X], sigma [X], "
                            f"epsilon [X]), got {type(exceptions).__name__}") from None
    index = _term_index(ex.pairs, "exceptions.pairs", 2, n, positions)
    x = index.shape[0]
    _checked_once(index, ("unique pairs", n), lambda: _unique_pairs(index, n))
    return Exceptions(index, _param(ex.charge_prod, "exceptions.charge_prod", x, positions),
                      _param(ex.sigma, "exceptions.sigma", x, positions, nonnegative=True),
                      _param(ex.epsilon, "exceptions.epsilon", x, positions, nonnegative=True))


def _active_exceptions(ex: Exceptions) -> Exceptions:
    """Without parameter gradients, pure exclusions (charge product 0 and epsilon 0) add
    exactly nothing: drop them (water's every exception is one). On CPU only, and not while
    tracing: which rows stay depends on the parameters' values (kept while they hold the same
    values, see ``_derived``), and reading them on another device would be a host sync."""
    if ex.charge_prod.device.type != "cpu" or not _checks.cacheable(ex.charge_prod):
        return ex

    def active() -> Tensor | None:
        keep = (ex.charge_prod != 0) | (ex.epsilon != 0)
        return None if bool(keep.all()) else keep.nonzero().flatten()

    keep = _derived((ex.charge_prod, ex.epsilon), ("active exceptions",), active, values=True)
    if keep is None:
        return ex
    return Exceptions(ex.pairs[keep], ex.charge_prod[keep], ex.sigma[keep], ex.epsilon[keep])


def _unique_pairs(index: Tensor, n: int) -> None:
    if _checks.checks_enabled() and index.shape[0]:
        key = index.min(dim=1).values * n + index.max(dim=1).values
        uniq, counts = torch.unique(key, return_counts=True)
        if bool((counts > 1).any()):
            k = int(uniq[counts > 1][0])
            raise ValueError(f"exceptions name the pair ({k // n}, {k % n}) more than once")


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def _pair_terms(positions: Tensor, nl: NeighborList, charges, sigma, epsilon, **settings):
    _checks.positions(positions)
    return _pair_energy(positions, nl, charges, sigma, epsilon, **settings)


def _pair_energy(positions: Tensor, nl: NeighborList | ClusterList, charges, sigma, epsilon, *,
                 cutoff, cell, batch, switch_distance, method, dielectric, ewald_alpha,
                 coulomb_constant, exceptions, exceptions_use_pbc, backend):
    """:func:`nonbonded` after the positions check (which a :class:`ForceField` makes once for
    all its terms); the other checks are structural or kept per tensor state."""
    if not isinstance(nl, (NeighborList, ClusterList)):
        raise TypeError(f"nl must be a fastff.NeighborList, got {type(nl).__name__}")
    n = positions.shape[0]
    rc = math.inf if cutoff is None else _checks.cutoff(cutoff)
    if rc > nl.cutoff * (1 + 1e-12):
        raise ValueError(f"cutoff={rc} exceeds the neighbor list's cutoff {nl.cutoff}: pairs "
                         "would be missing")
    cells = nl._cell_for(positions, cell)
    atom_system, batched = _systems(positions, batch, nl)
    coul = _nbref.COULOMB_NONE
    k_rf = c_rf = alpha = 0.0
    dummy = positions.new_zeros(n)
    if charges is not None:
        charges = _param(charges, "charges", n, positions)
        if method not in _METHODS:
            raise ValueError(f"method must be one of {', '.join(_METHODS)}, got {method!r}")
        coul = _METHODS[method]
        if coul == _nbref.COULOMB_REACTION_FIELD:
            if not math.isfinite(rc):
                raise ValueError("method='reaction_field' needs a finite cutoff")
            d = float(dielectric)
            if not d >= 1.0:
                raise ValueError(f"dielectric must be >= 1, got {dielectric}")
            k_rf = (d - 1.0) / ((2.0 * d + 1.0) * rc ** 3) if math.isfinite(d) else 0.5 / rc ** 3
            c_rf = 1.0 / rc + k_rf * rc * rc
            key = cell if isinstance(cell, Tensor) else cells
            _checked_once((key, nl.pbc), ("half height", rc),
                          lambda: _reaction_field_reach(rc, cells, nl.pbc))
        elif coul == _nbref.COULOMB_EWALD_REAL:
            if ewald_alpha is None:
                raise ValueError("method='ewald_real' needs ewald_alpha (1/nm)")
            alpha = float(ewald_alpha)
            if not (math.isfinite(alpha) and alpha > 0):
                raise ValueError(f"ewald_alpha must be finite and positive, got {ewald_alpha}")
    lj = sigma is not None
    if lj:
        sigma = _param(sigma, "sigma", n, positions, nonnegative=True)
        epsilon = _param(epsilon, "epsilon", n, positions, nonnegative=True)
    sw = -1.0
    if switch_distance is not None:
        sw = float(switch_distance)
        if not (0.0 <= sw < rc) or not math.isfinite(rc):
            raise ValueError(f"switch_distance must satisfy 0 <= switch_distance < cutoff "
                             f"({rc}), got {switch_distance}")
    if exceptions is not None:
        ex = _check_exceptions(exceptions, n, positions)
        excl_ptr, excl_j = exclusion_rows(ex.pairs, n)
    else:
        ex = None
        excl_ptr = torch.zeros(n + 1, dtype=torch.int64, device=positions.device)
        excl_j = excl_ptr[:0]
    name, _ = registry.resolve("nonbonded", positions.device, backend)
    q = charges if charges is not None else dummy
    s = sigma if lj else dummy
    e = epsilon if lj else dummy
    param_grads = _needs_grad(charges, sigma, epsilon)
    if isinstance(nl, ClusterList):  # exclusions are in the clusters' lane masks
        if param_grads:
            raise ValueError("a ClusterList computes no parameter gradients: use a "
                             "NeighborList when charges, sigma or epsilon need gradients")
        if isinstance(nl, TileList):  # the GPU's 32-atom tiles
            name, _ = registry.resolve("nonbonded_tiles", positions.device, backend)
            energy = _nonbonded.nonbonded_tiles(
                positions, cells, nl.order, nl.tile_ptr, nl.tile_j, nl.tile_x, nl.masks,
                q.detach(), s.detach(), e.detach(), rc, sw, coul, lj, k_rf, c_rf, alpha,
                float(coulomb_constant), nl.periodic, name)[0]
        else:
            name, _ = registry.resolve("nonbonded_clusters", positions.device, backend)
            energy = _nonbonded.nonbonded_clusters(
                positions, cells, nl.slot_atom, nl.slot_wrap, nl.cluster_ptr, nl.entry_j,
                nl.entry_shift, nl.entry_mask, q.detach(), s.detach(), e.detach(), rc, sw,
                coul, lj, k_rf, c_rf, alpha, float(coulomb_constant), name)[0]
    else:
        energy = _nonbonded.nonbonded(
            positions, cells, atom_system, nl.i, nl.j, nl.shifts, nl.ptr, excl_ptr, excl_j, q,
            s, e, rc, sw, coul, lj, k_rf, c_rf, alpha, float(coulomb_constant), param_grads,
            bool(nl.half), name)[0]
    if ex is not None and not _needs_grad(ex.charge_prod, ex.sigma, ex.epsilon):
        ex = _active_exceptions(ex)
    if ex is not None and ex.pairs.shape[0]:
        inv = cells.detach()
        if exceptions_use_pbc:
            inv = _inverse(cell if isinstance(cell, Tensor) else cells, cells)
        name, _ = registry.resolve("lj_coulomb_pairs", positions.device, backend)
        energy = energy + _bonded.lj_coulomb_pairs(
            positions, cells, inv, atom_system, bool(exceptions_use_pbc), ex.pairs,
            ex.charge_prod, ex.sigma, ex.epsilon, float(coulomb_constant),
            _needs_grad(ex.charge_prod, ex.sigma, ex.epsilon), name)[0]
    return _finish(energy, batched)


def _reaction_field_reach(rc: float, cells: Tensor, pbc: Tensor) -> None:
    """Periodic reaction field takes the minimum image: the cutoff must not pass half the
    shortest height of the periodic cell."""
    if not bool(pbc.any()):
        return
    limit = 0.5 * float(_cell_heights(cells).masked_fill(~pbc, math.inf).min())
    if rc > limit:
        raise ValueError(f"cutoff={rc} is larger than half the shortest cell height "
                         f"({limit:.6g}): periodic reaction field needs cutoff <= half the "
                         "shortest cell height (minimum image)")


def _inverse(cell: Tensor, cells: Tensor) -> Tensor:
    """The inverse of ``cells`` [B, 3, 3] (from ``cell``, as given), kept per state of ``cell``.
    ``inv_ex``: no host sync; singular cells are refused by the cell checks."""
    return _derived((cell,), ("inverse", cells.shape[0]),
                    lambda: torch.linalg.inv_ex(cells.detach())[0])


def lennard_jones(positions: Tensor, nl: NeighborList, sigma: Tensor, epsilon: Tensor, *,
                  cutoff: float | None, cell: Tensor | None = None, batch: Tensor | None = None,
                  switch_distance: float | None = None, backend: str | None = None) -> Tensor:
    """Lennard-Jones energy, 1/2 sum over the list of 4 eps_ij ((s_ij/r)^12 - (s_ij/r)^6) S(r).

    Args:
        positions: [N, 3] float32/float64 (nm).
        nl: full or half neighbor list with cutoff >= ``cutoff``.
        sigma: [N] per atom (nm, kJ/mol), >= 0, combined by Lorentz-Berthelot
            (s_ij = (s_i + s_j)/2, eps_ij = sqrt(eps_i eps_j)). The gradient with respect to an
            epsilon that is exactly 0 is undefined (square root).
        epsilon: as ``sigma``.
        cutoff: pairs at r >= cutoff contribute 0 (None: no cutoff).
        cell: [3, 3] or [B, 3, 3]; None uses the list's cell (detached, no virial).
        batch: int64 [N] system per atom; returns [B] energies.
        switch_distance: OpenMM's switching function from here to the cutoff.
        backend: "numba", "triton", "reference" or None.

    Returns:
        Energy (kJ/mol): scalar, or [B] with batch. Deterministic on CPU.
    """
    return _pair_terms(positions, nl, None, sigma, epsilon, cutoff=cutoff, cell=cell,
                       batch=batch, switch_distance=switch_distance, method="plain",
                       dielectric=1.0, ewald_alpha=None, coulomb_constant=COULOMB_CONSTANT,
                       exceptions=None, exceptions_use_pbc=False, backend=backend)


def coulomb(positions: Tensor, nl: NeighborList, charges: Tensor, *, cutoff: float | None,
            cell: Tensor | None = None, batch: Tensor | None = None,
            method: str = "reaction_field", dielectric: float = 78.3,
            ewald_alpha: float | None = None, coulomb_constant: float = COULOMB_CONSTANT,
            backend: str | None = None) -> Tensor:
    """Coulomb energy, 1/2 sum over the list of kc q_i q_j f(r) for r < cutoff.

    ``method``: "plain" f = 1/r; "reaction_field" (OpenMM) f = 1/r + k_rf r^2 - c_rf with
    k_rf = (eps - 1)/((2 eps + 1) rc^3), c_rf = 1/rc + k_rf rc^2 (eps = ``dielectric``);
    "ewald_real" f = erfc(alpha r)/r (the direct-space part of Ewald/PME; ``ewald_alpha`` in
    1/length). Periodic reaction field needs cutoff <= half the shortest cell height.

    Args and returns as :func:`lennard_jones`, with ``charges`` [N] (e).
    """
    return _pair_terms(positions, nl, charges, None, None, cutoff=cutoff, cell=cell,
                       batch=batch, switch_distance=None, method=method, dielectric=dielectric,
                       ewald_alpha=ewald_alpha, coulomb_constant=coulomb_constant,
                       exceptions=None, exceptions_use_pbc=False, backend=backend)


def nonbonded(positions: Tensor, nl: NeighborList, charges: Tensor, sigma: Tensor,
              epsilon: Tensor, *, cutoff: float | None, cell: Tensor | None = None,
              batch: Tensor | None = None, switch_distance: float | None = None,
              method: str = "reaction_field", dielectric: float = 78.3,
              ewald_alpha: float | None = None, coulomb_constant: float = COULOMB_CONSTANT,
              exceptions=None, exceptions_use_pbc: bool = False,
              backend: str | None = None) -> Tensor:
    """Lennard-Jones + Coulomb in one pass over the pairs, with OpenMM-style exceptions.

    As OpenMM's NonbondedForce: a pair named in ``exceptions`` (:class:`Exceptions` or a tuple
    (pairs [X,2], charge_prod [X], sigma [X], epsilon [X])) is removed from the cutoff
    interaction (every periodic image of it), and instead, when charge_prod or epsilon is
    nonzero, interacts by plain Coulomb + plain Lennard-Jones with the exception's parameters,
    with no cutoff, no switching and no reaction-field terms (exclusions contribute nothing).
    Exception vectors use the minimum image only when ``exceptions_use_pbc``.

    Args and returns as :func:`lennard_jones` and :func:`coulomb`.
    """
    return _pair_terms(positions, nl, charges, sigma, epsilon, cutoff=cutoff, cell=cell,
                       batch=batch, switch_distance=switch_distance, method=method,
                       dielectric=dielectric, ewald_alpha=ewald_alpha,
                       coulomb_constant=coulomb_constant, exceptions=exceptions,
                       exceptions_use_pbc=exceptions_use_pbc, backend=backend)


def _term_setup(positions, cell, batch):
    """(cells [B, 3, 3], their inverse, atom_system, batched, has_cell) of a bonded term; the
    caller checks positions."""
    atom_system, batched = _systems(positions, batch, None)
    nsys = int(atom_system[-1]) + 1 if batched and atom_system.numel() else 1
    if cell is None:
        cells = positions.new_zeros(nsys, 3, 3)
        return cells, cells, atom_system, batched, False
    if not isinstance(cell, Tensor):
        raise TypeError(f"cell must be a torch.Tensor, got {type(cell).__name__}")
    _checks.same_float_dtype("cell", cell, "positions", positions)
    _checks.same_device("cell", cell, "positions", positions)
    if cell.shape == (3, 3):
        cells = cell.unsqueeze(0).expand(nsys, 3, 3)
    elif cell.dim() == 3 and cell.shape[1:] == (3, 3) and cell.shape[0] == nsys:
        cells = cell
    else:
        raise ValueError(f"cell must have shape [3, 3] or [{nsys}, 3, 3], got {list(cell.shape)}")
    _checked_once(cell, ("cell values", nsys), lambda: _invertible(cells.detach()))
    return cells, _inverse(cell, cells), atom_system, batched, True


def _invertible(cells: Tensor) -> None:
    det = torch.linalg.det(cells)
    if not bool(torch.isfinite(cells).all()) or bool((det.abs() < 1e-12).any()):
        raise ValueError("cell must be finite and non-singular (minimum image needs its "
                         "inverse)")


def harmonic_bonds(positions: Tensor, bonds: Tensor, k: Tensor, r0: Tensor, *,
                   cell: Tensor | None = None, batch: Tensor | None = None,
                   backend: str | None = None) -> Tensor:
    """Harmonic bond energy, sum 1/2 k (|r_ij| - r0)^2 (OpenMM's HarmonicBondForce).

    Args:
        positions: [N, 3] (nm). bonds: int64 [T, 2]. k: [T] (kJ/mol/nm^2). r0: [T] (nm).
        cell: [3, 3] or [B, 3, 3]: bond vectors take the minimum image (rounded fractional
            coordinates, exact for bonds shorter than half the shortest cell height).
        batch: int64 [N]; a term belongs to the system of its first atom.

    Returns:
        Energy (kJ/mol), scalar or [B]. Deterministic on CPU.
    """
    _checks.positions(positions)
    cells, inv, atom_system, batched, periodic = _term_setup(positions, cell, batch)
    index = _term_index(bonds, "bonds", 2, positions.shape[0], positions)
    t = index.shape[0]
    k = _param(k, "k", t, positions)
    r0 = _param(r0, "r0", t, positions)
    name, _ = registry.resolve("harmonic_bonds", positions.device, backend)
    e = _bonded.harmonic_bonds(positions, cells, inv, atom_system, periodic, index, k, r0,
                               _needs_grad(k, r0), name)[0]
    return _finish(e, batched)


def harmonic_angles(positions: Tensor, angles: Tensor, k: Tensor, theta0: Tensor, *,
                    cell: Tensor | None = None, batch: Tensor | None = None,
                    backend: str | None = None) -> Tensor:
    """Harmonic angle energy, sum 1/2 k (theta_ijk - theta0)^2, vertex j (HarmonicAngleForce).

    Args: as :func:`harmonic_bonds`, with angles int64 [T, 3], k [T] (kJ/mol/rad^2),
    theta0 [T] (rad).
    """
    _checks.positions(positions)
    cells, inv, atom_system, batched, periodic = _term_setup(positions, cell, batch)
    index = _term_index(angles, "angles", 3, positions.shape[0], positions)
    t = index.shape[0]
    k = _param(k, "k", t, positions)
    theta0 = _param(theta0, "theta0", t, positions)
    name, _ = registry.resolve("harmonic_angles", positions.device, backend)
    e = _bonded.harmonic_angles(positions, cells, inv, atom_system, periodic, index, k, theta0,
                                _needs_grad(k, theta0), name)[0]
    return _finish(e, batched)


def periodic_torsions(positions: Tensor, torsions: Tensor, k: Tensor, periodicity: Tensor,
                      phase: Tensor, *, cell: Tensor | None = None, batch: Tensor | None = None,
                      backend: str | None = None) -> Tensor:
    """Periodic torsion energy, sum k (1 + cos(n phi - phase)) (PeriodicTorsionForce).

    Proper and improper torsions alike: phi is the IUPAC dihedral of atoms (i, j, k, l).

    Args: as :func:`harmonic_bonds`, with torsions int64 [T, 4], k [T] (kJ/mol),
    periodicity int64 [T] (n >= 0, not differentiable), phase [T] (rad).
    """
    _checks.positions(positions)
    cells, inv, atom_system, batched, periodic = _term_setup(positions, cell, batch)
    index = _term_index(torsions, "torsions", 4, positions.shape[0], positions)
    t = index.shape[0]
    k = _param(k, "k", t, positions)
    phase = _param(phase, "phase", t, positions)
    periodicity = _periodicity(periodicity, t)
    name, _ = registry.resolve("periodic_torsions", positions.device, backend)
    e = _bonded.periodic_torsions(positions, cells, inv, atom_system, periodic, index, k,
                                  periodicity, phase, _needs_grad(k, phase), name)[0]
    return _finish(e, batched)


def _periodicity(periodicity, t: int) -> Tensor:
    if not isinstance(periodicity, Tensor) or periodicity.dtype != torch.int64:
        raise TypeError("periodicity must be an int64 tensor")
    if periodicity.shape != (t,):
        raise ValueError(f"periodicity must have shape [{t}], got {list(periodicity.shape)}")
    if t:
        _checked_once(periodicity, ("periodicity values",),
                      lambda: _nonnegative_periodicity(periodicity))
    return periodicity.contiguous()


def _nonnegative_periodicity(periodicity: Tensor) -> None:
    if bool((periodicity < 0).any()):
        raise ValueError("periodicity must be >= 0")


def bonded(positions: Tensor, *, bonds=None, angles=None, torsions=None,
           cell: Tensor | None = None, batch: Tensor | None = None,
           periodic: tuple[bool, bool, bool] | None = None,
           backend: str | None = None) -> Tensor:
    """Harmonic bonds, harmonic angles and periodic torsions in one fused op.

    The same energy as :func:`harmonic_bonds` + :func:`harmonic_angles` +
    :func:`periodic_torsions`, with one launch, one pass of input checks and one autograd node
    for all three (what :class:`ForceField` runs: on CPU the three separate calls cost 1.5-1.7x
    as much at 35,000-106,000 atoms, mostly in per-call overhead).

    Args:
        positions: [N, 3] (nm).
        bonds: (index int64 [T, 2], k [T], r0 [T]) or None.
        angles: (index int64 [T, 3], k [T], theta0 [T]) or None.
        torsions: (index int64 [T, 4], k [T], periodicity int64 [T], phase [T]) or None.
        cell: as :func:`harmonic_bonds`.
        batch: as :func:`harmonic_bonds`.
        periodic: (bonds, angles, torsions): which kinds take the minimum image in ``cell``
            (OpenMM sets this per force); default: all of them when a cell is given.

    Returns:
        Energy (kJ/mol), scalar or [B]. Deterministic on CPU; differentiable to any order in
        positions, cell and every parameter.
    """
    _checks.positions(positions)
    return _bonded_energy(positions, bonds=bonds, angles=angles, torsions=torsions, cell=cell,
                          batch=batch, periodic=periodic, backend=backend)


def _bonded_energy(positions: Tensor, *, bonds, angles, torsions, cell, batch, periodic,
                   backend) -> Tensor:
    """:func:`bonded` after the positions check (which a :class:`ForceField` makes once)."""
    cells, inv, atom_system, batched, has_cell = _term_setup(positions, cell, batch)
    if periodic is None:
        periodic = (has_cell,) * 3
    periodic = tuple(bool(p) for p in periodic)
    if len(periodic) != 3:
        raise ValueError(f"periodic must be 3 bools (bonds, angles, torsions), got {periodic}")
    if any(periodic) and not has_cell:
        raise ValueError("periodic terms need a cell")
    n = positions.shape[0]
    b_index, b_k, b_r0 = _kind(bonds, "bonds", ("index", "k", "r0"), 2, n, positions)
    a_index, a_k, a_t0 = _kind(angles, "angles", ("index", "k", "theta0"), 3, n, positions)
    t_index, t_k, t_n, t_phase = _kind(torsions, "torsions", ("index", "k", "periodicity",
                                                              "phase"), 4, n, positions)
    name, _ = registry.resolve("bonded_terms", positions.device, backend)
    e = _bonded.bonded_terms(positions, cells, inv, atom_system, b_index, b_k, b_r0, periodic[0],
                             a_index, a_k, a_t0, periodic[1], t_index, t_k, t_n, t_phase,
                             periodic[2], _needs_grad(b_k, b_r0, a_k, a_t0, t_k, t_phase), name)[0]
    return _finish(e, batched)


def _kind(spec, name: str, fields: tuple[str, ...], width: int, n: int,
          positions: Tensor) -> tuple[Tensor, ...]:
    """One term kind of :func:`bonded`, checked: (index, parameters...); empty when None."""
    if spec is None:
        empty = positions.new_zeros(0)
        integer = torch.zeros(0, dtype=torch.int64, device=positions.device)
        return (integer.view(0, width),) + tuple(
            integer if f == "periodicity" else empty for f in fields[1:])
    spec = tuple(spec)
    if len(spec) != len(fields):
        raise ValueError(f"{name} must be ({', '.join(fields)}), got {len(spec)} items")
    index = _term_index(spec[0], f"{name}.index", width, n, positions)
    t = index.shape[0]
    out = [index]
    for field, x in zip(fields[1:], spec[1:], strict=True):
        if field == "periodicity":
            out.append(_periodicity(x, t))
        else:
            out.append(_param(x, f"{name}.{field}", t, positions))
    return tuple(out)
