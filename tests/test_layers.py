"""Affine, ReLU, dropout, losses and sandwich layers; plus, for every layer, float32
in/out, argument errors and empty batches."""

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from dpnet.gradient_check import eval_numerical_gradient, normwise_rel_error, rel_error
from dpnet.layers import (affine_backward, affine_bn_relu_backward, affine_bn_relu_forward,
                          affine_forward, affine_relu_backward, affine_relu_forward,
                          batchnorm_backward, batchnorm_forward, conv_backward,
                          conv_bn_relu_backward, conv_bn_relu_forward,
                          conv_bn_relu_pool_backward, conv_bn_relu_pool_forward, conv_forward,
                          conv_relu_backward, conv_relu_forward, conv_relu_pool_backward,
                          conv_relu_pool_forward, dropout_backward, dropout_forward,
                          max_pool_backward, max_pool_forward, relu_backward, relu_forward,
                          softmax_loss, spatial_batchnorm_backward, spatial_batchnorm_forward,
                          svm_loss)

GRAD_TOL = 1e-6  # as conftest.GRAD_TOL, for the loss checks that call normwise_rel_error directly
KINK_MARGIN = 1e-4  # >> h = 1e-5 times any input-to-kink slope in these small layers


def assert_clear_of_kink(a, margin=KINK_MARGIN):
    """Precondition for a gradient check through a ReLU: no input within `margin` of 0."""
    closest = np.min(np.abs(a))
    assert closest > margin, f"test input {closest:.1e} from the ReLU kink: pick another seed"


def assert_clear_of_ties(a, pool_param, margin=KINK_MARGIN):
    """Precondition for a gradient check through max pooling: in every window the
    largest value beats the runner-up by more than `margin`."""
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    win = sliding_window_view(a, (ph, pw), axis=(2, 3))[:, :, ::s, ::s]
    top2 = np.sort(win.reshape(win.shape[:4] + (-1,)), axis=-1)[..., -2:]
    gap = np.min(top2[..., 1] - top2[..., 0])
    assert gap > margin, f"test input has a pooling near-tie ({gap:.1e}): pick another seed"


# ---------------------------------------------------------------- affine

@pytest.mark.parametrize("x_shape, m", [((3, 4), 5), ((2, 3, 2), 4), ((1, 2, 2, 2), 3)])
def test_affine_forward_closed_form(x_shape, m, rng):
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((int(np.prod(x_shape[1:])), m))
    b = rng.standard_normal(m)
    out, _ = affine_forward(x, w, b)
    expected = np.array([[sum(xi.ravel()[d] * w[d, j] for d in range(w.shape[0])) + b[j]
                          for j in range(m)] for xi in x])
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_affine_forward_homework_values():
    """The CS231n affine_forward check, with its published expected output."""
    num_inputs, input_shape, output_dim = 2, (4, 5, 6), 3
    input_size = num_inputs * np.prod(input_shape)
    weight_size = output_dim * np.prod(input_shape)
    x = np.linspace(-0.1, 0.5, num=input_size).reshape(num_inputs, *input_shape)
    w = np.linspace(-0.2, 0.3, num=weight_size).reshape(np.prod(input_shape), output_dim)
    b = np.linspace(-0.3, 0.1, num=output_dim)
    out, _ = affine_forward(x, w, b)
    correct_out = np.array([[1.49834967, 1.70660132, 1.91485297],
                            [3.25553199, 3.5141327, 3.77273342]])
    assert rel_error(out, correct_out) < 1e-8


@pytest.mark.parametrize("x_shape, m", [((3, 4), 5), ((2, 3, 2), 4)])
def test_affine_numerical_gradients(x_shape, m, rng, check_gradients):
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((int(np.prod(x_shape[1:])), m))
    b = rng.standard_normal(m)
    check_gradients(affine_forward, affine_backward, {"x": x, "w": w, "b": b},
                    wrt=("x", "w", "b"))


# ---------------------------------------------------------------- relu

def test_relu_forward_closed_form():
    x = np.linspace(-0.5, 0.5, num=12).reshape(3, 4)
    out, _ = relu_forward(x)
    np.testing.assert_array_equal(out, np.where(x > 0, x, 0.0))


