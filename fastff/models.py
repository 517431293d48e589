"""Reference MLFF models built only from fastff layers: ``SchNet``, ``PaiNN`` and
``energy_and_forces``.

Both models map (species, positions, cell, pbc, batch) to one energy per system and run every
pair operation through fastff ops, so the same weights run on any backend: ``backend=None``
picks numba on CPU and Triton on CUDA, ``backend="reference"`` is the eager torch baseline, and
``model.set_backend(name)`` switches an existing model.

Units: lengths are those of the cutoff (the defaults, 0.5, suit nm); energies are in whatever
unit the model is trained to; ``length_unit`` and ``energy_unit`` say which (default nm and
kJ/mol), for the MD engine adapters. Forces come from autograd (:func:`energy_and_forces`), so any
order of derivative is available (force matching needs the second).

A model's ``forward`` (and :func:`energy_and_forces`) checks its inputs once (one NaN scan of
the positions, species, batch, cell and list) and runs its layers with the value checks off;
its backend is resolved when built, on ``set_backend`` and on a move to another device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from fastff import _checks
from fastff import nn as fnn
from fastff.kernels.message import dense
from fastff.neighbors import NeighborList, _normalize_batch, neighbor_list
from fastff.verlet import VerletList

__all__ = ["AtomisticModel", "PaiNN", "SchNet", "energy_and_forces"]

# PaiNN's safe norm sqrt(|x|^2 + eps): finite gradients (first and second) at x = 0, as in
# schnetpack; features are O(1), so 1e-8 shifts norms by < 1e-4 even at zero.
NORM_EPS = 1e-8


class ShiftedSoftplus(nn.Module):
    """ssp(x) = softplus(x) - log 2 (SchNet's activation; ssp(0) = 0)."""

    def forward(self, x: Tensor) -> Tensor:
        return dense.activation(x, "shifted_softplus")


def _dense_ssp(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), ShiftedSoftplus())


