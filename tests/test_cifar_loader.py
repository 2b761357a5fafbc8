"""dpnet.data.load_batch / load_cifar10 on CIFAR-10 files (official python format) that the
tests write: shapes, dtypes, channel layout, sizes taken from the files, and a DataError
(a ValueError) naming the file for everything that is not a valid batch."""

import os
import pickle

import numpy as np
import pytest

from dpnet.data import DataError, load_batch, load_cifar10
from tests.train_helpers import LABEL_NAMES, make_batch, write_cifar_folder, write_pickle


def batch_file(tmp_path, d, name="data_batch_1"):
    path = tmp_path / name
    write_pickle(path, d)
    return str(path)


def good(n=5, seed=0):
    return make_batch(n, seed)[0]


# ---------------------------------------------------------------- valid files

def test_load_batch_shapes_dtypes_and_values(tmp_path):
    d, labels = make_batch(7, seed=3)
    x, y = load_batch(batch_file(tmp_path, d))
    assert x.shape == (7, 3, 32, 32) and x.dtype == np.uint8
    assert y.shape == (7,) and y.dtype == np.int64
    assert np.array_equal(y, labels)
    assert np.array_equal(x.reshape(7, 3072), d[b"data"])  # the bytes, unconverted


def test_channel_layout_is_chw_red_plane_first(tmp_path):
    row = np.zeros(3072, dtype=np.uint8)
    row[:1024] = 200  # red plane
    row[1024:2048] = 100  # green plane
    row[2048:] = 7  # blue plane
    row[0 * 1024 + 1 * 32 + 5] = 255  # red, image row 1, column 5
    row[2 * 1024 + 31 * 32 + 0] = 1  # blue, last row, first column
    d = {b"batch_label": b"x", b"labels": [4], b"data": row[None].copy(), b"filenames": [b"a.png"]}
    x, y = load_batch(batch_file(tmp_path, d))
    image = x[0]
    assert image.shape == (3, 32, 32)
    assert image[0, 1, 5] == 255 and image[2, 31, 0] == 1
    image = image.copy()
    image[0, 1, 5], image[2, 31, 0] = 200, 7
    assert np.all(image[0] == 200) and np.all(image[1] == 100) and np.all(image[2] == 7)
    assert np.array_equal(x[0], row.reshape(3, 32, 32)) and y.tolist() == [4]


def test_labels_as_an_array_are_accepted(tmp_path):
    d = good(4)
    d[b"labels"] = np.array([0, 9, 3, 3], dtype=np.int32)
    _, y = load_batch(batch_file(tmp_path, d))
    assert y.dtype == np.int64 and y.tolist() == [0, 9, 3, 3]


