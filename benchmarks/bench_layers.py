"""Single-core speed of dpnet's convolution layer and ThreeLayerConvNet training step,
with PyTorch CPU beside it when torch is importable.

    python benchmarks/bench_layers.py
    PYTHONPATH=. <venv with torch>/bin/python benchmarks/bench_layers.py   # adds torch

In one run, with BLAS pinned to one thread, it measures:
- the machine's float32 matmul rate (numpy, 2048 x 2048 x 2048, best of several);
- conv forward, backward and forward+backward on two float32 shapes (N = 128):
  (a) 3x32x32 input, 32 filters 7x7, pad 3, stride 1 (the ThreeLayerConvNet conv),
  (b) 64x16x16 input, 64 filters 3x3, pad 1, stride 1;
  as GFLOP/s and as a fraction of the matmul rate, with backward computing dx, dw and db
  (and forward+backward also without dx, as for a first layer);
- the training steps of ThreeLayerConvNet (conv 7x7 32 - relu - pool 2 - affine 500 - relu -
  affine 10), the VGG-style ConvNet of the models issue and CIFAR ResNet-20 (softmax loss,
  batch 128, float32), a step being model.loss(X, y) and an Adam update of every parameter:
  images/s, step time, and for dpnet the peak memory of one step (tracemalloc: the arrays NumPy
  allocates during the step, beyond those held between steps);
- dpnet's 3x3 convolutions both ways: im2col ('dpnet') and Winograd F(4x4, 3x3) ('winograd'),
  and for the steps also each layer's fastest way on this machine ('auto', dpnet.autotune: the
  conv algorithm, with or without small-GEMM chunks, and the affine input-gradient form);
- the same work in PyTorch (torch.set_num_threads(1)) and the ratio dpnet / torch
  (above 1: dpnet is faster).
Times are medians of ROUNDS x REPEATS runs, dpnet and torch taking turns round by round
so that background load hits both alike (the matmul rate: the best of 7 runs).
A row whose code fails to import or run prints 'skipped: <reason>'.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from dpnet.memory import keep_freed_memory  # noqa: E402

KEPT = keep_freed_memory()  # as python -m dpnet.train does, for dpnet and torch alike

try:
    from threadpoolctl import threadpool_info, threadpool_limits
    _LIMITS = threadpool_limits(limits=1)  # kept alive for the whole run
except ImportError:
    threadpool_info = None

try:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
except ImportError:
    torch = None

WARMUP, ROUNDS, REPEATS = 3, 4, 5  # REPEATS timed runs per round, ROUNDS * REPEATS in all
BATCH = 128
CONV_SHAPES = {  # name: (C, H, W, F, HH, WW, pad)
    "(a) 3x32x32, 32 filters 7x7, pad 3": (3, 32, 32, 32, 7, 7, 3),
    "(b) 64x16x16, 64 filters 3x3, pad 1": (64, 16, 16, 64, 3, 3, 1),
}


def measure(runs, warmup=WARMUP, rounds=ROUNDS, repeats=REPEATS):
    """Time callables that each return a tuple of seconds (one per part of the run).

    The callables take turns in `rounds` rounds of one untimed and `repeats` timed runs
    each, so background load hits them alike while each runs with warm caches.
    Returns {name: array (rounds * repeats, parts)}.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            run()
            times[name].extend(run() for _ in range(repeats))
    return {name: np.array(t) for name, t in times.items()}


def build(builders):
    """Call each builder: ({name: run}, {name: 'skipped: <reason>'}) for those that raise."""
    runs, skipped = {}, {}
    for name, builder in builders.items():
        try:
            runs[name] = builder()
        except Exception as exc:  # a missing or broken module must not stop the other rows
            skipped[name] = f"skipped: {type(exc).__name__}: {exc}"
    return runs, skipped


def matmul_rate(n=2048):
    """Best float32 GEMM rate of numpy (GFLOP/s) on n x n x n products."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)

    def run():
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        return (time.perf_counter() - t,)

    return 2 * n ** 3 / measure({"mm": run}, 2, 1, 7)["mm"].min() / 1e9


# ---------------------------------------------------------------- convolution

def conv_flop(shape):
    """FLOPs of one forward convolution (= of dw, = of dx) over the batch."""
    c, h, w, f, hh, ww, pad = shape
    return 2 * BATCH * f * (h + 2 * pad - hh + 1) * (w + 2 * pad - ww + 1) * c * hh * ww


def conv_inputs(shape):
    c, h, w, f, hh, ww, pad = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, c, h, w), dtype=np.float32)
    wt = (rng.standard_normal((f, c, hh, ww), dtype=np.float32) / np.sqrt(c * hh * ww)).astype(np.float32)
    b = np.zeros(f, dtype=np.float32)
    dout = rng.standard_normal((BATCH, f, h + 2 * pad - hh + 1, w + 2 * pad - ww + 1), dtype=np.float32)
    return x, wt, b, dout


def dpnet_conv(shape, compute_dx, algorithm="im2col"):
    """A run of dpnet's conv forward then backward: returns (forward s, backward s)."""
    from dpnet.layers import conv_backward, conv_forward

    x, w, b, dout = conv_inputs(shape)
    conv_param = {"stride": 1, "pad": shape[-1], "algorithm": algorithm}
    if algorithm == "winograd" and shape[4:] != (3, 3, 1):
        raise ValueError("Winograd takes 3x3 filters, pad 1 only")

    def run():
        t0 = time.perf_counter()
        _, cache = conv_forward(x, w, b, conv_param)
        t1 = time.perf_counter()
        conv_backward(dout, cache, compute_dx=compute_dx)
        return t1 - t0, time.perf_counter() - t1

    return run


