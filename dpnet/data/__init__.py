"""Data sets: CIFAR-10 (python format) and a synthetic CIFAR-shaped fallback."""

from .cifar import DataError, load_batch, load_cifar10
from .synthetic import make_synthetic

__all__ = ["DataError", "load_batch", "load_cifar10", "make_synthetic"]
