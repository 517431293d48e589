"""Message-passing benchmarks: fastff's CFConv (fused MLP filter and tabulated) against
torch_geometric's SchNet interaction, and PaiNNMessage against the same block in eager torch.

Random uniform periodic system at 0.1 atoms/A^3, cutoff 5 A (~52 neighbours per atom), one
interaction with F = 128, K = 50, float32, 2 threads, N = 1,000 and 10,000. Both sides get the
same distances (computed from positions by the same torch code) and the same weights, so the
outputs agree; the timed work is energy (= sum of outputs) + forces, or a force-matching training
step (loss on forces, gradients of the interaction's parameters).

Speed:   pytest bench/bench_message.py --benchmark-group-by=param:n --benchmark-columns=median
Memory:  python bench/bench_message.py --memory   (each case in a fresh process; extra peak RSS
         of one step over the RSS before it, read from /proc/self/status after clear_refs)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fastff
import fastff.nn as fnn

F, K, CUTOFF, DENSITY = 128, 50, 5.0, 0.1
SIZES = [1000, 10000]
torch.set_num_threads(2)
warnings.filterwarnings("ignore", message="fastff:")


def build_system(n: int, seed: int = 0):
    """Positions [N, 3] float32, cell, and a full fastff NeighborList built with vesin."""
    import vesin

    box = (n / DENSITY) ** (1 / 3)
    rng = np.random.default_rng(seed)
    pos = rng.random((n, 3)) * box
    cell = np.eye(3) * box
    i, j, s = vesin.NeighborList(cutoff=CUTOFF, full_list=True, sorted=True).compute(
        pos, cell, True, "ijS")
    i = torch.from_numpy(i.astype(np.int64))
    j = torch.from_numpy(j.astype(np.int64))
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(i, minlength=n), 0)
    cells = torch.tensor(cell, dtype=torch.float32).unsqueeze(0)
    nl = fastff.NeighborList(i, j, torch.from_numpy(s.astype(np.int32)), ptr, cutoff=CUTOFF,
                             half=False, num_atoms=n, batch=None, cells=cells,
                             pbc=torch.ones(1, 3, dtype=torch.bool), cell=cells[0],
                             backend="numba")
    nl.reverse  # noqa: B018  (computed once, outside the timings)
    return torch.tensor(pos, dtype=torch.float32), cells[0], nl


class PygInteraction(nn.Module):
    def __init__(self):
        super().__init__()
        from torch_geometric.nn.models.schnet import GaussianSmearing, InteractionBlock

        self.block = InteractionBlock(F, K, F, CUTOFF)
        self.smearing = GaussianSmearing(0.0, CUTOFF, K)

    def forward(self, h, pos, nl, cell):
        d = nl.distances(pos, cell)
        return self.block(h, torch.stack([nl.j, nl.i]), d, self.smearing(d))


class FastInteraction(nn.Module):
    """torch_geometric's InteractionBlock with its CFConv replaced by fastff's (same weights)."""

    def __init__(self, peer: PygInteraction, tabulate: bool = False):
        super().__init__()
        blk = peer.block
        self.lin1, self.lin2, self.act, self.lin = blk.conv.lin1, blk.conv.lin2, blk.act, blk.lin
        self.conv = fnn.CFConv(F, K, CUTOFF, tabulate=tabulate)
        f = self.conv.filter
        with torch.no_grad():
            f.dense1.weight.copy_(blk.mlp[0].weight)
            f.dense1.bias.copy_(blk.mlp[0].bias)
            f.dense2.weight.copy_(blk.mlp[2].weight)
            f.dense2.bias.copy_(blk.mlp[2].bias)

    def forward(self, h, pos, nl, cell):
        x = self.conv(self.lin1(h), pos, nl, cell)
        return self.lin(self.act(self.lin2(x)))


class EagerPaiNN(nn.Module):
    """PaiNN's message block in eager torch (schnetpack's formulation), sharing weights."""

    def __init__(self, ref: fnn.PaiNNMessage):
        super().__init__()
        self.ref = ref

    def forward(self, s, v, pos, nl, cell):
        m = self.ref
        vec = nl.vectors(pos, cell)
        d = torch.linalg.vector_norm(vec, dim=1)
        k = torch.arange(1, m.num_basis + 1, dtype=d.dtype) * torch.pi / m.cutoff
        rbf = (2 / m.cutoff) ** 0.5 * torch.sin(d[:, None] * k) / d[:, None]
        fcut = 0.5 * (torch.cos(d * torch.pi / m.cutoff) + 1) * (d < m.cutoff)
        w = m.filter(rbf) * fcut[:, None]
        x = m.context(s)[nl.j] * w
        nf = m.num_features
        ds = torch.zeros_like(s).index_add(0, nl.i, x[:, :nf])
        dmu = x[:, nf:2 * nf, None].transpose(1, 2) * (vec / d[:, None])[:, :, None] \
            + x[:, None, 2 * nf:] * v[nl.j]
        return ds, torch.zeros_like(v).index_add(0, nl.i, dmu)


_CACHE: dict = {}


def setup(n):
    """Both sides share weights, trainable (requires_grad) as in a model being trained or
    validated: forces must not cost weight gradients (torch skips them; fastff's fused
    backwards ask the autograd engine which gradients it will use)."""
    if n not in _CACHE:
        torch.manual_seed(0)
        pos, cell, nl = build_system(n)
        peer = PygInteraction()
        _CACHE[n] = (pos, cell, nl, peer, FastInteraction(peer), FastInteraction(peer, True),
                     torch.randn(n, F))
    return _CACHE[n]


def energy_forces(model, h, pos, nl, cell):
    p = pos.clone().requires_grad_(True)
    e = model(h, p, nl, cell).sum()
    (g,) = torch.autograd.grad(e, p)
    return e.detach(), -g


def train_step(model, h, pos, nl, cell, target):
    p = pos.clone().requires_grad_(True)
    e = model(h, p, nl, cell).sum()
    (g,) = torch.autograd.grad(e, p, create_graph=True)
    loss = (-g - target).pow(2).mean()
    params = [q for q in model.parameters() if q.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def painn_models():
    torch.manual_seed(0)
    ours = fnn.PaiNNMessage(F, 20, CUTOFF)
    return ours, EagerPaiNN(ours)


def painn_energy_forces(model, s, v, pos, nl, cell):
    p = pos.clone().requires_grad_(True)
    ds, dv = model(s, v, p, nl, cell)
    e = ds.sum() + dv.pow(2).sum()
    (g,) = torch.autograd.grad(e, p)
    return -g


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", ["torch_geometric", "fastff", "fastff_tabulated"])
def test_energy_forces(benchmark, n, impl):
    pos, cell, nl, peer, fast, tab, h = setup(n)
    model = {"torch_geometric": peer, "fastff": fast, "fastff_tabulated": tab}[impl]
    e_ref, f_ref = energy_forces(peer, h, pos, nl, cell)
    e, f = energy_forces(model, h, pos, nl, cell)  # warm-up: JIT compilation, table build
    tol = 1e-4 if impl == "fastff" else 1e-3
    assert torch.allclose(f, f_ref, rtol=tol, atol=tol * f_ref.abs().max())
    benchmark.group = f"energy+forces n={n}"
    benchmark.extra_info["pairs"] = len(nl)
    benchmark.pedantic(energy_forces, (model, h, pos, nl, cell), rounds=5 if n < 5000 else 3,
                       warmup_rounds=1)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", ["torch_geometric", "fastff"])
def test_training_step(benchmark, n, impl):
    pos, cell, nl, peer, fast, tab, h = setup(n)
    model = {"torch_geometric": peer, "fastff": fast}[impl]
    target = torch.randn(n, 3)
    train_step(model, h, pos, nl, cell, target)
    benchmark.group = f"training step n={n}"
    benchmark.pedantic(train_step, (model, h, pos, nl, cell, target), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("n", SIZES[:1])  # the eager peer needs ~30 s per step at 10,000 atoms
@pytest.mark.parametrize("impl", ["eager_torch", "fastff"])
def test_painn_energy_forces(benchmark, n, impl):
    pos, cell, nl, *_ = setup(n)
    ours, eager = painn_models()
    model = ours if impl == "fastff" else eager
    s, v = torch.randn(n, F), torch.randn(n, 3, F)
    painn_energy_forces(model, s, v, pos, nl, cell)
    benchmark.group = f"painn energy+forces n={n}"
    benchmark.pedantic(painn_energy_forces, (model, s, v, pos, nl, cell), rounds=3,
                       warmup_rounds=1)


# ------------------------------------------------------------------ peak memory, fresh processes
def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _one_case(case: str, n: int) -> dict:
    def work_for(m):
        pos, cell, nl, peer, fast, tab, h = setup(m)
        target = torch.randn(m, 3)
        return {
            "ef_torch_geometric": lambda: energy_forces(peer, h, pos, nl, cell),
            "ef_fastff": lambda: energy_forces(fast, h, pos, nl, cell),
            "ef_fastff_tabulated": lambda: energy_forces(tab, h, pos, nl, cell),
            "train_torch_geometric": lambda: train_step(peer, h, pos, nl, cell, target),
            "train_fastff": lambda: train_step(fast, h, pos, nl, cell, target),
        }[case]

    work_for(200)()  # JIT compilation (or cache load) stays out, on a small system
    work = work_for(n)
    if case == "ef_fastff_tabulated":
        setup(n)[5].conv.table()
    base = _rss_now()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    work()
    return {"case": case, "n": n, "extra_peak_MiB": round((_rss_peak() - base) / 2**20, 1)}


def measure_memory() -> list[dict]:
    rows = []
    for n in SIZES:
        for case in ("ef_torch_geometric", "ef_fastff", "ef_fastff_tabulated",
                     "train_torch_geometric", "train_fastff"):
            out = subprocess.run([sys.executable, __file__, "--one", case, str(n)],
                                 capture_output=True, text=True, check=True, env=os.environ)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(_one_case(sys.argv[2], int(sys.argv[3]))))
    elif sys.argv[1:2] == ["--memory"]:
        measure_memory()
