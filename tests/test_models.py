"""fastff.models: SchNet and PaiNN on the fused backends against the torch reference backend and
a plain-torch SchNet, batching, invariances, finite differences of energy (forces and stress),
Verlet reuse, the tabulated filter, force-matching gradients and bad input."""

import copy
import warnings

import pytest
import torch

import fastff
import fastff.models as fm
from fastff.kernels.message import dense
from fastff.testing import assert_close_scaled

warnings.filterwarnings("ignore", message="fastff: .* falls back")

F64 = torch.float64
ELEMENTS = torch.tensor([1, 6, 7, 8])
MODELS = {"schnet": lambda **kw: fm.SchNet(16, 2, 12, 0.5, **kw),
          "painn": lambda **kw: fm.PaiNN(16, 2, 8, 0.5, **kw)}


def make(name, dtype=F64, **kw):
    return MODELS[name](**kw).to(dtype)


def periodic_system(n, box=1.0, dtype=F64):
    """n atoms in a slightly skewed ~1 nm cell (positions partly outside it: not wrapped)."""
    cell = torch.eye(3, dtype=F64) * box + 0.1 * box * torch.rand(3, 3, dtype=F64)
    frac = torch.rand(n, 3, dtype=F64) * 1.2 - 0.1
    species = ELEMENTS[torch.randint(0, len(ELEMENTS), (n,))]
    return species, (frac @ cell).to(dtype), cell.to(dtype)


def cluster(n, dtype=F64):
    """A non-periodic cluster of n atoms, ~0.6 nm across."""
    species = ELEMENTS[torch.randint(0, len(ELEMENTS), (n,))]
    return species, (torch.rand(n, 3, dtype=F64) * 0.6).to(dtype)


