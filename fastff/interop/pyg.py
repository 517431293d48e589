"""torch_geometric's SchNet on fastff kernels: ``accelerate`` (the user's own model object) and
``from_pyg`` (its weights in a :class:`fastff.models.SchNet`).

torch_geometric's interaction block is ``lin(ssp(lin2(sum_j lin1(h)_j W(r_ij))))`` with the
filter ``W = mlp(gaussians(r)) * 0.5 (cos(pi r / cutoff) + 1)``: that sum is
:class:`fastff.nn.CFConv` with a gaussian basis (centres ``k cutoff / (K - 1)``, width the
spacing) and a cosine envelope. ``accelerate`` runs it with each block's own ``mlp`` Linear
modules as the CFConv's filter network, fused (one filter per unordered pair, none kept in
memory), and leaves embedding, ``lin1``/``lin2``/``lin`` and the readout to torch_geometric's
code: parameters, ``state_dict`` keys, optimizers and ``model(z, pos, batch)`` stay as they
were. ``from_pyg`` copies the weights into a fastff model instead, which then runs wherever
fastff's models do (periodic cells, ASE, OpenMM, compile, export). Maths:
kernels/message/README.md.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch_geometric.nn.aggr import MeanAggregation, SumAggregation
from torch_geometric.nn.models import schnet as _pyg

from fastff import _checks, models
from fastff import nn as fnn
from fastff import units as _units
from fastff.kernels._runtime import registry
from fastff.neighbors import NeighborList, neighbor_list

__all__ = ["AcceleratedSchNet", "ConvertedSchNet", "Layout", "accelerate", "from_pyg", "layout",
           "restore"]

# torch_geometric builds its gaussian centres (linspace), width (from the first spacing) and
# log 2 (ShiftedSoftplus) in the default dtype at construction. Built under float64 they agree
# with fastff's exact values to rounding (< 1e-13 relative, a few ulp); built under float32
# (torch's default) they carry float32 rounding (~1e-7): then float64 results differ from the
# unmodified model by ~1e-7 relative, float32 ones not measurably. More is not this grid.
_ROUNDING_FLOAT64 = 1e-13
_ROUNDING_FLOAT32 = 1e-6


@dataclass(frozen=True)
class Layout:
    """What a torch_geometric SchNet is made of, as checked by :func:`layout`.

    Attributes:
        hidden: hidden_channels.
        filters: num_filters of each interaction block.
        num_gaussians: K.
        cutoff: the cutoff of the filters and of the gaussian grid.
        constants_error: largest relative deviation of the model's gaussian centres, width and
            log 2 from their exact values (see ``_ROUNDING_FLOAT32``).
    """

    hidden: int
    filters: tuple[int, ...]
    num_gaussians: int
    cutoff: float
    constants_error: float


def layout(model) -> Layout:
    """Check that ``model`` is a torch_geometric SchNet fastff can serve; raise naming the
    option or module that it cannot."""
    if not isinstance(model, _pyg.SchNet):
        raise TypeError(f"model must be a torch_geometric.nn.models.SchNet, got "
                        f"{type(model).__module__}.{type(model).__name__}")
    if type(model) not in (_pyg.SchNet, AcceleratedSchNet):
        raise TypeError(f"{type(model).__name__} subclasses torch_geometric's SchNet; fastff "
                        "serves SchNet itself (a subclass may change what forward computes)")
    expansion = model.distance_expansion
    if type(expansion) is not _pyg.GaussianSmearing:
        raise ValueError(f"model.distance_expansion must be torch_geometric's GaussianSmearing, "
                         f"got {type(expansion).__name__}")
    k = int(expansion.offset.numel())
    cutoff = float(model.cutoff)
    hidden = model.embedding.embedding_dim
    filters, errors = [], []
    for n, block in enumerate(model.interactions):
        filters.append(_check_block(block, f"model.interactions[{n}]", hidden, k, cutoff))
        errors.append(abs(block.mlp[1].shift - math.log(2.0)) / math.log(2.0))
    errors += _grid_errors(expansion, k, cutoff)
    return Layout(hidden, tuple(filters), k, cutoff, max(errors))


def _check_block(block, where: str, hidden: int, k: int, cutoff: float) -> int:
    """num_filters of one interaction block, after checking it is torch_geometric's own."""
    if type(block) is not _pyg.InteractionBlock:
        raise ValueError(f"{where} must be torch_geometric's InteractionBlock, got "
                         f"{type(block).__name__}")
    mlp, conv = block.mlp, block.conv
    if type(conv) is not _pyg.CFConv:
        raise ValueError(f"{where}.conv must be torch_geometric's CFConv, got "
                         f"{type(conv).__name__}")
    if not (isinstance(mlp, nn.Sequential) and len(mlp) == 3 and type(mlp[0]) is nn.Linear
            and type(mlp[1]) is _pyg.ShiftedSoftplus and type(mlp[2]) is nn.Linear
            and mlp[0].bias is not None and mlp[2].bias is not None and conv.nn is mlp):
        raise ValueError(f"{where}.mlp must be torch_geometric's filter network Sequential("
                         f"Linear(num_gaussians, num_filters), ShiftedSoftplus(), "
                         f"Linear(num_filters, num_filters)), used as {where}.conv.nn")
    f = mlp[0].out_features
    if mlp[0].in_features != k or (mlp[2].in_features, mlp[2].out_features) != (f, f):
        raise ValueError(f"{where}.mlp maps {mlp[0].in_features} -> {mlp[2].out_features} but "
                         f"the model has num_gaussians={k} and num_filters={f}")
    lin1, lin2 = conv.lin1, conv.lin2
    if (lin1.in_features, lin1.out_features, lin2.in_features, lin2.out_features) != (
            hidden, f, f, hidden) or lin1.bias is not None:
        raise ValueError(f"{where}.conv.lin1/lin2 must map hidden_channels={hidden} -> "
                         f"num_filters={f} (no bias) -> {hidden}")
    if conv.aggr != "add" or conv.flow != "source_to_target":
        raise ValueError(f"{where}.conv must sum messages (aggr='add', flow='source_to_target'),"
                         f" got aggr={conv.aggr!r}, flow={conv.flow!r}")
    if float(conv.cutoff) != cutoff:
        raise ValueError(f"{where}.conv.cutoff = {conv.cutoff} differs from model.cutoff = "
                         f"{cutoff}: fastff's gaussian grid and envelope share one cutoff")
    return f


