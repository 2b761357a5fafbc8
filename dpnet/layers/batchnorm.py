"""Batch normalization, plain and spatial, with an optional synchronizing communicator.

Statistics are always formed the same way: each shard computes its count, mean and
sum of squared deviations (M2, two-pass, so float32 inputs with a large mean stay
exact), then the shards' moments are merged by count in float64. Serially there is
one shard. With `comm` (any object with `allgather(array)` and `allreduce(array)`,
such as a dpnet.parallel communicator) the shards are the ranks' local batches and
the result is the statistics of the whole global batch; this module never imports MPI.

Conventions (as in the homework): running_mean and running_var start at zeros
(init_bn_state), running = momentum * running + (1 - momentum) * batch, and running_var
takes the biased batch variance (M2 / count).
"""

import numpy as np

from ._validate import require_ndim


# At most this many elements of a plane are added in the data's own dtype before float64 takes
# over: the float32 sums of a large plane (1024 x 1024 pixels) stay as accurate as a small one's.
SUM_BLOCK = 1024


def _channel_sums(a, b=None):
    """Per-channel sums of a (N, C, ...) over every axis but C, or of a * b: float64 (C,).

    einsum sums each image's channel plane, SUM_BLOCK elements at a time, in one pass with no
    temporary (np.square and np.sum over several axes took 3-4 times as long); the blocks and
    then the N planes are added in float64.
    """
    n, c = a.shape[:2]
    if a.size == 0:  # an empty shard
        return np.zeros(c)
    if a.ndim == 2:  # (N, D): one value per plane
        return np.einsum("nc->c", a, dtype=np.float64) if b is None else np.einsum("nc,nc->c", a, b, dtype=np.float64)
    rows = a.reshape(n * c, -1)
    other = None if b is None else b.reshape(n * c, -1)
    planes = np.zeros(n * c)
    for start in range(0, rows.shape[1], SUM_BLOCK):
        block = rows[:, start:start + SUM_BLOCK]
        planes += (np.einsum("ij->i", block) if b is None else
                   np.einsum("ij,ij->i", block, other[:, start:start + SUM_BLOCK]))
    return planes.reshape(n, c).sum(axis=0)


def _shard_moments(x):
    """(row, centered): the count, mean and M2 of x (N, C, ...) per channel, as one float64
    row [n, mean.., m2..], and x minus that mean (None for an empty x). The mean in the row
    is the one subtracted, rounded to x's dtype, so that M2 is taken about it exactly."""
    channels = x.shape[1]
    count = x.size // channels
    row = np.zeros(1 + 2 * channels, dtype=np.float64)
    row[0] = count
    centered = None
    if count:
        mean = (_channel_sums(x) / count).astype(x.dtype)
        row[1:1 + channels] = mean
        centered = x - mean.reshape(_param_shape(x))
        row[1 + channels:] = _channel_sums(centered, centered)
    return row, centered


def merge_moments(rows):
    """Merge per-shard moment rows (R, 1 + 2C) into (count, mean (C,), biased var (C,)).

    Chan et al.'s pairwise formula in closed form: mean = sum_r (n_r / n) mean_r and
    M2 = sum_r M2_r + n_r (mean_r - mean)^2. With one shard it returns that shard's
    mean and M2 / n unchanged.
    """
    channels = (rows.shape[1] - 1) // 2
    counts = rows[:, 0]
    total = counts.sum()
    if total == 0:
        return 0, None, None
    means, m2s = rows[:, 1:1 + channels], rows[:, 1 + channels:]
    mean = ((counts / total)[:, None] * means).sum(axis=0)
    m2 = (m2s + counts[:, None] * (means - mean) ** 2).sum(axis=0)
    return int(total), mean, m2 / total


def init_bn_state(channels, dtype):
    """Fresh running statistics of one batchnorm layer, the homework's zeros:
    {'running_mean': (channels,), 'running_var': (channels,)} of `dtype`."""
    return {"running_mean": np.zeros(channels, dtype=dtype),
            "running_var": np.zeros(channels, dtype=dtype)}


