"""CIFAR-10 in the official python format (cifar-10-batches-py), validated as it is read.

The number of images per batch file is taken from the file (batches of the real
subset hold about 1,000, not 10,000). Images stay uint8 (N, 3, 32, 32); convert per
minibatch.
"""

import os
import pickle

import numpy as np

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


class DataError(ValueError):
    """A data file is missing, truncated or not what it claims to be."""


def _unpickle(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected the CIFAR-10 python format, cifar-10-batches-py)")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as exc:  # truncated or foreign files fail in many ways
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})") from exc


def load_batch(path):
    """One batch file -> (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    d = _unpickle(path)
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{path}: expected a dict with b'data' and b'labels', got {keys}")
    data, labels = d[b"data"], np.asarray(d[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: b'data' must be a uint8 array (N, 3072), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: b'labels' must be integers, got {labels.dtype} values such as {labels.flat[0]!r}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels must be in [0, {NUM_CLASSES}), got range [{labels.min()}, {labels.max()}]")
    return data.reshape((-1,) + IMAGE_SHAPE), labels.astype(np.int64)


def load_label_names(root):
    d = _unpickle(os.path.join(root, META_FILE))
    names = d.get(b"label_names") if isinstance(d, dict) else None
    if not names or len(names) != NUM_CLASSES:
        raise DataError(f"{os.path.join(root, META_FILE)}: expected {NUM_CLASSES} b'label_names'")
    return [n.decode() for n in names]


def load_cifar10(root):
    """All of cifar-10-batches-py -> dict with x_train, y_train, x_test, y_test (uint8 / int64)
    and label_names."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: not a directory (expected cifar-10-batches-py)")
    parts = [load_batch(os.path.join(root, name)) for name in TRAIN_FILES]
    x_test, y_test = load_batch(os.path.join(root, TEST_FILE))
    return {
        "x_train": np.concatenate([p[0] for p in parts]),
        "y_train": np.concatenate([p[1] for p in parts]),
        "x_test": x_test,
        "y_test": y_test,
        "label_names": load_label_names(root),
    }