def _grid_errors(expansion, k: int, cutoff: float) -> list[float]:
    """Relative deviations of the centres and width from fastff's exact grid; raises beyond
    float32 rounding (a grid fastff's basis does not have)."""
    if k < 2:
        raise ValueError(f"num_gaussians must be >= 2 (the width is the grid spacing), got {k}")
    delta = cutoff / (k - 1)
    exact = torch.arange(k, dtype=torch.float64) * delta
    centres = float((expansion.offset.detach().double().cpu() - exact).abs().max()) / cutoff
    width = abs(expansion.coeff * 2.0 * delta * delta + 1.0)  # coeff = -0.5 / delta^2
    if centres > _ROUNDING_FLOAT32:
        raise ValueError(f"model.distance_expansion.offset is not the grid 0..cutoff of "
                         f"num_gaussians={k} centres (deviates by {centres * cutoff:.3g}); "
                         "fastff's gaussian basis has centres k * cutoff / (K - 1)")
    if width > _ROUNDING_FLOAT32:
        raise ValueError(f"model.distance_expansion.coeff = {expansion.coeff} is not "
                         f"-0.5 / spacing^2 = {-0.5 / delta**2} of the grid")
    return [centres, width]


# --------------------------------------------------------------------------------- accelerate

class _Served:
    """What ``accelerate`` keeps on a model (a plain attribute, outside the module tree, so the
    state_dict is unchanged): one :class:`fastff.nn.CFConv` per interaction block, whose filter
    network IS the block's ``mlp`` Linear modules, and the pairs of the last edge list."""

    def __init__(self, tabulate: bool, num_points: int, backend: str | None):
        self.tabulate, self.num_points, self.backend = tabulate, num_points, backend
        self.convs: list[fnn.CFConv] = []
        self._offset: tuple | None = None  # (weakref to distance_expansion.offset, _version)
        self._dtype: torch.dtype | None = None
        self._edges: tuple | None = None  # (weakref to edge_index, _version, N, nl, order)

    # pickling and deepcopy keep the settings; the rest is rebuilt on the next call
    def __getstate__(self):
        return {"tabulate": self.tabulate, "num_points": self.num_points,
                "backend": self.backend}

    def __setstate__(self, state):
        self.__init__(**state)

    def current(self, model) -> bool:
        """True while the convs serve the model as it is now."""
        blocks = model.interactions
        if len(self.convs) != len(blocks) or self._offset is None:
            return False
        offset = model.distance_expansion.offset
        if self._offset[0]() is not offset or self._offset[1] != offset._version:
            return False
        if model.embedding.weight.dtype != self._dtype:
            return False
        return all(c.filter.dense1 is b.mlp[0] and c.filter.dense2 is b.mlp[2]
                   and b.conv.nn is b.mlp and c.cutoff == b.conv.cutoff == model.cutoff
                   for c, b in zip(self.convs, blocks, strict=True))

    def build(self, model) -> None:
        shape = layout(model)
        dtype = model.embedding.weight.dtype
        convs = []
        for block, f in zip(model.interactions, shape.filters, strict=True):
            conv = fnn.CFConv(f, shape.num_gaussians, shape.cutoff, kind="gaussian",
                              envelope="cosine", activation="shifted_softplus",
                              tabulate=self.tabulate, num_points=self.num_points,
                              backend=self.backend)
            conv.filter.dense1, conv.filter.dense2 = block.mlp[0], block.mlp[2]
            convs.append(conv)
        if dtype == torch.float64 and shape.constants_error > _ROUNDING_FLOAT64:
            warnings.warn(
                f"fastff: this torch_geometric SchNet was built with float32 defaults: its "
                f"gaussian centres, width and log 2 carry float32 rounding (up to "
                f"{shape.constants_error:.1e} relative), which fastff computes exactly, so its "
                "float64 energies and forces differ from the unmodified model's by about 1e-7 "
                "to 1e-6 relative. Build it under torch.set_default_dtype(torch.float64) for "
                "float64 agreement.", stacklevel=4)
        self.convs = convs
        offset = model.distance_expansion.offset
        self._offset = (weakref.ref(offset), offset._version)
        self._dtype = dtype

    def pairs(self, model, pos: Tensor, batch: Tensor | None
              ) -> tuple[NeighborList, Tensor | None]:
        """The neighbor list and, unless a tabulated filter computes them itself, the distances
        [E] the convolutions read."""
        graph = model.interaction_graph
        if type(graph) is _pyg.RadiusInteractionGraph:
            return self._radius_pairs(model, graph, pos, batch)
        edge_index, edge_weight = graph(pos, torch.zeros_like(pos[:, 0], dtype=torch.int64)
                                        if batch is None else batch)
        nl, order = self._edge_pairs(edge_index, pos, model.cutoff)
        if not isinstance(edge_weight, Tensor) or edge_weight.shape != (len(nl),):
            raise ValueError(f"interaction_graph returned edge_weight of shape "
                             f"{list(getattr(edge_weight, 'shape', []))}; expected [{len(nl)}],"
                             " one distance per edge")
        _checks.same_float_dtype("edge_weight", edge_weight, "pos", pos)
        if _checks.checks_enabled() and len(nl):
            longest = float(edge_weight.detach().max())
            if longest > model.cutoff:
                raise ValueError(
                    f"interaction_graph returned an edge of length {longest:.6g} > cutoff "
                    f"{model.cutoff}: torch_geometric weighs it by 0.5 (cos(pi d / cutoff) + 1),"
                    " which does not vanish beyond the cutoff, fastff's cosine envelope does; "
                    "return the pairs within the cutoff only")
        return nl, (edge_weight if order is None else edge_weight[order])

    def _radius_pairs(self, model, graph, pos: Tensor, batch: Tensor | None):
        # torch_geometric's default graph (pyg-lib's radius) without periodic images: the same
        # pairs from fastff's cell list
        if float(graph.cutoff) != model.cutoff:
            raise ValueError(f"model.interaction_graph.cutoff = {graph.cutoff} differs from "
                             f"model.cutoff = {model.cutoff}; fastff needs them equal")
        nl = neighbor_list(pos, graph.cutoff, batch=batch, backend=self.backend)
        cap = graph.max_num_neighbors
        if cap is not None and _checks.checks_enabled() and len(nl):
            most = int((nl.ptr[1:] - nl.ptr[:-1]).max())
            if most > cap:
                raise ValueError(
                    f"an atom has {most} neighbours within the cutoff but "
                    f"model.interaction_graph.max_num_neighbors is {cap}: torch_geometric's "
                    f"radius_graph would drop some of them (which ones depends on its "
                    f"backend), fastff keeps all; set max_num_neighbors >= {most} (or None)")
        return nl, None if self.tabulate else nl.distances(pos)

    def _edge_pairs(self, edge_index, pos: Tensor, cutoff: float
                    ) -> tuple[NeighborList, Tensor | None]:
        """A full NeighborList of a [2, E] edge list (row 0 source j, row 1 target i), kept
        while the same unchanged edge_index comes back, and the order that sorts it by i."""
        n = pos.shape[0]
        kept = self._edges
        if (kept is not None and kept[0]() is edge_index and kept[1] == edge_index._version
                and kept[2] == n):
            return kept[3], kept[4]
        if not isinstance(edge_index, Tensor) or edge_index.dtype != torch.int64 or (
                edge_index.dim() != 2 or edge_index.shape[0] != 2):
            raise ValueError(f"interaction_graph must return edge_index as an int64 [2, E] "
                             f"tensor, got {getattr(edge_index, 'dtype', type(edge_index))} "
                             f"{list(getattr(edge_index, 'shape', []))}")
        _checks.same_device("edge_index", edge_index, "pos", pos)
        nl, order = _full_list(edge_index, n, cutoff, pos, self.backend)
        self._edges = (weakref.ref(edge_index), edge_index._version, n, nl, order)
        return nl, order


