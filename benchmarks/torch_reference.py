"""PyTorch (CPU) yardstick for `python -m dpnet.train`: the same models, trained with the
same recipe, so that dpnet's test accuracy and speed can be compared with a mature library.

    /work/torch-venv/bin/python benchmarks/torch_reference.py \
        --data /work/shared/data/cifar-10-batches-py --model threelayer|convnet|vgg|resnet20|32|44|56|110 \
        [--epochs E] [--threads 1] [--bn-mode none|sync] [--seed 0] [--no-augment] \
        [--optimizer adam|momentum] [--lr LR] [--reg REG] [--stages S] [--hidden-dim H]

Epochs, optimizer, lr, reg, stages and hidden-dim default to dpnet.train's recipe for the
model (dpnet/train/recipes.py), so the same command without them compares dpnet's defaults
with PyTorch under the same recipe; vgg is convnet with the vgg layout, as in dpnet.

The standard CIFAR ResNet recipe (He et al. 2016: SGD, momentum 0.9, lr 0.1, weight decay
1e-4; here with the cosine schedule and crop + flip) is
    --model resnet20 --optimizer momentum --lr 0.1 --reg 1e-4
and `python -m dpnet.train` takes the same four options.

Needs torch and numpy, plus the dpnet of this checkout for its data code (load_cifar10,
split_train_val, channel_stats, random_crop_flip: pure NumPy; dpnet does not depend on torch).
Per-epoch progress goes to stderr; the last line on stdout is one JSON object:
model, stages (convnet only, else null), hidden_dim (null for a ResNet), bn_mode, optimizer, lr,
reg, augment, seed, epochs, steps, train_images, test_acc,
val_acc, final_train_loss, seconds, seconds_per_epoch, images_per_s, threads, torch.

What matches dpnet.train (defaults of TrainConfig):
- data: the five data_batch_* files and test_batch of a cifar-10-batches-py folder, N taken
  from each file; the train/val split of dpnet.train.split_train_val
  (np.random.default_rng([seed, 2**31]).permutation(n), the first val_size=1000 indices are
  validation, both index sets sorted); per-channel mean/std over N, H, W of the training
  split, computed in float64 (dpnet.train.channel_stats); inputs are float32, normalised one
  minibatch at a time from uint8 (as dpnet does, so the cost is inside the timed loop).
- minibatches: batch 128, the last one of an epoch partial (no example dropped); the epoch
  order is dpnet's epoch_permutation, np.random.default_rng([seed, epoch]).permutation(n),
  so the sequence of minibatches is the one of a 1-rank dpnet run.
- models (dpnet.train.build_model; --hidden-dim H, default 500 as dpnet.train's, for threelayer
  and convnet; --stages, default 32,32/64,64, for convnet, parsed by dpnet.train's own
  parse_stages, so e.g. 32,32/64,64/128 is the same layout in both):
  threelayer: conv 7x7, 32 filters, pad 3 (+BatchNorm2d) -> relu -> maxpool 2 ->
              linear 8192->H (+BatchNorm1d) -> relu -> linear H->10;
  convnet:    the stages (default ((32, 32), (64, 64))) of conv 3x3 pad 1 (+BatchNorm2d) -> relu,
              maxpool 2 after each stage, then linear C*h*w->H (+BatchNorm1d) -> relu ->
              linear H->10 (default: 4096->500; 32,32/64,64/128 with --hidden-dim 256:
              2048->256). (ConvNet's own default head is 256 units, but build_model passes
              hidden_dims=(hidden_dim,), 500 unless --hidden-dim says otherwise.)
  resnet<D>:  dpnet.models.ResNet(depth=D), D = 20, 32, 44, 56 or 110: conv 3x3, 16, pad 1, no
              bias -> BatchNorm2d -> relu; three stages of (D - 2) / 6 basic blocks of 16, 32, 64
              channels, each conv 3x3 (no bias) -> BatchNorm2d -> relu -> conv 3x3 (no bias) ->
              BatchNorm2d, + shortcut, -> relu;
              the first block of stages 2 and 3 has stride 2 (PyTorch's symmetric pad 1 reads
              the same pixels as dpnet's top/left pad) and the parameter-free "option A"
              shortcut: x[:, :, ::2, ::2], channels zero-padded (F - C) // 2 before, the rest
              after; global average pool -> linear 64->10. BatchNorm is always on
              (--bn-mode none is refused, as dpnet refuses it for a ResNet).
  --bn-mode none drops every BatchNorm (dpnet: use_batchnorm=False); local and sync are the
  same thing in one process. BN: eps 1e-5, running = 0.9*running + 0.1*batch (PyTorch
  momentum=0.1), gamma 1, beta 0.
- init: what dpnet.train.build_model asks for, drawn exactly as dpnet's init_weight and
  init_bias draw it (np.random.default_rng(seed), layers in dpnet's order W1, W2, ..., affine
  weights drawn as (in, out) and transposed, draws in float64 then cast to the parameters'
  dtype), so the initial parameters are the same numbers as dpnet's, not just the same
  distribution:
  with batchnorm (and always for a ResNet): He, N(0, 2/fan_in), for conv and linear weights,
  zero biases (no draw for them);
  with --bn-mode none (threelayer, convnet): PyTorch's default, U(-1/sqrt(fan_in),
  1/sqrt(fan_in)) for the weights and the biases, each layer's bias drawn right after its
  weights (dpnet's weight_scale='uniform').
  For resnet<D>: W1 the stem, W2..W<D-1> the blocks' convs in forward order, W<D> the linear
  layer; the convs have no bias, the linear layer's bias is 0.
- loss: mean softmax cross-entropy + 0.5*reg*sum(W^2) over the conv/linear weights only
  (not biases, gamma, beta), reg from --reg, as an explicit penalty term (Adam's weight_decay
  would be a different update).
- optimizer: --optimizer adam: Adam, betas 0.9/0.999, eps 1e-8 (same
  bias-corrected formula as dpnet.optim.adam); --optimizer momentum: SGD with
  momentum 0.9 (dpnet's sgd_momentum default; it sets no other value), no dampening, not
  Nesterov, and no weight_decay (--reg is the L2, which for SGD is the same update on the
  weights it covers). Either with the cosine schedule of dpnet.train.learning_rate, set
  before every step: lr_t = 0.5*lr*(1 + cos(pi*t/T)), t = steps done, T = epochs*steps_per_epoch.
- augmentation (--augment, the default as in dpnet): dpnet.augment.random_crop_flip (pad 4,
  random 32x32 crop, flip with probability 1/2) after normalisation, drawn from dpnet's
  rank-0 stream np.random.default_rng([seed, 0, 1]).
- evaluation: eval mode (running BN statistics), chunks of 500; val accuracy on the
  1,000-image validation split, test accuracy on test_batch, both after the last epoch.
- timing: wall time of the training steps only (per-epoch evaluation excluded, as in
  dpnet's per-epoch "seconds"); images_per_s = training images seen / seconds.
  torch.set_num_threads(--threads), default 1.

What does not match:
- PyTorch's running_var is updated with the unbiased batch variance (times n/(n-1)), dpnet's
  with the biased one. Only eval-mode statistics change: about 0.8% larger for BatchNorm1d
  (n = 128 examples, 1.4% on the 74-example last batch), negligible for BatchNorm2d
  (n = 128*H*W values). Training-mode normalisation uses the biased variance in both.
- PyTorch's running_var starts at 1, dpnet's at 0 (the homework's start; running_mean is 0
  in both). The difference decays as 0.9^steps, below float32 rounding within the first epoch.
- Floating-point summation order (MKL-DNN/oneDNN kernels vs dpnet's im2col + BLAS), so runs
  diverge numerically after a few steps: compare accuracies statistically, not bit for bit.
- No data-parallel machinery: one process, no MPI, no checkpoints, no gradient allreduce.
  With several dpnet ranks and bn sync the batch statistics are those of the global batch,
  which is what this single process computes; bn local over several ranks is not modelled.
- Momentum SGD: torch keeps b = 0.9*b + g and steps w -= lr_t*b; dpnet keeps
  v = 0.9*v - lr_t*g and steps w += v. The same update at a constant rate; under the cosine
  schedule torch applies today's (smaller) rate to the older gradients in b, a difference
  of order lr_t/lr_(t-10) - 1, which is below 1% except in the last steps.
- With several dpnet ranks each rank augments its own shard from its own stream
  (default_rng([seed, rank, 1])); this process draws all crops from rank 0's.
- --warmup-epochs ramps the rate linearly from 0 over that many epochs, as dpnet.train's.
- The other dpnet optimizers (sgd, nesterov, rmsprop), the step schedule and --lr-scaling are
  not implemented.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's dpnet
from dpnet.data import load_cifar10  # noqa: E402  the data recipe is dpnet's own code, not a copy
from dpnet.augment import random_crop_flip  # noqa: E402
from dpnet.train import channel_stats, split_train_val  # noqa: E402
from dpnet.train.config import parse_stages  # noqa: E402
from dpnet.train.recipes import recipe_for  # noqa: E402


# dpnet.train.TrainConfig defaults
BATCH_SIZE = 128
VAL_SIZE = 1000
HIDDEN_DIM = 500
SEED = 0
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention; dpnet's momentum 0.9 keeps 0.9 of the old running value


# ---------------------------------------------------------------- data


# ---------------------------------------------------------------- models


def bn2d(c, use_bn):
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM) if use_bn else nn.Identity()


def bn1d(c, use_bn):
    return nn.BatchNorm1d(c, eps=BN_EPS, momentum=BN_MOMENTUM) if use_bn else nn.Identity()


def three_layer_convnet(use_bn, num_filters=32, filter_size=7, hidden_dim=HIDDEN_DIM, num_classes=10):
    """dpnet.models.ThreeLayerConvNet: conv - (bn) - relu - pool - affine - (bn) - relu - affine."""
    flat = num_filters * 16 * 16
    return nn.Sequential(
        nn.Conv2d(3, num_filters, filter_size, padding=(filter_size - 1) // 2),
        bn2d(num_filters, use_bn), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, hidden_dim), bn1d(hidden_dim, use_bn), nn.ReLU(),
        nn.Linear(hidden_dim, num_classes))


def convnet(use_bn, stages=((32, 32), (64, 64)), hidden_dims=(HIDDEN_DIM,), num_classes=10):
    """dpnet.models.ConvNet: {[conv3x3 - (bn) - relu] x k - pool} per stage, then
    {affine - (bn) - relu} per hidden layer, then affine."""
    layers, c, hw = [], 3, 32
    for stage in stages:
        for f in stage:
            layers += [nn.Conv2d(c, f, 3, padding=1), bn2d(f, use_bn), nn.ReLU()]
            c = f
        layers.append(nn.MaxPool2d(2))
        hw //= 2
    layers.append(nn.Flatten())
    d = c * hw * hw
    for h in hidden_dims:
        layers += [nn.Linear(d, h), bn1d(h, use_bn), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def option_a_shortcut(x, out_channels, stride):
    """dpnet.layers.residual.shortcut_forward: every `stride`-th pixel, channels zero-padded to
    out_channels, (out_channels - C) // 2 before and the rest after."""
    x = x[:, :, ::stride, ::stride]
    before = (out_channels - x.shape[1]) // 2
    return F.pad(x, (0, 0, 0, 0, before, out_channels - x.shape[1] - before))


