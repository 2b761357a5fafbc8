"""Winograd F(4x4, 3x3) convolution (Lavin and Gray, 2016) for 3x3 filters, stride 1, pad 1.

The padded input is cut into 6x6 tiles at a stride of 4 (neighbours overlap by 2). Each tile d
becomes V = B^T d B, each filter g becomes U = G g G^T, and the convolution is, for each of the
36 positions of the 6x6 transformed domain, one GEMM (F, C) @ (C, P) over the P tiles of all
images; each 6x6 product M gives a 4x4 tile of the output, Y = A^T M A. That is 36 x 16 / (4 x 4
x 9) = 1/2.25 of the multiplies of a direct or im2col convolution, in 36 large GEMMs.

The backward pass: the filter gradient is the chain rule through the same linear maps, dM =
A dY A^T, dU = dM V^T (36 GEMMs), dw = G^T dU G; the input gradient is itself a Winograd
convolution, of dY with the filters flipped and their channels swapped (adding the overlapping
tiles of U^T dM back would cost more in strided copies than it saves). Every tile transform is
one GEMM with a Kronecker product of the small matrices (a tile as a 36-vector).

Rounding: the transforms' constants (up to 8 in A, 5 in B, 1/24 in G) amplify rounding, so in
float32 the results differ from im2col's by about 1e-6 to 1e-5 of their scale (tested against a
float64 reference with an asserted bound); in float64 they agree to about 1e-14.
"""

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._validate import require_ndim

# The F(4x4, 3x3) matrices (Lavin and Gray, 2016, section 4.2)
B_T = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], dtype=np.float64)
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], dtype=np.float64)
A_T = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], dtype=np.float64)
# The same maps on flattened tiles (row-major): tile @ KRON = transformed tile
INPUT_KRON = np.kron(B_T.T, B_T.T)    # (36, 36): d -> B^T d B
FILTER_KRON = np.kron(G.T, G.T)       # (9, 36):  g -> G g G^T
OUTPUT_KRON = np.kron(A_T.T, A_T.T)   # (36, 16): M -> A^T M A


def winograd_applies(w_shape, conv_param):
    """True for the convolutions this module computes: 3x3 filters, stride 1, pad 1."""
    return (len(w_shape) == 4 and tuple(w_shape[2:]) == (3, 3) and conv_param.get("stride") == 1
            and conv_param.get("pad") == 1)


