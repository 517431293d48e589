"""Drop-in message-passing modules: ``RadialFilter``, ``CFConv`` (SchNet) and ``PaiNNMessage``.

Every module works on a FULL neighbor list (``fastff.neighbor_list(..., half=False)``), sorted by
receiver; gradients flow to positions (forces), the cell (stress), features and parameters, to
any order (force-matching training needs the second).

``KEEP_BUDGET`` is the default number of bytes one :class:`CFConv` call may keep from its
forward for its backward (kernels/message/README.md, "Kept filters").
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from fastff import _checks
from fastff.kernels._runtime import registry
from fastff.kernels._runtime.autograd import track
from fastff.kernels.message import dense
from fastff.kernels.message import op as _mop
from fastff.kernels.message import reference as _mref
from fastff.kernels.radial import op as _rop
from fastff.kernels.radial import reference as _rref
from fastff.mp import check_basis_args
from fastff.neighbors import NeighborList

__all__ = ["KEEP_BUDGET", "CFConv", "PaiNNMessage", "RadialFilter", "TabulatedFilter"]

#: Bytes one :class:`CFConv` call may keep between passes, unless its ``keep_budget`` says
#: otherwise: the pair filters W of its forward (read by the backward's x-gradient instead of an
#: F x F GEMM per pair) and, when the backward is itself differentiated (force training), its
#: products t = u w2. A pass whose [pairs, F] tensor exceeds it keeps nothing and recomputes:
#: large systems keep constant memory. 256 MiB holds SchNet's F = 64 for ~1M pairs (about
#: 35,000 atoms at 60 neighbours); 0 turns keeping off.
KEEP_BUDGET = 256 * 2**20


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _graph(module: nn.Module, positions: Tensor, nl, cutoff: float,
           features: dict[str, tuple[Tensor, tuple]]) -> None:
    """Shared input checks of the modules: shapes, dtypes, devices and the neighbor list."""
    _checks.positions(positions)
    if not isinstance(nl, NeighborList):
        raise TypeError(f"nl must be a fastff.NeighborList, got {type(nl).__name__}")
    if nl.half:
        raise ValueError("nl must be a full neighbor list (half=False): message passing sums over "
                         "both directions of every pair")
    if nl.num_atoms != positions.shape[0]:
        raise ValueError(f"nl was built for {nl.num_atoms} atoms but positions has "
                         f"{positions.shape[0]}; rebuild the neighbor list for these positions")
    if cutoff > nl.cutoff:
        raise ValueError(f"the module's cutoff {cutoff} is larger than the neighbor list's cutoff "
                         f"{nl.cutoff}: pairs in between would be missing")
    if nl.i.device != positions.device:
        raise ValueError(f"nl is on {nl.i.device} but positions is on {positions.device}")
    for name, (x, shape) in features.items():
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        want = (positions.shape[0], *shape)
        if tuple(x.shape) != want:
            raise ValueError(f"{name} must have shape {list(want)} (atoms first, as positions), "
                             f"got {list(x.shape)}")
        _checks.same_device(name, x, "positions", positions)
        _checks.same_float_dtype(name, x, "positions", positions)
    for pname, p in module.named_parameters():
        if p.dtype != positions.dtype:
            raise TypeError(f"{type(module).__name__} parameter {pname} is {p.dtype} but positions "
                            f"is {positions.dtype}; convert the module (.to(dtype))")
        if p.device != positions.device:
            raise ValueError(f"{type(module).__name__} parameter {pname} is on {p.device} but "
                             f"positions is on {positions.device}")
    if _checks.checks_enabled() and len(nl) and not nl.symmetric and bool((nl.reverse < 0).any()):
        raise ValueError("nl has pairs without a mirror pair; build it with fastff.neighbor_list")


class _Backend:
    """The ``backend`` of a module: None or "auto" (``FASTFF_BACKEND``, then by device) or one
    of ``registry.BACKENDS``, and what it resolves to for each op the module calls (``_OPS``).

    Resolution (``registry.resolve``: reads ``FASTFF_BACKEND``, imports the kernels) happens
    when ``backend`` is set (at build too) and when the module moves (``_apply``: ``.to()``,
    ``.cuda()``), for the device of the module's parameters: a call only looks its backend up,
    and a compiled forward sees a constant. Resolving for the parameters' device rather than
    lazily at the first call keeps that lookup free of side effects inside torch.compile (a
    first call that filled the table would change what the compiled code guarded on and
    recompile). A call on another device (a ``functional_call`` with moved weights) resolves
    there on first use. A backend that cannot run on the parameters' device (Triton for a model
    still on the CPU, to be moved) is not an error until the module is called there.
    """

    _OPS: tuple[str, ...]  # the registry ops the module calls
    _backend: str | None
    _resolved: dict

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        if value is not None and value != "auto" and value not in registry.BACKENDS:
            raise ValueError(f"backend must be one of {registry.BACKENDS}, 'auto' or None, got "
                             f"{value!r}")
        self._backend = value
        self._resolve()

    def _resolve(self) -> None:
        """Resolve every op of the module for its parameters' device, from scratch."""
        self._resolved = {}
        device = next((p.device for p in self.parameters()), None)  # type: ignore[attr-defined]
        if device is None:
            return
        for op in self._OPS:
            try:
                self._backend_for(op, device)
            except ValueError:  # not runnable on this device: raised if called here
                pass

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)  # type: ignore[misc]
        self._resolve()  # the parameters may be on another device now
        return module

    def _backend_for(self, op: str, device: torch.device) -> str:
        """The resolved backend of ``op`` on ``device``."""
        key = (op, device)
        name = self._resolved.get(key)
        if name is None:
            name, _ = registry.resolve(op, device, self._backend)
            self._resolved[key] = name
        return name


