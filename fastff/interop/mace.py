"""mace-torch models served by fastff's equivariant kernels, in place.

``accelerate(model)`` takes a ``MACE`` or ``ScaleShiftMACE`` (built in code or loaded) and returns
the same object with its spherical harmonics, interactions, products and readouts computed by
``fastff.kernels.equivariant``: the channelwise tensor product is one fused convolution over
the receivers' rows (no [edges x channels x irreps] tensor), the symmetric contraction one pass
per atom over its sparse monomials, the equivariant linears GEMMs over channels per irrep, the
radial MLP GEMMs, once per mirror pair of edges where the graph has them. The modules keep
their parameters, buffers and state_dict keys (only their classes change, to subclasses whose
``forward`` calls the kernels), so optimizers, checkpoints and mace's own ``MACECalculator``
work unchanged; ``restore(model)`` undoes it. Anything the kernels do not implement is refused
by name. ``evaluate`` calls a model on plain tensors.

e3nn 0.4 loads its constants with ``torch.load``, which torch >= 2.6 refuses by default
(``weights_only``): importing this module allow-lists the one global it needs (``slice``)
before e3nn is imported; code that imports mace or e3nn first must set
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` or call ``torch.serialization.add_safe_globals([slice])``.
Maths: kernels/equivariant/README.md.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

torch.serialization.add_safe_globals([slice])  # e3nn's constants.pt: tensors, ints and slices

from e3nn import o3  # noqa: E402
from mace.modules import blocks as _blocks  # noqa: E402
from mace.modules import models as _models  # noqa: E402
from mace.modules.radial import BesselBasis, GaussianBasis  # noqa: E402
from mace.modules.symmetric_contraction import SymmetricContraction  # noqa: E402

from fastff import _checks  # noqa: E402
from fastff.kernels._runtime import registry  # noqa: E402
from fastff.kernels.equivariant import op as _eq  # noqa: E402

__all__ = ["accelerate", "restore", "is_accelerated", "evaluate", "model_inputs"]

_MAX_ELL = 3  # spherical harmonics l <= 3
_MAX_HIDDEN_L = 1  # hidden features l <= 1
_MAX_CORRELATION = 3
# harmonics, distances, mirror check, row distances, radial features (+1): one forward's
# edge tensors
_PERMUTED_KEPT = 6
_KNOTS = 2048  # knots of the radial table (see kernels/equivariant/README.md, "Tabulation")


class UnsupportedMACEError(ValueError):
    """A MACE option the fastff kernels do not implement; the message names it."""


def _refuse(option: str, value, supported: str) -> None:
    raise UnsupportedMACEError(f"fastff.interop.mace.accelerate: {option}={value!r} is not "
                               f"supported (supported: {supported})")


# ---------------------------------------------------------------- per-model shared state
@dataclass
class _Shared:
    """What every accelerated block of one model shares: the backend, and the structures built
    once per graph (edge CSR orders) and per node-attribute tensor (element groups), reused
    while the same tensor (weak reference, same ``_version``) comes back."""

    radial: object  # the model's RadialEmbeddingBlock (basis and cutoff modules)
    backend: str | None = None
    tabulate: bool = False
    _graph: tuple = field(default=(None, -1, -1, None))
    _elements: tuple = field(default=(None, -1, None))

    def __getstate__(self):  # pickling (torch.save of a model) keeps the settings, not caches
        return {"radial": self.radial, "backend": self.backend, "tabulate": self.tabulate}

    def use_table(self, interaction) -> bool:
        """Whether this call may read the radial table: asked for, and no gradient of a radial
        weight can be wanted (frozen weights, or no graph being recorded)."""
        if not self.tabulate:
            return False
        if not torch.is_grad_enabled():
            return True
        sources = [*_RadialMLP.weights(interaction.conv_tp_weights), *self.radial.parameters()]
        return not any(t.requires_grad for t in sources)

    def __setstate__(self, state):
        self.__init__(**state)

    def graph(self, edge_index: Tensor, num_nodes: int) -> _Graph:
        ref, version, n, value = self._graph
        if ref is not None and ref() is edge_index and version == edge_index._version \
                and n == num_nodes:
            return value
        value = _Graph.of(edge_index, num_nodes)
        self._graph = (weakref.ref(edge_index), edge_index._version, num_nodes, value)
        return value

    def elements(self, node_attrs: Tensor, agnostic: bool = False) -> _Elements:
        ref, version, value = self._elements
        if not (ref is not None and ref() is node_attrs and version == node_attrs._version):
            value = _Elements.of(node_attrs)
            self._elements = (weakref.ref(node_attrs), node_attrs._version, value)
        return value.agnostic() if agnostic else value


class _Permute(torch.autograd.Function):
    """t[order] whose backward is the gather by the inverse permutation (parallel,
    deterministic; a scatter-add would do the same work serially), itself differentiable."""

    @staticmethod
    def forward(ctx, t, order, inverse):
        ctx.save_for_backward(order, inverse)
        return t.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        order, inverse = ctx.saved_tensors
        return _Permute.apply(grad, inverse, order), None, None


@dataclass
class _Graph:
    """mace's edges (edge_index [2, E]: row 0 senders, row 1 receivers) stored in receiver
    order, so that the kernels stream every per-edge tensor (harmonics, MLP weights and their
    gradients) instead of reading it at random: ``order`` sorts the edges by receiver and
    ``structure`` is the CSR the kernels walk, in that order (by_receiver is the identity)."""

    order: Tensor
    inverse: Tensor
    structure: tuple[Tensor, ...]  # senders, receivers, by_receiver, receiver_ptr, by_sender,
    # sender_ptr
    rows: _MirrorRows | None  # edges paired with their mirrors, when every edge has one
    _permuted: list = field(default_factory=list)  # (weakref, version, permuted), newest last

    @staticmethod
    def of(edge_index: Tensor, num_nodes: int) -> _Graph:
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must be [2, E], got {list(edge_index.shape)}")
        senders, receivers = edge_index[0].long(), edge_index[1].long()
        if _checks.checks_enabled() and senders.numel():
            low = int(torch.minimum(senders.min(), receivers.min()))
            high = int(torch.maximum(senders.max(), receivers.max()))
            if low < 0 or high >= num_nodes:
                raise ValueError(f"edge_index holds atom indices in [{low}, {high}], outside "
                                 f"[0, {num_nodes}) for {num_nodes} atoms")
        order = torch.argsort(receivers, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        senders, receivers = senders[order], receivers[order]

        def pointer(index):
            ptr = torch.zeros(num_nodes + 1, dtype=torch.int64, device=index.device)
            ptr[1:] = torch.cumsum(torch.bincount(index, minlength=num_nodes), 0)
            return ptr

        structure = (senders, receivers, torch.arange(order.numel(), device=order.device),
                     pointer(receivers), torch.argsort(senders, stable=True), pointer(senders))
        return _Graph(order, inverse, structure, _MirrorRows.of(senders, receivers, num_nodes))

    def weight_rows(self, r: Tensor, y: Tensor) -> _MirrorRows | None:
        """The mirror pairs, when this call's edges are mirrors in fact: equal distances and
        opposite l = 1 harmonics (exact in floating point for v and -v), so that each pair's
        two distances are one function of the positions and the cell; None otherwise (each edge
        then gets its own radial weights)."""
        rows = self.rows
        if rows is None or y.shape[1] < 4:
            return None
        return rows if self._cached(r, "mirror check", lambda: rows.hold(r, y)) else None

    def row_distances(self, r: Tensor, rows: _MirrorRows) -> Tensor:
        """The distance of each pair's first edge, once per forward."""
        return self._cached(r, "row distances", lambda: r.index_select(0, rows.first))

    def permuted(self, t: Tensor) -> Tensor:
        """t (per edge, mace's order) in receiver order; the same tensor (same version) gives
        the same result within a forward (both interactions read the same edge tensors)."""
        return self._cached(t, "permuted", lambda: _Permute.apply(t, self.order, self.inverse))

    def features(self, r: Tensor, radial) -> tuple[Tensor, Tensor | None]:
        """mace's radial features of the (receiver-ordered) distances r, once per forward."""
        return self._cached(r, "features", lambda: _radial_features(radial, r))

    def _cached(self, t: Tensor, tag: str, make):
        for ref, version, kind, value in self._permuted:
            if ref() is t and version == t._version and kind == tag:
                return value
        value = make()
        # a forward makes ~3 of these; older entries (earlier calls on a reused edge_index) go,
        # so the cache never holds more than about one forward's worth
        self._permuted = [*self._permuted[-(_PERMUTED_KEPT - 1):],
                          (weakref.ref(t), t._version, tag, value)]
        return value


