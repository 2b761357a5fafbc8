"""Argument checks shared by the layers: each raises ValueError naming the argument,
what was received and what was expected."""

import numpy as np


def require_ndim(name, array, ndim, layout):
    """Raise unless `array` has `ndim` dimensions; `layout` names them, e.g. '(N, C, H, W)'."""
    if np.ndim(array) != ndim:
        raise ValueError(
            f"{name} must be a {ndim}-d array {layout}, got shape {np.shape(array)}"
        )


def require_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def require_nonnegative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def require_labels(y, num_samples, num_classes):
    """Raise unless y is an integer vector of length num_samples with values in [0, num_classes)."""
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != num_samples:
        raise ValueError(f"y must have shape ({num_samples},) to match x, got {y.shape}")
    if y.size == 0:
        return y.astype(np.intp)  # an empty list arrives as float64
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= num_classes:
        bad = y[(y < 0) | (y >= num_classes)][0]
        raise ValueError(f"y holds label {bad}, expected labels in [0, {num_classes})")
    return y