class RadialFilter(_Backend, nn.Module):
    """SchNet's filter network: ``W(r) = u(r) * Dense2(act(Dense1(basis(r))))``.

    Args:
        num_basis: K radial basis functions (> 0).
        num_features: F outputs (> 0).
        cutoff: where the envelope u reaches zero (length unit of the distances).
        kind: "gaussian" or "bessel" (see :func:`fastff.mp.radial_basis`).
        envelope: "cosine", "polynomial" or None.
        activation: "shifted_softplus" (SchNet) or "silu".

    Calling it on distances [E] returns W [E, F] (materialised: the reference semantics that
    :class:`CFConv` computes in fused blocks). ``backend``: of its radial basis, as for
    :class:`CFConv`.
    """

    _OPS = ("radial_basis",)

    def __init__(self, num_basis: int, num_features: int, cutoff: float, *,
                 kind: str = "gaussian", envelope: str | None = "cosine",
                 activation: str = "shifted_softplus", backend: str | None = None):
        super().__init__()
        _positive_int(num_features, "num_features")
        self.num_basis, self.cutoff, self.kind, self.envelope = check_basis_args(
            num_basis, cutoff, kind, envelope)
        if activation not in dense.ACTIVATIONS:
            raise ValueError(f"activation must be one of {dense.ACTIVATIONS}, got {activation!r}")
        self.num_features, self.activation = num_features, activation
        self.dense1 = nn.Linear(num_basis, num_features)
        self.dense2 = nn.Linear(num_features, num_features)
        self.backend = backend

    @property
    def settings(self) -> dense.FilterSettings:
        """(cutoff, kind, envelope, activation): what defines the filter besides its weights."""
        return dense.FilterSettings(self.cutoff, self.kind, self.envelope, self.activation)

    def weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(w1 [F, K], b1 [F], w2 [F, F], b2 [F]): the parameters themselves."""
        return (self.dense1.weight, self.dense1.bias, self.dense2.weight, self.dense2.bias)

    def params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(w1, b1, w2, b2) as the fused ops take them (``track``ed: see
        fastff.kernels._runtime.autograd)."""
        w1, b1, w2, b2 = self.weights()
        return track(w1), track(b1), track(w2), track(b2)

    def forward(self, distances: Tensor, *, backend: str | None = None) -> Tensor:
        """W(r) [E, F] for distances [E]; differentiable to any order. ``backend`` overrides
        the module's for this call."""
        _checks.distances(distances)
        name = (self._backend_for("radial_basis", distances.device) if backend is None
                else registry.resolve("radial_basis", distances.device, backend)[0])
        basis = _rop.radial_basis(distances.contiguous(), self.num_basis, self.cutoff, self.kind,
                                  "none", 0, name)
        (env,) = dense.envelope(distances, self.cutoff, self.envelope, 0)
        return dense.filter_values(basis, env, *self.params(), self.activation)

    @torch.no_grad()
    def tabulate(self, num_points: int = 1000) -> TabulatedFilter:
        """A cubic (Hermite) table of W over [0, cutoff] with ``num_points`` knots.

        Values and exact slopes at the knots come from the MLP in float64; the table's maximum
        error relative to max|W| over 3 points per interval is stored in ``max_rel_error``.
        """
        p = [t.detach().double() for t in self.params()]
        return hermite_table(lambda r: self._values_and_slopes(r, p), self.cutoff, num_points,
                             p[0].device)

    def _values_and_slopes(self, r: Tensor, p) -> tuple[Tensor, Tensor]:
        w1, b1, w2, b2 = p
        basis = _rref.radial_basis(r, self.num_basis, self.cutoff, self.kind, "none", 0)
        slope = _rref.radial_basis(r, self.num_basis, self.cutoff, self.kind, "none", 1)
        env, env_slope = dense.envelope(r, self.cutoff, self.envelope, 1)
        h = basis @ w1.t() + b1
        y = dense.activation(h, self.activation) @ w2.t() + b2
        dy = (dense.activation_slope(h, self.activation) * (slope @ w1.t())) @ w2.t()
        return env[:, None] * y, env_slope[:, None] * y + env[:, None] * dy


