"""CIFAR-10 as one HDF5 file (`python -m dpnet.data prepare`), validated as it is read.

Layout: datasets x_train (uint8 N,3,32,32), y_train (int64 N), x_test, y_test and
label_names (10 UTF-8 strings), stored contiguous and uncompressed so they read fast.
File attributes: format "dpnet-cifar10", version, num_train, num_test. Each dataset has
a `sha256` attribute: the SHA-256 of its C-order bytes (of the names joined by newlines
for label_names). The reader hashes each array it has just read, in place, so the data
is held once and only the parts asked for are read and checked.
"""

import hashlib
import os

import numpy as np

from ..atomic import atomic_path
from .cifar import IMAGE_SHAPE, NUM_CLASSES, DataError

FORMAT = "dpnet-cifar10"
VERSION = 1
PARTS = ("train", "test")


def _sha256(value):
    """SHA-256 hex digest of an array's C-order bytes, or of a list of names."""
    if isinstance(value, np.ndarray):
        return hashlib.sha256(memoryview(np.ascontiguousarray(value)).cast("B")).hexdigest()
    return hashlib.sha256("\n".join(value).encode()).hexdigest()


def write_hdf5(data, path):
    """Write a load_cifar10-style dict to path atomically (temporary file, then rename)."""
    import h5py

    from .. import __version__

    arrays = {"x_train": (data["x_train"], np.uint8), "y_train": (data["y_train"], np.int64),
              "x_test": (data["x_test"], np.uint8), "y_test": (data["y_test"], np.int64)}
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, (value, dtype) in arrays.items():
                value = np.ascontiguousarray(value, dtype=dtype)
                f.create_dataset(name, data=value).attrs["sha256"] = _sha256(value)
            names = [str(n) for n in data["label_names"]]
            ds = f.create_dataset("label_names", data=names, dtype=h5py.string_dtype())
            ds.attrs["sha256"] = _sha256(names)
            f.attrs.update({"format": FORMAT, "version": VERSION, "dpnet_version": __version__,
                            "num_train": len(data["x_train"]), "num_test": len(data["x_test"])})
    return path


def _check_sum(path, name, ds, value):
    expected = ds.attrs.get("sha256")
    if isinstance(expected, bytes):
        expected = expected.decode()
    if not isinstance(expected, str):
        raise DataError(f"{path}: dataset {name} has no sha256 attribute")
    got = _sha256(value)
    if got != expected:
        raise DataError(f"{path}: {name} is corrupt (sha256 {got}, expected {expected})")


def _read_part(path, f, part):
    """(images, labels) of one part, shapes and dtypes checked before reading."""
    xname, yname = f"x_{part}", f"y_{part}"
    for name in (xname, yname):
        if name not in f or not hasattr(f[name], "dtype"):
            raise DataError(f"{path}: dataset {name} is missing")
    x, y = f[xname], f[yname]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{path}: {xname} must be uint8 (N, {', '.join(map(str, IMAGE_SHAPE))}), "
                        f"got {x.dtype} {x.shape}")
    if y.dtype != np.int64 or y.shape != (x.shape[0],):
        raise DataError(f"{path}: {yname} must be int64 ({x.shape[0]},), got {y.dtype} {y.shape}")
    images, labels = x[()], y[()]
    _check_sum(path, xname, x, images)
    _check_sum(path, yname, y, labels)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: {yname} must be in [0, {NUM_CLASSES}), "
                        f"got [{labels.min()}, {labels.max()}]")
    return images, labels


def load_hdf5(path, parts=PARTS):
    """A `prepare`d HDF5 file -> dict like load_cifar10's (x_train, y_train, x_test, y_test,
    label_names), holding only the parts asked for ("train", "test"). Every array read is
    checked against its shape, dtype and sha256; any problem raises DataError naming the file."""
    import h5py

    parts = tuple(parts)
    if not set(parts) <= set(PARTS):
        raise ValueError(f"parts must be among {PARTS}, got {parts}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:  # truncated, foreign, unreadable
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
    try:
        with f:
            fmt = f.attrs.get("format")
            fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
            if fmt != FORMAT:
                raise DataError(f"{path}: not a dpnet CIFAR-10 file (format attribute {fmt!r}, expected "
                                f"{FORMAT!r}; make one with `python -m dpnet.data prepare`)")
            version = int(f.attrs.get("version", 0))
            if not 1 <= version <= VERSION:
                raise DataError(f"{path}: format version {version}, this dpnet reads up to {VERSION}")
            out = {}
            for part in parts:
                out[f"x_{part}"], out[f"y_{part}"] = _read_part(path, f, part)
            if "label_names" not in f:
                raise DataError(f"{path}: dataset label_names is missing")
            names = [str(n) for n in f["label_names"].asstr()[()]]
            if len(names) != NUM_CLASSES:
                raise DataError(f"{path}: expected {NUM_CLASSES} label_names, got {len(names)}")
            _check_sum(path, "label_names", f["label_names"], names)
            out["label_names"] = names
            return out
    except DataError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as exc:  # damage found while reading
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