class AtomisticModel(nn.Module):
    """Shared parts: input checks, the neighbor list (built, reused or given) and the readout.

    Subclasses set ``self.embedding`` and define ``atomic_features(species, positions, nl, cell)``
    returning [N, F]; the readout ``Dense(F, F//2) + ssp, Dense(F//2, 1)`` sums atomic energies
    per system.
    """

    #: envelope of the radial functions; None means contributions do not vanish at the cutoff
    envelope: str | None = "cosine"
    #: Units of positions (and the cutoff) and of energies, read by the MD engine adapters
    #: (fastff.ase.Calculator, fastff.openmm.as_force; see fastff.units). fastff's models speak
    #: OpenMM's units; a model trained on other data says so, e.g. ``model.length_unit =
    #: "Angstrom"; model.energy_unit = "eV"``. None: unknown (the adapters then need arguments).
    length_unit: str | None = "nm"
    energy_unit: str | None = "kJ/mol"

    def __init__(self, num_features: int, num_interactions: int, cutoff: float, max_species: int,
                 skin: float, backend: str | None):
        super().__init__()
        for name, value in (("num_features", num_features),
                            ("num_interactions", num_interactions), ("max_species", max_species)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_features < 2:
            raise ValueError(f"num_features must be >= 2 (the readout has F // 2 units), got "
                             f"{num_features}")
        if not isinstance(skin, (int, float)) or not skin >= 0.0 or skin == float("inf"):
            raise ValueError(f"skin must be a finite number >= 0, got {skin!r}")
        self._backend_request = _checks.backend_request(backend)
        self.num_features, self.num_interactions = num_features, num_interactions
        self.cutoff = _checks.cutoff(cutoff)
        self.max_species, self.skin = max_species, float(skin)
        self.embedding = nn.Embedding(max_species, num_features)
        self.readout = nn.Sequential(_dense_ssp(num_features, num_features // 2),
                                     nn.Linear(num_features // 2, 1))
        #: the backend every fastff op of the model runs on (resolved for its device)
        self.backend = _checks.backend_on(self._backend_request, self.embedding.weight.device)
        self.verlet = self._owned_verlet() if skin > 0 else None
        self._species_checked = _checks.TensorCache(size=2)

    def _owned_verlet(self) -> VerletList:
        # compact: the reused list holds pairs up to cutoff + skin; the model sees those within
        # its cutoff only, so the skin costs no message-passing work
        return VerletList(self.cutoff, self.skin, backend=self.backend, compact=True)

    def set_backend(self, backend: str | None) -> AtomisticModel:
        """Run every fastff op of this model (neighbor list, convolutions, radial bases) on
        ``backend`` ("numba", "triton", "reference", or None: ``FASTFF_BACKEND`` if set, else
        the device default) from now on. The weights are untouched; an owned Verlet list is
        rebuilt on its next update."""
        self._backend_request = _checks.backend_request(backend)
        self._resolve_backend(force=True)
        return self

    def _resolve_backend(self, force: bool = False) -> None:
        """Give this model and its fastff layers the backend of its request on its device."""
        backend = _checks.backend_on(self._backend_request, self.embedding.weight.device)
        if backend == self.backend and not force:
            return
        self.backend = backend
        for module in self.modules():
            if isinstance(module, (fnn.CFConv, fnn.PaiNNMessage)):
                module.backend = backend
        if self.verlet is not None:
            self.verlet = self._owned_verlet()

    def _apply(self, fn, recurse=True):
        # .to(device) moves the parameters: the default backend follows the device
        out = super()._apply(fn, recurse)
        if "_backend_request" in self.__dict__:
            self._resolve_backend()
        return out

    def set_tabulate(self, tabulate: bool) -> AtomisticModel:
        """Switch every radial filter between its cubic table (inference: the filter parameters
        get no gradient) and the exact network, keeping the weights."""
        for module in self.modules():
            if isinstance(module, (fnn.CFConv, fnn.PaiNNMessage)):
                module.tabulate = bool(tabulate)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def check_inputs(self, species: Tensor, positions: Tensor, batch: Tensor | None) -> int:
        """Validate the inputs; returns the number of systems B."""
        _checks.positions(positions)
        if positions.dtype != self.dtype:
            raise TypeError(f"positions has dtype {positions.dtype} but the model's parameters "
                            f"are {self.dtype}; convert one of them (model.to({positions.dtype}))")
        if positions.device != self.embedding.weight.device:
            raise ValueError(f"positions is on {positions.device} but the model is on "
                             f"{self.embedding.weight.device}")
        n = positions.shape[0]
        if not isinstance(species, Tensor):
            raise TypeError(f"species must be a torch.Tensor, got {type(species).__name__}")
        if species.dtype != torch.int64:
            raise TypeError(f"species must be int64 atomic numbers, got {species.dtype}")
        if species.shape != (n,):
            raise ValueError(f"species must have shape [{n}] (one per atom of positions), got "
                             f"{list(species.shape)}")
        _checks.same_device("species", species, "positions", positions)
        if _checks.checks_enabled() and n:
            # the same species tensor comes back step after step: checked once per state
            self._species_checked.get(self.max_species, (species,),
                                      lambda: self._check_species(species))
        batch, num_systems = _normalize_batch(batch, positions)
        return 1 if batch is None else int(num_systems or 0)

    def _check_species(self, species: Tensor) -> bool:
        bad = ((species < 0) | (species >= self.max_species)).nonzero()
        if bad.numel():
            k = int(bad[0, 0])
            raise ValueError(f"species[{k}] = {int(species[k])} is outside [0, "
                             f"{self.max_species}) (max_species of the model)")
        return True

    def _check_cell(self, cell, positions: Tensor) -> None:
        if cell is None:
            return
        if not isinstance(cell, Tensor):
            raise TypeError(f"cell must be a torch.Tensor, got {type(cell).__name__}")
        if cell.shape[-2:] != (3, 3) or cell.dim() not in (2, 3):
            raise ValueError(f"cell must have shape [3, 3] or [B, 3, 3], got {list(cell.shape)}")
        _checks.same_float_dtype("cell", cell, "positions", positions)
        _checks.same_device("cell", cell, "positions", positions)

    def neighbors(self, positions: Tensor, cell: Tensor | None = None, pbc=None,
                  batch: Tensor | None = None, nl: NeighborList | None = None) -> NeighborList:
        """The full neighbor list this model uses: ``nl`` (checked), the pairs within the cutoff
        from the owned Verlet list (skin > 0), or a fresh ``fastff.neighbor_list``."""
        if nl is None:
            return self._own_list(positions, cell, pbc, batch)
        return self._check_list(nl, positions, batch)

    def _own_list(self, positions: Tensor, cell: Tensor | None, pbc,
                  batch: Tensor | None) -> NeighborList:
        if self.verlet is not None:
            return self.verlet.update(positions, cell, pbc, batch)
        return neighbor_list(positions, self.cutoff, cell, pbc, batch, backend=self.backend)

    def _check_list(self, nl, positions: Tensor, batch: Tensor | None) -> NeighborList:
        """A given list, checked once for every layer of the model."""
        if not isinstance(nl, NeighborList):
            raise TypeError(f"nl must be a fastff.NeighborList, got {type(nl).__name__}")
        if nl.half:
            raise ValueError("nl must be a full neighbor list (half=False): the model sums "
                             "messages over both directions of every pair")
        if nl.cutoff < self.cutoff:
            raise ValueError(f"nl was built with cutoff {nl.cutoff}, smaller than the model's "
                             f"cutoff {self.cutoff}: pairs in between would be missing")
        if nl.num_atoms != positions.shape[0]:
            raise ValueError(f"nl was built for {nl.num_atoms} atoms but positions has "
                             f"{positions.shape[0]}")
        if nl.i.device != positions.device:
            raise ValueError(f"nl is on {nl.i.device} but positions is on {positions.device}")
        if (nl.batch is None) != (batch is None) or (
                batch is not None and nl.batch is not None and nl.batch is not batch
                and _checks.checks_enabled() and not torch.equal(nl.batch, batch)):
            raise ValueError("nl was built with a different batch than the one given")
        if nl.cutoff > self.cutoff and self.envelope is None:
            raise ValueError(f"the model has no envelope, so its radial functions do not vanish "
                             f"at the cutoff {self.cutoff}; it needs a neighbor list with exactly "
                             f"that cutoff (got {nl.cutoff}; nl.within(positions, "
                             f"{self.cutoff}) gives one)")
        if (_checks.checks_enabled() and len(nl) and not nl.symmetric
                and bool((nl.reverse < 0).any())):
            raise ValueError("nl has pairs without a mirror pair; build it with "
                             "fastff.neighbor_list")
        return nl

    def _cells(self, cell: Tensor | None, num_systems: int, batched: bool) -> Tensor | None:
        # a [3, 3] cell shared by a batch: the neighbor list stores it per system
        if cell is not None and batched and isinstance(cell, Tensor) and cell.dim() == 2:
            return cell.expand(num_systems, 3, 3)
        return cell

    def _checked(self, species: Tensor, positions: Tensor, cell: Tensor | None,
                 batch: Tensor | None, nl: NeighborList | None) -> int:
        """The checks of a call, made once for every layer; returns the number of systems."""
        num_systems = self.check_inputs(species, positions, batch)
        self._check_cell(cell, positions)
        if nl is not None:
            self._check_list(nl, positions, batch)
        return num_systems

    def forward(self, species: Tensor, positions: Tensor, cell: Tensor | None = None, pbc=None,
                batch: Tensor | None = None, *, nl: NeighborList | None = None) -> Tensor:
        """Energies [B] of the systems.

        Args:
            species: int64 [N], atomic numbers (< max_species).
            positions: [N, 3], the model's dtype, length unit of the cutoff.
            cell: [3, 3] or [B, 3, 3] lattice vectors as rows, or None.
            pbc: bool [3] or [B, 3]; default: periodic along every axis when a cell is given.
            batch: int64 [N], sorted system index per atom; None for one system (B = 1).
            nl: a full neighbor list with cutoff >= the model's (else one is built).
        """
        num_systems = self._checked(species, positions, cell, batch, nl)
        return self._energies(species, positions, cell, pbc, batch, nl, num_systems)

    def _energies(self, species: Tensor, positions: Tensor, cell: Tensor | None, pbc,
                  batch: Tensor | None, nl: NeighborList | None, num_systems: int) -> Tensor:
        """:meth:`forward` after its checks: the layers run with the value checks off (in this
        thread; while compiling they are off anyway)."""
        if torch.compiler.is_compiling():
            return self._run(species, positions, cell, pbc, batch, nl, num_systems)
        with _checks.no_checks():
            return self._run(species, positions, cell, pbc, batch, nl, num_systems)

    def _run(self, species: Tensor, positions: Tensor, cell: Tensor | None, pbc,
             batch: Tensor | None, nl: NeighborList | None, num_systems: int) -> Tensor:
        cell = self._cells(cell, num_systems, batch is not None)
        if nl is None:
            with record_function("fastff.model.neighbors"):
                nl = self._own_list(positions, cell, pbc, batch)
        x = self.atomic_features(species, positions, nl, cell)
        atomic = self.readout(x).squeeze(1)
        if batch is None:
            return atomic.sum(0, keepdim=True)
        # index_add: deterministic on CPU (atomics on CUDA), differentiable to any order
        return atomic.new_zeros(num_systems).index_add(0, batch, atomic)

    def atomic_features(self, species: Tensor, positions: Tensor, nl: NeighborList,
                        cell: Tensor | None) -> Tensor:
        raise NotImplementedError


class SchNetInteraction(nn.Module):
    """One SchNet interaction (schnetpack layout): ``x + Dense(ssp(Dense(CFConv(in2f(x)))))``."""

    def __init__(self, num_features: int, num_basis: int, cutoff: float, *, kind: str,
                 envelope: str | None, tabulate: bool, backend: str | None):
        super().__init__()
        self.in2f = nn.Linear(num_features, num_features, bias=False)
        self.conv = fnn.CFConv(num_features, num_basis, cutoff, kind=kind, envelope=envelope,
                               tabulate=tabulate, backend=backend)
        self.f2out = nn.Sequential(_dense_ssp(num_features, num_features),
                                   nn.Linear(num_features, num_features))

    def forward(self, x: Tensor, positions: Tensor, nl: NeighborList,
                cell: Tensor | None, distances: Tensor | None = None) -> Tensor:
        return x + self.f2out(self.conv(self.in2f(x), positions, nl, cell,
                                        distances=distances))


class SchNet(AtomisticModel):
    """SchNet (Schütt et al., J. Chem. Phys. 148, 241722, 2018), schnetpack's layout.

    ``x = embedding(species)``; each interaction adds
    ``Dense(F, F)(ssp(Dense(F, F)(CFConv(in2f(x)))))`` to x, with ``in2f`` a Linear without bias
    and :class:`fastff.nn.CFConv` the continuous-filter convolution; the energy of a system is the
    sum over its atoms of ``Dense(F//2, 1)(ssp(Dense(F, F//2)(x)))``.

    Args:
        num_features: F, width of the atom features.
        num_interactions: number of interaction blocks.
        num_basis: K radial basis functions of each filter network.
        cutoff: interaction cutoff (length unit of positions; 0.5 suits nm).
        max_species: embedding size; species must be < max_species.
        kind: radial basis, "gaussian" (SchNet) or "bessel".
        envelope: "cosine", "polynomial" or None (None needs a given ``nl`` with exactly the
            model's cutoff; the lists the model builds or owns always have it).
        skin: > 0 makes the model own a :class:`fastff.VerletList` with ``compact=True``: the
            list built at cutoff + skin is reused across calls (MD steps) until an atom moved
            more than skin / 2, and every call sees only its pairs within the cutoff.
        tabulate: evaluate each filter from a cubic table of its MLP (rebuilt when the filter's
            parameters change). Inference only: filter parameters get no gradient on that path;
            energies, forces and stress stay within ~1e-7 relative of the MLP path.
        backend: "numba", "triton", "reference" or None (``FASTFF_BACKEND`` when set, else the
            device default; read when built) for every fastff op.

    ``forward(species, positions, cell=None, pbc=None, batch=None, *, nl=None)`` returns
    energies [B] in the positions' dtype. Deterministic on CPU (bitwise, run to run).
    """

    def __init__(self, num_features: int = 64, num_interactions: int = 3, num_basis: int = 32,
                 cutoff: float = 0.5, *, max_species: int = 100, kind: str = "gaussian",
                 envelope: str | None = "cosine", skin: float = 0.0, tabulate: bool = False,
                 backend: str | None = None):
        super().__init__(num_features, num_interactions, cutoff, max_species, skin, backend)
        self.envelope = None if envelope in (None, "none") else envelope
        self.interactions = nn.ModuleList(
            SchNetInteraction(num_features, num_basis, self.cutoff, kind=kind, envelope=envelope,
                              tabulate=tabulate, backend=self.backend)
            for _ in range(num_interactions))

    def _blocks(self) -> list[SchNetInteraction]:
        return [block for block in self.interactions if isinstance(block, SchNetInteraction)]


    @classmethod
    def from_pyg(cls, model, *, energy_unit: str, length_unit: str = "Angstrom",
                 **kwargs) -> SchNet:
        """A fastff SchNet with the weights of a ``torch_geometric.nn.models.SchNet``; see
        :func:`fastff.interop.pyg.from_pyg` (``energy_unit`` is required: torch_geometric
        models carry no units)."""
        from fastff.interop.pyg import from_pyg

        return from_pyg(model, energy_unit=energy_unit, length_unit=length_unit, **kwargs)

    def atomic_features(self, species: Tensor, positions: Tensor, nl: NeighborList,
                        cell: Tensor | None) -> Tensor:
        x = self.embedding(species)
        # once, for every interaction; tabulated filters compute them inside their kernel
        d = None if all(block.conv.tabulate for block in self._blocks()) else \
            nl.distances(positions, cell)
        for block in self.interactions:
            with record_function("fastff.SchNet.interaction"):
                x = block(x, positions, nl, cell, d)
        return x


class PaiNNUpdate(nn.Module):
    """PaiNN's update block (eq. 9-11): mixes scalars s [N, F] and vectors v [N, 3, F]."""

    def __init__(self, num_features: int):
        super().__init__()
        nf = num_features
        self.U = nn.Linear(nf, nf, bias=False)
        self.V = nn.Linear(nf, nf, bias=False)
        self.mlp = nn.Sequential(nn.Linear(2 * nf, nf), nn.SiLU(), nn.Linear(nf, 3 * nf))

    def forward(self, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        uv, vv = self.U(v), self.V(v)
        norm = torch.sqrt(vv.square().sum(1) + NORM_EPS)
        a_vv, a_sv, a_ss = self.mlp(torch.cat([s, norm], 1)).chunk(3, dim=1)
        s = s + a_ss + a_sv * (uv * vv).sum(1)
        v = v + a_vv.unsqueeze(1) * uv
        return s, v


class PaiNN(AtomisticModel):
    """PaiNN (Schütt, Unke, Gastegger, ICML 2021), scalar and l = 1 vector features.

    ``s = embedding(species)``, ``v = 0`` [N, 3, F]; each layer adds the message
    :class:`fastff.nn.PaiNNMessage` (Bessel basis, cosine envelope) to (s, v), then the update
    ``s += a_ss + a_sv * <U v, V v>``, ``v += a_vv * U v`` with
    ``(a_vv, a_sv, a_ss) = MLP(s, sqrt(|V v|^2 + 1e-8))``. Readout as :class:`SchNet`.

    Args:
        num_features: F.
        num_interactions: number of message + update layers.
        num_basis: Bessel functions of the message filters (PaiNN uses 20).
        cutoff: interaction cutoff (length unit of positions).
        max_species: embedding size.
        skin: > 0 owns a reused, compacting :class:`fastff.VerletList`, as for :class:`SchNet`.
        tabulate: read each message filter from a cubic table (inference only, as for
            :class:`SchNet`); energies and forces stay within ~1e-6 relative of the exact path.
        backend: as for :class:`SchNet`.

    Energies are rotation invariant; forces are rotation equivariant. Deterministic on CPU.
    """

    def __init__(self, num_features: int = 64, num_interactions: int = 3, num_basis: int = 20,
                 cutoff: float = 0.5, *, max_species: int = 100, skin: float = 0.0,
                 tabulate: bool = False, backend: str | None = None):
        super().__init__(num_features, num_interactions, cutoff, max_species, skin, backend)
        messages = [fnn.PaiNNMessage(num_features, num_basis, self.cutoff, tabulate=tabulate,
                                     backend=self.backend)
                    for _ in range(num_interactions)]
        # The Bessel basis sqrt(2/c) sin(k pi r/c) / r scales as length^(-3/2): rescaling the
        # initial filter weights by c^(3/2) / sqrt(2) makes each starting filter a function of
        # r / c only, so initial energies do not depend on the length unit (nm or Angstrom).
        with torch.no_grad():
            for message in messages:
                message.filter.weight.mul_(self.cutoff**1.5 / math.sqrt(2.0))
        self.messages = nn.ModuleList(messages)
        self.updates = nn.ModuleList(PaiNNUpdate(num_features) for _ in range(num_interactions))

    def atomic_features(self, species: Tensor, positions: Tensor, nl: NeighborList,
                        cell: Tensor | None) -> Tensor:
        s = self.embedding(species)
        v = s.new_zeros(s.shape[0], 3, s.shape[1])
        vec = nl.vectors(positions, cell)  # once, for every message
        for message, update in zip(self.messages, self.updates, strict=True):
            with record_function("fastff.PaiNN.message"):
                ds, dv = message(s, v, positions, nl, cell, vectors=vec)
            with record_function("fastff.PaiNN.update"):
                s, v = update(s + ds, v + dv)
        return s


def energy_and_forces(model: AtomisticModel, species: Tensor, positions: Tensor,
                      cell: Tensor | None = None, pbc=None, batch: Tensor | None = None, *,
                      stress: bool = False, training: bool = False,
                      nl: NeighborList | None = None):
    """Energies, forces and optionally the stress of a :class:`SchNet` or :class:`PaiNN`.

    Args:
        model: the model.
        species: as for the model's forward.
        positions: as for the model's forward.
        cell: as for the model's forward.
        pbc: as for the model's forward.
        batch: as for the model's forward.
        nl: as for the model's forward.
        stress: also return the stress ``(1 / V) dE / d(strain)`` [B, 3, 3] (ASE's convention:
            energy / length^3; a symmetric strain deforms positions and cell together). Needs a
            cell of non-zero volume.
        training: build the graph of the forces (create_graph=True) so that a loss on forces
            can be differentiated with respect to the parameters; otherwise outputs are detached.

    Returns:
        ``(energy [B], forces [N, 3])`` or ``(energy, forces, stress)``; forces are
        ``-dE/dpositions`` in energy / length.
    """
    # forces need autograd even when called under torch.no_grad() (e.g. inside an MD loop)
    with torch.enable_grad():
        return _energy_and_forces(model, species, positions, cell, pbc, batch, stress=stress,
                                  training=training, nl=nl)


def _energy_and_forces(model, species, positions, cell, pbc, batch, *, stress, training, nl):
    num_systems = model._checked(species, positions, cell, batch, nl)
    if not positions.requires_grad:
        positions = positions.detach().requires_grad_(True)
    inputs = [positions]
    pos, cells = positions, cell
    if stress:
        if cell is None:
            raise ValueError("stress=True needs a cell: the stress is dE/d(strain) divided by the "
                             "cell volume")
        if not isinstance(cell, Tensor) or cell.shape[-2:] != (3, 3) or cell.dim() not in (2, 3):
            raise ValueError(f"cell must have shape [3, 3] or [B, 3, 3], got "
                             f"{list(getattr(cell, 'shape', []))}")
        _checks.same_float_dtype("cell", cell, "positions", positions)
        cells = cell.unsqueeze(0) if cell.dim() == 2 else cell
        if cells.shape[0] == 1 and num_systems > 1:
            cells = cells.expand(num_systems, 3, 3)
        strain = positions.new_zeros(cells.shape[0], 3, 3, requires_grad=True)
        # symmetrised, so the result is the derivative under a symmetric strain
        deform = torch.eye(3, dtype=positions.dtype, device=positions.device) + 0.5 * (
            strain + strain.transpose(1, 2))
        if batch is None:
            pos = positions @ deform[0]
        else:
            pos = torch.bmm(positions.unsqueeze(1), deform[batch]).squeeze(1)
        cells = torch.bmm(cells, deform)
        if cell.dim() == 2 and num_systems == 1:
            cells = cells[0]
        inputs.append(strain)
        volume = torch.linalg.det((cell.unsqueeze(0) if cell.dim() == 2 else cell).detach()).abs()
        if not bool((volume > 0).all()):
            raise ValueError("stress=True needs cells of non-zero volume")
    energy = model._energies(species, pos, cells, pbc, batch, nl, num_systems)
    grads = torch.autograd.grad(energy.sum(), inputs, create_graph=training)
    forces = -grads[0]
    if not training:
        energy = energy.detach()
    if not stress:
        return energy, forces
    if volume.shape[0] == 1 and num_systems > 1:
        volume = volume.expand(num_systems)
    return energy, forces, (grads[1] / volume.view(-1, 1, 1))[:num_systems]
