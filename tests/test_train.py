"""End-to-end tests of the real command, `[mpirun -n N] python -m dpnet.train`, run as
subprocesses from a temporary working directory on a tiny CIFAR-10 folder written by a
fixture (200 training images, 40 of them held out for validation, 40 test images; with
--batch-size 32 an epoch is 5 optimizer steps). The checks of option values call
parse_args and validate in-process instead.

Every job runs under a hard time bound: a job that outlives it is killed (its whole
process group) and the test fails; a job that leaves processes behind fails too.
"""

import dataclasses
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import dpnet
from dpnet.checkpoint import CheckpointError, load_checkpoint
from dpnet.flat import FlatParams
from dpnet.gradient_check import normwise_rel_error
from dpnet.parallel import SerialComm
from dpnet.train import ConfigError, TrainConfig, build_model, parse_args, validate
from tests.train_helpers import (STEPS_PER_EPOCH, TINY, TINY_SPLIT, assert_same_state, cifar_dir, clean_env,  # noqa: F401
                           finish, job_processes, kill_group, mpirun_path, read_checkpoint,
                           read_metrics, run_ok,
                           run_train, start, train_command, write_cifar_folder, write_pickle)

CKPT = os.path.join("dpnet_run", "checkpoint.h5")  # the documented default paths, relative to cwd
METRICS = os.path.join("dpnet_run", "metrics.jsonl")
EPOCH_KEYS = {"epoch", "step", "train_loss", "train_acc", "val_acc", "images_per_s", "comm_fraction", "seconds"}
BN_SYNC_THREELAYER = {"W1", "b1", "W2", "b2", "W3", "b3", "gamma1", "beta1", "gamma2", "beta2"}
ERROR_PREFIX = "python -m dpnet.train: error: "


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """cached(key, fn): fn(fresh directory) once per module, for runs several tests read."""
    store = {}

    def get(key, fn):
        if key not in store:
            store[key] = fn(tmp_path_factory.mktemp(re.sub(r"\W+", "_", key)))
        return store[key]
    return get


def base_args(data, *extra):
    return ["--data", data, *TINY, *extra]


def model_for(path):
    """A fresh model built from the options stored in a checkpoint (dpnet.train.build_model)."""
    import h5py
    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["config"])
    return build_model(TrainConfig(**config), SerialComm()), config


def assert_unique_lines(run):
    dupes = sorted({line for line in run.lines if run.lines.count(line) > 1 and line.strip("=")})
    assert not dupes, f"lines printed more than once (not only rank 0 prints?): {dupes}\n{run}"


# ================================================================ 1. the main command

RANKS = [None, 1, 2, 4]  # None: plain `python -m dpnet.train`, no launcher
RANK_IDS = ["serial", "mpirun-1", "mpirun-2", "mpirun-4"]


def main_run(cached, data, ranks):
    # without augmentation (on by default) so that every rank count trains the same model
    return cached(f"main-{ranks}", lambda d: run_ok(base_args(data, "--epochs", "2", "--no-augment"), d, ranks))


@pytest.mark.parametrize("ranks", RANKS, ids=RANK_IDS)
def test_main_command(cached, cifar_dir, ranks):
    run = main_run(cached, cifar_dir, ranks)
    world = ranks or 1
    # the documented outputs, at the default paths, and nothing else (no stray temporary files)
    assert sorted(os.listdir(run.path("dpnet_run"))) == ["checkpoint.h5", "metrics.jsonl"], str(run)

    records = read_metrics(run.path(METRICS))
    assert len(records) == 3, records  # two epochs and the final object
    epochs, final = records[:2], records[2]
    for number, record in enumerate(epochs, start=1):
        assert EPOCH_KEYS <= set(record), record
        assert record["epoch"] == number and record["step"] == number * STEPS_PER_EPOCH, record
        assert record["synthetic"] is False
        for key in ("train_acc", "val_acc"):
            assert 0.0 <= record[key] <= 1.0, record
        assert record["train_acc"] * 160 == pytest.approx(round(record["train_acc"] * 160))  # of 160 images
        assert record["val_acc"] * 40 == pytest.approx(round(record["val_acc"] * 40))  # of 40 images
        assert 0.0 <= record["comm_fraction"] <= 1.0, record
        if world == 1:
            assert record["comm_fraction"] < 0.5, record  # a world of one barely communicates
        assert record["seconds"] > 0 and record["images_per_s"] > 0, record
        assert record["images_per_s"] * record["seconds"] == pytest.approx(160, rel=1e-6)  # 160 images / epoch
        assert np.isfinite(record["train_loss"]) and 0 < record["train_loss"] < 5, record
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"], "the loss did not go down on learnable data"
    assert epochs[1]["train_acc"] > 0.2, "no better than chance (0.1) on class-coloured images"
    assert final.get("final") is True and final["step"] == 10 and final["synthetic"] is False, final
    assert 0.0 <= final["test_acc"] <= 1.0 and final["test_acc"] * 40 == pytest.approx(round(final["test_acc"] * 40))

    ckpt = read_checkpoint(run.path(CKPT))
    assert (ckpt["attrs"]["step"], ckpt["attrs"]["epoch"], ckpt["attrs"]["world_size"]) == (10, 2, world)

    # only rank 0 prints: the header, one line per epoch and the result, each exactly once
    assert_unique_lines(run)
    lines = run.lines
    # the layer choices, measured (the first run) or read from the tests' cache
    assert re.fullmatch(r"convolutions \(--conv-algorithm auto\): im2col(-whole)? for layer\(s\) 1; affine input "
                        r"gradients \(--affine-dx auto\): .* \((all|\d shape\(s\) measured now in [\d.]+ s, the rest) "
                        r"from .*\)", lines.pop(1)), str(run)
    if world > 1:  # under mpirun, how gradients are summed: shared memory, all ranks on this node
        assert lines.pop(1) == f"gradients: {(sum(p.nbytes for p in ckpt['params'].values()) + 8) / 2**20:.1f} MiB per step; 1 node x {world} ranks: shared memory"
    assert len(lines) == 4, str(run)
    assert lines[0].startswith(f"dpnet {dpnet.__version__}: threelayer (bn sync), {world} rank(s) x "), lines[0]
    assert lines[0].endswith(f"CIFAR-10 from {cifar_dir}: 160 train / 40 val / 40 test; "
                             "2 epochs of 5 steps, global batch 32; momentum lr 0.05, L2 0.0005"), lines[0]
    for number, record in enumerate(epochs, start=1):
        assert lines[number].startswith(f"epoch {number}/2: loss {record['train_loss']:.4f}, "
                                        f"train acc {record['train_acc']:.3f}, val acc {record['val_acc']:.3f}, ")
    assert lines[3] == f"test accuracy {final['test_acc']:.4f}; checkpoint {CKPT}"
    assert run.err_lines == [], str(run)


def test_main_command_agrees_across_rank_counts(cached, cifar_dir):
    """sync batchnorm: 1, 2 and 4 ranks train the same model, to float32 rounding."""
    runs = {ranks: main_run(cached, cifar_dir, ranks) for ranks in RANKS}
    reference = read_checkpoint(runs[None].path(CKPT))
    reference_metrics = read_metrics(runs[None].path(METRICS))
    for ranks, run in runs.items():
        ckpt = read_checkpoint(run.path(CKPT))
        for name, value in reference["params"].items():  # measured: up to 5e-5 after 10 Adam steps (before momentum became the default)
            assert normwise_rel_error(ckpt["params"][name], value) < 5e-4, (ranks, name)
        for got, want in zip(read_metrics(run.path(METRICS)), reference_metrics):
            if "train_loss" in want:
                assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5), ranks


@pytest.mark.parametrize("ranks", [2, 4])
def test_every_reduction_trains_the_same_model(cached, cifar_dir, tmp_path, ranks):
    """--reduction allreduce (every rank updates everything) and the default shared memory
    (one copy per node, each rank updating its slice) train the same model. At 2 ranks the
    sum has one order, so the checkpoints agree bit for bit; at 4 MPI may add in another
    order, so to float32 rounding."""
    default = read_checkpoint(main_run(cached, cifar_dir, ranks).path(CKPT))
    run = run_ok(base_args(cifar_dir, "--epochs", "2", "--no-augment", "--reduction", "allreduce"),
                 tmp_path, ranks)
    assert "; one Allreduce after backward" in run.stdout
    other = read_checkpoint(run.path(CKPT))
    if ranks == 2:
        assert_same_state(default, other, "shared memory vs allreduce")
    for name, value in default["params"].items():
        assert normwise_rel_error(other["params"][name], value) < 1e-5, name


# ================================================================ 2. --simulate-ranks == mpirun

