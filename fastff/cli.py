"""The ``fastff`` command: ``fastff bench`` (MLFF cost against MM cost), ``fastff profile`` and
``fastff train`` (:mod:`fastff.train`).

Bad options end with one line on stderr (``fastff: error: ...``) and exit status 2; every check
that can fail (options, backends, output paths, optional packages) runs before any measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fastff._cliargs import CompileNotice, ProgressBar, positive_float, positive_int

BACKEND_CHOICES = ("auto", "numba", "triton", "reference")
DTYPES = ("float32", "float64")


class UsageError(Exception):
    """A bad option: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(message)


def _atoms(text: str) -> int:
    value = positive_int(text)
    if value < 3:
        raise argparse.ArgumentTypeError(f"the water box needs at least 3 atoms, got {value}")
    return value


def _sizes(text: str) -> list[int]:
    if text == "default":
        from fastff.benchmark import SWEEP_ATOMS

        return list(SWEEP_ATOMS)
    try:
        return [_atoms(t) for t in text.split(",") if t.strip()] or [_atoms("")]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"sizes must be comma-separated atom counts: {e}"
                                         ) from None


MODEL_NAMES = ("schnet", "painn", "mace", "all")


def _model_option(text: str) -> str:
    if text in MODEL_NAMES or os.path.isfile(text):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(MODEL_NAMES)} or a model file,"
                                     f" got {text!r} (no such file)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastff", description="fused kernels for machine-learning force fields")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("bench", help="MLFF cost against MM cost on the built-in water box",
                       description="Time energy + forces per atom-step along velocity Verlet "
                       "dynamics (1 fs, 300 K) of a TIP3P water box: the neighbor list, MM "
                       "(fastff against OpenMM), SchNet (fastff against torch_geometric's "
                       "SchNet, same weights and pairs) and PaiNN (fastff against an eager "
                       "torch PaiNN after schnetpack's equations), plus fastff's reference "
                       "backend as the correctness oracle.")
    b.add_argument("--atoms", type=_atoms, default=None,
                   help="atoms in the water box (rounded to whole molecules; default 3000)")
    b.add_argument("--structure", metavar="FILE",
                   help="measure on this system instead of the water box: any file ASE reads "
                   "(Angstrom); MM rows where OpenMM's amber14/TIP3P parametrise it (PDB)")
    b.add_argument("--model", type=_model_option, default="all",
                   metavar="{schnet,painn,mace,all,FILE}",
                   help="fastff's SchNet and/or PaiNN (all: both), a mace-torch MACE (64x0e, "
                   "max_ell 3, correlation 3; unmodified and fastff.interop.mace.accelerate; "
                   "not in all: the unmodified model takes ~10 s per step at 3000 atoms), or a "
                   "torch-saved model: a fastff model (in its length_unit) or a torch_geometric "
                   "SchNet (Angstrom), timed as given and accelerated (default all)")
    b.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="fastff kernel path (default: by device)")
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where fastff and the models run (default: cuda if present)")
    b.add_argument("--dtype", choices=DTYPES, default="float32")
    b.add_argument("--threads", type=positive_int, default=None,
                   help="threads for torch, numba and OpenMM (default: torch's)")
    b.add_argument("--repeat", type=positive_int, default=5,
                   help="timed samples per component after one warm-up sample (default 5)")
    b.add_argument("--steps", type=positive_int, default=10,
                   help="MD steps per sample (default 10)")
    b.add_argument("--budget", type=positive_float, default=20.0, metavar="SECONDS",
                   help="time per component; slower ones get fewer, shorter samples (default 20)")
    b.add_argument("--no-reference", action="store_true",
                   help="skip the models on fastff's torch reference backend (the "
                   "correctness oracle; the eager peers still run)")
    b.add_argument("--no-openmm", action="store_true", help="skip the OpenMM row")
    b.add_argument("--json", metavar="FILE", help="write all figures, machine and settings")
    b.add_argument("--sweep", nargs="?", const="default", metavar="N,N,...", type=_sizes,
                   help="several sizes instead of --atoms (default 300,1000,3000,10000,30000,"
                   "100000)")
    b.add_argument("--plot", metavar="FILE.png", help="time per atom-step against atoms")
    _malloc_option(b)

    sub.add_parser("train", help="force-matching training on MM-labelled water (fastff.train; "
                   "fastff train --help)", add_help=False)

    f = sub.add_parser("profile", help="profile energy + forces of a model on the water box",
                       description="Profile energy + forces with torch.profiler; prints the top "
                       "ops (fastff ops under their own names) and writes a Chrome trace.")
    f.add_argument("--model", choices=("schnet", "painn", "mm"), default="schnet")
    f.add_argument("--atoms", type=_atoms, default=3000)
    f.add_argument("--tabulate", action="store_true", help="SchNet with tabulated filters")
    f.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    f.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    f.add_argument("--dtype", choices=DTYPES, default="float32")
    f.add_argument("--threads", type=positive_int, default=None)
    f.add_argument("--steps", type=positive_int, default=3, help="profiled steps (default 3)")
    f.add_argument("--top", type=positive_int, default=15, help="rows of the table")
    f.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace here")
    _malloc_option(f)
    return p


