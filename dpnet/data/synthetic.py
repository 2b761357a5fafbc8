"""A synthetic CIFAR-shaped data set that a CNN can learn, for machines with no data.

Each class is a smooth random colour pattern; an example is its class pattern,
shifted by a few pixels, scaled in contrast, plus pixel noise, stored as uint8
(N, 3, 32, 32). Fully determined by the seed.
"""

import numpy as np

LABEL_NAMES = [f"pattern{i}" for i in range(10)]


def _smooth_patterns(rng, classes, size=32):
    """(classes, 3, size, size) low-frequency patterns in [-1, 1]."""
    coarse = rng.standard_normal((classes, 3, 4, 4))
    fine = coarse.repeat(size // 4, axis=2).repeat(size // 4, axis=3)
    kernel = np.ones(5) / 5  # blur the blocks into smooth blobs
    for axis in (2, 3):
        fine = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, fine)
    return fine / np.abs(fine).max(axis=(1, 2, 3), keepdims=True)


def make_synthetic(num_train=5000, num_test=1000, seed=0, noise=2.5):
    """Dict like load_cifar10's: x_train, y_train, x_test, y_test, label_names."""
    rng = np.random.default_rng(seed)
    patterns = _smooth_patterns(rng, len(LABEL_NAMES))

    def sample(n):
        y = rng.integers(0, len(LABEL_NAMES), n)
        shifts = rng.integers(-3, 4, size=(n, 2))
        x = patterns[y] * rng.uniform(0.6, 1.0, size=(n, 1, 1, 1))
        for i, (dy, dx) in enumerate(shifts):  # data generation, not a training hot path
            x[i] = np.roll(x[i], (dy, dx), axis=(1, 2))
        x += noise * rng.standard_normal(x.shape)
        return np.clip(128 + 60 * x, 0, 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = sample(num_train)
    x_test, y_test = sample(num_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
            "label_names": list(LABEL_NAMES)}
