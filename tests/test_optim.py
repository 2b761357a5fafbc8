"""Update rules against hand-written references (the CS231n formulas), their state and
config contract, the fused pass over a flat buffer, and dpnet.flat.FlatParams."""

import numpy as np
import pytest

from dpnet.flat import FlatParams
from dpnet.optim import (UPDATE_RULES, adam, get_update_rule, rmsprop, sgd, sgd_momentum,
                         sgd_nesterov_momentum)

SHAPE = (3, 4)
STEPS = 3


# ---------------------------------------------------------------- references, one step each
# Each takes (w, dw, hyperparameters, state) and returns the new (w, state) without touching
# its inputs, written as plainly as the homework's formulas.

def ref_sgd(w, dw, hp, state):
    return w - hp["learning_rate"] * dw, {}


def ref_momentum(w, dw, hp, state):
    v = state.get("velocity", np.zeros_like(w))
    v = hp["momentum"] * v - hp["learning_rate"] * dw
    return w + v, {"velocity": v}


def ref_nesterov(w, dw, hp, state):
    v_prev = state.get("velocity", np.zeros_like(w))
    v = hp["momentum"] * v_prev - hp["learning_rate"] * dw
    return w - hp["momentum"] * v_prev + (1 + hp["momentum"]) * v, {"velocity": v}


def ref_rmsprop(w, dw, hp, state):
    cache = state.get("cache", np.zeros_like(w))
    cache = hp["decay_rate"] * cache + (1 - hp["decay_rate"]) * dw ** 2
    return w - hp["learning_rate"] * dw / (np.sqrt(cache) + hp["epsilon"]), {"cache": cache}


def ref_adam(w, dw, hp, state):
    m = state.get("m", np.zeros_like(w))
    v = state.get("v", np.zeros_like(w))
    t = state.get("t", 0) + 1
    m = hp["beta1"] * m + (1 - hp["beta1"]) * dw
    v = hp["beta2"] * v + (1 - hp["beta2"]) * dw ** 2
    m_hat = m / (1 - hp["beta1"] ** t)
    v_hat = v / (1 - hp["beta2"] ** t)
    return w - hp["learning_rate"] * m_hat / (np.sqrt(v_hat) + hp["epsilon"]), {"m": m, "v": v, "t": t}


# name: (rule, reference, documented defaults, non-default hyperparameters chosen so that
# each one visibly matters: a large epsilon, momentum and decay far from the defaults)
RULES = {
    "sgd": (sgd, ref_sgd, {"learning_rate": 1e-2}, {"learning_rate": 0.3}),
    "sgd_momentum": (sgd_momentum, ref_momentum, {"learning_rate": 1e-2, "momentum": 0.9},
                     {"learning_rate": 0.2, "momentum": 0.7}),
    "sgd_nesterov_momentum": (sgd_nesterov_momentum, ref_nesterov,
                              {"learning_rate": 1e-2, "momentum": 0.9},
                              {"learning_rate": 0.2, "momentum": 0.7}),
    "rmsprop": (rmsprop, ref_rmsprop, {"learning_rate": 1e-2, "decay_rate": 0.99, "epsilon": 1e-8},
                {"learning_rate": 0.05, "decay_rate": 0.8, "epsilon": 0.1}),
    "adam": (adam, ref_adam,
             {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8},
             {"learning_rate": 0.05, "beta1": 0.6, "beta2": 0.8, "epsilon": 0.1}),
}
STATE_KEYS = {"sgd": set(), "sgd_momentum": {"velocity"}, "sgd_nesterov_momentum": {"velocity"},
              "rmsprop": {"cache"}, "adam": {"m", "v", "t"}}


@pytest.fixture(params=sorted(RULES))
def rule_name(request):
    return request.param