def hermite_table(values_and_slopes, cutoff: float, num_points: int,
                  device: torch.device) -> TabulatedFilter:
    """A cubic Hermite table over [0, cutoff] of a function r -> [F] given in float64 by
    ``values_and_slopes(r [M]) -> (W [M, F], dW/dr [M, F])``, with its measured error."""
    _positive_int(num_points, "num_points")
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    knots = torch.linspace(0.0, cutoff, num_points, dtype=torch.float64, device=device)
    values, slopes = values_and_slopes(knots)
    h = cutoff / (num_points - 1)
    y0, y1, m0, m1 = values[:-1], values[1:], slopes[:-1] * h, slopes[1:] * h
    coeffs = torch.stack([y0, m0, 3 * (y1 - y0) - 2 * m0 - m1, 2 * (y0 - y1) + m0 + m1], 1)
    table = TabulatedFilter(coeffs, cutoff)
    fractions = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=device)
    probe = (knots[:-1, None] + h * fractions).reshape(-1)
    exact, _ = values_and_slopes(probe)
    err = (_mref.spline_matrix(probe, coeffs, cutoff, 0) - exact).abs().max()
    table.max_rel_error = float(err / exact.abs().max().clamp_min(1e-300))
    return table


class _Snapshot:
    """What a cache entry was made from: each tensor by weak reference (a tensor made later at
    a freed one's address never matches), its ``_version`` (in-place updates: optimizer steps,
    ``load_state_dict``) and a copy of its values (a ``.data`` edit changes the values but not
    the version). The copy and the comparison cost the few KB of a filter's weights; on CUDA
    the comparison reads back one bool."""

    def __init__(self, tensors: tuple[Tensor, ...]):
        self._refs = tuple(weakref.ref(t) for t in tensors)
        self._versions = tuple(t._version for t in tensors)
        self._values = tuple(t.detach().clone() for t in tensors)

    def matches(self, tensors: tuple[Tensor, ...]) -> bool:
        if len(tensors) != len(self._refs):
            return False
        return (all(r() is t and t._version == v for r, v, t in
                    zip(self._refs, self._versions, tensors, strict=True))
                and all(torch.equal(t.detach(), v) for t, v in
                        zip(tensors, self._values, strict=True)))


