"""The options of a training run (TrainConfig), what each means, and which values are possible."""

import math
import os
from dataclasses import dataclass, field, fields
from typing import Optional

from ..parallel import REDUCTIONS
from ..parallel.microshards import DEFAULT_MICRO_SHARDS, check_micro_shards
from .recipes import recipes_text, with_recipe

# What auto layer choices must keep in the reproducible mode: the bits of these ways
# (dpnet.autotune's bits_of), so that no timing can change a bit of the run.
REPRODUCIBLE_BITS_OF = {"conv_algorithm": "im2col", "affine_dx": "plain"}

OPTIMIZERS = {"sgd": "sgd", "momentum": "sgd_momentum", "nesterov": "sgd_nesterov_momentum",
              "rmsprop": "rmsprop", "adam": "adam"}
DATA_ENV = "DPNET_DATA"  # names the data set when --data is not given
REFERENCE_BATCH = 128  # --lr-scaling linear: --lr is the rate for a global batch of this size


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
    lr: Optional[float] = None  # None: the model's recipe (recipes.py), as for the other Optional ones below
    lr_decay: float = 1.0
    lr_schedule: str = "cosine"
    lr_scaling: str = "none"
    warmup_epochs: float = 0.0
    optimizer: Optional[str] = None
    reg: Optional[float] = None
    hidden_dim: Optional[int] = None
    stages: Optional[str] = None
    seed: int = 0
    dtype: str = "float32"
    conv_algorithm: str = "auto"
    affine_dx: str = "auto"
    augment: bool = True
    threads: Optional[int] = None
    checkpoint: str = "dpnet_run/checkpoint.h5"
    checkpoint_every: int = 0
    resume: Optional[str] = None
    reset_optimizer: bool = False
    overwrite: bool = False
    metrics: str = "dpnet_run/metrics.jsonl"
    simulate_ranks: Optional[int] = None
    check_every: int = 50
    reduction: str = "auto"
    bucket_mb: float = 0.0
    timeout: float = 300.0
    progress: bool = True
    reproducible: bool = False
    micro_shards: int = DEFAULT_MICRO_SHARDS
    # the options set explicitly (flags, TOML), which a resumed run checks against its checkpoint
    given: tuple = field(default=(), metadata={"option": False})


def option_fields():
    """The TrainConfig fields that are options (flags and TOML keys)."""
    return [f for f in fields(TrainConfig) if f.metadata.get("option", True)]


OPTION_HELP = {
    "data": f"cifar-10-batches-py folder, or a .h5 from `python -m dpnet.data prepare`, or 'synthetic' "
            f"(default: ${DATA_ENV}, then ~/.cache/dpnet; else the synthetic set)",
    "model": "network to train: the three-layer CNN, the ConvNet (--stages), vgg (the ConvNet with "
             "--stages 32,32/64,64/128 --hidden-dim 256), or a CIFAR ResNet (basic blocks of 16/32/64 channels, "
             "parameter-free shortcuts). Each has a default recipe for the options marked 'recipe': "
             + "; ".join(recipes_text()),
    "bn_mode": "batchnorm: none, per-rank statistics (local) or the global batch's (sync)",
    "epochs": "total epochs (default: the recipe's on CIFAR-10, 3 on the synthetic set)",
    "max_steps": "stop after this many optimizer steps in all",
    "batch_size": "global batch, over all ranks",
    "val_size": "training images held out for validation",
    "lr": "learning rate (default: recipe)",
    "lr_decay": "with --lr-schedule step: multiply the rate by this after every epoch",
    "lr_schedule": "cosine over --epochs, or step (see --lr-decay)",
    "lr_scaling": f"linear: --lr is the rate for a global batch of {REFERENCE_BATCH} and the run uses "
                  f"lr x batch-size / {REFERENCE_BATCH} (the linear scaling rule for large batches); none: --lr as given",
    "warmup_epochs": "raise the rate linearly from 0 over this many epochs (fractions allowed), then follow "
                     "the schedule; large global batches need a few",
    "optimizer": "update rule (default: recipe)",
    "reg": "L2 strength: the loss adds 0.5 * reg * sum(W^2) (default: recipe)",
    "hidden_dim": "units of the hidden affine layer (threelayer, convnet, vgg; default: recipe)",
    "stages": "convnet's layout: 3x3 conv filters per layer, layers of a stage separated by commas, stages by "
              "/, each stage ending in a 2x2 max pool (e.g. 32,32/64,64/128; default: recipe)",
    "seed": "seeds initialisation, shuffling, and (with the rank) augmentation and dropout",
    "dtype": "dtype of parameters and activations",
    "conv_algorithm": "how the convolutions are computed: im2col, im2col-whole (each GEMM in one BLAS call, "
                      "not cut for small-matrix kernels), winograd (Winograd F(4x4, 3x3): fewer multiplies, float32 "
                      "results differ from im2col's in the rounding, about 1e-5; for the 3x3 stride-1 convolutions "
                      "of convnet and the resnets, im2col for the others), or auto: the fastest for each layer, "
                      "measured once on this machine and cached (with --reproducible, only among the ways that "
                      "give im2col's bits: the choice never changes a bit)",
    "affine_dx": "how each affine layer's input gradient dout @ w.T is made: plain, transposed ((w @ dout.T).T, "
                 "the same products in another BLAS call; faster for few rows and a large w on some machines), or "
                 "auto: the faster for each layer, measured once on this machine and cached (with --reproducible, "
                 "only where both give the same bits)",
    "augment": "random crop + horizontal flip of training images",
    "threads": "BLAS threads per rank (default: $OPENBLAS_NUM_THREADS, $GOTO_NUM_THREADS or $OMP_NUM_THREADS "
               "where set, at most the usable CPUs, not with --reproducible; else this rank's share of the CPUs "
               "it may run on, among the ranks of its node)",
    "checkpoint": "HDF5 file written atomically after every epoch and at the end ('': none)",
    "checkpoint_every": "also save every this many optimizer steps, as CHECKPOINT-stepNNNNNNNN.h5 beside "
                        "--checkpoint, keeping the newest 3 (0: at epoch ends only)",
    "resume": "continue from this checkpoint, with its settings (data, model, optimizer, dtype, batch size, "
              "seed, schedule); options given again must agree",
    "reset_optimizer": "with --resume: start a fresh optimizer, whose settings may then differ",
    "overwrite": "replace the checkpoint and metrics of an earlier run at the same paths (else refused)",
    "metrics": "JSON-lines file of per-epoch metrics ('': none)",
    "simulate_ranks": "without mpirun: run this many logical ranks as threads of one process",
    "check_every": "compare parameter checksums across ranks every this many steps (0: never)",
    "reduction": "how ranks sum gradients: node-local shared memory (auto picks it when it can) or MPI Allreduce",
    "bucket_mb": "with allreduce: reduce buckets of this many MiB during backward (0: once, after it)",
    "timeout": "seconds one step may take, waiting for other ranks included, before the job is aborted",
    "progress": "progress bar on rank 0 (shown only on a terminal)",
    "reproducible": "the same run, bit for bit, at any number of ranks that divides --micro-shards: every "
                    "global batch is cut into that many micro-shards by position, each gets a forward and "
                    "backward pass of its own (--threads of them at once, one BLAS thread each), and every sum "
                    "over examples is made in one fixed order; local batchnorm then means per micro-shard "
                    "statistics",
    "micro_shards": "with --reproducible: micro-shards per global batch, a power of two",
}