def random_rotation(dtype=F64):
    q, r = torch.linalg.qr(torch.randn(3, 3, dtype=F64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def all_outputs(model, species, pos, cell, **kw):
    return fm.energy_and_forces(model, species, pos, cell, stress=cell is not None, **kw)


@pytest.mark.parametrize("name", MODELS)
def test_numba_matches_reference_float64(rng, name):
    species, pos, cell = periodic_system(40)
    model = make(name)
    got = all_outputs(model, species, pos, cell)
    again = all_outputs(model, species, pos, cell)
    model.set_backend("reference")
    want = all_outputs(model, species, pos, cell)
    for what, a, b, c in zip(("energy", "forces", "stress"), got, again, want, strict=True):
        assert torch.equal(a, b), f"{what} is not deterministic"
        assert_close_scaled(a, c, "message", F64, what)
    assert float(got[1].abs().max()) > 0


def test_triton_interpreted_matches_reference(rng):
    """Every op on the Triton path (interpreted on CPU tensors, tests/conftest.py), tiny sizes."""
    species, pos, cell = periodic_system(8, box=0.8)
    for model in (fm.SchNet(4, 1, 4, 0.5), fm.PaiNN(4, 1, 4, 0.5)):
        model = model.double().set_backend("triton")
        got = all_outputs(model, species, pos, cell)
        model.set_backend("reference")
        want = all_outputs(model, species, pos, cell)
        for what, a, b in zip(("energy", "forces", "stress"), got, want, strict=True):
            assert_close_scaled(a, b, "message", F64, f"{type(model).__name__} {what}")


@pytest.mark.parametrize("name", MODELS)
def test_float32_matches_float64_reference(rng, name):
    species, pos, cell = periodic_system(40)
    model = make(name, torch.float32)
    got = all_outputs(model, species, pos.float(), cell.float())
    reference = copy.deepcopy(model).double().set_backend("reference")
    want = all_outputs(reference, species, pos, cell)
    for what, a, b in zip(("energy", "forces", "stress"), got, want, strict=True):
        assert a.dtype == torch.float32
        assert_close_scaled(a, b, "model", torch.float32, what)


def force_matching_gradients(model, species, pos, cell, target_e, target_f):
    energy, forces = fm.energy_and_forces(model, species, pos, cell, training=True)
    loss = (energy - target_e).square().sum() + (forces - target_f).square().sum()
    params = [p for p in model.parameters()]
    return [loss.detach(), *torch.autograd.grad(loss, params)]


@pytest.mark.parametrize("name", MODELS)
def test_force_matching_step_numba_matches_reference(rng, name):
    species, pos, cell = periodic_system(30)
    model = make(name)
    target_e, target_f = torch.randn(1, dtype=F64), torch.randn(30, 3, dtype=F64)
    got = force_matching_gradients(model, species, pos, cell, target_e, target_f)
    model.set_backend("reference")
    want = force_matching_gradients(model, species, pos, cell, target_e, target_f)
    names = ["loss", *(n for n, _ in model.named_parameters())]
    assert len(got) == len(want) == len(names)
    for what, a, b in zip(names, got, want, strict=True):
        assert_close_scaled(a, b, "training", F64, what)
    # the force loss reaches every parameter (no layer is cut off from the forces)
    assert all(float(g.abs().max()) > 0 for g in got[1:])


def plain_torch_schnet(model, species, pos, cell):
    """SchNet energy with the filter materialised and sums by index_add: torch ops only."""
    nl = fastff.neighbor_list(pos.detach(), model.cutoff, cell, backend="reference")
    d = torch.linalg.vector_norm(pos[nl.j] - pos[nl.i] + nl.shifts.to(pos.dtype) @ cell, dim=1)
    x = model.embedding.weight[species]
    for block in model.interactions:
        w = block.conv.filter(d, backend="reference")
        h = x @ block.in2f.weight.t()
        v = torch.zeros_like(h).index_add(0, nl.i, h[nl.j] * w)
        lin1, lin2 = block.f2out[0][0], block.f2out[1]
        v = dense.activation(v @ lin1.weight.t() + lin1.bias, "shifted_softplus")
        x = x + v @ lin2.weight.t() + lin2.bias
    hidden, out = model.readout[0][0], model.readout[1]
    atomic = dense.activation(x @ hidden.weight.t() + hidden.bias, "shifted_softplus")
    return (atomic @ out.weight.t() + out.bias).sum().view(1)


def test_schnet_matches_plain_torch(rng):
    species, pos, cell = periodic_system(40)
    model = make("schnet")
    energy, forces = fm.energy_and_forces(model, species, pos, cell)
    p = pos.clone().requires_grad_(True)
    want = plain_torch_schnet(model, species, p, cell)
    (grad,) = torch.autograd.grad(want, p)
    assert_close_scaled(energy, want, "message", F64, "energy")
    assert_close_scaled(forces, -grad, "message", F64, "forces")


def painn_update_by_hand(update, s, v):
    """PaiNN eq. 9-11 written out per component."""
    nf = s.shape[1]
    uv = torch.einsum("naf,gf->nag", v, update.U.weight)
    vv = torch.einsum("naf,gf->nag", v, update.V.weight)
    a = update.mlp(torch.cat([s, torch.sqrt((vv * vv).sum(1) + fm.NORM_EPS)], 1))
    a_vv, a_sv, a_ss = a[:, :nf], a[:, nf:2 * nf], a[:, 2 * nf:]
    return s + a_ss + a_sv * (uv * vv).sum(1), v + a_vv[:, None, :] * uv


def test_painn_update_block(rng):
    update = fm.PaiNNUpdate(8).double()
    s, v = torch.randn(5, 8, dtype=F64), torch.randn(5, 3, 8, dtype=F64)
    for a, b in zip(update(s, v), painn_update_by_hand(update, s, v), strict=True):
        assert_close_scaled(a, b, "message", F64)


@pytest.mark.parametrize("name", MODELS)
def test_batch_matches_separate_calls(rng, name):
    model = make(name)
    systems = [periodic_system(n, box) for n, box in ((12, 0.8), (20, 1.0), (7, 0.9))]
    pbc = torch.tensor([[True, True, True], [True, False, True], [True, True, True]])
    species = torch.cat([s[0] for s in systems])
    pos = torch.cat([s[1] for s in systems])
    cells = torch.stack([s[2] for s in systems])
    batch = torch.cat([torch.full((len(s[0]),), k) for k, s in enumerate(systems)])
    energy, forces, stress = fm.energy_and_forces(model, species, pos, cells, pbc, batch,
                                                  stress=True)
    assert energy.shape == (3,) and stress.shape == (3, 3, 3)
    start = 0
    for k, (s, p, c) in enumerate(systems):
        e1, f1, st1 = fm.energy_and_forces(model, s, p, c, pbc[k], stress=True)
        assert_close_scaled(energy[k:k + 1], e1, "message", F64, f"energy {k}")
        assert_close_scaled(forces[start:start + len(s)], f1, "message", F64, f"forces {k}")
        assert_close_scaled(stress[k], st1[0], "message", F64, f"stress {k}")
        start += len(s)


@pytest.mark.parametrize("name", MODELS)
def test_invariance_and_equivariance(rng, name):
    model = make(name)
    species, pos = cluster(30)
    energy, forces = fm.energy_and_forces(model, species, pos)
    shift = torch.randn(3, dtype=F64)
    e, f = fm.energy_and_forces(model, species, pos + shift)
    assert_close_scaled(e, energy, "message", F64, "translated energy")
    assert_close_scaled(f, forces, "message", F64, "translated forces")
    rot = random_rotation()
    e, f = fm.energy_and_forces(model, species, pos @ rot.t())
    assert_close_scaled(e, energy, "message", F64, "rotated energy")
    assert_close_scaled(f, forces @ rot.t(), "message", F64, "rotated forces")
    perm = torch.randperm(30)
    e, f = fm.energy_and_forces(model, species[perm], pos[perm])
    assert_close_scaled(e, energy, "message", F64, "permuted energy")
    assert_close_scaled(f, forces[perm], "message", F64, "permuted forces")
    # periodic: translation leaves energy and forces unchanged (positions are not wrapped)
    species, pos, cell = periodic_system(30)
    energy, forces = fm.energy_and_forces(model, species, pos, cell)
    e, f = fm.energy_and_forces(model, species, pos + shift, cell)
    assert_close_scaled(e, energy, "message", F64, "periodic translated energy")
    assert_close_scaled(f, forces, "message", F64, "periodic translated forces")


@pytest.mark.parametrize("name", MODELS)
def test_forces_and_stress_are_energy_derivatives(rng, name):
    model = make(name)
    # Uniform random atoms can land 0.01 nm apart, where the 1/r Bessel features make the
    # O(h^2) error of the central difference exceed the bound: draw until no pair is closer
    # than 0.1 nm (real atoms never are).
    while True:
        species, pos, cell = periodic_system(30)
        if len(fastff.neighbor_list(pos, 0.1, cell)) == 0:
            break
    with torch.no_grad():
        def energy(p, c):
            return float(model(species, p, c)[0])

        _, forces, stress = fm.energy_and_forces(model, species, pos, cell, stress=True)
        h = 1e-5  # nm; the radial features vary over ~0.04 nm, so O(h^2) error is ~1e-7
        for _ in range(2):
            direction = torch.randn_like(pos)
            fd = (energy(pos + h * direction, cell) - energy(pos - h * direction, cell)) / (2 * h)
            want = -float((forces * direction).sum())
            assert abs(fd - want) <= 1e-6 * float(forces.norm() * direction.norm()), (fd, want)
        sym = torch.randn(3, 3, dtype=F64)
        sym = sym + sym.t()
        strained = [(pos @ (torch.eye(3, dtype=F64) + t * sym), cell @ (torch.eye(3, dtype=F64)
                                                                      + t * sym)) for t in (h, -h)]
        fd = (energy(*strained[0]) - energy(*strained[1])) / (2 * h)
        volume = float(torch.linalg.det(cell).abs())
        want = float((stress[0] * sym).sum()) * volume
        assert abs(fd - want) <= 1e-6 * float(stress.norm() * sym.norm()) * volume, (fd, want)


@pytest.mark.parametrize("name", MODELS)
def test_verlet_skin_matches_fresh_lists(rng, name):
    plain = make(name)
    reused = make(name, skin=0.05)
    reused.load_state_dict(plain.state_dict())
    species, pos, cell = periodic_system(40)
    for step in range(3):
        pos = pos + 0.004 * torch.randn_like(pos)  # < skin / 2 over a few steps
        got = fm.energy_and_forces(reused, species, pos, cell, stress=True)
        want = fm.energy_and_forces(plain, species, pos, cell, stress=True)
        for what, a, b in zip(("energy", "forces", "stress"), got, want, strict=True):
            assert_close_scaled(a, b, "message", F64, f"{what} at step {step}")
    assert reused.verlet is not None and reused.verlet.rebuilds < reused.verlet.steps
    pos = pos + 0.1 * torch.randn_like(pos)  # moves past skin / 2: the list is rebuilt
    before = reused.verlet.rebuilds
    got = fm.energy_and_forces(reused, species, pos, cell)
    want = fm.energy_and_forces(plain, species, pos, cell)
    assert reused.verlet.rebuilds == before + 1
    assert_close_scaled(got[1], want[1], "message", F64, "forces after a rebuild")
    # a caller's list with a larger cutoff gives the same result
    nl = fastff.neighbor_list(pos, 0.6, cell)
    e, f = fm.energy_and_forces(plain, species, pos, cell, nl=nl)
    assert_close_scaled(e, want[0], "message", F64, "energy with a given list")
    assert_close_scaled(f, want[1], "message", F64, "forces with a given list")


@pytest.mark.parametrize("name", ["schnet", "painn", "schnet without envelope"])
def test_skin_sees_only_pairs_within_cutoff(rng, name):
    """skin > 0 owns a compacting Verlet list: over MD-like steps that stay within skin / 2 the
    list is built once, every call gets exactly the pairs within the cutoff, and energies,
    forces and stress equal those with skin = 0 (for a model without an envelope too)."""
    kind, kw = (name, {}) if name != "schnet without envelope" else ("schnet", {"envelope": None})
    plain = make(kind, **kw)
    reused = make(kind, skin=0.1, **kw)
    reused.load_state_dict(plain.state_dict())
    species, pos, cell = periodic_system(40)
    for step in range(4):
        if step:  # each atom moves < 0.015 per step: < skin / 2 in three steps
            move = torch.randn_like(pos)
            pos = pos + 0.015 * torch.rand(40, 1, dtype=F64) * move / move.norm(dim=1,
                                                                             keepdim=True)
        nl = reused.neighbors(pos, cell)
        assert nl.cutoff == reused.cutoff
        fresh = fastff.neighbor_list(pos, reused.cutoff, cell)
        assert fastff.testing.pair_keys(nl.i, nl.j, nl.shifts) == \
            fastff.testing.pair_keys(fresh.i, fresh.j, fresh.shifts)
        got = fm.energy_and_forces(reused, species, pos, cell, stress=True)
        want = fm.energy_and_forces(plain, species, pos, cell, stress=True)
        for what, a, b in zip(("energy", "forces", "stress"), got, want, strict=True):
            assert_close_scaled(a, b, "message", F64, f"{what} at step {step}")
    assert reused.verlet is not None and reused.verlet.rebuilds == 1
    assert reused.verlet.steps == 8  # neighbors() and the model call, per step


@pytest.mark.parametrize("name", MODELS)
def test_tabulated_close_to_mlp(rng, name):
    mlp = make(name)
    table = make(name, tabulate=True)
    table.load_state_dict(mlp.state_dict())
    species, pos, cell = periodic_system(40)
    got = fm.energy_and_forces(table, species, pos, cell, stress=True)
    want = fm.energy_and_forces(mlp, species, pos, cell, stress=True)
    for what, a, b in zip(("energy", "forces", "stress"), got, want, strict=True):
        scale = float(b.abs().max())
        err = float((a - b).abs().max())
        assert 0 < err <= 1e-5 * scale, f"{what}: {err:.2e} vs scale {scale:.2e}"
    mlp.set_tabulate(True)
    assert torch.equal(fm.energy_and_forces(mlp, species, pos, cell)[0], got[0])


def test_models_move_and_switch(rng):
    model = make("painn", torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    model.double()
    assert model.dtype == F64
    model.set_backend("reference")
    assert model.backend == "reference"
    assert all(m.backend == "reference" for m in model.messages)
    model.set_backend(None)  # resolved now: the device's default (cpu: numba)
    assert model.backend == "numba"
    assert all(m.backend == "numba" for m in model.messages)


def test_bad_input(rng):
    model = make("schnet", skin=0.0)
    species, pos, cell = periodic_system(10)
    bad = species.clone()
    bad[3] = 100
    with pytest.raises(ValueError, match=r"species\[3\] = 100 is outside \[0, 100\)"):
        model(bad, pos, cell)
    bad[3] = -2
    with pytest.raises(ValueError, match=r"species\[3\] = -2"):
        fm.energy_and_forces(model, bad, pos, cell)
    with pytest.raises(TypeError, match="species must be int64"):
        model(species.int(), pos, cell)
    with pytest.raises(ValueError, match=r"species must have shape \[10\]"):
        model(species[:9], pos, cell)
    with pytest.raises(ValueError, match=r"positions must have shape \[N, 3\]"):
        fm.energy_and_forces(model, species, pos[:, :2], cell)
    with pytest.raises(TypeError, match="positions has dtype torch.float32 but the model"):
        fm.energy_and_forces(model, species, pos.float(), cell.float())
    with pytest.raises(ValueError, match=r"batch must have shape \[10\]"):
        model(species, pos, cell, batch=torch.zeros(9, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch must be sorted"):
        model(species, pos, None, batch=torch.tensor([0, 1] * 5))
    with pytest.raises(ValueError, match="full neighbor list"):
        model(species, pos, cell, nl=fastff.neighbor_list(pos, 0.5, cell, half=True))
    with pytest.raises(ValueError, match="cutoff 0.4, smaller than the model's cutoff 0.5"):
        model(species, pos, cell, nl=fastff.neighbor_list(pos, 0.4, cell))
    with pytest.raises(ValueError, match="stress=True needs a cell"):
        fm.energy_and_forces(model, species, pos, stress=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_backend("cuda")
    with pytest.raises(ValueError, match="skin"):
        fm.SchNet(16, 2, skin=-1.0)
    exact = fm.SchNet(16, 2, envelope=None).double()
    with pytest.raises(ValueError, match=r"no envelope.*nl.within\(positions, 0.5\)"):
        exact(species, pos, cell, nl=fastff.neighbor_list(pos, 0.6, cell))
