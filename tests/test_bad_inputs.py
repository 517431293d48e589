"""Bad inputs get an error naming the argument before any kernel runs.

- float16 / bfloat16 positions (and cells) at every door: neighbor lists (functional,
  ``from_edge_index``, ``vectors``/``distances``, ``VerletList``), models (forward and
  ``energy_and_forces``), ``fastff.mm`` functions and ``ForceField``.
- negative or NaN distances to the radial basis while value checks are on (and accepted, as
  documented, with checks off).
- a cutoff whose estimated pair count cannot fit in free memory: refused from the estimate,
  within a second and without running the count pass.
"""

import math
import resource
import time
import warnings

import pytest
import torch

import fastff
import fastff.mm as mm
from fastff import models, systems
from fastff.kernels._runtime import memory

warnings.filterwarnings("ignore", message="fastff: .* falls back")

HALF = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])


def _box(rng, n):
    edge = float(rng.uniform(1.5, 3.0))
    positions = torch.from_numpy(rng.uniform(0, edge, (n, 3)))
    return positions, torch.eye(3, dtype=torch.float64) * edge


def _message(dtype):
    return rf"positions must be float32 or float64, got {dtype}"


@HALF
def test_neighbor_lists_refuse_half_precision(rng, dtype):
    positions, cell = _box(rng, int(rng.integers(5, 40)))
    with pytest.raises(TypeError, match=_message(dtype)):
        fastff.neighbor_list(positions.to(dtype), 0.5, cell.to(dtype))
    with pytest.raises(TypeError, match=_message(dtype)):
        fastff.neighbor_list(positions.to(dtype), 0.5)
    with pytest.raises(TypeError, match=_message(dtype)):
        fastff.VerletList(0.5, 0.1).update(positions.to(dtype), cell.to(dtype))
    with pytest.raises(TypeError, match=r"cell has dtype .* but positions has torch.float64"):
        fastff.neighbor_list(positions, 0.5, cell.to(dtype))
    nl = fastff.neighbor_list(positions, 0.5, cell)
    with pytest.raises(TypeError, match=_message(dtype)):
        nl.distances(positions.to(dtype), cell.to(dtype))
    with pytest.raises(TypeError, match=_message(dtype)):
        nl.vectors(positions.to(dtype))
    with pytest.raises(TypeError, match=rf"cell must be float32 or float64, got {dtype}"):
        fastff.NeighborList.from_edge_index(torch.stack((nl.j, nl.i)), positions.shape[0],
                                            shifts=nl.shifts, cell=cell.to(dtype))


@HALF
@pytest.mark.parametrize("model_class", [models.SchNet, models.PaiNN])
def test_models_refuse_half_precision(rng, dtype, model_class):
    box = systems.water_box(int(rng.integers(3, 12)), seed=int(rng.integers(1 << 30)))
    model = model_class(8, 1, 6, 0.4)
    positions, cell = box.positions.to(dtype), box.cell.to(dtype)
    with pytest.raises(TypeError, match=_message(dtype)):
        model(box.species, positions, cell)
    with pytest.raises(TypeError, match=_message(dtype)):
        models.energy_and_forces(model, box.species, positions, cell)
    # a model converted to the same half dtype is refused at the same door
    with pytest.raises(TypeError, match=_message(dtype)):
        model.to(dtype)(box.species, positions, cell)


@HALF
def test_mm_refuses_half_precision(rng, dtype):
    box = systems.water_box(int(rng.integers(3, 12)), seed=int(rng.integers(1 << 30)))
    positions, cell = box.positions.to(dtype), box.cell.to(dtype)
    ff = mm.water_force_field(box, cutoff=0.3)
    with pytest.raises(TypeError, match=_message(dtype)):
        ff(positions)
    with pytest.raises(TypeError, match=_message(dtype)):
        mm.bonded(positions, bonds=(box.bonds, box.bond_k, box.bond_r0), cell=cell)
    with pytest.raises(TypeError, match=_message(dtype)):
        mm.harmonic_bonds(positions, box.bonds, box.bond_k, box.bond_r0, cell=cell)
    nl = fastff.neighbor_list(box.positions, 0.3, box.cell)
    sigma = torch.full((box.num_atoms,), 0.3)
    epsilon = torch.full((box.num_atoms,), 0.5)
    with pytest.raises(TypeError, match=_message(dtype)):
        mm.lennard_jones(positions, nl, sigma.to(dtype), epsilon.to(dtype), cutoff=0.3)


