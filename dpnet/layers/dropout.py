"""Inverted dropout."""

import numpy as np


def _generator(dropout_param):
    rng = dropout_param.get("rng")
    if rng is None:
        rng = np.random.default_rng(dropout_param.get("seed"))
        dropout_param["rng"] = rng
    return rng


def dropout_forward(x, dropout_param):
    """Inverted dropout: in train mode each unit is kept with probability p and scaled
    by 1/p, so test mode is the identity.

    Inputs:
    - x: any shape
    - dropout_param: dict with
      - 'p': the probability of KEEPING a unit, in (0, 1] (as in the seed homework;
        p = 1 disables dropout)
      - 'mode': 'train' or 'test'
      - 'rng' (optional): a numpy Generator used for the masks; if absent one is made
        from 'seed' (optional) and stored back under 'rng', so successive calls draw
        fresh masks without touching NumPy's global random state.

    Returns (out, cache); out has the shape and dtype of x.
    """
    p = dropout_param["p"]
    if not 0 < p <= 1:
        raise ValueError(f"dropout_param['p'] is the keep probability and must be in (0, 1], got {p}")
    mode = dropout_param.get("mode", "train")
    if mode == "test" or p == 1:
        return x, (dropout_param, None)
    if mode != "train":
        raise ValueError(f"dropout_param['mode'] must be 'train' or 'test', got {mode!r}")
    keep = _generator(dropout_param).random(x.shape, dtype=x.dtype) < p
    mask = keep.astype(x.dtype) / x.dtype.type(p)
    return x * mask, (dropout_param, mask)


def dropout_backward(dout, cache):
    """Backward pass of dropout_forward."""
    _, mask = cache
    return dout if mask is None else dout * mask
