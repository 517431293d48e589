"""Neighbor-list benchmarks: fastff against vesin, matscipy and ASE, measured in the same run.

Run: python -m pytest bench/bench_neighbors.py --benchmark-group-by=group
Every case builds a full list with shifts and distances ("ijSd"), float64, 2 threads.
Targets: 10^4 atoms <= 1.0x vesin, 10^5 atoms <= 0.7x
vesin, 8-atom small triclinic cell <= 2x vesin, 256 molecules batched >= 10x faster than vesin
per molecule, a Verlet-list reuse step <= 30% of a rebuild, peak memory <= 1.5x the output.
Compaction of a Verlet list to the model cutoff is timed against a fresh list at that cutoff
(water, nm, float32).

ASE's interface (``fastff.ase.neighbor_list("ijdDS", atoms, 5.0)``, numpy in and out) against
``vesin.ase_neighbor_list`` and matscipy's ``neighbour_list``, 10^4 atoms; targets <= 1.0x
vesin and <= 0.3x matscipy in default settings (bench/conftest.py leaves malloc untuned):

    python -m pytest bench/bench_neighbors.py -k ase_interface --benchmark-group-by=group

(``extra_info["malloc_tuned"]`` records which settings a run had.)
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastff

sys.path.insert(0, str(Path(__file__).parent))
from systems import molecule_batch, small_triclinic, uniform_box  # noqa: E402

CUTOFF = 5.0
SIZES = [10_000, 100_000]


def _rounds(n):
    return {"rounds": 15, "warmup_rounds": 2} if n <= 10_000 else {"rounds": 5, "warmup_rounds": 1}


def fastff_full(pos, cell, pbc=True):
    nl = fastff.neighbor_list(pos, CUTOFF, cell, pbc=[pbc] * 3)
    return nl.i, nl.j, nl.shifts, nl.distances(pos, cell)  # as callers pass it: the build's


def vesin_full(pos, cell, pbc=True):
    import vesin

    calc = vesin.NeighborList(cutoff=CUTOFF, full_list=True)
    p, c = pos.numpy(), cell.numpy()
    return lambda: calc.compute(p, c, pbc, "ijSd")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("code", ["fastff", "vesin", "matscipy", "ase"])
def test_uniform_periodic(benchmark, code, n):
    benchmark.group = f"uniform periodic, {n} atoms, cutoff 5 A"
    pos, cell = uniform_box(n)
    if code == "fastff":
        run = lambda: fastff_full(pos, cell)  # noqa: E731
    elif code == "vesin":
        pytest.importorskip("vesin")
        run = vesin_full(pos, cell)
    elif code == "matscipy":
        from matscipy.neighbours import neighbour_list

        p, c = pos.numpy(), cell.numpy()
        run = lambda: neighbour_list("ijSd", positions=p, cell=c, pbc=[True] * 3,  # noqa: E731
                                     cutoff=CUTOFF)
    else:
        if n > 10_000:
            pytest.skip("ASE takes minutes at this size")
        import ase
        from ase.neighborlist import neighbor_list

        atoms = ase.Atoms(positions=pos.numpy(), cell=cell.numpy(), pbc=True)
        run = lambda: neighbor_list("ijSd", atoms, CUTOFF)  # noqa: E731
    out = benchmark.pedantic(run, **_rounds(n if code != "ase" else 10**6))
    benchmark.extra_info["pairs"] = int(len(out[0]))
    benchmark.extra_info["pairs_per_s"] = len(out[0]) / benchmark.stats.stats.median


@pytest.mark.parametrize("code", ["fastff", "vesin", "matscipy"])
def test_ase_interface(benchmark, code):
    """ASE's call, "ijdDS" from an ase.Atoms: what a data pipeline runs per structure."""
    import ase

    from fastff.allocator import malloc_tuned

    n = 10_000
    pos, cell = uniform_box(n)
    atoms = ase.Atoms(positions=pos.numpy(), cell=cell.numpy(), pbc=True)
    if code == "fastff":
        from fastff.ase import neighbor_list
    elif code == "vesin":
        vesin = pytest.importorskip("vesin")
        neighbor_list = vesin.ase_neighbor_list
    else:
        from matscipy.neighbours import neighbour_list as neighbor_list
    tuned = malloc_tuned()
    benchmark.group = (f"ASE interface ijdDS, {n} atoms, cutoff 5 A, "
                       f"{'tune_malloc' if tuned else 'default malloc'}")
    out = benchmark.pedantic(lambda: neighbor_list("ijdDS", atoms, CUTOFF), **_rounds(n))
    benchmark.extra_info["pairs"] = int(len(out[0]))
    benchmark.extra_info["malloc_tuned"] = tuned


