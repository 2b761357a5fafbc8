"""What a resumed run takes from its checkpoint: the settings that define the run.

A checkpoint stores the run's TrainConfig. Resuming restores RESTORED from it, so that
forgetting --data or --optimizer cannot silently continue another run; an option given
again must agree with the stored value. With --reset-optimizer the optimizer's settings
(OPTIMIZER_SETTINGS) may change, and the optimizer starts afresh.
"""

import dataclasses
import json
import os

from ..checkpoint import CheckpointError
from .config import ConfigError

RESTORED = ("data", "model", "bn_mode", "hidden_dim", "stages", "dtype", "batch_size", "val_size", "seed", "augment",
            "optimizer", "lr", "lr_schedule", "lr_decay", "lr_scaling", "warmup_epochs", "reg", "reproducible",
            "micro_shards", "conv_algorithm", "affine_dx")
OPTIMIZER_SETTINGS = ("optimizer", "lr", "lr_schedule", "lr_decay", "lr_scaling", "warmup_epochs")


def stored_config(path):
    """The TrainConfig (as a dict) that a checkpoint was written with."""
    import h5py
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs["config"])
    except Exception as exc:  # h5py raises OSError/KeyError/... for corrupt or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc


def stored_layer_choices(path):
    """How the checkpoint's run computed its choosable layers (Model.layer_choices()), or None
    for a checkpoint that does not say."""
    import h5py
    stored_config(path)  # the same errors for a missing or foreign file
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["layer_choices"]) if "layer_choices" in f.attrs else None


def stored_train_config(path):
    """The TrainConfig a checkpoint was written with (its options; unknown keys ignored)."""
    from .config import TrainConfig, option_fields
    known = {f.name for f in option_fields()}
    return TrainConfig(**{k: v for k, v in stored_config(path).items() if k in known})


def restore_settings(config, stored):
    """config with the RESTORED settings of the checkpoint's `stored` config; ConfigError naming
    the setting and both values where an option given again (config.given) disagrees, but
    --data, which may name another copy of the data set."""
    changes = {}
    new_optimizer = (config.reset_optimizer and "optimizer" in config.given
                     and config.optimizer != stored.get("optimizer"))
    for key in RESTORED:
        if key not in stored:
            continue
        if key == "lr" and new_optimizer and key not in config.given:
            continue  # the old optimizer's rate is not the new one's: the recipe chooses (recipes.py)
        if key == "data" and key in config.given:
            continue  # where the images are now (another copy, another machine): the user's word
        mine, theirs = getattr(config, key), stored[key]
        if key in config.given and mine != theirs:
            if config.reset_optimizer and key in OPTIMIZER_SETTINGS:
                continue  # a deliberate change: the optimizer starts afresh
            flag = "--" + key.replace("_", "-")
            hint = " or pass --reset-optimizer" if key in OPTIMIZER_SETTINGS else ""
            raise ConfigError(f"{flag} {mine} does not match the checkpoint's {theirs} ({config.resume}): "
                              f"leave {flag} out to continue the run as it was{hint}")
        changes[key] = theirs
    if config.epochs is None and stored.get("epochs"):  # the total the run was started with
        changes["epochs"] = stored["epochs"]
    return dataclasses.replace(config, **changes)