class _TableCache:
    """The table of a filter, and its coefficients in each dtype asked for, rebuilt when the
    filter's parameters change (``_Snapshot``: another tensor, an in-place update or a ``.data``
    edit) or when its number of knots does."""

    def __init__(self):
        self._entry: tuple | None = None  # (snapshot, num_points, table, {dtype: coeffs})

    def _current(self, weights: tuple[Tensor, ...], build, num_points: int) -> tuple:
        entry = self._entry
        if entry is None or entry[1] != num_points or not entry[0].matches(weights):
            entry = (_Snapshot(weights), num_points, build(), {})
            self._entry = entry
        return entry

    def table(self, weights: tuple[Tensor, ...], build, num_points: int) -> TabulatedFilter:
        return self._current(weights, build, num_points)[2]

    def coeffs(self, weights: tuple[Tensor, ...], build, num_points: int,
               dtype: torch.dtype) -> Tensor:
        """The table's coeffs in ``dtype``, converted once per table (it is built in float64;
        a float32 model would otherwise convert it on every call)."""
        _, _, table, converted = self._current(weights, build, num_points)
        if dtype not in converted:
            converted[dtype] = table.coeffs.to(dtype)
        return converted[dtype]


class TabulatedFilter(nn.Module):
    """A filter W(r) stored as a cubic table: coeffs [P-1, 4, F] over [0, cutoff).

    Calling it on distances [E] returns W [E, F] (zero at and beyond the cutoff). The table is a
    constant: it has no gradient with respect to the filter parameters it came from.
    """

    max_rel_error: float
    coeffs: Tensor

    def __init__(self, coeffs: Tensor, cutoff: float):
        super().__init__()
        self.register_buffer("coeffs", coeffs.contiguous())
        self.cutoff = float(cutoff)
        self.max_rel_error = float("nan")
        self._converted: tuple | None = None  # (snapshot of coeffs, dtype, converted)

    def coeffs_as(self, dtype: torch.dtype) -> Tensor:
        """``coeffs`` in ``dtype``, converted once and kept until ``coeffs`` changes
        (``_Snapshot``; the table is built in float64, a float32 model would otherwise convert
        it on every call)."""
        if self.coeffs.dtype == dtype:
            return self.coeffs
        cached = self._converted
        if cached is None or cached[1] != dtype or not cached[0].matches((self.coeffs,)):
            cached = (_Snapshot((self.coeffs,)), dtype, self.coeffs.to(dtype))
            self._converted = cached
        return cached[2]

    def forward(self, distances: Tensor) -> Tensor:
        return _mref.spline_matrix(distances, self.coeffs_as(distances.dtype), self.cutoff, 0)