@pytest.mark.parametrize("code", ["fastff", "vesin"])
def test_small_triclinic(benchmark, code):
    """8 atoms, ~4 A cell, cutoff 6 A: overhead-dominated, many images."""
    benchmark.group = "8 atoms, triclinic ~4 A cell, cutoff 6 A"
    pos, cell = small_triclinic()
    global CUTOFF
    saved, CUTOFF = CUTOFF, 6.0
    try:
        run = (lambda: fastff_full(pos, cell)) if code == "fastff" else vesin_full(pos, cell)
        out = benchmark.pedantic(run, rounds=300, warmup_rounds=20)
    finally:
        CUTOFF = saved
    benchmark.extra_info["pairs"] = int(len(out[0]))


@pytest.mark.parametrize("code", ["fastff batched", "vesin per molecule"])
def test_molecule_batch(benchmark, code):
    """256 molecules of 20 atoms, no periodicity: one batched call vs one call per molecule."""
    benchmark.group = "256 molecules x 20 atoms, no pbc, cutoff 5 A"
    pos, batch = molecule_batch()
    if code == "fastff batched":
        def run():
            nl = fastff.neighbor_list(pos, CUTOFF, batch=batch)
            return nl.i, nl.distances(pos)
    else:
        import vesin

        calc = vesin.NeighborList(cutoff=CUTOFF, full_list=True)
        chunks = [c.numpy() for c in pos.split(20)]
        box = np.zeros((3, 3))

        def run():
            return [calc.compute(c, box, False, "ijSd") for c in chunks]
    benchmark.pedantic(run, rounds=30, warmup_rounds=3)


@pytest.mark.parametrize("step", ["fastff rebuild", "fastff reuse"])
def test_verlet_reuse(benchmark, step):
    """One MD step's pairs and distances: a Verlet list reused vs rebuilt (10^4 atoms).

    Every step sees new positions (small random moves), as in MD, so nothing is cached.
    """
    benchmark.group = "Verlet list, 10^4 atoms, cutoff 5 A + skin 0.5 A"
    pos, cell = uniform_box(10_000)
    gen = torch.Generator().manual_seed(0)
    steps = [pos + 0.02 * torch.randn(pos.shape, generator=gen, dtype=pos.dtype)
             for _ in range(8)]
    verlet = fastff.VerletList(CUTOFF, 0.5)
    verlet.update(pos, cell)
    counter = iter(range(10**9))

    def run():
        moved = steps[next(counter) % len(steps)]
        if step == "fastff rebuild":
            verlet._nl = None  # force a build, as a changed cell or a large move would
        nl = verlet.update(moved, cell)
        return nl.distances(moved)

    benchmark.pedantic(run, rounds=15, warmup_rounds=2)
    benchmark.extra_info["rebuilds"] = verlet.rebuilds


@pytest.fixture(scope="module")
def water_30k():
    """30,000 atoms of relaxed TIP3P water (nm, float32) and 8 MD-like steps from them."""
    box = fastff.systems.water_box(10_000)
    gen = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(8):  # every atom moves < 0.02 nm: within skin / 2 of the build
        move = torch.randn(box.positions.shape, generator=gen)
        move *= 0.02 * torch.rand(move.shape[0], 1, generator=gen) / move.norm(dim=1, keepdim=True)
        steps.append(box.positions + move)
    return box, steps


@pytest.mark.parametrize("mirrors", [False, True], ids=["pairs", "pairs + reverse"])
@pytest.mark.parametrize("step", ["fresh list at 0.5 nm", "compaction 0.6 -> 0.5 nm"])
def test_verlet_compaction(benchmark, water_30k, step, mirrors):
    """Pairs within the model cutoff at new positions: a fresh neighbor_list, or
    ``VerletList(0.5, 0.1, compact=True)``'s step, compacting the reused 0.6 nm list; with or
    without the mirror index (``reverse``) that message passing reads."""
    benchmark.group = (f"pairs within 0.5 nm{' + reverse' if mirrors else ''}, water 30,000 "
                       "atoms, skin 0.1 nm, float32")
    box, steps = water_30k
    skin_list = fastff.neighbor_list(box.positions, 0.6, box.cell)
    _ = skin_list.reverse  # once per rebuild
    counter = iter(range(10**9))

    def run():
        moved = steps[next(counter) % len(steps)]
        if step == "fresh list at 0.5 nm":
            nl = fastff.neighbor_list(moved, 0.5, box.cell)
        else:
            nl = skin_list.within(moved, 0.5)
        return nl, nl.reverse if mirrors else None

    nl, _ = benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    benchmark.extra_info["pairs"] = len(nl)
    benchmark.extra_info["skin_pairs"] = len(skin_list)


def test_peak_memory(benchmark):
    """Peak extra memory of a 10^5-atom build over the size of what it returns (fresh process)."""
    benchmark.group = "peak memory, 10^5 atoms"
    script = Path(__file__).parent / "peak_memory.py"
    result = {}

    def run():
        out = subprocess.run([sys.executable, str(script), "neighbors", "100000"],
                             capture_output=True, text=True, check=True)
        result.update(json.loads(out.stdout))

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(result)
    print(f"\npeak memory / returned arrays: {result['ratio']:.2f}")
