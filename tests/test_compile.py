"""fastff.compile: SchNet, PaiNN and the MM ForceField under torch.compile (no graph break, no
recompile when the pair count or the atom count changes), the make_fx + torch.compile training
step, and torch.export / AOTInductor artifacts run on new positions with new neighbor lists;
everything against the eager model.

Sizes are tiny (F = 8, one interaction, 31-40 atoms): inductor compiles dominate the runtime.
Atom counts stay above 28: below that, inductor decomposes the [N, 1] x [1, 4] matmul of the
readout's backward and guards on N, which recompiles once when N crosses it.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import fastff
import fastff.compile as fc
import fastff.mm as fmm
import fastff.models as fm
from fastff import _checks
from fastff.systems import water_box

warnings.filterwarnings("ignore", message="fastff: .* falls back")
# emitted by torch's own modules while inductor and AOTInductor load
pytestmark = [pytest.mark.filterwarnings("ignore:.*torch.jit.script_method:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")]

F64, F32 = torch.float64, torch.float32
ELEMENTS = torch.tensor([1, 6, 7, 8])
CUTOFF = 0.5
# Compiled against eager, max |difference| / max |eager| per output: float64 only reorders
# sums (inductor fuses, AOTAutograd partitions); float32 inductor inference measured <= 3e-7.
CLOSE = {F64: 1e-12, F32: 1e-6}


def close(got, want, dtype, what="", scale=None):
    """max |got - want| within CLOSE of max |want| (or of ``scale``, the size of the terms a
    sum that cancels adds up)."""
    scale = (want.detach().abs().max() if scale is None else scale).clamp_min(1e-30)
    err = float((got.detach().double() - want.detach().double()).abs().max() / scale)
    assert err <= CLOSE[dtype], f"{what}: {err:.3g} relative to max |eager|"


def summed_terms(m, species, pos, cell, nl):
    """sum |e_i| of a one-system model's per-atom energies: the scale of its energy's float32
    rounding, where the total of terms of both signs cancels (seed 845246852: |E| 0.052,
    sum |e_i| 7.9, compiled against eager 6e-7)."""
    with torch.no_grad():
        return m.readout(m.atomic_features(species, pos, nl, m._cells(cell, 1, False))).abs().sum()


class Counting:
    """A torch.compile backend that counts its compilations."""

    def __init__(self, name):
        self.inner = torch._dynamo.lookup_backend(name)
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.calls += 1
        return self.inner(gm, example_inputs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def atoms(n, dtype, density=100.0):
    """n atoms of random species in a slightly skewed periodic cell, ~100 atoms/nm^3."""
    edge = (n / density) ** (1 / 3)
    cell = torch.eye(3, dtype=F64) * edge + 0.05 * edge * torch.rand(3, 3, dtype=F64)
    pos = torch.rand(n, 3, dtype=F64) @ cell
    species = ELEMENTS[torch.randint(0, len(ELEMENTS), (n,))]
    pos, cell = pos.to(dtype), cell.to(dtype)
    return species, pos, cell, fastff.neighbor_list(pos, CUTOFF, cell)


def distinct(sizes, dtype):
    """Systems of these atom counts whose pair counts all differ."""
    out = []
    for n in sizes:
        system = atoms(n, dtype)
        while any(len(system[3]) == len(other[3]) for other in out):
            system = atoms(n, dtype)
        out.append(system)
    return out


def model(name, dtype):
    if name == "schnet":
        return fm.SchNet(8, 1, 8, CUTOFF).to(dtype)
    return fm.PaiNN(8, 1, 8, CUTOFF).to(dtype)


def water(rng, dtype, cutoff=0.4):
    """27 unrelaxed TIP3P molecules (~0.97 nm box) and their force field, no Verlet skin."""
    box = water_box(27, seed=int(rng.integers(2**31)), density=0.9, relax_steps=0, dtype=dtype)
    return box, fmm.water_force_field(box, cutoff=cutoff, skin=0.0)


def eager_mm(ff, pos, cell, nl):
    p = pos.detach().clone().requires_grad_(True)
    e = ff(p, cell, nl=nl)
    return e.detach(), -torch.autograd.grad(e, p)[0]


def moved(rng, pos, scale, dtype):
    return pos + torch.as_tensor(rng.normal(0, scale, tuple(pos.shape)), dtype=dtype)


def moved_list(rng, box, scale, dtype, avoid=()):
    """Perturbed water positions and their half list, with a pair count not in ``avoid``."""
    while True:
        pos = moved(rng, box.positions, scale, dtype)
        nl = fastff.neighbor_list(pos, 0.4, box.cell, half=True)
        if len(nl) not in avoid:
            return pos, nl


# ---------------------------------------------------------------- value checks
def test_value_checks_skipped_only_while_compiling():
    @torch.compile(backend="eager", fullgraph=True)
    def branch(x):
        return x * 2 if _checks.checks_enabled() else x * 3

    x = torch.randn(4)
    assert torch.equal(branch(x), x * 3)
    assert _checks.checks_enabled()
    bad = torch.rand(8, 3)
    bad[5, 1] = float("nan")
    with pytest.raises(ValueError, match="positions contains NaN"):
        fastff.neighbor_list(bad, 0.5)
    with fastff.no_checks():
        assert not _checks.checks_enabled()


# ---------------------------------------------------------------- torch.compile inference
@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_model_forward_is_one_graph(name, rng):
    species, pos, cell, nl = atoms(32, F32)
    m = model(name, F32)
    fm.energy_and_forces(m, species, pos, cell, nl=nl)  # eager first: kernels imported
    explained = torch._dynamo.explain(m)(species, pos.requires_grad_(True), cell, nl=nl)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_force_field_forward_is_one_graph(rng):
    box, ff = water(rng, F32)
    nl = fastff.neighbor_list(box.positions, 0.4, box.cell, half=True)
    eager_mm(ff, box.positions, box.cell, nl)
    explained = torch._dynamo.explain(ff)(box.positions.requires_grad_(True), box.cell, nl=nl)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_compiled_models_do_not_recompile(name, rng):
    """aot_eager: dynamo + AOTAutograd with the fake impls (inductor codegen is tested below).
    The pair count changes at each call and the atom count at the third."""
    m = model(name, F64)
    backend = Counting("aot_eager")
    f = fc.compile_energy_and_forces(m, backend=backend)
    for k, (species, pos, cell, nl) in enumerate(distinct((36, 36, 31), F64)):
        with torch.no_grad():  # as in an MD loop: forces still come out
            energy, forces = f(species, pos, cell, nl=nl)
        want_e, want_f = fm.energy_and_forces(m, species, pos, cell, nl=nl)
        close(energy, want_e, F64, "energy")
        close(forces, want_f, F64, "forces")
        if k == 0:
            first = backend.calls
    assert backend.calls == first
    assert not counters["graph_break"]


def test_compiled_force_field_does_not_recompile(rng):
    box, ff = water(rng, F64)
    backend = Counting("aot_eager")
    f = fc.compile_energy_and_forces(ff, backend=backend)
    sizes: set[int] = set()
    for k in range(3):
        pos, nl = moved_list(rng, box, 0.01, F64, avoid=sizes)
        sizes.add(len(nl))
        energy, forces = f(pos, box.cell, nl=nl)
        want_e, want_f = eager_mm(ff, pos, box.cell, nl)
        close(energy, want_e, F64, "energy")
        close(forces, want_f, F64, "forces")
        if k == 0:
            first = backend.calls
    assert backend.calls == first
    assert not counters["graph_break"]


@pytest.mark.slow
def test_inductor_schnet_float32(rng):
    m = model("schnet", F32)
    backend = Counting("inductor")
    f = fc.compile_energy_and_forces(m, backend=backend)
    for k, (species, pos, cell, nl) in enumerate(distinct((40, 34), F32)):
        energy, forces = f(species, pos, cell, nl=nl)
        want_e, want_f = fm.energy_and_forces(m, species, pos, cell, nl=nl)
        close(energy, want_e, F32, "energy", scale=summed_terms(m, species, pos, cell, nl))
        close(forces, want_f, F32, "forces")
        if k == 0:
            first = backend.calls
    assert backend.calls == first


def test_compiled_wrapper_bad_input(rng):
    m = model("schnet", F32)
    f = fc.compile_energy_and_forces(m, backend="eager")
    species, pos, cell, nl = atoms(32, F32)
    with pytest.raises(ValueError, match="nl is required"):
        f(species, pos, cell, nl=None)
    with pytest.raises(ValueError, match="built for 32 atoms"):
        f(species[:30], pos[:30], cell, nl=nl)
    bad = pos.clone()
    bad[3, 0] = float("inf")
    with pytest.raises(ValueError, match="positions contains NaN or inf"):
        f(species, bad, cell, nl=nl)
    with pytest.raises(TypeError, match="positions_index"):
        fc.compile_energy_and_forces(torch.nn.Linear(3, 1))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fc.compile_energy_and_forces(lambda x: x)
    with pytest.raises(ValueError, match="positions_index must be"):
        fc.compile_energy_and_forces(m, positions_index=-1)


# ---------------------------------------------------------------- make_fx + compile training
def force_loss(energy, forces, energy_ref, forces_ref):
    return (energy - energy_ref).square().mean() + (forces - forces_ref).square().mean()


def eager_step(m, species, pos, cell, nl, targets):
    energy, forces = fm.energy_and_forces(m, species, pos, cell, nl=nl, training=True)
    loss = force_loss(energy, forces, *targets)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p for p in m.parameters() if p.requires_grad]
    return loss.detach(), dict(zip(names, torch.autograd.grad(loss, params), strict=True))


def check_training(name, dtype, backend_name, sizes):
    m = model(name, dtype)
    m.embedding.weight.requires_grad_(False)  # a frozen parameter: an input, no gradient
    backend = Counting(backend_name)
    step = fc.compile_training_step(m, force_loss, backend=backend)
    for k, (species, pos, cell, nl) in enumerate(distinct(sizes, dtype)):
        targets = (torch.randn(1, dtype=dtype), torch.randn(len(species), 3, dtype=dtype))
        loss, grads = step(species, pos, cell, nl=nl, targets=targets)
        want_loss, want_grads = eager_step(m, species, pos, cell, nl, targets)
        close(loss, want_loss, dtype, "loss")
        assert list(grads) == list(want_grads)
        for p_name, g in grads.items():
            close(g, want_grads[p_name], dtype, p_name)
        if k == 0:
            first = backend.calls
        # an optimizer step between calls: parameters are graph inputs, nothing retraces
        step.assign_grads(grads)
        params = [p for p in m.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # random targets: keep the step small
        torch.optim.SGD(params, lr=1e-2).step()
    assert step.traces == 1
    assert backend.calls == first


@pytest.mark.slow
def test_training_step_schnet_float64_inductor(rng):
    check_training("schnet", F64, "inductor", (36, 36, 31))


def test_training_step_painn_float32(rng):
    """backend "eager" runs the traced graph as dynamo captured it: checks the trace itself
    (symbolic N and E, the double backward through the fastff ops) at float32."""
    check_training("painn", F32, "eager", (36, 36, 31))


def test_training_step_bad_input(rng):
    m = model("schnet", F32)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        fc.compile_training_step(m, None)
    step = fc.compile_training_step(m, force_loss, backend="eager")
    species, pos, cell, nl = atoms(32, F32)
    with pytest.raises(ValueError, match="batched systems"):
        step(species, pos, cell, None, torch.zeros(32, dtype=torch.int64), nl=nl)
    with pytest.raises(TypeError, match="targets must be tensors"):
        step(species, pos, cell, nl=nl, targets=(1.0,))
    m.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        step(species, pos, cell, nl=nl)


# ---------------------------------------------------------------- torch.export / AOTInductor
@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_exported_model_new_atoms_and_pairs(name, tmp_path, rng):
    m = model(name, F64)
    first, (species, pos, cell, nl2) = distinct((36, 31), F64)
    exported = fc.trace_energy_and_forces(m, first)
    assert any("fastff" in str(node.target) for node in exported.program.graph.nodes)
    want_e, want_f = fm.energy_and_forces(m, species, pos, cell, nl=nl2)
    energy, forces = exported(species, pos, cell, nl=nl2)
    close(energy, want_e, F64, "energy")
    close(forces, want_f, F64, "forces")
    # the program round-trips through torch.export.save / load (fastff imported here)
    path = tmp_path / f"{name}.pt2"
    torch.export.save(exported.program, path)
    loaded = fc.ExportedEnergyAndForces(torch.export.load(path).module(), exported.metadata)
    energy, forces = loaded(species, pos, cell, nl=nl2)
    close(forces, want_f, F64, "forces after save/load")


def test_exported_force_field_new_pairs(rng):
    box, ff = water(rng, F64)
    nl = fastff.neighbor_list(box.positions, 0.4, box.cell, half=True)
    exported = fc.trace_energy_and_forces(ff, (box.positions, box.cell, nl))
    pos, nl2 = moved_list(rng, box, 0.02, F64, avoid={len(nl)})
    energy, forces = exported(pos, box.cell, nl=nl2)
    want_e, want_f = eager_mm(ff, pos, box.cell, nl2)
    close(energy, want_e, F64, "energy")
    close(forces, want_f, F64, "forces")
    full = fastff.neighbor_list(pos, 0.4, box.cell)
    with pytest.raises(ValueError, match="half list"):
        exported(pos, box.cell, nl=full)
    other = fastff.neighbor_list(pos, 0.45, box.cell, half=True)
    with pytest.raises(ValueError, match="cutoff"):
        exported(pos, box.cell, nl=other)
    with pytest.raises(ValueError, match="differ from the exported"):
        exported(pos, None, nl=nl2)
    with pytest.raises(TypeError, match="dtype"):
        exported(pos.float(), box.cell.float(), nl=nl2)


LOADER = """
import sys, torch
path, inputs, out = sys.argv[1:4]
try:
    torch._inductor.aoti_load_package(path)
    without = "loaded"