class CFConv(_Backend, nn.Module):
    """Continuous-filter convolution (SchNet): ``out_i = sum_j x_j * W(r_ij)``.

    Args:
        num_features: F, width of x and of the filter.
        num_basis: K radial basis functions of the filter network.
        cutoff: interaction cutoff (<= the neighbor list's cutoff).
        kind: of the :class:`RadialFilter` (``self.filter``).
        envelope: as ``kind``.
        activation: as ``kind``.
        tabulate: evaluate W from a cubic table (``filter.tabulate(num_points)``, rebuilt when
            the filter's parameters change) instead of the MLP. Inference only: the filter
            parameters receive no gradient on this path (forces and x-gradients do).
        num_points: knots of that table.
        backend: "numba", "triton", "reference" or None (``FASTFF_BACKEND``, then by device);
            resolved once per device, and again when set.
        keep_budget: bytes a call may keep between its passes (its forward's pair filters for
            the backward's x-gradient; a differentiated backward's products for the next), or
            None for the module-level :data:`KEEP_BUDGET` (256 MiB) read at each call; 0 keeps
            nothing (every pass recomputes its filters).

    The fused path computes W once per unordered pair (both edges of a pair have the same
    distance; ``nl.mirror_pairs``) for blocks of pairs inside the kernel, and keeps the pair
    filters for the backward when x requires grad and they fit in ``keep_budget`` (else the
    backward recomputes them); no [E, F] tensor is kept. Given ``distances`` must be the list's
    own (mirror pairs equal, as ``nl.distances`` gives them); where a pair's two distances
    differ, its edges share the mean of their two filters. The tabulated path without given
    ``distances`` also computes each distance from positions inside its kernel
    (``fastff::spline_conv_positions``): forces and stress then need no [E] tensor at all.
    Deterministic on CPU (fixed summation order, no atomics).
    """

    _OPS = ("cfconv", "spline_conv", "spline_conv_positions")

    def __init__(self, num_features: int, num_basis: int, cutoff: float, *,
                 kind: str = "gaussian", envelope: str | None = "cosine",
                 activation: str = "shifted_softplus", tabulate: bool = False,
                 num_points: int = 1000, backend: str | None = None,
                 keep_budget: int | None = None):
        super().__init__()
        self.filter = RadialFilter(num_basis, num_features, cutoff, kind=kind, envelope=envelope,
                                   activation=activation, backend=backend)
        self.num_features, self.cutoff = num_features, self.filter.cutoff
        self.tabulate, self.num_points = bool(tabulate), num_points
        if keep_budget is not None and (isinstance(keep_budget, bool)
                                        or not isinstance(keep_budget, int) or keep_budget < 0):
            raise ValueError(f"keep_budget must be a number of bytes >= 0 or None, got "
                             f"{keep_budget!r}")
        self.keep_budget = keep_budget
        if self.tabulate:
            _positive_int(num_points, "num_points")
        self._tables = _TableCache()
        self.backend = backend

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        _Backend.backend.fset(self, value)  # type: ignore[attr-defined]
        if "filter" in self._modules:
            self.filter.backend = value

    def table(self) -> TabulatedFilter:
        """The current table of ``filter`` (rebuilt when its parameters changed)."""
        return self._tables.table(self.filter.weights(), self._build_table, self.num_points)

    def _build_table(self) -> TabulatedFilter:
        return self.filter.tabulate(self.num_points)

    def _coeffs(self, dtype: torch.dtype) -> Tensor:
        return self._tables.coeffs(self.filter.weights(), self._build_table, self.num_points,
                                   dtype)

    def forward(self, x: Tensor, positions: Tensor, nl: NeighborList,
                cell: Tensor | None = None, *, distances: Tensor | None = None) -> Tensor:
        """x [N, F], positions [N, 3], nl full list, cell [3, 3] or None -> out [N, F].

        ``distances``: ``nl.distances(positions, cell)`` when the caller already has them
        (a model's interactions share one set instead of recomputing it per layer)."""
        _graph(self, positions, nl, self.cutoff, {"x": (x, (self.num_features,))})
        if self.tabulate and distances is None:
            # distances from positions inside the kernel: no [E] tensor, no mirror index
            return _mop.spline_conv_positions(
                x.contiguous(), positions.contiguous(), nl._cell_for(positions, cell), nl.batch,
                nl.i, nl.j, nl.shifts, nl.ptr, self._coeffs(x.dtype), self.cutoff,
                self._backend_for("spline_conv_positions", x.device))
        d = (nl.distances(positions, cell) if distances is None
             else _edge_tensor(distances, nl, "distances", ())).contiguous()
        if self.tabulate:
            return _mop.spline_conv(x.contiguous(), d, None, self._coeffs(x.dtype), nl.i, nl.j,
                                    nl.ptr, nl.reverse, self.cutoff, 0,
                                    self._backend_for("spline_conv", x.device))
        budget = KEEP_BUDGET if self.keep_budget is None else self.keep_budget
        # the backward's x-gradient reads the kept filters: wanted when x requires grad
        keep = torch.is_grad_enabled() and x.requires_grad
        out, _ = _mop.cfconv(x.contiguous(), d, nl.i, nl.j, nl.ptr, nl.reverse, nl.mirror_pairs,
                             *self.filter.params(), *self.filter.settings, keep, budget,
                             self._backend_for("cfconv", x.device))
        return out