@dataclass
class _MirrorRows:
    """Edges (receiver order) paired with their mirror edges (sender and receiver swapped),
    found from the graph alone: the pair's two edges read one row of radial weights (one
    distance, one network evaluation), which halves the radial network's work in a full
    neighbour list. Only where no ordered atom pair has two edges (periodic images of one pair
    within the cutoff, or self-images) and every edge has a mirror."""

    w_row: Tensor  # int64 [E]: the weight row each edge reads
    w_partner: Tensor  # int64 [E]: the other edge reading that row
    first: Tensor  # int64 [R]: the lower-index edge of each row
    second: Tensor  # int64 [R]: the other edge of each row

    @staticmethod
    def of(senders: Tensor, receivers: Tensor, num_nodes: int) -> _MirrorRows | None:
        num_edges = senders.numel()
        if num_edges == 0 or num_edges % 2 or bool((senders == receivers).any()):
            return None
        key = senders * num_nodes + receivers
        sorted_key, by_key = torch.sort(key)
        if bool((sorted_key[1:] == sorted_key[:-1]).any()):
            return None  # an atom pair with several edges: which is whose mirror is not known
        mirror_key = receivers * num_nodes + senders
        at = torch.searchsorted(sorted_key, mirror_key).clamp_(max=num_edges - 1)
        if not bool((sorted_key[at] == mirror_key).all()):
            return None
        partner = by_key[at]
        index = torch.arange(num_edges, device=senders.device)
        first = index[index < partner]
        row_of_first = torch.empty_like(index)
        row_of_first[first] = torch.arange(first.numel(), device=senders.device)
        w_row = torch.where(index < partner, row_of_first, row_of_first[partner])
        return _MirrorRows(w_row, partner, first, partner[first])

    def hold(self, r: Tensor, y: Tensor) -> bool:
        """Whether the pairs are mirrors for these distances r [E] and harmonics y [E, >= 4]."""
        return bool(torch.equal(r[self.first], r[self.second])
                    and torch.equal(y[self.first, 1:4], -y[self.second, 1:4]))