def test_relu_numerical_gradient(rng, check_gradients):
    x = rng.standard_normal((4, 5, 3))
    assert_clear_of_kink(x)
    check_gradients(relu_forward, relu_backward, {"x": x}, wrt=("x",))


# ---------------------------------------------------------------- dropout

def train_param(p, seed=7):
    """A fresh train-mode dropout_param: every forward with it draws the same mask."""
    return {"p": p, "mode": "train", "seed": seed}


@pytest.mark.parametrize("p", [0.3, 0.75])
def test_dropout_numerical_gradient(p, rng, check_gradients):
    x = rng.standard_normal((5, 6))
    # a fresh dict per call resets the cached Generator, so the mask is fixed
    forward = lambda x: dropout_forward(x, train_param(p))  # noqa: E731
    out, _ = forward(x)
    assert 0 < np.count_nonzero(out) < out.size  # the mask actually drops something
    check_gradients(forward, dropout_backward, {"x": x}, wrt=("x",))


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_dropout_train_statistics(p):
    """Inverted dropout keeps a fraction ~p of units, scaled by 1/p: E[out] = x."""
    x = np.ones((500, 200))
    out, _ = dropout_forward(x, train_param(p))
    assert set(np.unique(out)) <= {0.0, 1 / p}
    assert abs(np.mean(out != 0) - p) < 0.01
    assert abs(out.mean() - 1) < 0.02


def test_dropout_draws_fresh_masks_from_cached_generator():
    x = np.ones((20, 20))
    param = train_param(0.5)
    first, _ = dropout_forward(x, param)
    second, _ = dropout_forward(x, param)
    assert isinstance(param["rng"], np.random.Generator)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(dropout_forward(x, train_param(0.5))[0], first)


@pytest.mark.parametrize("param", [{"p": 0.4, "mode": "test"}, {"p": 1.0, "mode": "train"}],
                         ids=["test_mode", "keep_all"])
def test_dropout_identity(param, rng):
    x = rng.standard_normal((4, 3))
    out, cache = dropout_forward(x, param)
    np.testing.assert_array_equal(out, x)
    dout = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(dropout_backward(dout, cache), dout)


# ---------------------------------------------------------------- losses

def softmax_reference(x, y):
    """-mean log p_y with p = exp(x) / sum exp(x), straight from the definition."""
    losses = []
    for scores, label in zip(x, y):
        probs = np.exp(scores) / np.sum(np.exp(scores))
        losses.append(-np.log(probs[label]))
    return float(np.mean(losses))


def svm_reference(x, y):
    """mean over examples of sum_{j != y} max(0, x_j - x_y + 1), with loops."""
    total = 0.0
    for scores, label in zip(x, y):
        for j, s in enumerate(scores):
            if j != label:
                total += max(0.0, s - scores[label] + 1.0)
    return total / len(x)


LOSSES = {"softmax": (softmax_loss, softmax_reference), "svm": (svm_loss, svm_reference)}


@pytest.fixture(params=sorted(LOSSES))
def loss_pair(request):
    return LOSSES[request.param]


def scores_and_labels(rng, n=6, c=5):
    return rng.standard_normal((n, c)), rng.integers(0, c, n)


def assert_clear_of_hinge(x, y):
    """Precondition for the svm gradient check: no margin x_j - x_y + 1 near 0."""
    margins = x - x[np.arange(len(y)), y][:, None] + 1
    margins[np.arange(len(y)), y] = 1.0
    assert_clear_of_kink(margins)


