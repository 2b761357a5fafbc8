"""The [affine - (batchnorm) - relu - (dropout)] x M - affine head shared by ConvNet and
FullyConnectedNet. Parameters are numbered from `first`: W<first>, b<first>, gamma<first>, ..."""

import numpy as np

from ..layers import (affine_backward, affine_bn_relu_backward, affine_bn_relu_forward,
                      affine_forward, affine_relu_backward, affine_relu_forward,
                      dropout_backward, dropout_forward)
from .base import init_bias, init_weight


def init_affine_stack(model, first, in_dim, hidden_dims, num_classes, weight_scale, use_batchnorm):
    """Create the head's parameters in model.params and its bn_params; returns nothing."""
    dims = [in_dim, *hidden_dims, num_classes]
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        idx = first + i
        model.add_param(f"W{idx}", init_weight(model.rng, (d_in, d_out), d_in, weight_scale, model.dtype), idx,
                        l2=True)
        model.add_param(f"b{idx}", init_bias(model.rng, d_out, d_in, weight_scale, model.dtype), idx)
        if use_batchnorm and i < len(hidden_dims):
            model.add_param(f"gamma{idx}", np.ones(d_out, dtype=model.dtype), idx)
            model.add_param(f"beta{idx}", np.zeros(d_out, dtype=model.dtype), idx)
            model.add_bn_param(d_out)


def affine_stack_forward(model, x, first, num_hidden, bn_offset):
    """Forward through the head; bn_params[bn_offset + i] serves hidden layer i.
    Returns (scores, caches)."""
    p, caches = model.params, []
    for i in range(num_hidden):
        idx = first + i
        if f"gamma{idx}" in p:
            x, cache = affine_bn_relu_forward(x, p[f"W{idx}"], p[f"b{idx}"], p[f"gamma{idx}"],
                                              p[f"beta{idx}"], model.bn_params[bn_offset + i], model.bn_comm,
                                              model.affine_products(f"W{idx}"))
        else:
            x, cache = affine_relu_forward(x, p[f"W{idx}"], p[f"b{idx}"], model.affine_products(f"W{idx}"))
        drop_cache = None
        if model.dropout_param is not None:
            x, drop_cache = dropout_forward(x, model.dropout_param)
        caches.append((cache, drop_cache))
    idx = first + num_hidden
    scores, cache = affine_forward(x, p[f"W{idx}"], p[f"b{idx}"], model.affine_products(f"W{idx}"))
    caches.append(cache)
    return scores, caches


def affine_stack_backward(model, dscores, caches, first, grads, compute_dx_first=True):
    """Backward through the head, filling grads; returns the gradient of its input
    (None when compute_dx_first is False)."""
    num_hidden = len(caches) - 1
    idx = first + num_hidden
    compute = compute_dx_first or num_hidden > 0
    dx, grads[f"W{idx}"], grads[f"b{idx}"] = affine_backward(dscores, caches[-1], compute, model.dw_factors)
    for i in reversed(range(num_hidden)):
        idx = first + i
        cache, drop_cache = caches[i]
        if drop_cache is not None:
            dx = dropout_backward(dx, drop_cache)
        compute = compute_dx_first or i > 0
        if f"gamma{idx}" in model.params:
            dx, grads[f"W{idx}"], grads[f"b{idx}"], grads[f"gamma{idx}"], grads[f"beta{idx}"] = \
                affine_bn_relu_backward(dx, cache, compute, model.dw_factors)
        else:
            dx, grads[f"W{idx}"], grads[f"b{idx}"] = affine_relu_backward(dx, cache, compute, model.dw_factors)
    return dx
