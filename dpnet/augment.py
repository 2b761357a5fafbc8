"""Random crop and horizontal flip, vectorised over the batch."""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def random_crop_flip(x, rng, pad=4):
    """Pad x (N, C, H, W) by `pad` zeros, take a random H x W crop per image and flip each
    image left-right with probability 1/2. Returns a new array like x."""
    n, c, h, w = x.shape
    if n == 0:
        return x.copy()
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(padded, (h, w), axis=(2, 3))  # (N, C, 2p+1, 2p+1, H, W)
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    out = windows[np.arange(n), :, dy, dx]  # (N, C, H, W)
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, :, ::-1]
    return out
