"""The CIFAR residual networks of He et al. 2016 ("Deep residual learning", section 4.2)."""

import numpy as np

from ..layers import (affine_backward, affine_forward, conv_backward, conv_bn_relu_backward,
                      conv_bn_relu_forward, conv_forward, spatial_batchnorm_backward,
                      spatial_batchnorm_forward)
from ..layers.residual import (global_avg_pool_backward, global_avg_pool_forward, residual_relu_backward,
                               residual_relu_forward, shortcut_backward, shortcut_forward)
from .base import Model, init_weight

STRIDE_1 = {"stride": 1, "pad": 1}
DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


class ResNet(Model):
    """ResNet-(6n + 2) for 32x32 images: conv3x3 (16) - BN - ReLU; three stages of n basic blocks
    with 16, 32 and 64 channels; global average pooling; affine - softmax.

    A basic block is conv3x3 - BN - ReLU - conv3x3 - BN, plus its input (the shortcut), then
    ReLU. The first block of stages 2 and 3 has stride 2; its shortcut is parameter-free
    ("option A"): every other pixel of the input, its channels zero-padded to the block's
    ((F - C) // 2 zero channels before, the rest after). Convolutions have no bias, as batchnorm
    follows each; batchnorm is part of the model.

    Parameters, in forward order: W1, gamma1, beta1 (the first conv), then per block two convs
    W<i>, gamma<i>, beta<i>, then W<L>, b<L> (the affine layer, L = depth). L2 applies to
    every W.

    Inputs:
    - depth: 6n + 2 (20, 32, 44, 56, 110, ...)
    - input_dim: (C, H, W); widths: the three stages' channels; num_classes
    - weight_scale: 'he' (default) or the std of the Gaussian initial weights
    - reg, dtype, bn_mode, comm, seed: see dpnet.models.base.Model
    - conv_algorithm: 'im2col', 'im2col-whole' or 'winograd' for every convolution it can compute
      (winograd: the stride-1 ones; dpnet.layers.conv_forward); set_conv_algorithms chooses layer
      by layer
    """

    def __init__(self, depth=20, input_dim=(3, 32, 32), widths=(16, 32, 64), num_classes=10, weight_scale="he",
                 reg=0.0, dtype=np.float32, bn_mode="local", comm=None, seed=0, conv_algorithm="im2col"):
        super().__init__(reg=reg, dtype=dtype, bn_mode=bn_mode, comm=comm, seed=seed)
        self.num_classes = num_classes
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {widths!r}")
        self.input_dim, self.depth = tuple(input_dim), depth
        blocks_per_stage = (depth - 2) // 6
        self.blocks = []  # (stride, in channels, out channels) of every block
        c = widths[0]
        for stage, f in enumerate(widths):
            for k in range(blocks_per_stage):
                stride = 2 if stage > 0 and k == 0 else 1
                self.blocks.append((stride, c, f))
                c = f
        # layer -> (input (C, H, W), filter shape, stride and pad); a stride-2 conv's input has
        # its zero row and column added before (_conv_bn_relu), and no further padding
        self.conv_shapes = {1: (tuple(input_dim), (widths[0], input_dim[0], 3, 3), STRIDE_1)}
        h, w = input_dim[1:]
        for b, (stride, c_in, f) in enumerate(self.blocks):
            if stride == 1:
                self.conv_shapes[2 * b + 2] = ((c_in, h, w), (f, c_in, 3, 3), STRIDE_1)
            else:
                self.conv_shapes[2 * b + 2] = ((c_in, h + 1, w + 1), (f, c_in, 3, 3), {"stride": stride, "pad": 0})
            h, w = -(-h // stride), -(-w // stride)
            self.conv_shapes[2 * b + 3] = ((f, h, w), (f, f, 3, 3), STRIDE_1)
        self._add_conv(1, input_dim[0], widths[0], weight_scale)
        for b, (_, c_in, f) in enumerate(self.blocks):
            self._add_conv(2 * b + 2, c_in, f, weight_scale)
            self._add_conv(2 * b + 3, f, f, weight_scale)
        self.fc = depth
        self.add_param(f"W{depth}", init_weight(self.rng, (c, num_classes), c, weight_scale, self.dtype), depth,
                       l2=True)
        self.add_param(f"b{depth}", np.zeros(num_classes, dtype=self.dtype), depth)
        if conv_algorithm != "im2col":
            self.use_conv_algorithm(conv_algorithm)

    def conv_layers(self):
        return [(i, *shapes) for i, shapes in sorted(self.conv_shapes.items())]

    def _add_conv(self, i, c_in, f, weight_scale):
        self.add_param(f"W{i}", init_weight(self.rng, (f, c_in, 3, 3), c_in * 9, weight_scale, self.dtype), i, l2=True)
        self.add_param(f"gamma{i}", np.ones(f, dtype=self.dtype), i)
        self.add_param(f"beta{i}", np.zeros(f, dtype=self.dtype), i)
        self.add_bn_param(f)

    def _check_input(self, X):
        if np.ndim(X) != 4 or tuple(np.shape(X)[1:]) != self.input_dim:
            raise ValueError(f"X must have shape (N, {', '.join(map(str, self.input_dim))}), got {np.shape(X)}")
        return np.asarray(X).astype(self.dtype, copy=False)

    def _conv_bn_relu(self, x, i, stride):
        """conv3x3 (pad 1, `stride`) - BN - ReLU. With stride 2 on an even size the padded
        rows and columns do not tile: as in PyTorch, the last padded row and column are never
        read, so the input gets its zero row and column before (top, left) only."""
        p, conv_param = self.params, self.layer_conv_param(i, self.conv_shapes[i][2])
        if stride > 1:
            x = np.pad(x, ((0, 0), (0, 0), (1, 0), (1, 0)))
        out, cache = conv_bn_relu_forward(x, p[f"W{i}"], None, p[f"gamma{i}"], p[f"beta{i}"],
                                          conv_param, self.bn_params[i - 1], self.bn_comm)
        return out, (cache, stride > 1)

    @staticmethod
    def _conv_bn_relu_backward(dout, cache, compute_dx=True):
        """Returns (dx, dw, dgamma, dbeta) of _conv_bn_relu."""
        inner, padded = cache
        dx, dw, _, dgamma, dbeta = conv_bn_relu_backward(dout, inner, compute_dx)
        return (dx[:, :, 1:, 1:] if padded and dx is not None else dx), dw, dgamma, dbeta

    def _forward(self, X):
        p, comm = self.params, self.bn_comm
        x, stem = self._conv_bn_relu(X, 1, 1)
        caches = []
        for b, (stride, c_in, f) in enumerate(self.blocks):
            i = 2 * b + 2
            a, a_cache = self._conv_bn_relu(x, i, stride)
            z, conv_cache = conv_forward(a, p[f"W{i + 1}"], None, self.layer_conv_param(i + 1, STRIDE_1))
            z, bn_cache = spatial_batchnorm_forward(z, p[f"gamma{i + 1}"], p[f"beta{i + 1}"], self.bn_params[i], comm)
            shortcut, sc_cache = (shortcut_forward(x, f, stride) if stride != 1 or c_in != f else (x, None))
            x, add_cache = residual_relu_forward(z, shortcut)
            caches.append((a_cache, conv_cache, bn_cache, sc_cache, add_cache))
        pooled, pool_cache = global_avg_pool_forward(x)
        scores, fc_cache = affine_forward(pooled, p[f"W{self.fc}"], p[f"b{self.fc}"], self.affine_products(f"W{self.fc}"))
        return scores, (stem, caches, pool_cache, fc_cache)

    def _backward(self, dscores, all_caches, grads):
        stem, caches, pool_cache, fc_cache = all_caches
        dpooled, grads[f"W{self.fc}"], grads[f"b{self.fc}"] = affine_backward(
            dscores, fc_cache, dw_factors=self.dw_factors)
        dx = global_avg_pool_backward(dpooled, pool_cache)
        for b in range(len(self.blocks) - 1, -1, -1):
            i = 2 * b + 2
            a_cache, conv_cache, bn_cache, sc_cache, add_cache = caches[b]
            dz, dshortcut = residual_relu_backward(dx, add_cache)
            dz, grads[f"gamma{i + 1}"], grads[f"beta{i + 1}"] = spatial_batchnorm_backward(dz, bn_cache)
            da, grads[f"W{i + 1}"], _ = conv_backward(dz, conv_cache)
            dx, grads[f"W{i}"], grads[f"gamma{i}"], grads[f"beta{i}"] = self._conv_bn_relu_backward(da, a_cache)
            dx += shortcut_backward(dshortcut, sc_cache) if sc_cache is not None else dshortcut
        _, grads["W1"], grads["gamma1"], grads["beta1"] = self._conv_bn_relu_backward(dx, stem, compute_dx=False)
