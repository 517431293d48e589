"""fastff.interop.mace: accelerated mace-torch models against the unmodified models (random
weights, every supported configuration), on molecules, triclinic boxes and batches; force
matching's parameter gradients; mace's own MACECalculator; shared parameters; refusals."""

import copy
import os

# e3nn 0.4 loads its constants with torch.load, which torch >= 2.6 refuses by default; set before
# mace / e3nn are imported (fastff.interop.mace allow-lists what it needs, but mace is imported
# here first).
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

mace_modules = pytest.importorskip("mace.modules")
o3 = pytest.importorskip("e3nn.o3")

import fastff  # noqa: E402
from fastff.interop import mace as fm  # noqa: E402
from fastff.testing import assert_close_scaled  # noqa: E402

# mace and e3nn script and trace their modules at construction (torch.jit deprecation notices)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch",
                                        "ignore::UserWarning:torch")

RESIDUAL = mace_modules.RealAgnosticResidualInteractionBlock
PLAIN = mace_modules.RealAgnosticInteractionBlock
CUTOFF = 3.5


def build(hidden="8x0e", max_ell=3, correlation=3, first=RESIDUAL, rest=RESIDUAL,
          radial="bessel", scale_shift=True, num_interactions=2, dtype=torch.float64, **extra):
    """A small mace model with random weights (every parameter perturbed away from its
    initialisation, so no path is accidentally zero)."""
    kwargs = dict(r_max=CUTOFF, num_bessel=6, num_polynomial_cutoff=5, max_ell=max_ell,
                  interaction_cls=rest, interaction_cls_first=first,
                  num_interactions=num_interactions, num_elements=3,
                  hidden_irreps=o3.Irreps(hidden), MLP_irreps=o3.Irreps("8x0e"),
                  gate=torch.nn.functional.silu, atomic_energies=np.array([-1.0, -2.0, -0.5]),
                  avg_num_neighbors=8.0, atomic_numbers=[1, 6, 8], correlation=correlation,
                  radial_type=radial, radial_MLP=[16, 16])
    kwargs.update(extra)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        if scale_shift:
            model = mace_modules.ScaleShiftMACE(atomic_inter_scale=1.3, atomic_inter_shift=0.2,
                                                **kwargs)
        else:
            model = mace_modules.MACE(**kwargs)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return model.to(dtype)


CONFIGS = {
    "8x0e-l3-c3-residual-bessel": dict(),
    "8x0e+8x1o-l2-c2-plain-first-gaussian": dict(hidden="8x0e+8x1o", max_ell=2, correlation=2,
                                                 first=PLAIN, radial="gaussian",
                                                 scale_shift=False),
    "4x0e+4x1o-l3-c3-three-interactions": dict(hidden="4x0e+4x1o", num_interactions=3,
                                               correlation=[3, 2, 1]),
    "8x0e-l1-c1-plain-no-cutoff-applied": dict(max_ell=1, correlation=1, first=PLAIN,
                                               rest=PLAIN, apply_cutoff=False),
    "4x0e+4x1o-agnostic-keep-last-irreps": dict(hidden="4x0e+4x1o", max_ell=2,
                                                use_agnostic_product=True,
                                                keep_last_layer_irreps=True),
}


def system(rng, n=14, periodic=True, dtype=torch.float64, min_distance=0.0):
    """Positions (A), atomic numbers, and a full neighbor list in a triclinic box (or none).
    ``min_distance``: atoms closer than this are redrawn (float32 tests: 0.8 A, the physical
    range; at 0.2 A forces reach ~350 eV/A and float32 rounding grows with them)."""
    z = torch.from_numpy(rng.choice([1, 6, 8], n))
    cell = torch.tensor([[4.2, 0.0, 0.0], [0.9, 4.0, 0.0], [-0.6, 0.7, 4.4]],
                        dtype=torch.float64) if periodic else None
    box = cell if periodic else 4.0 * torch.eye(3, dtype=torch.float64)

    def draw(k):
        return torch.from_numpy(rng.random((k, 3))) @ box

    pos = draw(n)
    while min_distance > 0:
        close = torch.unique(fastff.neighbor_list(pos, min_distance, cell).i)
        if close.numel() == 0:
            break
        pos[close] = draw(close.numel())
    nl = fastff.neighbor_list(pos, CUTOFF, cell)
    return pos.to(dtype), z, nl, None if cell is None else cell.to(dtype)


def outputs(model, pos, z, nl, cell, **kw):
    return fm.evaluate(model, pos.clone(), z, torch.stack([nl.i, nl.j]), nl.shifts, cell, **kw)


