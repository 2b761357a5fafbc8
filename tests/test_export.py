"""`python -m dpnet.export CHECKPOINT --out model.npz`: PyTorch names and layouts. The npz is
checked against the checkpoint everywhere; where torch is importable, it is loaded into the
equivalent torch model (benchmarks/torch_models.py) and gives dpnet's logits to 1e-5 (float64
runs, so that the bound is absolute whatever the logits' size; the float32 run to 1e-5 of their
scale)."""

import json
import os
import sys
import time

import numpy as np
import pytest

from dpnet.checkpoint import load_checkpoint
from dpnet.parallel import SerialComm
from dpnet.train import TrainConfig, build_model, split_train_val
from dpnet.train.inputs import load_data, normaliser
from tests.train_helpers import TINY_SPLIT, cifar_dir, finish, read_checkpoint, run_ok, start  # noqa: F401

try:
    import torch
except ImportError:
    torch = None

CKPT = os.path.join("dpnet_run", "checkpoint.h5")
F64 = ["--dtype", "float64"]
MODELS = {  # name (--model before the dash) -> extra training options
    "threelayer": ["--hidden-dim", "16", *F64],
    "threelayer-nobn": ["--hidden-dim", "16", "--bn-mode", "none", *F64],
    "threelayer-float32": ["--hidden-dim", "16"],
    "convnet": ["--hidden-dim", "16", *F64],
    "vgg": ["--hidden-dim", "16", *F64],
    "resnet20": F64,
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory, cifar_dir):
    """(model name, run folder, npz contents) of one epoch of training, exported."""
    name = request.param
    root = tmp_path_factory.mktemp(f"export-{name}")
    fixed = ["--conv-algorithm", "im2col", "--affine-dx", "plain"]  # nothing to measure: the export is the point
    run_ok(["--data", cifar_dir, *TINY_SPLIT, *fixed, "--epochs", "1", "--model", name.split("-")[0], *MODELS[name]],
           root, timeout=240)
    cmd = [sys.executable, "-m", "dpnet.export", CKPT, "--out", "model.npz"]
    run = finish(start(cmd, root), cmd, root, time.monotonic(), 60)
    assert run.returncode == 0 and run.stdout.startswith("wrote model.npz: "), str(run)
    with np.load(root / "model.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return name, root, arrays


def test_npz_holds_the_checkpoint_under_torch_names(exported):
    name, root, arrays = exported
    arrays = dict(arrays)  # the fixture's dict is shared by the tests
    ckpt = read_checkpoint(root / CKPT)
    meta = json.loads(str(arrays.pop("meta")))
    assert meta["model"] == name.split("-")[0]
    params, bn = ckpt["params"], ckpt["batchnorm"]
    expected_size = sum(v.size for v in params.values()) + sum(v.size for v in bn.values())
    tracked = [k for k in arrays if k.endswith("num_batches_tracked")]
    assert sum(v.size for k, v in arrays.items() if k not in tracked) == expected_size
    assert len(tracked) == len(bn) // 2
    if name.startswith("threelayer"):
        assert np.array_equal(arrays["conv1.weight"], params["W1"])
        assert np.array_equal(arrays["fc2.weight"], params["W2"].T) and np.array_equal(arrays["fc3.bias"], params["b3"])
    if name == "threelayer":
        assert np.array_equal(arrays["bn2.running_var"], bn["bn1/running_var"])
        assert np.array_equal(arrays["bn1.weight"], params["gamma1"])
    if name == "resnet20":
        assert np.array_equal(arrays["layer2.0.conv1.weight"], params["W8"])
        assert np.array_equal(arrays["layer3.2.bn2.running_mean"], bn["bn18/running_mean"])
        assert np.array_equal(arrays["fc.weight"], params["W20"].T)
    dtype = np.float32 if name.endswith("float32") else np.float64  # the checkpoint's
    assert all(v.dtype == dtype for k, v in arrays.items() if k not in tracked)


# ------------------------------------------------------------------ the torch models

def torch_models():
    """benchmarks/torch_models.py, the torch equivalents of dpnet's models (shared with the benchmarks)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "torch_models.py")
    spec = importlib.util.spec_from_file_location("torch_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_model(name):
    models = torch_models()
    if name.startswith("threelayer"):
        return models.ThreeLayer(32, 16, bn=name != "threelayer-nobn")
    if name == "convnet":
        return models.VGG(((32, 32), (64, 64)), 16)
    if name == "vgg":
        return models.VGG(((32, 32), (64, 64), (128,)), 16)
    return models.CifarResNet(20)


@pytest.mark.skipif(torch is None, reason="torch is not importable here (a yardstick, never a dependency)")
def test_torch_model_gives_dpnets_logits(exported):
    name, root, arrays = exported
    arrays = {k: v for k, v in arrays.items() if k != "meta"}
    float64 = not name.endswith("float32")
    net = torch_model(name).eval()
    if float64:
        net = net.double()
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, strict=True)
    config = TrainConfig(**{k: v for k, v in read_checkpoint(root / CKPT)["attrs"]["config"].items()
                            if k in {f for f in TrainConfig.__dataclass_fields__ if f != "given"}})
    model = build_model(config, SerialComm())
    load_checkpoint(str(root / CKPT), model)
    data, _, _ = load_data(config)
    (x_train, _), _ = split_train_val(data, config.val_size, config.seed)
    x = normaliser(x_train, np.dtype(config.dtype))(data["x_test"])
    ours = model.scores(x)
    with torch.no_grad():
        theirs = net(torch.from_numpy(x)).numpy()
    assert theirs.dtype == ours.dtype == (np.float64 if float64 else np.float32)
    scale = 1.0 if float64 else max(1.0, float(np.abs(ours).max()))
    assert np.abs(theirs - ours).max() <= 1e-5 * scale, (np.abs(theirs - ours).max(), np.abs(ours).max())
    if float64:
        assert np.array_equal(theirs.argmax(axis=1), ours.argmax(axis=1))
    else:
        assert (theirs.argmax(axis=1) == ours.argmax(axis=1)).mean() >= 0.97


@pytest.mark.parametrize("case", ["folder", "missing-checkpoint"])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, case):
    (tmp_path / "out").mkdir()
    args = [str(tmp_path / "none.h5"), "--out", "x.npz"] if case == "missing-checkpoint" else ["c.h5", "--out", "out"]
    if case == "folder":
        (tmp_path / "c.h5").write_bytes(b"")  # never read: the folder is named first
    cmd = [sys.executable, "-m", "dpnet.export", *args]
    run = finish(start(cmd, tmp_path), cmd, tmp_path, time.monotonic(), 60)
    expected = ("--out out is a folder: name the .npz file to write, e.g. out/model.npz" if case == "folder"
                else f"{tmp_path / 'none.h5'}: no such checkpoint file")
    assert run.returncode == 2 and run.err_lines == [f"python -m dpnet.export: error: {expected}"], str(run)
    assert sorted(os.listdir(tmp_path)) == (["c.h5", "out"] if case == "folder" else ["out"])
    assert os.listdir(tmp_path / "out") == []
