"""Layers as pure functions of arrays: `foo_forward(...) -> (out, cache)` and
`foo_backward(dout, cache) -> gradients`, in the CS231n / nndl contract.

This package imports neither mpi4py nor dpnet.parallel; layers that can synchronize
take a communicator argument.
"""

from .activations import relu_backward, relu_forward
from .affine import WeightGradFactors, affine_backward, affine_forward
from .batchnorm import (batchnorm_backward, batchnorm_forward, init_bn_state, merge_moments,
                        spatial_batchnorm_backward, spatial_batchnorm_forward)
from .conv import (conv_backward, conv_backward_naive, conv_forward, conv_forward_naive,
                   conv_output_shape)
from .dropout import dropout_backward, dropout_forward
from .losses import softmax_loss, svm_loss
from .pool import (max_pool_backward, max_pool_backward_naive, max_pool_forward,
                   max_pool_forward_naive, pool_output_shape)
from .residual import (global_avg_pool_backward, global_avg_pool_backward_naive, global_avg_pool_forward,
                       global_avg_pool_forward_naive, residual_relu_backward, residual_relu_forward,
                       shortcut_backward, shortcut_backward_naive, shortcut_forward, shortcut_forward_naive)
from .sandwich import (affine_bn_relu_backward, affine_bn_relu_forward, affine_relu_backward,
                       affine_relu_forward, conv_bn_relu_backward, conv_bn_relu_forward,
                       conv_bn_relu_pool_backward, conv_bn_relu_pool_forward,
                       conv_relu_backward, conv_relu_forward, conv_relu_pool_backward,
                       conv_relu_pool_forward)

__all__ = [
    "affine_forward", "affine_backward", "WeightGradFactors", "relu_forward", "relu_backward",
    "conv_forward", "conv_backward", "conv_forward_naive", "conv_backward_naive",
    "conv_output_shape", "max_pool_forward", "max_pool_backward", "max_pool_forward_naive",
    "max_pool_backward_naive", "pool_output_shape", "batchnorm_forward", "batchnorm_backward",
    "spatial_batchnorm_forward", "spatial_batchnorm_backward", "merge_moments", "init_bn_state",
    "dropout_forward", "dropout_backward", "softmax_loss", "svm_loss",
    "shortcut_forward", "shortcut_backward", "shortcut_forward_naive", "shortcut_backward_naive",
    "residual_relu_forward", "residual_relu_backward", "global_avg_pool_forward", "global_avg_pool_backward",
    "global_avg_pool_forward_naive", "global_avg_pool_backward_naive",
    "affine_relu_forward", "affine_relu_backward", "affine_bn_relu_forward",
    "affine_bn_relu_backward", "conv_relu_forward", "conv_relu_backward",
    "conv_relu_pool_forward", "conv_relu_pool_backward", "conv_bn_relu_forward",
    "conv_bn_relu_backward", "conv_bn_relu_pool_forward", "conv_bn_relu_pool_backward",
]
