"""Validation once at the door, caches keyed by tensor state, thread-local checks, backends
resolved once.

- Caches never return an entry of a freed tensor whose address or id a new tensor reuses, and
  follow ``.data`` edits, ``load_state_dict`` and optimizer steps (fused ones too) of a
  ForceField's parameters (against a fresh ForceField on the float64 reference backend).
- One forward + forces of SchNet and of a ForceField scans the positions once and reads values
  back to the host a bounded number of times (counted with a dispatch mode).
- ``set_checks`` / ``no_checks`` act in the calling thread only.
- A VerletList compares the same cell tensor by state, not by value.
- A model or ForceField reads ``FASTFF_BACKEND`` when built, not per call.
"""

import collections
import copy
import gc
import threading
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastff
import fastff.mm as mm
from fastff import _checks, models, systems
from fastff.mm import _clusters, _terms
from fastff.testing import assert_close_scaled

warnings.filterwarnings("ignore", message="fastff: .* falls back")

F64 = torch.float64
#: host-sync reads: a tensor value read back by the host (bool/int/float/item, equal, nonzero)
HOST_READS = ("_local_scalar_dense", "is_nonzero", "equal", "nonzero")


class HostReads(TorchDispatchMode):
    """Counts the aten ops that read tensor values back to the host, by name. (On CPU tensors
    ``.tolist()`` and ``.numpy()`` bypass the dispatcher and are not seen.)"""

    def __init__(self):
        super().__init__()
        self.count: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in HOST_READS:
            self.count[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def positions_scans(monkeypatch):
    """The number of NaN scans of positions (calls of fastff._checks.positions with the value
    checks on)."""
    scans = [0]
    scan = _checks.positions

    def counting(x, name="positions"):
        scans[0] += _checks.checks_enabled()
        return scan(x, name)

    monkeypatch.setattr(_checks, "positions", counting)
    return scans


def _reused(make_old, use, make_new, key, tries=5000):
    """Allocate a tensor (``make_old``), fill caches with it (``use``), free it and allocate a
    new one of the same size (``make_new``), in a loop until ``key`` (id or data_ptr) of the new
    tensor repeats the old one's. Returns the new tensor, or None when the allocator never gave
    the old slot back. The cyclic garbage collector is paused meanwhile: a collection between
    the free and the allocation would take the slot."""
    gc.collect()
    gc.disable()
    try:
        for _ in range(tries):
            old = make_old()
            use(old)
            old_key = key(old)
            del old
            new = make_new()
            if key(new) == old_key:
                return new
            del new
    finally:
        gc.enable()
    return None


def _maker(view: torch.Tensor, key):
    """New tensors holding ``view``'s values. For ``id``: plain copies (one new Python object
    each). For ``data_ptr``: fresh tensors (version 0) over one memory block that every maker of
    that size shares, as a freed block handed back by the allocator would be; made
    deterministic so that the test never depends on the allocator's mood."""
    if key is id:
        return lambda: view.clone()
    base, offset = view._base if view._base is not None else view, view.storage_offset()
    block = _BLOCKS.setdefault((base.numel(), base.dtype), base.clone())

    def make():
        fresh = torch.empty(0, dtype=base.dtype).set_(block.untyped_storage())
        with torch.no_grad():
            fresh.view(base.shape).copy_(base)
        return torch.empty(0, dtype=base.dtype).set_(block.untyped_storage()).as_strided(
            view.shape, view.stride(), offset)
    return make


_BLOCKS: dict = {}


def _water(n_molecules=40):
    box = systems.water_box(n_molecules, dtype=F64)
    return box, box.positions.clone()


# --------------------------------------------------------------- caches: reused ids and addresses

KEYS = pytest.mark.parametrize("key", [id, torch.Tensor.data_ptr], ids=["id", "data_ptr"])


@KEYS
def test_tensor_cache_never_returns_the_entry_of_a_freed_tensor(key):
    cache = _checks.TensorCache()
    new = _reused(_maker(torch.zeros(3, 64)[0], key),
                  lambda t: cache.get("what", (t,), lambda: "old"),
                  _maker(torch.ones(3, 64)[0], key), key)
    assert new is not None, "the allocator never reused the slot"
    assert cache.get("what", (new,), lambda: "new") == "new"


@KEYS
def test_exclusion_rows_of_a_new_tensor_at_a_reused_address(rng, key):
    # 128 pairs, as columns of [128, 3] tensors: tensors below ~1 KB rarely get a freed slot
    # back at once, nor do those of the size of the rows the cache frees and keeps
    n = 400
    first = torch.as_tensor(rng.permutation(n)[:384]).reshape(128, 3).long()
    fresh = torch.as_tensor(rng.permutation(n)[:384]).reshape(128, 3).long()
    new = _reused(_maker(first[:, :2], key), lambda t: _terms.exclusion_rows(t, n),
                  _maker(fresh[:, :2], key), key)
    assert new is not None, "the allocator never reused the slot"
    got = _terms.exclusion_rows(new, n)
    want = _terms._exclusion_rows(new, n)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@KEYS
def test_cluster_list_rebuilt_for_new_exclusions_at_a_reused_address(rng, key):
    """The cluster list keeps its exclusions in lane masks: a new exclusion tensor (at the id or
    address of the freed one, version 0) must rebuild it."""
    box, pos = _water(60)
    n = box.num_atoms
    clusters = _clusters.ClusterVerletList(0.5, 0.1)
    first, others = box.exclusions[:90].clone(), box.exclusions[90:].clone()
    excl_ptr, first_j = _terms._exclusion_rows(first, n)
    ptr2, want_j = _terms._exclusion_rows(others, n)
    size = want_j.shape[0]
    first_buf = torch.cat([first_j, first_j.new_zeros(2 * size)])
    want_buf = torch.cat([want_j, want_j.new_zeros(2 * size)])

    def use(excl_j):
        assert clusters.update(pos, None, excl_ptr, excl_j) is not None  # no cell: clusters

    excl_j = _reused(_maker(first_buf[:size], key), use, _maker(want_buf[:size], key), key)
    assert excl_j is not None, "the allocator never reused the slot"
    assert torch.equal(excl_j, want_j)
    before = clusters.rebuilds
    cl = clusters.update(pos, None, ptr2, excl_j)
    assert clusters.rebuilds == before + 1
    # the energy of that list is the pair list's with the new exclusions
    q = torch.as_tensor(rng.normal(0, 0.4, n))
    s, e = torch.full((n,), 0.3, dtype=F64), torch.full((n,), 0.5, dtype=F64)
    x = others.shape[0]
    ex = mm.Exceptions(others, torch.zeros(x, dtype=F64), torch.ones(x, dtype=F64),
                       torch.zeros(x, dtype=F64))
    kw = dict(cutoff=0.5, exceptions=ex, method="plain")
    got = mm.nonbonded(pos, cl, q, s, e, **kw)
    nl = fastff.neighbor_list(pos, 0.6, half=True)
    want = mm.nonbonded(pos, nl, q, s, e, backend="reference", **kw)
    assert_close_scaled(got, want, "mm", F64, "cluster energy, new exclusions")


@KEYS
def test_active_exceptions_of_new_parameters_at_a_reused_address(rng, key):
    """Pure exclusions are dropped from the exception sum: which ones depends on the values of
    the charge products and epsilons, kept per tensor, never per address: a new epsilon at the
    id or address of the freed one (version 0) must count."""
    box, pos = _water(60)
    n = box.num_atoms
    nl = fastff.neighbor_list(pos, 0.6, half=True)
    x = box.exclusions.shape[0]
    q = torch.as_tensor(rng.normal(0, 0.4, n))
    s, e = torch.full((n,), 0.3, dtype=F64), torch.full((n,), 0.5, dtype=F64)
    charge_prod, sigma = torch.zeros(x, dtype=F64), torch.full((x,), 0.3, dtype=F64)
    values = torch.as_tensor(rng.uniform(0.1, 0.3, x))

    def energy(eps, backend=None):
        ex = mm.Exceptions(box.exclusions, charge_prod, sigma, eps)
        return mm.nonbonded(pos, nl, q, s, e, cutoff=0.6, exceptions=ex, method="plain",
                            backend=backend)

    # with zero epsilons every exception is a pure exclusion: all are dropped, and that kept
    eps = _reused(_maker(torch.zeros(3, x, dtype=F64)[0], key), energy,
                  _maker(torch.stack([values] * 3)[0], key), key)
    assert eps is not None, "the allocator never reused the slot"
    assert_close_scaled(energy(eps), energy(eps.clone(), "reference"), "mm", F64,
                        "exceptions with a new epsilon at a reused id/address")


# --------------------------------------------------------------- ForceField parameters change

def _force_field(box):
    ff = mm.water_force_field(box, cutoff=0.5, dtype=F64)
    ff.requires_grad_(False)  # MD mode: cluster path, pure exclusions dropped
    return ff


def _energy_forces(ff, pos):
    x = pos.clone().requires_grad_(True)
    e = ff(x)
    (g,) = torch.autograd.grad(e, x)
    return e.detach(), -g


def _assert_like_fresh(ff, pos, what):
    """ff (numba, caches warm) against a deep copy on the float64 reference backend (new
    tensors: nothing kept)."""
    fresh = copy.deepcopy(ff).set_backend("reference")
    e, f = _energy_forces(ff, pos)
    e_ref, f_ref = _energy_forces(fresh, pos)
    assert_close_scaled(e, e_ref, "mm", F64, f"{what}: energy")
    assert_close_scaled(f, f_ref, "mm", F64, f"{what}: forces")
    return e


def test_force_field_follows_data_edits_load_state_dict_and_optimizer_steps(rng):
    box, pos = _water(300)  # a 2.1 nm box: the cluster path applies
    ff = _force_field(box)
    e0 = _assert_like_fresh(ff, pos, "as built")
    x = ff.exception_charge_prod.shape[0]

    # .data edits bump no version counter
    ff.exception_charge_prod.data.copy_(torch.as_tensor(rng.uniform(-0.2, 0.2, x)))
    e1 = _assert_like_fresh(ff, pos, "exception_charge_prod.data")
    assert not torch.equal(e1, e0)
    ff.charges.data.mul_(1.1)
    ff.exception_epsilon.data.fill_(0.2)
    e2 = _assert_like_fresh(ff, pos, "charges.data, exception_epsilon.data")
    assert not torch.equal(e2, e1)
    ff.box.data.mul_(1.02)
    e3 = _assert_like_fresh(ff, pos, "box.data")
    assert not torch.equal(e3, e2)

    # load_state_dict: back to the parameters as built
    ff.load_state_dict(_force_field(box).state_dict())
    e4 = _assert_like_fresh(ff, pos, "load_state_dict")
    assert_close_scaled(e4, e0, "mm", F64, "load_state_dict restores the energy")

    # optimizer steps on the energy, including the fused one that bumps no version counter
    # (parameters that stay away from their bounds: epsilons of 0 would turn negative)
    for make in (lambda p: torch.optim.SGD(p, lr=1e-6),
                 lambda p: torch.optim.Adam(p, lr=1e-3, fused=True)):
        params = [ff.charges, ff.sigma, ff.exception_charge_prod, ff.bond_k]
        for p in params:
            p.requires_grad_(True)
        opt = make(params)
        before = _energy_forces(ff, pos)[0]
        opt.zero_grad()
        ff(pos).backward()
        opt.step()
        ff.requires_grad_(False)
        after = _assert_like_fresh(ff, pos, f"{type(opt).__name__} step")
        assert not torch.equal(after, before)


@pytest.mark.parametrize("params_grad", [True, False], ids=["parameters", "md"])
def test_force_field_under_inference_mode_then_with_autograd(params_grad):
    """Lists and values kept from a call under torch.inference_mode must not leak inference
    tensors into a later call that records autograd."""
    box, pos = _water(300)
    ff = _force_field(box)
    ff.requires_grad_(params_grad)
    with torch.inference_mode():
        e_inference = ff(pos)
    e, f = _energy_forces(ff, pos)
    assert_close_scaled(e, e_inference, "mm", F64, "energy after inference mode")
    assert_close_scaled(f, _energy_forces(copy.deepcopy(ff), pos)[1], "mm", F64, "forces")


def test_verlet_list_compares_the_same_cell_by_state():
    box, pos = _water(40)
    cell = box.cell.clone()
    verlet = fastff.VerletList(0.5, 0.1)
    verlet.update(pos, cell)
    with HostReads() as reads:
        for _ in range(3):
            verlet.update(pos, cell)
    assert reads.count["equal"] == 0 and verlet.rebuilds == 1
    same_values = cell.clone()  # another tensor: compared by value once, then by state
    with HostReads() as reads:
        verlet.update(pos, same_values)
        verlet.update(pos, same_values)
    assert reads.count["equal"] == 1 and verlet.rebuilds == 1
    cell.mul_(1.01)  # in place: a new version
    verlet.update(pos, cell)
    assert verlet.rebuilds == 2
    cell.data.mul_(1.01)  # not seen through the version counter: reset() rebuilds
    verlet.update(pos, cell)
    assert verlet.rebuilds == 2
    verlet.reset()
    nl = verlet.update(pos, cell)
    assert verlet.rebuilds == 3 and torch.equal(nl.cell, cell)


# --------------------------------------------------------------- validation once, at the door

def _steady(call, positions_scans):
    """Scans and host reads of one call after a warm-up (built lists, filled caches)."""
    call(0.0)
    positions_scans[0] = 0
    with HostReads() as reads:
        call(1e-3)
    return positions_scans[0], reads.count


@pytest.mark.parametrize("skin", [0.0, 0.1])
def test_schnet_forward_and_forces_scan_positions_once(positions_scans, skin):
    torch.manual_seed(0)
    box, pos = _water(40)
    model = models.SchNet(16, 3, 12, 0.5, skin=skin).double()

    def call(shift):
        models.energy_and_forces(model, box.species, pos + shift, box.cell)

    scans, reads = _steady(call, positions_scans)
    assert scans == 1
    # the scan's reduction; the neighbor list's pbc test (a fresh list) or the Verlet check
    assert reads["_local_scalar_dense"] <= 2, reads
    assert reads["nonzero"] == reads["equal"] == 0, reads
    scans, reads = _steady(lambda shift: model(box.species, pos + shift, box.cell),
                           positions_scans)
    assert scans == 1 and sum(reads.values()) <= 2, reads


def test_schnet_with_a_given_list_scans_positions_once(positions_scans):
    torch.manual_seed(0)
    box, pos = _water(40)
    model = models.SchNet(16, 3, 12, 0.5).double()
    nl = fastff.neighbor_list(pos, 0.5, box.cell)

    def call(shift):
        models.energy_and_forces(model, box.species, pos + shift, box.cell, nl=nl)

    scans, reads = _steady(call, positions_scans)
    assert scans == 1 and sum(reads.values()) == 1, reads


@pytest.mark.parametrize("params_grad", [True, False], ids=["parameters", "md"])
def test_force_field_energy_and_forces_scan_positions_once(positions_scans, params_grad):
    box, pos = _water(40)
    ff = mm.water_force_field(box, cutoff=0.5, dtype=F64)
    ff.requires_grad_(params_grad)

    def call(shift):
        x = (pos + shift).requires_grad_(True)
        torch.autograd.grad(ff(x), x)

    scans, reads = _steady(call, positions_scans)
    assert scans == 1
    assert reads["_local_scalar_dense"] <= 2 and reads["nonzero"] == 0, reads  # scan, Verlet
    # equal: the CPU comparisons of values kept for the box and, without parameter gradients,
    # for the exception parameters (never on other devices)
    assert reads["equal"] == (1 if params_grad else 3), reads


def test_public_functions_still_check_their_arguments():
    box, pos = _water(10)
    bad = pos.clone()
    bad[4, 1] = float("nan")
    model = models.SchNet(16, 1, 12, 0.5).double()
    nl = fastff.neighbor_list(pos, 0.5, box.cell)
    with pytest.raises(ValueError, match=r"positions contains NaN or inf \(first at atom 4\)"):
        model.interactions[0].conv(torch.zeros(pos.shape[0], 16, dtype=F64), bad, nl, box.cell)
    with pytest.raises(ValueError, match="first at atom 4"):
        model(box.species, bad, box.cell)
    with pytest.raises(ValueError, match="first at atom 4"):
        models.energy_and_forces(model, box.species, bad, box.cell, nl=nl)
    ff = mm.water_force_field(box, cutoff=0.3, dtype=F64)
    with pytest.raises(ValueError, match="first at atom 4"):
        ff(bad)
    with pytest.raises(ValueError, match="first at atom 4"):
        mm.bonded(bad, bonds=(box.bonds, box.bond_k, box.bond_r0), cell=box.cell)
    with pytest.raises(ValueError, match="positions has 29 atoms but the force field"):
        ff(pos[:29])
    half = fastff.neighbor_list(pos, 0.5, box.cell)
    half._reverse = torch.full_like(half.i, -1)
    half.symmetric = False
    with pytest.raises(ValueError, match="pairs without a mirror pair"):
        model(box.species, pos, box.cell, nl=half)


# --------------------------------------------------------------- thread-local checks

def test_no_checks_in_one_thread_leaves_checks_on_in_another():
    bad = torch.zeros(4, 3)
    bad[2, 0] = float("nan")
    off, checked, done = threading.Event(), threading.Event(), threading.Event()
    seen: dict = {}

    def quiet():
        fastff.set_checks(False)
        with fastff.no_checks():
            off.set()
            checked.wait(10)
            seen["quiet"] = _checks.checks_enabled()
            _checks.positions(bad)  # no scan here
        seen["quiet after"] = _checks.checks_enabled()
        fastff.set_checks(True)
        done.set()

    def watchful():
        off.wait(10)
        seen["watchful"] = _checks.checks_enabled()
        try:
            _checks.positions(bad)
        except ValueError as exc:
            seen["error"] = str(exc)
        checked.set()

    threads = [threading.Thread(target=quiet), threading.Thread(target=watchful)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert done.is_set()
    assert seen == {"quiet": False, "quiet after": False, "watchful": True,
                    "error": "positions contains NaN or inf (first at atom 2)"}
    assert _checks.checks_enabled()  # this thread untouched


# --------------------------------------------------------------- backend resolved once

def test_backend_resolved_when_built_not_per_call(monkeypatch):
    box, pos = _water(10)
    torch.manual_seed(0)
    model = models.SchNet(16, 2, 12, 0.5, skin=0.1).double()
    ff = mm.water_force_field(box, cutoff=0.3, dtype=F64)
    assert model.backend == ff.backend == "numba"
    assert all(b.conv.backend == "numba" for b in model.interactions)
    # a per-call read of the environment would now fail
    monkeypatch.setenv("FASTFF_BACKEND", "fortran")
    models.energy_and_forces(model, box.species, pos, box.cell)
    x = pos.clone().requires_grad_(True)
    torch.autograd.grad(ff(x), x)
    with pytest.raises(ValueError, match="FASTFF_BACKEND must be one of"):
        model.set_backend(None)
    monkeypatch.setenv("FASTFF_BACKEND", "reference")
    assert model.set_backend(None).backend == "reference"
    assert all(b.conv.backend == "reference" for b in model.interactions)
    assert models.SchNet(16, 1).backend == "reference"
    assert ff.set_backend(None).backend == "reference"
    assert ff.verlet is not None and ff.verlet.backend == "reference"
    monkeypatch.delenv("FASTFF_BACKEND")
    # a move to another device resolves the default again; a named backend stays
    assert models.SchNet(16, 1).to("meta").backend == "reference"
    assert models.SchNet(16, 1, backend="numba").to("meta").backend == "numba"
