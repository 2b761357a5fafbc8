"""Models: whole-model numerical gradient checks and the homework's loss API, shapes,
initialisation, dtypes, input validation, test/train modes and dropout."""

import math

import numpy as np
import pytest

from dpnet.gradient_check import eval_numerical_gradient, normwise_rel_error
from dpnet.models import ConvNet, FullyConnectedNet, ThreeLayerConvNet

INPUT = (3, 8, 8)
FC_FEATURES = 12
# Largest accepted normwise_rel_error (relative to the gradient's largest entry) between
# analytic and numerical gradients. The six models stay below 2e-9 (rounding of the loss
# over 2h plus truncation), a margin of 500; the wrong gradients of the control below are
# off by 1e-2 (scaled by 1.01) or more. The elementwise rel_error failed a dead channel,
# whose true gradient 0 got 4e-11 of rounding noise on some BLAS kernels: 4e-3 > 1e-6.
GRAD_TOL = 1e-6
ZERO_GRAD_ATOL = 1e-8  # a numerical gradient that is 0 in theory is only rounding noise
H = 1e-5               # centred-difference step (1e-4 is already too coarse for the BN nets)
# Seed of the data and weights of the gradient checks. With ReLU and max pooling the loss
# has kinks; a centred difference straddling one is wrong by O(1). Seed 3 keeps every
# kink farther than H from the evaluation point (checked for all six models).
GRAD_SEED = 3


def make_model(kind, use_batchnorm, dtype=np.float64, seed=0, **kwargs):
    """A tiny model of each kind; kwargs override the defaults."""
    if kind == "threelayer":
        args = dict(input_dim=INPUT, num_filters=3, filter_size=3, hidden_dim=5, weight_scale="he")
        cls = ThreeLayerConvNet
    elif kind == "convnet":  # two convs in stage 1 exercise the conv without pooling
        args = dict(input_dim=INPUT, stages=((3, 3), (4,)), hidden_dims=(5,), weight_scale="he")
        cls = ConvNet
    else:
        args = dict(hidden_dims=[6, 5], input_dim=FC_FEATURES, weight_scale="he")
        cls = FullyConnectedNet
    args.update(use_batchnorm=use_batchnorm, dtype=dtype, seed=seed)
    args.update(kwargs)
    return cls(**args)