def test_loss_matches_reference(loss_pair, rng):
    loss_fn, reference = loss_pair
    x, y = scores_and_labels(rng)
    loss, _ = loss_fn(x, y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(reference(x, y), rel=1e-12)


def test_softmax_of_uniform_scores_is_log_c():
    """The homework's sanity check: equal scores give loss log(C), and dx = (1/C - [j = y]) / N."""
    y = np.array([0, 3, 9, 5])
    loss, dx = softmax_loss(np.zeros((4, 10)), y)
    assert loss == pytest.approx(np.log(10), rel=1e-12)
    np.testing.assert_allclose(dx, (np.full((4, 10), 0.1) - np.eye(10)[y]) / 4, rtol=1e-12)


def test_softmax_is_stable_for_large_scores(rng):
    x, y = scores_and_labels(rng)
    loss, dx = softmax_loss(x + 1e4, y)
    assert loss == pytest.approx(softmax_reference(x, y), rel=1e-9)
    assert np.all(np.isfinite(dx))


def test_loss_numerical_gradient(loss_pair, rng):
    loss_fn, _ = loss_pair
    x, y = scores_and_labels(rng)
    assert_clear_of_hinge(x, y)
    _, dx = loss_fn(x, y)
    numerical = eval_numerical_gradient(lambda: loss_fn(x, y)[0], x)
    assert normwise_rel_error(numerical, dx) <= GRAD_TOL


def test_loss_batch_size_rescales(loss_pair, rng):
    loss_fn, _ = loss_pair
    x, y = scores_and_labels(rng)
    loss, dx = loss_fn(x, y)
    loss2, dx2 = loss_fn(x, y, batch_size=2 * len(x))
    assert loss2 == pytest.approx(loss / 2, rel=1e-12)
    np.testing.assert_allclose(dx2, dx / 2, rtol=1e-12)
    loss_n, dx_n = loss_fn(x, y, batch_size=len(x))
    assert loss_n == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(dx_n, dx, rtol=1e-12)


@pytest.mark.parametrize("split", [1, 3, 5])
def test_loss_shards_sum_to_whole_batch(loss_pair, split, rng):
    """Shards normalised by the global batch size add up to the full-batch loss and gradient."""
    loss_fn, _ = loss_pair
    x, y = scores_and_labels(rng, n=6)
    loss, dx = loss_fn(x, y)
    loss_a, dx_a = loss_fn(x[:split], y[:split], batch_size=len(x))
    loss_b, dx_b = loss_fn(x[split:], y[split:], batch_size=len(x))
    assert loss_a + loss_b == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(np.concatenate([dx_a, dx_b]), dx, rtol=1e-12, atol=1e-15)


def test_loss_of_empty_shard_is_zero(loss_pair):
    loss_fn, _ = loss_pair
    loss, dx = loss_fn(np.zeros((0, 5)), np.zeros(0, dtype=np.int64), batch_size=8)
    assert loss == 0
    assert dx.shape == (0, 5)


def test_loss_of_empty_shard_with_empty_label_list(loss_pair):
    loss_fn, _ = loss_pair
    loss, dx = loss_fn(np.zeros((0, 5)), [], batch_size=8)
    assert loss == 0
    assert dx.shape == (0, 5)


def test_loss_of_empty_x_without_batch_size_is_an_error(loss_pair):
    loss_fn, _ = loss_pair
    with pytest.raises(ValueError, match="pass batch_size"):
        loss_fn(np.zeros((0, 5)), np.zeros(0, dtype=np.int64))


# ---------------------------------------------------------------- sandwiches
# Each builder returns (forward, backward, args, relu_inputs, pooled), where relu_inputs are
# the arrays fed to the ReLU and pooled the (array, pool_param) fed to max pooling, checked
# to be clear of kinks and ties before the gradient check.

CONV_PARAM = {"stride": 1, "pad": 1}
POOL_PARAM = {"pool_height": 2, "pool_width": 2, "stride": 2}


def build_affine_relu(rng):
    x, w, b = rng.standard_normal((3, 2, 3)), rng.standard_normal((6, 4)), rng.standard_normal(4)
    a = affine_forward(x, w, b)[0]
    return affine_relu_forward, affine_relu_backward, dict(x=x, w=w, b=b), [a], []


def build_affine_bn_relu(rng):
    x, w, b = rng.standard_normal((4, 5)), rng.standard_normal((5, 3)), rng.standard_normal(3)
    gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    a = affine_forward(x, w, b)[0]
    a = batchnorm_forward(a, gamma, beta, {"mode": "train"})[0]
    args = dict(x=x, w=w, b=b, gamma=gamma, beta=beta, bn_param={"mode": "train"})
    return affine_bn_relu_forward, affine_bn_relu_backward, args, [a], []


def build_conv_relu(rng):
    x, w, b = rng.standard_normal((2, 2, 4, 4)), rng.standard_normal((3, 2, 3, 3)), \
        rng.standard_normal(3)
    a = conv_forward(x, w, b, CONV_PARAM)[0]
    return conv_relu_forward, conv_relu_backward, dict(x=x, w=w, b=b, cp=CONV_PARAM), [a], []


def build_conv_relu_pool(rng):
    x, w, b = rng.standard_normal((2, 2, 4, 4)), rng.standard_normal((3, 2, 3, 3)), \
        rng.standard_normal(3)
    a = conv_forward(x, w, b, CONV_PARAM)[0]
    p = max_pool_forward(a, POOL_PARAM)[0]
    args = dict(x=x, w=w, b=b, cp=CONV_PARAM, pp=POOL_PARAM)
    return conv_relu_pool_forward, conv_relu_pool_backward, args, [p], [(a, POOL_PARAM)]


def conv_bn_inputs(rng):
    """Arguments of conv -> spatial batchnorm (train mode), and that batchnorm's output."""
    x, w, b = rng.standard_normal((2, 2, 4, 4)), rng.standard_normal((3, 2, 3, 3)), \
        rng.standard_normal(3)
    gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    a = conv_forward(x, w, b, CONV_PARAM)[0]
    a = spatial_batchnorm_forward(a, gamma, beta, {"mode": "train"})[0]
    args = dict(x=x, w=w, b=b, gamma=gamma, beta=beta, cp=CONV_PARAM, bn_param={"mode": "train"})
    return args, a


def build_conv_bn_relu(rng):
    args, a = conv_bn_inputs(rng)
    return conv_bn_relu_forward, conv_bn_relu_backward, args, [a], []


def build_conv_bn_relu_pool(rng):
    args, a = conv_bn_inputs(rng)
    p = max_pool_forward(a, POOL_PARAM)[0]
    args["pp"] = POOL_PARAM
    return conv_bn_relu_pool_forward, conv_bn_relu_pool_backward, args, [p], [(a, POOL_PARAM)]


SANDWICHES = [build_affine_relu, build_affine_bn_relu, build_conv_relu, build_conv_relu_pool,
              build_conv_bn_relu, build_conv_bn_relu_pool]


def sandwich_id(build):
    return build.__name__.removeprefix("build_")


def gradient_names(args):
    """The array arguments, in order: backward returns their gradients in this order."""
    return tuple(name for name, value in args.items() if isinstance(value, np.ndarray))


@pytest.mark.parametrize("build", SANDWICHES, ids=sandwich_id)
def test_sandwich_numerical_gradients(build, rng, check_gradients):
    forward, backward, args, relu_inputs, pooled = build(rng)
    for a in relu_inputs:
        assert_clear_of_kink(a)
    for a, pool_param in pooled:
        assert_clear_of_ties(a, pool_param)
    # a bias feeding batchnorm has no effect: its gradient is zero, with no scale to be relative to
    vanishing = ("b",) if "gamma" in args else ()
    check_gradients(forward, backward, args, wrt=gradient_names(args), vanishing=vanishing)


@pytest.mark.parametrize("build", SANDWICHES, ids=sandwich_id)
def test_sandwich_backward_without_dx(build, rng):
    forward, backward, args, _, _ = build(rng)
    out, cache = forward(*args.values())
    dout = rng.standard_normal(out.shape)
    full = backward(dout, cache)
    partial = backward(dout, cache, compute_dx=False)
    assert full[0] is not None and partial[0] is None
    for got, expected in zip(partial[1:], full[1:]):
        np.testing.assert_array_equal(got, expected)


def test_affine_backward_without_dx(rng):
    x, w, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal(2)
    out, cache = affine_forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = affine_backward(dout, cache)
    none, dw2, db2 = affine_backward(dout, cache, compute_dx=False)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


@pytest.mark.parametrize("backward", ["affine", "affine_relu", "affine_bn_relu"])
def test_the_transposed_input_gradient_is_the_naive_sum(backward, rng):
    """AffineProducts('transposed') makes dx as (w @ dout.T).T: each entry the naive sum over
    the layer's outputs, as the plain form's (float64), through every affine backward; the
    outputs, dw and db are the plain form's bits."""
    from dpnet.layers import affine_bn_relu_backward, affine_bn_relu_forward, affine_relu_backward, \
        affine_relu_forward
    from dpnet.layers.affine import AffineProducts
    x, w, b = rng.standard_normal((5, 2, 3)), rng.standard_normal((6, 4)), rng.standard_normal(4)

    def run(dout, form):
        products = AffineProducts(form)
        if backward == "affine":
            out, cache = affine_forward(x, w, b, products)
            return out, affine_backward(dout, cache)
        if backward == "affine_relu":
            out, cache = affine_relu_forward(x, w, b, products)
            return out, affine_relu_backward(dout, cache)
        out, cache = affine_bn_relu_forward(x, w, b, np.ones(4), np.zeros(4), {"mode": "train"}, products=products)
        return out, affine_bn_relu_backward(dout, cache)

    dout = rng.standard_normal((5, 4))
    (out, plain), (out_t, transposed) = run(dout, "plain"), run(dout, "transposed")
    np.testing.assert_array_equal(out_t, out)
    assert transposed[0].shape == x.shape
    np.testing.assert_allclose(transposed[0], plain[0], rtol=1e-12, atol=1e-14)
    if backward != "affine_bn_relu":
        g = dout * (out > 0) if backward == "affine_relu" else dout  # the gradient reaching the product
        naive = np.array([[sum(g[i, m] * w[d, m] for m in range(4)) for d in range(6)] for i in range(5)])
        np.testing.assert_allclose(transposed[0].reshape(5, 6), naive, rtol=1e-12, atol=1e-14)
    for got, expected in zip(transposed[1:], plain[1:]):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match=r"dx_form must be one of \('plain', 'transposed'\), got 'T'"):
        AffineProducts("T")