def _full_list(edge_index: Tensor, n: int, cutoff: float, pos: Tensor,
               backend: str | None) -> tuple[NeighborList, Tensor | None]:
    """The list of an edge list without cell shifts: sorted by target, mirrors checked."""
    src, dst = edge_index[0], edge_index[1]
    e = int(src.shape[0])
    if e:
        _checks.index_range(edge_index, "interaction_graph's edge_index", n, "atoms of pos")
        loops = (src == dst).nonzero()
        if loops.numel():
            a = int(src[loops[0, 0]])
            raise ValueError(f"interaction_graph returned {loops.shape[0]} self-loops (e.g. "
                             f"atom {a} to itself); SchNet's pairs join distinct atoms")
    order: Tensor | None = None  # already sorted by target: fastff's lists, most graphs
    if e > 1 and not bool((dst[1:] >= dst[:-1]).all()):
        order = torch.argsort(dst, stable=True)
    i = dst if order is None else dst[order]
    j = src if order is None else src[order]
    reverse_backend = registry.resolve("neighbor_reverse", i.device, backend)[0]
    if e and reverse_backend != "numba":
        _no_repeated_edges(i, j, n)
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=i.device)
    ptr[1:] = torch.cumsum(torch.bincount(i, minlength=n), 0)
    nl = NeighborList(i.contiguous(), j.contiguous(),
                      torch.zeros(e, 3, dtype=torch.int32, device=i.device), ptr,
                      cutoff=cutoff, half=False, num_atoms=n, batch=None,
                      cells=torch.zeros(1, 3, 3, dtype=pos.dtype, device=i.device),
                      pbc=torch.zeros(1, 3, dtype=torch.bool, device=i.device), cell=None,
                      backend=reverse_backend)
    reverse = nl.reverse
    # numba's mirror search takes the first match, so a repeated edge leaves a mirror without a
    # partner or makes the mirror map a non-involution: one gather tests both, and the sort that
    # names a repeat runs only then (the other backends pair repeats up: sorted above).
    mirrored = reverse >= 0
    if e and not bool((mirrored & (reverse[reverse.clamp(min=0)] ==
                                   torch.arange(e, device=i.device))).all()):
        _no_repeated_edges(i, j, n)
        lonely = (~mirrored).nonzero()
        k = int(lonely[0, 0])
        raise ValueError(
            f"interaction_graph returned {lonely.shape[0]} edges without their mirror (e.g. "
            f"{int(j[k])} -> {int(i[k])} but not {int(i[k])} -> {int(j[k])}); fastff computes "
            "each pair's filter once for both directions and needs a symmetric graph (a radius "
            "graph truncated by max_num_neighbors is not)")
    nl.symmetric = True
    return nl, order


