"""Rectified linear unit."""

import numpy as np


def relu_forward(x):
    """max(0, x) elementwise. Returns (out, cache); out has the shape and dtype of x."""
    out = np.maximum(x, 0)
    return out, out


def relu_backward(dout, cache):
    """Backward pass of relu_forward: passes dout where the output was positive."""
    out = cache
    return np.where(out > 0, dout, 0)
