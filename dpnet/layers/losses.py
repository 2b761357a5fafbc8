"""Classification losses on class scores."""

import numpy as np

from ._validate import require_labels, require_ndim


def _normalizer(batch_size, n):
    if batch_size is None:
        if n == 0:
            raise ValueError("x has no rows: pass batch_size (the global batch) to average an empty shard over")
        return n
    if batch_size < n or batch_size < 1:
        raise ValueError(f"batch_size must be at least len(x) = {n} and positive, got {batch_size}")
    return batch_size


def softmax_loss(x, y, batch_size=None):
    """Softmax cross-entropy loss.

    Inputs:
    - x: class scores, (N, C)
    - y: integer labels, (N,), each in [0, C)
    - batch_size: the number of examples the loss is averaged over; default N.
      A data-parallel rank passes the global batch size, so that the shard losses
      (and their gradients) sum to those of the whole batch.

    Returns (loss, dx): loss is a Python float, dx has the shape and dtype of x.
    """
    require_ndim("x", x, 2, "(N, C)")
    n, num_classes = x.shape
    y = require_labels(y, n, num_classes)
    total = _normalizer(batch_size, n)
    shifted = x - x.max(axis=1, keepdims=True) if n else x.copy()  # (N, C)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(n)
    loss = -float(log_probs[rows, y].sum(dtype=np.float64)) / total
    dx = np.exp(log_probs)  # probabilities
    dx[rows, y] -= 1
    dx /= total
    return loss, dx


def svm_loss(x, y, batch_size=None):
    """Multiclass SVM (hinge) loss with margin 1.

    Inputs and returns as softmax_loss.
    """
    require_ndim("x", x, 2, "(N, C)")
    n, num_classes = x.shape
    y = require_labels(y, n, num_classes)
    total = _normalizer(batch_size, n)
    rows = np.arange(n)
    correct = x[rows, y][:, None]  # (N, 1)
    margins = np.maximum(0, x - correct + 1)  # (N, C)
    margins[rows, y] = 0
    loss = float(margins.sum(dtype=np.float64)) / total
    positive = (margins > 0).astype(x.dtype)
    dx = positive
    dx[rows, y] -= positive.sum(axis=1)
    dx /= total
    return loss, dx
