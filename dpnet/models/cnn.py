"""The homework's three-layer convolutional network."""

import numpy as np

from ..layers import (affine_backward, affine_bn_relu_backward, affine_bn_relu_forward,
                      affine_forward, affine_relu_backward, affine_relu_forward,
                      conv_bn_relu_pool_backward, conv_bn_relu_pool_forward, conv_output_shape,
                      conv_relu_pool_backward, conv_relu_pool_forward, pool_output_shape)
from .base import Model, init_bias, init_weight

POOL_PARAM = {"pool_height": 2, "pool_width": 2, "stride": 2}


class ThreeLayerConvNet(Model):
    """conv - relu - 2x2 max pool - affine - relu - affine - softmax, on (N, C, H, W) input.

    With use_batchnorm, spatial batchnorm follows the conv (gamma1, beta1) and
    batchnorm follows the hidden affine layer (gamma2, beta2). The conv keeps the
    spatial size: stride 1, pad (filter_size - 1) // 2 (odd filter sizes).

    Inputs:
    - input_dim: (C, H, W)
    - num_filters, filter_size: conv filters (F) and their width (HH = WW)
    - hidden_dim: units in the hidden affine layer
    - num_classes: scores per example
    - weight_scale: std of the Gaussian initial weights, 'he' for sqrt(2 / fan_in), or 'uniform'
      (PyTorch's default: weights and biases U(+-1/sqrt(fan_in)))
    - reg, dtype, bn_mode, comm, seed: see dpnet.models.base.Model
    - conv_algorithm: 'im2col' or 'im2col-whole' for the conv (dpnet.layers.conv_forward)
    """

    def __init__(self, input_dim=(3, 32, 32), num_filters=32, filter_size=7, hidden_dim=100,
                 num_classes=10, weight_scale=1e-3, reg=0.0, dtype=np.float32,
                 use_batchnorm=False, bn_mode="local", comm=None, seed=0, conv_algorithm="im2col"):
        super().__init__(reg=reg, dtype=dtype, bn_mode=bn_mode, comm=comm, seed=seed)
        self.num_classes = num_classes
        c, h, w = input_dim
        self.input_dim = tuple(input_dim)
        self.use_batchnorm = use_batchnorm
        self.conv_param = {"stride": 1, "pad": (filter_size - 1) // 2}
        f = num_filters
        _, _, h1, w1 = conv_output_shape((1, c, h, w), (f, c, filter_size, filter_size), self.conv_param)
        _, _, _, h2, w2 = pool_output_shape((1, f, h1, w1), POOL_PARAM)
        rng, dt = self.rng, self.dtype
        flat = f * h2 * w2
        self.add_param("W1", init_weight(rng, (f, c, filter_size, filter_size), c * filter_size ** 2, weight_scale, dt),
                       1, l2=True)
        self.add_param("b1", init_bias(rng, f, c * filter_size ** 2, weight_scale, dt), 1)
        self.add_param("W2", init_weight(rng, (flat, hidden_dim), flat, weight_scale, dt), 2, l2=True)
        self.add_param("b2", init_bias(rng, hidden_dim, flat, weight_scale, dt), 2)
        self.add_param("W3", init_weight(rng, (hidden_dim, num_classes), hidden_dim, weight_scale, dt), 3, l2=True)
        self.add_param("b3", init_bias(rng, num_classes, hidden_dim, weight_scale, dt), 3)
        if use_batchnorm:
            for layer, width in ((1, f), (2, hidden_dim)):
                self.add_param(f"gamma{layer}", np.ones(width, dtype=dt), layer)
                self.add_param(f"beta{layer}", np.zeros(width, dtype=dt), layer)
            self.add_bn_param(f)
            self.add_bn_param(hidden_dim)
        if conv_algorithm != "im2col":
            self.use_conv_algorithm(conv_algorithm)

    def conv_layers(self):
        return [(1, self.input_dim, self.params["W1"].shape, self.conv_param)]

    def _check_input(self, X):
        if np.ndim(X) != 4 or tuple(np.shape(X)[1:]) != self.input_dim:
            raise ValueError(f"X must have shape (N, {', '.join(map(str, self.input_dim))}), got {np.shape(X)}")
        return np.asarray(X).astype(self.dtype, copy=False)

    def _forward(self, X):
        p, comm, conv_param = self.params, self.bn_comm, self.layer_conv_param(1, self.conv_param)
        if self.use_batchnorm:
            h1, c1 = conv_bn_relu_pool_forward(X, p["W1"], p["b1"], p["gamma1"], p["beta1"],
                                               conv_param, self.bn_params[0], POOL_PARAM, comm)
            h2, c2 = affine_bn_relu_forward(h1, p["W2"], p["b2"], p["gamma2"], p["beta2"],
                                            self.bn_params[1], comm, self.affine_products("W2"))
        else:
            h1, c1 = conv_relu_pool_forward(X, p["W1"], p["b1"], conv_param, POOL_PARAM)  # (N, F, H/2, W/2)
            h2, c2 = affine_relu_forward(h1, p["W2"], p["b2"], self.affine_products("W2"))  # (N, hidden)
        scores, c3 = affine_forward(h2, p["W3"], p["b3"], self.affine_products("W3"))  # (N, classes)
        return scores, (c1, c2, c3)

    def _backward(self, dscores, caches, grads):
        c1, c2, c3 = caches
        dh2, grads["W3"], grads["b3"] = affine_backward(dscores, c3, dw_factors=self.dw_factors)
        if self.use_batchnorm:
            dh1, grads["W2"], grads["b2"], grads["gamma2"], grads["beta2"] = affine_bn_relu_backward(
                dh2, c2, dw_factors=self.dw_factors)
            _, grads["W1"], grads["b1"], grads["gamma1"], grads["beta1"] = conv_bn_relu_pool_backward(
                dh1, c1, compute_dx=False)
        else:
            dh1, grads["W2"], grads["b2"] = affine_relu_backward(dh2, c2, dw_factors=self.dw_factors)
            _, grads["W1"], grads["b1"] = conv_relu_pool_backward(dh1, c1, compute_dx=False)