@pytest.mark.parametrize("backward", ["affine", "affine_relu", "affine_bn_relu"])
def test_affine_weight_gradient_as_factors_is_the_product(backward, rng):
    """dw_factors=True returns dw as WeightGradFactors: its product equals the dense dw (naive
    sum over examples), and nothing else changes."""
    from dpnet.layers import WeightGradFactors, affine_bn_relu_backward, affine_bn_relu_forward, \
        affine_relu_backward, affine_relu_forward
    x, w, b = rng.standard_normal((5, 2, 3)), rng.standard_normal((6, 4)), rng.standard_normal(4)
    if backward == "affine":
        out, cache = affine_forward(x, w, b)
        run = lambda dout, factors: affine_backward(dout, cache, dw_factors=factors)  # noqa: E731
    elif backward == "affine_relu":
        out, cache = affine_relu_forward(x, w, b)
        run = lambda dout, factors: affine_relu_backward(dout, cache, dw_factors=factors)  # noqa: E731
    else:
        out, cache = affine_bn_relu_forward(x, w, b, np.ones(4), np.zeros(4), {"mode": "train"})
        run = lambda dout, factors: affine_bn_relu_backward(dout, cache, dw_factors=factors)  # noqa: E731
    dout = rng.standard_normal(out.shape)
    dense, factored = run(dout, False), run(dout, True)
    dw = factored[1]
    assert isinstance(dw, WeightGradFactors) and dw.shape == (6, 4) and dw.x2.shape == (5, 6)
    naive = sum(np.outer(dw.x2[i], dw.dout[i]) for i in range(5))
    np.testing.assert_allclose(np.asarray(dw), naive, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(dw), dense[1])
    np.testing.assert_array_equal(dw.into(np.empty((6, 4))), dense[1])
    with pytest.raises(ValueError, match="no array to share"):
        np.array(dw, copy=False)
    for got, expected in zip(factored[:1] + factored[2:], dense[:1] + dense[2:]):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("forward_pool", [True, False], ids=["pool", "no_pool"])
