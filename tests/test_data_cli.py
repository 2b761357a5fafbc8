"""`python -m dpnet.data download|prepare`, the HDF5 reader and load_dataset, with no network:
archives in the official CIFAR-10 layout (tiny batches) are served from file:// URLs and from
an http.server on 127.0.0.1."""

import hashlib
import http.server
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading

import h5py
import numpy as np
import pytest

from dpnet.data import DataError, load_cifar10, load_dataset, load_hdf5
from dpnet.data.__main__ import main
from dpnet.data.download import FOLDER, default_dir

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 6


def _batch_bytes(rng, label):
    n = PER_BATCH
    return pickle.dumps({b"batch_label": label.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}, protocol=2)


def make_archive(path, seed=0, folder=FOLDER):
    """A tar.gz laid out like cifar-10-python.tar.gz, with PER_BATCH images per batch."""
    rng = np.random.default_rng(seed)
    files = {f"data_batch_{i}": _batch_bytes(rng, f"training batch {i} of 5") for i in range(1, 6)}
    files["test_batch"] = _batch_bytes(rng, "testing batch 1 of 1")
    files["batches.meta"] = pickle.dumps({b"num_cases_per_batch": PER_BATCH, b"num_vis": 3072,
                                          b"label_names": [n.encode() for n in NAMES]}, protocol=2)
    files["readme.html"] = b"<html>tiny CIFAR-10</html>"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(folder)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        for name, blob in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size, info.mode = len(blob), 0o644
            tar.addfile(info, io.BytesIO(blob))
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz"
    return path, make_archive(path)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory, archive):
    """An unpacked tiny cifar-10-batches-py."""
    root = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(archive[0]) as tar:
        tar.extractall(root)  # our own archive
    return root / FOLDER


def leftovers(directory):
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def assert_same(a, b):
    assert set(a) == set(b)
    for key in a:
        if key == "label_names":
            assert list(a[key]) == list(b[key])
        else:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
            np.testing.assert_array_equal(a[key], b[key])


class _Server:
    """http.server on 127.0.0.1 serving one payload; truncate=k sends only k bytes of it
    (with the full Content-Length) and then drops the connection."""

    def __init__(self, payload, truncate=None):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload if truncate is None else payload[:truncate])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cifar-10-python.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(payload, truncate=None):
        servers.append(_Server(payload, truncate))
        return servers[-1].url

    yield start
    for s in servers:
        s.close()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- download

def test_download_from_file_url(tmp_path, archive, cifar_dir, capsys):
    path, md5 = archive
    assert main(["download", "--dir", str(tmp_path), "--url", path.as_uri(), "--md5", md5]) == 0
    assert leftovers(tmp_path) == [FOLDER]
    assert_same(load_cifar10(tmp_path / FOLDER), load_cifar10(cifar_dir))
    assert len(load_cifar10(tmp_path / FOLDER)["x_train"]) == 5 * PER_BATCH
    assert "CIFAR-10 ready" in capsys.readouterr().out


