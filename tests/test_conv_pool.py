"""Convolution and max pooling: fast paths against the naive loops, an independent
sliding-window reference, numerical gradients, ties and tiling edge cases."""

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import dpnet.layers.conv as conv_module
from dpnet.layers import (conv_backward, conv_backward_naive, conv_forward,
                          conv_forward_naive, conv_output_shape, max_pool_backward,
                          max_pool_backward_naive, max_pool_forward, max_pool_forward_naive,
                          pool_output_shape)

EXACT_TOL = 1e-10  # fast vs naive, relative to the largest reference entry


def rel_max_diff(got, ref):
    """max |got - ref| / max |ref| (shapes must agree)."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, f"shape {got.shape}, expected {ref.shape}"
    scale = np.max(np.abs(ref)) if ref.size else 1.0
    return float(np.max(np.abs(got - ref)) / scale) if ref.size else 0.0


def assert_close_to(got, ref, tol=EXACT_TOL):
    err = rel_max_diff(got, ref)
    assert err <= tol, f"relative max difference {err:.3e} > {tol}"


# ---------------------------------------------------------------- convolution

# (N, C, H, W, F, HH, WW, stride, pad)
CONV_SHAPES = [
    (2, 3, 5, 5, 4, 3, 3, 1, 1),    # the homework's 'same' 3x3
    (2, 3, 7, 7, 2, 3, 3, 2, 1),    # stride 2
    (1, 2, 6, 6, 3, 2, 2, 2, 0),    # stride 2, pad 0, N=1
    (2, 1, 5, 6, 1, 3, 2, 1, 0),    # C=1, F=1, 3x2 kernel, pad 0
    (2, 2, 4, 7, 3, 2, 4, 1, 3),    # 2x4 kernel, pad 3 (kernel sees only padding at the edges)
    (3, 2, 8, 8, 2, 4, 4, 2, 1),    # 4x4 kernel, stride 2
    (1, 1, 7, 7, 1, 1, 1, 3, 0),    # 1x1 kernel, stride 3 (skips pixels)
    (2, 2, 5, 8, 2, 3, 3, 3, 2),    # stride 3, pad 2, non-square image
]


def conv_ids(shape):
    n, c, h, w, f, hh, ww, s, p = shape
    return f"N{n}C{c}_{h}x{w}_F{f}k{hh}x{ww}_s{s}p{p}"


def make_conv(shape, rng, dtype=np.float64):
    n, c, h, w, f, hh, ww, stride, pad = shape
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((f, c, hh, ww)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    return x, wt, b, {"stride": stride, "pad": pad}


def conv_reference(x, w, b, conv_param):
    """Convolution by einsum over numpy's sliding windows (independent of dpnet)."""
    s, p = conv_param["stride"], conv_param["pad"]
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    win = sliding_window_view(xp, w.shape[2:], axis=(2, 3))[:, :, ::s, ::s]  # N,C,Ho,Wo,HH,WW
    return np.einsum("nchwij,fcij->nfhw", win, w) + b[None, :, None, None]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=conv_ids)
def test_conv_output_shape_formula(shape):
    n, c, h, w, f, hh, ww, stride, pad = shape
    got = conv_output_shape((n, c, h, w), (f, c, hh, ww), {"stride": stride, "pad": pad})
    assert got == (stride, pad, 1 + (h + 2 * pad - hh) // stride, 1 + (w + 2 * pad - ww) // stride)


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=conv_ids)
def test_conv_forward_matches_naive_and_reference(shape, rng):
    x, w, b, cp = make_conv(shape, rng)
    out, _ = conv_forward(x, w, b, cp)
    out_naive, _ = conv_forward_naive(x, w, b, cp)
    assert_close_to(out, out_naive)
    assert_close_to(out_naive, conv_reference(x, w, b, cp))


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=conv_ids)
def test_conv_backward_matches_naive(shape, rng):
    x, w, b, cp = make_conv(shape, rng)
    out, cache = conv_forward(x, w, b, cp)
    _, cache_naive = conv_forward_naive(x, w, b, cp)
    dout = rng.standard_normal(out.shape)
    for got, ref in zip(conv_backward(dout, cache), conv_backward_naive(dout, cache_naive)):
        assert_close_to(got, ref)