def _edge_tensor(t: Tensor, nl: NeighborList, name: str, trailing: tuple) -> Tensor:
    """A per-pair tensor given by the caller: [E, *trailing]."""
    if not isinstance(t, Tensor) or tuple(t.shape) != (nl.i.shape[0], *trailing):
        shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape {[nl.i.shape[0], *trailing]} (one row per "
                         f"pair of the neighbor list), got {shape}")
    return t


class PaiNNMessage(_Backend, nn.Module):
    """PaiNN's message block (Schütt et al. 2021, eq. 7-8), l <= 1.

    ``phi = Dense(act(Dense(s)))`` [N, 3F] and ``W(r) = u(r) (Dense(bessel(r)))`` [E, 3F] give
    ``ds_i = sum_j (phi_j W_ij)_s`` and
    ``dv_i = sum_j (phi_j W_ij)_vv * v_j + (phi_j W_ij)_vs * r_ij / |r_ij|``.

    Args:
        num_features: F.
        num_basis: K Bessel functions (PaiNN uses 20).
        cutoff: cosine-envelope cutoff (<= the neighbor list's).
        tabulate: read the filter from a cubic table (:meth:`table`, ``num_points`` knots);
            inference only, as for :class:`CFConv`.
        num_points: knots of that table.
        backend: as for :class:`CFConv` (resolved once per device, and again when set).

    forward(s [N, F], v [N, 3, F], positions [N, 3], nl, cell=None) -> (ds [N, F], dv [N, 3, F]).
    Rotation equivariant: rotating positions and v rotates dv and leaves ds unchanged. The sums
    are fused, deterministic receiver-row sums (``fastff::painn_message``): the filter is
    computed for blocks of edges inside the op and recomputed in its backward, so no edge x
    feature tensor is kept (force training, which differentiates the backward, materialises it
    once, as for :class:`CFConv`). With ``tabulate=True`` (inference: the filter
    parameters get no gradient) the filter is read from a cubic table (:meth:`table`) inside
    four spline convolutions, and no edge x feature tensor exists.
    """

    _OPS = ("painn_message", "spline_conv")

    def __init__(self, num_features: int, num_basis: int = 20, cutoff: float = 5.0, *,
                 tabulate: bool = False, num_points: int = 1000, backend: str | None = None):
        super().__init__()
        _positive_int(num_features, "num_features")
        self.num_basis, self.cutoff, _, _ = check_basis_args(num_basis, cutoff, "bessel",
                                                             "cosine")
        self.num_features = num_features
        self.tabulate, self.num_points = bool(tabulate), _positive_int(num_points, "num_points")
        self.context = nn.Sequential(nn.Linear(num_features, num_features), nn.SiLU(),
                                     nn.Linear(num_features, 3 * num_features))
        self.filter = nn.Linear(num_basis, 3 * num_features)
        self._tables = _TableCache()
        self.backend = backend

    def table(self) -> TabulatedFilter:
        """The filter ``u(r) (W_f b(r) + b_f)`` [3F] as a cubic table over [0, cutoff] (values
        and slopes from float64; rebuilt when the filter's parameters change)."""
        return self._tables.table((self.filter.weight, self.filter.bias), self._build_table,
                                  self.num_points)

    @torch.no_grad()
    def _build_table(self) -> TabulatedFilter:
        w, b = self.filter.weight.detach().double(), self.filter.bias.detach().double()

        def values_and_slopes(r: Tensor) -> tuple[Tensor, Tensor]:
            basis = _rref.radial_basis(r, self.num_basis, self.cutoff, "bessel", "none", 0)
            slope = _rref.radial_basis(r, self.num_basis, self.cutoff, "bessel", "none", 1)
            env, env_slope = dense.envelope(r, self.cutoff, "cosine", 1)
            y = basis @ w.t() + b
            return env[:, None] * y, env_slope[:, None] * y + env[:, None] * (slope @ w.t())

        return hermite_table(values_and_slopes, self.cutoff, self.num_points, w.device)

    def forward(self, s: Tensor, v: Tensor, positions: Tensor, nl: NeighborList,
                cell: Tensor | None = None, *, vectors: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """``vectors``: ``nl.vectors(positions, cell)`` when the caller already has them."""
        nf = self.num_features
        _graph(self, positions, nl, self.cutoff, {"s": (s, (nf,)), "v": (v, (3, nf))})
        vec = (nl.vectors(positions, cell) if vectors is None
               else _edge_tensor(vectors, nl, "vectors", (3,)))
        d = torch.linalg.vector_norm(vec, dim=1)
        if self.tabulate:
            return self._tabulated(s, v, vec, d, nl)
        phi = self.context(s)
        unit = vec / d.clamp_min(torch.finfo(d.dtype).tiny).unsqueeze(1)
        return _mop.painn_message(phi.contiguous(), v.contiguous(), d.contiguous(),
                                  unit.contiguous(), nl.i, nl.j, nl.ptr, nl.reverse,
                                  track(self.filter.weight), track(self.filter.bias),
                                  *self.settings, self._backend_for("painn_message", s.device))

    @property
    def settings(self) -> dense.RadialSettings:
        """(cutoff, "bessel", "cosine"): what defines the filter besides its weights."""
        return dense.RadialSettings(self.cutoff, "bessel", "cosine")

    def _tabulated(self, s: Tensor, v: Tensor, vec: Tensor, d: Tensor,
                   nl: NeighborList) -> tuple[Tensor, Tensor]:
        """The message with the filter read from its table: spline convolutions only, no
        per-edge tensor wider than 3 (the unit vectors)."""
        nf = self.num_features
        name = self._backend_for("spline_conv", s.device)
        coeffs = self._tables.coeffs((self.filter.weight, self.filter.bias), self._build_table,
                                     self.num_points, s.dtype)
        c_s, c_vs, c_vv = coeffs.split(nf, dim=2)
        p_s, p_vs, p_vv = self.context(s).split(nf, dim=1)
        args = (nl.i, nl.j, nl.ptr, nl.reverse, self.cutoff, 0, name)
        # (ds | vv-messages per axis) share one pass: x = [phi_s | phi_vv v_x | phi_vv v_y | ...]
        x = torch.cat([p_s, (p_vv.unsqueeze(1) * v).flatten(1)], 1).contiguous()
        out = _mop.spline_conv(x, d, None, torch.cat([c_s, c_vv, c_vv, c_vv], 2).contiguous(),
                               *args)
        unit = vec / d.clamp_min(torch.finfo(d.dtype).tiny).unsqueeze(1)
        c_vs, p_vs = c_vs.contiguous(), p_vs.contiguous()
        vs = [_mop.spline_conv(p_vs, d, unit[:, k].contiguous(), c_vs, *args) for k in range(3)]
        return out[:, :nf], out[:, nf:].view(-1, 3, nf) + torch.stack(vs, 1)

