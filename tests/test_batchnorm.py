"""Batch normalization (1-D and spatial): gradients, the homework's statistics checks,
the running-average convention, float32 accuracy and merge_moments."""

import numpy as np
import pytest

from dpnet.layers import (batchnorm_backward, batchnorm_forward, merge_moments,
                          spatial_batchnorm_backward, spatial_batchnorm_forward)

# Each variant: forward, backward, example shape, the axes statistics are taken over.
VARIANTS = {
    "batchnorm": (batchnorm_forward, batchnorm_backward, (16, 3), (0,)),
    "spatial": (spatial_batchnorm_forward, spatial_batchnorm_backward, (4, 3, 3, 5), (0, 2, 3)),
}
CHANNEL_MEANS = np.array([3.0, -2.0, 10.0])
CHANNEL_SCALES = np.array([2.0, 0.5, 4.0])


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return VARIANTS[request.param]


def per_channel(v, ndim):
    """Reshape a (C,) vector to broadcast against an (N, C, ...) array."""
    return np.reshape(v, (1, -1) + (1,) * (ndim - 2))


def sample(shape, rng, means=CHANNEL_MEANS, scales=CHANNEL_SCALES):
    """Data with the given per-channel means and standard deviations."""
    z = rng.standard_normal(shape)
    return per_channel(means, len(shape)) + per_channel(scales, len(shape)) * z


def channel_stats(out, axes):
    return out.mean(axis=axes), out.std(axis=axes)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("seed", [0, 1])
def test_batchnorm_numerical_gradients(variant, seed, check_gradients):
    forward, backward, shape, _ = variant
    rng = np.random.default_rng(seed)
    x = sample(shape, rng)
    gamma = rng.uniform(0.5, 2.0, 3)
    beta = rng.standard_normal(3)
    check_gradients(forward, backward,
                    {"x": x, "gamma": gamma, "beta": beta, "bn_param": {"mode": "train"}},
                    wrt=("x", "gamma", "beta"), seed=seed)


def test_spatial_equals_batchnorm_on_flattened_pixels(rng):
    """Spatial batchnorm is 1-D batchnorm over (N*H*W, C), forward and backward."""
    n, c, h, w = 3, 3, 2, 4
    x = sample((n, c, h, w), rng)
    gamma, beta = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    dout = rng.standard_normal(x.shape)

    def flat(a):
        return a.transpose(0, 2, 3, 1).reshape(-1, c)

    def unflat(a):
        return a.reshape(n, h, w, c).transpose(0, 3, 1, 2)

    out_s, cache_s = spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
    out_f, cache_f = batchnorm_forward(flat(x), gamma, beta, {"mode": "train"})
    np.testing.assert_allclose(out_s, unflat(out_f), rtol=1e-12, atol=1e-12)
    dx_s, dg_s, db_s = spatial_batchnorm_backward(dout, cache_s)
    dx_f, dg_f, db_f = batchnorm_backward(flat(dout), cache_f)
    np.testing.assert_allclose(dx_s, unflat(dx_f), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dg_s, dg_f, rtol=1e-12)
    np.testing.assert_allclose(db_s, db_f, rtol=1e-12)


# ---------------------------------------------------------------- train-mode statistics

def test_train_forward_normalises_each_channel(variant, rng):
    forward, _, shape, axes = variant
    x = sample(shape, rng)
    out, _ = forward(x, np.ones(3), np.zeros(3), {"mode": "train"})
    means, stds = channel_stats(out, axes)
    np.testing.assert_allclose(means, 0, atol=1e-10)
    np.testing.assert_allclose(stds, 1, rtol=1e-4)  # eps = 1e-5 shrinks them a little
    # closed form
    mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    np.testing.assert_allclose(out, (x - mu) / np.sqrt(var + 1e-5), rtol=1e-12, atol=1e-12)


def test_train_forward_applies_gamma_and_beta(variant, rng):
    forward, _, shape, axes = variant
    x = sample(shape, rng)
    gamma, beta = np.array([1.0, 2.0, 3.0]), np.array([11.0, 12.0, 13.0])
    out, _ = forward(x, gamma, beta, {"mode": "train"})
    means, stds = channel_stats(out, axes)
    np.testing.assert_allclose(means, beta, rtol=1e-12)
    np.testing.assert_allclose(stds, gamma, rtol=1e-4)


