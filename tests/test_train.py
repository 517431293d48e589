"""fastff.train: data set checks, MM labels against OpenMM, DDP gradients against one process,
and the command line end to end (torchrun on 2 processes, checkpoint, resume, plot)."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fastff import train as T

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 150
# a tiny run: 8 molecules (edge 0.62 nm, so the MM cutoff must be <= 0.31 nm), 1 interaction
TINY = ["--molecules", "8", "--train-frames", "8", "--val-frames", "2", "--runs", "2",
        "--equilibration", "6", "--stride", "2", "--label-cutoff", "0.3", "--features", "8",
        "--interactions", "1", "--basis", "4", "--batch-size", "4", "--dtype", "float64",
        "--no-progress"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_frame(rng, n, dtype=torch.float64) -> T.Frame:
    def rand(*shape):
        return torch.from_numpy(rng.standard_normal(shape)).to(dtype)

    return T.Frame(torch.from_numpy(rng.integers(1, 9, n)), rand(n, 3),
                   torch.eye(3, dtype=dtype) * (1 + rng.random()), rand(), rand(n, 3))


@pytest.fixture(scope="module")
def water():
    """(train, validation) float64 frames of two short MD runs of 8 water molecules."""
    kwargs = {"equilibration": 6, "stride": 2, "label_cutoff": 0.3, "dtype": torch.float64}
    return (T.water_md_dataset(8, 6, seed=11, **kwargs),
            T.water_md_dataset(8, 2, seed=12, **kwargs))


# -------------------------------------------------------------------------------------------
# data set


@pytest.mark.parametrize("defect", ["forces_rows", "positions_cols", "cell", "energy",
                                    "dtype", "species_dtype", "nan"])
def test_dataset_names_the_bad_frame(rng, defect, tmp_path):
    frames = [random_frame(rng, int(rng.integers(2, 7))) for _ in range(6)]
    k = int(rng.integers(1, 6))
    f = frames[k]
    n = f.species.shape[0]
    bad = {"forces_rows": f._replace(forces=f.forces[:-1]),
           "positions_cols": f._replace(positions=f.positions[:, :2]),
           "cell": f._replace(cell=f.cell[:2]),
           "energy": f._replace(energy=torch.zeros(2, dtype=torch.float64)),
           "dtype": f._replace(positions=f.positions.float()),
           "species_dtype": f._replace(species=f.species.int()),
           "nan": f._replace(forces=f.forces.index_fill(0, torch.tensor([n - 1]),
                                                        float("nan")))}[defect]
    frames[k] = bad
    with pytest.raises(ValueError, match=f"frame {k}:"):
        T.Dataset(frames)
    # the same frame read from a file: the set and the index are named
    state = {name: [getattr(fr, name) for fr in frames] for name in T.Frame._fields}
    good = T.Dataset(frames[:k]).state()
    torch.save({"format": "fastff.train/1", "train": good, "validation": state, "meta": {}},
               tmp_path / "data.pt")
    with pytest.raises(ValueError, match=f"validation set: Dataset: frame {k}:"):
        T.load_datasets(str(tmp_path / "data.pt"))


def test_dataset_roundtrip_and_collate(rng, tmp_path):
    frames = [random_frame(rng, int(rng.integers(1, 9))) for _ in range(5)]
    data = T.Dataset(frames)
    T.save_datasets(str(tmp_path / "d.pt"), data, data.subset([3, 1]), {"k": 1})
    train, val, meta = T.load_datasets(str(tmp_path / "d.pt"))
    assert meta == {"k": 1} and len(train) == 5 and len(val) == 2
    for a, b in zip(val, [frames[3], frames[1]], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    batch = T.collate([train[i] for i in (4, 0, 2)])
    sizes = [frames[i].species.shape[0] for i in (4, 0, 2)]
    assert batch.num_atoms.tolist() == sizes
    assert batch.batch.tolist() == sum(([b] * s for b, s in enumerate(sizes)), [])
    offset = 0
    for b, i in enumerate((4, 0, 2)):
        rows = slice(offset, offset + sizes[b])
        torch.testing.assert_close(batch.positions[rows], frames[i].positions, rtol=0, atol=0)
        torch.testing.assert_close(batch.forces[rows], frames[i].forces, rtol=0, atol=0)
        torch.testing.assert_close(batch.cell[b], frames[i].cell, rtol=0, atol=0)
        torch.testing.assert_close(batch.energy[b], frames[i].energy, rtol=0, atol=0)
        offset += sizes[b]


def test_water_labels_match_openmm(water):
    openmm = pytest.importorskip("openmm")
    from fastff.systems import water_box

    train, _ = water
    system = water_box(8, seed=11, relax_steps=0, dtype=torch.float64).to_openmm(cutoff=0.3)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    for frame in train:
        context.setPositions(frame.positions.numpy())
        state = context.getState(getEnergy=True, getForces=True)
        energy = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
        forces = np.asarray(state.getForces(asNumpy=True).value_in_unit(
            openmm.unit.kilojoule_per_mole / openmm.unit.nanometer))
        assert math.isclose(float(frame.energy), energy, rel_tol=1e-9, abs_tol=1e-9)
        np.testing.assert_allclose(frame.forces.numpy(), forces, rtol=1e-9,
                                   atol=1e-9 * np.abs(forces).max())
    # a thermal run, not a frozen box: frames differ and stay near the liquid's energy
    energies = torch.stack([f.energy for f in train]) / train[0].species.shape[0]
    assert float(energies.std()) > 0 and bool((energies < 0).all())


def test_loss_matches_per_frame_definition(rng):
    frames = [random_frame(rng, int(rng.integers(1, 6))) for _ in range(4)]
    batch = T.collate(frames)
    energy = torch.from_numpy(rng.standard_normal(4))
    forces = torch.from_numpy(rng.standard_normal((batch.positions.shape[0], 3)))
    w_e, w_f = float(rng.random()), float(rng.random())
    terms = T.force_matching_loss(energy, forces, batch, w_e, w_f)
    expected, offset = 0.0, 0
    for b, f in enumerate(frames):
        n = f.species.shape[0]
        de = (float(energy[b]) - float(f.energy)) / n
        df = (forces[offset:offset + n] - f.forces).square().mean()
        expected += (w_e * de**2 + w_f * float(df)) / len(frames)
        offset += n
    assert math.isclose(float(terms.loss), expected, rel_tol=1e-12)


def test_calibrate_and_evaluate_against_direct_errors(water, rng):
    train, val = water
    config = T.TrainConfig(features=8, interactions=1, basis=4, dtype="float64",
                           seed=int(rng.integers(1000)))
    model = T.build_model(config).calibrate(train)
    forces = torch.cat([f.forces for f in train])
    assert math.isclose(float(model.energy_scale), 0.1 * float(forces.square().mean().sqrt()),
                        rel_tol=1e-12)
    energy = model.predict(T.collate(list(train)))[0].detach()
    n = train[0].species.shape[0]
    residual = (torch.stack([f.energy for f in train]) - energy) / n
    assert abs(float(residual.mean())) < 1e-9 * float(energy.abs().max() / n)

    w_e, w_f = float(rng.random()), float(rng.random()) * 1e-3
    metrics = T.evaluate(model, val, T.DistributedContext(), w_energy=w_e, w_forces=w_f,
                         batch_size=1)
    e, f = zip(*(model.predict(T.collate([frame])) for frame in val), strict=True)
    de = torch.cat(e).detach() - torch.stack([frame.energy for frame in val])
    df = torch.cat(f).detach() - torch.cat([frame.forces for frame in val])
    assert math.isclose(metrics["energy_mae"], float(de.abs().mean()) / n, rel_tol=1e-12)
    assert math.isclose(metrics["force_rmse"], float(df.square().mean().sqrt()), rel_tol=1e-12)
    expected = w_e * float((de / n).square().mean()) + w_f * float(df.square().mean())
    assert math.isclose(metrics["loss"], expected, rel_tol=1e-12)
    assert model.training  # calibrate and evaluate give the module back in its mode


def test_learning_rate_decays_per_epoch(rng):
    lr, decay = float(rng.uniform(1e-4, 1e-2)), float(rng.uniform(0.5, 1.0))
    config = T.TrainConfig(lr=lr, lr_decay=decay, epochs=int(rng.integers(1, 5)))
    for epoch in range(6):  # past config.epochs too: a resumed run extends the schedule
        assert math.isclose(T.learning_rate(config, epoch), lr * decay**epoch)


# -------------------------------------------------------------------------------------------
# data parallel: 2 gloo processes against one process


def one_process_gradients(config, data, weights, ctx, rank=0, world_size=1):
    """Gradients of two steps on the first two global batches of epoch 0: the first with
    ``weights``, the second force-only (w_energy = 0), parameters untouched in between."""
    from torch.nn.parallel import DistributedDataParallel

    model = T.build_model(config).calibrate(data).train()
    wrapped = DistributedDataParallel(model) if world_size > 1 else model
    loader = iter(T.make_train_loader(data, config.batch_size, rank=rank,
                                      world_size=world_size, seed=config.seed))
    grads = []
    for w_energy in (weights[0], 0.0):
        model.zero_grad(set_to_none=True)
        T.backward_step(wrapped, next(loader), w_energy, weights[1])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    # a third forward: DDP raises here if the last backward left a parameter unreduced
    batch = next(loader)
    wrapped(batch.species, batch.positions, batch.cell, batch.batch, batch.num_atoms)
    return grads


def ddp_worker(rank, world_size, port, data_path, out_dir, configs, weights):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # before numba is imported: no idle pool
    torch.set_num_threads(1)
    # a size-1 row's stride differs from DDP's bucket layout (see fastff.train._train)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    ctx = T.init_distributed("cpu")
    try:
        data, _, _ = T.load_datasets(data_path)
        result = {c.model: one_process_gradients(c, data, weights, ctx, rank, world_size)
                  for c in configs}
        torch.save(result, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        ctx.close()


def spawn(fn, nprocs, args):
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"{nprocs} processes did not finish within {TIMEOUT_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()


def test_ddp_gradients_equal_one_process_over_global_batch(water, rng, tmp_path):
    train, val = water
    T.save_datasets(str(tmp_path / "data.pt"), train, val)
    seed = int(rng.integers(1000))
    configs = [T.TrainConfig(model=m, features=8, interactions=2, basis=5, dtype="float64",
                             batch_size=2, seed=seed) for m in ("schnet", "painn")]
    weights = (float(rng.uniform(0.5, 2)), float(rng.uniform(1e-4, 1e-2)))
    spawn(ddp_worker, 2, (2, free_port(), str(tmp_path / "data.pt"), str(tmp_path), configs,
                          weights))
    ranks = [torch.load(tmp_path / f"grads{r}.pt", weights_only=True) for r in (0, 1)]
    ctx = T.DistributedContext()
    for config in configs:
        reference = one_process_gradients(config, train, weights, ctx)
        for step, ref in enumerate(reference):
            scale = max(float(g.abs().max()) for g in ref.values())
            assert scale > 0
            for name, g in ref.items():
                for r in (0, 1):
                    torch.testing.assert_close(
                        ranks[r][config.model][step][name], g, rtol=1e-6, atol=1e-9 * scale,
                        msg=lambda m, r=r, step=step, name=name, config=config:
                        f"{config.model} step {step} rank {r} {name}: {m}")


# -------------------------------------------------------------------------------------------
# command line


def torchrun(args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(ROOT / "examples" / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def test_cli_torchrun_checkpoint_resume_equals_straight_run(tmp_path, capsys):
    seed = str(int.from_bytes(os.urandom(2), "little"))
    split, straight = tmp_path / "split", tmp_path / "straight"
    # epoch 1 on 2 processes, epoch 2 resumed in this process
    torchrun(["--out", str(split), "--epochs", "1", "--seed", seed, *TINY], cwd=tmp_path)
    assert T.main(["--out", str(split), "--epochs", "2", "--resume", *TINY]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert T.main(["--out", str(straight), "--epochs", "2", "--seed", seed, *TINY]) == 0
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    for out in (split, straight):
        for name in ("checkpoint.pt", "best.pt", "data.pt", "history.json"):
            assert (out / name).stat().st_size > 0, name
        png = (out / "loss.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        history = json.loads((out / "history.json").read_text())
        assert [h["epoch"] for h in history] == [1, 2]
        for h in history:
            assert 0 < h["val_energy_mae"] < math.inf and 0 < h["val_force_rmse"] < math.inf
    assert resumed["epoch"] == direct["epoch"] == 2
    # 2 processes averaging gradients == 1 process on the global batch; resume == no break
    assert math.isclose(resumed["val_force_rmse"], direct["val_force_rmse"], rel_tol=1e-7)
    assert math.isclose(resumed["val_energy_mae"], direct["val_energy_mae"], rel_tol=1e-6)
    a = torch.load(split / "checkpoint.pt", weights_only=True)
    b = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["config"]["seed"] == int(seed)
    for name, value in b["model"].items():
        torch.testing.assert_close(a["model"][name], value, rtol=1e-7, atol=1e-10)
    model = T.load_model(str(straight / "best.pt"))
    assert not model.training and float(model.energy_scale) > 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert T.main(["--out", str(tmp_path), "--resume", *TINY]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert T.main(["--out", str(tmp_path), "--lr-decay", "1.5", *TINY]) == 2
    assert "lr_decay" in capsys.readouterr().err
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert T.main(["--out", str(tmp_path), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main(["--batch-size", "0"])
