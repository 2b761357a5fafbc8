"""Winograd F(4x4, 3x3) convolution against the naive loops (float64), a float64 reference with an
asserted float32 bound, and numerical gradients; sizes that are not multiples of the 4x4 tile."""

import numpy as np
import pytest

from dpnet.gradient_check import eval_numerical_gradient_array, normwise_rel_error
from dpnet.layers import conv_backward, conv_backward_naive, conv_forward, conv_forward_naive
from dpnet.layers.winograd import winograd_applies, winograd_conv_backward, winograd_conv_forward

PARAM = {"stride": 1, "pad": 1}


@pytest.mark.parametrize("shape, filters", [((2, 3, 8, 8), 4), ((2, 3, 7, 5), 4), ((1, 2, 4, 4), 3),
                                            ((3, 5, 9, 6), 2), ((2, 1, 1, 1), 2)])
def test_winograd_equals_the_naive_loops(shape, filters):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal(shape), rng.standard_normal((filters, shape[1], 3, 3)), rng.standard_normal(filters)
    out, cache = winograd_conv_forward(x, w, b, PARAM)
    ref, ref_cache = conv_forward_naive(x, w, b, PARAM)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    dout = rng.standard_normal(out.shape)
    dx, dw, db = winograd_conv_backward(dout, cache)
    rdx, rdw, rdb = conv_backward_naive(dout, ref_cache)
    for got, want in ((dx, rdx), (dw, rdw), (db, rdb)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    assert winograd_conv_backward(dout, cache, compute_dx=False)[0] is None


def test_winograd_float32_error_is_bounded():
    """float32 against a float64 reference: the transforms' constants amplify rounding, so the
    bound is looser than im2col's but fixed (measured 6.9e-6 for this layer)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 64, 16, 16)).astype(np.float32)
    w = (rng.standard_normal((64, 64, 3, 3)) * 0.06).astype(np.float32)
    ref, ref_cache = conv_forward(x.astype(np.float64), w.astype(np.float64), None, PARAM)
    out, cache = winograd_conv_forward(x, w, None, PARAM)
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() <= 2e-5 * np.abs(ref).max()
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dx, dw, _ = winograd_conv_backward(dout, cache)
    rdx, rdw, _ = conv_backward(dout.astype(np.float64), ref_cache)
    assert np.abs(dx - rdx).max() <= 2e-5 * np.abs(rdx).max()
    assert np.abs(dw - rdw).max() <= 2e-5 * np.abs(rdw).max()


def test_winograd_gradients_match_numerical():
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((2, 2, 5, 6)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
    out, cache = winograd_conv_forward(x, w, b, PARAM)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = winograd_conv_backward(dout, cache)
    for arg, analytic in ((x, dx), (w, dw), (b, db)):
        numerical = eval_numerical_gradient_array(lambda _: winograd_conv_forward(x, w, b, PARAM)[0], arg, dout)
        assert normwise_rel_error(numerical, analytic) < 1e-8


def test_winograd_takes_only_3x3_stride_1_pad_1():
    assert winograd_applies((4, 3, 3, 3), PARAM)
    for w_shape, param in (((4, 3, 5, 5), PARAM), ((4, 3, 3, 3), {"stride": 2, "pad": 1}),
                           ((4, 3, 3, 3), {"stride": 1, "pad": 0})):
        assert not winograd_applies(w_shape, param)
        with pytest.raises(ValueError, match="Winograd F\\(4x4, 3x3\\) takes 3x3 filters with stride 1 and pad 1"):
            winograd_conv_forward(np.zeros((1, 3, 8, 8)), np.zeros(w_shape), None, param)


@pytest.mark.parametrize("kind", ["convnet", "resnet"])
def test_models_with_winograd_equal_im2col(kind):
    """conv_algorithm='winograd' changes how the 3x3 stride-1 convolutions are computed, not what:
    float64 losses and gradients agree with im2col's to rounding, one process and 2 simulated
    ranks with sync batchnorm alike."""
    from dpnet.models import ConvNet, ResNet
    from dpnet.parallel import SimComm
    from tests.parallel_cases import make_dp

    def build(algorithm, **kw):
        if kind == "convnet":
            return ConvNet(input_dim=(3, 8, 8), stages=((4, 4), (5,)), hidden_dims=(6,), dtype=np.float64,
                           reg=0.05, seed=3, conv_algorithm=algorithm, **kw)
        return ResNet(depth=8, input_dim=(3, 8, 8), widths=(3, 4, 5), dtype=np.float64, reg=0.05, seed=3,
                      conv_algorithm=algorithm, **kw)

    rng = np.random.default_rng(4)
    X, y = 2 * rng.standard_normal((6, 3, 8, 8)), rng.integers(0, 10, 6)
    ref_loss, ref = build("im2col").loss(X, y)
    loss, grads = build("winograd").loss(X, y)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for name, g in ref.items():
        assert np.abs(grads[name] - g).max() <= 1e-10 * max(np.abs(g).max(), 1e-300), name

    def shard(comm, bn_mode="sync"):
        dp = make_dp(build("winograd", bn_mode=bn_mode), comm, "allreduce")
        lo, hi = comm.rank * 3, comm.rank * 3 + 3
        shard_loss, _ = dp.loss(X[lo:hi], y[lo:hi], global_batch_size=6)
        out = shard_loss, {k: v.copy() for k, v in dp.grads.items()}
        dp.close()
        return out

    def within_bound(grads):
        return all(np.abs(grads[name] - g).max() <= 1e-10 * max(np.abs(g).max(), 1e-300) for name, g in ref.items())
    for shard_loss, shard_grads in SimComm(2).run(shard):
        assert shard_loss == pytest.approx(ref_loss, rel=1e-12)
        assert within_bound(shard_grads)
    # negative control: per-shard (local) statistics are a different computation, and the bound sees it
    assert not any(within_bound(g) for _, g in SimComm(2).run(lambda comm: shard(comm, "local")))