def test_download_over_http_from_plain_path_and_subprocess(tmp_path, archive, serve):
    path, md5 = archive
    url = serve(path.read_bytes())
    result = subprocess.run([sys.executable, "-m", "dpnet.data", "download", "--dir", str(tmp_path / "a"),
                             "--url", url, "--md5", md5], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "downloading" in result.stderr
    assert leftovers(tmp_path / "a") == [FOLDER]
    # an archive fetched elsewhere can be given as a plain path
    assert main(["download", "--dir", str(tmp_path / "b"), "--url", str(path), "--md5", md5]) == 0
    assert leftovers(tmp_path / "b") == [FOLDER]


def test_default_dir_is_where_train_looks(tmp_path, monkeypatch, archive):
    from dpnet.train import default_data_places

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DPNET_DATA", raising=False)
    assert default_dir() == str(tmp_path / "cache" / "dpnet")
    assert main(["download", "--url", archive[0].as_uri(), "--md5", archive[1]]) == 0
    target = tmp_path / "cache" / "dpnet" / FOLDER
    assert target.is_dir() and str(target) in default_data_places()


def test_md5_mismatch_leaves_nothing(tmp_path, archive, capsys):
    path, md5 = archive
    wrong = "0" * 32
    assert main(["download", "--dir", str(tmp_path), "--url", path.as_uri(), "--md5", wrong]) == 2
    err = capsys.readouterr().err
    assert wrong in err and md5 in err and "MD5" in err
    assert leftovers(tmp_path) == []


def test_unreachable_url_fails_fast_and_creates_nothing(tmp_path, capsys):
    target = tmp_path / "new" / "cache"
    url = f"http://127.0.0.1:{closed_port()}/x"
    assert main(["download", "--dir", str(target), "--url", url]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot reach {url}" in err and "--data" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_interrupted_download_leaves_nothing(tmp_path, archive, serve, capsys):
    path, md5 = archive
    payload = path.read_bytes()
    url = serve(payload, truncate=len(payload) // 2)
    assert main(["download", "--dir", str(tmp_path / "d"), "--url", url, "--md5", md5]) == 2
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    (tmp_path / "e").mkdir()  # an existing folder stays, empty
    assert main(["download", "--dir", str(tmp_path / "e"), "--url", url, "--md5", md5]) == 2
    assert leftovers(tmp_path / "e") == []


def test_not_an_archive_or_wrong_layout(tmp_path, capsys):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball" * 100)
    assert main(["download", "--dir", str(tmp_path / "d"), "--url", junk.as_uri(), "--md5", ""]) == 2
    assert "cannot unpack" in capsys.readouterr().err
    other = tmp_path / "other.tar.gz"
    make_archive(other, folder="something-else")
    assert main(["download", "--dir", str(tmp_path / "d"), "--url", other.as_uri(), "--md5", ""]) == 2
    assert f"no {FOLDER}/" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_existing_folder_needs_force(tmp_path, archive, capsys):
    path, md5 = archive
    args = ["download", "--dir", str(tmp_path), "--url", path.as_uri(), "--md5", md5]
    assert main(args) == 0
    marker = tmp_path / FOLDER / "mine.txt"
    marker.write_text("kept")
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err and marker.exists()
    other = tmp_path / "other.tar.gz"
    other_md5 = make_archive(other, seed=1)
    assert main(["download", "--dir", str(tmp_path), "--url", other.as_uri(), "--md5", other_md5,
                 "--force"]) == 0
    assert not marker.exists()
    assert leftovers(tmp_path) == sorted([FOLDER, "other.tar.gz"])
    # a broken folder is replaced without --force
    (tmp_path / FOLDER / "test_batch").write_bytes(b"garbage")
    assert main(args) == 0
    assert len(load_cifar10(tmp_path / FOLDER)["x_test"]) == PER_BATCH


# ----------------------------------------------------------------------------- prepare / HDF5

@pytest.fixture
def h5file(tmp_path, cifar_dir):
    out = tmp_path / "cifar10.h5"
    assert main(["prepare", "--src", str(cifar_dir), "--out", str(out)]) == 0
    return out


def test_prepare_round_trip(h5file, cifar_dir, tmp_path):
    reference = load_cifar10(cifar_dir)
    assert_same(load_hdf5(str(h5file)), reference)
    assert_same(load_dataset(str(h5file)), reference)
    assert leftovers(tmp_path) == ["cifar10.h5"]  # no temporary file left
    with h5py.File(h5file) as f:
        assert f.attrs["format"] == "dpnet-cifar10" and f.attrs["version"] == 1
        assert len(f["x_train"].attrs["sha256"]) == 64


def test_prepare_parts_and_src_parent(h5file, cifar_dir, tmp_path):
    train = load_hdf5(str(h5file), parts=("train",))
    assert sorted(train) == ["label_names", "x_train", "y_train"]
    test = load_hdf5(str(h5file), parts=("test",))
    assert sorted(test) == ["label_names", "x_test", "y_test"]
    with pytest.raises(ValueError):
        load_hdf5(str(h5file), parts=("validation",))
    # --src may name the folder holding cifar-10-batches-py; --out is not overwritten silently
    assert main(["prepare", "--src", str(cifar_dir.parent), "--out", str(h5file)]) == 2
    assert main(["prepare", "--src", str(cifar_dir.parent), "--out", str(h5file), "--force"]) == 0
    assert main(["prepare", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "x.h5")]) == 2
    assert not (tmp_path / "x.h5").exists()


def test_flipped_byte_on_disk_is_caught(h5file):
    with h5py.File(h5file) as f:
        offset = f["x_train"].id.get_offset() + 17
    with open(h5file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataError, match=r"cifar10\.h5: x_train is corrupt"):
        load_hdf5(str(h5file))
    assert len(load_hdf5(str(h5file), parts=("test",))["x_test"]) == PER_BATCH  # test part intact


def test_changed_checksum_attribute(h5file):
    with h5py.File(h5file, "r+") as f:
        f["y_test"].attrs["sha256"] = "0" * 64
    with pytest.raises(DataError, match=r"cifar10\.h5: y_test is corrupt"):
        load_hdf5(str(h5file))


def test_truncated_file(h5file):
    size = h5file.stat().st_size
    with open(h5file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DataError, match=r"cifar10\.h5"):
        load_hdf5(str(h5file))


def test_foreign_and_malformed_files(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x_train"] = np.zeros((2, 3, 32, 32), np.uint8)
    with pytest.raises(DataError, match=r"foreign\.h5: not a dpnet CIFAR-10 file"):
        load_hdf5(str(foreign))
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f.attrs.update({"format": "dpnet-cifar10", "version": 1})
        f["x_train"] = np.zeros((2, 3, 32, 32), np.float32)
        f["y_train"] = np.zeros(2, np.int64)
    with pytest.raises(DataError, match=r"wrong\.h5: x_train must be uint8"):
        load_hdf5(str(wrong))
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"text\.h5: not a readable HDF5 file"):
        load_hdf5(str(text))
    with pytest.raises(DataError, match="file not found"):
        load_hdf5(str(tmp_path / "absent.h5"))


def test_load_dataset_dispatch(tmp_path, cifar_dir):
    assert_same(load_dataset(str(cifar_dir)), load_cifar10(cifar_dir))
    other = tmp_path / "data.npz"
    other.write_bytes(b"x")
    with pytest.raises(DataError, match=r"data\.npz: expected a cifar-10-batches-py folder or a \.h5"):
        load_dataset(str(other))
    with pytest.raises(DataError, match="no such file or directory"):
        load_dataset(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset(str(tmp_path))  # a folder that is not cifar-10-batches-py
