"""The training run: Trainer sets up the model, DataParallel and the data (resuming from a
checkpoint if asked), then runs the epochs: steps, evaluation, metrics and checkpoints.
train(config, comm) is the whole of it in one call."""

import dataclasses
import json
import math
import os
import tempfile
import threading
import time

import numpy as np

from .. import __version__
from ..atomic import remove_stale_temporaries
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint, step_checkpoint_path, step_checkpoints
from ..data import DataError
from ..models import ConvNet, ResNet, ThreeLayerConvNet
from ..models.base import parse_layer_choices
from ..models.resnet import DEPTHS as RESNET_DEPTHS
from ..optim import get_update_rule
from ..parallel import DataParallel, ReducerUnavailable, shard_bounds, shard_indices, steps_per_epoch
from ..parallel.shm_leftovers import remove_stale
from ..parallel.watchdog import make_guard
from ..scaling import run_prediction
from .config import (DATA_ENV, OPTIMIZERS, REFERENCE_BATCH, REPRODUCIBLE_BITS_OF, ConfigError, check_layout_options,
                     parse_stages, validate)
from .cpus import blas_threads
from .faults import fault_spec, inject_fault, inject_part_fault, inject_start_fault
from .inputs import (SYNTHETIC, RankAugmentation, StepAugmentation, load_data, normaliser, split_train_val,
                     training_batch)
from .progress import progress
from .ranks import write_rank_map
from .recipes import default_epochs, with_recipe
from .resume import restore_settings, stored_config, stored_layer_choices
from .scoring import accuracy, confusion_matrix

class StopRequest:
    """Set by SIGTERM or SIGINT (`signal`: the first one's name): every rank votes to stop, and
    all stop at the same step."""

    def __init__(self):
        self._event = threading.Event()
        self.signal = None

    def set(self, name):
        self.signal = self.signal or name
        self._event.set()

    def is_set(self):
        return self._event.is_set()


stop_signal = StopRequest()
KEEP_STEP_CHECKPOINTS = 3  # --checkpoint-every keeps this many of its newest files


class StartupError(ValueError):
    """Some rank could not start (bad data or checkpoint on that rank); every rank raises it."""


class NonFiniteLoss(FloatingPointError):
    """The global loss became inf or nan (every rank sees it at the same step)."""


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


class Printer:
    """Writes only on rank 0."""

    def __init__(self, comm):
        self.active = comm.rank == 0

    def __call__(self, *args):
        if self.active:
            print(*args, flush=True)


class MetricsLog:
    """The JSON-lines metrics file, opened at the first record: a run that never finishes an
    epoch leaves an earlier file as it was. append: continue it (a resumed run)."""

    def __init__(self, path, append):
        self.path, self.mode, self.file = path, "a" if append else "w", None

    def write(self, text):
        if self.file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.file = open(self.path, self.mode)
        self.file.write(text)

    def flush(self):
        if self.file is not None:
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


def output_exists(option, path):
    """True if --option's file is there: for the checkpoint, also any of its step checkpoints."""
    return os.path.exists(path) or (option == "checkpoint" and bool(step_checkpoints(path)))


def check_outputs(config):
    """Raise ConfigError unless the checkpoint's and the metrics' folders can be written (before
    any training, rather than after an epoch of it), and unless this run would replace another
    run's files without --resume (continuing them) or --overwrite."""
    same_run = [config.checkpoint] + [f for _, f in step_checkpoints(config.checkpoint or "")]
    continuing = {"checkpoint": bool(config.resume) and os.path.abspath(config.resume) in map(os.path.abspath, same_run),
                  "metrics": bool(config.resume)}
    for option, path in (("checkpoint", config.checkpoint), ("metrics", config.metrics)):
        if not path:
            continue
        if output_exists(option, path) and not continuing[option] and not config.overwrite:
            what = f"--{option} {path} exists" if os.path.exists(path) else f"step checkpoints of --{option} {path} exist"
            raise ConfigError(f"{what} (an earlier run's): continue that run with --resume, "
                              f"choose another --{option}, or pass --overwrite to replace it")
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".dpnet-probe-")
            os.close(fd)
            os.remove(probe)
        except OSError as exc:
            raise ConfigError(f"--{option} {path}: cannot write to {folder} ({exc.strerror})") from None
    if config.checkpoint:
        remove_stale_temporaries(config.checkpoint)  # what writers killed mid-write left
        if config.overwrite and not config.resume:  # an earlier run's step checkpoints are not this run's
            for _, old in step_checkpoints(config.checkpoint):
                os.remove(old)