def _no_repeated_edges(i: Tensor, j: Tensor, n: int) -> None:
    keys = torch.sort(i * n + j).values
    repeated = (keys[1:] == keys[:-1]).nonzero()
    if repeated.numel():
        key = int(keys[repeated[0, 0]])
        raise ValueError(
            f"interaction_graph returned {repeated.shape[0]} repeated edges (e.g. "
            f"{key % n} -> {key // n}), as periodic images of one pair in a small cell are: "
            "without cell shifts fastff cannot tell their mirrors apart; use a cell wider than "
            "twice the cutoff, or fastff.models.SchNet.from_pyg for small cells")


def _readout(model, h: Tensor, z: Tensor, pos: Tensor, batch: Tensor) -> Tensor:
    """torch_geometric SchNet's readout, as its forward computes it."""
    h = model.lin2(model.act(model.lin1(h)))
    if model.dipole:
        mass = model.atomic_mass[z].view(-1, 1)
        total = model.sum_aggr(mass, batch, dim=0)
        centre = model.sum_aggr(mass * pos, batch, dim=0) / total
        h = h * (pos - centre.index_select(0, batch))
    if not model.dipole and model.mean is not None and model.std is not None:
        h = h * model.std + model.mean
    if not model.dipole and model.atomref is not None:
        h = h + model.atomref(z)
    out = model.readout(h, batch, dim=0)
    if model.dipole:
        out = torch.norm(out, dim=-1, keepdim=True)
    if model.scale is not None:
        out = model.scale * out
    return out


