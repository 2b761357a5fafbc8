"""Rectified linear unit."""

import numpy as np


def relu_forward(x):
    """max(0, x) elementwise. Returns (out, cache); out has the shape and dtype of x."""
    out = np.maximum(x, 0)
    return out, out


def relu_backward(dout, cache):
    """Backward pass of relu_forward: passes dout where the output was positive (dout times the
    0/1 mask: numpy's multiply is several times faster than np.where(mask, dout, 0) here)."""
    out = cache
    return np.multiply(dout, out > 0)