def test_conv_relu_pool_equals_composition(forward_pool, rng):
    """The sandwiches compute exactly conv -> ReLU (-> pool), the homework order."""
    x, w, b = rng.standard_normal((2, 2, 4, 4)), rng.standard_normal((3, 2, 3, 3)), \
        rng.standard_normal(3)
    a = np.maximum(conv_forward(x, w, b, CONV_PARAM)[0], 0)
    if forward_pool:
        out, _ = conv_relu_pool_forward(x, w, b, CONV_PARAM, POOL_PARAM)
        expected = max_pool_forward(a, POOL_PARAM)[0]
    else:
        out, _ = conv_relu_forward(x, w, b, CONV_PARAM)
        expected = a
    np.testing.assert_array_equal(out, expected)


# ---------------------------------------------------------------- float32 everywhere
# Each case runs a layer's forward and backward on float32 inputs and parameters and
# returns {name: array} of every output and gradient.

def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def run_forward_backward(forward, backward, args, rng, **backward_kwargs):
    out, cache = forward(*args)
    grads = backward(f32(rng, *out.shape), cache, **backward_kwargs)
    grads = grads if isinstance(grads, tuple) else (grads,)
    return {"out": out, **{f"grad{i}": g for i, g in enumerate(grads)}}


def case_affine(rng):
    return run_forward_backward(affine_forward, affine_backward,
                                (f32(rng, 3, 2, 2), f32(rng, 4, 5), f32(rng, 5)), rng)


