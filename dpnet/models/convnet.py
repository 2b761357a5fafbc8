"""A configurable deeper convolutional network."""

import numpy as np

from ..layers import (conv_bn_relu_backward, conv_bn_relu_forward, conv_bn_relu_pool_backward,
                      conv_bn_relu_pool_forward, conv_output_shape, conv_relu_backward,
                      conv_relu_forward, conv_relu_pool_backward, conv_relu_pool_forward,
                      pool_output_shape)
from .affine_stack import affine_stack_backward, affine_stack_forward, init_affine_stack
from .base import Model, init_bias, init_weight

POOL_PARAM = {"pool_height": 2, "pool_width": 2, "stride": 2}


class ConvNet(Model):
    """{[conv - (spatial batchnorm) - relu] x k - 2x2 max pool} per stage, then
    {affine - (batchnorm) - relu - (dropout)} per hidden layer, then affine - softmax.

    Convolutions are filter_size x filter_size, stride 1, 'same' padding
    (filter_size - 1) // 2 (odd filter sizes). Parameters are numbered in order:
    W1..WL, b1..bL, and gamma<i>, beta<i> for every layer with batchnorm.

    Inputs:
    - input_dim: (C, H, W); each stage halves H and W
    - stages: filters of each conv, grouped by stage, e.g. ((32, 32), (64, 64))
    - hidden_dims: units in each hidden affine layer
    - num_classes, filter_size, use_batchnorm
    - dropout: keep probability of hidden affine units, in (0, 1]; 1 disables dropout
    - weight_scale: 'he' (default), 'uniform' (PyTorch's default) or the std of the Gaussian initial weights
    - reg, dtype, bn_mode, comm, seed: see dpnet.models.base.Model
    - conv_algorithm: 'im2col', 'im2col-whole' or 'winograd' for every conv it can compute
      (winograd: 3x3 filters only; see dpnet.layers.conv_forward); set_conv_algorithms chooses
      layer by layer
    """

    def __init__(self, input_dim=(3, 32, 32), stages=((32, 32), (64, 64)), hidden_dims=(256,),
                 num_classes=10, filter_size=3, use_batchnorm=True, dropout=1.0, weight_scale="he",
                 reg=0.0, dtype=np.float32, bn_mode="local", comm=None, seed=0, conv_algorithm="im2col"):
        super().__init__(reg=reg, dtype=dtype, bn_mode=bn_mode, comm=comm, seed=seed)
        self.num_classes = num_classes
        if not 0 < dropout <= 1:
            raise ValueError(f"dropout is the keep probability and must be in (0, 1], got {dropout}")
        if not stages or not all(stages):
            raise ValueError(f"stages must be non-empty groups of filter counts, got {stages!r}")
        self.input_dim = tuple(input_dim)
        self.use_batchnorm = use_batchnorm
        self.conv_param = {"stride": 1, "pad": (filter_size - 1) // 2}
        self.conv_shapes = {}  # layer -> (input (C, H, W), filter shape)
        self.pool_after = []  # per conv layer: is it the last of its stage?
        c, h, w = input_dim
        idx = 0
        for stage in stages:
            for j, f in enumerate(stage):
                idx += 1
                self.conv_shapes[idx] = ((c, h, w), (f, c, filter_size, filter_size))
                _, _, h, w = conv_output_shape((1, c, h, w), (f, c, filter_size, filter_size), self.conv_param)
                self.add_param(f"W{idx}", init_weight(self.rng, (f, c, filter_size, filter_size),
                                                      c * filter_size ** 2, weight_scale, self.dtype), idx, l2=True)
                self.add_param(f"b{idx}", init_bias(self.rng, f, c * filter_size ** 2, weight_scale, self.dtype), idx)
                if use_batchnorm:
                    self.add_param(f"gamma{idx}", np.ones(f, dtype=self.dtype), idx)
                    self.add_param(f"beta{idx}", np.zeros(f, dtype=self.dtype), idx)
                    self.add_bn_param(f)
                last = j == len(stage) - 1
                self.pool_after.append(last)
                if last:
                    _, _, _, h, w = pool_output_shape((1, f, h, w), POOL_PARAM)
                c = f
        self.num_conv = idx
        if conv_algorithm != "im2col":
            self.use_conv_algorithm(conv_algorithm)
        self.num_hidden = len(hidden_dims)
        init_affine_stack(self, idx + 1, c * h * w, hidden_dims, num_classes, weight_scale, use_batchnorm)
        if dropout < 1:
            self.dropout_param = {"mode": "train", "p": dropout, "rng": self.rng}

    def conv_layers(self):
        return [(i, x_shape, w_shape, self.conv_param) for i, (x_shape, w_shape) in self.conv_shapes.items()]

    def _conv_param(self, i):
        return self.layer_conv_param(i, self.conv_param)

    def _check_input(self, X):
        if np.ndim(X) != 4 or tuple(np.shape(X)[1:]) != self.input_dim:
            raise ValueError(f"X must have shape (N, {', '.join(map(str, self.input_dim))}), got {np.shape(X)}")
        return np.asarray(X).astype(self.dtype, copy=False)

    def _forward(self, X):
        p, comm, x, caches = self.params, self.bn_comm, X, []
        for i in range(1, self.num_conv + 1):
            w, b = p[f"W{i}"], p[f"b{i}"]
            pool = self.pool_after[i - 1]
            if self.use_batchnorm:
                args = (x, w, b, p[f"gamma{i}"], p[f"beta{i}"], self._conv_param(i), self.bn_params[i - 1])
                x, cache = (conv_bn_relu_pool_forward(*args, POOL_PARAM, comm) if pool
                            else conv_bn_relu_forward(*args, comm))
            else:
                x, cache = (conv_relu_pool_forward(x, w, b, self._conv_param(i), POOL_PARAM) if pool
                            else conv_relu_forward(x, w, b, self._conv_param(i)))
            caches.append(cache)
        bn_offset = self.num_conv if self.use_batchnorm else 0
        scores, head_caches = affine_stack_forward(self, x, self.num_conv + 1, self.num_hidden, bn_offset)
        return scores, (caches, head_caches)

    def _backward(self, dscores, all_caches, grads):
        caches, head_caches = all_caches
        dx = affine_stack_backward(self, dscores, head_caches, self.num_conv + 1, grads)
        for i in range(self.num_conv, 0, -1):
            pool, first = self.pool_after[i - 1], i == 1
            if self.use_batchnorm:
                backward = conv_bn_relu_pool_backward if pool else conv_bn_relu_backward
                dx, grads[f"W{i}"], grads[f"b{i}"], grads[f"gamma{i}"], grads[f"beta{i}"] = backward(
                    dx, caches[i - 1], compute_dx=not first)
            else:
                backward = conv_relu_pool_backward if pool else conv_relu_backward
                dx, grads[f"W{i}"], grads[f"b{i}"] = backward(dx, caches[i - 1], compute_dx=not first)