def same(a, b, dtype, what, kind="mace"):
    assert_close_scaled(b, a, kind, dtype, what)


def float32_kind(key):
    """The float32 bar of an output: stress has its own (a cancelling virial)."""
    return "mace-stress" if key == "stress" else "mace"


def force_matching(m, pos, z, nl, cell, target):
    """(outputs, parameter gradients) of a loss on forces and stress (training=True)."""
    out = outputs(m, pos, z, nl, cell, compute_stress=True, training=True)
    loss = ((out["forces"] - target) ** 2).sum() + (out["stress"] ** 2).sum()
    m.zero_grad()
    loss.backward()
    return out, {k: p.grad for k, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_energies_forces_stress_match_mace(rng, name):
    model = build(**CONFIGS[name])
    fast = fm.accelerate(copy.deepcopy(model))
    for periodic in (True, False):
        pos, z, nl, cell = system(rng, periodic=periodic)
        want = outputs(model, pos, z, nl, cell, compute_stress=periodic)
        got = outputs(fast, pos, z, nl, cell, compute_stress=periodic)
        keys = ("energy", "node_energy", "forces", "node_feats") + (("stress",) if periodic
                                                                     else ())
        for key in keys:
            same(want[key], got[key], torch.float64, f"{name} {key} periodic={periodic}")


def test_batch_of_systems(rng):
    """A molecule and two boxes of different cells in one call (mace's batch / ptr)."""
    model = build(hidden="8x0e+8x1o", max_ell=2)
    fast = fm.accelerate(copy.deepcopy(model))
    parts = [system(rng, n=9, periodic=False), system(rng, n=12), system(rng, n=10)]
    positions, numbers, senders, receivers, shifts, cells, batch = [], [], [], [], [], [], []
    offset = 0
    for b, (pos, z, nl, cell) in enumerate(parts):
        positions.append(pos)
        numbers.append(z)
        senders.append(nl.i + offset)
        receivers.append(nl.j + offset)
        shifts.append(nl.shifts)
        cells.append(torch.zeros(3, 3, dtype=torch.float64) if cell is None else cell * (1 + b))
        batch.append(torch.full((len(pos),), b))
        offset += len(pos)
    args = (torch.cat(positions), torch.cat(numbers),
            torch.stack([torch.cat(senders), torch.cat(receivers)]), torch.cat(shifts),
            torch.stack(cells), torch.cat(batch))
    want = fm.evaluate(model, args[0].clone(), *args[1:], compute_stress=True)
    got = fm.evaluate(fast, args[0].clone(), *args[1:], compute_stress=True)
    assert want["energy"].shape == (3,)
    for key in ("energy", "forces", "stress"):
        same(want[key], got[key], torch.float64, key)


@pytest.mark.parametrize("name", ["8x0e-l3-c3-residual-bessel",
                                  "8x0e+8x1o-l2-c2-plain-first-gaussian"])
def test_force_matching_parameter_gradients(rng, name):
    """training=True: forces with a graph, a loss on energies, forces and stress, parameter
    gradients through the double backward."""
    model = build(**CONFIGS[name])
    fast = fm.accelerate(copy.deepcopy(model))
    pos, z, nl, cell = system(rng)
    target = torch.randn(len(pos), 3, dtype=torch.float64)
    grads = []
    for m in (model, fast):
        out = outputs(m, pos, z, nl, cell, compute_stress=True, training=True)
        loss = (((out["forces"] - target) ** 2).sum() + 0.1 * out["energy"].square().sum()
                + (out["stress"] ** 2).sum())
        m.zero_grad()
        loss.backward()
        grads.append({k: p.grad for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for key, want in grads[0].items():
        same(want, grads[1][key], torch.float64, key, kind="training")


def test_frozen_radial_networks_recompute_the_weights(rng, monkeypatch):
    """Frozen radial networks (molecular dynamics): each interaction before the last keeps its
    network's last activation and recomputes the weights when the backward reads them. Forces
    and stress as the unmodified model; force matching of the other parameters (the double
    backward through the recomputed weights) as well."""
    model = build(hidden="8x0e+8x1o", num_interactions=3, correlation=[3, 2, 1])
    for block in model.interactions:
        block.conv_tp_weights.requires_grad_(False)
    fast = fm.accelerate(copy.deepcopy(model))
    recomputed = []
    saved_as_activation = fm._saved_as_activation
    monkeypatch.setattr(fm, "_saved_as_activation", lambda w, *a: recomputed.append(w.shape) or
                        saved_as_activation(w, *a))
    pos, z, nl, cell = system(rng, n=16)
    want = outputs(model, pos, z, nl, cell, compute_stress=True)
    got = outputs(fast, pos, z, nl, cell, compute_stress=True)
    assert len(recomputed) == 2  # interactions 0 and 1
    for key in ("energy", "forces", "stress"):
        same(want[key], got[key], torch.float64, key)
    target = torch.randn(len(pos), 3, dtype=torch.float64)
    grads = [force_matching(m, pos, z, nl, cell, target)[1] for m in (model, fast)]
    assert len(recomputed) == 4 and grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for key, want_grad in grads[0].items():
        same(want_grad, grads[1][key], torch.float64, key, kind="training")


def test_radial_network_over_edge_blocks(rng, monkeypatch):
    """On CPU the radial networks' hidden layers run over blocks of edges (a few MB each at
    real sizes); with blocks of a few edges here, the energies, forces, stress and force
    matching's parameter gradients still match the unmodified model."""
    edges = []
    real_split = torch.Tensor.split

    def counting_split(self, size, *args, **kwargs):
        parts = real_split(self, size, *args, **kwargs)
        edges.append(len(parts))
        return parts

    model = build(hidden="8x0e+8x1o", max_ell=2)
    fast = fm.accelerate(copy.deepcopy(model))
    pos, z, nl, cell = system(rng)
    rows = int(rng.integers(3, 11))
    monkeypatch.setattr(fm, "_EDGE_BLOCK_BYTES", rows * 16 * 8)  # 16 hidden units, float64
    monkeypatch.setattr(torch.Tensor, "split", counting_split)
    target = torch.randn(len(pos), 3, dtype=torch.float64)
    results = [force_matching(m, pos, z, nl, cell, target) for m in (model, fast)]
    assert max(edges) >= len(nl.i) // rows  # the blocks were taken
    (want, want_grads), (got, got_grads) = results
    for key in ("energy", "forces", "stress"):
        same(want[key], got[key], torch.float64, key)
    assert want_grads.keys() == got_grads.keys()
    for key, grad in want_grads.items():
        same(grad, got_grads[key], torch.float64, key, kind="training")
    # frozen weights (MD): the blocks recompute their activations in the backward; forces, and
    # a Hessian-vector product through that recomputation, match
    direction = torch.randn(len(pos), 3, dtype=torch.float64)
    recomputed = []
    real_checkpoint = fm.checkpoint

    def counting_checkpoint(*args, **kwargs):
        recomputed.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(fm, "checkpoint", counting_checkpoint)
    curvature = []
    for m in (model, fast):
        m.requires_grad_(False)
        x = pos.clone()  # mace sets requires_grad on the positions it is given
        out = fm.evaluate(m, x, z, torch.stack([nl.i, nl.j]), nl.shifts, cell, training=True)
        (hvp,) = torch.autograd.grad((out["forces"] * direction).sum(), x)
        curvature.append((out["forces"], hvp))
    assert len(recomputed) >= len(nl.i) // rows  # every block of the frozen model's networks
    (forces, hvp), (fast_forces, fast_hvp) = curvature
    same(forces, fast_forces, torch.float64, "frozen forces")
    same(hvp, fast_hvp, torch.float64, "frozen Hessian-vector product", kind="training")


def test_mirror_edges_share_radial_weights(rng, monkeypatch):
    """In a box larger than twice the cutoff every edge has one mirror (sender and receiver
    swapped, opposite shift): each pair reads one row of radial weights. Energies, forces,
    stress and force matching's parameter gradients match the unmodified model; an edge whose
    shift breaks the mirror makes the call fall back to per-edge weights, still exact; a small
    cell (several images of one atom pair) never pairs."""
    rows_seen = []
    real_tp_conv = fm._eq.tp_conv

    def recording_tp_conv(x, y, w, *args, **kwargs):
        if not kwargs:  # the interactions' calls (the backward's pass names)
            rows_seen.append((w.shape[0], y.shape[0]))
        return real_tp_conv(x, y, w, *args, **kwargs)

    monkeypatch.setattr(fm._eq, "tp_conv", recording_tp_conv)
    model = build(hidden="8x0e+8x1o", max_ell=2)
    fast = fm.accelerate(copy.deepcopy(model))
    n = 30
    cell = torch.tensor([[7.3, 0.0, 0.0], [1.1, 7.6, 0.0], [-0.8, 0.9, 7.9]],
                        dtype=torch.float64)
    pos = torch.from_numpy(rng.random((n, 3))) @ cell
    z = torch.from_numpy(rng.choice([1, 6, 8], n))
    nl = fastff.neighbor_list(pos, CUTOFF, cell)
    edge_index, shifts = torch.stack([nl.i, nl.j]), nl.shifts
    assert shifts.abs().sum() > 0  # edges across the boundary
    target = torch.randn(n, 3, dtype=torch.float64)
    results = []
    for m in (model, fast):
        out = fm.evaluate(m, pos.clone(), z, edge_index, shifts, cell, compute_stress=True,
                          training=True)
        loss = ((out["forces"] - target) ** 2).sum() + (out["stress"] ** 2).sum()
        m.zero_grad()
        loss.backward()
        results.append((out, {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
    assert rows_seen and all(2 * rows == edges for rows, edges in rows_seen)
    (want, want_grads), (got, got_grads) = results
    for key in ("energy", "forces", "stress"):
        same(want[key], got[key], torch.float64, key)
    for key, grad in want_grads.items():
        same(grad, got_grads[key], torch.float64, key, kind="training")

    broken = shifts.clone()
    broken[int(rng.integers(len(broken)))] += 1  # one more cell: no longer the opposite
    rows_seen.clear()
    want = fm.evaluate(model, pos.clone(), z, edge_index, broken, cell, compute_stress=True)
    got = fm.evaluate(fast, pos.clone(), z, edge_index, broken, cell, compute_stress=True)
    assert rows_seen and all(rows == edges for rows, edges in rows_seen)
    for key in ("energy", "forces", "stress"):
        same(want[key], got[key], torch.float64, f"broken mirror {key}")

    rows_seen.clear()
    small, z, nl, cell = system(rng)  # a 4.2 A cell, cutoff 3.5 A: several images per pair
    outputs(fast, small, z, nl, cell)
    assert rows_seen and all(rows == edges for rows, edges in rows_seen)


def test_float32(rng):
    """A float32 model against the same weights in float64, on physical configurations."""
    model = build(hidden="8x0e+8x1o")
    fast = fm.accelerate(copy.deepcopy(model).float())
    pos, z, nl, cell = system(rng, n=20, min_distance=0.8)
    want = outputs(model, pos, z, nl, cell, compute_stress=True)
    got = outputs(fast, pos.float(), z, nl, cell.float(), compute_stress=True)
    for key in ("energy", "forces", "stress"):
        same(want[key], got[key], torch.float32, key, float32_kind(key))


def test_tabulated_radial_weights(rng):
    """tabulate=True: with frozen weights the radial networks are read from cubic tables (float32
    within the float32 bar; float64 within the table's interpolation error, ~1e-8 of the
    largest force at 2048 knots); changed weights rebuild the tables; weights that need a
    gradient take the exact networks."""
    model = build(hidden="8x0e+8x1o", radial_MLP=[32, 32, 32])
    for p in model.parameters():
        p.requires_grad_(False)
    pos, z, nl, cell = system(rng, n=20, min_distance=0.8)
    fast = fm.accelerate(copy.deepcopy(model), tabulate=True)
    want = outputs(model, pos, z, nl, cell, compute_stress=True)
    got = outputs(fast, pos, z, nl, cell, compute_stress=True)
    for key in ("energy", "forces", "stress"):
        assert_close_scaled(got[key], want[key], "mace", torch.float32, key)
    with torch.no_grad():  # an in-place edit of a radial weight: the table follows
        for m in (model, fast):
            m.interactions[1].conv_tp_weights.layer1.weight.mul_(1.5)
    want = outputs(model, pos, z, nl, cell)
    assert_close_scaled(outputs(fast, pos, z, nl, cell)["forces"], want["forces"], "mace",
                        torch.float32, "forces after a weight edit")
    fast32 = fm.accelerate(copy.deepcopy(model).float(), tabulate=True)
    got = outputs(fast32, pos.float(), z, nl, cell.float(), compute_stress=True)
    want = outputs(model, pos, z, nl, cell, compute_stress=True)
    for key in ("energy", "forces", "stress"):
        assert_close_scaled(got[key], want[key], float32_kind(key), torch.float32,
                            f"float32 {key}")
    for p in fast.parameters():  # trainable again: the exact networks, exact results
        p.requires_grad_(True)
    model.requires_grad_(True)
    same(outputs(model, pos, z, nl, cell)["forces"], outputs(fast, pos, z, nl, cell)["forces"],
         torch.float64, "exact when trainable")


def test_reference_backend_agrees(rng):
    model = build(hidden="4x0e+4x1o", max_ell=2)
    fast = fm.accelerate(copy.deepcopy(model), backend="reference")
    pos, z, nl, cell = system(rng)
    same(outputs(model, pos, z, nl, cell)["forces"], outputs(fast, pos, z, nl, cell)["forces"],
         torch.float64, "forces")
    fm.set_backend(fast, "numba")
    same(outputs(model, pos, z, nl, cell)["forces"], outputs(fast, pos, z, nl, cell)["forces"],
         torch.float64, "forces")


def test_same_parameters_state_dict_and_restore(rng, tmp_path):
    model = build(hidden="4x0e+4x1o")
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    fast = fm.accelerate(model)
    assert fast is model and fm.is_accelerated(model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert list(model.state_dict()) == keys
    pos, z, nl, cell = system(rng)
    # an optimizer step on the shared parameters shows in the next accelerated call
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    out = outputs(model, pos, z, nl, cell, training=True)
    out["energy"].sum().backward()
    opt.step()
    stepped = outputs(model, pos, z, nl, cell)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    same(stepped["forces"], outputs(loaded, pos, z, nl, cell)["forces"], torch.float64, "load")
    fm.restore(model)
    assert not fm.is_accelerated(model)
    assert type(model.interactions[0]) is RESIDUAL
    same(outputs(model, pos, z, nl, cell)["forces"], stepped["forces"], torch.float64, "restored")


def test_mace_calculator(rng):
    """mace's own ASE calculator runs an accelerated model (its own data pipeline: matscipy
    neighbor lists, its batching) and agrees with the unmodified model."""
    ase = pytest.importorskip("ase")
    calculators = pytest.importorskip("mace.calculators")
    model = build(hidden="8x0e+8x1o", max_ell=2)
    fast = fm.accelerate(copy.deepcopy(model))
    pos, z, _, cell = system(rng, n=16)
    atoms = ase.Atoms(numbers=z.numpy(), positions=pos.numpy(), cell=cell.numpy(), pbc=True)
    results = []
    for m in (model, fast):
        calc = calculators.MACECalculator(models=m, device="cpu", default_dtype="float64")
        a = atoms.copy()
        a.calc = calc
        results.append((a.get_potential_energy(), a.get_forces(), a.get_stress()))
    for k, what in enumerate(("energy", "forces", "stress")):
        same(torch.as_tensor(results[0][k]), torch.as_tensor(results[1][k]), torch.float64, what)
    # evaluate() on fastff's neighbor list gives what mace's pipeline gives
    nl = fastff.neighbor_list(pos, CUTOFF, cell)
    out = outputs(fast, pos, z, nl, cell)
    same(torch.as_tensor(results[0][1]), out["forces"].detach(), torch.float64, "evaluate")


def _refused(option, **config):
    with pytest.raises(fm.UnsupportedMACEError, match=option):
        fm.accelerate(build(**config))


def test_refuses_unsupported_options_by_name():
    _refused("hidden_irreps", hidden="4x0e+4x1o+4x2e", correlation=1)
    _refused("max_ell", max_ell=4, correlation=1)
    _refused("correlation", correlation=4, max_ell=1)
    _refused("radial_type", radial="chebyshev")
    _refused("distance_transform", distance_transform="Agnesi")
    _refused("pair_repulsion", pair_repulsion=True)
    _refused("heads", heads=["a", "b"])
    _refused("RealAgnosticDensityInteractionBlock",
             rest=mace_modules.blocks.RealAgnosticDensityInteractionBlock)
    with pytest.raises(fm.UnsupportedMACEError, match="model"):
        fm.accelerate(torch.nn.Linear(2, 2))


def test_refusal_leaves_the_model_unchanged():
    model = build(rest=mace_modules.blocks.RealAgnosticDensityInteractionBlock)
    with pytest.raises(fm.UnsupportedMACEError):
        fm.accelerate(model)
    assert not fm.is_accelerated(model)
    assert type(model.interactions[0]) is RESIDUAL
    assert type(model.products[0]) is mace_modules.blocks.EquivariantProductBasisBlock


def test_bad_inputs_are_named(rng):
    fast = fm.accelerate(build())
    pos, z, nl, cell = system(rng)
    with pytest.raises(ValueError, match="atomic_numbers"):
        outputs(fast, pos, torch.full_like(z, 7), nl, cell)
    bad = torch.stack([nl.i, nl.j])
    bad[0, 0] = len(pos) + 3
    with pytest.raises(ValueError, match="edge_index"):
        fm.evaluate(fast, pos.clone(), z, bad, nl.shifts, cell)
