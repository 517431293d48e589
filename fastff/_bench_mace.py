"""mace-torch MACE, unmodified and after :func:`fastff.interop.mace.accelerate`, on the water box:
the models, systems and steps that ``bench/bench_mace.py`` and ``fastff bench --model mace``
time.

The model is a ScaleShiftMACE with random weights (elements H and O), cutoff 5 Angstrom, 8 Bessel
functions, radial MLP [64, 64, 64], max_ell 3, correlation 3, two residual interactions; the
hidden irreps are the benchmark's variable. Both sides get the same pairs from one compacting
:class:`fastff.VerletList` (cutoff 5 A, skin 1 A, fastff kernels), as an MD engine would reuse a
list; mace computes forces (and, in training, their graph) itself.
"""

from __future__ import annotations

import copy
import warnings

import torch

CUTOFF = 5.0  # Angstrom: ~50 neighbours per atom in liquid water
SKIN = 1.0  # Angstrom: the MM benchmarks' 0.1 nm
NUM_BESSEL = 8
ELEMENTS = (1, 8)
ORIGINAL = "MACE (mace-torch)"
ACCELERATED = "MACE (fastff)"  # fastff.interop.mace.accelerate of the same model


def mace_import_error() -> str | None:
    """None where mace-torch and e3nn import, else why not (one line)."""
    # e3nn 0.4's constants load through torch.load(weights_only=True) only with slice allowed
    torch.serialization.add_safe_globals([slice])
    try:
        import mace.modules  # noqa: F401
        from e3nn import o3  # noqa: F401
    except Exception as err:  # not installed, or an incompatible install
        return f"mace-torch not importable ({type(err).__name__}: {err})"
    return None


def cueq_status() -> str:
    """Whether mace's cuequivariance path (``enable_cueq``) can run here, in one line."""
    try:
        import cuequivariance  # noqa: F401
        import cuequivariance_torch  # noqa: F401
    except Exception as err:  # ImportError, or a broken CUDA-only install
        return f"cuequivariance not importable ({type(err).__name__}: {err})"
    from mace.calculators.mace import CUEQQ_AVAILABLE

    return "available" if CUEQQ_AVAILABLE else "cuequivariance imports, mace's converter does not"


def cueq_model(model):
    """mace's own e3nn -> cuequivariance conversion of a copy of ``model`` (enable_cueq)."""
    from mace.cli.convert_e3nn_cueq import run

    return run(copy.deepcopy(model), device="cpu", return_model=True)


