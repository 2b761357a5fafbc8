"""The images a run trains on: where the data set is found, the validation split, and how a
minibatch of uint8 images becomes the network's input (normalised, then augmented)."""

import os

import numpy as np

from ..augment import random_crop_flip
from ..data import load_dataset, make_synthetic
from .config import DATA_ENV, ConfigError


def default_data_places():
    """Where a data set is looked for when --data is not given, in order."""
    places = []
    if os.environ.get(DATA_ENV):
        places.append(os.environ[DATA_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    places.append(os.path.join(cache, "dpnet", "cifar-10-batches-py"))
    return places


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


def training_batch(x, idx, to_input, augment_rng=None):
    """The network's input for the training images x[idx]: normalised, then randomly cropped
    and flipped with augment_rng (None: not augmented)."""
    xb = to_input(x[idx])
    if augment_rng is not None:
        xb = random_crop_flip(xb, augment_rng)
    return xb