def test_conv_hand_computed():
    """A 2x2 kernel [[1, 0], [0, -1]] on arange(9) gives x[r, s] - x[r+1, s+1] + b = -4 + b."""
    x = np.arange(9.0).reshape(1, 1, 3, 3)
    w = np.array([[[[1.0, 0.0], [0.0, -1.0]]]])
    b = np.array([0.5])
    out, cache = conv_forward(x, w, b, {"stride": 1, "pad": 0})
    np.testing.assert_array_equal(out, np.full((1, 1, 2, 2), -3.5))
    dx, dw, db = conv_backward(np.ones_like(out), cache)
    # each output adds +1 at its top-left and -1 at its bottom-right input
    np.testing.assert_array_equal(dx[0, 0], [[1, 1, 0], [1, 0, -1], [0, -1, -1]])
    np.testing.assert_array_equal(dw[0, 0], [[0 + 1 + 3 + 4, 1 + 2 + 4 + 5],
                                             [3 + 4 + 6 + 7, 4 + 5 + 7 + 8]])
    np.testing.assert_array_equal(db, [4.0])


def test_conv_blocked_path_matches_naive(rng, monkeypatch):
    """Force blocks of 2 images over N=5 (a ragged last block) and compare with naive."""
    shape = (5, 2, 6, 6, 3, 3, 3, 1, 1)
    x, w, b, cp = make_conv(shape, rng)
    col_bytes_per_image = 2 * 3 * 3 * 6 * 6 * x.itemsize
    monkeypatch.setattr(conv_module, "COLUMN_BLOCK_BYTES", 2 * col_bytes_per_image)
    assert conv_module._block_size(5, col_bytes_per_image) == 2
    out, cache = conv_forward(x, w, b, cp)
    out_naive, cache_naive = conv_forward_naive(x, w, b, cp)
    assert_close_to(out, out_naive)
    dout = rng.standard_normal(out.shape)
    for got, ref in zip(conv_backward(dout, cache), conv_backward_naive(dout, cache_naive)):
        assert_close_to(got, ref)


@pytest.mark.parametrize("stride, pad", [(1, 1), (2, 0)])
@pytest.mark.parametrize("algorithm", ["im2col", "im2col-whole"])
def test_conv_gemms_in_column_chunks_or_whole_match_naive(algorithm, stride, pad, rng, monkeypatch):
    """'im2col' cuts the forward and dx GEMMs into column chunks (here forced to 32 columns of
    the 144 or 36 output pixels, a ragged last chunk); 'im2col-whole' makes each in one call.
    Both equal the naive loops, forward and backward."""
    shape = (2, 3, 13 if stride == 2 else 12, 13 if stride == 2 else 12, 4, 3, 3, stride, pad)
    x, w, b, cp = make_conv(shape, rng)
    monkeypatch.setattr(conv_module, "SMALL_GEMM_MACS", 4 * 27 * 32)  # F * K * 32: 32 columns per call
    assert conv_module._gemm_chunk(4 * 27, 144) == 32 and conv_module._gemm_chunk(4 * 27, 144, whole=True) == 144
    calls, matmul_columns = [], conv_module._matmul_columns

    def spy(a, cols, out, chunk):
        calls.append(chunk < cols.shape[-1])  # cut into chunks?
        return matmul_columns(a, cols, out, chunk)

    monkeypatch.setattr(conv_module, "_matmul_columns", spy)
    out, cache = conv_forward(x, w, b, {**cp, "algorithm": algorithm})
    out_naive, cache_naive = conv_forward_naive(x, w, b, cp)
    assert_close_to(out, out_naive)
    dout = rng.standard_normal(out.shape)
    for got, ref in zip(conv_backward(dout, cache), conv_backward_naive(dout, cache_naive)):
        assert_close_to(got, ref)
    assert len(calls) == 2 and set(calls) == {algorithm == "im2col"}  # forward, then dx
    with pytest.raises(ValueError, match=r"conv_param\['algorithm'\] must be one of \('im2col', 'im2col-whole', "
                                         r"'winograd'\), got 'fft'"):
        conv_forward(x, w, b, {**cp, "algorithm": "fft"})


