"""The public neighbor-list surface: bad input, VerletList reuse, memory guard, checks switch."""

import numpy as np
import pytest
import torch

import fastff
from fastff.testing import assert_same_pairs


def cubic(edge=5.0, dtype=torch.float64):
    return torch.eye(3, dtype=dtype) * edge


def random_pos(rng, n, edge=5.0, dtype=torch.float64):
    return torch.tensor(rng.random((n, 3)) * edge, dtype=dtype)


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, error, words", [
    (torch.zeros(4, 2), ValueError, "positions must have shape [N, 3]"),
    (torch.zeros(4, 3, dtype=torch.int64), TypeError,
     "positions must be float32 or float64, got torch.int64"),
    (np.zeros((4, 3)), TypeError, "positions must be a torch.Tensor"),
])
def test_bad_positions(bad, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        fastff.neighbor_list(bad, 2.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_positions(rng, value):
    pos = random_pos(rng, 6)
    pos[3, 1] = value
    with pytest.raises(ValueError, match="positions contains NaN or inf .*atom 3"):
        fastff.neighbor_list(pos, 2.0, cubic())


@pytest.mark.parametrize("cutoff", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_cutoff(rng, cutoff):
    with pytest.raises(ValueError, match="cutoff must be finite and positive"):
        fastff.neighbor_list(random_pos(rng, 4), cutoff)


def test_cutoff_not_a_number(rng):
    with pytest.raises(TypeError, match="cutoff must be a number"):
        fastff.neighbor_list(random_pos(rng, 4), "far")


def test_pbc_without_cell(rng):
    with pytest.raises(ValueError, match="pbc is True along some axis but no cell"):
        fastff.neighbor_list(random_pos(rng, 4), 2.0, pbc=[True, False, False])


@pytest.mark.parametrize("cell, pbc", [
    (torch.zeros(3, 3, dtype=torch.float64), [True, True, True]),
    (torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]]).double(), [True, True, False]),
    (torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 0.0]]).double(), [True, True, True]),
])
def test_singular_cell(rng, cell, pbc):
    with pytest.raises(ValueError, match="cell is singular along its periodic axes"):
        fastff.neighbor_list(random_pos(rng, 4), 2.0, cell, pbc)


