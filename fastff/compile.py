"""Compiled and exported fastff models: ``torch.compile`` for inference, ``make_fx`` +
``torch.compile`` for force training, ``torch.export`` + AOTInductor for deployment.

Each route takes a :class:`fastff.models.SchNet` / :class:`fastff.models.PaiNN` (called as
``model(species, positions, cell, ..., nl=nl)``), a :class:`fastff.mm.ForceField` (called as
``ff(positions, cell, nl=nl)``), or any module whose forward takes the neighbor list as ``nl=``
(say where the positions are with ``positions_index``).

**Neighbor lists stay outside.** Building a list is data dependent (the pair count E is known
only after the count pass), so every route takes a ready ``nl``: from
:func:`fastff.neighbor_list` or a :class:`fastff.VerletList`, called eagerly. The compiled code is
generic in E (and in the number of atoms N): a list with another pair count runs the same
compiled code, without recompiling or retracing. The fastff custom ops are single nodes of the
compiled graphs (their fake impls give symbolic output sizes), with no graph break inside them.

**Routes.**

* :func:`compile_energy_and_forces`: the model's forward is compiled (``torch.compile``,
  ``fullgraph=True``) and the forces are ``-dE/dpositions`` by ``torch.autograd.grad`` outside
  it; AOTAutograd compiles that backward too. Parameters enter detached, so the backward
  computes position gradients only. This uses public APIs only; compiling
  ``energy_and_forces`` whole needs ``torch._dynamo.config.trace_autograd_ops = True``
  (experimental in torch 2.13).
* :func:`compile_training_step`: ``make_fx`` traces energy -> forces (``create_graph=True``) ->
  loss -> parameter gradients into one graph of aten and fastff ops, with symbolic N and E, then
  ``torch.compile`` compiles it. (AOTAutograd cannot differentiate a compiled graph twice, so
  ``torch.compile`` of the eager training step is not an option.)
* :func:`cuda_graph_step`: an MD step captured in a CUDA graph (steady steps of the Triton
  path never synchronise with the host, so the whole step replays without Python).
* :func:`export_energy_and_forces` / :func:`load_energy_and_forces`: the same traced
  energy-and-forces graph, with the weights as constants, through ``torch.export`` (dynamic N
  and E) and AOTInductor (``torch._inductor.aoti_compile_and_package``) into one ``.pt2`` file;
  :func:`trace_energy_and_forces` stops at the ``torch.export.ExportedProgram``.

**Loading an artifact needs** ``import fastff``: the kernels are Python custom ops
(``torch.library.custom_op``), registered with the dispatcher when fastff is imported, and the
AOTInductor package calls them through it. Without the import, loading fails with "Could not find
schema for fastff::...". So artifacts run in Python processes only, not in C++-only hosts
(LibTorch).

**TorchScript cannot deploy fastff.** TorchScript cannot compile fastff's Python code (modules,
``NeighborList``), and a TorchScript program cannot call a Python custom op outside a Python
process that imported fastff. That rules out LibTorch hosts such as OpenMM-Torch or LAMMPS.
Use the routes above.

**Limits.** ``batch`` (several systems in one call) is not supported: the models read the
number of systems from the data (``int(batch[-1]) + 1``), which traced code cannot do. Value
checks (NaN scans, index ranges) do not run inside compiled code: the wrappers run the positions
check eagerly, and the rest are skipped while tracing (``torch.compiler.is_compiling()``,
``fastff.no_checks()``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from fastff import _checks
from fastff.kernels._runtime import registry
from fastff.neighbors import NeighborList

__all__ = ["CompiledEnergyAndForces", "CompiledTrainingStep", "CudaGraphStep",
           "ExportedEnergyAndForces", "compile_energy_and_forces", "compile_training_step",
           "cuda_graph_step", "export_energy_and_forces", "load_energy_and_forces",
           "trace_energy_and_forces"]

_METADATA_KEY = "fastff"
_FORMAT = 1


# ---------------------------------------------------------------- shared helpers
def _positions_index(model: nn.Module, positions_index: int | None) -> int:
    """Where the positions are among the model's positional arguments."""
    if positions_index is not None:
        if isinstance(positions_index, bool) or not isinstance(positions_index, int) \
                or positions_index < 0:
            raise ValueError(f"positions_index must be an int >= 0, got {positions_index!r}")
        return positions_index
    from fastff.mm import ForceField
    from fastff.models import AtomisticModel

    if isinstance(model, AtomisticModel):
        return 1  # (species, positions, cell, pbc, batch)
    if isinstance(model, ForceField):
        return 0  # (positions, cell)
    raise TypeError(f"cannot tell where the positions are among the arguments of a "
                    f"{type(model).__name__}; pass positions_index")


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _positions(args: Sequence, index: int) -> Tensor:
    if len(args) <= index:
        raise ValueError(f"expected the positions as positional argument {index}, got "
                         f"{len(args)} positional arguments")
    return _checks.positions(args[index])