NONCONTIGUOUS_VIEWS = {
    "flipped": lambda a: a[:, :, ::-1, ::-1],
    "every_other": lambda a: np.repeat(a, 2, axis=3)[:, :, :, ::2],
    "fortran": np.asfortranarray,
    "channels_last": lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
}


@pytest.mark.parametrize("view", list(NONCONTIGUOUS_VIEWS))
@pytest.mark.parametrize("pad", [0, 1])
def test_conv_noncontiguous_input(view, pad, rng):
    """The fast path reads x through strides: views must give the same as a contiguous copy."""
    x, w, b, _ = make_conv((2, 3, 6, 6, 2, 3, 3, 1, 1), rng)
    cp = {"stride": 1, "pad": pad}
    xv = NONCONTIGUOUS_VIEWS[view](x)
    out, cache = conv_forward(xv, w, b, cp)
    out_ref, cache_ref = conv_forward_naive(np.ascontiguousarray(xv), w, b, cp)
    assert_close_to(out, out_ref)
    dout = rng.standard_normal(out.shape)
    for got, ref in zip(conv_backward(dout, cache), conv_backward_naive(dout, cache_ref)):
        assert_close_to(got, ref)


@pytest.mark.parametrize("shape", CONV_SHAPES[:6], ids=conv_ids)
def test_conv_numerical_gradients(shape, rng, check_gradients):
    x, w, b, cp = make_conv(shape, rng)
    check_gradients(conv_forward, conv_backward, {"x": x, "w": w, "b": b, "cp": cp},
                    wrt=("x", "w", "b"))


@pytest.mark.parametrize("shape", [CONV_SHAPES[1], CONV_SHAPES[3]], ids=conv_ids)
def test_conv_backward_without_dx(shape, rng):
    x, w, b, cp = make_conv(shape, rng)
    out, cache = conv_forward(x, w, b, cp)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = conv_backward(dout, cache)
    no_dx, dw2, db2 = conv_backward(dout, cache, compute_dx=False)
    assert dx is not None and no_dx is None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


# ---------------------------------------------------------------- max pooling

# (N, C, H, W, pool_height, pool_width, stride)
POOL_SHAPES = [
    (2, 3, 4, 4, 2, 2, 2),   # windows tile exactly (reshape fast path)
    (2, 2, 6, 6, 3, 3, 3),   # tile with 3x3
    (2, 2, 7, 7, 3, 3, 2),   # overlapping windows, 7x7 not a multiple of the window
    (1, 2, 5, 4, 3, 2, 1),   # 3x2 window, stride 1
    (2, 1, 6, 8, 2, 4, 2),   # 2x4 window, stride 2 (non-square: strided path)
    (1, 1, 8, 8, 2, 2, 3),   # stride larger than the window: some pixels in no window
    (1, 3, 5, 5, 5, 5, 1),   # one global window
    (2, 2, 6, 6, 2, 2, 2),   # tiles, more windows
]


def pool_ids(shape):
    n, c, h, w, ph, pw, s = shape
    return f"N{n}C{c}_{h}x{w}_win{ph}x{pw}_s{s}"


def pool_param_of(shape):
    return {"pool_height": shape[4], "pool_width": shape[5], "stride": shape[6]}


def distinct_input(shape, rng, gap=0.01):
    """Values that are all distinct, at least `gap` apart: no ties within 2h of each other."""
    size = int(np.prod(shape))
    return rng.permutation(size).reshape(shape) * gap - size * gap / 2