def torch_conv(shape, compute_dx):
    """As dpnet_conv, with torch.nn.functional.conv2d and autograd."""
    x, w, b, dout = (torch.from_numpy(a) for a in conv_inputs(shape))
    w.requires_grad_(True)
    b.requires_grad_(True)

    def run():
        xi = x.detach().requires_grad_(compute_dx)
        w.grad = b.grad = None
        t0 = time.perf_counter()
        out = F.conv2d(xi, w, b, padding=shape[-1])
        t1 = time.perf_counter()
        out.backward(dout)
        return t1 - t0, time.perf_counter() - t1

    return run


# ---------------------------------------------------------------- training step

def step_data():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((BATCH, 3, 32, 32), dtype=np.float32),
            rng.integers(0, 10, BATCH))


def timed(step):
    def run():
        t = time.perf_counter()
        step()
        return (time.perf_counter() - t,)
    return run


VGG_STAGES, VGG_HIDDEN = ((32, 32), (64, 64), (128,)), 256  # the models issue's VGG-style ConvNet


def dpnet_model(name, algorithm="im2col"):
    from dpnet.models import ConvNet, ResNet, ThreeLayerConvNet
    if name == "threelayer":
        if algorithm == "winograd":
            raise ValueError("Winograd takes 3x3 filters; this model's conv is 7x7")
        return ThreeLayerConvNet(input_dim=(3, 32, 32), num_filters=32, filter_size=7, hidden_dim=500,
                                 num_classes=10, dtype=np.float32)
    if name == "convnet":
        return ConvNet(stages=VGG_STAGES, hidden_dims=(VGG_HIDDEN,), dtype=np.float32, conv_algorithm=algorithm)
    return ResNet(depth=20, dtype=np.float32, conv_algorithm=algorithm)


def dpnet_train_step(name, algorithm="im2col"):
    """A training step of dpnet's model `name` with Adam on one fused buffer: returns (seconds,)."""
    from dpnet.flat import FlatParams
    from dpnet.optim import adam

    X, y = step_data()
    model = dpnet_model(name, "im2col" if algorithm == "auto" else algorithm)
    if algorithm == "auto":  # each layer's fastest way on this machine (measured once, cached)
        from dpnet.autotune import tune_dx_forms, tune_model
        choices, forms = tune_model(model, BATCH), tune_dx_forms(model, BATCH)
        if set(choices.values()) <= {"im2col"} and set(forms.values()) <= {"plain"}:
            raise ValueError(f"auto chose dpnet's defaults for every layer ({len(choices) + len(forms)}): "
                             "the same as dpnet's")
        model.set_conv_algorithms(choices)
        model.set_dx_forms(forms)
    flat, config = FlatParams(model.params), {"learning_rate": 1e-3}

    def step():
        _, grads = model.loss(X, y)
        adam(flat.data, flat.pack_grads(grads), config)

    return timed(step)


def torch_model(name):
    from torch_models import VGG, CifarResNet, ThreeLayer  # beside this script
    if name == "threelayer":
        return ThreeLayer(32, 500, bn=False)
    if name == "convnet":
        return VGG(VGG_STAGES, VGG_HIDDEN)
    return CifarResNet(20)


def torch_train_step(name):
    """A training step of the same network in torch with torch.optim.Adam: returns (seconds,)."""
    X, y = (torch.from_numpy(a) for a in step_data())
    torch.manual_seed(0)
    model = torch_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(X), y).backward()
        opt.step()

    return timed(step)


# ---------------------------------------------------------------- report

def blas_description():
    if threadpool_info is None:
        return "threadpoolctl not installed: BLAS pinned by environment variables only"
    libs = [f"{i['internal_api']} {i['version']} {i.get('architecture') or ''}, "
            f"{i['num_threads']} thread" for i in threadpool_info()]
    return "; ".join(libs) or "no BLAS found by threadpoolctl"


LIBS = ["dpnet", "winograd"] + (["torch"] if torch is not None else [])  # winograd: dpnet's, 3x3 only
CONV_MAKERS = {"dpnet": dpnet_conv, "winograd": lambda shape, dx: dpnet_conv(shape, dx, "winograd"),
               "torch": torch_conv}