class BasicBlock(nn.Module):
    """conv3x3 (stride) - bn - relu - conv3x3 - bn, + shortcut, relu (dpnet's ResNet block)."""

    def __init__(self, c_in, f, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, f, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn2d(f, True)
        self.conv2 = nn.Conv2d(f, f, 3, padding=1, bias=False)
        self.bn2 = bn2d(f, True)
        self.f, self.stride, self.project = f, stride, stride != 1 or c_in != f

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (option_a_shortcut(x, self.f, self.stride) if self.project else x))


def resnet(depth=20, widths=(16, 32, 64), num_classes=10):
    """dpnet.models.ResNet: conv3x3 - bn - relu, three stages of (depth - 2) // 6 basic
    blocks (the first of stages 2 and 3 with stride 2), global average pool, affine.
    Modules are registered in forward order, so weight_layers lists dpnet's W1..W<depth>."""
    layers = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False), bn2d(widths[0], True), nn.ReLU()]
    c = widths[0]
    for stage, f in enumerate(widths):
        for k in range((depth - 2) // 6):
            layers.append(BasicBlock(c, f, 2 if stage > 0 and k == 0 else 1))
            c = f
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def build(name, use_bn, stages=((32, 32), (64, 64)), hidden_dim=HIDDEN_DIM):
    """The model --model names, as dpnet.train.build_model builds it (stages: convnet only;
    hidden_dim: threelayer and convnet)."""
    if name == "threelayer":
        return three_layer_convnet(use_bn, hidden_dim=hidden_dim)
    if name in ("convnet", "vgg"):
        return convnet(use_bn, stages=stages, hidden_dims=(hidden_dim,))
    return resnet(int(name[len("resnet"):]))


RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
MODELS = ("threelayer", "convnet", "vgg") + RESNETS


def weight_layers(model):
    """The conv and linear layers in dpnet's parameter order (W1, W2, ...)."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def init_like_dpnet(model, seed, scheme="he"):
    """The initial parameters dpnet draws, as dpnet.models.base.init_weight and init_bias draw
    them: one generator np.random.default_rng(seed), layers W1, W2, ... in order, weights in
    dpnet's shape ((F, C, HH, WW) for a conv, (in, out) for an affine layer, transposed here).
    scheme 'he' (dpnet with batchnorm): std sqrt(2/fan_in) * rng.standard_normal(shape), biases
    0 with no draw. scheme 'uniform' (dpnet without batchnorm, PyTorch's default):
    rng.uniform(-1/sqrt(fan_in), 1/sqrt(fan_in), shape) for the weights, then the same for
    the layer's bias. Float64 draws cast to the parameters' dtype, as dpnet casts to its own.
    BatchNorm layers start at gamma 1, beta 0 by default."""
    if scheme not in ("he", "uniform"):
        raise ValueError(f"scheme must be 'he' or 'uniform', got {scheme!r}")
    rng = np.random.default_rng(seed)

    def draw(shape, fan_in):
        if scheme == "uniform":
            bound = 1 / np.sqrt(fan_in)
            return rng.uniform(-bound, bound, shape)
        return np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)

    def put(param, value):
        dtype = torch.empty((), dtype=param.dtype).numpy().dtype
        param.copy_(torch.from_numpy(np.ascontiguousarray(value.astype(dtype))))

    with torch.no_grad():
        for m in weight_layers(model):
            if isinstance(m, nn.Conv2d):
                shape = tuple(m.weight.shape)  # (F, C, HH, WW), as in dpnet
                fan_in = shape[1] * shape[2] * shape[3]
                put(m.weight, draw(shape, fan_in))
                d_out = shape[0]
            else:
                d_out, fan_in = m.weight.shape  # dpnet stores (in, out)
                put(m.weight, draw((fan_in, d_out), fan_in).T)
            if m.bias is not None:
                put(m.bias, draw(d_out, fan_in) if scheme == "uniform" else np.zeros(d_out))


# ---------------------------------------------------------------- training


def learning_rate(lr, step, total_steps, warmup_steps=0.0):
    """dpnet.train.learning_rate with lr_schedule='cosine' and --warmup-epochs' ramp."""
    rate = 0.5 * lr * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    return rate * min(1.0, (step + 1) / warmup_steps) if warmup_steps else rate


def evaluate(model, x, y, to_input, chunk=500):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            scores = model(to_input(x[i:i + chunk]))
            correct += int((scores.argmax(dim=1) == torch.from_numpy(y[i:i + chunk])).sum())
    return correct / len(x) if len(x) else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="cifar-10-batches-py folder")
    parser.add_argument("--model", choices=MODELS, default="threelayer")
    parser.add_argument("--stages",
                        help="convnet's layout, as dpnet.train's --stages: 3x3 conv filters per layer, commas "
                             "within a stage, / between stages, a 2x2 max pool after each (e.g. 32,32/64,64/128; "
                             "default: dpnet's recipe)")
    parser.add_argument("--hidden-dim", type=int,
                        help="units of the hidden linear layer (threelayer, convnet, vgg), as dpnet.train's "
                             "--hidden-dim (default: dpnet's recipe)")
    parser.add_argument("--epochs", type=int, help="default: dpnet's recipe (on CIFAR-10)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--bn-mode", choices=("none", "local", "sync"), default="sync",
                        help="none: no batchnorm; local and sync are the same in one process")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lr", type=float, help="default: dpnet's recipe")
    parser.add_argument("--reg", type=float, help="default: dpnet's recipe")
    parser.add_argument("--optimizer", choices=("adam", "momentum"),
                        help="adam or SGD with momentum 0.9 (dpnet's --optimizer momentum); default: dpnet's recipe")
    parser.add_argument("--warmup-epochs", type=float, default=0.0,
                        help="raise the rate linearly from 0 over this many epochs, as dpnet.train's")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="random crop + flip, dpnet's own function and rank-0 stream (dpnet's default)")
    args = parser.parse_args(argv)
    if args.model.startswith("resnet") and args.bn_mode == "none":
        parser.error("--bn-mode none: a ResNet always has batchnorm (dpnet refuses it too)")
    recipe = recipe_for(args.model, args.bn_mode)
    for key in ("epochs", "optimizer", "lr", "reg", "stages", "hidden_dim"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(recipe, key))
    if args.optimizer not in ("adam", "momentum"):
        parser.error(f"dpnet's recipe uses --optimizer {args.optimizer}, which this script does not implement")
    try:
        stages = parse_stages(args.stages)
    except ValueError as exc:  # dpnet's ConfigError
        parser.error(str(exc))
    if args.hidden_dim < 1:
        parser.error(f"--hidden-dim must be positive, got {args.hidden_dim}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # unused: init and order come from NumPy, as in dpnet

    data = load_cifar10(args.data)
    x_test, y_test = data["x_test"], data["y_test"]
    (x_train, y_train), (x_val, y_val) = split_train_val(data, VAL_SIZE, args.seed)
    mean, std = channel_stats(x_train)
    shift = torch.from_numpy(mean.astype(np.float32)).view(1, -1, 1, 1)
    scale = torch.from_numpy((1 / std).astype(np.float32)).view(1, -1, 1, 1)

    def to_input(xb):  # uint8 (n, C, H, W) -> normalised float32, one minibatch at a time
        return (torch.from_numpy(xb).to(torch.float32) - shift) * scale

    use_bn = args.bn_mode != "none"
    model = build(args.model, use_bn, stages, args.hidden_dim)
    # dpnet.train.build_model: He with batchnorm, PyTorch's default uniform init without
    init_like_dpnet(model, args.seed, "he" if use_bn else "uniform")
    weights = [m.weight for m in weight_layers(model)]
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    n = len(x_train)
    per_epoch = -(-n // args.batch_size)
    total_steps = args.epochs * per_epoch
    layout = (f" {args.stages}" if args.model in ("convnet", "vgg") else "") + \
        (f" hidden {args.hidden_dim}" if args.model not in RESNETS else "")
    print(f"torch {torch.__version__}: {args.model}{layout} (bn {args.bn_mode}), {args.optimizer} lr {args.lr} "
          f"reg {args.reg}{', augment' if args.augment else ''}, seed {args.seed}, {args.threads} thread(s); "
          f"{n} train / {len(x_val)} val / {len(x_test)} test; {args.epochs} epochs of {per_epoch} "
          f"steps, batch {args.batch_size}", file=sys.stderr, flush=True)

    augment_rng = np.random.default_rng([args.seed, 0, 1])  # dpnet.train's stream for rank 0
    step, train_seconds, seen_total, loss_mean = 0, 0.0, 0, float("nan")
    for epoch in range(args.epochs):
        order = np.random.default_rng([args.seed, epoch]).permutation(n)  # dpnet's epoch_permutation
        model.train()
        loss_sum, seen = 0.0, 0
        started = time.perf_counter()
        for start in range(0, n, args.batch_size):
            idx = order[start:start + args.batch_size]
            xb, yb = to_input(x_train[idx]), torch.from_numpy(y_train[idx])
            if args.augment:
                xb = torch.from_numpy(np.ascontiguousarray(random_crop_flip(xb.numpy(), augment_rng)))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args.lr, step, total_steps, args.warmup_epochs * per_epoch)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            if args.reg:
                loss = loss + 0.5 * args.reg * sum((w * w).sum() for w in weights)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
        seconds = time.perf_counter() - started
        train_seconds += seconds
        seen_total += seen
        loss_mean = loss_sum / seen
        val_acc = evaluate(model, x_val, y_val, to_input)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss_mean:.4f}, val acc {val_acc:.3f}, "
              f"{seen / seconds:.0f} img/s", file=sys.stderr, flush=True)

    val_acc = evaluate(model, x_val, y_val, to_input)
    test_acc = evaluate(model, x_test, y_test, to_input)
    print(json.dumps({
        "model": args.model, "stages": args.stages if args.model in ("convnet", "vgg") else None,
        "hidden_dim": args.hidden_dim if args.model not in RESNETS else None, "bn_mode": args.bn_mode, "optimizer": args.optimizer, "lr": args.lr,
        "reg": args.reg, "warmup_epochs": args.warmup_epochs, "augment": args.augment, "seed": args.seed, "epochs": args.epochs, "steps": step,
        "train_images": n, "test_acc": test_acc, "val_acc": val_acc,
        "final_train_loss": loss_mean, "seconds": round(train_seconds, 3),
        "seconds_per_epoch": round(train_seconds / args.epochs, 3) if args.epochs else None,
        "images_per_s": round(seen_total / train_seconds, 1) if train_seconds else None,
        "threads": args.threads, "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
