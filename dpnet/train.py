"""`python -m dpnet.train`: data-parallel training of a dpnet CNN on CIFAR-10.

    mpirun -n 4 python -m dpnet.train          # the main job, 4 ranks
    python -m dpnet.train                      # one process (debugging), same code path
    python -m dpnet.train --simulate-ranks 4   # 4 logical ranks in one process

Behaviour lives in TrainConfig and train(config, comm); the command line is a thin
layer over them (`--help` lists every option; a TOML --config file takes the same keys).
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import __version__
from .augment import random_crop_flip
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DataError, load_dataset, make_synthetic
from .models import ConvNet, ThreeLayerConvNet
from .optim import get_update_rule
from .parallel import (REDUCTIONS, DataParallel, SimComm, get_comm, launcher_rank, shard_bounds, shard_indices,
                       steps_per_epoch)

OPTIMIZERS = {"sgd": "sgd", "momentum": "sgd_momentum", "nesterov": "sgd_nesterov_momentum",
              "rmsprop": "rmsprop", "adam": "adam"}
DATA_ENV = "DPNET_DATA"


def default_data_places():
    """Where a data set is looked for when --data is not given, in order."""
    places = []
    if os.environ.get(DATA_ENV):
        places.append(os.environ[DATA_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    places.append(os.path.join(cache, "dpnet", "cifar-10-batches-py"))
    return places


@dataclass
class TrainConfig:
    """Every option of a training run (the command-line flags, with - for _); OPTION_HELP
    says what each means."""
    data: Optional[str] = None
    model: str = "threelayer"
    bn_mode: str = "sync"
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    batch_size: int = 128
    val_size: int = 1000
    lr: float = 1e-3
    lr_decay: float = 1.0
    lr_schedule: str = "cosine"
    optimizer: str = "adam"
    reg: float = 1e-3
    hidden_dim: int = 500
    seed: int = 0
    dtype: str = "float32"
    augment: bool = True
    threads: Optional[int] = None
    checkpoint: str = "dpnet_run/checkpoint.h5"
    resume: Optional[str] = None
    metrics: str = "dpnet_run/metrics.jsonl"
    simulate_ranks: Optional[int] = None
    check_every: int = 50
    reduction: str = "auto"
    bucket_mb: float = 0.0
    timeout: float = 300.0
    progress: bool = True


OPTION_HELP = {
    "data": f"cifar-10-batches-py folder, or a .h5 from `python -m dpnet.data prepare` "
            f"(default: ${DATA_ENV}, then ~/.cache/dpnet; else a synthetic set)",
    "model": "network to train",
    "bn_mode": "batchnorm: none, per-rank statistics (local) or the global batch's (sync)",
    "epochs": "total epochs (default: 10 on CIFAR-10, 3 on the synthetic set)",
    "max_steps": "stop after this many optimizer steps in all",
    "batch_size": "global batch, over all ranks",
    "val_size": "training images held out for validation",
    "lr": "learning rate",
    "lr_decay": "with --lr-schedule step: multiply the rate by this after every epoch",
    "lr_schedule": "cosine over --epochs, or step (see --lr-decay)",
    "optimizer": "update rule",
    "reg": "L2 strength: the loss adds 0.5 * reg * sum(W^2)",
    "hidden_dim": "units of the hidden affine layer",
    "seed": "seeds initialisation, shuffling, and (with the rank) augmentation and dropout",
    "dtype": "dtype of parameters and activations",
    "augment": "random crop + horizontal flip of training images",
    "threads": "BLAS threads per rank (default: cores / ranks on this node)",
    "checkpoint": "HDF5 file written atomically after every epoch and at the end ('': none)",
    "resume": "continue from this checkpoint",
    "metrics": "JSON-lines file of per-epoch metrics ('': none)",
    "simulate_ranks": "without mpirun: run this many logical ranks as threads of one process",
    "check_every": "compare parameter checksums across ranks every this many steps (0: never)",
    "reduction": "how ranks sum gradients: node-local shared memory (auto picks it when it can) or MPI Allreduce",
    "bucket_mb": "with allreduce: reduce buckets of this many MiB during backward (0: once, after it)",
    "timeout": "seconds one step may take, waiting for other ranks included, before the job is aborted",
    "progress": "progress bar on rank 0 (shown only on a terminal)",
}


class ConfigError(ValueError):
    """An option has an impossible value."""


class StartupError(ValueError):
    """Some rank could not start (bad data or checkpoint on that rank); every rank raises it."""


def on_every_rank(comm, fn):
    """Run fn() on every rank. If it fails on any rank with a user error (bad config, data or
    checkpoint), every rank raises StartupError naming the ranks, so none is left waiting in a
    collective the failed rank will never join."""
    try:
        result, error = fn(), None
    except (ConfigError, DataError, CheckpointError) as exc:
        result, error = None, str(exc)
    errors = comm.allgather_obj(error)
    failed = [rank for rank, message in enumerate(errors) if message is not None]
    if failed:
        message = errors[failed[0]]
        if len(failed) < comm.size:
            message = f"on rank(s) {failed}: {message}"
        raise StartupError(message)
    return result


class NonFiniteLoss(FloatingPointError):
    """The global loss became inf or nan (every rank sees it at the same step)."""


CHOICES = {"model": ("threelayer", "convnet"), "bn_mode": ("none", "local", "sync"),
           "lr_schedule": ("cosine", "step"), "optimizer": tuple(OPTIMIZERS),
           "dtype": ("float32", "float64"), "reduction": REDUCTIONS}


def validate(config, world_size):
    """Raise ConfigError naming the first impossible option."""
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            raise ConfigError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}, "
                              f"got {getattr(config, key)!r}")
    positive = {"batch_size": config.batch_size, "epochs": config.epochs, "max_steps": config.max_steps,
                "threads": config.threads, "simulate_ranks": config.simulate_ranks,
                "hidden_dim": config.hidden_dim}
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    if not config.lr > 0:
        raise ConfigError(f"--lr must be positive, got {config.lr}")
    if not config.lr_decay > 0:
        raise ConfigError(f"--lr-decay must be positive, got {config.lr_decay}")
    if config.reg < 0 or config.val_size < 0 or config.check_every < 0:
        raise ConfigError("--reg, --val-size and --check-every must not be negative")
    if config.bucket_mb < 0:
        raise ConfigError(f"--bucket-mb must not be negative, got {config.bucket_mb}")
    if config.simulate_ranks and config.simulate_ranks > 1 and config.reduction == "shared-memory":
        raise ConfigError("--reduction shared-memory needs MPI ranks (mpirun); "
                          "--simulate-ranks runs threads, which sum with allreduce")
    if config.bucket_mb and config.reduction == "shared-memory":
        raise ConfigError("--bucket-mb applies to --reduction allreduce (or auto) only")
    if not config.timeout > 0:
        raise ConfigError(f"--timeout must be positive, got {config.timeout}")
    if config.resume and not os.path.isfile(config.resume):
        raise ConfigError(f"--resume {config.resume}: no such checkpoint file")
    if config.batch_size < world_size:
        raise ConfigError(f"--batch-size {config.batch_size} is smaller than the {world_size} ranks: "
                          "every rank needs at least one example per step")


def load_data(config):
    """(data dict, description, synthetic?) for the run."""
    explicit = config.data or os.environ.get(DATA_ENV)  # named by the user: must exist
    if explicit:
        return load_dataset(explicit), f"CIFAR-10 from {explicit}", False
    for place in default_data_places():
        if os.path.exists(place):
            return load_dataset(place), f"CIFAR-10 from {place}", False
    return make_synthetic(seed=config.seed), "SYNTHETIC data (no CIFAR-10 found)", True


def split_train_val(data, val_size, seed):
    """Take val_size examples of the training files (a seeded choice) for validation."""
    n = len(data["x_train"])
    if val_size >= n:
        raise ConfigError(f"--val-size {val_size} leaves no training examples out of {n}")
    order = np.random.default_rng([seed, 2**31]).permutation(n)
    val, train = np.sort(order[:val_size]), np.sort(order[val_size:])
    return (data["x_train"][train], data["y_train"][train]), (data["x_train"][val], data["y_train"][val])


def channel_stats(x, chunk=1024):
    """Per-channel mean and std of uint8 images (N, C, H, W), in float64, chunk by chunk."""
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].astype(np.float64)
        total += part.sum(axis=(0, 2, 3))
        squares += np.square(part).sum(axis=(0, 2, 3))
    count = len(x) * x.shape[2] * x.shape[3]
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean ** 2, 1e-12))


def build_model(config, comm):
    dtype = np.dtype(config.dtype)
    use_bn = config.bn_mode != "none"
    bn_mode = config.bn_mode if use_bn else "local"
    if config.model == "threelayer":
        return ThreeLayerConvNet(hidden_dim=config.hidden_dim, weight_scale="he", reg=config.reg,
                                 dtype=dtype, use_batchnorm=use_bn, bn_mode=bn_mode, comm=comm,
                                 seed=config.seed)
    return ConvNet(hidden_dims=(config.hidden_dim,), reg=config.reg, dtype=dtype, use_batchnorm=use_bn,
                   bn_mode=bn_mode, comm=comm, seed=config.seed)


def evaluate(model, comm, x, y, to_input, chunk=500):
    """Accuracy on (x, y): each rank scores its contiguous share, counts are summed."""
    lo, hi = shard_bounds(len(x), comm.size, comm.rank)
    correct = 0
    for i in range(lo, hi, chunk):
        stop = min(i + chunk, hi)
        correct += int((model.scores(to_input(x[i:stop])).argmax(axis=1) == y[i:stop]).sum())
    counts = comm.allreduce(np.array([correct, hi - lo], dtype=np.int64))
    return float(counts[0] / counts[1]) if counts[1] else None  # None: an empty set (--val-size 0)


def learning_rate(config, step, total_steps, epoch):
    if config.lr_schedule == "cosine":
        return 0.5 * config.lr * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    return config.lr * config.lr_decay ** epoch


def blas_threads(config, comm):
    if config.threads:
        return config.threads
    local = int(os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or comm.size)
    return max(1, (os.cpu_count() or 1) // max(local, 1))


class Printer:
    """Writes only on rank 0."""

    def __init__(self, comm):
        self.active = comm.rank == 0

    def __call__(self, *args):
        if self.active:
            print(*args, flush=True)


_stop_signal = threading.Event()  # set by SIGTERM; every logical rank votes to stop


def train(config, comm):
    """Train as `config` says on the ranks of `comm`; returns the final metrics dict."""
    from threadpoolctl import threadpool_limits

    on_every_rank(comm, lambda: validate(config, comm.size))  # e.g. --resume missing on one node
    say = Printer(comm)
    data, source, synthetic = on_every_rank(comm, lambda: load_data(config))
    epochs = config.epochs or (3 if synthetic else 10)
    if synthetic:
        say("=" * 72 + f"\n  {source}: training on a synthetic CIFAR-shaped set, not real images.\n"
            f"  Pass --data PATH or set {DATA_ENV}; `python -m dpnet.data download` fetches CIFAR-10.\n"
            + "=" * 72)
    (x_train, y_train), (x_val, y_val) = on_every_rank(
        comm, lambda: split_train_val(data, config.val_size, config.seed))
    mean, std = channel_stats(x_train)
    dtype = np.dtype(config.dtype)
    shift, scale = mean.astype(dtype)[:, None, None], (1 / std).astype(dtype)[:, None, None]

    def to_input(xb):  # uint8 (n, C, H, W) -> normalised dtype, one minibatch at a time
        out = xb.astype(dtype)
        out -= shift
        out *= scale
        return out

    model = build_model(config, comm)
    dp = DataParallel(model, comm, seed=config.seed, check_every=config.check_every,
                      timeout=config.timeout, bucket_bytes=int(config.bucket_mb * 2**20) or None,
                      reduction=config.reduction)
    update_rule = get_update_rule(OPTIMIZERS[config.optimizer])
    optim_config = {"learning_rate": config.lr}
    rngs = {"augment": np.random.default_rng([config.seed, comm.rank, 1])}
    if model.dropout_param is not None:
        rngs["dropout"] = model.dropout_param["rng"]
    per_epoch = steps_per_epoch(len(x_train), config.batch_size)
    schedule_steps = epochs * per_epoch  # the lr schedule spans --epochs; --max-steps only stops early
    total_steps = min(schedule_steps, config.max_steps or schedule_steps)
    step = 0
    if config.resume:
        with dp.writing_parameters():  # rank 0's checkpoint becomes everyone's
            optim_config, attrs = on_every_rank(comm, lambda: load_checkpoint(config.resume, model, dp.flat))
        step = attrs["step"]
        if attrs["world_size"] == comm.size and len(attrs["rng_states"]) == comm.size:
            for name, state in attrs["rng_states"][comm.rank].items():
                rngs[name].bit_generator.state = state
        say(f"resumed from {config.resume} at step {step} (epoch {step // per_epoch}), "
            f"written by {attrs['world_size']} rank(s)")
    threads = blas_threads(config, comm)
    say(f"dpnet {__version__}: {config.model} (bn {config.bn_mode}), {comm.size} rank(s) x {threads} "
        f"BLAS thread(s); {source}: {len(x_train)} train / {len(x_val)} val / {len(data['x_test'])} test; "
        f"{epochs} epochs of {per_epoch} steps, global batch {config.batch_size}")
    if comm.size > 1:
        fallback = f" (shared memory unavailable: {dp.why_not_shared_memory})" if dp.why_not_shared_memory else ""
        say(f"gradients: {dp.flat.buffer.nbytes / 2**20:.1f} MiB per step, summed by {dp.reduction}{fallback}")
    metrics_file = None
    if comm.rank == 0 and config.metrics:
        os.makedirs(os.path.dirname(os.path.abspath(config.metrics)), exist_ok=True)
        metrics_file = open(config.metrics, "a" if config.resume else "w")

    def save():
        states = comm.allgather_obj({k: r.bit_generator.state for k, r in rngs.items()})
        if comm.rank == 0 and config.checkpoint:
            save_checkpoint(config.checkpoint, model, optim_config, step // per_epoch, step,
                            dataclasses.asdict(config), comm.size, states, dp.flat)

    summary, stopped = {}, False
    with threadpool_limits(threads, user_api="blas"):
        while step < total_steps and not stopped:
            epoch, skip = divmod(step, per_epoch)
            shards = shard_indices(len(x_train), config.batch_size, comm.rank, comm.size, config.seed, epoch)
            bar = _progress(config, comm, len(shards), skip, epoch, epochs)
            started, comm_before = time.perf_counter(), dp.comm_seconds
            loss_sum, seen = 0.0, 0
            for i in range(skip, len(shards)):
                if step >= total_steps:
                    break
                idx = shards[i]
                global_len = min(config.batch_size, len(x_train) - i * config.batch_size)
                xb = to_input(x_train[idx])
                if config.augment:
                    xb = random_crop_flip(xb, rngs["augment"])
                optim_config["learning_rate"] = learning_rate(config, step, schedule_steps, epoch)
                if _stop_signal.is_set():
                    dp.request_stop()
                xb = _fault_injection(comm.rank, step, xb)
                loss, _ = dp.loss(xb, y_train[idx], global_batch_size=global_len)
                _fault_injection(comm.rank, step, None, after_loss=True)
                if not math.isfinite(loss):
                    raise NonFiniteLoss(f"the loss is {loss} at step {step} (epoch {epoch + 1}); "
                                        "stopping, the last checkpoint is kept")
                dp.step(update_rule, optim_config)
                step += 1
                loss_sum += loss * global_len
                seen += global_len
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{seen / (time.perf_counter() - started):.0f}")
                if dp.stop_agreed:
                    stopped = True
                    break
            seconds = time.perf_counter() - started
            if bar is not None:
                bar.close()
            if stopped:
                break
            dp.average_running_stats()
            train_acc = evaluate(model, comm, x_train[:1000], y_train[:1000], to_input)
            val_acc = evaluate(model, comm, x_val, y_val, to_input)
            summary = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(seen, 1),
                       "train_acc": train_acc, "val_acc": val_acc, "images_per_s": seen / seconds,
                       "comm_fraction": (dp.comm_seconds - comm_before) / seconds, "seconds": seconds,
                       "synthetic": synthetic}
            say(f"epoch {epoch + 1}/{epochs}: loss {summary['train_loss']:.4f}, train acc {_fraction(train_acc)}, "
                f"val acc {_fraction(val_acc)}, {summary['images_per_s']:.0f} img/s, "
                f"comm {100 * summary['comm_fraction']:.1f}%")
            if metrics_file:
                metrics_file.write(json.dumps(summary) + "\n")
                metrics_file.flush()
            save()
        dp.average_running_stats()
        save()
        dp.close()
        if stopped:
            say(f"stop requested (SIGTERM): checkpoint saved at step {step}; continue with "
                f"--resume {config.checkpoint}")
            if metrics_file:
                metrics_file.close()
            return {**summary, "stopped": True, "step": step}
        test_acc = evaluate(model, comm, data["x_test"], data["y_test"], to_input)
    final = {"final": True, "step": step, "test_acc": test_acc, "synthetic": synthetic}
    say(f"test accuracy {test_acc:.4f}" + (" (synthetic data)" if synthetic else "")
        + (f"; checkpoint {config.checkpoint}" if config.checkpoint else ""))
    if metrics_file:
        metrics_file.write(json.dumps(final) + "\n")
        metrics_file.close()
    return {**summary, **final}


def _fraction(value):
    return "n/a" if value is None else f"{value:.3f}"


def _progress(config, comm, total, done, epoch, epochs):
    if not config.progress or comm.rank != 0:
        return None
    from tqdm import tqdm
    # disable=None: no bar when stderr is not a terminal (a log file, a batch job)
    return tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr,
                disable=None)


FAULT_ENV = "DPNET_FAULT"


def _fault_injection(rank, step, xb, after_loss=False):
    """For tests: DPNET_FAULT=RANK:STEP:KIND makes RANK fail at STEP with KIND one of
    raise (an exception), exit (os._exit(3)), hang (sleep forever), nan (NaN inputs,
    hence a NaN global loss), all before the step's loss, or hang-update (sleep forever
    after the gradient sum, before the update; called with after_loss=True).
    Returns the batch, poisoned for nan."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return xb
    try:
        fault_rank, fault_step, kind = spec.split(":")
        fault_rank, fault_step = int(fault_rank), int(fault_step)
    except ValueError:
        raise ConfigError(f"{FAULT_ENV} must be RANK:STEP:KIND, got {spec!r}") from None
    if rank != fault_rank or step != fault_step or after_loss != (kind == "hang-update"):
        return xb
    if kind in ("hang", "hang-update"):
        while True:
            time.sleep(60)
    if kind == "raise":
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")
    if kind == "exit":
        os._exit(3)
    if kind == "nan":
        return np.full_like(xb, np.nan)
    raise ConfigError(f"{FAULT_ENV}: unknown fault kind {kind!r} (raise, exit, hang, hang-update, nan)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # reported once by main(), not by every rank
        raise ConfigError(message)


def parse_args(argv):
    """TrainConfig from command-line flags and an optional --config TOML file (flags win)."""
    parser = _Parser(prog="python -m dpnet.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="TOML file whose keys are the options below")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        helptext = f"{OPTION_HELP[f.name]} (default: {default})" if default not in (None, "") else OPTION_HELP[f.name]
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            choices = CHOICES.get(f.name)
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            parser.add_argument(flag, type=_option_type(f, default), default=None, metavar=metavar,
                                choices=choices, help=helptext)
    args = parser.parse_args(argv)
    values = {}
    if args.config:
        values.update(_read_toml(args.config))
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return TrainConfig(**values)


def _option_type(field, default):
    """The Python type of a TrainConfig field (int, float, str or bool), Optional[...] unwrapped."""
    name = (type(default).__name__ if default is not None else
            str(field.type).replace("typing.Optional[", "").rstrip("]").replace("Optional[", ""))
    return {"int": int, "float": float, "str": str, "bool": bool}.get(name, str)


def _read_toml(path):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from exc
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {', '.join(unknown)}")
    defaults = TrainConfig()
    for key, value in values.items():
        kind = _option_type(fields[key], getattr(defaults, key))
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, str))
        if not ok:
            raise ConfigError(f"--config {path}: {key} must be {kind.__name__}, got {value!r}")
    return values


# Abort kills the launcher's output forwarding too: give it a moment to pass the report on.
ABORT_GRACE_SECONDS = 0.5


def install_abort_hook(comm):
    """Under MPI, an uncaught exception on any rank prints that rank's traceback and aborts
    the whole job (otherwise the other ranks wait forever in their next collective)."""
    def hook(kind, value, tb):
        sys.stderr.write(f"[rank {comm.rank}] uncaught exception, aborting all {comm.size} ranks:\n"
                         + "".join(traceback.format_exception(kind, value, tb)))
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_SECONDS)
        comm.abort(1)
    sys.excepthook = hook


def main(argv=None):
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: _stop_signal.set())
        if config.simulate_ranks:
            validate(config, config.simulate_ranks)
            SimComm(config.simulate_ranks).run(lambda c: train(config, c))
            return 0
        comm = get_comm()
        if comm.size > 1:
            install_abort_hook(comm)
        train(config, comm)
        return 0
    except (ConfigError, DataError, CheckpointError, StartupError) as exc:
        if launcher_rank() == 0:
            print(f"python -m dpnet.train: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:  # raised on every rank at the same step: no abort needed
        if launcher_rank() == 0:
            print(f"python -m dpnet.train: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