def build(hidden: str = "64x0e", *, max_ell: int = 3, correlation: int = 3,
          num_interactions: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ScaleShiftMACE with random weights (every trainable parameter perturbed, so no path is
    zero); built in float64 (e3nn's constants) and cast to ``dtype``."""
    torch.serialization.add_safe_globals([slice])
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    with warnings.catch_warnings():  # e3nn's and mace's TorchScript notices at construction
        warnings.simplefilter("ignore")
        model = _construct(hidden, max_ell, correlation, num_interactions, default)
    return model.to(dtype)


def _construct(hidden, max_ell, correlation, num_interactions, default):
    import numpy as np
    from e3nn import o3
    from mace import modules

    try:
        residual = modules.RealAgnosticResidualInteractionBlock
        model = modules.ScaleShiftMACE(
            r_max=CUTOFF, num_bessel=NUM_BESSEL, num_polynomial_cutoff=5, max_ell=max_ell,
            interaction_cls=residual, interaction_cls_first=residual,
            num_interactions=num_interactions, num_elements=len(ELEMENTS),
            hidden_irreps=o3.Irreps(hidden), MLP_irreps=o3.Irreps("16x0e"),
            gate=torch.nn.functional.silu, atomic_energies=np.array([-13.6, -2041.8]),
            avg_num_neighbors=50.0, atomic_numbers=list(ELEMENTS), correlation=correlation,
            radial_type="bessel", radial_MLP=[64, 64, 64], atomic_inter_scale=1.0,
            atomic_inter_shift=0.0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    finally:
        torch.set_default_dtype(default)
    return model


def pair(hidden: str = "64x0e", **kw):
    """(unmodified model, accelerated deep copy with the same weights)."""
    from fastff.interop import mace as fm

    original = build(hidden, **kw)
    return original, fm.accelerate(copy.deepcopy(original))


def water(n_atoms: int, dtype: torch.dtype = torch.float32):
    """(atomic numbers, positions [A], cell [A]) of fastff's TIP3P box of ``n_atoms // 3``
    waters (the box is in nm: x10)."""
    from fastff import systems

    box = systems.water_box(max(1, n_atoms // 3), seed=0)
    return box.species, (box.positions * 10.0).to(dtype), (box.cell * 10.0).to(dtype)


def walk(positions: torch.Tensor, steps: int, seed: int = 1,
         step: float = 0.02) -> list[torch.Tensor]:
    """``steps`` positions along a seeded random walk of ``step`` A per coordinate per call."""
    from fastff.benchmark import trajectory

    return trajectory(positions, steps, seed, step)


class Stepper:
    """One model's energy + forces (or force-matching training step) at given positions, on a
    compacting Verlet list of its own (each side pays for its list alike)."""

    def __init__(self, model, species: torch.Tensor, cell: torch.Tensor, *,
                 training: bool = False, backend: str | None = None):
        from fastff import VerletList

        self.model, self.species, self.cell, self.training = model, species, cell, training
        self.verlet = VerletList(CUTOFF, SKIN, backend=backend, compact=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not training:
            model.requires_grad_(False)  # as in MD: forces only
        g = torch.Generator().manual_seed(2)
        self.target_f = 0.1 * torch.randn(len(species), 3, generator=g).to(cell.dtype)

    def outputs(self, x: torch.Tensor) -> dict:
        from fastff.interop import mace as fm

        nl = self.verlet.update(x.detach(), self.cell)
        return fm.evaluate(self.model, x.detach().clone(), self.species,
                           torch.stack([nl.i, nl.j]), nl.shifts, self.cell,
                           training=self.training)

    def __call__(self, x: torch.Tensor):
        out = self.outputs(x)
        if not self.training:
            return out["energy"].detach(), out["forces"].detach()
        loss = (out["energy"].sum() / len(x)).square() + (out["forces"] - self.target_f
                                                          ).square().mean()
        return torch.autograd.grad(loss, self.params)


def components(ctx) -> list:
    """``fastff bench --model mace`` rows (:class:`fastff.benchmark.Component`): the unmodified
    64x0e MACE, the peer, then the accelerated copy; energy + forces per step on the run's
    frames (nm, converted to Angstrom here), each on a compacting Verlet list of its own."""
    from fastff.benchmark import Component

    settings = ctx.settings
    backend = settings.backend or "auto"
    why = mace_import_error()
    if why is None and ctx.cell is None:
        why = "the MACE rows need the periodic water box"
    if why is not None:
        return [Component(ORIGINAL, "mace-torch", skip=why),
                Component(ACCELERATED, backend, skip=why)]
    original, fast = pair("64x0e", dtype=settings.dtype)
    if settings.backend is not None:
        from fastff.interop import mace as fm

        fm.set_backend(fast, settings.backend)
    dev = torch.device(settings.device)
    cell = ctx.cell.to(dev) * 10.0

    def stepper(model):
        def make():
            step = Stepper(model.to(dev), ctx.species.to(dev), cell, backend=settings.backend)
            return lambda x: step(x * 10.0)
        return make

    return [Component(ORIGINAL, "mace-torch", stepper(original)),
            Component(ACCELERATED, backend, stepper(fast), peer=ORIGINAL,
                      ratio="MACE fastff vs mace-torch")]
