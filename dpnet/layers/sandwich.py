"""Common layer sequences ("sandwich" layers), each a forward/backward pair.

A bias added just before a batchnorm cannot change its output (the batch mean is
subtracted), so its true gradient is exactly zero; the *_bn_* backward passes return
exact zeros for it instead of the rounding noise the chain rule would produce, which
an optimizer like Adam (which normalises step sizes) would otherwise turn into motion.

Max pooling is applied before the ReLU: the two commute (ReLU is monotone), so the
output is the same, and the ReLU then touches a quarter of the elements. Its
gradient also equals the homework order's, except inside windows whose maximum is
tied, where the pooled gradient goes to the first maximal element either way.
"""

import numpy as np

from .activations import relu_backward, relu_forward
from .affine import PLAIN, affine_backward, affine_forward
from .batchnorm import (batchnorm_backward, batchnorm_forward, spatial_batchnorm_backward,
                        spatial_batchnorm_forward)
from .conv import conv_backward, conv_forward
from .pool import max_pool_backward, max_pool_forward


def _relu_in_place(a):
    """relu_forward on an array the sandwich made itself and no cache refers to: in place,
    which saves an array and a pass (not after a pool, whose cache holds its output)."""
    np.maximum(a, 0, out=a)
    return a, a


def affine_relu_forward(x, w, b, products=PLAIN):
    """affine -> ReLU. x: (N, D), w: (D, M), b: (M,); products: as affine_forward's.
    Returns (out (N, M), cache)."""
    a, fc_cache = affine_forward(x, w, b, products)
    out, relu_cache = _relu_in_place(a)
    return out, (fc_cache, relu_cache)


def affine_relu_backward(dout, cache, compute_dx=True, dw_factors=False):
    """Returns (dx, dw, db); dw_factors: as affine_backward's."""
    fc_cache, relu_cache = cache
    return affine_backward(relu_backward(dout, relu_cache), fc_cache, compute_dx, dw_factors)


def affine_bn_relu_forward(x, w, b, gamma, beta, bn_param, comm=None, products=PLAIN):
    """affine -> batchnorm -> ReLU. gamma, beta: (M,); products: as affine_forward's.
    Returns (out (N, M), cache)."""
    a, fc_cache = affine_forward(x, w, b, products)
    a, bn_cache = batchnorm_forward(a, gamma, beta, bn_param, comm)
    out, relu_cache = _relu_in_place(a)
    return out, (fc_cache, bn_cache, relu_cache)


def affine_bn_relu_backward(dout, cache, compute_dx=True, dw_factors=False):
    """Returns (dx, dw, db, dgamma, dbeta); dw_factors: as affine_backward's."""
    fc_cache, bn_cache, relu_cache = cache
    da, dgamma, dbeta = batchnorm_backward(relu_backward(dout, relu_cache), bn_cache)
    dx, dw, db = affine_backward(da, fc_cache, compute_dx, dw_factors)
    return dx, dw, np.zeros_like(db), dgamma, dbeta


def conv_relu_forward(x, w, b, conv_param):
    """conv -> ReLU. Returns (out (N, F, H', W'), cache)."""
    a, conv_cache = conv_forward(x, w, b, conv_param)
    out, relu_cache = _relu_in_place(a)
    return out, (conv_cache, relu_cache)


def conv_relu_backward(dout, cache, compute_dx=True):
    """Returns (dx, dw, db)."""
    conv_cache, relu_cache = cache
    return conv_backward(relu_backward(dout, relu_cache), conv_cache, compute_dx)


def conv_relu_pool_forward(x, w, b, conv_param, pool_param):
    """conv -> ReLU -> max pool (computed as conv -> pool -> ReLU, see module doc)."""
    a, conv_cache = conv_forward(x, w, b, conv_param)
    p, pool_cache = max_pool_forward(a, pool_param)
    out, relu_cache = relu_forward(p)
    return out, (conv_cache, pool_cache, relu_cache)


def conv_relu_pool_backward(dout, cache, compute_dx=True):
    """Returns (dx, dw, db)."""
    conv_cache, pool_cache, relu_cache = cache
    da = max_pool_backward(relu_backward(dout, relu_cache), pool_cache)
    return conv_backward(da, conv_cache, compute_dx)


def conv_bn_relu_forward(x, w, b, gamma, beta, conv_param, bn_param, comm=None):
    """conv -> spatial batchnorm -> ReLU. gamma, beta: (F,). Returns (out, cache)."""
    a, conv_cache = conv_forward(x, w, b, conv_param)
    a, bn_cache = spatial_batchnorm_forward(a, gamma, beta, bn_param, comm)
    out, relu_cache = _relu_in_place(a)
    return out, (conv_cache, bn_cache, relu_cache)


def conv_bn_relu_backward(dout, cache, compute_dx=True):
    """Returns (dx, dw, db, dgamma, dbeta)."""
    conv_cache, bn_cache, relu_cache = cache
    da, dgamma, dbeta = spatial_batchnorm_backward(relu_backward(dout, relu_cache), bn_cache)
    dx, dw, db = conv_backward(da, conv_cache, compute_dx)
    return dx, dw, np.zeros_like(db), dgamma, dbeta


def conv_bn_relu_pool_forward(x, w, b, gamma, beta, conv_param, bn_param, pool_param, comm=None):
    """conv -> spatial batchnorm -> ReLU -> max pool (pool before ReLU, see module doc)."""
    a, conv_cache = conv_forward(x, w, b, conv_param)
    a, bn_cache = spatial_batchnorm_forward(a, gamma, beta, bn_param, comm)
    p, pool_cache = max_pool_forward(a, pool_param)
    out, relu_cache = relu_forward(p)
    return out, (conv_cache, bn_cache, pool_cache, relu_cache)


def conv_bn_relu_pool_backward(dout, cache, compute_dx=True):
    """Returns (dx, dw, db, dgamma, dbeta)."""
    conv_cache, bn_cache, pool_cache, relu_cache = cache
    da = max_pool_backward(relu_backward(dout, relu_cache), pool_cache)
    da, dgamma, dbeta = spatial_batchnorm_backward(da, bn_cache)
    dx, dw, db = conv_backward(da, conv_cache, compute_dx)
    return dx, dw, np.zeros_like(db), dgamma, dbeta
