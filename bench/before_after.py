"""Median seconds per step, in the checkout this runs from: SchNet energy + forces (3,000 atoms),
a SchNet force-matching training step (999 atoms), PaiNN energy + forces (999 atoms) and the MM
ForceField energy + forces (3,000 atoms), on a Verlet list along small random kicks.

Compares two versions: run it alternately in two checkouts (each with its own editable install),
e.g. ``for i in 1 2 3; do (cd OLD && python bench/before_after.py 7); (cd NEW && python
bench/before_after.py 7); done``, and compare medians over rounds. Prints one JSON line."""
import json, sys, time
import torch
import fastff
from fastff import models, systems
from fastff.mm.water import water_force_field

torch.manual_seed(0)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 6
out = {"tree": fastff.__file__}

def median_time(step, n):
    step(); step()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]

def kicks(pos):
    state = {"x": pos.clone()}
    def nxt():
        state["x"] = state["x"] + 0.002 * torch.randn_like(state["x"])
        return state["x"]
    return nxt

box = systems.water_box(1000)
pos = box.positions.clone(); cell = box.cell
model = models.SchNet(skin=0.1)
nxt = kicks(pos)
out["schnet_ef_3000"] = median_time(
    lambda: models.energy_and_forces(model, box.species, nxt(), cell), steps)

small = systems.water_box(333)
m2 = models.SchNet(skin=0.1)
opt = torch.optim.Adam(m2.parameters(), 1e-4)
nxt2 = kicks(small.positions)
def train():
    e, f = models.energy_and_forces(m2, small.species, nxt2(), small.cell, training=True)
    loss = (e ** 2).sum() + (f ** 2).sum()
    opt.zero_grad(); loss.backward(); opt.step()
out["schnet_train_999"] = median_time(train, steps)

pm = models.PaiNN(skin=0.1)
nxt3 = kicks(small.positions)
out["painn_ef_999"] = median_time(
    lambda: models.energy_and_forces(pm, small.species, nxt3(), small.cell), steps)

ff = water_force_field(box)
nxt4 = kicks(pos.double() if ff.box.dtype == torch.float64 else pos)
def mm():
    x = nxt4().requires_grad_(True)
    e = ff(x)
    torch.autograd.grad(e.sum(), x)
out["mm_ef_3000"] = median_time(mm, 3 * steps)
print(json.dumps(out))