def build_update_rule(config):
    """The update rule (dpnet.optim) of config's optimizer, its recipe's where unset."""
    return get_update_rule(OPTIMIZERS[with_recipe(config).optimizer])


def build_model(config, comm):
    """The network config describes (its recipe filling unset layout options), on comm's rank,
    with its fixed layer choices (auto ones are the Trainer's to measure)."""
    config = with_recipe(config)
    model = _network(config, comm)
    if config.affine_dx != "auto":
        model.set_dx_forms({name: config.affine_dx for name, _ in model.affine_weights()})
    return model


def _network(config, comm):
    dtype = np.dtype(config.dtype)
    use_bn = config.bn_mode != "none"
    bn_mode = config.bn_mode if use_bn else "local"
    # with batchnorm, He initialisation; without, PyTorch's default: He's larger weights with Adam
    # blow up the first steps and leave most hidden units dead (ThreeLayerConvNet, CIFAR-10 subset,
    # 10 epochs, seeds 0 and 1: 43.1% and 44.4% with He, 49.3% and 51.0% with this)
    init = "he" if use_bn else "uniform"
    fixed_algorithm = "im2col" if config.conv_algorithm == "auto" else config.conv_algorithm  # auto: Trainer tunes
    if config.model == "threelayer":
        return ThreeLayerConvNet(hidden_dim=config.hidden_dim, weight_scale=init, reg=config.reg,
                                 dtype=dtype, use_batchnorm=use_bn, bn_mode=bn_mode, comm=comm,
                                 seed=config.seed, conv_algorithm=fixed_algorithm)
    if config.model.startswith("resnet"):
        return ResNet(depth=RESNET_DEPTHS[config.model], reg=config.reg, dtype=dtype, bn_mode=bn_mode, comm=comm,
                      seed=config.seed, conv_algorithm=fixed_algorithm)
    return ConvNet(stages=parse_stages(config.stages), hidden_dims=(config.hidden_dim,), reg=config.reg, dtype=dtype,
                   use_batchnorm=use_bn, weight_scale=init, bn_mode=bn_mode, comm=comm, seed=config.seed,
                   conv_algorithm=fixed_algorithm)


def evaluate(model, comm, x, y, to_input):
    """Accuracy on (x, y), each image scored once over the ranks (None for an empty set)."""
    return accuracy(confusion_matrix(model, comm, x, y, to_input, model.num_classes))


def base_rate(config):
    """--lr, times batch / REFERENCE_BATCH under --lr-scaling linear: the rate the schedule shapes."""
    return config.lr * (config.batch_size / REFERENCE_BATCH if config.lr_scaling == "linear" else 1.0)


def rate_text(config):
    """The header's words for the rate: 'lr 0.2 (0.05 x 512 / 128, --lr-scaling linear), 2 warm-up epoch(s)'."""
    text = f"lr {base_rate(config):g}"
    if config.lr_scaling == "linear":
        text += f" ({config.lr:g} x {config.batch_size} / {REFERENCE_BATCH}, --lr-scaling linear)"
    if config.warmup_epochs:
        text += f", {config.warmup_epochs:g} warm-up epoch(s)"
    return text


def learning_rate(config, step, total_steps, epoch, steps_per_epoch=1):
    """The rate of optimizer step `step` (from 0): --lr, scaled with the global batch under
    --lr-scaling linear, shaped by the schedule (cosine over total_steps, or step decay per
    epoch) and, for the first --warmup-epochs, by a linear ramp from 0."""
    base = base_rate(config)
    if config.lr_schedule == "cosine":
        rate = 0.5 * base * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    else:
        rate = base * config.lr_decay ** epoch
    warmup_steps = config.warmup_epochs * steps_per_epoch
    return rate * min(1.0, (step + 1) / warmup_steps) if warmup_steps else rate