class AcceleratedSchNet(_pyg.SchNet):
    """torch_geometric's SchNet whose interaction blocks run on fastff kernels.

    What :func:`accelerate` turns a ``torch_geometric.nn.models.SchNet`` into (in place), or
    built directly with SchNet's arguments plus ``tabulate``, ``num_points`` and ``backend``
    (as for :func:`accelerate`). Same parameters, state_dict, options and call as SchNet:
    ``model(z, pos, batch=None)`` -> [B, 1].
    """

    def __init__(self, *args, tabulate: bool = False, num_points: int = 1000,
                 backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        _serve(self, tabulate, num_points, backend)

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor | None = None) -> Tensor:
        served: _Served = self.__dict__["_fastff"]
        if not served.current(self):
            served.build(self)
        nl, d = served.pairs(self, pos, batch)
        batch = torch.zeros_like(z) if batch is None else batch
        h = self.embedding(z)
        for block, conv in zip(self.interactions, served.convs, strict=True):
            x = conv(block.conv.lin1(h), pos, nl, distances=d)
            h = h + block.lin(block.act(block.conv.lin2(x)))
        return _readout(self, h, z, pos, batch)


def _serve(model, tabulate: bool, num_points: int, backend: str | None) -> None:
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an int >= 2, got {num_points!r}")
    served = _Served(bool(tabulate), num_points, backend)
    served.build(model)
    model.__dict__["_fastff"] = served
    if served.tabulate:
        worst = max((c.table().max_rel_error for c in served.convs), default=0.0)
        warnings.warn(f"fastff: accelerate(tabulate=True): the filter networks are read from "
                      f"cubic tables of {num_points} knots, for inference (their parameters get "
                      f"no gradient); table error <= {worst:.1e} of max|W|", stacklevel=3)


