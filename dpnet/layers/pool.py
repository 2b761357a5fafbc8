"""Max pooling: vectorised fast path and naive loop reference.

The gradient of each window goes to its FIRST maximal element in row-major order
(what np.argmax picks in the naive loop), so tied inputs, common after a ReLU, get a
valid subgradient and both implementations agree exactly.
"""

import numpy as np

from ._validate import require_positive_int


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


def _tiles(ph, pw, stride, h, w):
    """True when the windows tile the input exactly (no overlap, nothing left over)."""
    return ph == pw == stride and h % ph == 0 and w % pw == 0


def max_pool_forward(x, pool_param):
    """Max pooling.

    Inputs:
    - x: (N, C, H, W)
    - pool_param: dict with 'pool_height', 'pool_width', 'stride'

    Returns (out, cache): out is (N, C, H_out, W_out).
    """
    ph, pw, stride, h_out, w_out = pool_output_shape(x.shape, pool_param)
    n, c, h, w = x.shape
    if _tiles(ph, pw, stride, h, w):
        # max over window rows first, on whole contiguous image rows, then over the
        # pw interleaved columns; a reduction over small trailing axes is far slower
        x5 = x.reshape(n, c, h_out, ph, w)
        rows = x5[:, :, :, 0].copy()  # (N, C, Ho, W)
        for i in range(1, ph):
            np.maximum(rows, x5[:, :, :, i], out=rows)
        rows = rows.reshape(n, c, h_out, w_out, pw)
        out = rows[..., 0].copy()
        for j in range(1, pw):
            np.maximum(out, rows[..., j], out=out)
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
    tiles = _tiles(ph, pw, stride, x.shape[2], x.shape[3])
    dx = np.empty_like(x) if tiles else np.zeros_like(x)
    # A window holding NaN has NaN as its maximum, at its first NaN (as np.argmax says).
    has_nan = out.size > 0 and bool(np.isnan(out.max()))
    # Visit window offsets in row-major order; `hit` marks the windows whose first maximum
    # sits at this offset, `unclaimed` those whose maximum is still to come.
    last = ph * pw - 1
    hit = np.empty(out.shape, dtype=bool)
    unclaimed = None
    views = zip(_window_views(x, ph, pw, stride, h_out, w_out),
                _window_views(dx, ph, pw, stride, h_out, w_out))
    for offset, (x_view, dx_view) in enumerate(views):
        if 0 < offset == last:
            hit = unclaimed  # the windows whose maximum no earlier offset held
        else:
            np.equal(x_view, out, out=hit)
            if has_nan:
                hit |= np.isnan(x_view)
            if offset == 0:
                unclaimed = ~hit
            else:
                hit &= unclaimed
                unclaimed ^= hit
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