def measure_layer_choices(model, comm, config, examples, threads):
    """The auto layer choices of config (--conv-algorithm auto, --affine-dx auto; None for a fixed
    one), as rank 0 picks them (measured once per machine, then cached: dpnet.autotune) and every
    rank gets them: ({layer: algorithm}, {weight: form}, where they came from). Measured at the
    run's images per pass and BLAS threads `threads`; in the reproducible mode at the
    micro-shard's, one thread, and only among ways with REPRODUCIBLE_BITS_OF's bits at every
    micro-shard size an epoch of `examples` training examples gives. Collective."""
    from threadpoolctl import threadpool_limits

    from ..autotune import Tuner, tune_dx_forms, tune_model
    found = None
    if comm.rank == 0:
        if config.reproducible:
            images, threads = -(-config.batch_size // config.micro_shards), 1
            bits = REPRODUCIBLE_BITS_OF
            sizes = micro_shard_sizes(examples, config.batch_size, config.micro_shards)
        else:
            images, bits, sizes = -(-config.batch_size // comm.size), {}, ()
        tuner, start = Tuner(), time.perf_counter()
        with threadpool_limits(threads, user_api="blas"):
            conv = (tune_model(model, images, tuner, threads, bits.get("conv_algorithm"), sizes)
                    if config.conv_algorithm == "auto" else None)
            dx = (tune_dx_forms(model, images, tuner, threads, bits.get("affine_dx"), sizes)
                  if config.affine_dx == "auto" else None)
        measured = (f"{tuner.measured} shape(s) measured now in {time.perf_counter() - start:.1f} s, the rest"
                    if tuner.measured else "all")
        among = f"; only ways with the bits of {' and '.join(bits.values())}" if bits else ""
        found = (conv, dx, f"{measured} from {tuner.path}{among}")
    return comm.bcast_obj(found)


def micro_shard_sizes(examples, batch_size, micro_shards):
    """The numbers of examples (above 0) the micro-shards of an epoch's batches hold: every
    batch's cut of `batch_size`, and the last, partial batch's."""
    totals = {batch_size, examples % batch_size or batch_size}
    return sorted({hi - lo for total in totals for lo, hi in
                   (shard_bounds(total, micro_shards, m) for m in range(micro_shards))} - {0})


def runs(numbers):
    """Sorted whole numbers as runs: [1, 2, 3, 5, 7, 8] -> ['1-3', '5', '7-8']."""
    out = []
    for n in numbers:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return [f"{a}-{b}" if b > a else f"{a}" for a, b in out]


def choices_text(conv, dx):
    """What the header says of the layer choices (None: not chosen by auto), e.g.
    'convolutions (--conv-algorithm auto): im2col for layer(s) 1-3; winograd for layer(s) 4;
    affine input gradients (--affine-dx auto): plain for W5, W6'."""
    parts = []
    def layers(numbers):
        return "layer(s) " + ", ".join(runs(numbers))

    for what, choices, names in (("convolutions (--conv-algorithm auto)", conv, layers),
                                 ("affine input gradients (--affine-dx auto)", dx, ", ".join)):
        if choices is None:
            continue
        by_way = {w: sorted(k for k, c in choices.items() if c == w) for w in sorted(set(choices.values()))}
        ways = "; ".join(f"{w} for {names(ks)}" for w, ks in by_way.items())
        parts.append(f"{what}: {ways or 'none to choose for this model'}")
    return "; ".join(parts)


class Trainer:
    """One training run on the ranks of comm. Constructing it is collective: it validates
    the config, loads and splits the data, builds the model and its DataParallel and
    resumes from config.resume; run() trains and returns the final metrics dict."""

    def __init__(self, config, comm):
        on_every_rank(comm, lambda: (validate(config, comm.size), fault_spec()))  # e.g. --resume missing on one node
        self.guard = make_guard(comm, config.timeout)  # the start-up's watchdog, then DataParallel's
        try:
            with self.guard.guarding(0, "start-up"):
                self._start(config, comm)
        except (ConfigError, DataError, CheckpointError, StartupError):  # on every rank alike
            self.guard.close()
            raise

    def _start(self, config, comm):
        """Everything the constructor does once the options are known to be valid (collective)."""
        inject_start_fault(comm.rank)
        write_rank_map(comm)  # for a supervisor that reports a dead process by its PID
        if config.resume:  # the run's own settings, unless an option given again disagrees
            config = on_every_rank(comm, lambda: restore_settings(config, stored_config(config.resume)))
            on_every_rank(comm, lambda: (validate(config, comm.size), check_layout_options(config)))
        config = with_recipe(config)  # what is still unset: the model's default recipe
        if comm.size > 1:
            remove_stale()  # segments that killed MPI jobs left in /dev/shm
        self.config, self.comm = config, comm
        self.say = Printer(comm)
        self.data, source, place = on_every_rank(comm, lambda: load_data(config))
        self.synthetic = place == SYNTHETIC
        # checkpoints name the data set used (its absolute path, or synthetic): a resume or an
        # evaluation then reads the same images wherever it is started
        self.config = config = dataclasses.replace(config, data=place)
        self.epochs = default_epochs(config, self.synthetic)
        if self.synthetic:
            self.say("=" * 72 + f"\n  {source}: training on a synthetic CIFAR-shaped set, not real images.\n"
                     f"  Pass --data PATH or set {DATA_ENV}; `python -m dpnet.data download` fetches CIFAR-10.\n"
                     + "=" * 72)
        (self.x_train, self.y_train), (self.x_val, self.y_val) = on_every_rank(
            comm, lambda: split_train_val(self.data, config.val_size, config.seed))
        self.to_input = normaliser(self.x_train, np.dtype(config.dtype))

        on_every_rank(comm, lambda: check_outputs(config) if comm.rank == 0 else None)  # rank 0 writes them
        self.model = build_model(config, comm)
        self.threads = blas_threads(config, comm)
        self.tuned = self._tune() if "auto" in (config.conv_algorithm, config.affine_dx) else None
        try:
            self.dp = DataParallel(self.model, comm, seed=config.seed, check_every=config.check_every,
                                   timeout=config.timeout, bucket_bytes=int(config.bucket_mb * 2**20) or None,
                                   reduction=config.reduction, guard=self.guard,
                                   reproducible=config.micro_shards if config.reproducible else None,
                                   workers=self.threads)
        except ReducerUnavailable as exc:  # on every rank alike
            raise ConfigError(f"--reduction {config.reduction}: {exc}") from None
        self.update_rule = build_update_rule(config)
        self.optim_config = {"learning_rate": config.lr}
        self.augmentation = (StepAugmentation(config.seed, config.micro_shards, comm.size, comm.rank)
                             if config.reproducible else RankAugmentation(config.seed, comm.rank))
        self.rngs = dict(self.augmentation.streams)  # the random streams checkpoints save
        if self.model.dropout_param is not None and not config.reproducible:
            self.rngs["dropout"] = self.model.dropout_param["rng"]
        self.per_epoch = steps_per_epoch(len(self.x_train), config.batch_size)
        # the lr schedule spans --epochs; --max-steps only stops early
        self.schedule_steps = self.epochs * self.per_epoch
        self.total_steps = min(self.schedule_steps, config.max_steps or self.schedule_steps)
        self.step = 0
        if config.resume:
            self._resume()
        # the scaling model's per-step prediction for this layout: the same for every epoch
        self.prediction = run_prediction(config, self.dp, comm.size, self.threads)
        layout = (f"{comm.size} rank(s) x {self.threads} BLAS thread(s)" if not config.reproducible else
                  f"{comm.size} rank(s), reproducible: {config.micro_shards} micro-shards per batch, "
                  f"{self.threads} pass(es) at a time per rank, 1 BLAS thread each")
        self.say(f"dpnet {__version__}: {config.model} (bn {config.bn_mode}), {layout}; "
                 f"{source}: {len(self.x_train)} train / {len(self.x_val)} val / "
                 f"{len(self.data['x_test'])} test; "
                 f"{self.epochs} epochs of {self.per_epoch} steps, global batch {config.batch_size}; "
                 f"{config.optimizer} {rate_text(config)}, L2 {config.reg:g}")
        if self.tuned is not None:
            self.say(self.tuned)
        if comm.size > 1:
            why = self.dp.why_not_shared_memory
            fallback = f" (shared memory unavailable: {why})" if why else ""
            self.say(f"gradients: {self.dp.flat.buffer.nbytes / 2**20:.1f} MiB per step; "
                     f"{self.dp.reducer.describe()}{fallback}")
        self.metrics_file = None
        if comm.rank == 0 and config.metrics:
            self.metrics_file = MetricsLog(config.metrics, append=bool(config.resume))

    def _tune(self):
        """--conv-algorithm auto, --affine-dx auto: the choices of measure_layer_choices, or, for a
        reproducible run resumed from a checkpoint that names its choices, those (measuring
        nothing). Returns what to say of them."""
        comm, config = self.comm, self.config
        kept = None
        if config.reproducible and config.resume:
            kept = on_every_rank(comm, lambda: stored_layer_choices(config.resume))
        if kept is not None:
            conv, dx = parse_layer_choices(kept)
            conv = conv if config.conv_algorithm == "auto" else None
            dx = dx if config.affine_dx == "auto" else None
            source = f"the checkpoint's choices, kept in the reproducible mode: {config.resume}"
        else:
            conv, dx, source = measure_layer_choices(self.model, comm, config, len(self.x_train), self.threads)
        if conv is not None:
            self.model.set_conv_algorithms(conv)
        if dx is not None:
            self.model.set_dx_forms(dx)
        return f"{choices_text(conv, dx)} ({source})"

    def _resume(self):
        config, comm = self.config, self.comm
        with self.dp.writing_parameters():  # rank 0's checkpoint becomes everyone's
            self.optim_config, attrs = on_every_rank(
                comm, lambda: load_checkpoint(config.resume, self.model, self.dp.flat))
        if config.reset_optimizer:  # --reset-optimizer: the stored state belongs to other settings
            self.optim_config = {"learning_rate": config.lr}
        self.step = attrs["step"]
        self.dp.steps = self.step  # its watchdog and drift messages name the run's step, not one since the resume
        if attrs["world_size"] == comm.size and len(attrs["rng_states"]) == comm.size:
            for name, state in attrs["rng_states"][comm.rank].items():
                self.rngs[name].bit_generator.state = state
        self.say(f"resumed from {config.resume} at step {self.step} (epoch {self.step // self.per_epoch}), "
                 f"written by {attrs['world_size']} rank(s)" + (", fresh optimizer" if config.reset_optimizer else ""))

    def run(self):
        """Train to the last step, or to a stop every rank agreed on (SIGTERM); save a final
        checkpoint and return the metrics dict (with test_acc unless stopped)."""
        from threadpoolctl import threadpool_limits

        summary, stopped = {}, False
        # reproducible: every pass on one BLAS thread (OpenBLAS's results may change with its thread count)
        with threadpool_limits(1 if self.config.reproducible else self.threads, user_api="blas"):
            while self.step < self.total_steps:
                epoch = self.step // self.per_epoch
                stopped, loss_sum, seen, seconds, comm_before = self.train_epoch(epoch)
                if stopped:
                    break
                summary = self.end_epoch(epoch, loss_sum, seen, seconds, comm_before)
                if self.step_checkpoint_due():  # holds the epoch's end (its statistics, its metrics line)
                    self.save_step_checkpoint()
            with self.dp.guarded("checkpoint"):
                self.dp.average_running_stats()
                self.save()
            if not stopped:
                with self.dp.guarded("evaluation"):
                    test_acc = evaluate(self.model, self.comm, self.data["x_test"], self.data["y_test"],
                                        self.to_input)
            inject_part_fault(self.comm.rank, self.step, "shutdown")
            self.dp.close()
            if stopped:
                how = stop_signal.signal or "by another rank"
                saved = f"checkpoint saved at step {self.step}; continue with --resume {self.config.checkpoint}" \
                    if self.config.checkpoint else f"stopped at step {self.step}; no checkpoint (--checkpoint '')"
                self.say(f"stop requested ({how}): {saved}")
                if self.metrics_file:
                    self.metrics_file.close()
                return {**summary, "stopped": True, "step": self.step}
        final = {"final": True, "step": self.step, "test_acc": test_acc, "synthetic": self.synthetic}
        self.say(f"test accuracy {test_acc:.4f}" + (" (synthetic data)" if self.synthetic else "")
                 + (f"; checkpoint {self.config.checkpoint}" if self.config.checkpoint else ""))
        if self.metrics_file:
            self.metrics_file.write(json.dumps(final) + "\n")
            self.metrics_file.close()
        return {**summary, **final}

    def train_epoch(self, epoch):
        """The steps of `epoch` from self.step on, up to the end of the epoch, total_steps or
        an agreed stop. Returns (stopped, loss_sum, seen, seconds, comm_before): the loss summed
        over the `seen` images, the time taken, and dp.comm_seconds at the start."""
        config, comm = self.config, self.comm
        skip = self.step - epoch * self.per_epoch
        shards = shard_indices(len(self.x_train), config.batch_size, comm.rank, comm.size, config.seed, epoch,
                               micro_shards=config.micro_shards if config.reproducible else None)
        bar = _progress(config, comm, len(shards), skip, epoch, self.epochs)
        started, comm_before = time.perf_counter(), self.dp.comm_seconds
        loss_sum, seen, stopped = 0.0, 0, False
        for i in range(skip, len(shards)):
            if self.step >= self.total_steps:
                break
            idx = shards[i]
            global_len = min(config.batch_size, len(self.x_train) - i * config.batch_size)
            draws = self.augmentation.draws(self.step, len(idx), global_len) if config.augment else None
            xb = training_batch(self.x_train, idx, self.to_input, draws)
            loss = self.train_step(xb, self.y_train[idx], global_len, epoch)
            if self.step_checkpoint_due() and i < len(shards) - 1:  # at an epoch's end: after end_epoch
                self.save_step_checkpoint()
            loss_sum += loss * global_len
            seen += global_len
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{seen / (time.perf_counter() - started):.0f}")
            if self.dp.stop_agreed:
                stopped = True
                break
        seconds = time.perf_counter() - started
        if bar is not None:
            bar.close()
        return stopped, loss_sum, seen, seconds, comm_before

    def train_step(self, xb, yb, global_len, epoch):
        """One optimizer step on this rank's shard (xb, yb) of a global batch of global_len
        images; returns the global loss."""
        self.optim_config["learning_rate"] = learning_rate(self.config, self.step, self.schedule_steps, epoch,
                                                           self.per_epoch)
        if stop_signal.is_set():
            self.dp.request_stop()
        xb = inject_fault(self.comm.rank, self.step, xb)
        loss, _ = self.dp.loss(xb, yb, global_batch_size=global_len)
        inject_fault(self.comm.rank, self.step, None, after_loss=True)
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"the loss is {loss} at step {self.step} (epoch {epoch + 1}); "
                                "stopping, the last checkpoint is kept")
        self.dp.step(self.update_rule, self.optim_config)
        self.step += 1
        return loss

    def end_epoch(self, epoch, loss_sum, seen, seconds, comm_before):
        """After a whole epoch: average the batchnorm statistics, evaluate, print and record
        the epoch's metrics, save a checkpoint. Returns the metrics dict."""
        with self.dp.guarded("evaluation"):  # the watchdog ends the job if a rank never arrives
            inject_part_fault(self.comm.rank, self.step, "evaluation")
            self.dp.average_running_stats()
            train_acc = evaluate(self.model, self.comm, self.x_train[:1000], self.y_train[:1000], self.to_input)
            val_acc = evaluate(self.model, self.comm, self.x_val, self.y_val, self.to_input)
        summary = {"epoch": epoch + 1, "step": self.step, "train_loss": loss_sum / max(seen, 1),
                   "train_acc": train_acc, "val_acc": val_acc, "images_per_s": seen / seconds,
                   "comm_fraction": (self.dp.comm_seconds - comm_before) / seconds, "seconds": seconds,
                   "synthetic": self.synthetic,
                   **self.step_accounting(seen, seconds, self.dp.comm_seconds - comm_before)}
        self.say(f"epoch {epoch + 1}/{self.epochs}: loss {summary['train_loss']:.4f}, "
                 f"train acc {_fraction(train_acc)}, val acc {_fraction(val_acc)}, "
                 f"{summary['images_per_s']:.0f} img/s, comm {100 * summary['comm_fraction']:.1f}%"
                 f"{_accounting_text(summary)}")
        if self.metrics_file:
            self.metrics_file.write(json.dumps(summary) + "\n")
            self.metrics_file.flush()
        with self.dp.guarded("checkpoint"):
            self.save()
        return summary

    def step_accounting(self, seen, seconds, comm_seconds):
        """Per step of the epoch: bytes summed, seconds measured (all of it, and in communication)
        and the scaling model's prediction of both for this layout (None without a fit)."""
        steps = max(math.ceil(seen / self.config.batch_size), 1)  # only an epoch's last batch is short
        return {"bytes_per_step": int(self.dp.flat.buffer.nbytes) if self.comm.size > 1 else 0,
                "step_s": seconds / steps, "comm_s_per_step": comm_seconds / steps, **self.prediction}

    def save(self, path=None):
        """Write the checkpoint (rank 0; default --checkpoint), with every rank's generator states
        (collective)."""
        comm, config = self.comm, self.config
        inject_part_fault(comm.rank, self.step, "checkpoint")
        states = comm.allgather_obj({k: r.bit_generator.state for k, r in self.rngs.items()})
        if not any(states):
            states = []  # the reproducible mode: no stream of its own on any rank (the same at any count)
        if comm.rank == 0 and config.checkpoint:
            save_checkpoint(path or config.checkpoint, self.model, self.optim_config, self.step // self.per_epoch,
                            self.step, dataclasses.asdict(dataclasses.replace(config, epochs=self.epochs)),
                            comm.size, states, self.dp.flat, self.model.layer_choices())

    def step_checkpoint_due(self):
        every = self.config.checkpoint_every
        return bool(self.config.checkpoint and every and self.step % every == 0)

    def save_step_checkpoint(self):
        """--checkpoint-every: the checkpoint of this step beside --checkpoint, keeping the newest
        KEEP_STEP_CHECKPOINTS (collective)."""
        with self.dp.guarded("checkpoint"):
            self.save(step_checkpoint_path(self.config.checkpoint, self.step))
        if self.comm.rank == 0:
            for _, old in step_checkpoints(self.config.checkpoint)[:-KEEP_STEP_CHECKPOINTS]:
                os.remove(old)


def train(config, comm):
    """Train as `config` says on the ranks of `comm`; returns the final metrics dict."""
    return Trainer(config, comm).run()


def _accounting_text(summary):
    text = (f"; per step {summary['bytes_per_step'] / 2**20:.1f} MiB summed, "
            f"comm {1e3 * summary['comm_s_per_step']:.1f} ms, {1e3 * summary['step_s']:.1f} ms")
    if summary["predicted_step_s"] is not None:
        text += (f" (predicted: comm {1e3 * summary['predicted_comm_s']:.1f} ms, "
                 f"{1e3 * summary['predicted_step_s']:.1f} ms)")
    return text


def _fraction(value):
    return "n/a" if value is None else f"{value:.3f}"


def _progress(config, comm, total, done, epoch, epochs):
    if not config.progress or comm.rank != 0:
        return None
    return progress(total, done, f"epoch {epoch + 1}/{epochs}")
