"""Data sets: CIFAR-10 (python format or a `prepare`d HDF5 file) and a synthetic
CIFAR-shaped fallback. `python -m dpnet.data download|prepare` fetches and converts CIFAR-10."""

import os

from .cifar import DataError, load_batch, load_cifar10
from .hdf5 import load_hdf5, write_hdf5
from .synthetic import make_synthetic

HDF5_SUFFIXES = (".h5", ".hdf5")


def load_dataset(path):
    """A cifar-10-batches-py folder -> load_cifar10, a .h5/.hdf5 file -> load_hdf5;
    anything else raises DataError."""
    if os.path.isdir(path):
        return load_cifar10(path)
    if os.path.isfile(path) and path.lower().endswith(HDF5_SUFFIXES):
        return load_hdf5(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    raise DataError(f"{path}: expected a cifar-10-batches-py folder or a .h5 file made by "
                    "`python -m dpnet.data prepare`")


__all__ = ["DataError", "load_batch", "load_cifar10", "load_dataset", "load_hdf5", "make_synthetic",
           "write_hdf5"]