def _batch_of(model: nn.Module, args: Sequence, kwargs: dict):
    """The ``batch`` argument of a call, wherever it was passed (None when absent)."""
    from fastff.models import AtomisticModel

    if isinstance(model, AtomisticModel) and len(args) > 4:
        return args[4]  # (species, positions, cell, pbc, batch)
    return kwargs.get("batch")


def _check_list(nl, batch, positions: Tensor) -> NeighborList:
    if nl is None:
        raise ValueError("nl is required: build the neighbor list outside the compiled code "
                         "(fastff.neighbor_list or a fastff.VerletList) and pass it as nl=")
    if not isinstance(nl, NeighborList):
        raise TypeError(f"nl must be a fastff.NeighborList, got {type(nl).__name__}")
    if nl.batch is not None or batch is not None:
        raise ValueError("batched systems (batch=...) are not supported by compiled or exported "
                         "models: the number of systems is read from the data; run one system "
                         "per call")
    if nl.num_atoms != positions.shape[0]:
        raise ValueError(f"nl was built for {nl.num_atoms} atoms but positions has "
                         f"{positions.shape[0]}")
    return nl


def _preload_launchers(device: torch.device, backend: str | None) -> None:
    """Import every op's kernel module now: ``registry.resolve`` imports it on first use, and an
    import cannot be traced by torch.compile (it would break the graph)."""
    registry.import_all_ops()
    for name in registry.op_names():
        registry.resolve(name, device, backend)


def _list_tensors(nl: NeighborList) -> list[Tensor]:
    """The tensors of ``nl`` a traced function takes: i, j, shifts, ptr, cells, pbc[, reverse]."""
    tensors = [nl.i, nl.j, nl.shifts, nl.ptr, nl._cells, nl.pbc]
    if not nl.half:
        tensors.append(nl.reverse)
    return tensors


#: dimension 0 of these list tensors is E (pairs); of ptr it is N + 1
_PAIR_SLOTS = (0, 1, 2, 6)
_PTR_SLOT = 3


@dataclass(frozen=True)
class _ListLayout:
    """What a traced function knows of a neighbor list besides its tensors."""

    cutoff: float
    half: bool
    backend: str

    @classmethod
    def of(cls, nl: NeighborList) -> _ListLayout:
        return cls(float(nl.cutoff), bool(nl.half), str(nl.backend))

    def rebuild(self, tensors: Sequence[Tensor], num_atoms) -> NeighborList:
        i, j, shifts, ptr, cells, pbc = tensors[:6]
        nl = NeighborList(i, j, shifts, ptr, cutoff=self.cutoff, half=self.half,
                          num_atoms=num_atoms, batch=None, cells=cells, pbc=pbc, cell=None,
                          backend=self.backend)
        if not self.half:
            nl._reverse = tensors[6]
        return nl


def _dynamic_dims(flat: Sequence, num_atoms: int,
                  list_span: tuple[int, int] | None) -> list[tuple[int, ...]]:
    """Per entry, the dimensions traced as symbolic: E of the list's pair tensors, N + 1 of its
    ptr (``list_span`` = (first index, count) of the list's tensors in ``flat``), and dimension
    0 of every other tensor whose length is N (species, positions, per-atom targets). Everything
    else (parameters, cells, non-tensors) stays static."""
    start, count = list_span if list_span is not None else (len(flat), 0)
    dims: list[tuple[int, ...]] = []
    for k, t in enumerate(flat):
        if not isinstance(t, Tensor) or t.dim() == 0:
            dims.append(())
        elif start <= k < start + count:
            dims.append((0,) if k - start in _PAIR_SLOTS or k - start == _PTR_SLOT else ())
        else:
            dims.append((0,) if t.shape[0] == num_atoms else ())
    return dims