def test_test_mode_uses_running_statistics(variant, rng):
    """The homework's check: after 50 train-mode batches from a fixed distribution,
    test mode normalises fresh data from it to about zero mean and unit std."""
    forward, _, shape, axes = variant
    gamma, beta = np.ones(3), np.zeros(3)
    bn_param = {"mode": "train"}
    for _ in range(50):
        forward(sample(shape, rng), gamma, beta, bn_param)
    bn_param["mode"] = "test"
    running = bn_param["running_mean"].copy(), bn_param["running_var"].copy()
    x = sample((4 * shape[0],) + shape[1:], rng)
    out, _ = forward(x, gamma, beta, bn_param)
    means, stds = channel_stats(out, axes)
    np.testing.assert_allclose(means, 0, atol=0.2)
    np.testing.assert_allclose(stds, 1, atol=0.2)
    # exactly the running statistics, which test mode leaves unchanged
    rm, rv = (per_channel(r, x.ndim) for r in running)
    np.testing.assert_allclose(out, (x - rm) / np.sqrt(rv + 1e-5), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(bn_param["running_mean"], running[0])
    np.testing.assert_array_equal(bn_param["running_var"], running[1])


def test_running_average_convention(variant, rng):
    """running = momentum * running + (1 - momentum) * batch stat, with the BIASED
    variance, starting from running_mean = 0 and running_var = 0 (the homework's start)."""
    forward, _, shape, axes = variant
    gamma, beta = np.ones(3), np.zeros(3)
    bn_param = {"mode": "train"}  # default momentum 0.9
    x1 = sample((2,) + shape[1:], rng)  # few samples: biased and unbiased differ a lot
    forward(x1, gamma, beta, bn_param)
    expected_mean = 0.1 * x1.mean(axis=axes)
    expected_var = 0.1 * x1.var(axis=axes, ddof=0)
    np.testing.assert_allclose(bn_param["running_mean"], expected_mean, rtol=1e-12)
    np.testing.assert_allclose(bn_param["running_var"], expected_var, rtol=1e-12)

    bn_param["momentum"] = 0.7
    x2 = sample(shape, rng)
    forward(x2, gamma, beta, bn_param)
    expected_mean = 0.7 * expected_mean + 0.3 * x2.mean(axis=axes)
    expected_var = 0.7 * expected_var + 0.3 * x2.var(axis=axes, ddof=0)
    np.testing.assert_allclose(bn_param["running_mean"], expected_mean, rtol=1e-12)
    np.testing.assert_allclose(bn_param["running_var"], expected_var, rtol=1e-12)


def test_fresh_running_statistics_are_the_homeworks(variant, rng):
    """A fresh bn_param starts at running_mean = running_var = 0, as the homework's
    batchnorm_forward does, so one train step leaves exactly (1 - momentum) * the batch's
    statistics (the float64 merge of a single shard returns its mean and M2 / n)."""
    forward, _, shape, axes = variant
    x = sample(shape, rng)
    bn_param = {"mode": "train", "momentum": 0.75}  # 1 - 0.75 is exact in binary
    forward(x, np.ones(3), np.zeros(3), bn_param)
    batch = {"mode": "train", "momentum": 0.0}  # running = 0 * 0 + 1 * the batch's statistics
    forward(x, np.ones(3), np.zeros(3), batch)
    np.testing.assert_array_equal(bn_param["running_mean"], 0.25 * batch["running_mean"])
    np.testing.assert_array_equal(bn_param["running_var"], 0.25 * batch["running_var"])
    centered = x - x.mean(axis=axes, keepdims=True)
    np.testing.assert_allclose(batch["running_mean"], x.mean(axis=axes), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(batch["running_var"], (centered * centered).sum(axis=axes) / (x.size // 3), rtol=1e-13)


def test_backward_needs_train_mode_cache(variant, rng):
    forward, backward, shape, _ = variant
    bn_param = {"mode": "test"}
    out, cache = forward(sample(shape, rng), np.ones(3), np.zeros(3), bn_param)
    with pytest.raises(ValueError, match="train-mode forward"):
        backward(np.ones_like(out), cache)


def test_empty_batch_is_passed_through(variant):
    forward, backward, shape, _ = variant
    x = np.zeros((0,) + shape[1:])
    bn_param = {"mode": "train"}
    out, cache = forward(x, np.ones(3), np.zeros(3), bn_param)
    assert out.shape == x.shape
    np.testing.assert_array_equal(bn_param["running_mean"], np.zeros(3))
    np.testing.assert_array_equal(bn_param["running_var"], np.zeros(3))
    dx, dgamma, dbeta = backward(out, cache)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dgamma, np.zeros(3))
    np.testing.assert_array_equal(dbeta, np.zeros(3))


# ---------------------------------------------------------------- float32 accuracy

def test_float32_large_mean_keeps_variance(variant, rng):
    """float32 data with mean 1e3 and std exactly 1 (per channel): the batch variance
    must come out within 1% of 1, which a one-pass E[x^2] - E[x]^2 would not."""
    forward, _, shape, axes = variant
    big = (64,) + shape[1:]
    z = rng.standard_normal(big)
    z = (z - z.mean(axis=axes, keepdims=True)) / z.std(axis=axes, keepdims=True)
    x = (1e3 + z).astype(np.float32)
    bn_param = {"mode": "train", "momentum": 0.0}  # running stats = this batch's stats
    out, _ = forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), bn_param)
    assert out.dtype == np.float32
    np.testing.assert_allclose(bn_param["running_mean"], 1e3, rtol=1e-6)
    np.testing.assert_allclose(bn_param["running_var"], 1, rtol=0.01)
    means, stds = channel_stats(out.astype(np.float64), axes)
    np.testing.assert_allclose(means, 0, atol=0.01)
    np.testing.assert_allclose(stds, 1, rtol=0.01)


def test_float32_large_planes_keep_their_statistics(rng):
    """Planes of 256 x 1024 pixels, float32, mean 1e4: the sums over a plane must not drift
    as they grow (each is formed in float32 blocks, added in float64), forward and backward."""
    z = rng.standard_normal((2, 3, 256, 1024))
    z = (z - z.mean(axis=(0, 2, 3), keepdims=True)) / z.std(axis=(0, 2, 3), keepdims=True)
    x = (1e4 + z).astype(np.float32)
    bn_param = {"mode": "train", "momentum": 0.0}
    out, cache = spatial_batchnorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), bn_param)
    np.testing.assert_allclose(bn_param["running_mean"], 1e4, rtol=1e-7)
    np.testing.assert_allclose(bn_param["running_var"], 1, rtol=1e-3)
    means, stds = channel_stats(out.astype(np.float64), (0, 2, 3))
    np.testing.assert_allclose(means, 0, atol=1e-3)
    np.testing.assert_allclose(stds, 1, rtol=1e-3)
    dout = (5 + rng.standard_normal(x.shape)).astype(np.float32)
    _, dgamma, dbeta = spatial_batchnorm_backward(dout, cache)
    d64 = dout.astype(np.float64)
    np.testing.assert_allclose(dbeta, d64.sum(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(dgamma, (d64 * cache[0]).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-2)


# ---------------------------------------------------------------- merge_moments

def moment_row(x):
    """The documented per-shard row [count, mean (C,), M2 (C,)] of x (N, C), in float64."""
    count, channels = x.shape
    if count == 0:
        return np.concatenate([[0.0], np.zeros(2 * channels)])
    mean = x.mean(axis=0)
    return np.concatenate([[count], mean, ((x - mean) ** 2).sum(axis=0)])


@pytest.mark.parametrize("sizes", [[7], [3, 4], [3, 0, 5, 2], [0, 6], [1, 1, 1, 1, 1]])
def test_merge_moments_equals_whole_batch(sizes, rng):
    x = 1e3 + rng.standard_normal((sum(sizes), 4)) * np.array([1.0, 0.1, 5.0, 2.0])
    shards = np.split(x, np.cumsum(sizes)[:-1])
    count, mean, var = merge_moments(np.stack([moment_row(s) for s in shards]))
    assert count == x.shape[0]
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, x.var(axis=0), rtol=1e-12)


def test_merge_moments_of_nothing():
    count, mean, var = merge_moments(np.zeros((2, 1 + 2 * 3)))
    assert (count, mean, var) == (0, None, None)
