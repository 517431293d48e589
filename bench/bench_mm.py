"""MM benchmarks: fastff.mm against OpenMM's CPU platform (2 threads), measured in the same run.

Run:  python -m pytest bench/bench_mm.py --benchmark-group-by=group \
          --benchmark-columns=min,median,mean,rounds
      FASTFF_BENCH_TILES=3,2,2 ... for the ~100,000-atom system (default 2,2,1: 35,468 atoms).

System: the villin headpiece in TIP3P water shipped with OpenMM (test.pdb, 8,867 atoms, amber14
+ flexible TIP3P), tiled periodically; CutoffPeriodic (reaction field, eps 78.3), cutoff
0.9 nm, no switching, no dispersion correction; float32 everywhere (OpenMM's CPU platform is
single precision). Every case computes energy and forces; fastff uses half lists unless a
case says "full list" or "clusters" (the cluster-pair layout ForceField runs on CPU for MD).
Targets: nonbonded full step (list rebuild + forces) <= 1.5x OpenMM's NonbondedForce with its
own list rebuilt ("openmm full step"; "openmm" alone reuses OpenMM's padded list); the
Verlet-reuse step shown too; bonded <= 1.5x OpenMM's bonded forces; >= 10x faster than the
eager torch reference; parameter gradients add <= 30%. Peak memory: bench/peak_memory_mm.py.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import fastff  # noqa: E402
import fastff.mm as fmm  # noqa: E402
from fastff.kernels._runtime import registry  # noqa: E402
from fastff.mm import _terms  # noqa: E402
from fastff.mm._clusters import ClusterVerletList  # noqa: E402
from fastff.testing import neighbor_list_from_pairs  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
mm = pytest.importorskip("openmm")
app = pytest.importorskip("openmm.app")

CUTOFF = 0.9
SKIN = 0.1
TILES = tuple(int(x) for x in os.environ.get("FASTFF_BENCH_TILES", "2,2,1").split(","))
NONBONDED_GROUP, BONDED_GROUP = 1, 2


def solvated_protein(tiles=TILES):
    """(openmm System, positions [N,3] float64 nm, box [3,3] nm): test.pdb tiled `tiles`."""
    unit = mm.unit
    pdb = app.PDBFile(os.path.join(os.path.dirname(app.__file__), "data", "test.pdb"))
    xyz = pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    box = np.array([[v.x, v.y, v.z] for v in
                    [b.value_in_unit(unit.nanometer)
                     for b in pdb.topology.getPeriodicBoxVectors()]])
    mod = app.Modeller(pdb.topology, pdb.positions)
    for a in range(tiles[0]):
        for b in range(tiles[1]):
            for c in range(tiles[2]):
                if (a, b, c) != (0, 0, 0):
                    shift = np.array([a, b, c]) @ box
                    mod.add(pdb.topology, (xyz + shift) * unit.nanometer)
    big = box * np.array(tiles)[:, None]
    mod.topology.setPeriodicBoxVectors([mm.Vec3(*row) * unit.nanometer for row in big])
    ff = app.ForceField("amber14-all.xml", "amber14/tip3p.xml")
    system = ff.createSystem(mod.topology, nonbondedMethod=app.CutoffPeriodic,
                             nonbondedCutoff=CUTOFF * unit.nanometer, constraints=None,
                             rigidWater=False)
    for f in system.getForces():
        if isinstance(f, mm.NonbondedForce):
            f.setUseDispersionCorrection(False)
            f.setForceGroup(NONBONDED_GROUP)
        else:
            f.setForceGroup(BONDED_GROUP)
    pos = np.asarray(mod.getPositions().value_in_unit(unit.nanometer))
    return system, pos, big


@pytest.fixture(scope="module")
def case():
    system, pos, box = solvated_protein()
    ctx = mm.Context(system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("CPU"),
                     {"Threads": "2"})
    ctx.setPositions(pos)
    model = fmm.ForceField.from_openmm(system, dtype=torch.float32, skin=SKIN)
    positions = torch.tensor(pos, dtype=torch.float32)
    cell = torch.tensor(box, dtype=torch.float32)
    return dict(system=system, ctx=ctx, model=model, pos=positions, cell=cell, n=len(pos))


def _has_numba_neighbor_list():
    name, _ = registry.resolve("neighbor_list", torch.device("cpu"))
    return name == "numba"


def _neighbor_list(pos, cell, cutoff, half=True):
    """fastff's list when its numba kernel is present; else vesin's pairs (labelled)."""
    if _has_numba_neighbor_list():
        return fastff.neighbor_list(pos, cutoff, cell, half=half)
    import vesin

    i, j, s = vesin.NeighborList(cutoff=cutoff, full_list=not half).compute(
        pos.double().numpy(), cell.double().numpy(), True, "ijS")
    nl = neighbor_list_from_pairs(i, j, s, num_atoms=pos.shape[0], cutoff=cutoff, cell=cell)
    nl.half = half
    return nl


def _nonbonded(model, pos, nl, cell, backend=None, params=False):
    pos = pos.detach().requires_grad_(True)
    ex = fmm.Exceptions(model.exception_index, model.exception_charge_prod,
                        model.exception_sigma, model.exception_epsilon)
    with torch.set_grad_enabled(True):
        q, s, e = model.charges, model.sigma, model.epsilon
        if not params:
            q, s, e = q.detach(), s.detach(), e.detach()
            ex = fmm.Exceptions(ex.pairs, *(t.detach() for t in ex[1:]))
        energy = fmm.nonbonded(pos, nl, q, s, e, cell=cell, exceptions=ex, backend=backend,
                               **model.nonbonded_kwargs)
        wrt = [pos] + ([q, s, e, *ex[1:]] if params else [])
        grads = torch.autograd.grad(energy, wrt)
    return energy.detach(), grads


def _bonded_kinds(model, params):
    """(bonds, angles, torsions) of the model: its parameters when they need gradients, else
    copies detached once (frozen parameters are the same tensors step after step, as in MD)."""
    def own(*ts):
        return tuple(t if params or not t.is_floating_point() else t.detach() for t in ts)
    return (own(model.bond_index, model.bond_k, model.bond_r0),
            own(model.angle_index, model.angle_k, model.angle_theta0),
            own(model.torsion_index, model.torsion_k, model.torsion_periodicity,
                model.torsion_phase))


def _bonded(kinds, pos, params=False, fused=True):
    """Energy and gradients of the bonded terms: one fused op (what ForceField runs) or the
    three functional calls."""
    pos = pos.detach().requires_grad_(True)
    bonds, angles, torsions = kinds
    with torch.set_grad_enabled(True):
        if fused:
            energy = fmm.bonded(pos, bonds=bonds, angles=angles, torsions=torsions)
        else:
            energy = (fmm.harmonic_bonds(pos, *bonds) + fmm.harmonic_angles(pos, *angles)
                      + fmm.periodic_torsions(pos, *torsions))
        wanted = [t for kind in kinds for t in kind if t.requires_grad] if params else []
        grads = torch.autograd.grad(energy, [pos] + wanted)
    return energy.detach(), grads


def _openmm(ctx, pos, group):
    def run():
        ctx.setPositions(pos)
        return ctx.getState(getEnergy=True, getForces=True, groups={group})
    return run


# OpenMM's CPU platform keeps a list padded by a fraction of the cutoff and rebuilds it when an
# atom has moved more than padding / sqrt(2) since the last build (CpuKernels.cpp,
# beginComputation). Alternating between the positions and a copy translated by 0.3 nm (more
# than any such padding at a 0.9 nm cutoff; the periodic energy does not change) makes every
# call a full step: list rebuild + nonbonded.
REBUILD_SHIFT = np.array([0.3, 0.0, 0.0])


def _openmm_full_step(ctx, pos, group):
    frames = [pos, pos + REBUILD_SHIFT]
    calls = [0]

    def run():
        calls[0] += 1
        ctx.setPositions(frames[calls[0] % 2])
        return ctx.getState(getEnergy=True, getForces=True, groups={group})
    return run


NB = f"nonbonded energy+forces, {{n}} atoms, rc {CUTOFF} nm RF, float32"


def _cluster_list(model, pos, cell, verlet=None):
    """The cluster-pair list of ForceField's CPU path (a fresh build unless ``verlet``)."""
    verlet = verlet or ClusterVerletList(CUTOFF, SKIN)
    excl_ptr, excl_j = _terms.exclusion_rows(model.exception_index, pos.shape[0])
    cl = verlet.update(pos, cell, excl_ptr, excl_j)
    assert cl is not None, "this box does not take the cluster layout"
    return cl