def test_load_cifar10_takes_sizes_from_the_files(tmp_path):
    sizes = (3, 5, 1, 8, 2)
    root = write_cifar_folder(str(tmp_path / "cifar"), train_sizes=sizes, test_size=6, seed=4)
    data = load_cifar10(root)
    assert data["x_train"].shape == (sum(sizes), 3, 32, 32) and data["x_train"].dtype == np.uint8
    assert data["y_train"].shape == (sum(sizes),) and data["y_train"].dtype == np.int64
    assert data["x_test"].shape == (6, 3, 32, 32) and data["y_test"].shape == (6,)
    assert data["y_test"].dtype == np.int64
    assert data["label_names"] == [n.decode() for n in LABEL_NAMES]
    # in file order: data_batch_1 .. data_batch_5
    expected_x = np.concatenate([load_batch(os.path.join(root, f"data_batch_{i}"))[0] for i in range(1, 6)])
    expected_y = np.concatenate([load_batch(os.path.join(root, f"data_batch_{i}"))[1] for i in range(1, 6)])
    assert np.array_equal(data["x_train"], expected_x) and np.array_equal(data["y_train"], expected_y)
    with open(os.path.join(root, "test_batch"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert np.array_equal(data["x_test"].reshape(6, -1), raw[b"data"])
    assert data["y_test"].tolist() == raw[b"labels"]


def test_label_names_come_from_batches_meta(tmp_path):
    root = write_cifar_folder(str(tmp_path / "cifar"), train_sizes=(2,) * 5, test_size=2)
    names = [f"class-{i}".encode() for i in range(10)]
    write_pickle(os.path.join(root, "batches.meta"), {b"label_names": names})
    assert load_cifar10(root)["label_names"] == [f"class-{i}" for i in range(10)]


# ---------------------------------------------------------------- errors name the file

def assert_data_error(path, *fragments, loader=load_batch):
    with pytest.raises(DataError) as info:
        loader(str(path))
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path):
    assert_data_error(tmp_path / "data_batch_1", "not found")


def test_truncated_file(tmp_path):
    path = batch_file(tmp_path, good(10))
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[:len(raw) // 2])
    assert_data_error(path)


def test_empty_file(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"")
    assert_data_error(path)


def test_not_a_pickle(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"<html>404 not found</html>" * 10)
    assert_data_error(path)


@pytest.mark.parametrize("obj", [[1, 2, 3], "a string", np.zeros((2, 3072), np.uint8)],
                         ids=["list", "str", "ndarray"])
def test_foreign_pickle(tmp_path, obj):
    assert_data_error(batch_file(tmp_path, obj), "b'data'")


@pytest.mark.parametrize("missing", [b"data", b"labels"])
def test_dict_missing_keys(tmp_path, missing):
    d = good(3)
    del d[missing]
    assert_data_error(batch_file(tmp_path, d), "b'data' and b'labels'")


def test_str_keys_are_foreign(tmp_path):
    d = {k.decode(): v for k, v in good(3).items()}
    assert_data_error(batch_file(tmp_path, d))


@pytest.mark.parametrize("data", [
    np.zeros((3, 3072), np.float32),  # wrong dtype
    np.zeros((3, 3072), np.int64),
    np.zeros((3, 3000), np.uint8),  # wrong row length
    np.zeros((3, 3, 32, 32), np.uint8),  # already 4-d
    np.zeros(3 * 3072, np.uint8),  # flat
    [[0] * 3072] * 3,  # not an array
], ids=["float32", "int64", "3000-columns", "4d", "1d", "list"])
def test_wrong_data_dtype_or_shape(tmp_path, data):
    d = good(3)
    d[b"data"] = data
    assert_data_error(batch_file(tmp_path, d), "uint8")


@pytest.mark.parametrize("bad", [10, -1, 255])
def test_label_out_of_range(tmp_path, bad):
    d = good(4)
    d[b"labels"][2] = bad
    assert_data_error(batch_file(tmp_path, d), "labels must be in [0, 10)", str(bad))


@pytest.mark.parametrize("count", [3, 5, 0])
def test_label_count_mismatch(tmp_path, count):
    d = good(4)
    d[b"labels"] = d[b"labels"][:count] + [1] * max(0, count - 4)
    assert_data_error(batch_file(tmp_path, d), "4 images", f"{count} labels")


def test_two_dimensional_labels(tmp_path):
    d = good(4)
    d[b"labels"] = np.zeros((4, 1), dtype=np.int64)
    assert_data_error(batch_file(tmp_path, d))


def test_non_integer_labels(tmp_path):
    d = good(2)
    d[b"labels"] = [b"cat", b"dog"]
    assert_data_error(batch_file(tmp_path, d), "labels")


def test_fractional_labels(tmp_path):
    d = good(2)
    d[b"labels"] = [0.5, 2.7]
    assert_data_error(batch_file(tmp_path, d), "labels")


def test_load_cifar10_names_the_bad_file(tmp_path):
    root = write_cifar_folder(str(tmp_path / "cifar"), train_sizes=(3,) * 5, test_size=3)
    path = os.path.join(root, "data_batch_3")
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    assert_data_error(root, "data_batch_3", loader=load_cifar10)


def test_load_cifar10_missing_folder_and_files(tmp_path):
    assert_data_error(tmp_path / "nowhere", loader=load_cifar10)
    root = write_cifar_folder(str(tmp_path / "cifar"), train_sizes=(2,) * 5, test_size=2)
    os.remove(os.path.join(root, "test_batch"))
    message = assert_data_error(root, loader=load_cifar10)
    assert os.path.join(root, "test_batch") in message


@pytest.mark.parametrize("meta", [None, {b"label_names": [b"a"] * 9}, {b"other": 1}, [b"a"] * 10],
                         ids=["missing", "nine-names", "no-names", "a-list"])
def test_bad_batches_meta(tmp_path, meta):
    root = write_cifar_folder(str(tmp_path / "cifar"), train_sizes=(2,) * 5, test_size=2)
    path = os.path.join(root, "batches.meta")
    if meta is None:
        os.remove(path)
    else:
        write_pickle(path, meta)
    message = assert_data_error(root, loader=load_cifar10)
    assert path in message