def case_relu(rng):
    return run_forward_backward(relu_forward, relu_backward, (f32(rng, 3, 4),), rng)


def case_conv(rng):
    return run_forward_backward(conv_forward, conv_backward,
                                (f32(rng, 2, 2, 5, 5), f32(rng, 3, 2, 3, 3), f32(rng, 3),
                                 {"stride": 2, "pad": 1}), rng)


def case_pool_tiling(rng):
    return run_forward_backward(max_pool_forward, max_pool_backward,
                                (f32(rng, 2, 2, 4, 4), POOL_PARAM), rng)


def case_pool_overlapping(rng):
    return run_forward_backward(max_pool_forward, max_pool_backward,
                                (f32(rng, 2, 2, 7, 7),
                                 {"pool_height": 3, "pool_width": 3, "stride": 2}), rng)


def run_batchnorm_f32(forward, backward, x_shape, rng):
    """Train-mode forward/backward, then a test-mode forward; also the running stats."""
    bn_param = {"mode": "train"}
    result = run_forward_backward(forward, backward,
                                  (f32(rng, *x_shape), f32(rng, 3), f32(rng, 3), bn_param), rng)
    bn_param["mode"] = "test"
    result["test_out"] = forward(f32(rng, *x_shape), f32(rng, 3), f32(rng, 3), bn_param)[0]
    result["running_mean"] = bn_param["running_mean"]
    result["running_var"] = bn_param["running_var"]
    return result


def case_batchnorm(rng):
    return run_batchnorm_f32(batchnorm_forward, batchnorm_backward, (6, 3), rng)


def case_spatial_batchnorm(rng):
    return run_batchnorm_f32(spatial_batchnorm_forward, spatial_batchnorm_backward,
                             (2, 3, 2, 2), rng)


def case_dropout(rng):
    result = run_forward_backward(dropout_forward, dropout_backward,
                                  (f32(rng, 4, 5), train_param(0.5)), rng)
    result["test_out"] = dropout_forward(f32(rng, 4, 5), {"p": 0.5, "mode": "test"})[0]
    return result


def case_softmax(rng):
    loss, dx = softmax_loss(f32(rng, 4, 3), np.array([0, 2, 1, 2]))
    return {"dx": dx}


def case_svm(rng):
    loss, dx = svm_loss(f32(rng, 4, 3), np.array([0, 2, 1, 2]))
    return {"dx": dx}


def case_sandwich(build):
    def case(rng):
        forward, backward, args, _, _ = build(rng)
        args = [a.astype(np.float32) if isinstance(a, np.ndarray) else a
                for a in args.values()]
        return run_forward_backward(forward, backward, args, rng)
    case.__name__ = "case_" + sandwich_id(build)
    return case


DTYPE_CASES = [case_affine, case_relu, case_conv, case_pool_tiling, case_pool_overlapping,
               case_batchnorm, case_spatial_batchnorm, case_dropout, case_softmax, case_svm,
               *(case_sandwich(build) for build in SANDWICHES)]