CHOICES = {"model": ("threelayer", "convnet", "vgg", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"),
           "bn_mode": ("none", "local", "sync"),
           "lr_schedule": ("cosine", "step"), "lr_scaling": ("none", "linear"), "optimizer": tuple(OPTIMIZERS),
           "dtype": ("float32", "float64"), "conv_algorithm": ("im2col", "im2col-whole", "winograd", "auto"),
           "affine_dx": ("plain", "transposed", "auto"), "reduction": REDUCTIONS}


class ConfigError(ValueError):
    """An option has an impossible value."""


LAYOUT_OPTIONS = {"stages": ("convnet", "vgg"), "hidden_dim": ("threelayer", "convnet", "vgg")}  # models using them


def check_layout_options(config):
    """ConfigError for --stages or --hidden-dim given for a model that would ignore it."""
    for key, models in LAYOUT_OPTIONS.items():
        if key in config.given and config.model not in models:
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to --model {config.model}: "
                              f"only to {', '.join(models)}")


def parse_stages(text):
    """--stages '32,32/64,64/128' -> ((32, 32), (64, 64), (128,)); ConfigError if malformed."""
    try:
        stages = tuple(tuple(int(f) for f in stage.split(",")) for stage in text.split("/"))
    except ValueError:
        stages = ()
    if not stages or not all(stages) or min(f for stage in stages for f in stage) < 1 or len(stages) > 5:
        raise ConfigError(f"--stages must be positive filter counts, commas within a stage and / between at "
                          f"most 5 stages (each halves the 32x32 images), e.g. 32,32/64,64/128; got {text!r}")
    return stages


def validate(config, world_size):
    """Raise ConfigError naming the first impossible option (the recipe's fill the unset ones)."""
    config = with_recipe(config)  # an unknown model is left as it is, and named below
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
    if not 0 < config.lr < math.inf:
        raise ConfigError(f"--lr must be a positive finite number, got {config.lr}")
    if not 0 < config.lr_decay < math.inf:
        raise ConfigError(f"--lr-decay must be a positive finite number, got {config.lr_decay}")
    for key in ("reg", "bucket_mb", "warmup_epochs"):
        value = getattr(config, key)
        if not 0 <= value < math.inf:
            raise ConfigError(f"--{key.replace('_', '-')} must be a finite number >= 0, got {value}")
    for key in ("val_size", "check_every", "seed", "checkpoint_every"):
        if getattr(config, key) < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must not be negative, got {getattr(config, key)}")
    parse_stages(config.stages)
    if not config.resume:  # a resume's model is the checkpoint's: checked once restored
        check_layout_options(config)
    if config.model.startswith("resnet") and config.bn_mode == "none":
        raise ConfigError(f"--model {config.model} has batchnorm in every block: --bn-mode must be local or sync")
    if config.bucket_mb and config.reduction == "shared-memory":
        raise ConfigError("--bucket-mb applies to --reduction allreduce (or auto) only")
    if not config.timeout > 0:  # inf: wait forever
        raise ConfigError(f"--timeout must be positive, got {config.timeout}")
    if config.resume and not os.path.isfile(config.resume):
        raise ConfigError(f"--resume {config.resume}: no such checkpoint file")
    if config.reproducible:
        try:
            check_micro_shards(config.micro_shards, world_size)
        except ValueError as exc:
            raise ConfigError(f"--reproducible --micro-shards {config.micro_shards}: {exc}") from None
        if config.bucket_mb or config.reduction != "auto":
            raise ConfigError("--reproducible sums gradients in its own fixed order: leave out --reduction and "
                              "--bucket-mb")
    if config.batch_size < world_size:
        raise ConfigError(f"--batch-size {config.batch_size} is smaller than the {world_size} ranks: "
                          "every rank needs at least one example per step")
