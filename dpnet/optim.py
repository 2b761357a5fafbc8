"""First-order update rules with the CS231n contract `next_w, config = rule(w, dw, config)`.

`w` is updated in place and returned (as the homework's sgd does), so a rule applied
once to a flat buffer holding every parameter (dpnet.flat.FlatParams) updates the
whole model in one fused pass. `config` holds hyperparameters and the rule's state;
missing entries get the defaults below. State arrays are kept in w's dtype and the
arithmetic avoids temporaries the size of w where it can.

Every rule here is elementwise: updating a slice of w with the same slice of dw and of
the state arrays gives exactly that slice of the whole update. Each says so with the
attribute `elementwise = True`, which DataParallel reads to divide the update among the
ranks of a node (dpnet.parallel.update); a rule of your own may declare it too.
"""

import numpy as np


def _scratch(config, w):
    """A reusable work array shaped like w (not state: safe to drop when saving config)."""
    buf = config.get("_scratch")
    if buf is None or buf.shape != w.shape or buf.dtype != w.dtype:
        buf = np.empty_like(w)
        config["_scratch"] = buf
    return buf


def _state(config, key, w):
    value = config.get(key)
    if value is None:
        value = np.zeros_like(w)
        config[key] = value
    return value


def sgd(w, dw, config=None):
    """Vanilla SGD: w -= learning_rate * dw. config: 'learning_rate' (1e-2)."""
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    tmp = np.multiply(dw, config["learning_rate"], out=_scratch(config, w))
    w -= tmp
    return w, config


def sgd_momentum(w, dw, config=None):
    """SGD with momentum: v = momentum * v - learning_rate * dw; w += v.

    config: 'learning_rate' (1e-2), 'momentum' (0.9), 'velocity' (zeros).
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("momentum", 0.9)
    v = _state(config, "velocity", w)
    tmp = np.multiply(dw, config["learning_rate"], out=_scratch(config, w))
    v *= config["momentum"]
    v -= tmp
    w += v
    return w, config


def sgd_nesterov_momentum(w, dw, config=None):
    """Nesterov momentum in the homework's form: v' = momentum * v - learning_rate * dw;
    w += -momentum * v + (1 + momentum) * v'.

    config: 'learning_rate' (1e-2), 'momentum' (0.9), 'velocity' (zeros).
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("momentum", 0.9)
    mu = config["momentum"]
    v = _state(config, "velocity", w)
    tmp = np.multiply(v, -mu, out=_scratch(config, w))  # -mu * v_prev
    w += tmp
    v *= mu
    np.multiply(dw, config["learning_rate"], out=tmp)
    v -= tmp
    np.multiply(v, 1 + mu, out=tmp)
    w += tmp
    return w, config


def rmsprop(w, dw, config=None):
    """RMSProp: cache = decay_rate * cache + (1 - decay_rate) * dw^2;
    w -= learning_rate * dw / (sqrt(cache) + epsilon).

    config: 'learning_rate' (1e-2), 'decay_rate' (0.99), 'epsilon' (1e-8), 'cache' (zeros).
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("decay_rate", 0.99)
    config.setdefault("epsilon", 1e-8)
    decay = config["decay_rate"]
    cache = _state(config, "cache", w)
    tmp = np.square(dw, out=_scratch(config, w))
    tmp *= 1 - decay
    cache *= decay
    cache += tmp
    np.sqrt(cache, out=tmp)
    tmp += config["epsilon"]
    np.divide(dw, tmp, out=tmp)
    tmp *= config["learning_rate"]
    w -= tmp
    return w, config


def adam(w, dw, config=None):
    """Adam with bias correction, as in the homework:
    t += 1; m = beta1 m + (1 - beta1) dw; v = beta2 v + (1 - beta2) dw^2;
    w -= learning_rate * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + epsilon).

    config: 'learning_rate' (1e-3), 'beta1' (0.9), 'beta2' (0.999), 'epsilon' (1e-8),
    'm', 'v' (zeros), 't' (0).
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-3)
    config.setdefault("beta1", 0.9)
    config.setdefault("beta2", 0.999)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("t", 0)
    b1, b2 = config["beta1"], config["beta2"]
    m, v = _state(config, "m", w), _state(config, "v", w)
    config["t"] += 1
    t = config["t"]
    tmp = _scratch(config, w)
    m *= b1
    np.multiply(dw, 1 - b1, out=tmp)
    m += tmp
    v *= b2
    np.square(dw, out=tmp)
    tmp *= 1 - b2
    v += tmp
    # denominator sqrt(v / (1 - b2^t)) + eps, then the step m / (1 - b1^t) / denominator
    np.sqrt(v, out=tmp)
    tmp *= 1 / np.sqrt(1 - b2 ** t)
    tmp += config["epsilon"]
    np.divide(m, tmp, out=tmp)
    tmp *= config["learning_rate"] / (1 - b1 ** t)
    w -= tmp
    return w, config


for _rule in (sgd, sgd_momentum, sgd_nesterov_momentum, rmsprop, adam):
    _rule.elementwise = True
del _rule

UPDATE_RULES = {
    "sgd": sgd,
    "sgd_momentum": sgd_momentum,
    "sgd_nesterov_momentum": sgd_nesterov_momentum,
    "rmsprop": rmsprop,
    "adam": adam,
}


def apply_update(rule, w, dw, config):
    """Run rule(w, dw, config) so that w ends holding next_w, whether the rule updates w in
    place (as these do) or returns a new array (as the homework's starter sgd does).
    Returns the config the rule returned."""
    next_w, next_config = rule(w, dw, config)
    if next_w is not w:
        w[...] = next_w
    return next_config


def get_update_rule(name):
    """The update rule called `name` (a key of UPDATE_RULES) or a callable passed through."""
    if callable(name):
        return name
    if name not in UPDATE_RULES:
        raise ValueError(f"unknown update rule {name!r}, expected one of {sorted(UPDATE_RULES)}")
    return UPDATE_RULES[name]