def _malloc_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tune-malloc", action="store_true",
                   help="first call fastff.tune_malloc (glibc keeps freed blocks), for every "
                   "component it runs; by default malloc keeps the defaults a user gets")


def _tune_malloc(args) -> None:
    if args.tune_malloc:
        from fastff.allocator import tune_malloc

        tune_malloc()


def _check_writable(path: str, option: str) -> None:
    """Fail before measuring: create (then remove) or append-open the file."""
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write ({e.strerror})") from None
    if not existed:
        os.remove(path)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    return name


def _check_backend(name: str, device: str) -> str | None:
    """The backend to pass to fastff (None for auto), or a UsageError if it cannot run here."""
    if name == "auto":
        return None
    import torch

    from fastff.kernels._runtime import registry

    try:
        registry.requested_backend(name, torch.device(device))
    except ValueError as e:
        raise UsageError(f"--backend {name} cannot run on {device} here: {e}") from None
    missing = registry._availability(name)
    if missing is not None:
        raise UsageError(f"--backend {name} is not available: {missing}")
    return name


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its own options: fastff.train owns them
        from fastff import train

        return train.main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # recorded with the results
        if args.command == "bench":
            return _bench(args)
        return _profile(args)
    except UsageError as e:
        print(f"fastff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastff: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------- bench

def _bench(args) -> int:
    if args.json:
        _check_writable(args.json, "--json")
    if args.plot:
        _check_writable(args.plot, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    device = _device(args.device)
    backend = _check_backend(args.backend, device)
    model_file = None if args.model in MODEL_NAMES else args.model
    _check_system_options(args, model_file)
    if args.model == "mace":
        from fastff._bench_mace import mace_import_error

        if (why := mace_import_error()) is not None:
            raise UsageError(f"--model mace: {why}")
    _tune_malloc(args)

    from fastff import benchmark

    openmm = not args.no_openmm
    if openmm:
        try:
            import openmm as _  # noqa: F401
        except ImportError:
            openmm = False  # the row then says why
    models = () if model_file else benchmark.MODELS if args.model == "all" else (args.model,)
    settings = benchmark.Settings(
        atoms=args.atoms or 3000, models=models,
        backend=backend, device=device, dtype=_dtype(args.dtype), threads=args.threads,
        repeat=args.repeat, steps=args.steps, budget=args.budget, openmm=openmm,
        reference=not args.no_reference, structure=args.structure, model_file=model_file)
    sizes = args.sweep or [settings.atoms]
    bar = ProgressBar(len(sizes) * benchmark.samples_per_size(settings), "fastff bench",
                      enabled=bool(args.sweep) or sys.stderr.isatty())
    results: list[dict] = []
    with CompileNotice(bar) as compiling:
        for atoms in sizes:
            settings.atoms = atoms
            bar.label = f"fastff bench, {atoms} atoms"
            t0 = time.perf_counter()
            rows = benchmark.run(settings, on_sample=bar.update,
                                 previous=results[-1]["rows"] if results else None)
            results.append({"atoms": rows[0].atoms, "seconds": time.perf_counter() - t0,
                            "rows": rows, "headline": benchmark.headline(rows),
                            "system": args.structure and benchmark.bench_system(settings).label,
                            "trajectory": rows.trajectory})
    bar.close()
    if compiling.compiled:  # outside the timed samples: warm-up
        print(f"fastff: compiled {compiling.compiled} numba kernels in {compiling.seconds:.0f} s "
              "(first run on this machine; later runs load them from numba's cache)",
              file=sys.stderr)
    for res in results:
        print(_table(res, settings))
    if args.json:
        doc = benchmark.environment(settings)
        doc["command"] = "fastff " + " ".join(getattr(args, "argv", ["bench"]))
        doc["settings"].pop("atoms")
        doc["results"] = [{"atoms": r["atoms"], "seconds": r["seconds"],
                           "rows": [row.as_dict() for row in r["rows"]],
                           "headline": r["headline"], "system": r["system"],
                           "trajectory": r["trajectory"]} for r in results]
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _check_system_options(args, model_file: str | None) -> None:
    """--structure and --model FILE: readable and usable, before any measurement."""
    if args.structure is not None:
        if args.sweep or args.atoms is not None:
            raise UsageError("--structure measures the system in the file; drop --atoms/--sweep")
        if not os.path.isfile(args.structure):
            raise UsageError(f"--structure {args.structure}: no such file")
    from fastff import benchmark

    for option, path, load in (("--structure", args.structure, benchmark.load_structure),
                               ("--model", model_file, benchmark.load_model)):
        if path is None:
            continue
        try:
            load(path)
        except ImportError as err:
            raise UsageError(f"{option} {path}: {err} (install it to read this file)") from None
        except ValueError as err:
            raise UsageError(f"{option} {path}: {err}") from None


TARGETS = {"SchNet (fastff) / MM (fastff)": "<= 10x",
           "SchNet (fastff, tabulated) / MM (fastff)": "<= 10x",
           "SchNet fastff vs torch_geometric": ">= 5x",
           "SchNet fastff tabulated vs torch_geometric": ">= 20x",
           "PaiNN fastff vs eager torch (schnetpack's equations)": ">= 10x",
           "PaiNN fastff tabulated vs eager torch (schnetpack's equations)": ">= 10x",
           "MM fastff vs OpenMM CPU": ">= 0.67x",
           "MM fastff vs OpenMM CUDA": ">= 0.67x",
           "torch_geometric SchNet accelerated (fastff) vs torch_geometric": ">= 5x",
           "torch_geometric SchNet accelerated (fastff, tabulated) vs torch_geometric": ">= 20x",
           "MACE fastff vs mace-torch": ">= 10x",
           "MACE (fastff) / MM (fastff)": "<= 100x"}


def _table(res: dict, settings) -> str:
    import torch

    from fastff.allocator import malloc_tuned

    rows = res["rows"]
    threads = settings.threads or torch.get_num_threads()
    dtype = str(settings.dtype).replace("torch.", "")
    system = res.get("system") or f"{res['atoms'] // 3} TIP3P waters"
    traj = res.get("trajectory") or {}
    if traj.get("integrator") == "velocity Verlet":
        motion = (f"velocity Verlet, {traj['timestep_fs']:g} fs, {traj['temperature_K']:g} K "
                  f"(seed {traj['velocity_seed']}), {traj.get('force_field', 'MM forces')}; "
                  f"total energy drift {traj['total_energy_drift_kj_mol']:.3g} kJ/mol over "
                  f"{traj['frames'] - 1} steps")
    else:
        motion = traj.get("integrator", "")
    rebuilds = ", ".join(f"{k} {v:.3g}" for k, v in traj.get("rebuilds_per_step", {}).items())
    lines = [f"fastff bench: {res['atoms']} atoms ({system}), {dtype} "
             f"on {settings.device}, {threads} threads, backend {settings.backend or 'auto'}, "
             f"malloc {'tuned' if malloc_tuned() else 'default'}",
             f"frames: {motion}",
             f"Verlet-list rebuilds per step: {rebuilds}",
             "energy + forces per atom-step: mean over every timed step (rebuilds included); "
             "median (IQR) over samples",
             "",
             f"{'component':<44} {'backend':<15} {'filters':<24} {'mean us/atom-step':>17} "
             f"{'median (IQR)':>18} {'ms/step':>9} {'samples x steps':>15}"]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.component:<44} {r.backend:<15} skipped: {r.skipped}")
            continue
        us, med, iqr = r.mean * 1e6, r.median * 1e6, r.iqr * 1e6
        lines.append(f"{r.component:<44} {r.backend:<15} {r.filters or '':<24} {us:>17.3g} "
                     f"{med:>9.3g} ({iqr:>6.2g}) {r.mean * r.atoms * 1e3:>9.3g} "
                     f"{f'{r.samples} x {r.steps}':>15}")
    errors = [r for r in rows if r.force_error]
    if errors:
        lines += ["", "tabulated (cubic spline) against exact, forces on the same frames"]
        for r in errors:
            fe = r.force_error
            lines.append(f"  {r.component:<44} max abs {fe['max_abs']:.3g}, RMS {fe['rms']:.3g} "
                         f"{fe['unit']} (largest force {fe['max_abs_force']:.3g}; against "
                         f"{fe['against']}, frames {fe['frames']})")
    checks = [r for r in rows if r.agreement]
    if checks:
        lines += ["", "peers compute the same energy (first frame, setup check)"]
        for r in checks:
            a = r.agreement
            lines.append(f"  {r.component:<44} vs {a['against']}: relative difference "
                         f"{a['relative_difference']:.2g} ({'ok' if a['ok'] else 'FAILED'}, "
                         f"tolerance {a['tolerance']:g})")
    lines += ["", "headline (ratios of means; 'X vs P': P's time / X's time, the speed-up over "
              "the peer P; 'X / MM (fastff)': cost relative to MM)"]
    for key, value in res["headline"].items():
        target = TARGETS.get(key)
        lines.append(f"  {key:<62} {value:>8.3g}x" + (f"   target {target}" if target else ""))
    oracles = [r.component for r in rows if r.oracle and not r.skipped]
    if oracles:
        lines.append(f"  ({', '.join(oracles)}: fastff's torch reference backend, shown for "
                     "correctness, no speed-up quoted against it)")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: str) -> None:
    """Time per atom-step against atoms, log-log, one line per component; MM marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for res in results:
        for r in res["rows"]:
            if not r.skipped:
                series.setdefault(r.component, []).append((r.atoms, r.mean * 1e6))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, pts in series.items():
        xs, ys = zip(*pts, strict=True)
        mm = name.startswith("MM")
        ax.plot(xs, ys, marker="o", label=name, linewidth=3 if mm else 1.5,
                linestyle="--" if name == "MM (OpenMM)" else "-",
                color="black" if name == "MM (fastff)" else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("atoms (TIP3P water box)")
    ax.set_ylabel("energy + forces, us per atom-step (mean over MD steps)")
    ax.set_title("fastff bench: MLFF cost against MM cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------- profile

def _profile(args) -> int:
    if args.trace:
        _check_writable(args.trace, "--trace")
    device = _device(args.device)
    backend = _check_backend(args.backend, device)
    _tune_malloc(args)
    import torch

    from fastff import benchmark, models, profiling, systems
    from fastff import mm as fmm

    if args.threads:
        benchmark.set_threads(args.threads)
    dtype = _dtype(args.dtype)
    box = systems.water_box(max(1, round(args.atoms / 3)), dtype=dtype)
    cell, species = box.cell.to(device), box.species.to(device)
    if args.model == "mm":
        # forces only, as in MD and in `fastff bench` (on CPU: the cluster-pair path)
        ff = fmm.water_force_field(box, backend=backend).to(device).requires_grad_(False)

        def energy(x):
            return ff(x, cell)
    else:
        torch.manual_seed(0)
        # frozen like the force field: forces only, as in MD and in `fastff bench`
        model = (models.SchNet(tabulate=args.tabulate) if args.model == "schnet"
                 else models.PaiNN()).to(device, dtype).requires_grad_(False)
        model.set_backend(backend)

        def energy(x):
            return model(species, x, cell).sum()
    frames = benchmark.trajectory(box.positions.to(device), args.steps + 1, seed=1)
    step = benchmark._energy_forces_step(energy)
    step(frames[0])  # warm-up: JIT compilation and first list build stay out of the profile
    with profiling.profile(trace=args.trace, device=device) as prof:
        for x in frames[1:]:
            step(x)
    print(f"fastff profile: {args.model}, {box.num_atoms} atoms, {args.dtype} on {device}, "
          f"{args.steps} steps of energy + forces, backend {backend or 'auto'}")
    print(prof.summary(top=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