except RuntimeError as err:
    without = str(err)
import fastff.compile
f = fastff.compile.load_energy_and_forces(path)
species, pos, cell, (i, j, shifts, ptr) = torch.load(inputs)
nl = fastff.neighbor_list(pos, f.metadata["cutoff"], cell)
assert torch.equal(nl.i, i) and torch.equal(nl.j, j)
energy, forces = f(species, pos, cell, nl=nl)
torch.save({"energy": energy, "forces": forces, "without": without}, out)
"""


@pytest.mark.slow
def test_aoti_package_in_a_fresh_process(tmp_path, rng):
    """AOTInductor compiles C++ (tens of seconds). The package is loaded by a new Python
    process, first without fastff (fails: the custom ops are not registered), then with it."""
    m = model("schnet", F32)
    first, (species, pos, cell, nl2) = distinct((36, 31), F32)
    path = fc.export_energy_and_forces(m, first, tmp_path / "schnet.pt2")
    meta = json.loads(torch._inductor.aoti_load_package(path).get_metadata()["fastff"])
    assert meta["model"] == "SchNet" and meta["half"] is False
    inputs, out = tmp_path / "inputs.pt", tmp_path / "out.pt"
    torch.save((species, pos, cell, (nl2.i, nl2.j, nl2.shifts, nl2.ptr)), inputs)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-c", LOADER, str(path), str(inputs), str(out)], check=True,
                   env=env, timeout=300)
    result = torch.load(out)
    assert "fastff::" in result["without"]
    want_e, want_f = fm.energy_and_forces(m, species, pos, cell, nl=nl2)
    close(result["energy"], want_e, F32, "energy", scale=summed_terms(m, species, pos, cell, nl2))
    close(result["forces"], want_f, F32, "forces")