def _mark_dynamic(flat: Sequence, dims: Sequence[tuple[int, ...]]) -> None:
    """Tell torch.compile these sizes vary, so that a new E or N does not recompile."""
    for t, ds in zip(flat, dims, strict=True):
        for d in ds:
            if isinstance(t, Tensor) and t.shape[d] > 1:  # sizes 0 and 1 are always specialised
                torch._dynamo.maybe_mark_dynamic(t, d)


@dataclass
class _Traced:
    graph: torch.fx.GraphModule
    guards: str | None  # shape conditions the trace assumed (None: none)
    shape_env: Any


def _trace(fn: Callable, flat: Sequence[Tensor], dims: Sequence[tuple[int, ...]], *,
           allow_constants: bool) -> _Traced:
    """``make_fx`` of ``fn(*flat)`` with fake inputs whose ``dims`` are symbolic and the others
    static; the value checks are off (fake tensors have no values). ``allow_constants`` lets
    real tensors that ``fn`` closes over (weights) become constants of the graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=allow_constants)

    def fake(t: Tensor, dyn: tuple[int, ...]) -> Tensor:
        sizes = [DimDynamic.DYNAMIC if d in dyn else DimDynamic.STATIC for d in range(t.dim())]
        f = mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))
        return f.requires_grad_(t.requires_grad) if t.is_floating_point() else f

    fakes: list[Any] = [fake(t, d) for t, d in zip(flat, dims, strict=True)]
    with _checks.no_checks(), torch.enable_grad():
        graph = make_fx(fn, tracing_mode="fake")(*fakes)
    _drop_profiler_ranges(graph)
    guards = shape_env.produce_guards_expression(fakes, ignore_static=False)
    return _Traced(graph, guards, shape_env)


def _drop_profiler_ranges(graph: torch.fx.GraphModule) -> None:
    """Remove the ``record_function`` ranges the models open (profiler labels): make_fx records
    them as ops on a non-tensor handle, which torch.compile and torch.export cannot take."""
    enter = torch.ops.profiler._record_function_enter_new.default
    nodes = [n for n in graph.graph.nodes if n.target is enter]
    for node in nodes:
        for user in list(node.users):  # the matching _record_function_exit
            graph.graph.erase_node(user)
        graph.graph.erase_node(node)
    if nodes:
        graph.graph.lint()
        graph.recompile()


def _holds(traced: _Traced, flat: Sequence[Tensor]) -> bool:
    """Whether ``flat`` satisfies the shape conditions the trace of ``traced`` assumed."""
    if traced.guards is None:
        return True
    return bool(traced.shape_env.evaluate_guards_expression(traced.guards, list(flat)))


def _structure(leaves: Sequence) -> tuple:
    """A hashable description of everything a trace specialises on besides tensor sizes."""
    out: list = []
    for x in leaves:
        if isinstance(x, Tensor):
            out.append(("tensor", x.dtype, x.device, x.dim(), x.requires_grad))
        else:
            out.append(("value", repr(x)))
    return tuple(out)


# ---------------------------------------------------------------- inference: torch.compile
class CompiledEnergyAndForces:
    """``(energy, forces)`` of a model, its forward compiled by ``torch.compile``.

    Built by :func:`compile_energy_and_forces`. Call it with the model's arguments and the
    neighbor list: ``f(species, positions, cell, nl=nl)`` (SchNet, PaiNN) or
    ``f(positions, cell, nl=nl)`` (ForceField). Returns ``energy`` (the model's output,
    detached: [B] for SchNet/PaiNN, a scalar for a ForceField) and ``forces`` [N, 3]
    ``= -dE/dpositions`` (energy unit / length unit). Works under ``torch.no_grad()``.
    Deterministic on CPU when the kernels are.

    Attributes:
        compiled: the compiled functional forward (its ``torch.compile`` object).
        model: the module; parameter changes (optimizer steps, ``load_state_dict``) are seen on
            the next call without recompiling.
    """

    def __init__(self, model: nn.Module, positions_index: int, compile_kwargs: dict):
        self.model = model
        self.positions_index = positions_index
        self.compiled = torch.compile(self._energy, fullgraph=True, **compile_kwargs)
        self._preloaded: set[tuple[str, str | None]] = set()

    def _energy(self, state: dict[str, Tensor], args: tuple, kwargs: dict,
                list_tensors: list[Tensor], layout: _ListLayout) -> Tensor:
        # the list is rebuilt here, its atom count taken from the positions: an int attribute
        # (nl.num_atoms) would be specialised by torch.compile, a tensor size need not be
        nl = layout.rebuild(list_tensors, args[self.positions_index].shape[0])
        return torch.func.functional_call(self.model, state, args, {**kwargs, "nl": nl})

    def __call__(self, *args, nl: NeighborList, **kwargs) -> tuple[Tensor, Tensor]:
        k = self.positions_index
        positions = _positions(args, k)
        nl = _check_list(nl, _batch_of(self.model, args, kwargs), positions)
        key = (str(positions.device), getattr(self.model, "backend", None))
        if key not in self._preloaded:
            _preload_launchers(positions.device, key[1])
            self._preloaded.add(key)
        positions = positions.detach().requires_grad_(True)
        args = (*args[:k], positions, *args[k + 1:])
        tensors = _list_tensors(nl)  # fills nl.reverse eagerly: traced code does not cache it
        _mark_dynamic(tensors, _dynamic_dims(tensors, positions.shape[0], (0, len(tensors))))
        _mark_dynamic(args, _dynamic_dims(args, positions.shape[0], None))
        # detached parameters: the compiled backward then computes position gradients only
        state = {name: p.detach() for name, p in self.model.named_parameters()}
        state.update(self.model.named_buffers())
        with torch.enable_grad():
            energy = self.compiled(state, args, kwargs, tensors, _ListLayout.of(nl))
            (grad,) = torch.autograd.grad(energy.sum(), positions)
        return energy.detach(), -grad


def compile_energy_and_forces(model: nn.Module, *, positions_index: int | None = None,
                              backend: str | Callable = "inductor", mode: str | None = None,
                              options: dict | None = None,
                              dynamic: bool | None = None) -> CompiledEnergyAndForces:
    """Energy and forces of ``model`` with its forward compiled by ``torch.compile``.

    Args:
        model: SchNet, PaiNN, ForceField, or a module taking ``nl=`` (then ``positions_index``).
        positions_index: position of the positions among the model's positional arguments;
            default 1 for SchNet/PaiNN, 0 for a ForceField.
        backend: passed to ``torch.compile`` (``fullgraph=True``
            always: a graph break is an error, not a slow path).
        mode: passed to ``torch.compile``.
        options: passed to ``torch.compile``.
        dynamic: passed to ``torch.compile``. With the default
            ``dynamic=None``, the pair count E and the number of atoms N are marked dynamic on
            every call, so new values of E or N reuse the compiled code. Exceptions: sizes 0
            and 1 are always specialised, and inductor's small-matrix rule on CPU (a matmul
            with at most 32 elements is decomposed; for the readout's [N, 1] x [1, F/2]
            backward that is N <= 32 - F/2) compiles once more when N crosses that bound.

    Returns:
        A :class:`CompiledEnergyAndForces`; compilation happens on its first call.

    Example::

        f = fastff.compile.compile_energy_and_forces(model)
        nl = fastff.neighbor_list(positions, model.cutoff, cell)
        energy, forces = f(species, positions, cell, nl=nl)
    """
    _check_model(model)
    index = _positions_index(model, positions_index)
    kwargs: dict[str, Any] = {"backend": backend, "mode": mode, "options": options,
                              "dynamic": dynamic}
    return CompiledEnergyAndForces(model, index, kwargs)


# ---------------------------------------------------------------- training: make_fx + compile
class CompiledTrainingStep:
    """One force-matching step as a compiled graph: ``(loss, gradients)``.

    Built by :func:`compile_training_step`. Call it as
    ``step(*model_args, nl=nl, targets=(...))``: it computes ``energy = model(*model_args,
    nl=nl)``, ``forces = -d energy / d positions`` (with its graph), ``loss = loss_fn(energy,
    forces, *targets)`` and the gradient of the loss with respect to every parameter that
    requires grad. Returns ``(loss, grads)``, ``grads`` a dict ``{parameter name: gradient}``
    in ``model.named_parameters()`` order; nothing is written to ``.grad`` (use
    :meth:`assign_grads`).

    The graph is traced once per structure of the inputs (dtypes, devices, which arguments are
    None, the list's cutoff/half/backend, the target shapes' ranks) with symbolic N and E, so new
    systems and pair counts reuse it. Parameters are inputs of the graph, not constants:
    optimizer steps need no retrace.

    Attributes:
        traces: number of ``make_fx`` traces so far (1 after the first call, normally).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor], positions_index: int,
                 compile_kwargs: dict):
        self.model = model
        self.loss_fn = loss_fn
        self.positions_index = positions_index
        self.compile_kwargs = compile_kwargs
        self.traces = 0
        self._cache: dict[tuple, list[tuple[_Traced, Callable]]] = {}

    def _names(self) -> tuple[list[str], list[str]]:
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        frozen = [n for n, p in self.model.named_parameters() if not p.requires_grad]
        return trainable, frozen + [n for n, _ in self.model.named_buffers()]

    def __call__(self, *args, nl: NeighborList, targets: Sequence[Tensor] = (),
                 **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
        positions = _positions(args, self.positions_index)
        nl = _check_list(nl, _batch_of(self.model, args, kwargs), positions)
        trainable, fixed = self._names()
        if not trainable:
            raise ValueError("the model has no parameter that requires grad")
        targets = tuple(targets)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        arg_tensors = [x for x in leaves if isinstance(x, Tensor)]
        arg_slots = [k for k, x in enumerate(leaves) if isinstance(x, Tensor)]
        constants = [None if isinstance(x, Tensor) else x for x in leaves]
        params = dict(self.model.named_parameters())
        state = {**params, **dict(self.model.named_buffers())}
        flat: list[Tensor] = [params[n].detach().requires_grad_(True) for n in trainable]
        flat += [state[n].detach() for n in fixed]
        n_state = len(flat)
        flat += arg_tensors
        list_start = len(flat)
        flat += _list_tensors(nl)
        n_list = len(flat) - list_start
        flat += list(targets)
        if not all(isinstance(t, Tensor) for t in flat):
            raise TypeError("targets must be tensors")
        layout = _ListLayout.of(nl)
        key = (_structure(flat), str(spec), repr(constants), layout, len(trainable), n_list)
        dims = _dynamic_dims(flat, positions.shape[0], (list_start, n_list))
        entries = self._cache.setdefault(key, [])
        run = next((fn for traced, fn in entries if _holds(traced, flat)), None)
        if run is None:
            index = self.positions_index

            def step(*xs: Tensor):
                ps = list(xs[:len(trainable)])
                named = dict(zip(trainable + fixed, xs[:n_state], strict=True))
                leaves_now = list(constants)
                for slot, t in zip(arg_slots, xs[n_state:list_start], strict=True):
                    leaves_now[slot] = t
                call_args, call_kwargs = pytree.tree_unflatten(leaves_now, spec)
                pos = call_args[index].requires_grad_(True)
                nl_now = layout.rebuild(xs[list_start:list_start + n_list], pos.shape[0])
                energy = torch.func.functional_call(self.model, named, tuple(call_args),
                                                    {**call_kwargs, "nl": nl_now})
                (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=True)
                loss = self.loss_fn(energy, -grad, *xs[list_start + n_list:])
                grads = torch.autograd.grad(loss, ps, allow_unused=True)
                return (loss.detach(), *[torch.zeros_like(p) if g is None else g
                                         for p, g in zip(ps, grads, strict=True)])

            traced = _trace(step, flat, dims, allow_constants=False)
            self.traces += 1
            run = torch.compile(traced.graph, fullgraph=True, **self.compile_kwargs)
            entries.append((traced, run))
        inputs = [t.detach() for t in flat]
        _mark_dynamic(inputs, dims)
        with torch.no_grad():
            loss, *grads = run(*inputs)
        return loss, dict(zip(trainable, grads, strict=True))

    def assign_grads(self, grads: dict[str, Tensor]) -> None:
        """Write ``grads`` (from a call) into the parameters' ``.grad``, for an optimizer step."""
        params = dict(self.model.named_parameters())
        for name, g in grads.items():
            params[name].grad = g


def compile_training_step(model: nn.Module, loss_fn: Callable[..., Tensor], *,
                          positions_index: int | None = None,
                          backend: str | Callable = "inductor", mode: str | None = None,
                          options: dict | None = None) -> CompiledTrainingStep:
    """A compiled force-matching training step of ``model`` (``make_fx`` + ``torch.compile``).

    Args:
        model: SchNet, PaiNN, ForceField (learned MM parameters), or a module taking ``nl=``.
        loss_fn: ``loss_fn(energy, forces, *targets) -> scalar``, e.g.
            ``lambda e, f, e_ref, f_ref: (e - e_ref).square().mean()
            + (f - f_ref).square().mean()``; torch ops only (it is traced).
        positions_index: as for :func:`compile_energy_and_forces`.
        backend: passed to ``torch.compile`` (``fullgraph=True``).
        mode: passed to ``torch.compile``.
        options: passed to ``torch.compile``.

    Returns:
        A :class:`CompiledTrainingStep`; it traces and compiles on its first call. Loss and
        gradients match the eager step to rounding (about 1e-7 relative in float32, 1e-12 in
        float64).
    """
    _check_model(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    index = _positions_index(model, positions_index)
    return CompiledTrainingStep(model, loss_fn, index,
                                {"backend": backend, "mode": mode, "options": options})


# ---------------------------------------------------------------- deployment: export + AOTI
class ExportedEnergyAndForces:
    """An exported energy-and-forces function, called like :class:`CompiledEnergyAndForces`:
    ``f(*model_args, nl=nl) -> (energy, forces)``.

    ``model_args`` are the tensors (or None) given to the model at export, in the same places
    (say ``(species, positions, cell)``); ``nl`` a list built like the example's (same cutoff,
    full or half), of any pair count. Weights are constants of the artifact.

    Attributes:
        runner: the flat callable (an AOTInductor model, or ``ExportedProgram.module()``).
        program: the ``torch.export.ExportedProgram`` when built by
            :func:`trace_energy_and_forces` (None when loaded from a package).
        metadata: what the artifact was exported from (dict).
    """

    def __init__(self, runner: Callable, metadata: dict, program=None):
        self.runner = runner
        self.metadata = metadata
        self.program = program

    def flat_inputs(self, *args, nl: NeighborList) -> list[Tensor]:
        """The artifact's flat tensor inputs for these arguments (checked against the export)."""
        meta = self.metadata
        layout = [a is None for a in args]
        if layout != meta["none_args"]:
            raise ValueError(f"arguments {['None' if x else 'tensor' for x in layout]} differ "
                             f"from the exported ones "
                             f"{['None' if x else 'tensor' for x in meta['none_args']]}")
        positions = _positions(args, meta["positions_index"])
        if str(positions.dtype) != meta["dtype"]:
            raise TypeError(f"positions has dtype {positions.dtype} but the artifact was "
                            f"exported for {meta['dtype']}")
        nl = _check_list(nl, None, positions)
        if bool(nl.half) != meta["half"]:
            raise ValueError(f"nl must be a {'half' if meta['half'] else 'full'} list, as at "
                             "export")
        if not math.isclose(float(nl.cutoff), meta["cutoff"], rel_tol=1e-12):
            raise ValueError(f"nl was built with cutoff {nl.cutoff} but the artifact with "
                             f"{meta['cutoff']}; build the list with that cutoff")
        return [a for a in args if a is not None] + _list_tensors(nl)

    def __call__(self, *args, nl: NeighborList) -> tuple[Tensor, Tensor]:
        energy, forces = self.runner(*self.flat_inputs(*args, nl=nl))
        return energy, forces


def _energy_and_forces_fn(model: nn.Module, index: int, none_args: list[bool],
                          layout: _ListLayout) -> Callable:
    """The flat function ``(*tensor args, *list tensors) -> (energy, forces)`` that is traced;
    the weights are read from ``model`` (constants of the trace)."""
    n_args = sum(not x for x in none_args)

    def energy_and_forces(*xs: Tensor) -> tuple[Tensor, Tensor]:
        it = iter(xs[:n_args])
        args = [None if none else next(it) for none in none_args]
        pos = args[index]
        assert pos is not None
        pos = pos.detach().requires_grad_(True)
        args[index] = pos
        nl = layout.rebuild(xs[n_args:], pos.shape[0])
        state = {name: p.detach() for name, p in model.named_parameters()}
        state.update(model.named_buffers())
        energy = torch.func.functional_call(model, state, tuple(args), {"nl": nl})
        (grad,) = torch.autograd.grad(energy.sum(), pos)
        return energy.detach(), -grad

    return energy_and_forces


def trace_energy_and_forces(model: nn.Module, example_inputs: Sequence, *,
                            positions_index: int | None = None) -> ExportedEnergyAndForces:
    """``torch.export`` of the energy-and-forces function of ``model`` (no compiler needed).

    Args:
        model: SchNet, PaiNN, ForceField, or a module taking ``nl=``.
        example_inputs: the model's positional arguments followed by a neighbor list, e.g.
            ``(species, positions, cell, nl)`` or ``(positions, cell, nl)``; None arguments
            stay None in every later call.
        positions_index: as for :func:`compile_energy_and_forces`.

    Returns:
        An :class:`ExportedEnergyAndForces` over ``ExportedProgram.module()``; its ``program``
        can be saved with ``torch.export.save`` (loading it needs ``import fastff``). The
        number of atoms (N >= 2) and of pairs (E >= 2) are dynamic.
    """
    _check_model(model)
    index = _positions_index(model, positions_index)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise TypeError("example_inputs must be a tuple (*model_args, nl)")
    *args, nl = example_inputs
    positions = _positions(args, index)
    nl = _check_list(nl, None, positions)
    for k, a in enumerate(args):
        if a is not None and not isinstance(a, Tensor):
            raise TypeError(f"example_inputs[{k}] must be a tensor or None, got "
                            f"{type(a).__name__}")
    none_args = [a is None for a in args]
    layout = _ListLayout.of(nl)
    arg_tensors = [a for a in args if a is not None]
    flat = arg_tensors + _list_tensors(nl)
    dims = _dynamic_dims(flat, positions.shape[0], (len(arg_tensors), len(flat) - len(arg_tensors)))
    fn = _energy_and_forces_fn(model, index, none_args, layout)
    traced = _trace(fn, [t.detach() for t in flat], dims, allow_constants=True)
    atoms = torch.export.Dim("atoms", min=2)
    pairs = torch.export.Dim("pairs", min=2)
    shapes: list[dict | None] = []
    for k, ds in enumerate(dims):
        if not ds:
            shapes.append(None)
        elif k - len(arg_tensors) == _PTR_SLOT:
            shapes.append({0: atoms + 1})
        elif k >= len(arg_tensors):
            shapes.append({0: pairs})
        else:
            shapes.append({0: atoms})
    with _checks.no_checks():
        program = torch.export.export(traced.graph, tuple(t.detach() for t in flat),
                                      dynamic_shapes=tuple(shapes))
    metadata = {"format": _FORMAT, "model": type(model).__name__, "positions_index": index,
                "none_args": none_args, "dtype": str(positions.dtype), "half": layout.half,
                "cutoff": layout.cutoff, "backend": layout.backend}
    return ExportedEnergyAndForces(program.module(), metadata, program)


def export_energy_and_forces(model: nn.Module, example_inputs: Sequence, path: str | os.PathLike,
                             *, positions_index: int | None = None,
                             inductor_configs: dict | None = None) -> str:
    """Export the energy and forces of ``model`` to an AOTInductor package at ``path``.

    The traced energy -> forces graph (see :func:`trace_energy_and_forces`) is compiled ahead of
    time by AOTInductor (C++ through the system compiler on CPU: tens of seconds for a small
    model on 2 cores) and written as one ``.pt2`` file with the weights. Load it with
    :func:`load_energy_and_forces`, in a Python process that imports fastff (the fastff ops are
    Python custom ops; see the module notes).

    Args:
        model: as for :func:`trace_energy_and_forces`.
        example_inputs: as for :func:`trace_energy_and_forces`.
        positions_index: as for :func:`trace_energy_and_forces`.
        path: the ``.pt2`` file to write.
        inductor_configs: extra ``torch._inductor`` settings for the AOT compile.

    Returns:
        The path written.
    """
    exported = trace_energy_and_forces(model, example_inputs, positions_index=positions_index)
    configs = dict(inductor_configs or {})
    configs["aot_inductor.metadata"] = {_METADATA_KEY: json.dumps(exported.metadata)}
    return torch._inductor.aoti_compile_and_package(exported.program, package_path=os.fspath(path),
                                                    inductor_configs=configs)


def load_energy_and_forces(path: str | os.PathLike) -> ExportedEnergyAndForces:
    """Load a package written by :func:`export_energy_and_forces` (fastff is imported by then,
    so its custom ops are registered)."""
    runner = torch._inductor.aoti_load_package(os.fspath(path))
    raw = runner.get_metadata().get(_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{os.fspath(path)} is not a fastff energy-and-forces package (no "
                         "fastff metadata); write it with export_energy_and_forces")
    metadata = json.loads(raw)
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{os.fspath(path)} has package format {metadata.get('format')}, this "
                         f"fastff reads format {_FORMAT}")
    return ExportedEnergyAndForces(runner, metadata)


# ---------------------------------------------------------------- CUDA graphs
class CudaGraphStep:
    """A step captured in a CUDA graph (see :func:`cuda_graph_step`): ``step(*inputs)`` copies
    the inputs into the graph's static buffers, replays it and returns its static outputs
    (overwritten by the next call: clone what must be kept)."""

    def __init__(self, graph, static_inputs: list[Tensor], static_outputs):
        self.graph, self.static_inputs, self.static_outputs = graph, static_inputs, static_outputs

    def __call__(self, *inputs: Tensor):
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for static, x in zip(self.static_inputs, inputs, strict=True):
            if x is not static:
                static.copy_(x)
        self.graph.replay()
        return self.static_outputs


def cuda_graph_step(step: Callable[..., Any], *example_inputs: Tensor,
                    warmup: int = 3) -> CudaGraphStep:
    """Capture an MD step (any function of tensors that never synchronises with the host, e.g.
    energy and forces of a :class:`fastff.mm.ForceField` on the Triton backend) in a CUDA graph.

    The graph replays the step's kernels without Python, dispatch or launch overhead (what
    dominates small systems: tens of microseconds per kernel). Requirements, checked by the
    capture: CUDA tensors; no host synchronisation and no upload of host data inside ``step``
    (fastff's steady MD steps on the Triton backend have none; count them on any machine with
    :func:`fastff.testing.count_host_syncs`); the same shapes at every call. State kept on the
    host (Python counters, caches) is not updated by replays: lists are rebuilt on the device,
    and their status words are read at the caller's own synchronisation points (e.g.
    ``ff.check()`` when energies are logged).

    Args:
        step: the function to capture, called as ``step(*inputs)``.
        example_inputs: CUDA tensors of the shapes and dtypes of every later call; copied into
            the graph's static input buffers.
        warmup: calls before the capture (on a side stream), which run value checks, fill
            caches and build the lists.

    Returns:
        :class:`CudaGraphStep`.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_graph_step needs a CUDA device")
    for k, x in enumerate(example_inputs):
        if not isinstance(x, Tensor) or x.device.type != "cuda":
            raise ValueError(f"input {k} must be a CUDA tensor, got "
                             f"{type(x).__name__ if not isinstance(x, Tensor) else x.device}")
    static = [x.detach().clone() for x in example_inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(int(warmup), 1)):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            outputs = step(*static)
    except RuntimeError as exc:
        raise RuntimeError("cuda_graph_step: the step could not be captured (a host "
                           "synchronisation, an upload of host data or a CPU tensor inside "
                           "it?); fastff.testing.count_host_syncs() lists them: "
                           f"{exc}") from exc
    return CudaGraphStep(graph, static, outputs)
