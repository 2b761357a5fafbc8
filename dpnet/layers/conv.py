"""Convolution layer: a vectorised im2col implementation and naive loop references.

The fast path turns blocks of images into column matrices with a strided view (one
copy), multiplies them by the filters in one batched matmul, and scatters column
gradients back with one vectorised add per kernel offset (HH * WW adds, no np.add.at).
Blocks are sized so a block's columns stay in cache.
"""

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._validate import require_ndim, require_nonnegative_int, require_positive_int

# Bytes of column matrix per block of images; about the size of one core's L2 cache.
COLUMN_BLOCK_BYTES = 1 << 20


def conv_output_shape(x_shape, w_shape, conv_param):
    """Check a convolution's arguments and return (stride, pad, H_out, W_out).

    H_out = 1 + (H + 2 * pad - HH) / stride must be a whole number (likewise W_out).
    """
    if len(x_shape) != 4:
        raise ValueError(f"x must be a 4-d array (N, C, H, W), got shape {tuple(x_shape)}")
    if len(w_shape) != 4:
        raise ValueError(f"w must be a 4-d array (F, C, HH, WW), got shape {tuple(w_shape)}")
    _, c, h, w = x_shape
    _, cw, hh, ww = w_shape
    if cw != c:
        raise ValueError(
            f"w has {cw} input channels but x has {c}: expected w of shape (F, {c}, HH, WW), "
            f"got {tuple(w_shape)}"
        )
    for key in ("stride", "pad"):
        if key not in conv_param:
            raise ValueError(f"conv_param needs '{key}', got keys {sorted(conv_param)}")
    stride, pad = conv_param["stride"], conv_param["pad"]
    require_positive_int("conv_param['stride']", stride)
    require_nonnegative_int("conv_param['pad']", pad)
    h_span, w_span = h + 2 * pad - hh, w + 2 * pad - ww
    if h_span < 0 or w_span < 0:
        raise ValueError(
            f"a {hh}x{ww} kernel does not fit the {h}x{w} input padded by {pad}"
        )
    if h_span % stride or w_span % stride:
        raise ValueError(
            f"a {hh}x{ww} kernel with stride {stride} and pad {pad} does not tile a {h}x{w} "
            f"input: need (H + 2*pad - HH) and (W + 2*pad - WW) divisible by the stride, "
            f"got {h_span} and {w_span}"
        )
    return stride, pad, 1 + h_span // stride, 1 + w_span // stride


def _pad(x, pad):
    """Zero-padded copy of x (N, C, H, W) -> (N, C, H + 2 pad, W + 2 pad); x itself if pad is 0."""
    if pad == 0:
        return x
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=x.dtype)
    xp[:, :, pad:pad + h, pad:pad + w] = x
    return xp


def _windows(xp, hh, ww, stride, h_out, w_out):
    """Read-only view (N, C, HH, WW, H_out, W_out) of every kernel window of padded xp."""
    sn, sc, sh, sw = xp.strides
    return as_strided(
        xp,
        shape=(xp.shape[0], xp.shape[1], hh, ww, h_out, w_out),
        strides=(sn, sc, sh, sw, sh * stride, sw * stride),
        writeable=False,
    )