@pytest.mark.parametrize("ranks, extra", [(2, ["--augment"]), (4, ["--no-augment"])], ids=["2-augment", "4"])
def test_simulate_ranks_matches_mpirun(cifar_dir, tmp_path, ranks, extra):
    args = base_args(cifar_dir, "--epochs", "2", "--dtype", "float64", *extra)
    (tmp_path / "mpi").mkdir()
    (tmp_path / "sim").mkdir()
    real = run_ok(args, tmp_path / "mpi", ranks)
    sim = run_ok(args + ["--simulate-ranks", str(ranks)], tmp_path / "sim")
    for run in (real, sim):  # both sum through shared memory, the default
        assert_unique_lines(run)
        assert f" {ranks} rank(s) x " in run.lines[0], str(run)
        assert run.lines[2].endswith(f"; 1 node x {ranks} ranks: shared memory"), str(run)  # after the choices
    a, b = read_checkpoint(real.path(CKPT)), read_checkpoint(sim.path(CKPT))
    assert a["attrs"]["world_size"] == b["attrs"]["world_size"] == ranks
    assert a["attrs"]["step"] == b["attrs"]["step"] == 10
    initial, _ = model_for(real.path(CKPT))
    for name, value in a["params"].items():
        assert value.dtype == np.float64
        assert normwise_rel_error(b["params"][name], value) <= 1e-12, name
        if ranks == 2:  # every sum of two terms has one order: the same bits
            assert np.array_equal(b["params"][name], value), name
        if not name.startswith("b"):  # biases feeding a batchnorm rightly stay at zero
            assert normwise_rel_error(initial.params[name], value) > 1e-3, f"{name} did not train"
    for group in ("optimizer", "batchnorm"):
        assert sorted(a[group]) == sorted(b[group])
        for name, value in a[group].items():
            assert normwise_rel_error(b[group][name], value) <= 1e-12, (group, name)
    assert a["optimizer_attrs"] == b["optimizer_attrs"]
    assert a["attrs"]["rng_states"] == b["attrs"]["rng_states"]  # the per-rank augmentation streams
    real_metrics, sim_metrics = read_metrics(real.path(METRICS)), read_metrics(sim.path(METRICS))
    assert len(real_metrics) == len(sim_metrics) == 3
    for x, y in zip(real_metrics, sim_metrics):
        assert x["step"] == y["step"]
        if "train_loss" in x:
            assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-12, abs=0)
            assert (x["train_acc"], x["val_acc"]) == (y["train_acc"], y["val_acc"])
    assert real_metrics[-1]["test_acc"] == sim_metrics[-1]["test_acc"]


# ================================================================ 3. resume

def straight_run(cached, data, augment):
    """2 ranks, --epochs 2 in one go."""
    extra = ["--augment"] if augment else ["--no-augment"]
    return cached(f"straight-{augment}", lambda d: run_ok(base_args(data, "--epochs", "2", *extra), d, 2))


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augment"])
@pytest.mark.parametrize("stop_at", [3, STEPS_PER_EPOCH], ids=["mid-epoch", "epoch-end"])
def test_resume_is_bit_identical(cached, cifar_dir, tmp_path, stop_at, augment):
    extra = ["--augment"] if augment else ["--no-augment"]
    args = base_args(cifar_dir, "--epochs", "2", *extra)
    first = run_ok(args + ["--max-steps", str(stop_at)], tmp_path, 2)
    partial = read_checkpoint(first.path(CKPT))
    assert partial["attrs"]["step"] == stop_at
    second = run_ok(args + ["--resume", CKPT], tmp_path, 2)
    assert_unique_lines(second)
    assert second.lines[0] == (f"resumed from {CKPT} at step {stop_at} (epoch {stop_at // STEPS_PER_EPOCH}), "
                               "written by 2 rank(s)"), str(second)
    resumed = read_checkpoint(second.path(CKPT))
    base = straight_run(cached, cifar_dir, augment)
    straight = read_checkpoint(base.path(CKPT))
    assert not np.array_equal(partial["params"]["W2"], straight["params"]["W2"])  # the test is not vacuous
    assert_same_state(resumed, straight, f"resume at step {stop_at}")
    assert resumed["attrs"]["rng_states"] == straight["attrs"]["rng_states"]
    # the metrics file goes on: the second run appended its epochs; same final accuracy
    records = read_metrics(first.path(METRICS))
    assert [r["step"] for r in records] == [stop_at, stop_at] + (
        [5, 10, 10] if stop_at < STEPS_PER_EPOCH else [10, 10])
    assert records[-1]["test_acc"] == read_metrics(base.path(METRICS))[-1]["test_acc"]


def test_epochs_is_the_total_when_resuming(cifar_dir, tmp_path):
    args = base_args(cifar_dir, "--epochs", "2", "--optimizer", "adam")  # adam counts its steps
    run_ok(args + ["--max-steps", str(STEPS_PER_EPOCH)], tmp_path, 2)
    one = read_checkpoint(tmp_path / CKPT)
    assert (one["attrs"]["step"], one["attrs"]["epoch"]) == (STEPS_PER_EPOCH, 1)
    second = run_ok(args + ["--resume", CKPT], tmp_path, 2)
    two = read_checkpoint(tmp_path / CKPT)
    assert (two["attrs"]["step"], two["attrs"]["epoch"]) == (2 * STEPS_PER_EPOCH, 2)
    assert two["optimizer_attrs"]["t"] == 2 * STEPS_PER_EPOCH  # adam took exactly 5 more steps
    assert [line.split(":")[0] for line in second.lines if line.startswith("epoch ")] == ["epoch 2/2"]
    records = read_metrics(tmp_path / METRICS)
    assert [(r.get("epoch"), r["step"]) for r in records] == [(1, 5), (None, 5), (2, 10), (None, 10)]
    # resuming the finished run with the same --epochs trains nothing more
    third = run_ok(args + ["--resume", CKPT], tmp_path, 2)
    done = read_checkpoint(tmp_path / CKPT)
    assert not [line for line in third.lines if line.startswith("epoch ")], str(third)
    assert done["attrs"]["step"] == 10 and done["optimizer_attrs"]["t"] == 10
    assert_same_state(done, two, "resuming a finished run")


def test_resume_at_a_different_number_of_ranks(cached, cifar_dir, tmp_path):
    args = base_args(cifar_dir, "--epochs", "2", "--no-augment")  # augmentation streams are per rank
    run_ok(args + ["--max-steps", "3"], tmp_path, 2)
    second = run_ok(args + ["--resume", CKPT], tmp_path, ranks=None)  # one rank
    assert second.lines[0] == f"resumed from {CKPT} at step 3 (epoch 0), written by 2 rank(s)", str(second)
    resumed = read_checkpoint(tmp_path / CKPT)
    assert (resumed["attrs"]["step"], resumed["attrs"]["world_size"]) == (10, 1)
    assert [r["step"] for r in read_metrics(tmp_path / METRICS)] == [3, 3, 5, 10, 10]
    # sync batchnorm: the same training as 2 ranks throughout, up to float32 rounding (measured 1e-7)
    straight = read_checkpoint(straight_run(cached, cifar_dir, False).path(CKPT))
    for name, value in straight["params"].items():
        assert normwise_rel_error(resumed["params"][name], value) < 1e-5, name


# ================================================================ 4. checkpoint contents

def test_checkpoint_contents_and_round_trip(cifar_dir, tmp_path):
    # augmentation is on by default: each rank's generator state is stored
    args = base_args(cifar_dir, "--epochs", "2", "--max-steps", "3", "--seed", "5", "--optimizer", "adam", "--lr", "0.002",
                     "--checkpoint", "out/ck.h5", "--metrics", "out/m.jsonl")
    run_ok(args, tmp_path, 2)
    path = str(tmp_path / "out" / "ck.h5")
    ckpt = read_checkpoint(path)
    assert ckpt["groups"] == ["batchnorm", "optimizer", "params"]
    params = ckpt["params"]
    assert set(params) == BN_SYNC_THREELAYER
    shapes = {"W1": (32, 3, 7, 7), "b1": (32,), "W2": (32 * 16 * 16, 16), "b2": (16,), "W3": (16, 10),
              "b3": (10,), "gamma1": (32,), "beta1": (32,), "gamma2": (16,), "beta2": (16,)}
    assert {k: v.shape for k, v in params.items()} == shapes
    assert all(v.dtype == np.float32 for v in params.values())
    total = sum(v.size for v in params.values())
    # adam's state: each moment array as one dataset per parameter (optimizer/m/W1, ...), shaped like
    # the parameter; its step count and hyper-parameters as attributes
    assert set(ckpt["optimizer"]) == {f"{key}/{name}" for key in ("m", "v") for name in params}
    assert all(ckpt["optimizer"][f"{key}/{name}"].shape == params[name].shape
               for key in ("m", "v") for name in params)
    moments = ckpt["optimizer"].values()
    assert sum(v.size for v in moments) == 2 * total and all(np.all(np.isfinite(v)) for v in moments)
    assert all(np.all(ckpt["optimizer"][f"v/{name}"] >= 0) for name in params)
    assert any(np.any(ckpt["optimizer"][f"m/{name}"] != 0) for name in params)
    assert ckpt["optimizer_attrs"]["t"] == 3
    assert {"learning_rate", "beta1", "beta2", "epsilon"} <= set(ckpt["optimizer_attrs"])
    assert set(ckpt["batchnorm"]) == {"bn0/running_mean", "bn0/running_var", "bn1/running_mean", "bn1/running_var"}
    assert ckpt["batchnorm"]["bn0/running_mean"].shape == (32,) and ckpt["batchnorm"]["bn1/running_var"].shape == (16,)
    attrs = ckpt["attrs"]
    assert set(attrs) == {"epoch", "step", "world_size", "dpnet_version", "config", "rng_states", "layer_choices"}
    assert (attrs["epoch"], attrs["step"], attrs["world_size"]) == (0, 3, 2)
    # measured on this machine (auto, the default): which ways won is its own business
    assert set(attrs["layer_choices"]["conv"]) <= {"1"} and set(attrs["layer_choices"]["dx"]) == {"W2", "W3"}
    assert set(attrs["layer_choices"]["conv"].values()) <= {"im2col", "im2col-whole"}
    assert set(attrs["layer_choices"]["dx"].values()) <= {"plain", "transposed"}
    assert attrs["dpnet_version"] == dpnet.__version__
    config = attrs["config"]
    assert set(config) == set(TrainConfig.__dataclass_fields__)
    assert {k: config[k] for k in ("data", "batch_size", "val_size", "hidden_dim", "max_steps", "epochs",
                                   "augment", "seed", "lr", "checkpoint", "metrics", "progress", "model")} == {
        "data": cifar_dir, "batch_size": 32, "val_size": 40, "hidden_dim": 16, "max_steps": 3, "epochs": 2,
        "augment": True, "seed": 5, "lr": 0.002, "checkpoint": "out/ck.h5", "metrics": "out/m.jsonl",
        "progress": False, "model": "threelayer"}
    states = attrs["rng_states"]
    assert len(states) == 2 and all(set(s) == {"augment"} for s in states)
    assert states[0] != states[1]  # each rank augments with its own stream

    # dpnet's loader restores the same numbers into a fresh model
    model, _ = model_for(path)
    assert not np.array_equal(model.params["W1"], params["W1"])
    flat = FlatParams(model.params)
    optim_config, loaded = load_checkpoint(path, model, flat)
    for name, value in params.items():
        assert np.array_equal(model.params[name], value), name
        assert model.params[name].dtype == value.dtype
    for i, bn in enumerate(model.bn_params):
        for key in ("running_mean", "running_var"):
            assert np.array_equal(bn[key], ckpt["batchnorm"][f"bn{i}/{key}"])
    for key in ("m", "v"):
        for name in params:
            assert np.array_equal(flat.view(optim_config[key], name), ckpt["optimizer"][f"{key}/{name}"])
    assert optim_config["t"] == 3 and optim_config["learning_rate"] == ckpt["optimizer_attrs"]["learning_rate"]
    assert (loaded["step"], loaded["epoch"], loaded["world_size"]) == (3, 0, 2)
    assert loaded["config"] == config and loaded["rng_states"] == states
    # and refuses a model it does not fit
    with pytest.raises(CheckpointError, match="W2"):
        other = build_model(TrainConfig(**{**config, "hidden_dim": 8}), SerialComm())
        load_checkpoint(path, other, FlatParams(other.params))


