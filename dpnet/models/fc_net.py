"""The homework's fully connected network."""

import numpy as np

from .affine_stack import affine_stack_backward, affine_stack_forward, init_affine_stack
from .base import Model


class FullyConnectedNet(Model):
    """{affine - [batchnorm] - relu - [dropout]} x (L - 1) - affine - softmax.

    Inputs:
    - hidden_dims: units in each hidden layer
    - input_dim: features per example (inputs of any shape (N, ...) are flattened)
    - num_classes: scores per example
    - dropout: the probability of KEEPING a hidden unit, in (0, 1]; 1 disables dropout
    - use_batchnorm: batchnorm after every hidden affine layer (gamma<i>, beta<i>)
    - weight_scale: std of the Gaussian initial weights, or 'he'
    - reg, dtype, bn_mode, comm, seed: see dpnet.models.base.Model (seed also drives
      the dropout masks)
    """

    def __init__(self, hidden_dims, input_dim=3 * 32 * 32, num_classes=10, dropout=1.0,
                 use_batchnorm=False, reg=0.0, weight_scale=1e-2, dtype=np.float32,
                 bn_mode="local", comm=None, seed=0):
        super().__init__(reg=reg, dtype=dtype, bn_mode=bn_mode, comm=comm, seed=seed)
        self.num_classes = num_classes
        if not 0 < dropout <= 1:
            raise ValueError(f"dropout is the keep probability and must be in (0, 1], got {dropout}")
        self.input_dim = int(input_dim)
        self.num_hidden = len(hidden_dims)
        self.num_layers = self.num_hidden + 1
        self.use_batchnorm = use_batchnorm
        init_affine_stack(self, 1, self.input_dim, hidden_dims, num_classes, weight_scale, use_batchnorm)
        if dropout < 1:
            self.dropout_param = {"mode": "train", "p": dropout, "rng": self.rng}

    def _check_input(self, X):
        X = np.asarray(X)
        if X.ndim < 2 or int(np.prod(X.shape[1:])) != self.input_dim:
            raise ValueError(f"X must have shape (N, ...) with {self.input_dim} features per example, got {X.shape}")
        return X.astype(self.dtype, copy=False)

    def _forward(self, X):
        return affine_stack_forward(self, X, 1, self.num_hidden, 0)

    def _backward(self, dscores, caches, grads):
        affine_stack_backward(self, dscores, caches, 1, grads, compute_dx_first=False)
