"""Convolution layer: a vectorised im2col implementation and naive loop references.

The fast path works on blocks of images whose column matrices (B, K, P) stay in cache,
K = C * HH * WW and P = H_out * W_out:
- im2col: one strided-view copy per block;
- forward, dx: GEMMs split into column chunks small enough for OpenBLAS's unpacked
  small-matrix kernels (faster for these thin products where the BLAS build has such kernels;
  algorithm 'im2col-whole' makes each block's GEMM in one call instead, and dpnet.autotune
  measures which is faster), written straight into the (B, F, P) and (B, K, P) layouts;
- dw: one batched GEMM per block, (K, P) @ (P, F) per image;
- col2im, stride 1: the column gradients are written with the row pitch of the padded
  image, into rows separated by zero gaps, so that the HH * WW shifted slabs of each
  image gradient are one strided view and col2im is one np.sum over the kernel offsets
  (see _FlatDx); other strides: one vectorised slab add per kernel offset.
No np.add.at anywhere.
"""

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._validate import require_nonnegative_int, require_positive_int
from .winograd import winograd_applies, winograd_conv_backward, winograd_conv_forward

# Bytes of column matrix per block of images: a few images, about two L2 caches' worth.
COLUMN_BLOCK_BYTES = 2 << 20
# OpenBLAS (x86-64 AVX-512 builds) runs GEMMs of at most this many multiply-adds through
# unpacked small-matrix kernels; for the thin conv GEMMs these ran 1.4-1.7x faster on one
# AVX-512 machine. Builds without them gain nothing: 'im2col-whole' skips the chunking.
SMALL_GEMM_MACS = 1_000_000
CONV_ALGORITHMS = ("im2col", "im2col-whole", "winograd")


def conv_algorithms(w_shape, conv_param):
    """The algorithms (conv_param['algorithm']) that can compute this convolution."""
    return [a for a in CONV_ALGORITHMS if a != "winograd" or winograd_applies(w_shape, conv_param)]


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


def _gemm_chunk(mk, q, whole=False):
    """Columns per GEMM call for an (M, K) @ (K, q) product with M * K = mk (all q if whole)."""
    if whole:
        return q
    chunk = SMALL_GEMM_MACS // max(mk, 1)
    if chunk < 32 or chunk >= q:
        return q
    return 1 << (chunk.bit_length() - 1)


def gemms_are_cut(x_shape, w_shape, conv_param):
    """Whether 'im2col' cuts any forward or dx GEMM of this convolution into column chunks
    (else 'im2col-whole' makes the very same calls)."""
    _, pad, h_out, w_out = conv_output_shape(x_shape, w_shape, conv_param)
    f, c, hh, ww = w_shape
    columns = h_out * _flat_pitch(x_shape[3], pad, w_out)  # the most of any of its GEMMs (pitch >= W_out)
    return _gemm_chunk(f * c * hh * ww, columns) < columns


