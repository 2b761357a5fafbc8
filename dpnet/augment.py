"""Random crop and horizontal flip, vectorised over the batch."""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def random_crop_flip(x, rng, pad=4):
    """Pad x (N, C, H, W) by `pad` zeros, take a random H x W crop per image and flip each
    image left-right with probability 1/2. Returns a new array like x."""
    return crop_flip(x, *crop_flip_draws(rng, len(x), pad), pad=pad)


def crop_flip_draws(rng, n, pad=4):
    """The random choices of random_crop_flip for n images: (dy, dx, flip), each (n,)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    return dy, dx, rng.random(n) < 0.5


def crop_flip(x, dy, dx, flip, pad=4):
    """Pad x (N, C, H, W) by `pad` zeros, crop image i at offset (dy[i], dx[i]) of the padded
    image and flip it left-right where flip[i]. Returns a new array like x."""
    n, c, h, w = x.shape
    if n == 0:
        return x.copy()
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(padded, (h, w), axis=(2, 3))  # (N, C, 2p+1, 2p+1, H, W)
    out = windows[np.arange(n), :, dy, dx]  # (N, C, H, W)
    out[flip] = out[flip, :, :, ::-1]
    return out
