"""The residual network's layers (shortcut, residual add + ReLU, global average pooling, the
convolution without bias) against their naive twins and numerical gradients, and the CIFAR
ResNet model: its layout, gradients and input checks."""

import numpy as np
import pytest

from dpnet.gradient_check import eval_numerical_gradient, eval_numerical_gradient_array, normwise_rel_error
from dpnet.layers import (conv_backward, conv_backward_naive, conv_forward, conv_forward_naive,
                          global_avg_pool_backward, global_avg_pool_backward_naive, global_avg_pool_forward,
                          global_avg_pool_forward_naive, residual_relu_backward, residual_relu_forward,
                          shortcut_backward, shortcut_backward_naive, shortcut_forward, shortcut_forward_naive)
from dpnet.models import ResNet

GRAD_TOL = 1e-7  # as tests/test_models.py: normwise relative error of analytic vs numerical gradients


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("shape, out_channels, stride", [((2, 3, 8, 8), 6, 2), ((2, 4, 7, 5), 8, 2),
                                                         ((1, 3, 4, 4), 4, 1), ((2, 2, 6, 6), 5, 3)])
def test_shortcut_equals_its_naive_twin_and_numerical_gradient(shape, out_channels, stride):
    x = rng().standard_normal(shape)
    out, cache = shortcut_forward(x, out_channels, stride)
    ref, ref_cache = shortcut_forward_naive(x, out_channels, stride)
    assert out.shape == (shape[0], out_channels, -(-shape[2] // stride), -(-shape[3] // stride))
    assert np.array_equal(out, ref)
    before = (out_channels - shape[1]) // 2
    assert not out[:, :before].any() and not out[:, before + shape[1]:].any()  # the padded channels are 0
    dout = rng(1).standard_normal(out.shape)
    dx = shortcut_backward(dout, cache)
    assert np.array_equal(dx, shortcut_backward_naive(dout, ref_cache))
    numerical = eval_numerical_gradient_array(lambda v: shortcut_forward(v, out_channels, stride)[0], x, dout)
    assert normwise_rel_error(numerical, dx) < GRAD_TOL


def test_shortcut_rejects_fewer_channels():
    with pytest.raises(ValueError, match="out_channels must be at least the input's 4 channels, got 2"):
        shortcut_forward(np.zeros((1, 4, 4, 4)), 2, 2)


def test_residual_relu_gradient_goes_to_both_branches():
    x, s = rng().standard_normal((2, 3, 4, 4)), rng(1).standard_normal((2, 3, 4, 4))
    out, cache = residual_relu_forward(x, s)
    assert np.array_equal(out, np.maximum(x + s, 0))
    dout = rng(2).standard_normal(out.shape)
    dx, ds = residual_relu_backward(dout, cache)
    for arg, analytic in ((x, dx), (s, ds)):
        numerical = eval_numerical_gradient_array(lambda _: residual_relu_forward(x, s)[0], arg, dout)
        assert normwise_rel_error(numerical, analytic) < GRAD_TOL
    dx[...] = 0  # separate arrays: changing one leaves the other
    assert np.array_equal(ds, np.where(out > 0, dout, 0))
    with pytest.raises(ValueError, match="one shape"):
        residual_relu_forward(x, s[:, :2])


def test_global_average_pooling_equals_its_naive_twin_and_numerical_gradient():
    x = rng().standard_normal((3, 4, 5, 6))
    out, cache = global_avg_pool_forward(x)
    ref, _ = global_avg_pool_forward_naive(x)
    np.testing.assert_allclose(out, ref, rtol=1e-13)
    dout = rng(1).standard_normal(out.shape)
    dx = global_avg_pool_backward(dout, cache)
    np.testing.assert_allclose(dx, global_avg_pool_backward_naive(dout, cache), rtol=1e-13)
    numerical = eval_numerical_gradient_array(lambda v: global_avg_pool_forward(v)[0], x, dout)
    assert normwise_rel_error(numerical, dx) < GRAD_TOL


@pytest.mark.parametrize("stride", [1, 2])
def test_convolution_without_bias(stride):
    x, w = rng().standard_normal((2, 3, 7, 7)), rng(1).standard_normal((4, 3, 3, 3))
    param = {"stride": stride, "pad": 1}
    out, cache = conv_forward(x, w, None, param)
    zero_bias, _ = conv_forward(x, w, np.zeros(4), param)
    assert np.array_equal(out, zero_bias)
    np.testing.assert_allclose(out, conv_forward_naive(x, w, None, param)[0], rtol=1e-12, atol=1e-12)
    dout = rng(2).standard_normal(out.shape)
    dx, dw, _ = conv_backward(dout, cache)
    ndx, ndw, _ = conv_backward_naive(dout, conv_forward_naive(x, w, None, param)[1])
    np.testing.assert_allclose(dx, ndx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, ndw, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ the model

def tiny(seed=3, **kwargs):
    """ResNet-8 (one block per stage) on 3x8x8 images with 2, 3, 4 channels, float64."""
    args = dict(depth=8, input_dim=(3, 8, 8), widths=(2, 3, 4), dtype=np.float64, seed=seed, reg=0.1)
    args.update(kwargs)
    return ResNet(**args)


def test_resnet20_has_the_papers_layout():
    model = ResNet(depth=20)
    convs = [k for k in model.params if k.startswith("W")][:-1]
    assert len(convs) == 19 and len(model.bn_params) == 19  # 1 + 3 stages x 3 blocks x 2
    assert model.params["W1"].shape == (16, 3, 3, 3)
    assert model.params["W8"].shape == (32, 16, 3, 3) and model.params["W14"].shape == (64, 32, 3, 3)
    assert model.params["W20"].shape == (64, 10) and model.params["b20"].shape == (10,)
    assert not any(k.startswith("b") and k[1:].isdigit() and k != "b20" for k in model.params)  # convs: no bias
    # "0.27M" in the paper's table 6: convs 432 + 6 x 2304 + 4608 + 5 x 9216 + 18432 + 5 x 36864,
    # batchnorm 2 x (6 x (16 + 32 + 64) + 16), affine 64 x 10 + 10
    assert sum(p.size for p in model.params.values()) == 269722
    assert [s for s, _, _ in model.blocks] == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    scores = model.loss(np.zeros((2, 3, 32, 32), dtype=np.float32))
    assert scores.shape == (2, 10) and scores.dtype == np.float32


@pytest.mark.parametrize("bn_mode", ["local", "sync"])
def test_resnet_gradients_match_numerical(bn_mode):
    model = tiny(bn_mode=bn_mode)
    X = 2 * rng(3).standard_normal((4, 3, 8, 8))
    y = rng(4).integers(0, 10, 4)
    loss, grads = model.loss(X, y)
    assert set(grads) == set(model.params)
    errors = {}
    for name, param in model.params.items():
        numerical = eval_numerical_gradient(lambda: model.loss(X, y)[0], param, h=1e-5)
        errors[name] = normwise_rel_error(numerical, grads[name])
    assert model.loss(X, y)[0] == loss
    bad = {k: v for k, v in errors.items() if not v <= 1e-6}
    assert not bad, f"relative gradient errors above 1e-6: {bad}"


def test_resnet_regularizes_the_weights_only():
    X, y = 2 * rng(3).standard_normal((4, 3, 8, 8)), rng(4).integers(0, 10, 4)
    plain, reg = tiny(reg=0.0), tiny(reg=0.3)
    loss0, grads0 = plain.loss(X, y)
    loss1, grads1 = reg.loss(X, y)
    weights = [k for k in reg.params if k.startswith("W")]
    assert loss1 - loss0 == pytest.approx(0.15 * sum(float(np.sum(reg.params[k] ** 2)) for k in weights), rel=1e-12)
    for k in reg.params:
        np.testing.assert_allclose(grads1[k], grads0[k] + (0.3 * reg.params[k] if k in weights else 0),
                                   rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("depth", [7, 9, 2, 0])
def test_resnet_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match=f"depth must be 6n \\+ 2 with n >= 1 .*got {depth}"):
        ResNet(depth=depth)


def test_resnet_checks_its_input():
    with pytest.raises(ValueError, match=r"X must have shape \(N, 3, 8, 8\), got \(2, 3, 4, 4\)"):
        tiny().loss(np.zeros((2, 3, 4, 4)))