def _block_size(n, col_bytes_per_image):
    return max(1, min(n, COLUMN_BLOCK_BYTES // max(col_bytes_per_image, 1)))


def conv_forward(x, w, b, conv_param):
    """Convolution (cross-correlation) of N images with F filters.

    Inputs:
    - x: images, (N, C, H, W)
    - w: filters, (F, C, HH, WW)
    - b: biases, (F,)
    - conv_param: dict with 'stride' (positive int) and 'pad' (zeros added on every side)

    Returns (out, cache): out is (N, F, H_out, W_out) with
      H_out = 1 + (H + 2 * pad - HH) / stride,  W_out = 1 + (W + 2 * pad - WW) / stride.
    """
    stride, pad, h_out, w_out = conv_output_shape(x.shape, w.shape, conv_param)
    if b.shape != (w.shape[0],):
        raise ValueError(f"b must have shape ({w.shape[0]},) to match w, got {b.shape}")
    n, c, _, _ = x.shape
    f, _, hh, ww = w.shape
    k, p = c * hh * ww, h_out * w_out
    w2 = w.reshape(f, k)  # (F, K)
    xp = _pad(x, pad)
    windows = _windows(xp, hh, ww, stride, h_out, w_out)  # (N, C, HH, WW, Ho, Wo)
    out = np.empty((n, f, p), dtype=np.result_type(x, w))  # (N, F, Ho*Wo)
    nb = _block_size(n, k * p * x.itemsize)
    cols = np.empty((nb, k, p), dtype=x.dtype)  # reused per block
    for start in range(0, n, nb):
        stop = min(start + nb, n)
        block = cols[: stop - start]
        block.reshape(stop - start, c, hh, ww, h_out, w_out)[...] = windows[start:stop]
        np.matmul(w2, block, out=out[start:stop])  # (B, F, P)
    out += b[:, None]
    return out.reshape(n, f, h_out, w_out), (x, w, conv_param)


def conv_backward(dout, cache, compute_dx=True):
    """Backward pass of conv_forward.

    Inputs:
    - dout: upstream gradient, (N, F, H_out, W_out)
    - cache: from conv_forward
    - compute_dx: False skips dx (None is returned), for a first layer whose input is data

    Returns (dx, dw, db) with the shapes of x, w and b.
    """
    x, w, conv_param = cache
    stride, pad, h_out, w_out = conv_output_shape(x.shape, w.shape, conv_param)
    n, c, h, wd = x.shape
    f, _, hh, ww = w.shape
    k, p = c * hh * ww, h_out * w_out
    if dout.shape != (n, f, h_out, w_out):
        raise ValueError(f"dout must have shape {(n, f, h_out, w_out)}, got {dout.shape}")
    dout3 = dout.reshape(n, f, p)  # (N, F, P)
    w2 = w.reshape(f, k)  # (F, K)
    xp = _pad(x, pad)
    windows = _windows(xp, hh, ww, stride, h_out, w_out)
    db = dout3.sum(axis=(0, 2))
    dw2 = np.zeros((f, k), dtype=w.dtype)
    dx = np.empty_like(x) if compute_dx else None
    nb = _block_size(n, k * p * x.itemsize)
    cols = np.empty((nb, k, p), dtype=x.dtype)
    dw_parts = np.empty((nb, f, k), dtype=w.dtype)
    if compute_dx:
        dcols = np.empty((nb, k, p), dtype=x.dtype)
        dxp = np.empty((nb,) + xp.shape[1:], dtype=x.dtype)
    for start in range(0, n, nb):
        stop = min(start + nb, n)
        m = stop - start
        block = cols[:m]
        block.reshape(m, c, hh, ww, h_out, w_out)[...] = windows[start:stop]
        np.matmul(dout3[start:stop], block.transpose(0, 2, 1), out=dw_parts[:m])  # (B, F, K)
        dw2 += dw_parts[:m].sum(axis=0)
        if compute_dx:
            np.matmul(w2.T, dout3[start:stop], out=dcols[:m])  # (B, K, P)
            _col2im(dcols[:m], dxp[:m], c, hh, ww, stride, h_out, w_out)
            dx[start:stop] = dxp[:m, :, pad:pad + h, pad:pad + wd]
    return dx, dw2.reshape(w.shape), db


def _col2im(dcols, dxp, c, hh, ww, stride, h_out, w_out):
    """Sum column gradients (B, K, P) into the padded image gradient dxp (B, C, Hp, Wp)."""
    dxp[...] = 0
    d6 = dcols.reshape(dcols.shape[0], c, hh, ww, h_out, w_out)
    for i in range(hh):
        for j in range(ww):
            dxp[:, :, i:i + stride * h_out:stride, j:j + stride * w_out:stride] += d6[:, :, i, j]


def conv_forward_naive(x, w, b, conv_param):
    """Reference convolution with plain loops; same contract as conv_forward."""
    stride, pad, h_out, w_out = conv_output_shape(x.shape, w.shape, conv_param)
    n, f = x.shape[0], w.shape[0]
    hh, ww = w.shape[2], w.shape[3]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, f, h_out, w_out), dtype=np.result_type(x, w))
    for i in range(n):
        for j in range(f):
            for r in range(h_out):
                for s in range(w_out):
                    window = xp[i, :, r * stride:r * stride + hh, s * stride:s * stride + ww]
                    out[i, j, r, s] = np.sum(window * w[j]) + b[j]
    return out, (x, w, b, conv_param)


def conv_backward_naive(dout, cache):
    """Reference backward pass with plain loops; returns (dx, dw, db)."""
    x, w, b, conv_param = cache
    stride, pad, h_out, w_out = conv_output_shape(x.shape, w.shape, conv_param)
    n, _, h, wd = x.shape
    f, _, hh, ww = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    db = np.zeros_like(b)
    for i in range(n):
        for j in range(f):
            for r in range(h_out):
                for s in range(w_out):
                    rs, cs = r * stride, s * stride
                    g = dout[i, j, r, s]
                    db[j] += g
                    dw[j] += g * xp[i, :, rs:rs + hh, cs:cs + ww]
                    dxp[i, :, rs:rs + hh, cs:cs + ww] += g * w[j]
    return dxp[:, :, pad:pad + h, pad:pad + wd], dw, db