@pytest.mark.parametrize("case", DTYPE_CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_float32_in_float32_out(case, rng):
    arrays = case(rng)
    wrong = {name: a.dtype for name, a in arrays.items() if a.dtype != np.float32}
    assert not wrong, f"not float32: {wrong}"


# ---------------------------------------------------------------- bad arguments

def z(*shape):
    return np.zeros(shape)


BAD_CALLS = {
    "conv_not_tiling": (lambda: conv_forward(z(1, 1, 5, 5), z(1, 1, 2, 2), z(1),
                                             {"stride": 2, "pad": 0}), r"does not tile a 5x5"),
    "conv_kernel_too_big": (lambda: conv_forward(z(1, 1, 3, 3), z(1, 1, 5, 5), z(1),
                                                 {"stride": 1, "pad": 0}), r"does not fit"),
    "conv_channel_mismatch": (lambda: conv_forward(z(1, 3, 5, 5), z(2, 2, 3, 3), z(2),
                                                   {"stride": 1, "pad": 1}),
                              r"w has 2 input channels but x has 3"),
    "conv_missing_stride": (lambda: conv_forward(z(1, 1, 5, 5), z(1, 1, 3, 3), z(1), {"pad": 1}),
                            r"conv_param needs 'stride'"),
    "conv_missing_pad": (lambda: conv_forward(z(1, 1, 5, 5), z(1, 1, 3, 3), z(1), {"stride": 1}),
                         r"conv_param needs 'pad'"),
    "conv_zero_stride": (lambda: conv_forward(z(1, 1, 5, 5), z(1, 1, 3, 3), z(1),
                                              {"stride": 0, "pad": 1}),
                         r"stride.*positive integer"),
    "conv_bias_shape": (lambda: conv_forward(z(1, 1, 5, 5), z(2, 1, 3, 3), z(3),
                                             {"stride": 1, "pad": 1}), r"b must have shape \(2,\)"),
    "conv_x_not_4d": (lambda: conv_forward(z(1, 5, 5), z(1, 1, 3, 3), z(1),
                                           {"stride": 1, "pad": 1}), r"x must be a 4-d array"),
    "pool_not_tiling": (lambda: max_pool_forward(z(1, 1, 5, 5), POOL_PARAM),
                        r"does not tile a 5x5"),
    "pool_window_too_big": (lambda: max_pool_forward(
        z(1, 1, 2, 2), {"pool_height": 3, "pool_width": 3, "stride": 1}), r"does not fit"),
    "pool_missing_key": (lambda: max_pool_forward(z(1, 1, 4, 4), {"pool_height": 2, "stride": 2}),
                         r"pool_param needs 'pool_width'"),
    "softmax_label_too_big": (lambda: softmax_loss(z(2, 3), np.array([0, 3])),
                              r"label 3, expected labels in \[0, 3\)"),
    "softmax_label_negative": (lambda: softmax_loss(z(2, 3), np.array([-1, 0])),
                               r"label -1, expected labels in \[0, 3\)"),
    "softmax_labels_wrong_length": (lambda: softmax_loss(z(2, 3), np.array([0, 1, 2])),
                                    r"y must have shape \(2,\)"),
    "softmax_float_labels": (lambda: softmax_loss(z(2, 3), np.array([0.0, 1.0])),
                             r"integer class labels"),
    "softmax_batch_size_too_small": (lambda: softmax_loss(z(4, 3), np.zeros(4, int), batch_size=3),
                                     r"batch_size must be at least len\(x\) = 4"),
    "svm_label_too_big": (lambda: svm_loss(z(2, 3), np.array([0, 3])),
                          r"label 3, expected labels in \[0, 3\)"),
    "svm_label_negative": (lambda: svm_loss(z(2, 3), np.array([-2, 0])),
                           r"label -2, expected labels in \[0, 3\)"),
    "svm_labels_wrong_length": (lambda: svm_loss(z(3, 3), np.array([0, 1])),
                                r"y must have shape \(3,\)"),
    "svm_batch_size_zero": (lambda: svm_loss(z(0, 3), np.zeros(0, int), batch_size=0),
                            r"batch_size must be at least"),
    "batchnorm_gamma_shape": (lambda: batchnorm_forward(z(4, 3), np.ones(2), z(3),
                                                        {"mode": "train"}),
                              r"gamma and beta must have shape \(3,\)"),
    "spatial_bn_beta_shape": (lambda: spatial_batchnorm_forward(z(2, 3, 2, 2), np.ones(3), z(3, 1),
                                                                {"mode": "train"}),
                              r"gamma and beta must have shape \(3,\)"),
    "batchnorm_bad_mode": (lambda: batchnorm_forward(z(4, 3), np.ones(3), z(3), {"mode": "eval"}),
                           r"bn_param\['mode'\] must be 'train' or 'test'"),
    "spatial_bn_x_not_4d": (lambda: spatial_batchnorm_forward(z(4, 3), np.ones(3), z(3),
                                                              {"mode": "train"}),
                            r"x must be a 4-d array"),
    "dropout_p_zero": (lambda: dropout_forward(z(2, 2), {"p": 0.0, "mode": "train"}),
                       r"must be in \(0, 1\], got 0.0"),
    "dropout_p_above_one": (lambda: dropout_forward(z(2, 2), {"p": 1.5, "mode": "train"}),
                            r"must be in \(0, 1\], got 1.5"),
    "dropout_p_negative": (lambda: dropout_forward(z(2, 2), {"p": -0.5, "mode": "test"}),
                           r"must be in \(0, 1\], got -0.5"),
    "dropout_bad_mode": (lambda: dropout_forward(z(2, 2), {"p": 0.5, "mode": "eval"}),
                         r"dropout_param\['mode'\] must be 'train' or 'test'"),
    "affine_w_mismatch": (lambda: affine_forward(z(2, 3, 2), z(5, 4), z(4)),
                          r"x flattens to 6 features per example but w has shape \(5, 4\)"),
    "affine_w_not_2d": (lambda: affine_forward(z(2, 6), z(6, 4, 1), z(4)),
                        r"w must be a 2-d array"),
    "affine_b_mismatch": (lambda: affine_forward(z(2, 6), z(6, 4), z(3)),
                          r"b must have shape \(4,\)"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_arguments_raise_value_error(name):
    call, message = BAD_CALLS[name]
    with pytest.raises(ValueError, match=message):
        call()


def test_backward_rejects_wrong_dout_shape(rng):
    _, conv_cache = conv_forward(z(1, 1, 4, 4), z(2, 1, 3, 3), z(2), CONV_PARAM)
    with pytest.raises(ValueError, match=r"dout must have shape \(1, 2, 4, 4\)"):
        conv_backward(z(1, 2, 3, 3), conv_cache)
    _, pool_cache = max_pool_forward(z(1, 1, 4, 4), POOL_PARAM)
    with pytest.raises(ValueError, match=r"dout must have shape \(1, 1, 2, 2\)"):
        max_pool_backward(z(1, 1, 4, 4), pool_cache)


# ---------------------------------------------------------------- empty batches

@pytest.mark.parametrize("compute_dx", [True, False])
def test_conv_empty_batch(compute_dx, rng):
    w, b = rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
    out, cache = conv_forward(np.zeros((0, 2, 5, 5)), w, b, {"stride": 2, "pad": 1})
    assert out.shape == (0, 3, 3, 3)
    dx, dw, db = conv_backward(out.copy(), cache, compute_dx=compute_dx)
    assert dx is None if not compute_dx else dx.shape == (0, 2, 5, 5)
    np.testing.assert_array_equal(dw, np.zeros_like(w))
    np.testing.assert_array_equal(db, np.zeros_like(b))


@pytest.mark.parametrize("x_shape, pool_param, out_shape", [
    ((0, 2, 4, 4), POOL_PARAM, (0, 2, 2, 2)),
    ((0, 2, 7, 7), {"pool_height": 3, "pool_width": 3, "stride": 2}, (0, 2, 3, 3)),
], ids=["tiling", "overlapping"])
def test_max_pool_empty_batch(x_shape, pool_param, out_shape):
    out, cache = max_pool_forward(np.zeros(x_shape), pool_param)
    assert out.shape == out_shape
    assert max_pool_backward(out.copy(), cache).shape == x_shape


def test_relu_empty_batch():
    out, cache = relu_forward(np.zeros((0, 4)))
    assert out.shape == (0, 4)
    assert relu_backward(out, cache).shape == (0, 4)


def test_affine_empty_batch(rng):
    """x.reshape(N, -1) would fail for N = 0: D must come from x.shape[1:]."""
    w, b = rng.standard_normal((6, 4)), rng.standard_normal(4)
    out, cache = affine_forward(np.zeros((0, 2, 3)), w, b)
    assert out.shape == (0, 4)
    dx, dw, db = affine_backward(out.copy(), cache)
    assert dx.shape == (0, 2, 3)
    np.testing.assert_array_equal(dw, np.zeros_like(w))
    np.testing.assert_array_equal(db, np.zeros_like(b))