def accelerate(model, *, tabulate: bool = False, num_points: int = 1000,
               backend: str | None = None):
    """Serve a ``torch_geometric.nn.models.SchNet`` with fastff kernels, in place.

    The model becomes an :class:`AcceleratedSchNet` (a SchNet subclass with another forward):
    its distance expansion, filter networks and convolutions run as one fused
    :class:`fastff.nn.CFConv` per interaction, whose filter network is the block's own ``mlp``
    Linear modules; everything else runs torch_geometric's code. The ``Parameter`` objects,
    ``state_dict()`` keys, an optimizer built on them and ``model(z, pos, batch)`` are
    unchanged; gradients reach every parameter (forces, and force-matching training through
    the second derivative). Every option of SchNet is served: ``readout`` (any aggregation),
    ``mean``/``std``, ``atomref``, ``dipole``, ``scale``, ``num_filters != hidden_channels``,
    and ``interaction_graph``. The default graph (``RadiusInteractionGraph``) is computed by
    :func:`fastff.neighbor_list` at the same cutoff (it raises where torch_geometric's
    ``max_num_neighbors`` would drop neighbours); any other ``interaction_graph`` runs as given
    and must return each pair in both directions, within the cutoff, without repeats.

    Args:
        model: the torch_geometric SchNet (float32 or float64, any device).
        tabulate: read each filter network from a cubic table (``num_points`` knots, rebuilt
            when its parameters change): inference only, the filter parameters get no
            gradient. A warning gives the table's error bound.
        num_points: knots of those tables.
        backend: "numba", "triton", "reference" or None (by device) for fastff's kernels.

    Returns:
        ``model`` itself. Float64 results equal the unmodified model's to ~1e-13 relative when
        it was built under float64 defaults (see the warning otherwise); float32 to ~1e-6.
        :func:`restore` undoes it.
    """
    layout(model)  # every check before anything changes
    model.__class__ = AcceleratedSchNet
    _serve(model, tabulate, num_points, backend)
    return model


def restore(model):
    """Undo :func:`accelerate`: ``model`` runs torch_geometric's own forward again."""
    if not isinstance(model, AcceleratedSchNet):
        raise TypeError(f"model was not accelerated (a {type(model).__name__})")
    model.__class__ = _pyg.SchNet
    del model.__dict__["_fastff"]
    return model


# ----------------------------------------------------------------------------------- from_pyg