@dataclass
class _Elements:
    """Each atom's element index (from mace's one-hot node_attrs) and the atoms grouped by
    element (element-sorted order, and each present element's slice of it)."""

    index: Tensor  # int64 [N]
    order: Tensor  # int64 [N], atoms sorted by element
    inverse: Tensor  # int64 [N], position of each atom in ``order``
    slices: list[tuple[int, int, int]]  # (element, start, end) in ``order``

    @staticmethod
    def of(node_attrs: Tensor) -> _Elements:
        if node_attrs.dim() != 2:
            raise ValueError(f"node_attrs must be [N, num_elements], got "
                             f"{list(node_attrs.shape)}")
        if _checks.checks_enabled() and node_attrs.numel():
            one_hot = ((node_attrs == 0) | (node_attrs == 1)).all() & \
                (node_attrs.sum(1) == 1).all()
            if not bool(one_hot):
                raise ValueError("node_attrs must be one-hot rows (mace's element encoding)")
        index = node_attrs.argmax(1) if node_attrs.shape[0] else \
            torch.zeros(0, dtype=torch.int64, device=node_attrs.device)
        return _Elements.grouped(index, node_attrs.shape[1])

    @staticmethod
    def grouped(index: Tensor, num_elements: int) -> _Elements:
        order = torch.argsort(index, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(index, minlength=num_elements).tolist()
        slices, start = [], 0
        for z, count in enumerate(counts):
            if count:
                slices.append((z, start, start + count))
            start += count
        return _Elements(index, order, inverse, slices)

    def agnostic(self) -> _Elements:
        """Every atom as element 0 (mace's use_agnostic_product)."""
        zero = torch.zeros_like(self.index)
        return _Elements(zero, torch.arange(zero.numel(), device=zero.device),
                         torch.arange(zero.numel(), device=zero.device),
                         [(0, 0, zero.numel())] if zero.numel() else [])


_NO_ROWS = torch.zeros(0, dtype=torch.int64)  # every edge its own row of radial weights


def _backend(shared: _Shared, name: str, device: torch.device) -> str:
    return registry.resolve(name, device, shared.backend)[0]


# ---------------------------------------------------------------- irreps layouts
def _split_flat(flat: Tensor, irreps: o3.Irreps) -> list[Tensor]:
    """mace's flat features [N, sum mul (2l+1)] (mul-major per irrep) as blocks [N, 2l+1, mul]
    (views, no copy; ``split`` so that the backward is one concatenation, not one zero-filled
    tensor per block)."""
    n = flat.shape[0]
    parts = flat.split([mul * ir.dim for mul, ir in irreps], 1)
    return [p.view(n, mul, ir.dim).transpose(1, 2)
            for p, (mul, ir) in zip(parts, irreps, strict=True)]


def _join_flat(blocks: list[Tensor]) -> Tensor:
    """Blocks [N, 2l+1, mul] as mace's flat features."""
    flat = [b.transpose(1, 2).reshape(b.shape[0], -1) for b in blocks]
    return flat[0] if len(flat) == 1 else torch.cat(flat, 1)


def _split_rows(stacked: Tensor, irreps: o3.Irreps) -> list[Tensor]:
    """[N, D, C] (components stacked) as blocks [N, 2l+1, C] (views)."""
    return list(stacked.split([ir.dim for _, ir in irreps], 1))


class _Cast:
    """float64 constants handed out in the dtype and on the device of a call (cached)."""

    def __init__(self, **tensors: Tensor):
        self._tensors = tensors
        self._cache: dict = {}

    def get(self, name: str, like: Tensor) -> Tensor:
        key = (name, like.dtype, like.device)
        t = self._cache.get(key)
        if t is None:
            source = self._tensors[name]
            dtype = like.dtype if source.is_floating_point() else source.dtype
            t = self._cache[key] = source.to(device=like.device, dtype=dtype)
        return t


# ---------------------------------------------------------------- equivariant linears
def _gemm(x: Tensor, w: Tensor) -> Tensor:
    """[N, d, Cin] @ [Cin, Cout] as one 2-D GEMM (torch.matmul on a strided 3-D operand falls
    back to a batched product with the weight expanded per row: ~5x slower at 3,000 atoms)."""
    n, d, c = x.shape
    return torch.mm(x.reshape(n * d, c), w).view(n, d, w.shape[1])


class _Linear:
    """e3nn's ``o3.Linear`` as one GEMM over channels per output irrep (its inputs of that
    irrep concatenated): out_l = [x_l1 | x_l2 | ...] [a1 W1; a2 W2; ...]."""

    def __init__(self, linear: o3.Linear):
        if not isinstance(linear, o3.Linear):
            _refuse("linear layer", type(linear).__name__, "e3nn o3.Linear (no cuequivariance)")
        if linear.bias.numel():
            _refuse("linear bias", linear.bias.numel(), "linears without biases")
        self.irreps_out = linear.irreps_out
        self.paths: dict[int, list[tuple[int, float, int, int, int]]] = {}
        offset = 0
        for ins in linear.instructions:
            mul_in, mul_out = ins.path_shape
            self.paths.setdefault(ins.i_out, []).append(
                (ins.i_in, float(ins.path_weight), offset, mul_in, mul_out))
            offset += mul_in * mul_out

    def __call__(self, weight: Tensor, blocks: list[Tensor]) -> list[Tensor]:
        n = blocks[0].shape[0] if blocks else 0
        out = []
        for i_out, (mul, ir) in enumerate(self.irreps_out):
            paths = self.paths.get(i_out)
            if not paths:
                out.append(weight.new_zeros(n, ir.dim, mul))
                continue
            ws = [weight.narrow(0, off, mi * mo).view(mi, mo) * pw
                  for _, pw, off, mi, mo in paths]
            xs = [blocks[i_in] for i_in, *_ in paths]
            x = xs[0] if len(xs) == 1 else torch.cat(xs, 2)
            w = ws[0] if len(ws) == 1 else torch.cat(ws, 0)
            out.append(_gemm(x, w))
        return out


class _ElementLinear:
    """e3nn's ``FullyConnectedTensorProduct(irreps, Z x 0e, irreps_out)`` with one-hot element
    attributes (mace's skip connections): per element z, out_l = a x_l W[:, z, :], a GEMM over
    the atoms of each element."""

    def __init__(self, tp: o3.FullyConnectedTensorProduct):
        attrs = tp.irreps_in2
        if len(attrs) != 1 or attrs[0].ir != o3.Irrep(0, 1):
            _refuse("node_attrs irreps", str(attrs), "one block of Z x 0e (one-hot elements)")
        self.num_elements = attrs[0].mul
        self.irreps_out = tp.irreps_out
        self.paths: dict[int, list[tuple[int, float, int, int, int]]] = {}
        offset = 0
        for ins in tp.instructions:
            mul_in, mul_z, mul_out = ins.path_shape
            l1 = tp.irreps_in1[ins.i_in1].ir.l
            w3j = o3.wigner_3j(l1, 0, l1, dtype=torch.float64)[:, 0, :]
            scale = float(w3j[0, 0])
            if ins.connection_mode != "uvw" or not torch.allclose(
                    w3j, scale * torch.eye(2 * l1 + 1, dtype=torch.float64), atol=1e-14):
                _refuse("skip_tp instruction", ins.connection_mode, "uvw with l2 = 0")
            self.paths.setdefault(ins.i_out, []).append(
                (ins.i_in1, float(ins.path_weight) * scale, offset, mul_in, mul_out))
            offset += mul_in * mul_z * mul_out

    def __call__(self, weight: Tensor, blocks: list[Tensor], elements: _Elements) -> list[Tensor]:
        n = blocks[0].shape[0] if blocks else 0
        z_count = self.num_elements
        out = []
        for i_out, (mul, ir) in enumerate(self.irreps_out):
            paths = self.paths.get(i_out)
            if not paths:
                out.append(weight.new_zeros(n, ir.dim, mul))
                continue
            xs = [blocks[i_in] for i_in, *_ in paths]
            x = xs[0] if len(xs) == 1 else torch.cat(xs, 2)
            w = torch.cat([weight.narrow(0, off, mi * z_count * mo).view(mi, z_count, mo) * pw
                           for _, pw, off, mi, mo in paths], 0)  # [sum mul_in, Z, mul_out]
            x_sorted = x.index_select(0, elements.order)
            parts = [_gemm(x_sorted[start:end], w[:, z]) for z, start, end in elements.slices]
            if not parts:
                out.append(weight.new_zeros(n, ir.dim, mul))
                continue
            y = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            out.append(y.index_select(0, elements.inverse))
        return out


# ---------------------------------------------------------------- radial MLP
# Bytes per [rows, H] activation of the radial network's hidden layers on CPU: under glibc's
# 32 MiB mmap limit, so freed blocks are reused (README.md beside the equivariant kernels,
# Tuning).
_EDGE_BLOCK_BYTES = 8 << 20
class _RadialMLP:
    """e3nn's ``FullyConnectedNet`` as GEMMs: each layer's normalisation and the activation's
    second-moment constant are folded into the next layer's weight (weights are [K, H] small,
    the activations [E, H] large)."""

    def __init__(self, net):
        self.layers = []
        for k in range(len(net.hs) - 1):
            layer = getattr(net, f"layer{k}")
            act = layer.act
            if act is None:
                self.layers.append((None, 1.0 / math.sqrt(layer.h_in * layer.var_in
                                                          / layer.var_out), 1.0))
                continue
            cst = 1.0 if act._is_id else float(act.cst)
            self.layers.append((act.f, 1.0 / math.sqrt(layer.h_in * layer.var_in),
                                cst * math.sqrt(layer.var_out)))

    @staticmethod
    def weights(net) -> list[Tensor]:
        return [getattr(net, f"layer{k}").weight for k in range(len(net.hs) - 1)]

    def __call__(self, weights: list[Tensor], x: Tensor, backend: str | None = None) -> Tensor:
        """The network on x [E, K] (see :meth:`split`)."""
        hidden, output = self.split(weights, x, backend)
        return output(hidden)

    def split(self, weights: list[Tensor], x: Tensor, backend: str | None = None
              ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The network on x [E, K] as (the last hidden activation [E, H], the function that
        maps it to the output): with a fastff ``backend`` its SiLUs are ``silu_term`` (each
        derivative one pass; torch's autograd of SiLU takes ~9 elementwise passes in force
        training's second backward), otherwise e3nn's activation as given.

        On CPU the hidden layers run over blocks of ``_EDGE_BLOCK_BYTES`` per [rows, H]
        activation, joined before the last layer: glibc maps every block above 32 MiB afresh
        and faults its pages in at each allocation (an [E, 64] float32 activation at 150 k
        edges is 38 MB), where blocks this size are reused from the heap. With frozen weights
        (molecular dynamics) each block keeps only its input for the backward, which
        recomputes the block's activations (``torch.utils.checkpoint``, any order of
        derivatives), so no [E, H] activation outlives the forward."""
        scaled = []
        carry = 1.0
        for weight, (f, w_scale, out_scale) in zip(weights, self.layers, strict=True):
            scaled.append((weight * (w_scale * carry), f))
            carry = out_scale if f is not None else 1.0
        *hidden, (last, last_f) = scaled
        width = max((w.shape[1] for w, _ in hidden), default=1)
        rows = max(1, _EDGE_BLOCK_BYTES // (width * x.element_size()))
        if x.device.type == "cpu" and x.shape[0] > rows and hidden:
            recompute = torch.is_grad_enabled() and x.requires_grad and not any(
                w.requires_grad for w, _ in hidden)
            x = torch.cat([checkpoint(self._layers, hidden, block, backend, use_reentrant=False)
                           if recompute else self._layers(hidden, block, backend)
                           for block in x.split(rows)])
        else:
            x = self._layers(hidden, x, backend)

        def output(h: Tensor) -> Tensor:
            out = self._layers([(last, last_f)], h, backend)
            return out * carry if carry != 1.0 else out

        return x, output

    @staticmethod
    def _layers(layers, x: Tensor, backend: str | None) -> Tensor:
        for weight, f in layers:
            x = torch.matmul(x, weight)
            if f is not None:
                if backend is not None and f is torch.nn.functional.silu:
                    x = _eq.silu_term(x, 0, None, None, backend)
                else:
                    x = f(x)
        return x


def _radial_features(radial, r: Tensor) -> tuple[Tensor, Tensor | None]:
    """mace's RadialEmbeddingBlock at distances r [E]: (basis x cutoff, None), or (basis,
    cutoff) when the model applies the cutoff after its radial network (apply_cutoff=False)."""
    r = r.unsqueeze(1)
    cutoff = radial.cutoff_fn(r)
    basis = radial.bessel_fn(r)
    if getattr(radial, "apply_cutoff", True):
        return basis * cutoff, None
    return basis, cutoff


class _RadialWeights:
    """The per-edge weights of one interaction's tensor product, w(r) = MLP(basis(r) cutoff(r))
    [E, paths x channels]: exactly (GEMMs), or from a cubic table of w(r) built in float64
    from the same weights (``radial_spline``: ~1 k instead of ~25 k multiply-adds per edge at
    64 channels), rebuilt whenever a weight or the basis changes value."""

    def __init__(self, net, knots: int):
        self.mlp = _RadialMLP(net)
        self.knots = knots
        self._table: tuple | None = None  # (snapshot, dtype, device, coeffs, step)

    def exact(self, net, features, backend: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The weights as (the network's last hidden activation [E, H], the function that maps
        it to the weights [E, paths x channels]): the weights are 4x the activation at 64
        channels, so a caller may keep the activation and recompute the weights."""
        basis, cutoff = features
        hidden, output = self.mlp.split(_RadialMLP.weights(net), basis, backend)
        if cutoff is None:
            return hidden, output
        return hidden, lambda h: output(h) * cutoff

    def table(self, net, radial, like: Tensor) -> tuple[Tensor, float]:
        sources = [*_RadialMLP.weights(net), *radial.parameters(), *radial.buffers()]
        cached = self._table
        if cached is not None and cached[1] == like.dtype and cached[2] == like.device and \
                len(cached[0]) == len(sources) and all(
                    a.shape == b.shape and torch.equal(a, b.detach())
                    for a, b in zip(cached[0], sources, strict=True)):
            return cached[3], cached[4]
        coeffs, step = self._build(net, radial)
        coeffs = coeffs.to(device=like.device, dtype=like.dtype)
        self._table = ([t.detach().clone() for t in sources], like.dtype, like.device, coeffs,
                       step)
        return coeffs, step

    def _build(self, net, radial) -> tuple[Tensor, float]:
        """Hermite cubic coefficients [knots - 1, 4, F] of w(r) on [0, r_max] (values and slopes
        at the knots by forward-mode autograd, in float64)."""
        r_max = float(radial.cutoff_fn.r_max)
        step = r_max / (self.knots - 1)
        r = torch.arange(self.knots, dtype=torch.float64) * step
        r[0] = 1e-6 * step  # the Bessel basis sin(a r) / r is 0 / 0 at r = 0 in mace's form
        radial64 = copy.deepcopy(radial).to(torch.float64).cpu()
        weights = [w.detach().to(torch.float64).cpu() for w in _RadialMLP.weights(net)]

        def weights_at(r):
            basis, cutoff = _radial_features(radial64, r)
            w = self.mlp(weights, basis)
            return w if cutoff is None else w * cutoff

        with torch.no_grad():
            values, slopes = torch.func.jvp(weights_at, (r,), (torch.ones_like(r),))[:2]
        v0, v1 = values[:-1], values[1:]
        s0, s1 = slopes[:-1] * step, slopes[1:] * step
        coeffs = torch.stack([v0, s0, 3 * (v1 - v0) - 2 * s0 - s1, 2 * (v0 - v1) + s0 + s1], 1)
        return coeffs, step


# ---------------------------------------------------------------- tensor-product coupling
def _offsets(irreps: o3.Irreps) -> list[int]:
    out, offset = [], 0
    for _, ir in irreps:
        out.append(offset)
        offset += ir.dim
    return out


def _coupling(tp, num_channels: int, avg_num_neighbors: float) -> _Cast:
    """The conv_tp's uvu instructions as one dense coupling [Din, nY, Dout] (path weight,
    Wigner 3j and 1 / avg_num_neighbors folded in) and the path of each output component."""
    in1, in2, out = tp.irreps_in1, tp.irreps_in2, tp.irreps_out
    sh = o3.Irreps.spherical_harmonics(in2.lmax)
    if any(mul != 1 for mul, _ in in2) or [ir.l for _, ir in in2] != [ir.l for _, ir in sh]:
        _refuse("edge attribute irreps", str(in2), "spherical harmonics 0..lmax, one each")
    o1, o2, o3_ = _offsets(in1), _offsets(in2), _offsets(out)
    coupling = torch.zeros(in1.dim // num_channels, in2.dim, sum(ir.dim for _, ir in out),
                           dtype=torch.float64)
    out_path = torch.full((coupling.shape[2],), -1, dtype=torch.int64)
    for k, ins in enumerate(tp.instructions):
        if ins.connection_mode != "uvu" or not ins.has_weight or \
                tuple(ins.path_shape) != (num_channels, 1):
            _refuse("conv_tp instruction", (ins.connection_mode, tuple(ins.path_shape)),
                    f"weighted uvu paths of {num_channels} channels")
        l1, l2, l3 = in1[ins.i_in1].ir.l, in2[ins.i_in2].ir.l, out[ins.i_out].ir.l
        w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
        coupling[o1[ins.i_in1]:o1[ins.i_in1] + 2 * l1 + 1, o2[ins.i_in2]:o2[ins.i_in2] + 2 * l2 + 1,
                 o3_[ins.i_out]:o3_[ins.i_out] + 2 * l3 + 1] += \
            float(ins.path_weight) * w3j / avg_num_neighbors
        if (out_path[o3_[ins.i_out]:o3_[ins.i_out] + 2 * l3 + 1] >= 0).any():
            _refuse("conv_tp", "two paths into one output", "one path per output block")
        out_path[o3_[ins.i_out]:o3_[ins.i_out] + 2 * l3 + 1] = k
    if (out_path < 0).any():
        _refuse("conv_tp", "outputs without a path", "every output block fed by one path")
    return _Cast(coupling=coupling, out_path=out_path)


# ---------------------------------------------------------------- symmetric contraction
def _symmetrized(u: np.ndarray, nu: int, dim: int, num_m: int):
    """(tuples [K, nu] sorted i1 <= ... <= i_nu, U_sym [M, K, P]): U summed over the orderings
    of each index tuple (the product of features is symmetric), zero tuples dropped."""
    u = u.reshape(num_m, *([dim] * nu), u.shape[-1])
    index: dict[tuple[int, ...], int] = {}
    rows: list[np.ndarray] = []
    nonzero = np.argwhere(np.abs(u).max(-1) > 0)
    for entry in nonzero:
        m, idx = int(entry[0]), tuple(sorted(int(t) for t in entry[1:]))
        k = index.get(idx)
        if k is None:
            k = index[idx] = len(rows)
            rows.append(np.zeros((num_m, u.shape[-1])))
        rows[k][m] += u[(m,) + tuple(entry[1:])]
    keys = sorted(index)
    usym = np.stack([rows[index[t]] for t in keys], 1) if keys else \
        np.zeros((num_m, 0, u.shape[-1]))
    keep = np.abs(usym).max(axis=(0, 2)) > 0 if keys else np.zeros(0, bool)
    return [t for t, k in zip(keys, keep, strict=True) if k], usym[:, keep]


class _Contraction:
    """One output irrep of mace's SymmetricContraction: the sparse monomials of the atom's
    features (index tuples of degree 1..correlation, padded with -1) and, per degree, U summed
    over index orderings; the coefficients T[z, k, m, c] = sum_p U_sym[m, k, p] W[z, p, c] are
    formed from the live weights at every call (small: Z x K x M x C)."""

    def __init__(self, contraction, dim: int, num_m: int):
        self.correlation = contraction.correlation
        tuples: list[tuple[int, ...]] = []
        usyms = {}
        for nu in range(1, self.correlation + 1):
            u = contraction.U_tensors(nu).detach().cpu().double().numpy()
            keys, usym = _symmetrized(u, nu, dim, num_m)
            usyms[nu] = (len(tuples), torch.from_numpy(usym))
            tuples += [t + (-1,) * (3 - nu) for t in keys]
        self.ranges = {nu: (start, usym.shape[1]) for nu, (start, usym) in usyms.items()}
        self.constants = _Cast(tuples=torch.tensor(tuples, dtype=torch.int64).reshape(-1, 3),
                               **{f"u{nu}": usym for nu, (_, usym) in usyms.items()})

    def weights(self, contraction, like: Tensor) -> Tensor:
        parts = []
        for nu in range(1, self.correlation + 1):
            w = contraction.weights_max if nu == self.correlation else \
                contraction.weights[self.correlation - 1 - nu]
            if self.ranges[nu][1]:
                usym = self.constants.get(f"u{nu}", like)
                parts.append(torch.einsum("mkp,zpc->zkmc", usym, w.to(like.dtype)))
        return torch.cat(parts, 1).contiguous()


# ---------------------------------------------------------------- accelerated blocks
class _FastRadialEmbedding(_blocks.RadialEmbeddingBlock):
    """Hands the distances [E, 1] on as the edge features: the accelerated interactions compute
    the basis, the cutoff and the radial network (or read its table) from them, in receiver
    order."""

    def forward(self, edge_lengths: Tensor, node_attrs: Tensor, edge_index: Tensor,
                atomic_numbers: Tensor):
        return edge_lengths, None


class _FastSphericalHarmonics(o3.SphericalHarmonics):
    def forward(self, x: Tensor) -> Tensor:
        shared = self._fastff_shared
        return _eq.spherical_harmonics(x.contiguous(), self._lmax,
                                       _backend(shared, "spherical_harmonics", x.device))


def _interaction_forward(self, node_attrs: Tensor, node_feats: Tensor, edge_attrs: Tensor,
                         edge_feats: Tensor, edge_index: Tensor, cutoff: Tensor | None = None,
                         lammps_class=None, lammps_natoms=(0, 0), first_layer: bool = False):
    """mace's interaction (RealAgnostic, residual or not), fused: see the module docstring."""
    if lammps_class is not None:
        raise UnsupportedMACEError("fastff.interop.mace: the LAMMPS ML-IAP path is not supported")
    plan, shared = self._fastff, self._fastff_shared
    n = node_feats.shape[0]
    elements = shared.elements(node_attrs)
    blocks = _split_flat(node_feats, self.node_feats_irreps)
    sc = None
    if plan.residual:
        sc = _join_flat(plan.skip(self.skip_tp.weight, blocks, elements))
    x = torch.cat(plan.up(self.linear_up.weight, blocks), 1)  # [N, Din, C]
    if cutoff is not None or edge_feats.dim() != 2 or edge_feats.shape[1] != 1:
        raise ValueError("an accelerated interaction takes the edge distances [E, 1] as "
                         "edge_feats (the accelerated model's radial_embedding returns them)")
    graph = shared.graph(edge_index, n)  # every per-edge tensor below is in receiver order
    y = graph.permuted(edge_attrs).to(x.dtype)
    r = graph.permuted(edge_feats)[:, 0]
    backend = _backend(shared, "tp_conv", x.device)
    coupling = (plan.coupling.get("coupling", x), plan.coupling.get("out_path", x))
    if shared.use_table(self):  # weights from the table, inside the kernels
        coeffs, step = plan.radial.table(self.conv_tp_weights, shared.radial, x)
        message = _eq.tp_conv_spline(x.contiguous(), y.contiguous(), r.to(x.dtype).contiguous(),
                                     coeffs, step, *graph.structure, *coupling, backend)
    else:
        rows = graph.weight_rows(r, y)
        if rows is None:
            r_rows, row_args = r, (_NO_ROWS, _NO_ROWS)
        else:
            r_rows, row_args = graph.row_distances(r, rows), (rows.w_row, rows.w_partner)
        hidden, weights_of = plan.radial.exact(self.conv_tp_weights,
                                               graph.features(r_rows, shared.radial),
                                               _backend(shared, "silu_term", x.device))
        w = weights_of(hidden)
        w = w.reshape(w.shape[0], -1, x.shape[2]).contiguous()
        # With frozen radial weights (molecular dynamics), an interaction before the last keeps
        # its network's last activation for the backward, not the weights (4x its size at 64
        # channels): the backward runs the last interaction first, which would otherwise find
        # every earlier interaction's weights still held (the step's memory peak).
        recompute = not plan.last and torch.is_grad_enabled() and not any(
            t.requires_grad for t in _RadialMLP.weights(self.conv_tp_weights))
        with _saved_as_activation(w, hidden, weights_of) if recompute else nullcontext():
            message = _eq.tp_conv(x.contiguous(), y.contiguous(), w, *graph.structure,
                                  *(t.to(x.device) for t in row_args), *coupling, backend)
        del w
    out = plan.linear(self.linear.weight, _split_rows(message, plan.irreps_mid))
    if not plan.residual:
        out = plan.skip(self.skip_tp.weight, out, elements)
    stacked = out[0] if len(out) == 1 else torch.cat(out, 1)  # [N, D, C]
    return stacked.transpose(1, 2), sc  # mace's [N, C, D]


class _Activation:
    """A saved tensor kept as the activation it is recomputed from (see below)."""

    def __init__(self, hidden: Tensor):
        self.hidden = hidden


def _saved_as_activation(w: Tensor, hidden: Tensor, weights_of: Callable[[Tensor], Tensor]):
    """Saved-tensor hooks for one convolution: the weights ``w`` it saves for its backward are
    kept as the radial network's last activation and recomputed (one GEMM) when the backward
    reads them; autograd gives the recomputed tensor the original's history, so every order
    of derivative is unchanged. Weights are matched by identity (a weak reference: the hooks
    must not keep them alive)."""
    target, shape = weakref.ref(w), w.shape

    def pack(t: Tensor):
        return _Activation(hidden) if t is target() else t

    def unpack(saved):
        if not isinstance(saved, _Activation):
            return saved
        with torch.no_grad():
            return weights_of(saved.hidden).reshape(shape)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class _FastInteraction(_blocks.RealAgnosticInteractionBlock):
    forward = _interaction_forward  # type: ignore[assignment]  # returns mace's (message, sc)


class _FastResidualInteraction(_blocks.RealAgnosticResidualInteractionBlock):
    forward = _interaction_forward  # type: ignore[assignment]


@dataclass
class _InteractionPlan:
    residual: bool
    last: bool  # the model's last interaction (its backward runs first)
    skip: _ElementLinear
    up: _Linear
    radial: _RadialWeights
    coupling: _Cast
    irreps_mid: o3.Irreps
    linear: _Linear


class _FastProduct(_blocks.EquivariantProductBasisBlock):
    def forward(self, node_feats: Tensor, sc: Tensor | None, node_attrs: Tensor) -> Tensor:
        plan = cast(_ProductPlan, self._fastff)
        shared = cast(_Shared, self._fastff_shared)
        x = node_feats.transpose(1, 2).contiguous()  # mace's [N, C, D] -> [N, D, C]
        elements = shared.elements(node_attrs, agnostic=plan.agnostic)
        backend = _backend(shared, "symmetric_contraction", x.device)
        blocks = []
        for contraction, module in zip(plan.contractions,
                                       self.symmetric_contractions.contractions, strict=True):
            blocks.append(_eq.symmetric_contraction(
                x, elements.index, contraction.weights(module, x),
                contraction.constants.get("tuples", x), backend))
        out = _join_flat(plan.linear(self.linear.weight, blocks))
        if self.use_sc and sc is not None:
            return out + sc
        return out


@dataclass
class _ProductPlan:
    contractions: list[_Contraction]
    linear: _Linear
    agnostic: bool


class _FastLinearReadout(_blocks.LinearReadoutBlock):
    def forward(self, x: Tensor, heads: Tensor | None = None) -> Tensor:
        return _join_flat(self._fastff.linear(self.linear.weight,
                                              _split_flat(x, self.linear.irreps_in)))


class _FastNonLinearReadout(_blocks.NonLinearReadoutBlock):
    def forward(self, x: Tensor, heads: Tensor | None = None) -> Tensor:
        plan = self._fastff
        h = _join_flat(plan.linear_1(self.linear_1.weight, _split_flat(x, self.linear_1.irreps_in)))
        h = self.non_linearity(h)
        return _join_flat(plan.linear_2(self.linear_2.weight,
                                        _split_flat(h, self.linear_2.irreps_in)))


@dataclass
class _ReadoutPlan:
    linear: _Linear | None = None
    linear_1: _Linear | None = None
    linear_2: _Linear | None = None


_SWAPS = {
    o3.SphericalHarmonics: _FastSphericalHarmonics,
    _blocks.RadialEmbeddingBlock: _FastRadialEmbedding,
    _blocks.RealAgnosticInteractionBlock: _FastInteraction,
    _blocks.RealAgnosticResidualInteractionBlock: _FastResidualInteraction,
    _blocks.EquivariantProductBasisBlock: _FastProduct,
    _blocks.LinearReadoutBlock: _FastLinearReadout,
    _blocks.NonLinearReadoutBlock: _FastNonLinearReadout,
}
_ORIGINAL = {fast: original for original, fast in _SWAPS.items()}


# ---------------------------------------------------------------- validation and plans
def _check_model(model) -> None:
    if not isinstance(model, _models.MACE):
        _refuse("model", type(model).__name__, "mace.modules.MACE and ScaleShiftMACE")
    for option, bad in (("lammps_mliap", bool(getattr(model, "lammps_mliap", False))),
                        ("pair_repulsion", hasattr(model, "pair_repulsion")),
                        ("embedding_specs", hasattr(model, "joint_embedding")),
                        ("use_so3", bool(getattr(model, "use_so3", False))),
                        ("edge_irreps", getattr(model, "edge_irreps", None) is not None)):
        if bad:
            _refuse(option, True if option != "edge_irreps" else str(model.edge_irreps),
                    "mace's defaults for this option")
    heads = getattr(model, "heads", ["Default"])
    if len(heads) != 1:
        _refuse("heads", heads, "a single head")
    radial = model.radial_embedding
    if not isinstance(radial.bessel_fn, (BesselBasis, GaussianBasis)):
        _refuse("radial_type", type(radial.bessel_fn).__name__, "'bessel' and 'gaussian'")
    if hasattr(radial, "distance_transform"):
        _refuse("distance_transform", type(radial.distance_transform).__name__, "'None'")
    sh = model.spherical_harmonics
    if type(sh) not in (o3.SphericalHarmonics, _FastSphericalHarmonics) or not sh.normalize \
            or sh.normalization != "component" or not sh._is_range_lmax:
        _refuse("spherical_harmonics", repr(sh), "normalize=True, 'component', l = 0..max_ell")
    if sh._lmax > _MAX_ELL:
        _refuse("max_ell", sh._lmax, f"max_ell <= {_MAX_ELL}")


def _check_config(block, name: str) -> None:
    for attr in ("cueq_config", "oeq_config"):
        config = getattr(block, attr, None)
        if config is not None and getattr(config, "enabled", True):
            _refuse(f"{name}.{attr}", "enabled", "e3nn modules (no cuequivariance / "
                    "openequivariance)")
    if hasattr(block, "conv_fusion"):
        _refuse(f"{name}.conv_fusion", True, "False")


def _uniform_mul(irreps: o3.Irreps, name: str) -> int:
    muls = {mul for mul, _ in irreps}
    if len(muls) != 1:
        _refuse(name, str(irreps), "one multiplicity for every irrep")
    return muls.pop()


def _interaction_plan(block, name: str, knots: int, last: bool) -> _InteractionPlan:
    _check_config(block, name)
    if block.node_feats_irreps.lmax > _MAX_HIDDEN_L:
        _refuse("hidden_irreps", str(block.node_feats_irreps), f"l <= {_MAX_HIDDEN_L}")
    if not isinstance(block.conv_tp, o3.TensorProduct):
        _refuse(f"{name}.conv_tp", type(block.conv_tp).__name__, "e3nn TensorProduct")
    channels = _uniform_mul(block.linear_up.irreps_out, f"{name}.linear_up irreps")
    _uniform_mul(block.conv_tp.irreps_out, f"{name}.conv_tp irreps")
    _uniform_mul(block.linear.irreps_out, f"{name}.target irreps")
    return _InteractionPlan(
        residual=isinstance(block, _blocks.RealAgnosticResidualInteractionBlock), last=last,
        skip=_ElementLinear(block.skip_tp), up=_Linear(block.linear_up),
        radial=_RadialWeights(block.conv_tp_weights, knots),
        coupling=_coupling(block.conv_tp, channels, float(block.avg_num_neighbors)),
        irreps_mid=block.conv_tp.irreps_out, linear=_Linear(block.linear))


def _product_plan(block, name: str) -> _ProductPlan:
    _check_config(block, name)
    sc = block.symmetric_contractions
    if not isinstance(sc, SymmetricContraction):
        _refuse(f"{name}.symmetric_contractions", type(sc).__name__,
                "mace's SymmetricContraction")
    dim = sc.irreps_in.dim // _uniform_mul(sc.irreps_in, f"{name} input irreps")
    contractions = []
    for (_, ir), contraction in zip(sc.irreps_out, sc.contractions, strict=True):
        if contraction.correlation > _MAX_CORRELATION:
            _refuse("correlation", contraction.correlation, f"correlation <= {_MAX_CORRELATION}")
        contractions.append(_Contraction(contraction, dim, ir.dim))
    return _ProductPlan(contractions, _Linear(block.linear),
                        bool(getattr(block, "use_agnostic_product", False)))


def _readout_plan(block, name: str) -> _ReadoutPlan:
    if type(block) in (_blocks.LinearReadoutBlock, _FastLinearReadout):
        return _ReadoutPlan(linear=_Linear(block.linear))
    if type(block) in (_blocks.NonLinearReadoutBlock, _FastNonLinearReadout):
        return _ReadoutPlan(linear_1=_Linear(block.linear_1), linear_2=_Linear(block.linear_2))
    _refuse(name, type(block).__name__, "LinearReadoutBlock and NonLinearReadoutBlock")
    raise AssertionError  # unreachable: _refuse raises


def _swap(block, plan, shared: _Shared, name: str) -> None:
    original = _ORIGINAL.get(type(block), type(block))
    if original not in _SWAPS:
        _refuse(name, original.__name__,
                ", ".join(sorted(c.__name__ for c in _SWAPS if c is not o3.SphericalHarmonics)))
    block.__class__ = _SWAPS[original]
    block._fastff = plan
    block._fastff_shared = shared


def accelerate(model, *, backend: str | None = None, tabulate: bool = False,
               knots: int = _KNOTS):
    """Serve a mace-torch model's spherical harmonics, interactions, products and readouts with
    fastff's kernels, in place.

    Args:
        model: a ``mace.modules.MACE`` or ``ScaleShiftMACE`` (any dtype / device). Supported:
            hidden irreps with l <= 1 (one multiplicity), max_ell <= 3, correlation <= 3,
            ``RealAgnosticInteractionBlock`` and ``RealAgnosticResidualInteractionBlock``,
            Bessel and Gaussian radial bases with mace's polynomial cutoff (applied or not),
            ``LinearReadoutBlock`` / ``NonLinearReadoutBlock``, one head. Anything else raises
            ``UnsupportedMACEError`` naming the option, before the model is changed.
        backend: "numba", "triton", "reference" or None (``FASTFF_BACKEND``, then by device),
            resolved at each call; ``set_backend`` changes it later.
        tabulate: read each interaction's radial weights w(r) from a cubic table of ``knots``
            points (built in float64 from the current weights, rebuilt when they change) instead
            of evaluating its network per edge, whenever no gradient of a radial weight can be
            wanted (frozen weights, as in mace's MACECalculator, or no grad mode); training
            runs the exact network. Differs from the exact model by the interpolation error
            (README.md beside the kernels).
        knots: knots of that table over [0, r_max].

    Returns:
        ``model`` itself: same parameters (state_dict keys, optimizers and checkpoints are
        unchanged), forward computed by the kernels. Deterministic on CPU. ``restore(model)``
        brings back mace's own forward.
    """
    _check_model(model)
    if knots < 4:
        raise ValueError(f"knots must be at least 4, got {knots}")
    plans: list[tuple[Any, Any, str]] = [
        (model.spherical_harmonics, None, "spherical_harmonics"),
             (model.radial_embedding, None, "radial_embedding")]
    for k, block in enumerate(model.interactions):
        last = k == len(model.interactions) - 1
        plans.append((block, _interaction_plan(block, f"interactions.{k}", knots, last),
                      f"interactions.{k}"))
    for k, block in enumerate(model.products):
        plans.append((block, _product_plan(block, f"products.{k}"), f"products.{k}"))
    for k, block in enumerate(model.readouts):
        plans.append((block, _readout_plan(block, f"readouts.{k}"), f"readouts.{k}"))
    for block, _, name in plans:  # refuse before anything changes
        if _ORIGINAL.get(type(block), type(block)) not in _SWAPS:
            _refuse(name, type(block).__name__,
                    ", ".join(sorted(c.__name__ for c in _SWAPS
                                     if c is not o3.SphericalHarmonics)))
    shared = _Shared(radial=model.radial_embedding, backend=backend, tabulate=bool(tabulate))
    for block, plan, name in plans:
        _swap(block, plan, shared, name)
    model._fastff_shared = shared
    return model


def set_backend(model, backend: str | None) -> None:
    """Change the backend of an accelerated model (None: ``FASTFF_BACKEND``, then by device)."""
    if not is_accelerated(model):
        raise ValueError("set_backend: the model is not accelerated (call accelerate first)")
    if backend not in (None, "auto", *registry.BACKENDS):
        raise ValueError(f"backend={backend!r} is not a fastff backend; expected one of "
                         f"{', '.join(registry.BACKENDS)}, 'auto' or None")
    model._fastff_shared.backend = backend


def is_accelerated(model) -> bool:
    """Whether ``accelerate`` serves this model."""
    return getattr(model, "_fastff_shared", None) is not None


def restore(model):
    """Undo ``accelerate``: mace's own forward again (same parameters). Returns ``model``."""
    for module in model.modules():
        original = _ORIGINAL.get(type(module))
        if original is not None:
            module.__class__ = original
            for attr in ("_fastff", "_fastff_shared"):
                module.__dict__.pop(attr, None)
    model.__dict__.pop("_fastff_shared", None)
    return model


# ---------------------------------------------------------------- plain-tensor calls
def model_inputs(model, positions: Tensor, atomic_numbers: Tensor, edge_index: Tensor,
                 unit_shifts: Tensor | None = None, cell: Tensor | None = None,
                 batch: Tensor | None = None) -> dict[str, Tensor]:
    """mace's input dict from plain tensors (what ``model(data, ...)`` reads).

    Args:
        model: a mace model (its ``atomic_numbers`` buffer maps elements to one-hot columns).
        positions: [N, 3] (Angstrom, mace's unit), the model's dtype.
        atomic_numbers: int [N].
        edge_index: int64 [2, E], row 0 the sender i, row 1 the receiver j of each edge, with
            r_ij = positions[j] - positions[i] + unit_shifts @ cell (fastff's NeighborList
            gives ``nl.i, nl.j, nl.shifts``; mace sums messages of senders into receivers).
        unit_shifts: [E, 3] integer cell shifts (zeros when None).
        cell: [3, 3] or [B, 3, 3] lattice vectors as rows (zeros when None).
        batch: int64 [N] system of each atom, sorted (one system when None).
    """
    dtype, device = positions.dtype, positions.device
    n = positions.shape[0]
    batch = torch.zeros(n, dtype=torch.int64, device=device) if batch is None else batch.long()
    num_graphs = int(batch.max()) + 1 if n else 1
    table = model.atomic_numbers.to(device)
    lookup = torch.full((int(table.max()) + 1,), -1, dtype=torch.int64, device=device)
    lookup[table] = torch.arange(table.numel(), device=device)
    z = atomic_numbers.to(device).long()
    if z.numel() and (int(z.min()) < 0 or int(z.max()) >= lookup.numel()
                      or bool((lookup[z] < 0).any())):
        raise ValueError(f"atomic_numbers hold elements the model does not know (it knows "
                         f"{table.tolist()})")
    node_attrs = torch.nn.functional.one_hot(lookup[z], table.numel()).to(dtype)
    cells = torch.zeros(num_graphs, 3, 3, dtype=dtype, device=device) if cell is None else \
        cell.to(dtype).reshape(-1, 3, 3).expand(num_graphs, 3, 3)
    edge_index = edge_index.to(device).long()
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must be [2, E], got {list(edge_index.shape)}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
        raise ValueError(f"edge_index holds atom indices outside [0, {n}) for {n} atoms")
    unit = torch.zeros(edge_index.shape[1], 3, dtype=dtype, device=device) \
        if unit_shifts is None else unit_shifts.to(device=device, dtype=dtype)
    shifts = torch.einsum("ek,ekc->ec", unit, cells[batch[edge_index[0]]])
    counts = torch.bincount(batch, minlength=num_graphs)
    ptr = torch.zeros(num_graphs + 1, dtype=torch.int64, device=device)
    ptr[1:] = torch.cumsum(counts, 0)
    return {"positions": positions, "node_attrs": node_attrs, "edge_index": edge_index,
            "shifts": shifts, "unit_shifts": unit, "cell": cells.reshape(-1, 3),
            "batch": batch, "ptr": ptr,
            "head": torch.zeros(num_graphs, dtype=torch.int64, device=device)}


def evaluate(model, positions: Tensor, atomic_numbers: Tensor, edge_index: Tensor,
             unit_shifts: Tensor | None = None, cell: Tensor | None = None,
             batch: Tensor | None = None, *, compute_force: bool = True,
             compute_stress: bool = False, training: bool = False) -> dict:
    """``model(model_inputs(...), ...)``: mace's output dict (energy [B], forces [N, 3],
    stress [B, 3, 3], node_energy [N], ...) in mace's units (eV, Angstrom) for plain tensors;
    see ``model_inputs`` for the arguments."""
    data = model_inputs(model, positions, atomic_numbers, edge_index, unit_shifts, cell, batch)
    return model(data, training=training, compute_force=compute_force,
                 compute_stress=compute_stress)