# ================================================================ 5. atomic checkpoints under SIGKILL

SAVER = textwrap.dedent("""
    import os, sys, types
    import numpy as np
    from dpnet.checkpoint import load_checkpoint, save_checkpoint
    from dpnet.flat import FlatParams

    path, size = sys.argv[1], int(sys.argv[2])
    model = types.SimpleNamespace(params={n: np.zeros(size) for n in ("A", "B", "C")},
                                  bn_params=[{"running_mean": np.zeros(3), "running_var": np.ones(3)}])
    flat = FlatParams(model.params)
    step = load_checkpoint(path, model, flat)[1]["step"] if os.path.exists(path) else 0
    while True:
        step += 1
        for value in model.params.values():
            value[...] = step
        model.bn_params[0]["running_mean"][...] = step
        save_checkpoint(path, model, {"t": step, "m": np.full(flat.data.size, float(step))}, step, step,
                        {"step": step}, 1, [{"x": step}], flat)
        print(step, flush=True)
""")


def check_saved(path, size):
    """The file at `path` is one complete save: every number in it is its step."""
    import types
    model = types.SimpleNamespace(params={n: np.zeros(size) for n in ("A", "B", "C")},
                                  bn_params=[{"running_mean": np.zeros(3), "running_var": np.zeros(3)}])
    optim, attrs = load_checkpoint(path, model, FlatParams(model.params))
    step = attrs["step"]
    assert all(np.all(v == step) for v in model.params.values())
    assert np.all(model.bn_params[0]["running_mean"] == step) and np.all(model.bn_params[0]["running_var"] == 1)
    assert optim["t"] == step and np.all(optim["m"] == step)
    assert attrs["epoch"] == step and attrs["config"] == {"step": step} and attrs["rng_states"] == [{"x": step}]
    return step


