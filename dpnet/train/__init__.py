"""`python -m dpnet.train`: data-parallel training of a dpnet CNN on CIFAR-10.

    mpirun -n 4 python -m dpnet.train          # the main job, 4 ranks
    python -m dpnet.train                      # one process (debugging), same code path
    python -m dpnet.train --simulate-ranks 4   # 4 logical ranks in one process

Behaviour lives in TrainConfig and train(config, comm); the command line is a thin
layer over them (`--help` lists every option; a TOML --config file takes the same keys).

    config.py   TrainConfig, what each option means, validate()
    inputs.py   the data set, the validation split, normalisation and augmentation
    loop.py     Trainer: model, DataParallel, resume, the epochs, evaluation, checkpoints
    cli.py      flags and TOML -> TrainConfig; main(): exit statuses, abort hook, SIGTERM
    faults.py   DPNET_FAULT, failures injected for the tests
"""

from .cli import install_abort_hook, main, parse_args
from .config import CHOICES, DATA_ENV, OPTIMIZERS, OPTION_HELP, ConfigError, TrainConfig, validate
from .faults import FAULT_ENV
from .inputs import channel_stats, default_data_places, load_data, split_train_val
from .loop import (NonFiniteLoss, StartupError, Trainer, build_model, build_update_rule, evaluate, learning_rate,
                   on_every_rank, train)

__all__ = [
    "TrainConfig", "OPTION_HELP", "CHOICES", "OPTIMIZERS", "ConfigError", "validate",
    "DATA_ENV", "default_data_places", "load_data", "split_train_val", "channel_stats",
    "Trainer", "train", "build_model", "build_update_rule", "evaluate", "learning_rate", "on_every_rank",
    "StartupError", "NonFiniteLoss", "FAULT_ENV", "parse_args", "main", "install_abort_hook",
]