def _tiles(h, w):
    return -(-h // 4), -(-w // 4)


def _tile_view(a, th, tw, rows, cols, row0=0, col0=0):
    """View (C, N, th, rows, tw, cols) of a (C, N, H', W') at tile origins (4 i + row0, 4 j + col0)."""
    sc, sn, sh, sw = a.strides
    return as_strided(a[:, :, row0:, col0:], shape=(a.shape[0], a.shape[1], th, rows, tw, cols),
                      strides=(sc, sn, 4 * sh, sh, 4 * sw, sw))


def _input_tiles(x, th, tw):
    """(36, C, P) transformed tiles of x (N, C, H, W), P = N * th * tw tiles in (n, i, j) order."""
    n, c, h, w = x.shape
    xp = np.zeros((c, n, 4 * th + 2, 4 * tw + 2), dtype=x.dtype)  # channels first: (C, P) rows below
    xp[:, :, 1:h + 1, 1:w + 1] = x.transpose(1, 0, 2, 3)
    d = np.empty((c, n, th, tw, 6, 6), dtype=x.dtype)  # each tile's 36 values together: a plain copy
    d.transpose(0, 1, 2, 4, 3, 5)[...] = _tile_view(xp, th, tw, 6, 6)
    # (36, 36) @ (36, C * P): BLAS reads the tiles transposed, the result is (36, C, P) as it stands
    return (INPUT_KRON.T.astype(x.dtype) @ d.reshape(-1, 36).T).reshape(36, c, n * th * tw)


def _filters(w):
    """(36, F, C) transformed filters of w (F, C, 3, 3)."""
    f, c = w.shape[:2]
    return (FILTER_KRON.T.astype(w.dtype) @ w.reshape(f * c, 9).T).reshape(36, f, c)


def _convolve(x, u, f):
    """The convolution of x (N, C, H, W) with the F transformed filters u (36, F, C), and the
    transformed input tiles (36, C, P): (out (N, F, H, W), v)."""
    n, c, h, wd = x.shape
    th, tw = _tiles(h, wd)
    v = _input_tiles(x, th, tw)            # (36, C, P)
    m = np.matmul(u, v)                    # (36, F, P): the 36 GEMMs
    y = (m.reshape(36, -1).T @ OUTPUT_KRON.astype(m.dtype)).reshape(f, n, th, tw, 4, 4)  # tile-major
    out = np.empty((n, f, h, wd), dtype=m.dtype)
    full = np.empty((n, f, th, 4, tw, 4), dtype=m.dtype) if (h, wd) != (4 * th, 4 * tw) else \
        out.reshape(n, f, th, 4, tw, 4)
    full[...] = y.transpose(1, 0, 2, 4, 3, 5)
    if full.base is not out:
        out[...] = full.reshape(n, f, 4 * th, 4 * tw)[:, :, :h, :wd]
    return out, v


def winograd_conv_forward(x, w, b, conv_param):
    """conv_forward's contract (x (N, C, H, W), w (F, C, 3, 3), b (F,) or None, conv_param with
    stride 1 and pad 1): returns (out (N, F, H, W), cache)."""
    require_ndim("x", x, 4, "(N, C, H, W)")
    if not winograd_applies(np.shape(w), conv_param) or w.shape[1] != x.shape[1]:
        raise ValueError(f"Winograd F(4x4, 3x3) takes 3x3 filters with stride 1 and pad 1, and w's channels equal "
                         f"to x's: got x {x.shape}, w {np.shape(w)}, conv_param {conv_param}")
    out, v = _convolve(x, _filters(w), w.shape[0])
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out, (x, w, conv_param, v)


def winograd_conv_backward(dout, cache, compute_dx=True):
    """Backward pass of winograd_conv_forward: (dx or None, dw, db). dx is itself a Winograd
    convolution, of dout with the filters flipped and their channels swapped (stride 1, pad 1);
    dw = G^T dU G with dU = dM V^T, dM = A dY A^T the transformed output gradient."""
    x, w, conv_param, v = cache
    n, c, h, wd = x.shape
    f = w.shape[0]
    if dout.shape != (n, f, h, wd):
        raise ValueError(f"dout must have shape {(n, f, h, wd)}, got {dout.shape}")
    th, tw = _tiles(h, wd)
    db = dout.sum(axis=(0, 2, 3))
    dy = np.empty((f, n, th, tw, 4, 4), dtype=dout.dtype)  # the output tiles' gradients, tile-major
    padded = dout if (h, wd) == (4 * th, 4 * tw) else np.pad(dout, ((0, 0), (0, 0), (0, 4 * th - h), (0, 4 * tw - wd)))
    dy.transpose(1, 0, 2, 4, 3, 5)[...] = padded.reshape(n, f, th, 4, tw, 4)
    dm = (OUTPUT_KRON.astype(dout.dtype) @ dy.reshape(-1, 16).T).reshape(36, f, n * th * tw)  # (36, F, P)
    du = np.matmul(dm, v.transpose(0, 2, 1))                            # (36, F, C)
    dw = (FILTER_KRON.astype(du.dtype) @ du.reshape(36, -1)).reshape(3, 3, f, c).transpose(2, 3, 0, 1)
    dx = None
    if compute_dx:
        flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # (C, F, 3, 3)
        dx, _ = _convolve(dout, _filters(flipped), c)
    return dx, np.ascontiguousarray(dw), db
