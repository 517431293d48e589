"""Whole-model benchmarks on the TIP3P water box: SchNet and PaiNN on fastff kernels, the same
weights on the torch reference backend, torch_geometric's SchNet (unfused, same neighbor list,
same hyper-parameters), and the MM energy of the same box (fastff and OpenMM's CPU platform).

Every case computes energy + forces ("full"), or energy alone ("forward"), with the defaults of
``fastff.models`` (F = 64, 3 interactions, cutoff 0.5 nm), float32, 2 threads. Positions move by
a small random step before every call, so Verlet lists (MM) rebuild as in MD.

Run:  python -m pytest bench/bench_models.py --benchmark-group-by=group \
          --benchmark-columns=median,iqr,rounds
      FASTFF_BENCH_ATOMS=30000 ... for the 30,000-atom box (default 3,000).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastff  # noqa: E402
from fastff import benchmark, models, systems  # noqa: E402
from fastff import mm as fmm  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
ATOMS = int(os.environ.get("FASTFF_BENCH_ATOMS", "3000"))
DTYPE = torch.float32


@pytest.fixture(scope="module")
def box():
    return systems.water_box(ATOMS // 3, dtype=DTYPE)


class Walker:
    """Positions along an MD-like random walk (a new frame per call)."""

    def __init__(self, positions: torch.Tensor, seed: int = 1):
        self.g = torch.Generator().manual_seed(seed)
        self.x = positions.detach().clone()

    def __call__(self) -> torch.Tensor:
        step = torch.randn(self.x.shape, generator=self.g, dtype=torch.float64)
        self.x = self.x + (benchmark.STEP_NM * step).to(self.x.dtype)
        return self.x.detach().requires_grad_(True)


def _energy_forces(energy, walker):
    def call():
        x = walker()
        e = energy(x).sum()
        return torch.autograd.grad(e, x)[0]
    return call


def _forward(energy, walker):
    def call():
        with torch.no_grad():
            return energy(walker().detach())
    return call


def _run(benchmark_fixture, call, rounds=5):
    call()  # warm-up: JIT compilation, first list build
    benchmark_fixture.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


def _model(name: str, backend: str | None, tabulate: bool, box):
    """energy(x) of a model; every case builds the same list with fastff's cell list (the
    reference backend's own list is an O(N^2) oracle, not an eager baseline)."""
    torch.manual_seed(0)
    m = (models.PaiNN() if name == "painn" else models.SchNet()).to(DTYPE)
    m.set_backend(backend).set_tabulate(tabulate)

    def energy(x):
        return m(box.species, x, box.cell, nl=fastff.neighbor_list(x, m.cutoff, box.cell))
    return energy


CASES = [(name, backend, tab) for name in ("schnet", "painn")
         for backend, tab in ((None, False), (None, True), ("reference", False))]
IDS = [f"{n}-{'reference' if b else 'fastff'}{'-tabulated' if t else ''}" for n, b, t in CASES]


@pytest.mark.parametrize("name,backend,tabulate", CASES, ids=IDS)
def test_model_full(benchmark, box, name, backend, tabulate):
    benchmark.group = f"energy+forces {ATOMS} atoms"
    rounds = 3 if backend == "reference" else 5
    _run(benchmark, _energy_forces(_model(name, backend, tabulate, box), Walker(box.positions)),
         rounds)


@pytest.mark.parametrize("name,backend,tabulate", CASES, ids=IDS)
def test_model_forward(benchmark, box, name, backend, tabulate):
    benchmark.group = f"energy {ATOMS} atoms"
    rounds = 3 if backend == "reference" else 5
    _run(benchmark, _forward(_model(name, backend, tabulate, box), Walker(box.positions)),
         rounds)


def _pyg_schnet(box):
    pyg = pytest.importorskip("torch_geometric.nn.models.schnet")
    ref = models.SchNet()
    cell = box.cell

    def graph(pos, batch):
        nl = fastff.neighbor_list(pos, ref.cutoff, cell)
        return torch.stack([nl.j, nl.i]), nl.distances(pos, cell)

    torch.manual_seed(0)
    return pyg.SchNet(hidden_channels=ref.num_features, num_filters=ref.num_features,
                      num_interactions=3, num_gaussians=32, cutoff=ref.cutoff,
                      interaction_graph=graph).to(DTYPE)


def test_pyg_schnet_full(benchmark, box):
    benchmark.group = f"energy+forces {ATOMS} atoms"
    m = _pyg_schnet(box)
    species = box.species
    _run(benchmark, _energy_forces(lambda x: m(species, x), Walker(box.positions)), 3)


def test_pyg_schnet_forward(benchmark, box):
    benchmark.group = f"energy {ATOMS} atoms"
    m = _pyg_schnet(box)
    species = box.species
    _run(benchmark, _forward(lambda x: m(species, x), Walker(box.positions)), 3)


def test_mm_fastff_full(benchmark, box):
    benchmark.group = f"energy+forces {ATOMS} atoms"
    ff = fmm.water_force_field(box)
    _run(benchmark, _energy_forces(lambda x: ff(x, box.cell), Walker(box.positions)), 20)


def test_mm_openmm_full(benchmark, box):
    openmm = pytest.importorskip("openmm")
    benchmark.group = f"energy+forces {ATOMS} atoms"
    ctx = openmm.Context(box.to_openmm(), openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("CPU"),
                         {"Threads": os.environ["OMP_NUM_THREADS"]})
    walker = Walker(box.positions)

    def call():
        ctx.setPositions(walker().detach().double().numpy())
        return ctx.getState(getEnergy=True, getForces=True)

    _run(benchmark, call, 20)
