"""HDF5 checkpoints, written atomically: a temporary file beside the target is written,
flushed and fsynced, then renamed over it, so a crash at any moment leaves the previous
checkpoint whole.

Layout: group `params` (one dataset per model.params entry), group `optimizer`
(its scalars as attributes; each state array that spans the flat parameter buffer, such
as Adam's m and v, as a group with one dataset per parameter, so the file does not
depend on the buffer's layout), group
`batchnorm` (bn<i>/running_mean, bn<i>/running_var), and file attributes epoch
(completed epochs), step (optimizer steps taken; the sampler resumes from it), world_size,
dpnet_version, config (JSON) and rng_states (JSON: each rank's generator states).
"""

import glob
import json
import os
import re

import numpy as np

from . import __version__
from .atomic import atomic_path


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated or does not fit the model."""


def save_checkpoint(path, model, optim_config, epoch, step, config, world_size, rng_states=(), flat=None,
                    layer_choices=None):
    """Write a checkpoint atomically. flat: the dpnet.flat.FlatParams the optimizer state is
    laid out in (needed when optim_config holds state arrays); layer_choices: how the model's
    choosable layers compute (model.layer_choices())."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            params = f.create_group("params")
            for name, value in model.params.items():
                params.create_dataset(name, data=value)
            opt = f.create_group("optimizer")
            for key, value in optim_config.items():
                if key.startswith("_"):
                    continue  # scratch space, not state
                if isinstance(value, np.ndarray):
                    if flat is None or value.shape != flat.data.shape:
                        raise ValueError(f"optimizer state {key!r} must span the flat parameter buffer")
                    group = opt.create_group(key)
                    for name in flat.names:
                        group.create_dataset(name, data=flat.view(value, name))
                else:
                    opt.attrs[key] = value
            bn = f.create_group("batchnorm")
            for i, bn_param in enumerate(model.bn_params):
                g = bn.create_group(f"bn{i}")
                g.create_dataset("running_mean", data=bn_param["running_mean"])
                g.create_dataset("running_var", data=bn_param["running_var"])
            f.attrs.update({"epoch": epoch, "step": step, "world_size": world_size,
                            "dpnet_version": __version__, "config": json.dumps(config),
                            "rng_states": json.dumps(list(rng_states))})
            if layer_choices is not None:
                f.attrs["layer_choices"] = json.dumps(layer_choices)
            f.flush()


def load_checkpoint(path, model, flat=None):
    """Load params and batchnorm statistics into `model` (in place) and return
    (optim_config, attrs) where attrs has epoch, step, world_size, dpnet_version, config,
    rng_states and layer_choices (None where the checkpoint has none). Optimizer state arrays
    are laid out for `flat` (a dpnet.flat.FlatParams), or given as {parameter name: array}
    when flat is None."""
    import h5py

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("params", "optimizer", "batchnorm") if k not in f]
            if missing:
                raise CheckpointError(f"{path}: not a dpnet checkpoint (missing groups {missing})")
            stored = set(f["params"])
            if stored != set(model.params):
                raise CheckpointError(
                    f"{path}: parameters {sorted(stored)} do not match the model's {sorted(model.params)}")
            for name, value in model.params.items():
                data = f["params"][name]
                if data.shape != value.shape:
                    raise CheckpointError(f"{path}: parameter {name} has shape {data.shape}, "
                                          f"the model expects {value.shape}")
                value[...] = data[()]
            if len(f["batchnorm"]) != len(model.bn_params):
                raise CheckpointError(f"{path}: {len(f['batchnorm'])} batchnorm layers, the model has "
                                      f"{len(model.bn_params)}")
            for i, bn_param in enumerate(model.bn_params):
                for key in ("running_mean", "running_var"):
                    bn_param[key][...] = f["batchnorm"][f"bn{i}"][key][()]
            optim_config = {}
            for key, group in f["optimizer"].items():
                if set(group) != set(model.params):
                    raise CheckpointError(f"{path}: optimizer state {key} does not match the parameters")
                if flat is None:  # for inspection: one array per parameter
                    optim_config[key] = {name: group[name][()] for name in group}
                    continue
                state = np.empty_like(flat.data)
                for name in flat.names:
                    flat.view(state, name)[...] = group[name][()]
                optim_config[key] = state
            optim_config.update({k: v.item() if hasattr(v, "item") else v
                                 for k, v in f["optimizer"].attrs.items()})
            keys = ("epoch", "step", "world_size", "dpnet_version", "config", "rng_states")
            absent = [k for k in keys if k not in f.attrs]
            if absent:
                raise CheckpointError(f"{path}: not a dpnet checkpoint (missing attributes {absent})")
            attrs = {k: f.attrs[k] for k in keys}
            attrs["layer_choices"] = json.loads(f.attrs["layer_choices"]) if "layer_choices" in f.attrs else None
    except CheckpointError:
        raise
    except Exception as exc:  # h5py raises OSError/KeyError/... for corrupt or truncated files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    attrs["config"] = json.loads(attrs["config"])
    attrs["rng_states"] = json.loads(attrs["rng_states"])
    attrs["epoch"], attrs["step"], attrs["world_size"] = (int(attrs["epoch"]), int(attrs["step"]),
                                                          int(attrs["world_size"]))
    return optim_config, attrs


def step_checkpoint_path(path, step):
    """Where the checkpoint of `step` goes beside `path`: checkpoint.h5 -> checkpoint-step00000120.h5."""
    stem, ext = os.path.splitext(path)
    return f"{stem}-step{step:08d}{ext}"


def step_checkpoints(path):
    """The step checkpoints beside `path`, as [(step, file)] oldest first."""
    stem, ext = os.path.splitext(path)
    found = []
    for name in glob.glob(glob.escape(stem) + "-step" + "[0-9]" * 8 + glob.escape(ext)):
        match = re.search(r"-step(\d{8})" + re.escape(ext) + "$", name)
        found.append((int(match.group(1)), name))
    return sorted(found)


def newest_checkpoint(path, since=None):
    """(step, file) of the readable checkpoint of the run at `path` (the file itself and its
    step checkpoints) with the most optimizer steps taken, or None where there is none yet.
    since: a time (seconds since the epoch); only files written since count."""
    import h5py

    newest = None
    for candidate in [path] + [name for _, name in step_checkpoints(path)]:
        try:
            if since is not None and os.stat(candidate).st_mtime < since:
                continue
            with h5py.File(candidate, "r") as f:
                step = int(f.attrs["step"])
        except Exception:  # missing, or not (yet) a whole checkpoint
            continue
        if newest is None or step > newest[0]:
            newest = (step, candidate)
    return newest