def pool_reference(x, pool_param):
    """Max pooling by numpy's sliding windows (independent of dpnet)."""
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    win = sliding_window_view(x, (ph, pw), axis=(2, 3))[:, :, ::s, ::s]
    return win.max(axis=(4, 5))


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=pool_ids)
def test_pool_output_shape_formula(shape):
    n, c, h, w, ph, pw, s = shape
    got = pool_output_shape((n, c, h, w), pool_param_of(shape))
    assert got == (ph, pw, s, 1 + (h - ph) // s, 1 + (w - pw) // s)


@pytest.mark.parametrize("relu_first", [False, True], ids=["random", "relu_ties"])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=pool_ids)
def test_pool_matches_naive(shape, relu_first, rng):
    """Forward and backward agree with the naive loops, also on ReLU'd inputs full of
    tied zeros, where both must route each window's gradient to its first maximum."""
    x = rng.standard_normal(shape[:4])
    if relu_first:
        x = np.maximum(x, 0)
    pp = pool_param_of(shape)
    out, cache = max_pool_forward(x, pp)
    out_naive, cache_naive = max_pool_forward_naive(x, pp)
    np.testing.assert_array_equal(out, out_naive)
    np.testing.assert_array_equal(out_naive, pool_reference(x, pp))
    dout = rng.standard_normal(out.shape)
    dx = max_pool_backward(dout, cache)
    dx_naive = max_pool_backward_naive(dout, cache_naive)
    assert_close_to(dx, dx_naive)
    # every window hands its whole gradient to exactly one element
    np.testing.assert_allclose(dx.sum(), dout.sum(), rtol=1e-12)


@pytest.mark.parametrize("pp, expected_hits", [
    # all-zero 4x4, 2x2 windows, stride 2: first element of each window
    ({"pool_height": 2, "pool_width": 2, "stride": 2}, [(0, 0), (0, 2), (2, 0), (2, 2)]),
    # all-zero 5x5, overlapping 3x3 windows, stride 2
    ({"pool_height": 3, "pool_width": 3, "stride": 2}, [(0, 0), (0, 2), (2, 0), (2, 2)]),
    # all-zero 4x4, 3x2 windows, stride 1: windows at rows 0..1, cols 0..2
    ({"pool_height": 3, "pool_width": 2, "stride": 1},
     [(r, c) for r in range(2) for c in range(3)]),
])
@pytest.mark.parametrize("backward", [max_pool_backward, max_pool_backward_naive],
                         ids=["fast", "naive"])
def test_pool_all_ties_go_to_first_element(pp, expected_hits, backward):
    size = 5 if pp["pool_height"] == 3 and pp["stride"] == 2 else 4
    x = np.zeros((1, 1, size, size))
    forward = max_pool_forward if backward is max_pool_backward else max_pool_forward_naive
    out, cache = forward(x, pp)
    dout = np.arange(1.0, out.size + 1).reshape(out.shape)
    dx = backward(dout, cache)
    expected = np.zeros_like(x)
    for (r, c), g in zip(expected_hits, dout.ravel()):
        expected[0, 0, r, c] += g
    np.testing.assert_array_equal(dx, expected)


@pytest.mark.parametrize("view", list(NONCONTIGUOUS_VIEWS))
@pytest.mark.parametrize("shape", [POOL_SHAPES[0], POOL_SHAPES[2]], ids=pool_ids)
def test_pool_noncontiguous_input(view, shape, rng):
    xv = NONCONTIGUOUS_VIEWS[view](rng.standard_normal(shape[:4]))
    pp = pool_param_of(shape)
    out, cache = max_pool_forward(xv, pp)
    out_ref, cache_ref = max_pool_forward_naive(np.ascontiguousarray(xv), pp)
    np.testing.assert_array_equal(out, out_ref)
    dout = rng.standard_normal(out.shape)
    assert_close_to(max_pool_backward(dout, cache), max_pool_backward_naive(dout, cache_ref))


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=pool_ids)
def test_pool_numerical_gradient(shape, rng, check_gradients):
    x = distinct_input(shape[:4], rng)
    check_gradients(max_pool_forward, max_pool_backward, {"x": x, "pp": pool_param_of(shape)},
                    wrt=("x",))