def _column_chunks(v, chunk):
    """View (B, R, Q) as (B, Q // chunk, R, chunk); Q must be a multiple of chunk."""
    b, r, q = v.shape
    sb, sr, sq = v.strides
    return as_strided(v, shape=(b, q // chunk, r, chunk), strides=(sb, chunk * sq, sr, sq))


def _matmul_columns(a, b, out, chunk):
    """out[i] = a @ b[i] for a (M, K), b (B, K, Q), out (B, M, Q), `chunk` columns per call."""
    q = b.shape[-1]
    full = q - q % chunk
    if full:
        np.matmul(a, _column_chunks(b[..., :full], chunk),
                  out=_column_chunks(out[..., :full], chunk))
    if full < q:
        np.matmul(a, b[..., full:], out=out[..., full:])


def conv_forward(x, w, b, conv_param):
    """Convolution (cross-correlation) of N images with F filters.

    Inputs:
    - x: images, (N, C, H, W)
    - w: filters, (F, C, HH, WW)
    - b: biases, (F,), or None for a convolution without bias (one that batchnorm follows)
    - conv_param: dict with 'stride' (positive int) and 'pad' (zeros added on every side), and
      optionally 'algorithm': 'im2col' (the default), 'im2col-whole' (the same, each block's
      GEMM in one call: the same products, another BLAS call) or 'winograd' (3x3 filters,
      stride 1, pad 1 only: dpnet.layers.winograd; equal to im2col up to rounding)

    Returns (out, cache): out is (N, F, H_out, W_out) with
      H_out = 1 + (H + 2 * pad - HH) / stride,  W_out = 1 + (W + 2 * pad - WW) / stride.
    """
    algorithm = conv_param.get("algorithm", "im2col")
    if algorithm == "winograd":
        out, cache = winograd_conv_forward(x, w, b, conv_param)
        return out, ("winograd", cache)
    if algorithm not in CONV_ALGORITHMS:
        raise ValueError(f"conv_param['algorithm'] must be one of {CONV_ALGORITHMS}, got {algorithm!r}")
    stride, pad, h_out, w_out = conv_output_shape(x.shape, w.shape, conv_param)
    if b is not None and np.shape(b) != (w.shape[0],):
        raise ValueError(f"b must have shape ({w.shape[0]},) to match w, got {b.shape}")
    n, c, _, _ = x.shape
    f, _, hh, ww = w.shape
    k, p = c * hh * ww, h_out * w_out
    w2 = w.reshape(f, k)  # (F, K)
    windows = _windows(_pad(x, pad), hh, ww, stride, h_out, w_out)  # (N, C, HH, WW, Ho, Wo)
    out = np.empty((n, f, p), dtype=np.result_type(x, w))  # (N, F, Ho*Wo)
    nb = _block_size(n, k * p * x.itemsize)
    cols = np.empty((nb, k, p), dtype=x.dtype)  # reused per block
    chunk = _gemm_chunk(f * k, p, algorithm == "im2col-whole")
    for start in range(0, n, nb):
        stop = min(start + nb, n)
        block = cols[: stop - start]
        block.reshape(stop - start, c, hh, ww, h_out, w_out)[...] = windows[start:stop]
        _matmul_columns(w2, block, out[start:stop], chunk)  # (B, F, P)
        if b is not None:
            out[start:stop] += b[:, None]
    return out.reshape(n, f, h_out, w_out), (x, w, conv_param)


def conv_backward(dout, cache, compute_dx=True):
    """Backward pass of conv_forward.

    Inputs:
    - dout: upstream gradient, (N, F, H_out, W_out)
    - cache: from conv_forward
    - compute_dx: False skips dx (None is returned), for a first layer whose input is data

    Returns (dx, dw, db) with the shapes of x, w and b (db: the gradient a bias would have,
    also for a convolution without one).
    """
    if isinstance(cache[0], str):  # ("winograd", its cache)
        return winograd_conv_backward(dout, cache[1], compute_dx)
    x, w, conv_param = cache
    stride, pad, h_out, w_out = conv_output_shape(x.shape, w.shape, conv_param)
    n, c, _, wd = x.shape
    f, _, hh, ww = w.shape
    k, p = c * hh * ww, h_out * w_out
    if dout.shape != (n, f, h_out, w_out):
        raise ValueError(f"dout must have shape {(n, f, h_out, w_out)}, got {dout.shape}")
    dout3 = dout.reshape(n, f, p)  # (N, F, P)
    windows = _windows(_pad(x, pad), hh, ww, stride, h_out, w_out)
    db = dout3.sum(axis=(0, 2))
    dw2t = np.zeros((k, f), dtype=w.dtype)  # dw transposed, (K, F)
    nb = _block_size(n, k * p * x.itemsize)
    cols = np.empty((nb, k, p), dtype=x.dtype)
    dw_parts = np.empty((nb, k, f), dtype=w.dtype)
    dx = None
    if compute_dx:
        dx = np.empty_like(x)
        # the flat layout computes pitch / W_out times the columns needed: worth it up to 1.5
        flat = stride == 1 and 2 * _flat_pitch(wd, pad, w_out) <= 3 * w_out
        whole = conv_param.get("algorithm") == "im2col-whole"
        block_dx = (_FlatDx if flat else _StridedDx)(w, nb, x.shape, stride, pad, h_out, w_out, x.dtype, whole)
    for start in range(0, n, nb):
        stop = min(start + nb, n)
        m = stop - start
        block = cols[:m]
        block.reshape(m, c, hh, ww, h_out, w_out)[...] = windows[start:stop]
        np.matmul(block, dout3[start:stop].transpose(0, 2, 1), out=dw_parts[:m])  # (B, K, F)
        dw2t += dw_parts[:m].sum(axis=0)
        if compute_dx:
            dx[start:stop] = block_dx(dout[start:stop])
    return dx, dw2t.T.reshape(w.shape), db


class _StridedDx:
    """dx for blocks of images, any stride: dcols = w2.T @ dout as (B, K, P), then one
    slab add per kernel offset into a zeroed padded image."""

    def __init__(self, w, nb, x_shape, stride, pad, h_out, w_out, dtype, whole=False):
        f, c, self.hh, self.ww = w.shape
        _, _, self.h, self.wd = x_shape
        self.stride, self.pad, self.h_out, self.w_out = stride, pad, h_out, w_out
        k, p = c * self.hh * self.ww, h_out * w_out
        self.w2t = w.reshape(f, k).T  # (K, F)
        self.chunk = _gemm_chunk(k * f, p, whole)
        self.dcols = np.empty((nb, k, p), dtype=dtype)
        self.dxp = np.empty((nb, c, self.h + 2 * pad, self.wd + 2 * pad), dtype=dtype)

    def __call__(self, dout):
        """dx (B, C, H, W) of a block whose output gradient is dout (B, F, H_out, W_out)."""
        m, f = dout.shape[:2]
        s, ho, wo = self.stride, self.h_out, self.w_out
        dcols = self.dcols[:m]
        _matmul_columns(self.w2t, dout.reshape(m, f, -1), dcols, self.chunk)
        dxp = self.dxp[:m]
        dxp[...] = 0
        d6 = dcols.reshape(m, -1, self.hh, self.ww, ho, wo)
        for i in range(self.hh):
            for j in range(self.ww):
                dxp[:, :, i:i + s * ho:s, j:j + s * wo:s] += d6[:, :, i, j]
        return dxp[:, :, self.pad:self.pad + self.h, self.pad:self.pad + self.wd]


def _flat_pitch(w, pad, w_out):
    """Row pitch of _FlatDx's flat padded images of width w."""
    return max(w_out, w + pad)


class _FlatDx:
    """dx for blocks of images, stride 1, with col2im as one np.sum over a strided view.

    A padded image gradient is held flat, rows `pitch` apart; pitch >= W + pad, so the
    right padding of a row may double as the left padding of the next (the gradient
    landing there is discarded). dout is copied into rows of the same pitch, zero beyond
    W_out, and dcols = w2.T @ dout then holds, in row k = (c, i, j), the slab of length
    L = H_out * pitch to add at flat offset i * pitch + j. The rows are stored r = L + gap
    apart after `gap` zeros, gap = the largest offset, so the view that steps r - 1 per j
    and WW * r - pitch per i reads every slab shifted to its offset (zeros around it),
    and summing that view over (i, j) is col2im.
    """

    def __init__(self, w, nb, x_shape, stride, pad, h_out, w_out, dtype, whole=False):
        f, c, hh, ww = w.shape
        _, _, self.h, self.wd = x_shape
        self.pad, self.w_out = pad, w_out
        self.pitch = pitch = _flat_pitch(self.wd, pad, w_out)
        self.hp = self.h + 2 * pad
        k, q = c * hh * ww, h_out * pitch
        gap = (hh - 1) * pitch + ww - 1
        r = q + gap
        size = self.hp * pitch + ww - 1  # flat padded image and the last slab's overhang
        self.w2t = w.reshape(f, k).T  # (K, F)
        self.chunk = _gemm_chunk(k * f, q, whole)
        self.dout_rows = np.zeros((nb, f, h_out, pitch), dtype=dtype)  # columns >= W_out stay 0
        buf = np.zeros((nb, gap + k * r), dtype=dtype)  # the gaps stay 0
        sb, e = buf.strides[0], buf.itemsize
        self.dcols = as_strided(buf[:, gap:], shape=(nb, k, q), strides=(sb, r * e, e))
        self.shifted = as_strided(
            buf[:, gap:], shape=(nb, c, hh, ww, size),
            strides=(sb, hh * ww * r * e, (ww * r - pitch) * e, (r - 1) * e, e), writeable=False)
        self.dxf = np.empty((nb, c, size), dtype=dtype)

    def __call__(self, dout):
        """dx (B, C, H, W) of a block whose output gradient is dout (B, F, H_out, W_out)."""
        m, f = dout.shape[:2]
        rows = self.dout_rows[:m]
        rows[..., :self.w_out] = dout
        _matmul_columns(self.w2t, rows.reshape(m, f, -1), self.dcols[:m], self.chunk)
        dxf = self.dxf[:m]
        np.sum(self.shifted[:m], axis=(2, 3), out=dxf)
        image = dxf[:, :, :self.hp * self.pitch].reshape(m, -1, self.hp, self.pitch)
        return image[:, :, self.pad:self.pad + self.h, self.pad:self.pad + self.wd]


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
                    out[i, j, r, s] = np.sum(window * w[j]) + (0 if b is None else b[j])
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
    db = np.zeros(f, dtype=w.dtype)
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
