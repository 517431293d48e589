"""Generated training data: frames of Langevin MD of flexible TIP3P water, labelled by the MM
force field (:func:`water_md_dataset`).

The box is :func:`fastff.systems.water_box` and the labels are the float64 energies and forces
of :func:`fastff.mm.water_force_field`, so the data needs no file and no outside code, and a
model trained on it can be checked against OpenMM (tests/test_train.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastff.training.data import Dataset, Frame
from fastff.training.dynamics import baoab_langevin


def water_md_dataset(n_molecules: int, n_frames: int, *, seed: int = 0,
                     temperature: float = 300.0, time_step: float = 0.0005,
                     friction: float = 10.0, equilibration: int = 200, stride: int = 10,
                     label_cutoff: float = 0.45,
                     dtype: torch.dtype = torch.float32) -> Dataset:
    """Frames of a Langevin MD run of flexible TIP3P water, labelled by the MM force field.

    The box is :func:`fastff.systems.water_box` (``n_molecules``, ``seed``); MD is BAOAB
    Langevin dynamics in float64 on :func:`fastff.mm.water_force_field` (reaction field within
    ``label_cutoff``), velocities drawn from Maxwell-Boltzmann at ``temperature``. After
    ``equilibration`` steps a frame is kept every ``stride`` steps, molecules wrapped into the
    box; its energy and forces are the float64 MM values, then cast to ``dtype``.

    Cost: one MM evaluation per step, about 20 ms for 32-64 molecules on 2 cores.

    Args:
        n_molecules: water molecules (3 atoms each).
        n_frames: frames to keep.
        seed: seed of the box and of the thermostat noise.
        temperature: K. time_step: ps. friction: 1/ps.
        equilibration: steps before the first frame. stride: steps between frames.
        label_cutoff: nm, at most half the box edge.
        dtype: float dtype of the frames.

    Returns:
        :class:`Dataset` of ``n_frames`` frames of ``3 * n_molecules`` atoms.
    """
    import fastff
    from fastff.mm import water_force_field
    from fastff.systems import water_box, wrap_molecules

    for name, value, low in (("n_molecules", n_molecules, 1), ("n_frames", n_frames, 1),
                             ("equilibration", equilibration, 0), ("stride", stride, 1),
                             ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"water_md_dataset: {name} must be an int >= {low}, got {value!r}")
    for label, number in (("temperature", temperature), ("time_step", time_step),
                          ("friction", friction), ("label_cutoff", label_cutoff)):
        if not isinstance(number, (int, float)) or not 0 < number < math.inf:
            raise ValueError(f"water_md_dataset: {label} must be a positive number, got "
                             f"{number!r}")
    box = water_box(n_molecules, seed=seed, dtype=torch.float64)
    edge = float(box.cell[0, 0])
    if label_cutoff > 0.5 * edge:
        raise ValueError(f"water_md_dataset: label_cutoff {label_cutoff} nm exceeds half the box "
                         f"edge ({0.5 * edge:.4g} nm for {n_molecules} molecules); lower it or "
                         f"use more molecules")
    ff = water_force_field(box, cutoff=label_cutoff, dtype=torch.float64)
    ff.requires_grad_(False)

    def energy_and_forces(x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.detach().requires_grad_(True)
        energy = ff(x)
        (grad,) = torch.autograd.grad(energy, x)
        return energy.detach(), -grad

    frames: list[Frame] = []
    steps = baoab_langevin(energy_and_forces, box.positions, box.masses,
                           temperature=temperature, time_step=time_step, friction=friction,
                           steps=equilibration + n_frames * stride,
                           generator=torch.Generator().manual_seed(seed))
    # the MM call is O(N) bookkeeping between numba kernels: one torch thread avoids OpenMP
    # barriers stalling on cores shared with numba's workers (see fastff.systems)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with fastff.no_checks():
            for step, x, energy, forces in steps:
                if step > equilibration and (step - equilibration) % stride == 0:
                    if not bool(torch.isfinite(forces).all()):
                        raise RuntimeError(f"water_md_dataset: non-finite forces at step "
                                           f"{step}; lower time_step")
                    frames.append(Frame(box.species, wrap_molecules(x, edge).to(dtype),
                                        box.cell.to(dtype), energy.to(dtype),
                                        forces.to(dtype)))
    finally:
        torch.set_num_threads(threads)
    return Dataset(frames)