def make_batch(kind, n, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    shape = (n, FC_FEATURES) if kind == "fc" else (n,) + INPUT
    return scale * rng.standard_normal(shape), rng.integers(0, 10, n)


def feeds_batchnorm(name, params):
    """A bias added right before a batchnorm: its true gradient is exactly zero."""
    return name.startswith("b") and f"gamma{name[1:]}" in params


KINDS = ["threelayer", "convnet", "fc"]


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("use_batchnorm", [False, True], ids=["plain", "bn"])
@pytest.mark.parametrize("kind", KINDS)
def test_loss_gradients_match_numerical(kind, use_batchnorm):
    model = make_model(kind, use_batchnorm, seed=GRAD_SEED, reg=0.1)
    X, y = make_batch(kind, 4, seed=GRAD_SEED)
    loss, grads = model.loss(X, y)
    assert set(grads) == set(model.params)
    errors, zero_biases = {}, []
    for name, param in model.params.items():
        numerical = eval_numerical_gradient(lambda: model.loss(X, y)[0], param, h=H)
        assert grads[name].shape == param.shape, name
        if feeds_batchnorm(name, model.params):
            assert np.all(grads[name] == 0), f"{name} feeds a batchnorm: its gradient must be exactly 0"
            assert np.max(np.abs(numerical)) <= ZERO_GRAD_ATOL, name
            zero_biases.append(name)
        else:
            errors[name] = normwise_rel_error(numerical, grads[name])
    assert model.loss(X, y)[0] == loss  # the check restored every parameter
    assert bool(zero_biases) == use_batchnorm
    bad = {k: v for k, v in errors.items() if not v <= GRAD_TOL}
    assert not bad, f"relative gradient errors above {GRAD_TOL}: {bad}"


def test_gradient_check_catches_a_wrong_gradient():
    """Control: the check above fails for a gradient that is slightly off: the reg term
    halved, the whole array scaled by 1.01, or one entry of typical size with its sign flipped."""
    model = make_model("threelayer", False, seed=GRAD_SEED, reg=0.1)
    X, y = make_batch("threelayer", 4, seed=GRAD_SEED)
    _, grads = model.loss(X, y)
    grad = grads["W3"]
    numerical = eval_numerical_gradient(lambda: model.loss(X, y)[0], model.params["W3"], h=H)
    assert normwise_rel_error(numerical, grad) <= GRAD_TOL
    flipped = grad.copy()
    median = np.argsort(np.abs(grad), axis=None)[grad.size // 2]
    flipped.flat[median] *= -1
    for wrong in (grad - 0.5 * model.reg * model.params["W3"], 1.01 * grad, flipped):
        assert normwise_rel_error(numerical, wrong) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_regularization_is_half_reg_sum_of_squared_weights(kind):
    X, y = make_batch(kind, 5)
    plain = make_model(kind, True)
    reg = make_model(kind, True, reg=0.3)
    loss0, grads0 = plain.loss(X, y)
    loss1, grads1 = reg.loss(X, y)
    weights = [k for k in reg.params if k.startswith("W")]
    expected = 0.5 * 0.3 * sum(float(np.sum(reg.params[k] ** 2)) for k in weights)
    assert loss1 - loss0 == pytest.approx(expected, rel=1e-12)
    for k in reg.params:
        extra = 0.3 * reg.params[k] if k in weights else 0.0
        np.testing.assert_allclose(grads1[k], grads0[k] + extra, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- the loss API

@pytest.mark.parametrize("use_batchnorm", [False, True], ids=["plain", "bn"])
@pytest.mark.parametrize("kind", KINDS)
def test_loss_returns_float_and_grads_named_like_params(kind, use_batchnorm):
    model = make_model(kind, use_batchnorm, reg=0.1)
    X, y = make_batch(kind, 5)
    out = model.loss(X, y)
    assert isinstance(out, tuple) and len(out) == 2
    loss, grads = out
    assert isinstance(loss, float) and np.isfinite(loss)
    assert list(grads) == list(model.params)
    for k, g in grads.items():
        assert g.shape == model.params[k].shape, k


@pytest.mark.parametrize("use_batchnorm", [False, True], ids=["plain", "bn"])
@pytest.mark.parametrize("kind", KINDS)
def test_scores_are_test_mode(kind, use_batchnorm):
    """loss(X) gives (N, classes) scores from running statistics: each row depends on its own
    example only, and the running statistics are not updated."""
    model = make_model(kind, use_batchnorm, num_classes=7)
    X, y = make_batch(kind, 6)
    y = y % 7
    model.loss(X, y)  # one train step moves the running statistics away from (0, 1)
    before = [{k: v.copy() for k, v in bn.items() if k.startswith("running")} for bn in model.bn_params]
    scores = model.loss(X)
    assert scores.shape == (6, 7)
    rows = np.concatenate([model.loss(X[i:i + 1]) for i in range(6)])
    np.testing.assert_allclose(scores, rows, rtol=1e-12, atol=1e-12)
    for bn, old in zip(model.bn_params, before):
        for k, v in old.items():
            assert np.array_equal(bn[k], v)
    if use_batchnorm:  # control: in train mode a row depends on the rest of the batch
        full, _ = model.data_loss(X, y)
        split = sum(model.data_loss(X[i:i + 3], y[i:i + 3])[0] * 3 / 6 for i in (0, 3))
        assert abs(full - split) > 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_bn_params_start_as_the_layers_fresh_state(kind):
    """Every batchnorm layer of a new model starts in train mode at running_mean =
    running_var = 0 (the homework's start, as the layer's own first use), in the model's dtype."""
    model = make_model(kind, True, dtype=np.float32)
    assert model.bn_params
    for bn_param in model.bn_params:
        assert bn_param["mode"] == "train"
        for key in ("running_mean", "running_var"):
            assert bn_param[key].dtype == np.float32
            np.testing.assert_array_equal(bn_param[key], 0)


def test_scores_use_running_statistics():
    """Test-mode batchnorm normalises with running_mean / running_var, not the batch's."""
    model = make_model("fc", True, num_classes=4)
    X, _ = make_batch("fc", 5)
    base = model.loss(X)
    model.bn_params[0]["running_mean"][:] = 0.5
    shifted = model.loss(X)
    assert not np.allclose(base, shifted)
    model.bn_params[0]["running_mean"][:] = 0.0
    np.testing.assert_array_equal(model.loss(X), base)


@pytest.mark.parametrize("filter_size", [1, 3, 5, 7])
def test_threelayer_params_and_odd_filters_keep_size(filter_size):
    c, h, w = 3, 8, 6
    f, hidden, classes = 4, 9, 10
    model = ThreeLayerConvNet(input_dim=(c, h, w), num_filters=f, filter_size=filter_size,
                              hidden_dim=hidden, num_classes=classes, use_batchnorm=True)
    shapes = {k: v.shape for k, v in model.params.items()}
    assert shapes == {
        "W1": (f, c, filter_size, filter_size), "b1": (f,),
        "W2": (f * (h // 2) * (w // 2), hidden), "b2": (hidden,),
        "W3": (hidden, classes), "b3": (classes,),
        "gamma1": (f,), "beta1": (f,), "gamma2": (hidden,), "beta2": (hidden,),
    }
    assert model.conv_param == {"stride": 1, "pad": (filter_size - 1) // 2}
    X = np.random.default_rng(0).standard_normal((2, c, h, w))
    assert model.loss(X).shape == (2, classes)
    plain = ThreeLayerConvNet(input_dim=(c, h, w), num_filters=f, filter_size=filter_size,
                              hidden_dim=hidden, num_classes=classes)
    assert set(plain.params) == {"W1", "b1", "W2", "b2", "W3", "b3"}
    assert plain.bn_params == []
    for k in ("gamma1", "gamma2"):
        assert np.all(model.params[k] == 1)
    for k in ("b1", "b2", "b3", "beta1", "beta2"):
        assert np.all(model.params[k] == 0)


def test_convnet_param_layout():
    model = ConvNet(input_dim=(3, 8, 8), stages=((4, 5), (6,)), hidden_dims=(7, 8), num_classes=3)
    shapes = {k: v.shape for k, v in model.params.items()}
    assert shapes["W1"] == (4, 3, 3, 3) and shapes["W2"] == (5, 4, 3, 3) and shapes["W3"] == (6, 5, 3, 3)
    assert shapes["W4"] == (6 * 2 * 2, 7) and shapes["W5"] == (7, 8) and shapes["W6"] == (8, 3)
    assert [k for k in model.params if k.startswith("gamma")] == [f"gamma{i}" for i in range(1, 6)]
    assert len(model.bn_params) == 5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_batchnorm", [False, True], ids=["plain", "bn"])
def test_float32_model(kind, use_batchnorm):
    model = make_model(kind, use_batchnorm, dtype=np.float32)
    X, y = make_batch(kind, 4)  # float64 input is cast
    assert all(p.dtype == np.float32 for p in model.params.values())
    loss, grads = model.loss(X, y)
    assert all(g.dtype == np.float32 for g in grads.values())
    assert model.loss(X).dtype == np.float32
    ref = make_model(kind, use_batchnorm, dtype=np.float64)
    ref_loss, _ = ref.loss(X, y)
    assert loss == pytest.approx(ref_loss, rel=1e-4)


# ---------------------------------------------------------------- initialisation

def test_weight_scale_is_the_std():
    model = FullyConnectedNet([200], input_dim=500, weight_scale=0.03, dtype=np.float64)
    assert model.params["W1"].std() == pytest.approx(0.03, rel=0.02)
    assert abs(model.params["W1"].mean()) < 0.03 * 0.02
    conv = ThreeLayerConvNet(input_dim=(16, 8, 8), num_filters=64, filter_size=3, hidden_dim=200,
                             weight_scale=0.2, dtype=np.float64)
    assert conv.params["W1"].std() == pytest.approx(0.2, rel=0.03)
    assert conv.params["W2"].std() == pytest.approx(0.2, rel=0.03)


def test_he_init_uses_fan_in():
    fc = FullyConnectedNet([200], input_dim=500, weight_scale="he", dtype=np.float64)
    assert fc.params["W1"].std() == pytest.approx(math.sqrt(2 / 500), rel=0.02)  # not sqrt(2/200)
    conv = ConvNet(input_dim=(16, 8, 8), stages=((64,),), hidden_dims=(50,), dtype=np.float64)
    assert conv.params["W1"].std() == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.03)
    assert conv.params["W2"].std() == pytest.approx(math.sqrt(2 / (64 * 4 * 4)), rel=0.03)


@pytest.mark.parametrize("bad", [0, -1e-3, "xavier"])
def test_bad_weight_scale_raises(bad):
    with pytest.raises(ValueError, match="weight_scale"):
        make_model("fc", False, weight_scale=bad)


@pytest.mark.parametrize("kind", KINDS)
def test_seed_determines_params(kind):
    a, b, c = (make_model(kind, True, seed=s) for s in (5, 5, 6))
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert all(not np.array_equal(a.params[k], c.params[k]) for k in a.params if k.startswith("W"))


def test_initial_loss_is_log_num_classes():
    """The homework's sanity check: tiny weights give uniform scores, loss ~ log(10);
    regularisation then raises it."""
    model = ThreeLayerConvNet(input_dim=INPUT, num_filters=4, filter_size=3, hidden_dim=10,
                              weight_scale=1e-3, dtype=np.float64)
    X, y = make_batch("threelayer", 20)
    loss, _ = model.loss(X, y)
    assert loss == pytest.approx(math.log(10), abs=1e-4)
    model.reg = 0.5
    assert model.loss(X, y)[0] > loss


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kind,bad_shape,expected", [
    ("threelayer", (2, 3, 7, 8), "(N, 3, 8, 8)"),
    ("threelayer", (3, 8, 8), "(N, 3, 8, 8)"),
    ("convnet", (2, 1, 8, 8), "(N, 3, 8, 8)"),
    ("fc", (2, 11), f"{FC_FEATURES} features"),
])
def test_wrong_input_shape_names_expected_shape(kind, bad_shape, expected):
    model = make_model(kind, False)
    X = np.zeros(bad_shape)
    for call in (lambda: model.loss(X), lambda: model.loss(X, np.zeros(len(X), dtype=int))):
        with pytest.raises(ValueError) as info:
            call()
        assert expected in str(info.value) and str(bad_shape) in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_invalid_bn_mode_raises(kind):
    with pytest.raises(ValueError, match="bn_mode"):
        make_model(kind, True, bn_mode="global")


# ---------------------------------------------------------------- dropout and bn_mode

def test_convnet_dropout_train_random_test_deterministic():
    model = make_model("convnet", True, dropout=0.5, hidden_dims=(20,))
    X, y = make_batch("convnet", 6)
    loss1, grads1 = model.loss(X, y)
    loss2, grads2 = model.loss(X, y)
    assert loss1 != loss2
    assert not np.array_equal(grads1["W4"], grads2["W4"])
    s1, s2 = model.loss(X), model.loss(X)
    np.testing.assert_array_equal(s1, s2)
    # control: without dropout train mode is deterministic too
    plain = make_model("convnet", True, hidden_dims=(20,))
    assert plain.loss(X, y)[0] == plain.loss(X, y)[0]


def test_fc_dropout_seeded_masks_and_gradients():
    """With dropout the gradient of the loss actually computed (same mask) is checked by
    re-seeding the mask generator before every evaluation."""
    model = make_model("fc", False, dropout=0.6, seed=GRAD_SEED, reg=0.1)
    X, y = make_batch("fc", 4, seed=GRAD_SEED)
    # an example whose kept units are all dropped reaches the next ReLU with input b = 0,
    # exactly on its kink: nonzero biases keep the check off it
    for i in (1, 2):
        model.params[f"b{i}"] += np.linspace(0.1, 0.2, model.params[f"b{i}"].size)

    def loss_with_fixed_mask():
        model.dropout_param["rng"] = np.random.default_rng(42)
        return model.loss(X, y)

    _, grads = loss_with_fixed_mask()
    for name, param in model.params.items():
        numerical = eval_numerical_gradient(lambda: loss_with_fixed_mask()[0], param, h=H)
        assert normwise_rel_error(numerical, grads[name]) <= GRAD_TOL, name


@pytest.mark.parametrize("kind", KINDS)
def test_sync_without_comm_equals_local(kind):
    X, y = make_batch(kind, 5)
    local = make_model(kind, True, reg=0.1)
    sync = make_model(kind, True, reg=0.1, bn_mode="sync", comm=None)
    for _ in range(2):
        loss_l, grads_l = local.loss(X, y)
        loss_s, grads_s = sync.loss(X, y)
        assert loss_l == loss_s
        for k in grads_l:
            np.testing.assert_array_equal(grads_l[k], grads_s[k])
    np.testing.assert_array_equal(local.loss(X), sync.loss(X))
    for a, b in zip(local.bn_params, sync.bn_params):
        np.testing.assert_array_equal(a["running_mean"], b["running_mean"])
        np.testing.assert_array_equal(a["running_var"], b["running_var"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (5, 3), (16384,), (16385,), (3, 100_003)])
def test_add_scaled_equals_y_plus_scale_x_bit_for_bit(dtype, shape):
    from dpnet.models.base import add_scaled
    rng = np.random.default_rng(0)
    y, x = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    expected = y + 1e-3 * x
    add_scaled(y, x, 1e-3)
    assert y.dtype == dtype and np.array_equal(y, expected)
    y_t = rng.standard_normal(shape[::-1]).astype(dtype).T  # not contiguous: updated in place all the same
    expected = y_t + 0.5 * x
    add_scaled(y_t, x, 0.5)
    assert np.array_equal(y_t, expected)


def test_a_model_declares_its_parameter_order_and_l2_not_by_names():
    """add_param declares the layer and whether L2 applies: any names work (here neither 'W' nor
    a number), the backward order goes by layer, highest first, and L2 takes what was declared."""
    from dpnet.models import Model

    class Linear(Model):
        def __init__(self):
            super().__init__(reg=0.5, dtype=np.float64)
            self.num_classes = 3
            self.add_param("first.kernel", np.ones((4, 5)), layer=1, l2=True)
            self.add_param("first.offset", np.zeros(5), layer=1)
            self.add_param("last.kernel", np.full((5, 3), 2.0), layer=2, l2=True)

    model = Linear()
    assert model.backward_order() == ["last.kernel", "first.kernel", "first.offset"]
    assert model.weight_names() == ["first.kernel", "last.kernel"]
    assert model.regularization_loss() == 0.5 * 0.5 * (20 * 1.0 + 15 * 4.0)
    assert make_model("convnet", True).backward_order()[:6] == ["W5", "b5", "W4", "b4", "gamma4", "beta4"]


def test_uniform_initialisation_is_pytorchs_default():
    """weight_scale='uniform': weights and biases U(+-1/sqrt(fan_in)), as torch.nn.Conv2d and
    Linear initialise themselves; what dpnet.train uses without batchnorm."""
    model = ThreeLayerConvNet(input_dim=(3, 16, 16), num_filters=8, filter_size=3, hidden_dim=50,
                              weight_scale="uniform", dtype=np.float64, seed=1)
    for w, b, fan_in in (("W1", "b1", 27), ("W2", "b2", 8 * 8 * 8), ("W3", "b3", 50)):
        bound = 1 / math.sqrt(fan_in)
        for name in (w, b):
            values = model.params[name]
            assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound, name
            assert abs(values.std() - bound / math.sqrt(3)) < 0.25 * bound, name  # U(-a, a): std a / sqrt(3)
    with pytest.raises(ValueError, match="weight_scale must be a positive number, 'he' or 'uniform'"):
        ThreeLayerConvNet(weight_scale="xavier")
