"""Max pooling: vectorised fast path and naive loop reference.

The gradient of each window goes to its FIRST maximal element in row-major order
(what np.argmax picks in the naive loop), so tied inputs, common after a ReLU, get a
valid subgradient and both implementations agree exactly.
"""

import numpy as np

from ._validate import require_ndim, require_positive_int


def pool_output_shape(x_shape, pool_param):
    """Check pooling arguments and return (ph, pw, stride, H_out, W_out),
    H_out = 1 + (H - pool_height) / stride (a whole number; likewise W_out)."""
    if len(x_shape) != 4:
        raise ValueError(f"x must be a 4-d array (N, C, H, W), got shape {tuple(x_shape)}")
    for key in ("pool_height", "pool_width", "stride"):
        if key not in pool_param:
            raise ValueError(f"pool_param needs '{key}', got keys {sorted(pool_param)}")
        require_positive_int(f"pool_param['{key}']", pool_param[key])
    ph, pw, stride = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    h, w = x_shape[2], x_shape[3]
    if ph > h or pw > w:
        raise ValueError(f"a {ph}x{pw} pooling window does not fit a {h}x{w} input")
    if (h - ph) % stride or (w - pw) % stride:
        raise ValueError(
            f"a {ph}x{pw} pooling window with stride {stride} does not tile a {h}x{w} input: "
            f"need (H - pool_height) and (W - pool_width) divisible by the stride"
        )
    return ph, pw, stride, 1 + (h - ph) // stride, 1 + (w - pw) // stride


def _window_views(x, ph, pw, stride, h_out, w_out):
    """Yield, for each offset (i, j) inside the window, the (N, C, Ho, Wo) view of x it reads."""
    for i in range(ph):
        for j in range(pw):
            yield x[:, :, i:i + stride * (h_out - 1) + 1:stride, j:j + stride * (w_out - 1) + 1:stride]


def max_pool_forward(x, pool_param):
    """Max pooling.

    Inputs:
    - x: (N, C, H, W)
    - pool_param: dict with 'pool_height', 'pool_width', 'stride'

    Returns (out, cache): out is (N, C, H_out, W_out).
    """
    ph, pw, stride, h_out, w_out = pool_output_shape(x.shape, pool_param)
    n, c, h, w = x.shape
    if ph == pw == stride and h % ph == 0 and w % pw == 0:
        out = x.reshape(n, c, h_out, ph, w_out, pw).max(axis=(3, 5))  # windows tile
    else:
        views = _window_views(x, ph, pw, stride, h_out, w_out)
        out = next(views).copy()
        for view in views:
            np.maximum(out, view, out=out)
    return out, (x, out, pool_param)


def max_pool_backward(dout, cache):
    """Backward pass of max_pool_forward: returns dx with the shape of x."""
    x, out, pool_param = cache
    ph, pw, stride, h_out, w_out = pool_output_shape(x.shape, pool_param)
    if dout.shape != out.shape:
        raise ValueError(f"dout must have shape {out.shape}, got {dout.shape}")
    tiles = ph == pw == stride and x.shape[2] % ph == 0 and x.shape[3] % pw == 0
    dx = np.empty_like(x) if tiles else np.zeros_like(x)
    unclaimed = np.ones(out.shape, dtype=bool)  # windows whose max is not yet found
    hit = np.empty(out.shape, dtype=bool)
    for x_view, dx_view in zip(_window_views(x, ph, pw, stride, h_out, w_out),
                               _window_views(dx, ph, pw, stride, h_out, w_out)):
        np.equal(x_view, out, out=hit)
        hit &= unclaimed
        unclaimed &= ~hit
        if tiles:  # each input element lies in exactly one window
            np.multiply(dout, hit, out=dx_view)
        else:
            dx_view += dout * hit
    return dx


def max_pool_forward_naive(x, pool_param):
    """Reference max pooling with plain loops; same contract as max_pool_forward."""
    ph, pw, stride, h_out, w_out = pool_output_shape(x.shape, pool_param)
    n, c = x.shape[:2]
    out = np.empty((n, c, h_out, w_out), dtype=x.dtype)
    for i in range(n):
        for j in range(c):
            for r in range(h_out):
                for s in range(w_out):
                    out[i, j, r, s] = x[i, j, r * stride:r * stride + ph, s * stride:s * stride + pw].max()
    return out, (x, pool_param)


def max_pool_backward_naive(dout, cache):
    """Reference backward pass: each window's gradient goes to its first maximum."""
    x, pool_param = cache
    ph, pw, stride, h_out, w_out = pool_output_shape(x.shape, pool_param)
    n, c = x.shape[:2]
    dx = np.zeros_like(x)
    for i in range(n):
        for j in range(c):
            for r in range(h_out):
                for s in range(w_out):
                    window = x[i, j, r * stride:r * stride + ph, s * stride:s * stride + pw]
                    a, b = np.unravel_index(np.argmax(window), window.shape)
                    dx[i, j, r * stride + a, s * stride + b] += dout[i, j, r, s]
    return dx
