"""`python -m dpnet.export CHECKPOINT --out model.npz`: a checkpoint's parameters and batchnorm
statistics under PyTorch's names and layouts, for `torch.nn.Module.load_state_dict`.

Names, per model (i: dpnet's layer number, as in W<i>):
- threelayer: conv1, bn1 (after the conv), fc2, bn2 (after the hidden affine layer), fc3;
- convnet: conv<i>, bn<i> for each conv layer; fc<i>, bn<i> for the affine layers after them;
- resnet<depth>: conv1, bn1; layer<s>.<k>.conv1, .bn1, .conv2, .bn2 for block k of stage s (from
  1 and 0, as torchvision names them); fc.
Each conv gives `.weight` (F, C, HH, WW) and `.bias` where it has one; each affine layer `.weight`
(out, in), dpnet's W transposed, and `.bias`; each batchnorm `.weight` (gamma), `.bias` (beta),
`.running_mean`, `.running_var` and `.num_batches_tracked` (0). The arrays keep the checkpoint's
dtype. `meta` holds JSON: the model name and the run's settings. The torch model that takes
them is spelled out in benchmarks/torch_models.py (eps 1e-5, as dpnet's batchnorm; the parameter-free
ResNet shortcut is a stride-2 subsample with channels zero-padded half before, half after).
Inputs are normalised as in training: per-channel mean and std of the run's training split.
"""

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from .atomic import atomic_path
from .checkpoint import CheckpointError, load_checkpoint
from .models import ConvNet, FullyConnectedNet, ResNet, ThreeLayerConvNet
from .parallel import SerialComm
from .train.loop import build_model
from .train.resume import stored_train_config

PROG = "python -m dpnet.export"


def _conv(out, model, name, i):
    out[f"{name}.weight"] = model.params[f"W{i}"]
    if f"b{i}" in model.params:
        out[f"{name}.bias"] = model.params[f"b{i}"]


def _affine(out, model, name, i):
    out[f"{name}.weight"] = np.ascontiguousarray(model.params[f"W{i}"].T)
    out[f"{name}.bias"] = model.params[f"b{i}"]


def _batchnorm(out, model, name, i, index):
    state = model.bn_params[index]
    out[f"{name}.weight"], out[f"{name}.bias"] = model.params[f"gamma{i}"], model.params[f"beta{i}"]
    out[f"{name}.running_mean"], out[f"{name}.running_var"] = state["running_mean"], state["running_var"]
    out[f"{name}.num_batches_tracked"] = np.array(0, dtype=np.int64)


def torch_state(model):
    """{PyTorch-style name: array} of `model`'s parameters and batchnorm statistics."""
    out = {}
    has_bn = bool(model.bn_params)
    if isinstance(model, ThreeLayerConvNet):
        _conv(out, model, "conv1", 1)
        if has_bn:
            _batchnorm(out, model, "bn1", 1, 0)
        _affine(out, model, "fc2", 2)
        if has_bn:
            _batchnorm(out, model, "bn2", 2, 1)
        _affine(out, model, "fc3", 3)
    elif isinstance(model, ConvNet):
        for i in range(1, model.num_conv + 1):
            _conv(out, model, f"conv{i}", i)
            if has_bn:
                _batchnorm(out, model, f"bn{i}", i, i - 1)
        for j in range(model.num_hidden + 1):
            i = model.num_conv + 1 + j
            _affine(out, model, f"fc{i}", i)
            if has_bn and j < model.num_hidden:
                _batchnorm(out, model, f"bn{i}", i, model.num_conv + j)
    elif isinstance(model, ResNet):
        out["conv1.weight"] = model.params["W1"]
        _batchnorm(out, model, "bn1", 1, 0)
        per_stage = len(model.blocks) // 3
        for b in range(len(model.blocks)):
            prefix = f"layer{b // per_stage + 1}.{b % per_stage}"
            for half, i in (("1", 2 * b + 2), ("2", 2 * b + 3)):
                out[f"{prefix}.conv{half}.weight"] = model.params[f"W{i}"]
                _batchnorm(out, model, f"{prefix}.bn{half}", i, i - 1)
        _affine(out, model, "fc", model.fc)
    elif isinstance(model, FullyConnectedNet):
        for i in range(1, model.num_layers + 1):
            _affine(out, model, f"fc{i}", i)
            if f"gamma{i}" in model.params:
                _batchnorm(out, model, f"bn{i}", i, i - 1)
    else:
        raise TypeError(f"no PyTorch names for {type(model).__name__}")
    return out


def export_checkpoint(path, out):
    """Write the npz of checkpoint `path` to `out` (atomically); returns the names written."""
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder: name the .npz file to write, e.g. {os.path.join(out, 'model.npz')}")
    config = stored_train_config(path)
    model = build_model(config, SerialComm())
    load_checkpoint(path, model)
    state = torch_state(model)
    meta = json.dumps({"model": config.model, "config": dataclasses.asdict(config), "checkpoint": path})
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, meta=np.array(meta), **state)
    return sorted(state)


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by dpnet.train")
    parser.add_argument("--out", required=True, help="the .npz to write")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        names = export_checkpoint(args.checkpoint, args.out)
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(names)} arrays")
    return 0


if __name__ == "__main__":
    sys.exit(main())