def test_singular_rows_fine_when_not_periodic(rng):
    cell = torch.tensor([[4.0, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.float64)
    nl = fastff.neighbor_list(random_pos(rng, 10), 2.0, cell, [True, False, False])
    assert nl.num_atoms == 10


def test_bad_cell_shape_and_dtype(rng):
    pos = random_pos(rng, 4)
    with pytest.raises(ValueError, match=r"cell must have shape \[3, 3\] or \[B, 3, 3\]"):
        fastff.neighbor_list(pos, 2.0, torch.eye(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="cell has dtype torch.float32 but positions"):
        fastff.neighbor_list(pos, 2.0, cubic(dtype=torch.float32))
    with pytest.raises(ValueError, match="no batch was given"):
        fastff.neighbor_list(pos, 2.0, cubic().expand(2, 3, 3))
    with pytest.raises(ValueError, match="cell contains NaN"):
        fastff.neighbor_list(pos, 2.0, cubic() * float("nan"))


def test_bad_pbc(rng):
    pos = random_pos(rng, 4)
    with pytest.raises(ValueError, match=r"pbc must have shape \[3\]"):
        fastff.neighbor_list(pos, 2.0, cubic(), pbc=[True, True])
    with pytest.raises(TypeError, match="pbc must hold bools"):
        fastff.neighbor_list(pos, 2.0, cubic(), pbc=torch.ones(3))


def test_bad_batch(rng):
    pos = random_pos(rng, 6)
    with pytest.raises(ValueError, match="batch must be sorted"):
        fastff.neighbor_list(pos, 2.0, batch=torch.tensor([0, 1, 0, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"batch must have shape \[6\]"):
        fastff.neighbor_list(pos, 2.0, batch=torch.tensor([0, 0, 1]))
    with pytest.raises(TypeError, match="batch must be int64"):
        fastff.neighbor_list(pos, 2.0, batch=torch.zeros(6, dtype=torch.int32))
    with pytest.raises(ValueError, match="negative system index"):
        fastff.neighbor_list(pos, 2.0, batch=torch.tensor([-1, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="batch refers to 3 systems but cell holds only 2"):
        fastff.neighbor_list(pos, 2.0, cubic().expand(2, 3, 3).clone(),
                             batch=torch.tensor([0, 0, 1, 1, 2, 2]))


def test_unknown_backend(rng):
    with pytest.raises(ValueError, match="backend='cuda' is not a fastff backend"):
        fastff.neighbor_list(random_pos(rng, 4), 2.0, backend="cuda")


def test_backend_device_mismatch(rng, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        fastff.kernels._runtime.registry.requested_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend='numba' runs on CPU tensors only"):
        fastff.kernels._runtime.registry.requested_backend("numba", torch.device("cuda"))


def test_environment_backend(rng, monkeypatch):
    monkeypatch.setenv("FASTFF_BACKEND", "reference")
    assert fastff.neighbor_list(random_pos(rng, 5), 2.0).backend == "reference"
    monkeypatch.setenv("FASTFF_BACKEND", "fortran")
    with pytest.raises(ValueError, match="FASTFF_BACKEND='fortran' is not a fastff backend"):
        fastff.neighbor_list(random_pos(rng, 5), 2.0)


def test_missing_toolchain_falls_back_once(rng, monkeypatch):
    """An op whose backend cannot be imported runs the reference, with one warning."""
    from fastff.kernels._runtime import registry

    registry.register("_test_missing", "neighbors", "neighbor_list")
    monkeypatch.setitem(registry._MODULES, "numba", "no_such_module")
    with pytest.warns(RuntimeWarning, match="falls back to the torch reference"):
        name, _ = registry.resolve("_test_missing", torch.device("cpu"))
    assert name == "reference"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.resolve("_test_missing", torch.device("cpu"))[0] == "reference"
    del registry._OPS["_test_missing"]


def test_backends_table(capsys):
    table = fastff.backends("cpu")
    out = capsys.readouterr().out
    assert "neighbor_list" in out and table["neighbor_list"]["cpu"][0] == "numba"


def test_vectors_wrong_atoms(rng):
    nl = fastff.neighbor_list(random_pos(rng, 6), 2.0, cubic())
    with pytest.raises(ValueError, match="positions has 5 atoms but .* built for 6"):
        nl.vectors(random_pos(rng, 5))


def test_half_list_has_no_reverse(rng):
    nl = fastff.neighbor_list(random_pos(rng, 6), 2.0, cubic(), half=True)
    with pytest.raises(ValueError, match="half neighbor list has no mirror"):
        _ = nl.reverse


def test_too_many_pairs_reports_estimate(rng, monkeypatch):
    """The output size is checked against free memory before it is allocated."""
    monkeypatch.setattr("os.sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else 4096)
    # a homogeneous box: the estimate from density refuses it before any pass
    with pytest.raises(MemoryError, match=r"cutoff 3.0 would give about .* pairs"):
        fastff.neighbor_list(random_pos(rng, 50), 3.0, cubic(), backend="numba")
    # a cluster in a large cell: the estimate fits (~35 pairs), the exact count does not
    with pytest.raises(MemoryError, match=r"neighbor list \(\d+ pairs\) would need .* GiB"):
        fastff.neighbor_list(random_pos(rng, 50, edge=0.5), 3.0, cubic(20.0), backend="numba")


def test_no_checks_skips_value_scans(rng):
    pos = random_pos(rng, 30)
    pos[0, 0] = float("nan")
    with fastff.no_checks():
        nl = fastff.neighbor_list(pos, 2.0, cubic(), backend="numba")  # memory-safe, no error
    assert nl.ptr.shape == (31,)
    with pytest.raises(ValueError, match="NaN"):
        fastff.neighbor_list(pos, 2.0, cubic())


# ---- VerletList -------------------------------------------------------------------------------

def test_verlet_reuses_then_rebuilds(rng):
    cell = cubic(8.0)
    pos = random_pos(rng, 80, 8.0)
    verlet = fastff.VerletList(cutoff=2.5, skin=0.6)
    first = verlet.update(pos, cell)
    assert verlet.rebuilds == 1 and first.cutoff == pytest.approx(3.1)
    for _ in range(5):
        step = torch.tensor(rng.normal(size=pos.shape)) * 0.02
        step *= torch.clamp(0.29 / step.norm(dim=1, keepdim=True), max=1.0) * 0.2
        moved = pos + step
        nl = verlet.update(moved, cell)
        assert nl is first and verlet.rebuilds == 1
        # the reused list holds every pair within the cutoff of the new positions
        d = nl.distances(moved)
        exact = fastff.neighbor_list(moved, 2.5, cell, backend="reference")
        inside = d < 2.5
        assert_same_pairs((nl.i[inside], nl.j[inside], nl.shifts[inside]),
                          (exact.i, exact.j, exact.shifts), cutoff=2.5, dtype=torch.float64)
    far = pos.clone()
    far[7] += torch.tensor([0.31, 0.0, 0.0], dtype=torch.float64)  # beyond skin / 2
    assert verlet.update(far, cell) is not first and verlet.rebuilds == 2


def test_verlet_rebuilds_on_cell_and_wrap(rng):
    cell = cubic(8.0)
    pos = random_pos(rng, 40, 8.0)
    verlet = fastff.VerletList(2.0, 0.4)
    verlet.update(pos, cell)
    verlet.update(pos, cell * 1.01)
    assert verlet.rebuilds == 2
    wrapped = pos.clone()
    wrapped[0] += cell[0]  # the caller wrapped an atom: the old shifts would be wrong
    nl = verlet.update(wrapped, cell * 1.01)
    assert verlet.rebuilds == 3
    exact = fastff.neighbor_list(wrapped, 2.0, cell * 1.01, backend="reference")
    inside = nl.distances(wrapped) < 2.0
    assert_same_pairs((nl.i[inside], nl.j[inside], nl.shifts[inside]),
                      (exact.i, exact.j, exact.shifts), cutoff=2.0, dtype=torch.float64)


def test_verlet_bad_input(rng):
    with pytest.raises(ValueError, match="skin must be finite and >= 0"):
        fastff.VerletList(2.0, -0.1)
    with pytest.raises(ValueError, match="cutoff must be finite and positive"):
        fastff.VerletList(0.0, 0.1)
    verlet = fastff.VerletList(2.0, 0.5)
    pos = random_pos(rng, 10)
    verlet.update(pos, cubic())
    bad = pos.clone()
    bad[2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        verlet.update(bad, cubic())


def test_verlet_compact_returns_pairs_within_cutoff(rng):
    """compact=True: every step returns exactly the pairs within the cutoff (set-equal to a fresh
    list), while the skin list is reused; neighbor_list / skin_list keep the skin list."""
    cell = cubic(8.0)
    pos = random_pos(rng, 80, 8.0)
    verlet = fastff.VerletList(2.5, 0.6, compact=True)
    plain = fastff.VerletList(2.5, 0.6)
    moved = pos
    for _ in range(4):
        nl = verlet.update(moved, cell)
        assert nl.cutoff == 2.5 and verlet.rebuilds == 1
        assert verlet.skin_list is verlet.neighbor_list is not nl
        assert verlet.skin_list.cutoff == pytest.approx(3.1)
        assert plain.update(moved, cell) is plain.neighbor_list  # unchanged without compact
        exact = fastff.neighbor_list(moved, 2.5, cell, backend="reference")
        assert_same_pairs((nl.i, nl.j, nl.shifts), (exact.i, exact.j, exact.shifts), cutoff=2.5,
                          dtype=torch.float64, actual_distances=nl.distances(moved),
                          expected_distances=exact.distances(moved))
        r = nl.reverse
        assert nl.symmetric and torch.equal(nl.j[r], nl.i) and torch.equal(nl.shifts[r],
                                                                           -nl.shifts)
        step = torch.tensor(rng.normal(size=pos.shape))
        moved = pos + 0.29 * step / step.norm(dim=1, keepdim=True) * torch.rand(80, 1,
                                                                                dtype=torch.float64)
    far = pos.clone()
    far[7] += torch.tensor([0.31, 0.0, 0.0], dtype=torch.float64)  # beyond skin / 2
    nl = verlet.update(far, cell)
    assert verlet.rebuilds == 2 and nl.cutoff == 2.5
    exact = fastff.neighbor_list(far, 2.5, cell, backend="reference")
    assert_same_pairs((nl.i, nl.j, nl.shifts), (exact.i, exact.j, exact.shifts), cutoff=2.5,
                      dtype=torch.float64)
    # without a skin there is nothing to compact: the built list is returned
    exact_verlet = fastff.VerletList(2.5, 0.0, compact=True)
    assert exact_verlet.update(pos, cell) is exact_verlet.skin_list


def test_within_bad_input(rng):
    pos = random_pos(rng, 10)
    nl = fastff.neighbor_list(pos, 2.5, cubic())
    with pytest.raises(ValueError, match="cutoff 2.6 is larger than the neighbor list's cutoff"):
        nl.within(pos, 2.6)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="cutoff must be finite and positive"):
            nl.within(pos, bad)
    with pytest.raises(ValueError, match="positions has 9 atoms but this neighbor list was built "
                                         "for 10"):
        nl.within(pos[:9], 2.0)
    with pytest.raises(ValueError, match=r"positions must have shape \[N, 3\]"):
        nl.within(pos[:, :2], 2.0)
    with pytest.raises(ValueError, match=r"cell must have shape \[3, 3\]"):
        nl.within(pos, 2.0, torch.eye(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="cell has dtype torch.float32"):
        nl.within(pos, 2.0, cubic(dtype=torch.float32))
    with fastff.no_checks(), pytest.raises(  # meta stands in for a GPU; it has no values
            ValueError, match="positions is on meta but the neighbor list is on cpu"):
        nl.within(pos.to("meta"), 2.0)
    bad = pos.clone()
    bad[4, 1] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or inf \(first at atom 4\)"):
        nl.within(bad, 2.0)
    verlet = fastff.VerletList(2.0, 0.5, compact=True)
    verlet.update(pos, cubic())
    with pytest.raises(ValueError, match="NaN"):
        verlet.update(bad, cubic())


def test_within_traced_and_profiled(rng):
    """The compaction ops are seen by profilers; a reverse first read under fake tensors is not
    kept, and the one read later is right."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    pos = random_pos(rng, 12)
    source = fastff.neighbor_list(pos, 2.5, cubic())
    with torch.profiler.profile() as prof:
        nl = source.within(pos, 2.0)
    assert any("fastff::neighbor_compact" in e.key for e in prof.key_averages())
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert fastff.neighbors.is_fake(nl.reverse)
    r = nl.reverse
    assert not fastff.neighbors.is_fake(r) and torch.equal(nl.i[r], nl.j)


def test_device_mismatch(rng):
    """Tensors on different devices are named (the meta device stands in for a GPU here)."""
    pos = random_pos(rng, 4)
    with pytest.raises(ValueError, match="cell is on meta but positions is on cpu"):
        fastff.neighbor_list(pos, 2.0, cubic().to("meta"))
    with pytest.raises(ValueError, match="batch is on meta but positions is on cpu"):
        fastff.neighbor_list(pos, 2.0, batch=torch.zeros(4, dtype=torch.int64, device="meta"))


def test_reverse_traced_first_is_not_cached(rng):
    """Reading nl.reverse first under fake tensors (tracing) must not leave a fake behind."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    pos = random_pos(rng, 12)
    nl = fastff.neighbor_list(pos, 2.5, cubic())
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert fastff.neighbors.is_fake(nl.reverse)
    r = nl.reverse
    assert not fastff.neighbors.is_fake(r)
    assert torch.equal(nl.i[r], nl.j)


def test_custom_op_visible_to_profiler_and_dispatch_modes(rng):
    """Eager calls may skip the dispatcher, but profilers and dispatch modes (the machinery of
    make_fx, export and fake tensors) must see fastff::neighbor_list."""
    from torch.utils._python_dispatch import TorchDispatchMode

    pos = random_pos(rng, 10)
    with torch.profiler.profile() as prof:
        fastff.neighbor_list(pos, 2.0, cubic())
    assert any("fastff::neighbor_list" in e.key for e in prof.key_averages())

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as mode:
        fastff.neighbor_list(pos, 2.0, cubic())
    assert any("fastff.neighbor_list" in name for name in mode.seen), mode.seen


# ---- distances: the build's, fused, or differentiable -----------------------------------------

def triclinic_system(rng, n=40, dtype=torch.float64):
    cell = torch.tensor([[5.0, 0, 0], [1.1, 4.8, 0], [-0.7, 0.6, 5.2]], dtype=dtype)
    pos = torch.tensor(rng.random((n, 3)), dtype=dtype) @ cell
    return pos, cell


def test_distances_of_the_build_for_its_cell(rng):
    """The build's distances come back for the build's positions and cell (passed or None), the
    very tensor, as long as neither changed."""
    pos, cell = triclinic_system(rng)
    nl = fastff.neighbor_list(pos, 2.5, cell)
    built = nl.distances(pos)
    assert nl.distances(pos, cell) is built
    assert nl.distances(pos, cell.clone()) is not built  # another tensor: computed, equal
    torch.testing.assert_close(nl.distances(pos, cell.clone()), built, rtol=1e-14, atol=1e-14)
    assert nl.distances(pos.clone(), cell) is not built


def test_distances_after_the_cell_changed_in_place(rng):
    pos, cell = triclinic_system(rng)
    nl = fastff.neighbor_list(pos, 2.5, cell)
    before = nl.distances(pos, cell).clone()
    cell.mul_(1.05)  # the list shares the cell's storage: its own cell changed too
    for given in (cell, None):
        after = nl.distances(pos, given)
        torch.testing.assert_close(after, torch.linalg.vector_norm(nl.vectors(pos, cell), dim=1))
        assert not torch.allclose(after, before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_fused_distances_match_the_reference(rng, dtype, backend):
    """New positions, no gradient: the fused pair_distances op, against float64 vectors."""
    pos, cell = triclinic_system(rng, 60, dtype)
    nl = fastff.neighbor_list(pos, 2.5, cell, backend=backend)
    moved = pos + 0.05 * torch.randn(pos.shape, dtype=dtype)
    expected = torch.linalg.vector_norm(nl.vectors(moved.double(), cell.double()), dim=1)
    for given in (cell, None):
        d = nl.distances(moved, given)
        assert d.dtype == dtype and d.shape == (len(nl),) and d.grad_fn is None
        torch.testing.assert_close(d.double(), expected, **fastff.testing.tolerance("distances",
                                                                                   dtype))
    with torch.no_grad():  # positions that require grad, gradient mode off: fused too
        d = nl.distances(moved.clone().requires_grad_(True), cell)
    assert d.grad_fn is None


def test_fused_distances_batched(rng):
    frames = [triclinic_system(rng, n) for n in (10, 25)]
    pos = torch.cat([f[0] for f in frames])
    cells = torch.stack([f[1] * (1 + 0.1 * k) for k, f in enumerate(frames)])
    batch = torch.tensor([0] * 10 + [1] * 25)
    nl = fastff.neighbor_list(pos, 2.5, cells, batch=batch)
    moved = pos + 0.05
    expected = torch.linalg.vector_norm(nl.vectors(moved, cells), dim=1)
    torch.testing.assert_close(nl.distances(moved, cells), expected, rtol=1e-12, atol=1e-12)


def test_fused_distances_skip_the_vectors(rng):
    """No [E, 3] array is allocated: numpy allocations (the kernels' outputs) are traced, and the
    fused path's peak is its [E] output, a third of the vectors the old path built."""
    import tracemalloc

    pos, cell = triclinic_system(rng, 400)
    cell = cell * 2.0
    pos = pos * 2.0
    nl = fastff.neighbor_list(pos, 4.0, cell)
    moved = pos + 0.01
    nl.distances(moved, cell)  # compile / load outside the measurement
    tracemalloc.start()
    try:
        nl.distances(moved, cell)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    vectors_bytes = len(nl) * 3 * 8
    assert len(nl) > 5000 and peak < 0.5 * vectors_bytes, (peak, vectors_bytes)


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_distances_with_gradients_stay_differentiable(rng, backend):
    """With a gradient the fused op runs too: values and first and second derivatives in
    positions and cell against torch's norm of the vectors (float64), and gradcheck."""
    pos, cell = triclinic_system(rng, 12)
    nl = fastff.neighbor_list(pos, 2.5, cell, backend=backend)
    p = pos.clone().requires_grad_(True)
    c = cell.clone().requires_grad_(True)
    d = nl.distances(p, c)
    assert d.grad_fn is not None and "Norm" not in d.grad_fn.name()
    expected = torch.linalg.vector_norm(nl.vectors(p, c), dim=1)
    torch.testing.assert_close(d, expected, rtol=1e-13, atol=1e-13)
    weights = torch.randn(len(nl), dtype=torch.float64)
    grads = torch.autograd.grad((weights * d).sum(), (p, c), create_graph=True)
    ref_grads = torch.autograd.grad((weights * expected).sum(), (p, c), create_graph=True)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    second = torch.autograd.grad(grads[0].square().sum(), (p, c))
    ref_second = torch.autograd.grad(ref_grads[0].square().sum(), (p, c))
    for g, r in zip(second, ref_second, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(nl.distances, (p, c))
    assert torch.autograd.gradgradcheck(nl.distances, (p, c))
    # the build's cell (cell=None) is fixed: gradients to positions only
    (g_pos,) = torch.autograd.grad((weights * nl.distances(p)).sum(), p)
    (ref_pos,) = torch.autograd.grad((weights * torch.linalg.vector_norm(
        nl.vectors(p), dim=1)).sum(), p)
    torch.testing.assert_close(g_pos, ref_pos, rtol=1e-12, atol=1e-12)


def test_distances_with_gradients_skip_the_vectors(rng):
    """The forward with a gradient needed allocates no [E, 3] array either (numpy allocations
    traced, as in the test above)."""
    import tracemalloc

    pos, cell = triclinic_system(rng, 400)
    nl = fastff.neighbor_list(pos * 2.0, 4.0, cell * 2.0)
    moved = (pos * 2.0 + 0.01).requires_grad_(True)
    nl.distances(moved, cell * 2.0)
    tracemalloc.start()
    try:
        d = nl.distances(moved, cell * 2.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert d.requires_grad
    vectors_bytes = len(nl) * 3 * 8
    assert len(nl) > 5000 and peak < 0.5 * vectors_bytes, (peak, vectors_bytes)


def test_distances_of_the_build_under_inference_mode(rng):
    """Inference tensors track no version: the list builds, and its distances are computed
    (never a kept value that a later in-place edit would make stale)."""
    pos, cell = triclinic_system(rng, 30)
    with torch.inference_mode():
        p, c = pos.clone(), cell.clone()
        nl = fastff.neighbor_list(p, 2.5, c)
        first = nl.distances(p, c)
        p.add_(0.05 * torch.randn_like(p))
        expected = torch.linalg.vector_norm(nl.vectors(p, c), dim=1)
        torch.testing.assert_close(nl.distances(p, c), expected, rtol=1e-13, atol=1e-13)
    assert not torch.allclose(first, expected)


def test_distances_of_the_build_follow_in_place_edits_of_positions(rng):
    pos, cell = triclinic_system(rng, 30)
    nl = fastff.neighbor_list(pos, 2.5, cell)
    built = nl.distances(pos, cell)
    pos.add_(0.05 * torch.randn_like(pos))  # same object, new version: computed again
    again = nl.distances(pos, cell)
    assert again is not built
    torch.testing.assert_close(again, torch.linalg.vector_norm(nl.vectors(pos, cell), dim=1),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_pair_distances_op(rng, backend):
    """The fused op on its own: opcheck, and float64 gradcheck / gradgradcheck (its backward is
    built from pair_vectors and its transpose)."""
    from fastff.kernels.neighbors import op

    pos, cell = triclinic_system(rng, 8)
    nl = fastff.neighbor_list(pos, 3.0, cell)
    assert len(nl) > 0
    p = pos.clone().requires_grad_(True)
    c = cell.unsqueeze(0).clone().requires_grad_(True)
    args = (p, c, None, nl.i, nl.j, nl.shifts, backend)
    torch.library.opcheck(op.pair_distances, args)
    torch.testing.assert_close(op.pair_distances(*args),
                               torch.linalg.vector_norm(nl.vectors(pos, cell), dim=1))

    def distances(p, c):
        return op.pair_distances(p, c, None, nl.i, nl.j, nl.shifts, backend)

    assert torch.autograd.gradcheck(distances, (p, c))
    assert torch.autograd.gradgradcheck(distances, (p, c))


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_pair_distances_transpose_is_the_gradient(rng, backend):
    """The fused first-order backward of pair_distances (a batch of two triclinic cells, one
    pair of coincident atoms) against float64 autograd through the vectors' norm."""
    from fastff.kernels.neighbors import op

    systems = [triclinic_system(rng, 9) for _ in range(2)]
    pos = torch.cat([p for p, _ in systems])
    pos[1] = pos[0]  # coincident: zero gradient, as torch's norm
    cells = torch.stack([c for _, c in systems])
    batch = torch.tensor([0] * 9 + [1] * 9)
    nl = fastff.neighbor_list(pos, 3.0, cells, batch=batch)
    grad = torch.as_tensor(rng.normal(size=len(nl)))
    args = (grad, pos, cells, batch, nl.i, nl.j, nl.shifts, backend)
    torch.library.opcheck(op.pair_distances_transpose, args,
                          test_utils=("test_schema", "test_faketensor"))  # no autograd of its own
    got_pos, got_cells = op.pair_distances_transpose(*args)
    p, c = pos.clone().requires_grad_(True), cells.clone().requires_grad_(True)
    vectors = nl.vectors(p, c)
    norm = torch.linalg.vector_norm(vectors, dim=1)
    want_pos, want_cells = torch.autograd.grad((grad * norm).sum(), (p, c))
    torch.testing.assert_close(got_pos, want_pos, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_cells, want_cells, rtol=1e-12, atol=1e-12)
    # through the op's backward: first order takes the fused pass, create_graph the composite
    p = pos.clone().requires_grad_(True)
    d = op.pair_distances(p, cells, batch, nl.i, nl.j, nl.shifts, backend)
    first, = torch.autograd.grad((grad * d).sum(), p)
    d = op.pair_distances(p, cells, batch, nl.i, nl.j, nl.shifts, backend)
    graphed, = torch.autograd.grad((grad * d).sum(), p, create_graph=True)
    torch.testing.assert_close(first, want_pos, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(graphed.detach(), want_pos, rtol=1e-12, atol=1e-12)


def test_pair_distances_visible_to_profiler(rng):
    pos, cell = triclinic_system(rng, 10)
    nl = fastff.neighbor_list(pos, 2.5, cell)
    with torch.profiler.profile() as prof:
        nl.distances(pos + 0.01, cell)
    assert any("fastff::pair_distances" in e.key for e in prof.key_averages())


def test_fused_distances_of_an_unchecked_list_stay_in_bounds(rng):
    """Indices never checked (value checks off) cannot make the fused kernel read outside the
    positions: they are clamped (NUMBA_BOUNDSCHECK=1 runs of this test would raise otherwise)."""
    edges = torch.tensor([[0, 1, 10**6, -5], [1, 0, 2, 3]])
    with fastff.no_checks():
        nl = fastff.NeighborList.from_edge_index(edges, 4, cutoff=2.0)
    pos = random_pos(rng, 4)
    d = nl.distances(pos + 0.0)
    assert d.shape == (4,)
    torch.testing.assert_close(d[:2], (pos[1] - pos[0]).norm().expand(2))
