"""Choosing how layers compute by measuring the ways on this machine, once:
- each convolution's algorithm: im2col with its GEMMs cut for small-matrix kernels, im2col with
  whole GEMMs, or Winograd F(4x4, 3x3) (`--conv-algorithm auto`);
- each affine layer's input-gradient product, plain or transposed (dpnet.layers.affine.input_grad;
  `--affine-dx auto`).

Which way is faster depends on the layer's shapes (channels, image size, images per pass) and on
the machine (its BLAS kernels, AVX2 or AVX-512), so nothing here is a constant: for each
signature (the shapes, dtype, images, BLAS threads) every way runs on random data (the median
of several runs after a warm-up), the faster wins, and the choice is saved in a cache file under
a key naming the CPU, its vector extensions and the BLAS library and kernel, so a machine never
uses another's choices. The cache is ~/.cache/dpnet/autotune.json, or $DPNET_AUTOTUNE_CACHE.
A fixed choice (`--conv-algorithm im2col`, `--affine-dx plain`, ...) measures nothing.
"""

import json
import time

import numpy as np

from .atomic import atomic_path

CACHE_ENV = "DPNET_AUTOTUNE_CACHE"
REPEATS = 3
MIN_SECONDS = 0.02  # a short product is repeated until its runs take about this long (at most MAX_REPEATS)
MAX_REPEATS = 50


def default_path():
    from .scaling.measure import cache_file
    return cache_file("autotune.json", CACHE_ENV)


def machine_key():
    """The CPU model, its widest vector extension and the BLAS library and kernel."""
    from .scaling.measure import cpuinfo
    from .scaling.measure import machine_key as cpu_and_blas
    flags = f" {cpuinfo('flags') or ''} "
    vector = "avx512f" if " avx512f " in flags else "avx2" if " avx2 " in flags else "other"
    return f"{cpu_and_blas()} | {vector}"


def applicable(w_shape, conv_param, x_shape=None):
    """The algorithms that can compute this convolution, less 'im2col-whole' where im2col cuts
    no GEMM of this shape (x_shape (N, C, H, W) given): the same calls, nothing to measure."""
    from .layers.conv import conv_algorithms, gemms_are_cut
    found = conv_algorithms(w_shape, conv_param)
    if x_shape is not None and not gemms_are_cut(x_shape, w_shape, conv_param):
        found.remove("im2col-whole")
    return found


def signature(x_shape, w_shape, conv_param, dtype, threads, compute_dx=True):
    return (f"x{tuple(x_shape)} w{tuple(w_shape)} stride {conv_param['stride']} pad {conv_param['pad']} "
            f"{np.dtype(dtype).name} threads {threads}" + ("" if compute_dx else " no dx"))


def time_conv(algorithm, x_shape, w_shape, conv_param, dtype, repeats=REPEATS, compute_dx=True):
    """Median seconds of one forward + backward (dx unless compute_dx is False, dw, db) of
    `algorithm` on random data."""
    from .layers import conv_backward, conv_forward
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(dtype)
    param = {**conv_param, "algorithm": algorithm}
    out, cache = conv_forward(x, w, None, param)
    dout = rng.standard_normal(out.shape).astype(dtype)
    conv_backward(dout, cache, compute_dx)  # warm-up
    return _median_seconds(lambda: conv_backward(dout, conv_forward(x, w, None, param)[1], compute_dx), repeats)


