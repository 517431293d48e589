"""fastff.interop.pyg against the unmodified torch_geometric SchNet: accelerate (the same object,
same parameters) and from_pyg (a fastff model), on molecules and on a periodic water box, float64
and float32, energies, forces and force-matching parameter gradients, and bad input."""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch

import fastff
from fastff import systems
from fastff.models import SchNet as FastSchNet
from fastff.models import energy_and_forces
from fastff.testing import assert_close_scaled

pyg = pytest.importorskip("torch_geometric.nn.models.schnet")
fp = pytest.importorskip("fastff.interop.pyg")

CUTOFF = 5.0  # Angstrom


@pytest.fixture
def float64_defaults():
    """torch_geometric builds its gaussian grid and log 2 in the default dtype: a float64 model
    is one built under float64 defaults (see fastff.interop.pyg)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def brute_force_graph(cutoff: float = CUTOFF):
    """torch_geometric's radius graph (source row 0, target row 1) in plain torch: every pair of
    distinct atoms of one molecule closer than the cutoff."""
    def graph(pos, batch):
        d = torch.cdist(pos.detach(), pos.detach())
        mask = (d < cutoff) & (batch[:, None] == batch[None, :])
        mask.fill_diagonal_(False)
        target, source = mask.nonzero().T
        edge_index = torch.stack([source, target])
        return edge_index, (pos[source] - pos[target]).norm(dim=-1)
    return graph


def periodic_graph(cell: torch.Tensor, cutoff: float = CUTOFF):
    """fastff's periodic pairs handed to torch_geometric as its interaction graph."""
    def graph(pos, batch):
        nl = fastff.neighbor_list(pos, cutoff, cell)
        return torch.stack([nl.j, nl.i]), nl.distances(pos, cell)
    return graph


def make_model(rng, *, hidden=24, filters=16, interactions=2, gaussians=12, dtype=torch.float64,
               **kwargs) -> pyg.SchNet:
    torch.manual_seed(int(rng.integers(2**31)))
    model = pyg.SchNet(hidden_channels=hidden, num_filters=filters,
                       num_interactions=interactions, num_gaussians=gaussians, cutoff=CUTOFF,
                       **kwargs)
    with torch.no_grad():  # trained-looking weights: non-zero biases everywhere
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.to(dtype)


def molecules(rng, sizes=(7, 12, 5), dtype=torch.float64):
    """(z, pos [A], batch) of a few random molecules, atoms at least 0.9 A apart."""
    zs, ps, bs = [], [], []
    for k, n in enumerate(sizes):
        pts: list[np.ndarray] = []
        while len(pts) < n:
            x = rng.uniform(0, 4.5, 3)
            if all(np.linalg.norm(x - y) > 0.9 for y in pts):
                pts.append(x)
        zs.append(rng.choice([1, 6, 7, 8], n))
        ps.append(np.array(pts))
        bs.append(np.full(n, k))
    return (torch.as_tensor(np.concatenate(zs)), torch.as_tensor(np.concatenate(ps), dtype=dtype),
            torch.as_tensor(np.concatenate(bs)))


def energy_forces(model, z, pos, batch, *, create_graph=False):
    pos = pos.detach().requires_grad_(True)
    energy = model(z, pos, batch)
    (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
    return energy, -grad


def force_matching_grads(model, z, pos, batch, target_e, target_f):
    """Parameter gradients of a loss on energies and forces (needs the second derivative)."""
    energy, forces = energy_forces(model, z, pos, batch, create_graph=True)
    loss = (energy.squeeze(-1) - target_e).square().mean() + (forces - target_f).square().mean()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {name: g for (name, _), g in zip(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], grads, strict=True)}


def assert_same_outputs(accelerated, original, z, pos, batch, *, kind="model",
                        dtype=torch.float64, training=True):
    e1, f1 = energy_forces(accelerated, z, pos, batch)
    e0, f0 = energy_forces(original, z, pos, batch)
    assert_close_scaled(e1, e0, kind, dtype, "energies")
    assert_close_scaled(f1, f0, kind, dtype, "forces")
    if not training:
        return
    target_e = e0.detach().squeeze(-1) * 1.1 + 0.3
    target_f = f0.detach() * 0.9
    g1 = force_matching_grads(accelerated, z, pos, batch, target_e, target_f)
    g0 = force_matching_grads(original, z, pos, batch, target_e, target_f)
    assert g1.keys() == g0.keys()
    for name in g0:
        if g0[name] is None:
            assert g1[name] is None or not bool(g1[name].any()), name
            continue
        assert_close_scaled(g1[name], g0[name], "training", dtype, f"d loss / d {name}")