# label, forward-GEMM equivalents of work, run with dx or without, parts summed
CONV_ROWS = [("  forward", 1, True, [0]), ("  backward (dx, dw, db)", 2, True, [1]),
             ("  forward + backward", 3, True, [0, 1]), ("  forward + backward, no dx", 2, False, [0, 1])]


def conv_table(rate):
    head = f"{'conv, float32, N = 128':<36}{'GFLOP':>7}"
    for lib in LIBS:
        head += f" | {lib + ' ms':>9}{'GFLOP/s':>9}{'/matmul':>8}"
    head += f" | {'dpnet/torch':>11}{'wino/torch':>11}" if torch is not None else ""
    print(head)
    print("-" * len(head))
    for name, shape in CONV_SHAPES.items():
        builders = {}
        for lib in LIBS:
            make = CONV_MAKERS[lib]
            for dx in (True, False):
                builders[lib, dx] = lambda make=make, dx=dx: make(shape, dx)
        runs, skipped = build(builders)
        times = measure(runs)
        print(name)
        for (lib, dx), reason in skipped.items():
            print(f"  {lib} ({'with' if dx else 'without'} dx) {reason}")
        flop = conv_flop(shape)
        for label, gemms, dx, parts in CONV_ROWS:
            line, seconds = f"{label:<36}{gemms * flop / 1e9:>7.2f}", {}
            for lib in LIBS:
                if (lib, dx) not in times:
                    line += f" | {'-':>9}{'-':>9}{'-':>8}"
                    continue
                seconds[lib] = s = float(np.median(times[lib, dx][:, parts].sum(axis=1)))
                gflops = gemms * flop / s / 1e9
                line += f" | {s * 1e3:>9.1f}{gflops:>9.1f}{gflops / rate:>8.2f}"
            if torch is not None:
                line += " |"
                for ours in ("dpnet", "winograd"):
                    ratio = seconds["torch"] / seconds[ours] if ours in seconds and "torch" in seconds else None
                    line += f"{ratio:>11.2f}" if ratio else f"{'-':>11}"
            print(line)


STEP_MODELS = {"threelayer": "ThreeLayerConvNet (conv 7x7 32 - relu - pool - affine 500 - relu - affine 10)",
               "convnet": "VGG-style ConvNet ([conv3x3-BN-ReLU] x2 32, pool, x2 64, pool, x1 128, pool, fc 256, fc 10)",
               "resnet20": "CIFAR ResNet-20"}


def peak_mib(run):
    """The most memory NumPy held at once during one step (tracemalloc sees NumPy's arrays): what a
    rank needs beyond the model, its optimizer state and the batch, at batch 128."""
    import tracemalloc
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    run()
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    return peak / 2**20


def step_table(name):
    print(f"{STEP_MODELS[name]} training step: loss(X, y) + Adam on every parameter, batch 128, float32")
    builders = {"dpnet": lambda: dpnet_train_step(name), "winograd": lambda: dpnet_train_step(name, "winograd"),
                "auto": lambda: dpnet_train_step(name, "auto")}
    if torch is not None:
        builders["torch"] = lambda: torch_train_step(name)
    runs, skipped = build(builders)
    times = measure(runs)
    medians = {}
    for lib in ["dpnet", "winograd", "auto"] + LIBS[2:]:
        if lib in skipped:
            print(f"  {lib:<8} {skipped[lib]}")
            continue
        medians[lib] = s = float(np.median(times[lib]))
        memory = f", peak {peak_mib(runs[lib]):.0f} MiB" if lib != "torch" else ""
        print(f"  {lib:<8} {BATCH / s:8.0f} images/s   step {s * 1e3:7.1f} ms "
              f"(best {times[lib].min() * 1e3:.1f} ms){memory}")
    for ours in ("dpnet", "winograd", "auto"):
        if ours in medians and "torch" in medians:
            print(f"  {ours}/torch images/s: {medians['torch'] / medians[ours]:.2f}")


def main():
    print(f"dpnet layer benchmark: python {platform.python_version()}, numpy {np.__version__}, "
          f"torch {torch.__version__ if torch is not None else 'not importable'}")
    print(f"BLAS: {blas_description()}")
    print("malloc: " + ("freed memory kept for reuse (dpnet.memory, as dpnet.train)" if KEPT else
                        "the C library's defaults (DPNET_MALLOC=system, or no glibc)"))
    print(f"times: median of {ROUNDS} x {REPEATS} runs, dpnet and torch taking turns by rounds; "
          f"dpnet/torch > 1: dpnet faster\n")
    rate = matmul_rate()
    print(f"numpy float32 matmul 2048^3, best of 7: {rate:.1f} GFLOP/s (= 1.00 in the /matmul columns)\n")
    conv_table(rate)
    for name in STEP_MODELS:
        print()
        step_table(name)


if __name__ == "__main__":
    main()