def _param_shape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _forward(x, gamma, beta, bn_param, comm):
    mode = bn_param.get("mode", "train")
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    channels = x.shape[1]
    if gamma.shape != (channels,) or beta.shape != (channels,):
        raise ValueError(
            f"gamma and beta must have shape ({channels},) to match the {channels} channels of x, "
            f"got {gamma.shape} and {beta.shape}"
        )
    shape = _param_shape(x)
    for key, value in init_bn_state(channels, x.dtype).items():
        bn_param.setdefault(key, value)
    running_mean, running_var = bn_param["running_mean"], bn_param["running_var"]
    centered = None  # x minus the batch mean, where this shard is the whole batch
    if mode == "train":
        row, centered = _shard_moments(x)
        rows = row[None]
        if comm is not None:
            rows = comm.allgather(row)  # (R, 1 + 2C)
            if len(rows) > 1:
                centered = None  # the global mean is another
        count, mean, var = merge_moments(rows)
        if count == 0:  # no examples (on any rank): nothing to normalise, running stats kept
            return x.copy(), (None, gamma, None, 0, comm)
        mean, var = mean.astype(x.dtype), var.astype(x.dtype)
        running_mean *= momentum
        running_mean += (1 - momentum) * mean
        running_var *= momentum
        running_var += (1 - momentum) * var
    elif mode == "test":
        mean, var, count = running_mean.astype(x.dtype), running_var.astype(x.dtype), None
    else:
        raise ValueError(f"bn_param['mode'] must be 'train' or 'test', got {mode!r}")
    inv_std = 1 / np.sqrt(var + x.dtype.type(eps))  # (C,)
    # one shard: its mean, merged alone, is the batch mean to the bit (float64 and back)
    x_hat = centered if centered is not None else x - mean.reshape(shape)
    x_hat *= inv_std.reshape(shape)
    out = x_hat * gamma.reshape(shape)
    out += beta.reshape(shape)
    return out, (x_hat, gamma, inv_std, count, comm)


def _backward(dout, cache):
    x_hat, gamma, inv_std, count, comm = cache
    if count is None:
        raise ValueError("batchnorm backward needs a cache from a train-mode forward pass")
    channels = gamma.shape[0]
    if count == 0:
        zeros = np.zeros(channels, dtype=dout.dtype)
        return np.zeros_like(dout), zeros, zeros.copy()
    shape = _param_shape(dout)
    # [sum dy, sum dy * x_hat] over this shard
    sums = np.stack([_channel_sums(dout), _channel_sums(dout, x_hat)]).astype(dout.dtype)
    dbeta, dgamma = sums[0].copy(), sums[1].copy()
    if comm is not None:
        sums = comm.allreduce(sums)  # global sums over every rank's shard
    # dx = gamma / std * (dy - sum(dy) / n - x_hat * sum(dy x_hat) / n), n the global count
    dx = np.multiply(x_hat, (sums[1] / count).reshape(shape))
    np.subtract(dout, dx, out=dx)
    dx -= (sums[0] / count).reshape(shape)
    dx *= (gamma * inv_std).reshape(shape)
    return dx, dgamma, dbeta


def batchnorm_forward(x, gamma, beta, bn_param, comm=None):
    """Batch normalization of features.

    Inputs:
    - x: (N, D)
    - gamma, beta: scale and shift, (D,)
    - bn_param: dict with 'mode' ('train' or 'test'), optional 'eps' (1e-5), 'momentum'
      (0.9), 'running_mean' and 'running_var' (D,), created on first use by init_bn_state
    - comm: None for this batch alone; a communicator to normalise with the statistics
      of the global batch spread over its ranks (synchronized batchnorm)

    Returns (out, cache): out is (N, D).
    """
    require_ndim("x", x, 2, "(N, D)")
    return _forward(x, gamma, beta, bn_param, comm)


def batchnorm_backward(dout, cache):
    """Backward pass of batchnorm_forward: returns (dx (N, D), dgamma (D,), dbeta (D,)).

    dgamma and dbeta are this shard's sums; with a communicator, dx is exact for the
    global batch and the parameter gradients are summed over ranks by the caller.
    """
    return _backward(dout, cache)


def spatial_batchnorm_forward(x, gamma, beta, bn_param, comm=None):
    """Spatial batch normalization: statistics per channel over N, H and W.

    Inputs:
    - x: (N, C, H, W)
    - gamma, beta: (C,)
    - bn_param, comm: as batchnorm_forward

    Returns (out, cache): out is (N, C, H, W).
    """
    require_ndim("x", x, 4, "(N, C, H, W)")
    return _forward(x, gamma, beta, bn_param, comm)


def spatial_batchnorm_backward(dout, cache):
    """Backward pass of spatial_batchnorm_forward: returns (dx, dgamma (C,), dbeta (C,))."""
    return _backward(dout, cache)