# --- accelerate: equality with the unmodified model ---------------------------------------------

OPTIONS = [
    {},
    {"readout": "mean"},
    {"mean": 1.5, "std": 0.7},
    {"atomref": "random"},
    {"hidden": 16, "filters": 32},
    {"dipole": True},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_accelerate_matches_torch_geometric_on_molecules(rng, float64_defaults, options):
    options = dict(options)
    if options.get("atomref") == "random":
        options["atomref"] = torch.as_tensor(rng.normal(size=(100, 1)))
    original = make_model(rng, interaction_graph=brute_force_graph(), **options)
    accelerated = fp.accelerate(copy.deepcopy(original))
    z, pos, batch = molecules(rng)
    assert_same_outputs(accelerated, original, z, pos, batch,
                        training=not options.get("dipole"))


def test_default_radius_graph_is_served_by_fastff(rng, float64_defaults):
    """The default RadiusInteractionGraph (pyg-lib's radius, absent here) runs as fastff's list:
    the same energies as torch_geometric given the same pairs."""
    accelerated = fp.accelerate(make_model(rng, max_num_neighbors=64))
    original = make_model(rng, interaction_graph=brute_force_graph())
    original.load_state_dict(accelerated.state_dict())
    z, pos, batch = molecules(rng)
    assert_same_outputs(accelerated, original, z, pos, batch)
    assert_same_outputs(accelerated, original, z[:7], pos[:7], None, training=False)


def test_periodic_water_box_through_interaction_graph(rng, float64_defaults):
    box = systems.water_box(64, seed=int(rng.integers(2**31)), dtype=torch.float64)
    cell = box.cell * 10.0  # nm -> A: 12.5 A, wider than twice the cutoff
    graph = periodic_graph(cell)
    original = make_model(rng, hidden=32, filters=32, interaction_graph=graph)
    accelerated = fp.accelerate(copy.deepcopy(original))
    assert_same_outputs(accelerated, original, box.species, box.positions * 10.0, None)


def test_float32_within_1e5(rng):
    original = make_model(rng, dtype=torch.float32, interaction_graph=brute_force_graph())
    accelerated = fp.accelerate(copy.deepcopy(original))
    z, pos, batch = molecules(rng, dtype=torch.float32)
    assert_same_outputs(accelerated, original, z, pos, batch, kind="interop",
                        dtype=torch.float32, training=False)


def test_float32_defaults_in_float64_warn_and_stay_close(rng):
    original = make_model(rng, interaction_graph=brute_force_graph())  # built under float32
    with pytest.warns(UserWarning, match="float32 defaults"):
        accelerated = fp.accelerate(copy.deepcopy(original))
    z, pos, batch = molecules(rng)
    e1, f1 = energy_forces(accelerated, z, pos, batch)
    e0, f0 = energy_forces(original, z, pos, batch)
    assert_close_scaled(e1, e0, "interop", torch.float32, "energies")
    assert_close_scaled(f1, f0, "interop", torch.float32, "forces")


def test_same_object_parameters_state_dict_and_optimizer(rng, float64_defaults):
    model = make_model(rng, interaction_graph=brute_force_graph())
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    z, pos, batch = molecules(rng)
    assert fp.accelerate(model) is model
    assert isinstance(model, pyg.SchNet)
    assert list(model.state_dict()) == keys
    assert all(p is params[name] for name, p in model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    _, forces = energy_forces(model, z, pos, batch, create_graph=True)
    forces.square().sum().backward()  # a force-matching step
    optimizer.step()
    moved = [name for name, p in params.items() if not torch.equal(p.detach(), before[name])]
    assert {"interactions.0.mlp.0.weight", "interactions.1.mlp.2.bias",
            "interactions.0.conv.lin1.weight"} <= set(moved)
    # the step changed the filter networks: the accelerated model follows them
    reference = copy.deepcopy(model)
    fp.restore(reference)
    assert type(reference) is pyg.SchNet
    assert_same_outputs(model, reference, z, pos, batch, training=False)


def test_saved_and_copied_models_rebuild(rng, float64_defaults):
    model = fp.accelerate(make_model(rng, max_num_neighbors=64))
    z, pos, batch = molecules(rng)
    expected, _ = energy_forces(model, z, pos, batch)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is fp.AcceleratedSchNet
    assert_close_scaled(energy_forces(loaded, z, pos, batch)[0], expected, "model",
                        torch.float64, "loaded")
    assert_close_scaled(energy_forces(copy.deepcopy(model), z, pos, batch)[0], expected,
                        "model", torch.float64, "deepcopy")


def test_tabulate_says_so_and_stays_close(rng, float64_defaults):
    original = make_model(rng, interaction_graph=brute_force_graph())
    with pytest.warns(UserWarning, match=r"tabulate=True.*no gradient.*table error <= "):
        tabulated = fp.accelerate(copy.deepcopy(original), tabulate=True)
    z, pos, batch = molecules(rng)
    e1, f1 = energy_forces(tabulated, z, pos, batch)
    e0, f0 = energy_forces(original, z, pos, batch)
    # 1000 knots: table error ~1e-9 of max|W|, compounded through two interactions
    assert_close_scaled(e1, e0, "interop", torch.float32, "tabulated energies")
    assert_close_scaled(f1, f0, "interop", torch.float32, "tabulated forces")


# --- accelerate: bad input ----------------------------------------------------------------------

def test_rejects_what_it_cannot_serve(rng, float64_defaults):
    with pytest.raises(TypeError, match="torch_geometric.nn.models.SchNet"):
        fp.accelerate(torch.nn.Linear(2, 2))

    class Mine(pyg.SchNet):
        pass

    with pytest.raises(TypeError, match="Mine subclasses"):
        fp.accelerate(Mine(8, 8, 1, 4, cutoff=CUTOFF))
    model = make_model(rng)
    model.interactions[1].mlp[1] = torch.nn.Tanh()
    with pytest.raises(ValueError, match=r"interactions\[1\]\.mlp"):
        fp.accelerate(model)
    model = make_model(rng)
    with torch.no_grad():
        model.distance_expansion.offset[3] += 0.1
    with pytest.raises(ValueError, match="distance_expansion.offset"):
        fp.accelerate(model)
    model = make_model(rng)
    model.interactions[0].conv.cutoff = 4.0
    with pytest.raises(ValueError, match=r"interactions\[0\]\.conv\.cutoff"):
        fp.accelerate(model)
    # a failed accelerate leaves the model as it was
    assert type(model) is pyg.SchNet


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_graph_errors_name_the_problem(rng, float64_defaults, backend):
    z, pos, batch = molecules(rng)
    dense = fp.accelerate(make_model(rng, max_num_neighbors=3))
    with pytest.raises(ValueError, match="max_num_neighbors"):
        dense(z, pos, batch)
    base = brute_force_graph()

    def one_way(p, b):
        edge_index, w = base(p, b)
        keep = edge_index[0] < edge_index[1]
        return edge_index[:, keep], w[keep]

    def twice(p, b):
        edge_index, w = base(p, b)
        return torch.cat([edge_index, edge_index], 1), torch.cat([w, w])

    def one_repeat(p, b):  # a single edge twice, its mirror once
        edge_index, w = base(p, b)
        k = int(torch.randint(edge_index.shape[1], ()))
        return (torch.cat([edge_index, edge_index[:, k:k + 1]], 1),
                torch.cat([w, w[k:k + 1]]))

    def too_long(p, b):
        return brute_force_graph(CUTOFF + 1.0)(p, b)

    far = pos.clone()
    far[1] = far[0] + torch.tensor([5.5, 0.0, 0.0])  # a pair within too_long's reach only
    for graph, message in ((one_way, "without their mirror"), (twice, "repeated edges"),
                           (one_repeat, "repeated edges"), (too_long, "> cutoff")):
        model = fp.accelerate(make_model(rng, interaction_graph=graph), backend=backend)
        with pytest.raises(ValueError, match=message):
            model(z, far, batch)


# --- from_pyg -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", OPTIONS[:5], ids=lambda o: "-".join(o) or "plain")
def test_from_pyg_matches_torch_geometric(rng, float64_defaults, options):
    options = dict(options)
    if options.get("atomref") == "random":
        options["atomref"] = torch.as_tensor(rng.normal(size=(100, 1)))
    original = make_model(rng, interaction_graph=brute_force_graph(), **options)
    converted = FastSchNet.from_pyg(original, energy_unit="eV")
    assert isinstance(converted, FastSchNet)
    assert (converted.length_unit, converted.energy_unit) == ("Angstrom", "eV")
    z, pos, batch = molecules(rng)
    e1, f1 = energy_and_forces(converted, z, pos, batch=batch)
    e0, f0 = energy_forces(original, z, pos, batch)
    assert_close_scaled(e1, e0.squeeze(-1), "model", torch.float64, "energies")
    assert_close_scaled(f1, f0, "model", torch.float64, "forces")


def test_from_pyg_periodic_water_box(rng, float64_defaults):
    box = systems.water_box(64, seed=int(rng.integers(2**31)), dtype=torch.float64)
    cell, pos = box.cell * 10.0, box.positions * 10.0
    original = make_model(rng, interaction_graph=periodic_graph(cell))
    converted = FastSchNet.from_pyg(original, energy_unit="kcal/mol")
    e1, f1 = energy_and_forces(converted, box.species, pos, cell)
    e0, f0 = energy_forces(original, box.species, pos, None)
    assert_close_scaled(e1, e0.squeeze(-1), "model", torch.float64, "energies")
    assert_close_scaled(f1, f0, "model", torch.float64, "forces")


def test_from_pyg_arguments(rng, float64_defaults):
    model = make_model(rng)
    with pytest.raises(TypeError, match="energy_unit"):
        FastSchNet.from_pyg(model)  # required: torch_geometric models carry no units
    with pytest.raises(ValueError, match="energy_unit"):
        FastSchNet.from_pyg(model, energy_unit="furlong")
    with pytest.raises(ValueError, match="dipole"):
        FastSchNet.from_pyg(make_model(rng, dipole=True), energy_unit="eV")
    with pytest.raises(ValueError, match="readout"):
        FastSchNet.from_pyg(make_model(rng, readout="max"), energy_unit="eV")
    nm_model = FastSchNet.from_pyg(model, energy_unit="eV", length_unit="nm")
    assert nm_model.length_unit == "nm"
    # the copy is independent of the original
    with torch.no_grad():
        model.lin2.bias.add_(1.0)
    assert not torch.equal(nm_model.readout[1].bias, model.lin2.bias)


def test_from_pyg_model_in_ase_reads_its_units(rng, float64_defaults):
    ase = pytest.importorskip("ase")
    from fastff.ase import Calculator

    original = make_model(rng, interaction_graph=brute_force_graph())
    converted = FastSchNet.from_pyg(original, energy_unit="eV")
    z, pos, batch = molecules(rng, sizes=(9,))
    atoms = ase.Atoms(numbers=z.numpy(), positions=pos.numpy())
    atoms.calc = Calculator(converted)  # Angstrom and eV from the model: no conversion
    e0, f0 = energy_forces(original, z, pos, batch)
    assert math.isclose(atoms.get_potential_energy(), float(e0.detach()), rel_tol=1e-10)
    assert_close_scaled(torch.as_tensor(atoms.get_forces()), f0, "model", torch.float64,
                        "forces")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atoms.get_potential_energy()


def test_from_pyg_model_compiles_and_exports(rng, float64_defaults):
    from fastff import compile as fc

    original = make_model(rng, interaction_graph=brute_force_graph(),
                          atomref=torch.as_tensor(rng.normal(size=(100, 1))))
    converted = FastSchNet.from_pyg(original, energy_unit="eV")
    box = systems.water_box(27, seed=int(rng.integers(2**31)), dtype=torch.float64)
    species, pos, cell = box.species, box.positions * 10.0, box.cell * 10.0
    nl = fastff.neighbor_list(pos, converted.cutoff, cell)
    want_e, want_f = energy_and_forces(converted, species, pos, cell, nl=nl)
    exported = fc.trace_energy_and_forces(converted, (species, pos, cell, nl))
    energy, forces = exported(species, pos, cell, nl=nl)
    assert_close_scaled(energy, want_e, "model", torch.float64, "exported energy")
    assert_close_scaled(forces, want_f, "model", torch.float64, "exported forces")
    compiled = fc.compile_energy_and_forces(converted, backend="eager")
    energy, forces = compiled(species, pos, cell, nl=nl)
    assert_close_scaled(forces, want_f, "model", torch.float64, "compiled forces")