@pytest.mark.parametrize("bad", [-1.0, math.nan], ids=["negative", "nan"])
def test_radial_basis_refuses_negative_or_nan_distances(rng, bad):
    distances = torch.from_numpy(rng.uniform(0.0, 0.5, int(rng.integers(2, 50))))
    k = int(rng.integers(distances.shape[0]))
    distances[k] = bad * float(rng.uniform(0.1, 1.0))
    with pytest.raises(ValueError, match=rf"distances must be >= 0 and not NaN, .* at pair {k}"):
        fastff.mp.radial_basis(distances, num_basis=4, cutoff=0.5)
    with pytest.raises(ValueError, match=rf"distances .* at pair {k}"):
        fastff.nn.RadialFilter(4, 8, 0.5).double()(distances)
    with pytest.raises(TypeError, match=r"distances must be float32 or float64, got torch.float16"):
        fastff.mp.radial_basis(distances.abs().half(), num_basis=4, cutoff=0.5)
    with fastff.no_checks():  # value checks off: documented garbage in, garbage out, no error
        out = fastff.mp.radial_basis(distances, num_basis=4, cutoff=0.5)
    good = torch.cat((distances[:k], distances[k + 1:]))
    expected = fastff.mp.radial_basis(good, num_basis=4, cutoff=0.5, backend="reference")
    torch.testing.assert_close(torch.cat((out[:k], out[k + 1:])), expected)


@pytest.mark.parametrize("case", ["cell", "batched-cells", "batched-slabs"])
def test_cutoff_beyond_memory_is_refused_from_the_estimate(rng, case):
    positions = torch.from_numpy(rng.uniform(0.0, 3.0, (1000, 3)))
    cell = torch.eye(3, dtype=torch.float64) * 3.0
    kwargs = {"cell": cell} if case == "cell" else {
        "cell": torch.stack((cell, cell)), "batch": torch.arange(2).repeat_interleave(500)}
    if case == "batched-slabs":  # z not periodic: V counts the atoms' extent plus 2 cutoffs
        kwargs["pbc"] = torch.tensor([True, True, False])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(MemoryError, match=r"cutoff 10000.0 would give about .* pairs") as err:
        fastff.neighbor_list(positions, 1e4, **kwargs)
    assert time.perf_counter() - start < 1.0
    # peak resident memory grew by less than 100 MiB (ru_maxrss is in KiB on Linux)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100 * 1024
    # the estimate: (4/3) pi rc^3 * density * atoms, to 1 %
    per_system = 1000 if case == "cell" else 500
    expected = 1000 * per_system / 27.0 * 4.0 / 3.0 * math.pi * 1e12
    if case == "batched-slabs":
        expected = sum(500 * 500 / (9.0 * (float(z.max() - z.min()) + 2e4))
                       for z in positions[:, 2].split(500)) * 4.0 / 3.0 * math.pi * 1e12
    estimate = float(str(err.value).split("about ")[1].split(" pairs")[0])
    assert estimate == pytest.approx(expected, rel=1e-2)
    with pytest.raises(MemoryError, match="cutoff"):
        fastff.VerletList(1e4, 0.1).update(positions, **kwargs)


def test_cutoff_within_memory_is_not_refused(rng):
    """The estimate refuses only what cannot fit: a large cutoff without a cell (at most every
    atom paired with every other) and a dense periodic list both build, with the pairs of the
    reference."""
    n = int(rng.integers(200, 400))
    positions = torch.from_numpy(rng.uniform(0.0, 3.0, (n, 3)))
    nl = fastff.neighbor_list(positions, 1e4)
    assert len(nl) == n * (n - 1)
    free = memory.free_memory(positions.device)
    assert free is not None and free > 0
    cell = torch.eye(3, dtype=torch.float64) * 3.0
    nl = fastff.neighbor_list(positions, 2.0, cell)
    ref = fastff.neighbor_list(positions, 2.0, cell, backend="reference")
    assert len(nl) == len(ref)