def problem(dtype=np.float64, seed=0, shape=SHAPE):
    """A start point and a different gradient for each of STEPS steps."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(dtype)
    dws = [rng.standard_normal(shape).astype(dtype) * (k + 1) for k in range(STEPS)]
    return w, dws


def reference_trajectory(reference, w, dws, hp):
    """[(w, state)] after each step, from the plain formulas in float64."""
    w, state, out = np.array(w, dtype=np.float64), {}, []
    for dw in dws:
        w, state = reference(w, np.asarray(dw, dtype=np.float64), hp, state)
        out.append((w, state))
    return out


def run_rule(rule, w, dws, config):
    """Apply rule STEPS times; returns [(returned w, returned config)] per step."""
    out = []
    for dw in dws:
        next_w, config = rule(w, dw, config)
        out.append((next_w.copy(), config))
    return out


def assert_state(config, state, rtol=1e-12):
    for key, value in state.items():
        if key == "t":
            assert config["t"] == value
        else:
            np.testing.assert_allclose(config[key], value, rtol=rtol, atol=0, err_msg=key)


# ---------------------------------------------------------------- trajectories

@pytest.mark.parametrize("hyper", ["custom", "defaults"])
def test_trajectory_matches_reference(rule_name, hyper):
    rule, reference, defaults, custom = RULES[rule_name]
    hp = custom if hyper == "custom" else defaults
    w, dws = problem()
    expected = reference_trajectory(reference, w, dws, hp)
    config = dict(custom) if hyper == "custom" else None
    got = []
    for dw in dws:
        w, config = rule(w, dw, config)
        got.append((w.copy(), {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in config.items()}))
    for step, ((w_ref, state_ref), (w_got, config_got)) in enumerate(zip(expected, got)):
        np.testing.assert_allclose(w_got, w_ref, rtol=1e-12, atol=0, err_msg=f"step {step}")
        assert_state(config_got, state_ref)
        assert STATE_KEYS[rule_name] <= set(config_got)
        for key, value in hp.items():
            assert config_got[key] == value


def test_reference_differs_with_other_hyperparameters(rule_name):
    """Control: the custom and default trajectories are far apart, so a rule that ignored
    config (or an epsilon misplaced inside the square root) would fail the test above."""
    _, reference, defaults, custom = RULES[rule_name]
    w, dws = problem()
    a = reference_trajectory(reference, w, dws, custom)[-1][0]
    b = reference_trajectory(reference, w, dws, defaults)[-1][0]
    assert np.max(np.abs(a - b)) > 1e-3


def test_epsilon_placement_matters():
    """Control for the references: epsilon inside the square root would change the step."""
    w, dws = problem()
    hp = RULES["adam"][3]
    good = reference_trajectory(ref_adam, w, dws, hp)[-1][0]

    def eps_inside(w, dw, hp, state):
        new = dict(hp, epsilon=0.0)
        m_state = ref_adam(w, dw, new, state)[1]
        t = m_state["t"]
        m_hat = m_state["m"] / (1 - hp["beta1"] ** t)
        v_hat = m_state["v"] / (1 - hp["beta2"] ** t)
        return w - hp["learning_rate"] * m_hat / np.sqrt(v_hat + hp["epsilon"]), m_state

    bad = reference_trajectory(eps_inside, w, dws, hp)[-1][0]
    assert np.max(np.abs(good - bad)) > 1e-4


def test_missing_keys_get_defaults_and_given_ones_are_kept(rule_name):
    rule, reference, defaults, custom = RULES[rule_name]
    w, dws = problem()
    lr = custom["learning_rate"]
    _, config = rule(w.copy(), dws[0], {"learning_rate": lr})
    assert config["learning_rate"] == lr
    for key, value in defaults.items():
        if key != "learning_rate":
            assert config[key] == value, key
    hp = dict(defaults, learning_rate=lr)
    w_ref, state = reference(w, dws[0], hp, {})
    w_got, _ = rule(w.copy(), dws[0], {"learning_rate": lr})
    np.testing.assert_allclose(w_got, w_ref, rtol=1e-12, atol=0)
    assert_state(config, state)
    _, fresh = rule(w.copy(), dws[0])  # config None: a new dict with every default
    for key, value in defaults.items():
        assert fresh[key] == value, key
    assert STATE_KEYS[rule_name] <= set(fresh)


def test_state_is_updated_in_the_given_config(rule_name):
    rule, _, _, custom = RULES[rule_name]
    w, dws = problem()
    config = dict(custom)
    _, returned = rule(w, dws[0], config)
    assert returned is config
    if rule_name == "adam":
        assert config["t"] == 1
        rule(w, dws[1], config)
        assert config["t"] == 2


def test_updates_in_place_and_returns_w(rule_name):
    rule, reference, _, custom = RULES[rule_name]
    w, dws = problem()
    start = w.copy()
    next_w, _ = rule(w, dws[0], dict(custom))
    assert next_w is w
    assert not np.array_equal(w, start)
    np.testing.assert_allclose(w, reference(start, dws[0], custom, {})[0], rtol=1e-12, atol=0)


def test_float32_stays_float32(rule_name):
    rule, reference, _, custom = RULES[rule_name]
    w, dws = problem(np.float32)
    config = dict(custom)
    for dw in dws:
        next_w, config = rule(w, dw, config)
    assert next_w.dtype == np.float32
    for key in STATE_KEYS[rule_name] - {"t"}:
        assert config[key].dtype == np.float32, key
    expected = reference_trajectory(reference, w=problem(np.float32)[0], dws=dws, hp=custom)[-1][0]
    np.testing.assert_allclose(next_w, expected, rtol=1e-5, atol=1e-6)


def test_fused_pass_equals_separate_passes(rule_name):
    """One call on the concatenation of two arrays == one call on each (every rule is
    elementwise), which is what the Solver's and DataParallel's flat buffer relies on."""
    rule, _, _, custom = RULES[rule_name]
    a, da = problem(seed=1, shape=(5,))
    b, db = problem(seed=2, shape=(7,))
    flat = np.concatenate([a, b])
    cfg_flat, cfg_a, cfg_b = dict(custom), dict(custom), dict(custom)
    for k in range(STEPS):
        rule(flat, np.concatenate([da[k], db[k]]), cfg_flat)
        rule(a, da[k], cfg_a)
        rule(b, db[k], cfg_b)
    np.testing.assert_array_equal(flat, np.concatenate([a, b]))


def test_adam_fused_is_not_a_shared_step_count():
    """Control for the fused test: two arrays sharing one config would advance t twice per
    step and differ from the fused pass."""
    a, da = problem(seed=1, shape=(5,))
    b, db = problem(seed=2, shape=(5,))
    flat = np.concatenate([a, b])
    shared, cfg = {}, {}
    for k in range(STEPS):
        adam(flat, np.concatenate([da[k], db[k]]), cfg)
        adam(a, da[k], shared)
        shared.pop("m"), shared.pop("v")  # states of different shapes cannot be shared
        adam(b, db[k], shared)
        shared.pop("m"), shared.pop("v")
    assert not np.array_equal(flat, np.concatenate([a, b]))


def test_get_update_rule():
    for name, fn in UPDATE_RULES.items():
        assert get_update_rule(name) is fn
    assert set(UPDATE_RULES) == set(RULES)
    custom = lambda w, dw, config=None: (w, config)  # noqa: E731
    assert get_update_rule(custom) is custom
    with pytest.raises(ValueError, match="nesterov_sgd"):
        get_update_rule("nesterov_sgd")


# ---------------------------------------------------------------- FlatParams

def some_params(dtype=np.float64):
    rng = np.random.default_rng(0)
    return {"W1": rng.standard_normal((2, 3)).astype(dtype), "b1": rng.standard_normal(3).astype(dtype),
            "W2": rng.standard_normal((3, 2, 2)).astype(dtype)}


def test_flat_params_rebinds_to_views_of_one_buffer():
    params = some_params()
    originals = {k: v.copy() for k, v in params.items()}
    old_objects = dict(params)
    flat = FlatParams(params)
    assert flat.data.shape == (6 + 3 + 12,)
    np.testing.assert_array_equal(flat.data, np.concatenate([v.ravel() for v in originals.values()]))
    for k, v in params.items():
        assert np.shares_memory(v, flat.data), k
        assert v is not old_objects[k]
        assert v.shape == originals[k].shape and v.dtype == originals[k].dtype
        np.testing.assert_array_equal(v, originals[k])
    flat.data[:] = 0  # writes through both ways
    assert all(np.all(v == 0) for v in params.values())
    params["b1"][...] = 7
    np.testing.assert_array_equal(flat.view(flat.data, "b1"), np.full(3, 7.0))
    assert flat.is_bound()
    params["W2"] = params["W2"].copy()
    assert not flat.is_bound()


def test_flat_params_pack_grads():
    params = some_params()
    flat = FlatParams(params)
    rng = np.random.default_rng(1)
    grads = {k: rng.standard_normal(v.shape) for k, v in reversed(list(params.items()))}
    out = flat.pack_grads(grads)
    assert out is flat.grad
    np.testing.assert_array_equal(out, np.concatenate([grads[k].ravel() for k in params]))
    for k in params:
        np.testing.assert_array_equal(flat.grads[k], grads[k])
        assert np.shares_memory(flat.grads[k], flat.grad)
    with pytest.raises(ValueError, match="b1"):
        flat.pack_grads({k: v for k, v in grads.items() if k != "b1"})


def test_flat_params_mixed_dtypes_raise():
    params = some_params()
    params["b1"] = params["b1"].astype(np.float32)
    with pytest.raises(ValueError, match="dtype"):
        FlatParams(params)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flat_params_extra_slots_follow_the_gradients(dtype):
    params = some_params(dtype)
    flat = FlatParams(params, extra=2)
    n = flat.data.size
    assert flat.buffer.shape == (n + 2,) and flat.buffer.dtype == dtype
    assert flat.grad.shape == (n,) and np.shares_memory(flat.grad, flat.buffer)
    flat.buffer[-2:] = [3, 4]
    grads = {k: np.ones_like(v) for k, v in params.items()}
    flat.pack_grads(grads)
    np.testing.assert_array_equal(flat.buffer[:n], np.ones(n))
    np.testing.assert_array_equal(flat.buffer[n:], [3, 4])
    assert FlatParams(some_params(dtype)).buffer.shape == (n,)
