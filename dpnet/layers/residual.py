"""Layers of residual networks: the parameter-free shortcut that halves the size and widens the
channels (the CIFAR ResNets' "option A"), the residual add followed by ReLU, and global average
pooling. Each has a naive loop twin for the tests."""

import numpy as np


def _check_images(x, name="x"):
    if np.ndim(x) != 4:
        raise ValueError(f"{name} must be images (N, C, H, W), got shape {np.shape(x)}")


def shortcut_forward(x, out_channels, stride):
    """The identity of every `stride`-th pixel, channels zero-padded to out_channels.

    x: (N, C, H, W); out_channels: F >= C, padded with (F - C) // 2 zero channels before and
    the rest after. Returns (out (N, F, ceil(H / stride), ceil(W / stride)), cache).
    """
    _check_images(x)
    n, c, h, w = x.shape
    if out_channels < c:
        raise ValueError(f"out_channels must be at least the input's {c} channels, got {out_channels}")
    if stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride}")
    before = (out_channels - c) // 2
    sampled = x[:, :, ::stride, ::stride]
    out = np.zeros((n, out_channels) + sampled.shape[2:], dtype=x.dtype)
    out[:, before:before + c] = sampled
    return out, (x.shape, before, stride)


def shortcut_backward(dout, cache):
    """dx (N, C, H, W): each sampled pixel's gradient, zero elsewhere."""
    shape, before, stride = cache
    dx = np.zeros(shape, dtype=dout.dtype)
    dx[:, :, ::stride, ::stride] = dout[:, before:before + shape[1]]
    return dx


def shortcut_forward_naive(x, out_channels, stride):
    """Reference shortcut with plain loops; same contract as shortcut_forward."""
    n, c, h, w = x.shape
    before = (out_channels - c) // 2
    ho, wo = -(-h // stride), -(-w // stride)
    out = np.zeros((n, out_channels, ho, wo), dtype=x.dtype)
    for i in range(n):
        for k in range(c):
            for r in range(ho):
                for s in range(wo):
                    out[i, before + k, r, s] = x[i, k, r * stride, s * stride]
    return out, (x.shape, before, stride)


def shortcut_backward_naive(dout, cache):
    shape, before, stride = cache
    n, c, h, w = shape
    dx = np.zeros(shape, dtype=dout.dtype)
    for i in range(n):
        for k in range(c):
            for r in range(dout.shape[2]):
                for s in range(dout.shape[3]):
                    dx[i, k, r * stride, s * stride] = dout[i, before + k, r, s]
    return dx


def residual_relu_forward(x, shortcut):
    """ReLU(x + shortcut), the end of a residual block; x and shortcut of one shape.
    Returns (out, cache)."""
    if np.shape(x) != np.shape(shortcut):
        raise ValueError(f"x and shortcut must have one shape, got {np.shape(x)} and {np.shape(shortcut)}")
    out = np.add(x, shortcut)
    np.maximum(out, 0, out=out)
    return out, out


def residual_relu_backward(dout, cache):
    """Returns (dx, dshortcut), equal in value (the ReLU's gradient goes to both branches) and
    separate arrays."""
    d = np.multiply(dout, cache > 0)  # as relu_backward
    return d, d.copy()


def global_avg_pool_forward(x):
    """Mean over each channel's pixels: x (N, C, H, W) -> out (N, C). Returns (out, cache)."""
    _check_images(x)
    return x.mean(axis=(2, 3)), x.shape


def global_avg_pool_backward(dout, cache):
    """dx (N, C, H, W): each pixel gets 1 / (H W) of its channel's gradient."""
    n, c, h, w = cache
    return np.broadcast_to((dout / (h * w))[:, :, None, None], cache).copy()


def global_avg_pool_forward_naive(x):
    n, c, h, w = x.shape
    out = np.zeros((n, c), dtype=x.dtype)
    for i in range(n):
        for k in range(c):
            total = 0.0
            for r in range(h):
                for s in range(w):
                    total += x[i, k, r, s]
            out[i, k] = total / (h * w)
    return out, x.shape


def global_avg_pool_backward_naive(dout, cache):
    n, c, h, w = cache
    dx = np.zeros(cache, dtype=dout.dtype)
    for i in range(n):
        for k in range(c):
            for r in range(h):
                for s in range(w):
                    dx[i, k, r, s] = dout[i, k] / (h * w)
    return dx