def test_checkpoint_survives_sigkill_while_writing(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    path = tmp_path / "ck" / "checkpoint.h5"
    size = 1_000_000  # 4 arrays of 8 MB: each save takes a while
    rnd = random.Random(0)
    hits = 0
    previous = 0
    for attempt in range(10):
        proc = start([sys.executable, str(script), str(path), str(size)], tmp_path)
        guard = threading.Timer(60, kill_group, [proc])  # a bound even if readline() blocks
        guard.start()
        try:
            first = proc.stdout.readline()  # one complete save by this process
            assert first.strip(), f"the saver printed nothing: {proc.stderr.read()}"
            time.sleep(rnd.uniform(0.0, 0.35))
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
        finally:
            guard.cancel()
            kill_group(proc)
        printed = [int(s) for s in (first + out).split()]
        assert proc.returncode == -signal.SIGKILL, err
        assert printed[0] == previous + 1  # it continued from the file left by the last kill
        step = check_saved(str(path), size)  # raises if the file is partial
        # the last save reported complete, or the one after it if it got renamed just before the kill
        assert step in (printed[-1], printed[-1] + 1), (step, printed)
        strays = [n for n in os.listdir(path.parent) if n != path.name]
        assert all("tmp" in n for n in strays), strays  # only temporary files beside it
        hits += bool(strays)
        for name in strays:
            os.remove(path.parent / name)
        previous = step
    assert hits > 0, "no kill landed during a write: the test did not exercise anything"


def test_training_survives_sigkill(cifar_dir, tmp_path):
    """Kill -9 the real command at random moments of a run of 1-step epochs (a checkpoint
    per epoch); the file is always a complete checkpoint and the run resumes from it."""
    args = ["--data", cifar_dir, "--val-size", "190", "--batch-size", "32", "--hidden-dim", "16",
            "--no-progress", "--epochs", "100000", "--check-every", "0"]  # 10 training images: 1 step / epoch
    rnd = random.Random(1)
    step = None
    for attempt in range(4):
        cmd = train_command(args + (["--resume", CKPT] if step is not None else []))
        proc = start(cmd, tmp_path)
        guard = threading.Timer(90, kill_group, [proc])  # a bound even if readline() blocks
        guard.start()
        try:
            seen = []
            deadline = time.monotonic() + 60
            # two epochs printed: the first one's checkpoint is complete
            while sum(line.startswith("epoch ") for line in seen) < 2:
                line = proc.stdout.readline()
                assert line and time.monotonic() < deadline, f"no epoch finished: {seen} {proc.stderr.read()}"
                seen.append(line)
            time.sleep(rnd.uniform(0.0, 0.3))
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
        finally:
            guard.cancel()
            kill_group(proc)
        lines = "".join(seen).splitlines() + out.splitlines()
        if step is not None:
            assert lines[0].startswith(f"resumed from {CKPT} at step {step} "), lines[:2]
        last_epoch = max(int(line.split()[1].split("/")[0]) for line in lines if line.startswith("epoch "))
        model, _ = model_for(tmp_path / CKPT)
        _, attrs = load_checkpoint(str(tmp_path / CKPT), model)  # a complete, loadable checkpoint
        # epoch e is printed before its checkpoint is written: the file holds epoch e - 1 or e (1 step each)
        assert attrs["step"] in (last_epoch - 1, last_epoch), (attrs["step"], last_epoch)
        assert attrs["step"] == attrs["epoch"]
        assert step is None or attrs["step"] >= step
        step = attrs["step"]
    assert step >= 4


# ================================================================ 6. failures end the job, in bounded time

FAULT_STEP = 7  # in epoch 2, after epoch 1's checkpoint (step 5)


def assert_epoch_one_checkpoint_kept(run):
    model, _ = model_for(run.path(CKPT))
    _, attrs = load_checkpoint(run.path(CKPT), model)
    assert attrs["step"] == STEPS_PER_EPOCH, str(run)
    records = read_metrics(run.path(METRICS))
    assert [r.get("epoch") for r in records] == [1], records
    assert not any(line.startswith("test accuracy") for line in run.lines), str(run)


@pytest.mark.parametrize("kind, bound", [("raise", 20), ("exit", 20), ("hang", 30)])
def test_fault_on_one_rank_ends_the_job(cifar_dir, tmp_path, kind, bound):
    extra = ["--timeout", "3"] if kind == "hang" else []  # others: the default 300 s would exceed the bound
    run = run_train(base_args(cifar_dir, "--epochs", "2", *extra), tmp_path, 2,
                    env=clean_env(DPNET_FAULT=f"1:{FAULT_STEP}:{kind}"), timeout=bound)
    assert run.returncode != 0, str(run)
    assert_epoch_one_checkpoint_kept(run)
    if kind == "raise":
        assert "[rank 1]" in run.stderr and "Traceback" in run.stderr, str(run)
        assert f"injected fault on rank 1 at step {FAULT_STEP}" in run.stderr, str(run)
        assert "[rank 0]" not in run.stderr, str(run)
    if kind == "exit":  # os._exit(3): Hydra says nothing of it, the rank's guardian does
        assert run.returncode in (3, 9), str(run)  # 9: Hydra may pass on the status of a rank it killed
        assert re.search(r"^\[rank 1\] ended with exit status 3 and no report \(os._exit, or exit\(\) in C code\); "
                         r"PID \d+ on \S+$", run.stderr, re.M), str(run)
    if kind == "hang":
        assert "rank(s) [1] never reached it" in run.stderr, str(run)
        assert f"step {FAULT_STEP} has not completed in 3 s" in run.stderr, str(run)
        assert run.seconds >= 3
    if kind != "exit":  # the rank said why it ended, or the watchdog did: its guardian stays quiet
        assert "no report" not in run.stderr and "was killed by" not in run.stderr, str(run)


@pytest.mark.parametrize("ranks_per_node", [None, "1"])
@pytest.mark.parametrize("fault_step", [0, FAULT_STEP])
def test_hang_in_the_update_ends_the_job(cifar_dir, tmp_path, ranks_per_node, fault_step):
    """A rank that hangs after the gradient sum, before its slice of the shared-memory
    update: the others wait in the update (at step 0 while moving Adam's state to shared
    memory, later in its barrier), which the watchdog guards too, also when the update
    spans only a node (one rank per node: the other rank is elsewhere)."""
    run = run_train(base_args(cifar_dir, "--epochs", "2", "--timeout", "3", "--reduction", "shared-memory"),
                    tmp_path, 2, env=clean_env(DPNET_FAULT=f"1:{fault_step}:hang-update",
                                               DPNET_RANKS_PER_NODE=ranks_per_node), timeout=30)
    assert run.returncode != 0, str(run)
    summed = "1 node x 2 ranks: shared memory" if ranks_per_node is None else "2 nodes x 1 rank: Allreduce across nodes"
    assert f"; {summed}\n" in run.stdout, str(run)
    assert "rank(s) [1] never reached it" in run.stderr, str(run)
    assert f"step {fault_step} has not completed in 3 s" in run.stderr, str(run)
    if fault_step == FAULT_STEP:
        assert_epoch_one_checkpoint_kept(run)


def test_watchdog_after_resume_names_the_global_step(cifar_dir, tmp_path):
    """A resumed run counts its steps on from the checkpoint's: the watchdog names the run's
    step 7, not the 2nd step since the resume."""
    args = base_args(cifar_dir, "--epochs", "2")
    run_ok(args + ["--max-steps", str(STEPS_PER_EPOCH)], tmp_path, 2)
    run = run_train(args + ["--resume", CKPT, "--timeout", "3"], tmp_path, 2,
                    env=clean_env(DPNET_FAULT=f"1:{FAULT_STEP}:hang"), timeout=30)
    assert run.returncode != 0, str(run)
    assert run.lines[0].startswith(f"resumed from {CKPT} at step {STEPS_PER_EPOCH} "), str(run)
    assert "rank(s) [1] never reached it" in run.stderr, str(run)
    assert f"watchdog: step {FAULT_STEP} has not completed in 3 s" in run.stderr, str(run)


def test_nan_loss_stops_cleanly(cifar_dir, tmp_path):
    run = run_train(base_args(cifar_dir, "--epochs", "2"), tmp_path, 2,
                    env=clean_env(DPNET_FAULT=f"1:{FAULT_STEP}:nan"), timeout=60)
    assert run.returncode == 4, str(run)
    assert run.stderr.count("loss is nan at step") == 1, str(run)
    assert run.err_lines == [f"{ERROR_PREFIX}the loss is nan at step {FAULT_STEP} (epoch 2); "
                             "stopping, the last checkpoint is kept"], str(run)
    assert_epoch_one_checkpoint_kept(run)


# ================================================================ 7. SIGTERM: stop, save, resume

def test_sigterm_saves_and_resumes(cifar_dir, tmp_path):
    epochs = 40
    total = epochs * STEPS_PER_EPOCH
    args = base_args(cifar_dir, "--epochs", str(epochs))
    cmd = train_command(args, 2)
    started = time.monotonic()
    proc = start(cmd, tmp_path)
    try:
        deadline = started + 60
        while not (os.path.exists(tmp_path / METRICS) and (tmp_path / METRICS).read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before SIGTERM"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # to mpirun only
        sent = time.monotonic()
        run = finish(proc, cmd, tmp_path, sent, timeout=20)
    finally:
        kill_group(proc)
    assert run.returncode == 0, str(run)
    saved = re.findall(r"^stop requested \(SIGTERM\): checkpoint saved at step (\d+); continue with "
                       + re.escape(f"--resume {CKPT}") + "$", run.stdout, re.M)
    assert len(saved) == 1, str(run)
    step = int(saved[0])
    assert STEPS_PER_EPOCH <= step < total
    model, _ = model_for(tmp_path / CKPT)
    _, attrs = load_checkpoint(str(tmp_path / CKPT), model)
    assert attrs["step"] == step and attrs["epoch"] == step // STEPS_PER_EPOCH
    assert not any(line.startswith("test accuracy") for line in run.lines)
    resumed = run_ok(args + ["--resume", CKPT], tmp_path, 2, timeout=120)
    assert resumed.lines[0].startswith(f"resumed from {CKPT} at step {step} "), str(resumed)
    assert read_checkpoint(tmp_path / CKPT)["attrs"]["step"] == total
    final = read_metrics(tmp_path / METRICS)[-1]
    assert final.get("final") is True and final["step"] == total


def start_and_wait_for_an_epoch(args, tmp_path, ranks):
    """Start the training command; return (cmd, proc) once it has written one more epoch's metrics."""
    def epochs():
        return (tmp_path / METRICS).read_text().count("\n") if os.path.exists(tmp_path / METRICS) else 0
    before = epochs()
    cmd = train_command(args, ranks)
    proc = start(cmd, tmp_path)
    deadline = time.monotonic() + 60
    while epochs() <= before:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before the signal"
        time.sleep(0.02)
    return cmd, proc


def test_ctrl_c_saves_and_exits_130(cifar_dir, tmp_path):
    """Ctrl-C (SIGINT to mpirun, which passes it to the ranks) stops every rank at the same step,
    saves, and exits 130 with one line; a second Ctrl-C ends the job at once."""
    args = base_args(cifar_dir, "--epochs", "40")
    cmd, proc = start_and_wait_for_an_epoch(args, tmp_path, 2)
    try:
        proc.send_signal(signal.SIGINT)
        run = finish(proc, cmd, tmp_path, time.monotonic(), timeout=20)
    finally:
        kill_group(proc)
    assert run.returncode == 130, str(run)
    saved = re.findall(r"^stop requested \(SIGINT\): checkpoint saved at step (\d+); continue with "
                       + re.escape(f"--resume {CKPT}") + "$", run.stdout, re.M)
    assert len(saved) == 1 and read_checkpoint(tmp_path / CKPT)["attrs"]["step"] == int(saved[0]), str(run)
    assert "Traceback" not in run.stderr, str(run)

    # the second Ctrl-C, checked on one process: through mpirun, Hydra acts on it first, its own way
    cmd, proc = start_and_wait_for_an_epoch(args + ["--resume", CKPT], tmp_path, None)
    try:
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        run = finish(proc, cmd, tmp_path, time.monotonic(), timeout=10)
    finally:
        kill_group(proc)
    assert run.returncode == 130, str(run)  # at once, or (if the first stop was quicker) saved: 130 both ways
    assert "Traceback" not in run.stderr, str(run)


# ================================================================ 8. bad input: exit 2, one line, once

@pytest.fixture(scope="module")
def real_checkpoint(cached, cifar_dir):
    run = cached("real-ckpt", lambda d: run_ok(base_args(cifar_dir, "--max-steps", "1"), d))
    return run.path(CKPT)


def _toml(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def _truncated_checkpoint(tmp_path, real):
    data = open(real, "rb").read()
    (tmp_path / "truncated.h5").write_bytes(data[:len(data) // 2])
    return ["--resume", "truncated.h5"], ["truncated.h5"]


def _data_with(tmp_path, cifar_dir, name, content):
    root = tmp_path / "cifar"
    write_cifar_folder(str(root))
    if isinstance(content, bytes):
        (root / name).write_bytes(content)
    else:
        write_pickle(root / name, content)
    return ["--data", str(root)], [str(root / name)]


def _truncated_batch(tmp_path, cifar_dir):
    args, fragments = _data_with(tmp_path, cifar_dir, "data_batch_3", b"")
    full = open(os.path.join(cifar_dir, "data_batch_3"), "rb").read()
    (tmp_path / "cifar" / "data_batch_3").write_bytes(full[:len(full) // 2])
    return args, fragments


def _garbage_checkpoint(tmp_path):
    (tmp_path / "garbage.h5").write_bytes(bytes(range(256)) * 64)
    return ["--resume", "garbage.h5"], ["garbage.h5", "unreadable checkpoint"]


def _missing_batch(tmp_path, cifar_dir):
    args, fragments = _data_with(tmp_path, cifar_dir, "data_batch_5", b"")
    os.remove(tmp_path / "cifar" / "data_batch_5")
    return args, fragments + ["file not found"]


OPTION_ERRORS = {  # id -> f(tmp_path) -> (flags, world size, fragments of the message, in order)
    "unknown-flag": lambda t: (["--bogus-flag"], 1, ["unrecognized arguments: --bogus-flag"]),
    "batch-size-0": lambda t: (["--batch-size", "0"], 1, ["--batch-size must be at least 1, got 0"]),
    "lr-0": lambda t: (["--lr", "0"], 1, ["--lr must be a positive finite number"]),
    "lr-negative": lambda t: (["--lr", "-1"], 1, ["--lr must be a positive finite number, got -1"]),
    "lr-inf": lambda t: (["--lr", "inf"], 1, ["--lr must be a positive finite number, got inf"]),
    "reg-nan": lambda t: (["--reg", "nan"], 1, ["--reg must be a finite number >= 0, got nan"]),
    "seed-negative": lambda t: (["--seed", "-1"], 1, ["--seed must not be negative, got -1"]),
    "stages-empty-stage": lambda t: (["--stages", "32//64"], 1, ["--stages must be positive filter counts",
                                                                 "got '32//64'"]),
    "stages-not-numbers": lambda t: (["--stages", "32,x"], 1, ["--stages must be positive filter counts"]),
    "stages-too-deep": lambda t: (["--stages", "8/8/8/8/8/8"], 1, ["at most 5 stages"]),
    "stages-for-threelayer": lambda t: (["--stages", "8/16"], 1, [
        "--stages does not apply to --model threelayer: only to convnet, vgg"]),
    "stages-for-resnet": lambda t: (["--model", "resnet20", "--stages", "8/16"], 1, [
        "--stages does not apply to --model resnet20: only to convnet, vgg"]),
    "hidden-dim-for-resnet": lambda t: (["--model", "resnet32", "--hidden-dim", "3"], 1, [
        "--hidden-dim does not apply to --model resnet32: only to threelayer, convnet, vgg"]),
    "resnet-without-bn": lambda t: (["--model", "resnet20", "--bn-mode", "none"], 1,
                                    ["--model resnet20 has batchnorm in every block: --bn-mode must be local or sync"]),
    "bucket-mb-nan": lambda t: (["--bucket-mb", "nan"], 1, ["--bucket-mb must be a finite number >= 0, got nan"]),
    "bucket-mb-inf": lambda t: (["--bucket-mb", "inf"], 1, ["--bucket-mb must be a finite number >= 0, got inf"]),
    "toml-bucket-mb-inf": lambda t: (["--config", _toml(t, "bucket_mb = inf\n")], 1,
                                     ["--bucket-mb must be a finite number >= 0, got inf"]),
    "batch-size-1-two-ranks": lambda t: (["--batch-size", "1"], 2, ["--batch-size 1 is smaller than the 2 ranks"]),
    "buckets-with-shared-memory": lambda t: (["--reduction", "shared-memory", "--bucket-mb", "1"], 1,
                                             ["--bucket-mb applies to --reduction allreduce"]),
    "unknown-reduction": lambda t: (["--reduction", "nccl"], 1, ["--reduction", "invalid choice: 'nccl'"]),
    "unknown-model": lambda t: (["--model", "resnet50"], 1, ["--model", "invalid choice: 'resnet50'"]),
    "toml-unknown-key": lambda t: (["--config", _toml(t, "max_steps = 3\nlearning_rate = 0.1\n")], 1,
                                   ["run.toml", "unknown key(s) learning_rate"]),
    "toml-syntax": lambda t: (["--config", _toml(t, "max_steps = \n")], 1, ["run.toml"]),
    "toml-string-for-an-integer": lambda t: (["--config", _toml(t, 'max_steps = "3"\n')], 1,
                                             ["run.toml", "max_steps"]),
    "toml-float-for-an-integer": lambda t: (["--config", _toml(t, "epochs = 1.5\n"), "--max-steps", "2"], 1,
                                            ["run.toml", "epochs"]),
    "resume-missing": lambda t: (["--resume", str(t / "nowhere.h5")], 1, ["nowhere.h5", "no such checkpoint file"]),
}


@pytest.mark.parametrize("case", sorted(OPTION_ERRORS))
def test_bad_option_is_a_config_error(tmp_path, case):
    """Flags and TOML values are checked by parse_args and validate: one ConfigError, one line.
    (main() prints it once and exits 2: see test_bad_input_exits_2_with_one_message.)"""
    flags, world, fragments = OPTION_ERRORS[case](tmp_path)
    with pytest.raises(ConfigError, match=".*".join(map(re.escape, fragments))) as info:
        validate(parse_args(["--max-steps", "1", *flags]), world)
    assert "\n" not in str(info.value)


BAD_INPUT = {  # id -> f(tmp_path, cifar_dir, real_checkpoint, mode) -> (extra args, fragments of the message)
    # two bad options, to show that main() reports them once (under mpirun too); the others are
    # checked in-process by test_bad_option_is_a_config_error
    "unknown-flag": lambda t, d, c, m: (["--bogus-flag"], ["unrecognized arguments: --bogus-flag"]),
    "batch-size-1-two-ranks": lambda t, d, c, m: (
        ["--batch-size", "1"] + (["--simulate-ranks", "2"] if m == "serial" else []),
        ["--batch-size 1 is smaller than the 2 ranks"]),
    # checkpoints and data sets, read on every rank
    "resume-garbage": lambda t, d, c, m: _garbage_checkpoint(t),
    "fault-kind-unknown": lambda t, d, c, m: ([], ["DPNET_FAULT: unknown fault kind 'explode'"]),
    "resume-truncated": lambda t, d, c, m: _truncated_checkpoint(t, c),
    "resume-other-model": lambda t, d, c, m: (["--resume", c, "--hidden-dim", "8"],
                                              ["--hidden-dim 8 does not match the checkpoint's 16", c,
                                               "leave --hidden-dim out to continue the run as it was"]),
    "resume-other-optimizer": lambda t, d, c, m: (["--resume", c, "--optimizer", "rmsprop"],
                                                  ["--optimizer rmsprop does not match the checkpoint's momentum",
                                                   "or pass --reset-optimizer"]),
    "resume-other-dtype": lambda t, d, c, m: (["--resume", c, "--dtype", "float64"],
                                              ["--dtype float64 does not match the checkpoint's float32"]),
    "data-missing": lambda t, d, c, m: (["--data", str(t / "no-such-folder")], [str(t / "no-such-folder")]),
    "data-truncated-batch": lambda t, d, c, m: _truncated_batch(t, d),
    "data-foreign-pickle": lambda t, d, c, m: _data_with(t, d, "data_batch_2", {b"labels": [1, 2], b"x": 0}),
    "data-pickled-list": lambda t, d, c, m: _data_with(t, d, "test_batch", [1, 2, 3]),
    "data-missing-batch": lambda t, d, c, m: _missing_batch(t, d),
    # output folders, checked before any training ('file' is a file, so nothing can be made in it)
    "metrics-unwritable": lambda t, d, c, m: _unwritable(t, "--metrics"),
    "checkpoint-unwritable": lambda t, d, c, m: _unwritable(t, "--checkpoint"),
}


def _unwritable(tmp_path, option):
    (tmp_path / "file").write_text("not a folder")
    path = str(tmp_path / "file" / "out")
    return [option, path], [f"{option} {path}: cannot write to {tmp_path / 'file'}"]


@pytest.mark.parametrize("mode", ["serial", "mpirun-2"])
@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_exits_2_with_one_message(cifar_dir, real_checkpoint, tmp_path, case, mode):
    extra, fragments = BAD_INPUT[case](tmp_path, cifar_dir, real_checkpoint, mode)
    env = clean_env(DPNET_FAULT="1:0:explode" if case == "fault-kind-unknown" else None)
    run = run_train(base_args(cifar_dir, "--max-steps", "1", *extra), tmp_path,
                    ranks=2 if mode == "mpirun-2" else None, env=env, timeout=60)
    assert run.returncode == 2, str(run)
    assert len(run.err_lines) == 1, f"expected one line on stderr\n{run}"
    assert run.stderr.count(ERROR_PREFIX) == 1, f"printed more than once\n{run}"  # even if interleaved
    line = run.err_lines[0]
    assert line.startswith(ERROR_PREFIX), str(run)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in the message\n{run}"
    assert run.stdout == "", str(run)
    assert not os.path.exists(tmp_path / CKPT)


def test_mpirun_with_simulated_ranks_is_refused(cifar_dir, tmp_path):
    """Under mpirun each process would run its own simulated job, all writing the same files."""
    run = run_train(base_args(cifar_dir, "--max-steps", "1", "--simulate-ranks", "2"), tmp_path, ranks=2,
                    timeout=60)
    assert run.returncode == 2 and len(run.err_lines) == 1, str(run)
    assert run.err_lines[0] == (ERROR_PREFIX + "--simulate-ranks runs logical ranks in one process; under "
                                "mpirun each of the processes would run its own simulated job: use one or the other")
    assert run.stdout == ""


def test_shared_memory_that_cannot_serve_is_one_message(cifar_dir, tmp_path):
    """--reduction shared-memory on nodes of unequal size (3 ranks as 2 + 1): exit 2, one line."""
    run = run_train(base_args(cifar_dir, "--max-steps", "1", "--reduction", "shared-memory"), tmp_path, ranks=3,
                    env=clean_env(DPNET_RANKS_PER_NODE="2"), timeout=60)
    assert run.returncode == 2 and len(run.err_lines) == 1, str(run)
    assert run.err_lines[0] == (ERROR_PREFIX + "--reduction shared-memory: reduction 'shared-memory' is "
                                "unavailable: nodes hold different numbers of ranks (1 to 2)")


@pytest.mark.parametrize("ranks", [None, 2], ids=["serial", "mpirun-2"])
def test_progress_is_a_line_every_few_seconds_in_a_log(cifar_dir, tmp_path, ranks):
    """Where the output is a pipe or a file (a batch job's log) and no terminal can show a bar,
    rank 0 writes one progress line every DPNET_PROGRESS_SECONDS."""
    args = [a for a in base_args(cifar_dir, "--epochs", "1") if a != "--no-progress"]
    run = run_ok(args, tmp_path, ranks, env=clean_env(DPNET_PROGRESS_SECONDS="0"))
    lines = [line for line in run.err_lines if line.startswith("epoch 1/1: step ")]
    assert len(lines) == STEPS_PER_EPOCH, str(run)  # every step, printed once
    assert re.fullmatch(r"epoch 1/1: step 5/5, loss \d+\.\d{3}, img/s \d+", lines[-1]), str(run)


@pytest.mark.skipif(not (shutil.which("script") and os.path.isdir("/proc/self")),
                    reason="needs util-linux's script (a terminal for mpirun) and /proc")
def test_progress_is_a_live_bar_when_mpirun_writes_to_a_terminal(cifar_dir, tmp_path):
    """mpirun on a terminal (script gives it one): rank 0's output passes through Hydra's pipes,
    yet it draws the live bar, redrawn in place with carriage returns, not progress lines."""
    args = [a for a in base_args(cifar_dir, "--epochs", "1") if a != "--no-progress"]
    command = " ".join(shlex.quote(a) for a in train_command(args, 2))
    typescript = tmp_path / "typescript"
    cmd = ["script", "-qec", command, str(typescript)]
    run = finish(start(cmd, tmp_path, clean_env(DPNET_PROGRESS_SECONDS="0")), cmd, tmp_path, time.monotonic(), 60)
    assert run.returncode == 0, str(run)
    shown = typescript.read_bytes().decode(errors="replace")  # with its carriage returns
    assert re.search(r"\repoch 1/1: +\d+%\|", shown), shown  # tqdm's bar, redrawn in place
    assert "epoch 1/1: step " not in shown, shown
    assert "epoch 1/1: loss " in shown, str(run)


@pytest.mark.skipif(not (shutil.which("script") and os.path.isdir("/proc/self")),
                    reason="needs util-linux's script (a terminal for mpirun) and /proc")
def test_progress_is_lines_when_mpirun_on_a_terminal_writes_to_a_file(cifar_dir, tmp_path):
    """mpirun started from a terminal with its stderr sent to a file: the file gets progress
    lines, not a bar (the terminal above mpirun is not where the output goes)."""
    args = [a for a in base_args(cifar_dir, "--epochs", "1") if a != "--no-progress"]
    command = " ".join(shlex.quote(a) for a in train_command(args, 2)) + " 2> log"
    cmd = ["script", "-qec", command, str(tmp_path / "typescript")]
    run = finish(start(cmd, tmp_path, clean_env(DPNET_PROGRESS_SECONDS="0")), cmd, tmp_path, time.monotonic(), 60)
    assert run.returncode == 0, str(run)
    log = (tmp_path / "log").read_text()
    assert "\r" not in log and "%|" not in log, log
    assert len([line for line in log.splitlines() if line.startswith("epoch 1/1: step ")]) == STEPS_PER_EPOCH, log


def test_resume_takes_the_runs_settings_from_the_checkpoint(cifar_dir, tmp_path):
    """Resumed without --data, --optimizer or --hidden-dim, a run goes on with the checkpoint's
    (not synthetic data, not the recipe's momentum); --reset-optimizer allows another optimizer,
    afresh, at that optimizer's own rate (not the old one's 0.01)."""
    run_ok(base_args(cifar_dir, "--max-steps", "3", "--optimizer", "nesterov", "--lr", "0.01",
                     "--hidden-dim", "12"), tmp_path)
    resumed = run_ok(["--resume", CKPT, "--max-steps", "6", "--no-progress"], tmp_path)
    assert f"CIFAR-10 from {cifar_dir}" in resumed.lines[1], str(resumed)
    assert resumed.lines[1].endswith("; nesterov lr 0.01, L2 0.0005"), str(resumed)
    ckpt = read_checkpoint(tmp_path / CKPT)
    assert ckpt["attrs"]["step"] == 6 and ckpt["params"]["W3"].shape == (12, 10)
    assert ckpt["attrs"]["config"]["optimizer"] == "nesterov"
    assert {key.split("/")[0] for key in ckpt["optimizer"]} == {"velocity"}
    reset = run_ok(["--resume", CKPT, "--max-steps", "8", "--no-progress", "--optimizer", "adam",
                    "--reset-optimizer"], tmp_path)
    assert reset.lines[0].endswith(", fresh optimizer"), str(reset)
    assert reset.lines[1].endswith("; adam lr 0.001, L2 0.0005"), str(reset)
    ckpt = read_checkpoint(tmp_path / CKPT)
    assert ckpt["attrs"]["config"]["optimizer"] == "adam"
    assert {key.split("/")[0] for key in ckpt["optimizer"]} == {"m", "v"}
    assert ckpt["attrs"]["step"] == 8


def test_step_checkpoints_keep_the_newest_three_and_resume_exactly(cifar_dir, tmp_path):
    """--checkpoint-every 2 over 11 steps leaves the checkpoints of steps 6, 8 and 10 beside
    --checkpoint; resuming from step 6 in another folder ends bit-identical to the whole run.
    A temporary file that a killed writer left is removed at the next start."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = base_args(cifar_dir, "--max-steps", "11")
    whole = run_ok(args + ["--checkpoint-every", "2"], tmp_path / "a", 2)
    steps = sorted(name for name in os.listdir(whole.path("dpnet_run")) if "-step" in name)
    assert steps == [f"checkpoint-step{s:08d}.h5" for s in (6, 8, 10)], steps
    assert read_checkpoint(whole.path("dpnet_run", steps[0]))["attrs"]["step"] == 6
    (tmp_path / "b" / "dpnet_run").mkdir()
    leftover = tmp_path / "b" / "dpnet_run" / ".checkpoint.h5.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    resumed = run_ok(args + ["--resume", whole.path("dpnet_run", steps[0])], tmp_path / "b", 2)
    assert resumed.lines[0].startswith(f"resumed from {whole.path('dpnet_run', steps[0])} at step 6 "), str(resumed)
    assert_same_state(read_checkpoint(whole.path(CKPT)), read_checkpoint(resumed.path(CKPT)), "resumed at step 6")
    assert not leftover.exists()


def test_a_run_never_replaces_another_runs_files(cifar_dir, tmp_path):
    """A second run in the same folder is refused (one line, exit 2) and leaves the first run's
    checkpoint and metrics as they were; --overwrite replaces them, but only once it has trained
    an epoch does the metrics file change (a run that dies first leaves it whole)."""
    first = run_ok(base_args(cifar_dir, "--max-steps", "3"), tmp_path)
    saved = {p: (tmp_path / p).read_bytes() for p in (CKPT, METRICS)}
    again = run_train(base_args(cifar_dir, "--max-steps", "3"), tmp_path, timeout=60)
    assert again.returncode == 2 and len(again.err_lines) == 1, str(again)
    assert again.err_lines[0] == (ERROR_PREFIX + f"--checkpoint {CKPT} exists (an earlier run's): continue that "
                                  "run with --resume, choose another --checkpoint, or pass --overwrite to replace it")
    assert {p: (tmp_path / p).read_bytes() for p in saved} == saved
    dies = run_train(base_args(cifar_dir, "--max-steps", "3", "--overwrite"), tmp_path,
                     env=clean_env(DPNET_FAULT="0:1:nan"), timeout=60)
    assert dies.returncode == 4 and "loss is nan at step 1" in dies.stderr, str(dies)
    assert (tmp_path / METRICS).read_bytes() == saved[METRICS]  # not truncated by a run that never trained
    run_ok(base_args(cifar_dir, "--max-steps", "6", "--overwrite"), tmp_path)
    assert read_metrics(tmp_path / METRICS)[-1]["step"] == 6
    assert first.returncode == 0


def test_toml_config_is_honoured_and_flags_override_it(cifar_dir, tmp_path):
    config = _toml(tmp_path, f"""
        data = "{cifar_dir}"
        max_steps = 3
        batch_size = 32
        val_size = 40
        hidden_dim = 16
        progress = false
        checkpoint = "from_toml/ck.h5"
    """)
    run_ok(["--config", config], tmp_path)
    ckpt = read_checkpoint(tmp_path / "from_toml" / "ck.h5")
    assert ckpt["attrs"]["step"] == 3 and ckpt["params"]["W3"].shape == (16, 10)
    assert ckpt["attrs"]["config"]["max_steps"] == 3 and ckpt["attrs"]["config"]["data"] == cifar_dir
    run = run_ok(["--config", config, "--max-steps", "2", "--hidden-dim", "12", "--overwrite"], tmp_path)
    ckpt = read_checkpoint(tmp_path / "from_toml" / "ck.h5")
    assert ckpt["attrs"]["step"] == 2 and ckpt["params"]["W3"].shape == (12, 10)
    assert "160 train / 40 val / 40 test" in run.lines[0]


# ================================================================ 10. where the data comes from

def test_dpnet_data_naming_a_missing_path_is_an_error(tmp_path):
    """DPNET_DATA is the user's explicit choice, like --data: a missing path is exit 2, not synthetic data."""
    missing = str(tmp_path / "nowhere")
    run = run_train([*TINY, "--max-steps", "2"], tmp_path, env=clean_env(DPNET_DATA=missing), timeout=60)
    assert run.returncode == 2, str(run)
    assert len(run.err_lines) == 1 and "nowhere" in run.err_lines[0], str(run)
    assert "SYNTHETIC" not in run.stdout, str(run)

def test_without_data_it_trains_on_synthetic_data_and_says_so(tmp_path):
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    run = run_ok([*TINY, "--max-steps", "2", "--epochs", "1"], tmp_path, env=clean_env(XDG_CACHE_HOME=str(cache)))
    head = run.lines[:4]
    assert head[0].startswith("=" * 20) and "SYNTHETIC" in head[1], str(run)
    assert "not real images" in head[1], str(run)
    assert "--data" in head[2] and "DPNET_DATA" in head[2], str(run)
    assert head[3].startswith("=" * 20), str(run)
    assert "SYNTHETIC data (no CIFAR-10 found)" in run.lines[4], str(run)  # the header line
    records = read_metrics(tmp_path / METRICS)
    assert len(records) == 2 and all(r["synthetic"] is True for r in records), records
    assert run.lines[-1].startswith("test accuracy") and "(synthetic data)" in run.lines[-1]
    # the checkpoint says so: its resume and evaluation stay on the synthetic set wherever they run
    assert read_checkpoint(tmp_path / CKPT)["attrs"]["config"]["data"] == "synthetic"
    assert_unique_lines(run)


@pytest.mark.parametrize("how", ["DPNET_DATA", "XDG_CACHE_HOME"])
def test_data_found_without_the_flag(cifar_dir, tmp_path, how):
    cache = tmp_path / "cache"
    if how == "DPNET_DATA":
        cache.mkdir()
        env, where = clean_env(DPNET_DATA=cifar_dir, XDG_CACHE_HOME=str(cache)), cifar_dir
    else:
        where = str(cache / "dpnet" / "cifar-10-batches-py")
        os.makedirs(os.path.dirname(where))
        os.symlink(cifar_dir, where)
        env = clean_env(XDG_CACHE_HOME=str(cache))
    run = run_ok([*TINY, "--max-steps", "2", "--epochs", "1"], tmp_path, ranks=2, env=env)
    assert "SYNTHETIC" not in run.stdout, str(run)
    assert f"CIFAR-10 from {where}: 160 train / 40 val / 40 test" in run.lines[0], str(run)
    records = read_metrics(tmp_path / METRICS)
    assert len(records) == 2 and all(r["synthetic"] is False for r in records), records
    assert_unique_lines(run)


def test_empty_validation_set_gives_null_accuracy_in_strict_json(cifar_dir, tmp_path):
    """--val-size 0 is allowed: val_acc is null (not NaN, which strict JSON parsers reject)."""
    run = run_ok(base_args(cifar_dir, "--epochs", "1", "--val-size", "0"), tmp_path)  # the last flag wins
    assert "val acc n/a" in run.stdout, str(run)
    strict = lambda const: (_ for _ in ()).throw(AssertionError(f"non-standard JSON constant {const}"))
    records = [json.loads(line, parse_constant=strict) for line in open(run.path(METRICS))]
    assert records[0]["val_acc"] is None and 0 <= records[0]["train_acc"] <= 1


@pytest.mark.parametrize("missing", ["data", "resume"])
def test_a_file_missing_on_one_rank_ends_every_rank_at_start(cifar_dir, tmp_path, missing):
    """A data folder (or checkpoint) that exists for rank 0 but not for rank 1, as on a node without
    the shared file system: all ranks exit 2 at once with one message naming rank 1, none hangs."""
    good = ["-env", "DPNET_DATA", cifar_dir] if missing == "data" else []
    bad = ["-env", "DPNET_DATA", str(tmp_path / "nowhere")] if missing == "data" else []
    args = [*TINY, "--max-steps", "2"]
    if missing == "resume":
        ckpt = tmp_path / "ck.h5"
        run_ok(base_args(cifar_dir, "--max-steps", "1", "--checkpoint", str(ckpt)), tmp_path)
        good_args = ["--data", cifar_dir, *args, "--resume", str(ckpt)]
        bad_args = ["--data", cifar_dir, *args, "--resume", str(tmp_path / "absent.h5")]
    else:
        good_args = bad_args = args
    cmd = [mpirun_path(), "-n", "1", *good, sys.executable, "-m", "dpnet.train", *good_args, ":",
           "-n", "1", *bad, sys.executable, "-m", "dpnet.train", *bad_args]
    run = finish(start(cmd, tmp_path), cmd, tmp_path, time.monotonic(), 60)
    assert run.returncode == 2, str(run)
    errors = [line for line in run.stderr.splitlines() if ERROR_PREFIX in line]
    assert len(errors) == 1 and "rank(s) [1]" in errors[0], str(run)


def test_help_explains_every_option(capsys):
    """--help lists every TrainConfig field as a flag with a sentence and, where there is one,
    its default; a field without help text would be an error."""
    from dpnet.train import OPTION_HELP, TrainConfig, parse_args
    from dpnet.train.config import option_fields
    fields = [f.name for f in option_fields()]
    assert sorted(OPTION_HELP) == sorted(fields)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    # unwrap argparse's line breaks, also those after a hyphen ("im2col-" / "whole")
    def unwrap(s):
        return re.sub(r"- (?=\w)", "-", " ".join(s.split()))

    text = unwrap(capsys.readouterr().out)
    for name in fields:
        assert unwrap(OPTION_HELP[name]) in text, name
    assert "--reduction {auto,shared-memory,allreduce}" in text and "(default: 128)" in text


def test_a_rank_stuck_at_start_up_ends_the_job(cifar_dir, tmp_path):
    """The watchdog guards the start-up too: a rank that never finishes starting (here it sleeps
    before loading the data) ends the job after --timeout, named."""
    run = run_train(base_args(cifar_dir, "--max-steps", "2", "--timeout", "3"), tmp_path, 2,
                    env=clean_env(DPNET_FAULT="1:0:hang-start"), timeout=40)
    assert run.returncode != 0, str(run)
    assert ("watchdog: the start-up has not completed in 3 s; rank(s) [1] reached it but wait in no "
            "collective (still computing, or stuck)") in run.stderr, str(run)  # said by rank 0 or rank 1


@pytest.mark.parametrize("part, said", [
    ("evaluation", "the evaluation after step 5 has not completed in 3 s; rank(s) [1] reached it but wait in no "
                   "collective (still computing, or stuck)"),
    ("checkpoint", "the checkpoint after step 5 has not completed in 3 s; rank(s) [1] reached it but wait in no "
                   "collective (still computing, or stuck)"),
    ("shutdown", "the shutdown has not completed in 3 s; rank(s) [1] never reached it"),
])
def test_a_rank_stuck_outside_the_steps_ends_the_job(cifar_dir, tmp_path, part, said):
    """The watchdog guards evaluation, checkpoint writing and the shutdown as it guards the steps:
    rank 1 stuck there ends the job after --timeout, named, with no rank left running."""
    run = run_train(base_args(cifar_dir, "--epochs", "2", "--timeout", "3"), tmp_path, 2,
                    env=clean_env(DPNET_FAULT=f"1:5:hang-{part}"), timeout=40)
    assert run.returncode != 0, str(run)
    assert f"watchdog: {said}" in run.stderr, str(run)


def test_resnet20_trains_and_resumes(cifar_dir, tmp_path):
    """--model resnet20 under mpirun: 2 ranks train it (sync batchnorm), and a run stopped at step 2
    and resumed ends bit-identical to the straight run."""
    args = ["--data", cifar_dir, *TINY_SPLIT, "--model", "resnet20", "--epochs", "1", "--no-augment"]
    (tmp_path / "straight").mkdir()
    straight = run_ok(args, tmp_path / "straight", 2, timeout=180)
    assert straight.lines[0].startswith("dpnet 0.1.0: resnet20 (bn sync), 2 rank(s)"), str(straight)
    full = read_checkpoint(straight.path(CKPT))
    assert full["params"]["W1"].shape == (16, 3, 3, 3) and full["params"]["W20"].shape == (64, 10)
    assert sum(v.size for v in full["params"].values()) == 269722
    run_ok(args + ["--max-steps", "2"], tmp_path, 2, timeout=180)
    resumed = run_ok(args + ["--resume", CKPT], tmp_path, 2, timeout=180)
    assert resumed.lines[0].startswith(f"resumed from {CKPT} at step 2 "), str(resumed)
    assert_same_state(read_checkpoint(tmp_path / CKPT), full, "resnet20 resumed")


def test_a_step_checkpoint_at_an_epochs_end_holds_the_epochs_end(cifar_dir, tmp_path):
    """--checkpoint-every at an epoch's last step saves after the epoch's end: with local
    batchnorm it holds the ranks' averaged statistics, as the epoch's checkpoint does, and a run
    resumed from it writes no second line for that epoch."""
    args = base_args(cifar_dir, "--bn-mode", "local", "--epochs", "2", "--checkpoint-every", str(STEPS_PER_EPOCH))
    run_ok(args + ["--max-steps", str(STEPS_PER_EPOCH)], tmp_path, 2)
    step_file = os.path.join("dpnet_run", f"checkpoint-step{STEPS_PER_EPOCH:08d}.h5")
    assert_same_state(read_checkpoint(tmp_path / step_file), read_checkpoint(tmp_path / CKPT), "step vs epoch file")
    run_ok(args + ["--resume", step_file], tmp_path, 2)
    assert [r.get("epoch") for r in read_metrics(tmp_path / METRICS) if "epoch" in r] == [1, 2]


def test_learning_rate_warm_up_and_linear_scaling():
    """--warmup-epochs ramps the rate linearly from 0 to the schedule's; --lr-scaling linear makes
    --lr the rate of a 128-image batch; both compose with the cosine and step schedules."""
    from dpnet.train import learning_rate
    per_epoch, total = 10, 100
    plain = TrainConfig(lr=0.1, lr_schedule="step", lr_decay=0.5, batch_size=512)
    assert [learning_rate(plain, s, total, s // per_epoch, per_epoch) for s in (0, 10, 25)] == [0.1, 0.05, 0.025]
    scaled = dataclasses.replace(plain, lr_scaling="linear")
    assert learning_rate(scaled, 0, total, 0, per_epoch) == pytest.approx(0.4)  # 0.1 x 512 / 128
    warm = dataclasses.replace(scaled, warmup_epochs=2.5)  # 25 steps of ramp
    ramp = [learning_rate(warm, s, total, s // per_epoch, per_epoch) for s in range(30)]
    for s in range(25):
        schedule = learning_rate(scaled, s, total, s // per_epoch, per_epoch)
        assert ramp[s] == pytest.approx(schedule * (s + 1) / 25, rel=1e-12)
    assert ramp[25:] == [learning_rate(scaled, s, total, s // per_epoch, per_epoch) for s in range(25, 30)]
    cosine = TrainConfig(lr=0.1, warmup_epochs=1)
    assert learning_rate(cosine, 9, total, 0, per_epoch) == pytest.approx(0.5 * 0.1 * (1 + math.cos(math.pi * 9 / 100)))
    with pytest.raises(ConfigError, match="--warmup-epochs must be a finite number >= 0, got -1"):
        validate(dataclasses.replace(cosine, warmup_epochs=-1), 1)
    from dpnet.train.loop import rate_text  # what the header says of them
    assert rate_text(plain) == "lr 0.1"
    assert rate_text(dataclasses.replace(warm, lr=0.05)) == \
        "lr 0.2 (0.05 x 512 / 128, --lr-scaling linear), 2.5 warm-up epoch(s)"


def test_convnet_layout_from_the_command_line(cifar_dir, tmp_path):
    """--stages gives ConvNet's layout (here 8 / 16,16 filters); a resumed run takes it from the
    checkpoint."""
    args = base_args(cifar_dir, "--model", "convnet", "--stages", "8/16,16", "--epochs", "1")
    run_ok(args + ["--max-steps", "2"], tmp_path)
    shapes = {k: v.shape for k, v in read_checkpoint(tmp_path / CKPT)["params"].items() if k.startswith("W")}
    assert shapes == {"W1": (8, 3, 3, 3), "W2": (16, 8, 3, 3), "W3": (16, 16, 3, 3), "W4": (16 * 8 * 8, 16),
                      "W5": (16, 10)}
    resumed = run_ok(["--data", cifar_dir, "--no-progress", "--resume", CKPT], tmp_path)
    assert resumed.lines[0].startswith(f"resumed from {CKPT} at step 2 "), str(resumed)
    assert read_checkpoint(tmp_path / CKPT)["params"]["W3"].shape == (16, 16, 3, 3)


def kill_during_a_run(cifar_dir, cwd, which, signum=signal.SIGKILL):
    """Start a 2-rank job; once its ranks and guardians run and it has written a step checkpoint,
    send signum to the processes which(ranks, guardians) picks ({rank: pid} each; a PID or a list);
    returns (the finished Run, what was picked)."""
    cmd = train_command(base_args(cifar_dir, "--epochs", "200", "--checkpoint-every", "2", "--timeout", "60"), 2)
    proc = start(cmd, cwd)
    try:
        deadline, folder = time.monotonic() + 60, cwd / "dpnet_run"
        while not (folder.is_dir() and any(name.startswith("checkpoint-step") for name in os.listdir(folder))):
            assert proc.poll() is None and time.monotonic() < deadline, "the job ended or stalled"
            time.sleep(0.05)
        ranks, guardians = job_processes(cwd)
        assert sorted(ranks) == sorted(guardians) == [0, 1], (ranks, guardians)
        victim = which(ranks, guardians)
        for pid in victim if isinstance(victim, list) else [victim]:
            os.kill(pid, signum)
        run = finish(proc, cmd, cwd, time.monotonic(), 20)
    finally:
        kill_group(proc)
    deadline = time.monotonic() + 5
    while job_processes(cwd) != ({}, {}):  # nothing of the job is left
        assert time.monotonic() < deadline, f"left running: {job_processes(cwd)}"
        time.sleep(0.05)
    return run, victim


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the ranks through /proc (Linux)")
def test_a_rank_killed_by_a_signal_is_named_by_its_guardian(cifar_dir, tmp_path):
    """kill -9 of rank 1 under plain mpirun: the job ends at once, and rank 1's guardian names
    it, with its PID."""
    run, victim = kill_during_a_run(cifar_dir, tmp_path, lambda ranks, guardians: ranks[1])
    assert run.returncode != 0, str(run)
    assert re.search(rf"^\[rank 1\] was killed by SIGKILL; PID {victim} on \S+$", run.stderr, re.M), str(run)
    assert "[rank 0]" not in run.stderr, str(run)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the ranks through /proc (Linux)")
def test_a_killed_guardian_takes_its_rank_and_the_job_with_it(cifar_dir, tmp_path):
    """kill -9 of rank 1's guardian (the process mpirun watches): rank 1 dies with it (it is the
    guardian's child, with PR_SET_PDEATHSIG), and the job ends within seconds."""
    run, _ = kill_during_a_run(cifar_dir, tmp_path, lambda ranks, guardians: guardians[1])
    assert run.returncode != 0, str(run)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the guardian finds its peers through /proc (Linux)")
def test_a_rank_that_exits_ends_its_host_without_the_launchers_clean_up(cifar_dir, tmp_path):
    """mpiexec -disable-auto-cleanup (Hydra then kills no rank when one dies): rank 1 exits at
    step 2 without a report; its guardian reports it and ends rank 0 itself, so the job ends
    within seconds, not after rank 0's --timeout 120."""
    args = base_args(cifar_dir, "--epochs", "2", "--timeout", "120")
    cmd = [mpirun_path(), "-disable-auto-cleanup", "-n", "2", *train_command(args)]
    started = time.monotonic()
    run = finish(start(cmd, tmp_path, clean_env(DPNET_FAULT="1:2:exit")), cmd, tmp_path, started, 60)
    assert run.returncode != 0, str(run)
    assert re.search(r"^\[rank 1\] ended with exit status 3 and no report", run.stderr, re.M), str(run)
    assert run.seconds < 30, str(run)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the ranks through /proc (Linux)")
def test_one_ctrl_c_delivered_twice_still_saves(cifar_dir, tmp_path):
    """SIGINT to every guardian and every rank at once (`pkill -INT -f dpnet.train`, or a
    scheduler signalling every process of the job): each rank gets it twice, which is still
    one Ctrl-C: the job saves and exits 130 with one line."""
    run, _ = kill_during_a_run(cifar_dir, tmp_path, lambda ranks, guardians: [*ranks.values(), *guardians.values()],
                               signal.SIGINT)
    assert run.returncode == 130, str(run)
    assert re.search(r"^stop requested \(SIGINT\): checkpoint saved at step \d+", run.stdout, re.M), str(run)


def test_a_rank_without_stdout_runs(cifar_dir, tmp_path):
    """A rank started with its stdout closed (`>&-`) trains as before (its guardian forks without it)."""
    command = " ".join(shlex.quote(a) for a in train_command(base_args(cifar_dir, "--epochs", "1"))) + " >&-"
    cmd = [mpirun_path(), "-n", "2", "sh", "-c", f"exec {command}"]
    run = finish(start(cmd, tmp_path), cmd, tmp_path, time.monotonic(), 60)
    assert run.returncode == 0, str(run)


def test_a_normal_run_has_silent_guardians(cifar_dir, tmp_path):
    """Two ranks that finish: the guardians pass the status on and print nothing."""
    run = run_ok(base_args(cifar_dir, "--epochs", "1"), tmp_path, 2)
    assert run.stderr.strip() == "", str(run)


def test_a_rank_that_calls_sys_exit_ends_the_job_named(cifar_dir, tmp_path):
    """sys.exit(3) on rank 1 mid-run: the job ends at once with status 3, and rank 1 says so (a
    process that ends by os._exit is named by its guardian, see test_fault_on_one_rank_ends_the_job)."""
    run = run_train(base_args(cifar_dir, "--epochs", "2", "--timeout", "60"), tmp_path, 2,
                    env=clean_env(DPNET_FAULT="1:3:sys-exit"), timeout=40)
    assert run.returncode == 3, str(run)
    assert "[rank 1] exited with status 3 (sys.exit), aborting all 2 ranks" in run.stderr, str(run)
    assert run.seconds < 20, str(run)


# ================================================================ layer choices by default

def test_a_default_run_measures_its_layer_choices_once_then_reads_them(cifar_dir, tmp_path):
    """auto is the default for both choices. The first run on a machine times each layer's ways
    (dpnet.autotune) and saves the winners under this machine's key; the next run reads them,
    measures nothing, computes the same way, and the checkpoint names the ways used."""
    from dpnet.autotune import dx_signature, machine_key
    cache = tmp_path / "autotune.json"
    env = clean_env(DPNET_AUTOTUNE_CACHE=str(cache))
    runs = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        runs.append(run_ok(base_args(cifar_dir, "--max-steps", "2"), tmp_path / name, env=env))
    said = [re.search(r"convolutions \(--conv-algorithm auto\): (.*) \((.*)\)$", run.stdout, re.M) for run in runs]
    assert all(said), "\n".join(map(str, runs))
    assert re.fullmatch(rf"3 shape\(s\) measured now in [\d.]+ s, the rest from {re.escape(str(cache))}",
                        said[0].group(2)), said[0].group(0)
    assert said[1].group(2) == f"all from {cache}" and said[1].group(1) == said[0].group(1)
    assert TrainConfig().conv_algorithm == TrainConfig().affine_dx == "auto"
    entries = json.loads(cache.read_text())[machine_key()]
    assert len(entries) == 3  # the 7x7 conv (no dx: it takes the data) and both affine weights, at 32 images
    threads = int(re.search(r"x (\d+) BLAS thread", runs[0].stdout).group(1))
    dx = {name: entries[dx_signature(32, shape, "float32", threads)]["choice"]
          for name, shape in (("W2", (32 * 16 * 16, 16)), ("W3", (16, 10)))}
    assert read_checkpoint(tmp_path / "second" / CKPT)["attrs"]["layer_choices"]["dx"] == dx


def test_a_resume_may_name_where_the_data_is_now(tmp_path):
    """--data given again on a resume names the data set's new place (moved, another machine, an
    old checkpoint that stored none); any other option must still agree. --stages given again
    with a ConvNet checkpoint is checked against the checkpoint's model, not the default."""
    from dpnet.train.config import check_layout_options
    from dpnet.train.resume import restore_settings
    ckpt = tmp_path / "ck.h5"
    ckpt.write_bytes(b"")  # validate() asks only that the file exists
    stored = {**dataclasses.asdict(TrainConfig(model="convnet", stages="4/8", data="/old/place")), "given": None}
    for old in ("/old/place", None):
        config = parse_args(["--resume", str(ckpt), "--data", "/new/place", "--stages", "4/8"])
        validate(config, 1)  # before the checkpoint is read, its model is not known
        restored = restore_settings(config, {**stored, "data": old})
        assert (restored.data, restored.model, restored.stages) == ("/new/place", "convnet", "4/8")
        check_layout_options(restored)
    assert restore_settings(parse_args(["--resume", str(ckpt)]), stored).data == "/old/place"
    with pytest.raises(ConfigError, match="--stages 4/16 does not match the checkpoint's 4/8"):
        restore_settings(parse_args(["--resume", str(ckpt), "--stages", "4/16"]), stored)
    threelayer = restore_settings(parse_args(["--resume", str(ckpt), "--stages", "4/8"]),
                                  {**stored, "model": "threelayer"})
    with pytest.raises(ConfigError, match="--stages does not apply to --model threelayer"):
        check_layout_options(threelayer)