def _median_seconds(run, repeats):
    """Median wall seconds of `repeats` calls of run()."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def dx_signature(rows, w_shape, dtype, threads):
    return f"affine dx rows {rows} w{tuple(w_shape)} {np.dtype(dtype).name} threads {threads}"


def time_dx_form(form, rows, w_shape, dtype):
    """Median seconds of one input_grad(dout, w, form) for dout (rows, M), w (D, M), on random data."""
    from .layers.affine import input_grad
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(dtype)
    dout = rng.standard_normal((rows, w_shape[1])).astype(dtype)
    start = time.perf_counter()
    input_grad(dout, w, form)  # warm-up, and how many runs fit in MIN_SECONDS
    repeats = int(min(MAX_REPEATS, max(REPEATS, MIN_SECONDS / max(time.perf_counter() - start, 1e-9))))
    return _median_seconds(lambda: input_grad(dout, w, form), repeats)


class Tuner:
    """The faster way for each layer signature, measured once per signature and machine and
    remembered in the cache file at `path`:
    - choose(x_shape, w_shape, conv_param, dtype, threads, compute_dx): a convolution's algorithm
      (compute_dx False: one whose backward makes no input gradient);
    - choose_dx_form(rows, w_shape, dtype, threads): an affine layer's input-gradient form.
    measure, measure_dx: the timers (time_conv, time_dx_form; tests give fakes)."""

    def __init__(self, path=None, measure=time_conv, measure_dx=time_dx_form):
        self.path, self.measure, self.measure_dx = path or default_path(), measure, measure_dx
        self.key = machine_key()
        self.measured = 0  # signatures measured (not found in the cache) by this tuner

    def _load(self):
        try:
            with open(self.path) as fh:
                cache = json.load(fh)
            return cache if isinstance(cache, dict) else {}
        except (OSError, ValueError):
            return {}

    def choose(self, x_shape, w_shape, conv_param, dtype, threads=1, compute_dx=True):
        candidates = applicable(w_shape, conv_param, x_shape)
        if len(candidates) == 1:
            return candidates[0]
        return self._choice(signature(x_shape, w_shape, conv_param, dtype, threads, compute_dx), candidates,
                            lambda a: self.measure(a, x_shape, w_shape, conv_param, dtype, compute_dx=compute_dx))

    def choose_dx_form(self, rows, w_shape, dtype, threads=1):
        from .layers.affine import DX_FORMS
        return self._choice(dx_signature(rows, w_shape, dtype, threads), DX_FORMS,
                            lambda form: self.measure_dx(form, rows, w_shape, dtype))

    def _choice(self, sig, candidates, measure):
        """The cached choice for sig, else the candidate with the fewest seconds of measure(c). A
        cached choice counts only if every candidate was measured for it (one made before a new
        candidate existed is measured again)."""
        cache = self._load()
        known = cache.get(self.key, {}).get(sig)
        if (isinstance(known, dict) and known.get("choice") in candidates
                and set(candidates) <= set(known.get("seconds") or ())):
            return known["choice"]
        seconds = {c: measure(c) for c in candidates}
        choice = min(seconds, key=seconds.get)
        self.measured += 1
        cache = self._load()  # another process may have written meanwhile
        cache.setdefault(self.key, {})[sig] = {"choice": choice, "seconds": seconds}
        try:
            with atomic_path(self.path) as tmp, open(tmp, "w") as fh:
                json.dump(cache, fh, indent=1, sort_keys=True)
        except OSError:
            pass  # an unwritable cache costs a measurement next time, nothing else
        return choice


def tune_model(model, images, tuner=None, threads=1):
    """{layer: algorithm} for the convolutions of `model` (model.conv_layers()) at `images`
    images per forward pass. Every model's first convolution takes the data and makes no input
    gradient: it is timed without one."""
    tuner = tuner or Tuner()
    layers = model.conv_layers()
    first = min((layer for layer, *_ in layers), default=None)
    return {layer: tuner.choose((images, *in_shape), w_shape, conv_param, model.dtype, threads, layer != first)
            for layer, in_shape, w_shape, conv_param in layers}


def tune_dx_forms(model, images, tuner=None, threads=1):
    """{weight: form} for the affine layers of `model` (model.affine_weights()) at `images`
    images per pass."""
    tuner = tuner or Tuner()
    return {name: tuner.choose_dx_form(images, shape, model.dtype, threads) for name, shape in model.affine_weights()}
