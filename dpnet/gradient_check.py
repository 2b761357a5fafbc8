"""Numerical gradients by centred differences, for checking backward passes (use float64)."""

import numpy as np


def rel_error(x, y):
    """Largest elementwise relative error max |x - y| / max(1e-8, |x| + |y|) (the homework's).

    Meaningless for an entry that is 0 in theory: its rounding noise is compared with
    itself. Gradient checks use normwise_rel_error."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y))))


def normwise_rel_error(x, y):
    """Largest difference relative to the arrays' largest entry:
    max |x - y| / max(max |x|, max |y|), 0 for two zero arrays.

    Rounding noise in the numerical estimate of a gradient is relative to the scale of the
    whole computation, not of each entry, so an entry that is 0 in theory (a dead channel)
    counts for what it is: noise far below the array's scale."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    scale = max(np.max(np.abs(x)), np.max(np.abs(y)), 1e-300)
    return float(np.max(np.abs(x - y)) / scale)


def eval_numerical_gradient(f, x, h=1e-5):
    """Gradient of the scalar function f at x, (shape of x).

    f is called with no arguments after x has been changed in place, one element at a
    time; x is restored afterwards.
    """
    grad = np.zeros_like(x)
    for ix in np.ndindex(x.shape):
        old = x[ix]
        x[ix] = old + h
        fxph = f()
        x[ix] = old - h
        fxmh = f()
        x[ix] = old
        grad[ix] = (fxph - fxmh) / (2 * h)
    return grad


def eval_numerical_gradient_array(f, x, df, h=1e-5):
    """Gradient of sum(f(x) * df) with respect to x, for an array-valued f(x).

    f takes x and returns an array; x is changed in place and restored.
    """
    grad = np.zeros_like(x)
    for ix in np.ndindex(x.shape):
        old = x[ix]
        x[ix] = old + h
        pos = np.array(f(x), copy=True)
        x[ix] = old - h
        neg = np.array(f(x), copy=True)
        x[ix] = old
        grad[ix] = np.sum((pos - neg) * df) / (2 * h)
    return grad