@pytest.mark.parametrize("code", ["openmm", "openmm full step", "fastff full step",
                                  "fastff verlet reuse", "fastff + param grads",
                                  "fastff kernel only", "fastff kernel only, full list",
                                  "fastff clusters full step",
                                  "fastff clusters verlet reuse", "fastff clusters kernel only"])
def test_nonbonded(benchmark, case, code):
    benchmark.group = NB.format(n=case["n"])
    model, pos, cell = case["model"], case["pos"], case["cell"]
    benchmark.extra_info["neighbor_list"] = ("fastff" if _has_numba_neighbor_list()
                                             else "vesin (fastff numba list unavailable)")
    if code == "openmm":
        fn = _openmm(case["ctx"], pos.double().numpy(), NONBONDED_GROUP)
    elif code == "openmm full step":
        fn = _openmm_full_step(case["ctx"], pos.double().numpy(), NONBONDED_GROUP)
    elif code == "fastff full step":
        def fn():
            nl = _neighbor_list(pos, cell, CUTOFF)
            return _nonbonded(model, pos, nl, cell)
    elif code.startswith("fastff clusters"):
        if not _has_numba_neighbor_list():
            pytest.skip("the cluster path is numba's")
        verlet = ClusterVerletList(CUTOFF, SKIN)
        cl = _cluster_list(model, pos, cell, verlet)
        if code == "fastff clusters full step":
            def fn():
                return _nonbonded(model, pos, _cluster_list(model, pos, cell), cell)
        elif code == "fastff clusters verlet reuse":
            def fn():
                return _nonbonded(model, pos, _cluster_list(model, pos, cell, verlet), cell)
        else:
            def fn():
                return _nonbonded(model, pos, cl, cell)
    elif code == "fastff verlet reuse":
        verlet = fastff.VerletList(CUTOFF, SKIN, half=True)
        if not _has_numba_neighbor_list():
            pytest.skip("needs fastff's numba neighbor list (VerletList would use the torch "
                        "reference)")
        verlet.update(pos, cell)

        def fn():
            return _nonbonded(model, pos, verlet.update(pos, cell), cell)
    else:
        nl = _neighbor_list(pos, cell, CUTOFF + SKIN, half=not code.endswith("full list"))
        params = code == "fastff + param grads"

        def fn():
            return _nonbonded(model, pos, nl, cell, params=params)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


