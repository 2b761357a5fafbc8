"""`python -m dpnet.export CHECKPOINT --out model.npz`: PyTorch names and layouts. The npz is
checked against the checkpoint everywhere; where torch is importable, it is loaded into the
equivalent torch model (spelled out below) and gives dpnet's logits."""

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
from tests.train_helpers import TINY, cifar_dir, finish, read_checkpoint, run_ok, start  # noqa: F401

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError:
    torch = None

CKPT = os.path.join("dpnet_run", "checkpoint.h5")
MODELS = {  # model -> extra training options
    "threelayer": ["--hidden-dim", "16"],
    "threelayer-nobn": ["--hidden-dim", "16", "--bn-mode", "none"],
    "convnet": ["--hidden-dim", "16"],
    "resnet20": [],
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory, cifar_dir):
    """(model name, run folder, npz contents) of one epoch of training, exported."""
    name = request.param
    root = tmp_path_factory.mktemp(f"export-{name}")
    run_ok(["--data", cifar_dir, *TINY, "--epochs", "1", "--model", name.split("-")[0], *MODELS[name]], root)
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
    assert all(v.dtype == np.float32 for k, v in arrays.items() if k not in tracked)


# ------------------------------------------------------------------ the torch models

class ThreeLayer(nn.Module if torch else object):
    def __init__(self, filters, hidden, bn, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, filters, 7, padding=3)
        self.bn1 = nn.BatchNorm2d(filters) if bn else nn.Identity()
        self.fc2 = nn.Linear(filters * 16 * 16, hidden)
        self.bn2 = nn.BatchNorm1d(hidden) if bn else nn.Identity()
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        return self.fc3(F.relu(self.bn2(self.fc2(torch.flatten(x, 1)))))


class VGG(nn.Module if torch else object):
    def __init__(self, stages, hidden, classes=10):
        super().__init__()
        self.pools, c, i = [], 3, 0
        for stage in stages:
            for j, f in enumerate(stage):
                i += 1
                setattr(self, f"conv{i}", nn.Conv2d(c, f, 3, padding=1))
                setattr(self, f"bn{i}", nn.BatchNorm2d(f))
                self.pools.append(j == len(stage) - 1)
                c = f
        self.convs, size = i, 32 // 2 ** len(stages)
        setattr(self, f"fc{i + 1}", nn.Linear(c * size * size, hidden))
        setattr(self, f"bn{i + 1}", nn.BatchNorm1d(hidden))
        setattr(self, f"fc{i + 2}", nn.Linear(hidden, classes))

    def forward(self, x):
        for i in range(1, self.convs + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if self.pools[i - 1]:
                x = F.max_pool2d(x, 2)
        i = self.convs + 1
        x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"fc{i}")(torch.flatten(x, 1))))
        return getattr(self, f"fc{i + 1}")(x)


class Block(nn.Module if torch else object):
    def __init__(self, c, f, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c, f, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(f)
        self.conv2 = nn.Conv2d(f, f, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(f)
        self.stride, self.pad = stride, ((f - c) // 2, f - c - (f - c) // 2)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x
        if self.stride != 1 or self.pad != (0, 0):  # option A: subsample, zero-pad the channels
            shortcut = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, *self.pad))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module if torch else object):
    def __init__(self, depth, widths=(16, 32, 64), classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c = widths[0]
        for s, f in enumerate(widths):
            blocks = []
            for k in range(n):
                blocks.append(Block(c, f, 2 if s > 0 and k == 0 else 1))
                c = f
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def torch_model(name):
    if name.startswith("threelayer"):
        return ThreeLayer(32, 16, bn=name == "threelayer")
    if name == "convnet":
        return VGG(((32, 32), (64, 64)), 16)
    return CifarResNet(20)


@pytest.mark.skipif(torch is None, reason="torch is not importable here (a yardstick, never a dependency)")
def test_torch_model_gives_dpnets_logits(exported):
    name, root, arrays = exported
    arrays = {k: v for k, v in arrays.items() if k != "meta"}
    net = torch_model(name).eval()
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, strict=True)
    config = TrainConfig(**{k: v for k, v in read_checkpoint(root / CKPT)["attrs"]["config"].items()
                            if k in {f for f in TrainConfig.__dataclass_fields__ if f != "given"}})
    model = build_model(config, SerialComm())
    load_checkpoint(str(root / CKPT), model)
    data, _, _ = load_data(config)
    (x_train, _), _ = split_train_val(data, config.val_size, config.seed)
    x = normaliser(x_train, np.float32)(data["x_test"])
    ours = model.scores(x)
    with torch.no_grad():
        theirs = net(torch.from_numpy(x)).numpy()
    scale = max(1.0, float(np.abs(ours).max()))
    assert np.abs(theirs - ours).max() <= 1e-5 * scale, np.abs(theirs - ours).max()
    assert (theirs.argmax(axis=1) == ours.argmax(axis=1)).mean() >= 0.97