class ConvertedSchNet(models.SchNet):
    """A :class:`fastff.models.SchNet` with torch_geometric's per-species reference energies
    (``atomref``, [max_species, 1], in the model's energy unit) and/or its mean readout, which
    fastff's SchNet does not have; made by :func:`from_pyg`."""

    def __init__(self, *args, atomref: Tensor | None = None, mean_readout: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.atomref = None if atomref is None else nn.Embedding.from_pretrained(
            atomref.detach().reshape(-1, 1).clone(), freeze=False)
        self.mean_readout = bool(mean_readout)

    def _run(self, species: Tensor, positions: Tensor, cell: Tensor | None, pbc,
             batch: Tensor | None, nl: NeighborList | None, num_systems: int) -> Tensor:
        # _run, not forward: energy_and_forces and the ASE/OpenMM wrappers enter here too
        energy = super()._run(species, positions, cell, pbc, batch, nl, num_systems)
        index = torch.zeros_like(species) if batch is None else batch
        if self.atomref is not None:
            energy = energy.index_add(0, index, self.atomref(species).squeeze(1))
        if self.mean_readout:
            counts = torch.zeros_like(energy).index_add(0, index, torch.ones_like(positions[:, 0]))
            energy = energy / counts.clamp_min(1)
        return energy


def from_pyg(model, *, energy_unit: str, length_unit: str = "Angstrom", skin: float = 0.0,
             tabulate: bool = False, backend: str | None = None) -> models.SchNet:
    """A :class:`fastff.models.SchNet` with the weights of a torch_geometric SchNet.

    The fastff model computes the same energies (``model(z, pos, batch)`` summed per system)
    from the same weights, on fastff's own neighbor list at the model's cutoff (every pair
    within it, periodic with a cell: what torch_geometric's graph gives where it drops no
    neighbour), so periodic systems, batches, ASE, OpenMM, torch.compile and export work on
    it. ``mean``/``std`` and ``scale`` are folded into the last readout layer; ``atomref`` or
    ``readout="mean"`` give a :class:`ConvertedSchNet`. ``dipole=True`` models (a dipole
    magnitude, not an energy) and other aggregations are rejected.

    Args:
        model: a ``torch_geometric.nn.models.SchNet`` (plain or accelerated).
        energy_unit: the energy unit the model was trained in ("eV", "kcal/mol", "kJ/mol",
            "Hartree", ...): required, torch_geometric models carry none.
        length_unit: the unit of its positions and cutoff (torch_geometric's examples and QM9
            use Angstrom).
        skin: as for :class:`fastff.models.SchNet`.
        tabulate: as for :class:`fastff.models.SchNet`.
        backend: as for :class:`fastff.models.SchNet`.

    Returns:
        The fastff model, in the dtype and on the device of ``model``, with ``length_unit`` and
        ``energy_unit`` set; its parameters are copies.
    """
    shape = layout(model)
    energy_unit = _units.energy_unit(energy_unit)
    length_unit = _units.length_unit(length_unit)
    if model.dipole:
        raise ValueError("dipole=True: the model predicts a dipole magnitude, not an energy; "
                         "from_pyg converts energy models")
    if type(model.readout) not in (SumAggregation, MeanAggregation):
        raise ValueError(f"readout must be 'add' or 'mean' for an energy model, got "
                         f"{type(model.readout).__name__}")
    if not shape.filters:
        raise ValueError("num_interactions must be >= 1 for a fastff SchNet")
    mean_readout = type(model.readout) is MeanAggregation
    atomref = None if model.atomref is None else model.atomref.weight
    ref = model.embedding.weight
    args = (shape.hidden, len(shape.filters), shape.num_gaussians, shape.cutoff)
    kwargs = {"max_species": model.embedding.num_embeddings, "skin": skin, "tabulate": tabulate,
              "backend": backend}
    out = (ConvertedSchNet(*args, atomref=atomref, mean_readout=mean_readout, **kwargs)
           if atomref is not None or mean_readout else models.SchNet(*args, **kwargs))
    with torch.no_grad():
        out.embedding = nn.Embedding.from_pretrained(
            ref.detach().clone(), freeze=False, padding_idx=model.embedding.padding_idx)
        for block, mine, f in zip(model.interactions, out.interactions, shape.filters,
                                  strict=True):
            _copy_block(block, mine, f, shape, tabulate, backend)
        _copy_readout(model, out)
    out.to(device=ref.device, dtype=ref.dtype)
    out.length_unit, out.energy_unit = length_unit, energy_unit
    return out


def _linear(source: nn.Linear) -> nn.Linear:
    copy = nn.Linear(source.in_features, source.out_features, bias=source.bias is not None)
    copy.to(source.weight.dtype).load_state_dict(source.state_dict())
    return copy


def _copy_block(block, mine, f: int, shape: Layout, tabulate: bool, backend) -> None:
    """Weights of one torch_geometric InteractionBlock into a fastff SchNetInteraction (whose
    widths are rebuilt where num_filters != hidden_channels)."""
    conv = fnn.CFConv(f, shape.num_gaussians, shape.cutoff, tabulate=tabulate, backend=backend)
    conv.filter.dense1, conv.filter.dense2 = _linear(block.mlp[0]), _linear(block.mlp[2])
    mine.conv = conv
    mine.in2f = _linear(block.conv.lin1)
    mine.f2out[0][0] = _linear(block.conv.lin2)
    mine.f2out[1] = _linear(block.lin)


def _copy_readout(model, out) -> None:
    """lin1, lin2 of the readout; mean/std and scale folded into lin2 (atomic energies
    scale * (std * y + mean), and scale * atomref)."""
    out.readout[0][0] = _linear(model.lin1)
    last = _linear(model.lin2)
    scale = 1.0 if model.scale is None else float(model.scale)
    std, mean = 1.0, 0.0
    if model.mean is not None and model.std is not None:
        std, mean = float(model.std), float(model.mean)
    last.weight.mul_(scale * std)
    last.bias.mul_(scale * std).add_(scale * mean)
    out.readout[1] = last
    if getattr(out, "atomref", None) is not None:
        out.atomref.weight.mul_(scale)
