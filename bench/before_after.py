"""Median seconds per step, in the checkout this runs from: SchNet energy + forces (3,000 atoms),
a SchNet force-matching training step (999 atoms), PaiNN energy + forces (999 atoms) and the MM
ForceField energy + forces (3,000 atoms), on Verlet lists along small random kicks.

Compares two versions: run it alternately in two checkouts (each with its own editable install),
e.g. ``for i in 1 2 3; do (cd OLD && python bench/before_after.py 7); (cd NEW && python
bench/before_after.py 7); done``, and compare medians over rounds. Prints one JSON line.
"""

import json
import sys
import time

import torch

import fastff
from fastff import models, systems
from fastff.mm.water import water_force_field


def median_time(step, n: int) -> float:
    step()
    step()  # warm-up: compilation and first list builds
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def kicks(positions):
    """Positions after one more random kick of 0.002 nm per coordinate, at each call."""
    state = {"x": positions.clone()}

    def step():
        state["x"] = state["x"] + 0.002 * torch.randn_like(state["x"])
        return state["x"]
    return step


def main(steps: int) -> dict:
    torch.manual_seed(0)
    out = {"tree": fastff.__file__}
    box, small = systems.water_box(1000), systems.water_box(333)

    schnet, at = models.SchNet(skin=0.1), kicks(box.positions)
    out["schnet_ef_3000"] = median_time(
        lambda: models.energy_and_forces(schnet, box.species, at(), box.cell), steps)

    trained, at_small = models.SchNet(skin=0.1), kicks(small.positions)
    opt = torch.optim.Adam(trained.parameters(), 1e-4)

    def train():
        e, f = models.energy_and_forces(trained, small.species, at_small(), small.cell,
                                        training=True)
        loss = (e ** 2).sum() + (f ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out["schnet_train_999"] = median_time(train, steps)

    painn, at_painn = models.PaiNN(skin=0.1), kicks(small.positions)
    out["painn_ef_999"] = median_time(
        lambda: models.energy_and_forces(painn, small.species, at_painn(), small.cell), steps)

    ff, at_mm = water_force_field(box), kicks(box.positions)

    def mm():
        x = at_mm().requires_grad_(True)
        torch.autograd.grad(ff(x).sum(), x)
    out["mm_ef_3000"] = median_time(mm, 3 * steps)
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)))
