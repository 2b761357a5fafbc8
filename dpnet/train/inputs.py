"""The images a run trains on: where the data set is found, the validation split, and how a
minibatch of uint8 images becomes the network's input (normalised, then augmented)."""

import os

import numpy as np

from ..augment import crop_flip, crop_flip_draws
from ..data import load_dataset, make_synthetic
from ..parallel.sharding import rank_bounds
from .config import DATA_ENV, ConfigError


def default_data_places():
    """Where a data set is looked for when --data is not given, in order."""
    places = []
    if os.environ.get(DATA_ENV):
        places.append(os.environ[DATA_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    places.append(os.path.join(cache, "dpnet", "cifar-10-batches-py"))
    return places


SYNTHETIC = "synthetic"  # --data synthetic: the synthetic set, even where CIFAR-10 is found


def load_data(config):
    """(data dict, description, place) for the run: place names the data set so that a
    checkpoint can find it again (its absolute path), or is SYNTHETIC."""
    explicit = config.data or os.environ.get(DATA_ENV)  # named by the user: must exist
    if explicit == SYNTHETIC:
        return make_synthetic(seed=config.seed), "SYNTHETIC data (--data synthetic)", SYNTHETIC
    if explicit:
        return load_dataset(explicit), f"CIFAR-10 from {explicit}", os.path.abspath(explicit)
    for place in default_data_places():
        if os.path.exists(place):
            return load_dataset(place), f"CIFAR-10 from {place}", os.path.abspath(place)
    return make_synthetic(seed=config.seed), "SYNTHETIC data (no CIFAR-10 found)", SYNTHETIC


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


def normaliser(x_train, dtype):
    """to_input(xb): uint8 images (n, C, H, W) -> dtype, less x_train's channel means, over
    their stds; one minibatch at a time, so no float copy of the whole set is made."""
    mean, std = channel_stats(x_train)
    shift, scale = mean.astype(dtype)[:, None, None], (1 / std).astype(dtype)[:, None, None]

    def to_input(xb):
        out = xb.astype(dtype)
        out -= shift
        out *= scale
        return out
    return to_input


def training_batch(x, idx, to_input, draws=None):
    """The network's input for the training images x[idx]: normalised, then cropped and flipped
    as draws = (dy, dx, flip) say (None: not augmented)."""
    xb = to_input(x[idx])
    if draws is not None:
        xb = crop_flip(xb, *draws)
    return xb


class RankAugmentation:
    """Crops and flips drawn from this rank's own stream, seeded with (seed, rank) and saved in
    checkpoints: the default mode."""

    def __init__(self, seed, rank):
        self.rng = np.random.default_rng([seed, rank, 1])
        self.streams = {"augment": self.rng}  # what a checkpoint saves and a resume restores

    def draws(self, step, count, global_len):
        return crop_flip_draws(self.rng, count)


class StepAugmentation:
    """The crops and flips of the whole global batch, drawn from (seed, step); each rank takes
    those of its examples (its micro-shards): the reproducible mode, the same at any number of
    ranks. Nothing to save: the step says it all."""

    STEP_KEY = 1 << 32  # apart from RankAugmentation's (seed, rank, 1) streams

    def __init__(self, seed, micro_shards, size, rank):
        self.seed, self.micro_shards, self.size, self.rank = seed, micro_shards, size, rank
        self.streams = {}

    def draws(self, step, count, global_len):
        start, stop = rank_bounds(global_len, self.micro_shards, self.size, self.rank)
        if stop - start != count:
            raise ValueError(f"rank {self.rank} holds {stop - start} examples of this batch, not {count}")
        everyone = crop_flip_draws(np.random.default_rng([self.seed, self.STEP_KEY, step]), global_len)
        return tuple(d[start:stop] for d in everyone)