def test_nonbonded_reference(benchmark, case):
    """The eager torch reference on the same list (one round: it is slow and memory-hungry)."""
    benchmark.group = NB.format(n=case["n"])
    if case["n"] > 50_000:
        pytest.skip("the eager reference needs ~4x the neighbor list in memory (1.6 GB extra at "
                    "35,468 atoms, bench/peak_memory_mm.py); not run at this size")
    nl = _neighbor_list(case["pos"], case["cell"], CUTOFF + SKIN)
    benchmark.pedantic(_nonbonded, args=(case["model"], case["pos"], nl, case["cell"],
                                         "reference"), rounds=1, warmup_rounds=0)


@pytest.mark.parametrize("code", ["openmm", "fastff", "fastff, three ops",
                                  "fastff + param grads", "reference"])
def test_bonded(benchmark, case, code):
    benchmark.group = f"bonded (bonds, angles, torsions) energy+forces, {case['n']} atoms, float32"
    model, pos = case["model"], case["pos"]
    if code == "openmm":
        fn = _openmm(case["ctx"], pos.double().numpy(), BONDED_GROUP)
    elif code == "reference":
        prev = os.environ.get("FASTFF_BACKEND")
        os.environ["FASTFF_BACKEND"] = "reference"
        try:
            benchmark.pedantic(_bonded, args=(_bonded_kinds(model, False), pos), rounds=3,
                               warmup_rounds=1)
        finally:
            if prev is None:
                del os.environ["FASTFF_BACKEND"]
            else:
                os.environ["FASTFF_BACKEND"] = prev
        return
    else:
        params = code == "fastff + param grads"
        kinds = _bonded_kinds(model, params)
        fused = code != "fastff, three ops"

        def fn():
            return _bonded(kinds, pos, params=params, fused=fused)
    benchmark.pedantic(fn, rounds=10, warmup_rounds=2)
