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

With `bits_of` (the reproducible mode), a way is a candidate only if it gives every output and
gradient the very bits of that reference way (im2col, plain) on random data of the layer's
shapes, at every number of images a pass will see (`bits_at`). These checks are made afresh by
each run (a few passes per layer shape), never read from the cache, so neither a timing nor a
cache file written by another version can change a bit.
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


def _conv_data(x_shape, w_shape, conv_param, dtype):
    """Random x, w and dout for a convolution, the same for every algorithm."""
    from .layers.conv import conv_output_shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(dtype)
    _, _, h_out, w_out = conv_output_shape(x_shape, w_shape, conv_param)
    dout = rng.standard_normal((x_shape[0], w_shape[0], h_out, w_out)).astype(dtype)
    return x, w, dout


def _conv_pass(algorithm, x, w, dout, conv_param, compute_dx):
    """(out, dx, dw, db) of one forward + backward of `algorithm`."""
    from .layers import conv_backward, conv_forward
    out, cache = conv_forward(x, w, None, {**conv_param, "algorithm": algorithm})
    return (out,) + conv_backward(dout, cache, compute_dx)


def time_conv(algorithm, x_shape, w_shape, conv_param, dtype, repeats=REPEATS, compute_dx=True):
    """Median seconds of one forward + backward (dx unless compute_dx is False, dw, db) of
    `algorithm` on random data."""
    x, w, dout = _conv_data(x_shape, w_shape, conv_param, dtype)
    _conv_pass(algorithm, x, w, dout, conv_param, compute_dx)  # warm-up
    return _median_seconds(lambda: _conv_pass(algorithm, x, w, dout, conv_param, compute_dx), repeats)


def same_conv_bits(algorithm, reference, x_shape, w_shape, conv_param, dtype, compute_dx=True):
    """Whether `algorithm` gives the output and every gradient of a convolution the bits of
    `reference`, on random data."""
    x, w, dout = _conv_data(x_shape, w_shape, conv_param, dtype)
    ours, theirs = (_conv_pass(a, x, w, dout, conv_param, compute_dx) for a in (algorithm, reference))
    return all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(ours, theirs))


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


def _dx_data(rows, w_shape, dtype):
    """Random dout (rows, M) and w (D, M) for an affine input gradient, the same for every form."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(dtype)
    return rng.standard_normal((rows, w_shape[1])).astype(dtype), w


def same_dx_bits(form, reference, rows, w_shape, dtype):
    """Whether input_grad(dout, w, form) has the bits of `reference`'s, on random data."""
    from .layers.affine import input_grad
    dout, w = _dx_data(rows, w_shape, dtype)
    return np.array_equal(input_grad(dout, w, form), input_grad(dout, w, reference))


def time_dx_form(form, rows, w_shape, dtype):
    """Median seconds of one input_grad(dout, w, form) for dout (rows, M), w (D, M), on random data."""
    from .layers.affine import input_grad
    dout, w = _dx_data(rows, w_shape, dtype)
    start = time.perf_counter()
    input_grad(dout, w, form)  # warm-up, and how many runs fit in MIN_SECONDS
    repeats = int(min(MAX_REPEATS, max(REPEATS, MIN_SECONDS / max(time.perf_counter() - start, 1e-9))))
    return _median_seconds(lambda: input_grad(dout, w, form), repeats)


class Tuner:
    """The faster way for each layer signature, measured once per signature and machine and
    remembered in the cache file at `path`:
    - choose(x_shape, w_shape, conv_param, dtype, threads, compute_dx, bits_of, bits_at): a
      convolution's algorithm (compute_dx False: one whose backward makes no input gradient);
    - choose_dx_form(rows, w_shape, dtype, threads, bits_of, bits_at): an affine layer's
      input-gradient form.
    bits_of: only ways that give this way's bits are candidates (the module's docstring), at
    x_shape[0] images (rows) and at every count in bits_at.
    measure, measure_dx: the timers (time_conv, time_dx_form); same_bits, same_dx: the bit
    checks (same_conv_bits, same_dx_bits). Tests give fakes."""

    def __init__(self, path=None, measure=time_conv, measure_dx=time_dx_form, same_bits=same_conv_bits,
                 same_dx=same_dx_bits):
        self.path, self.measure, self.measure_dx = path or default_path(), measure, measure_dx
        self.same_bits, self.same_dx = same_bits, same_dx
        self._checked = {}  # this tuner's bit checks: (what, images, reference, candidate) -> bool
        self.key = machine_key()
        self.measured = 0  # signatures measured (not found in the cache) by this tuner

    def _load(self):
        try:
            with open(self.path) as fh:
                cache = json.load(fh)
            return cache if isinstance(cache, dict) else {}
        except (OSError, ValueError):
            return {}

    def choose(self, x_shape, w_shape, conv_param, dtype, threads=1, compute_dx=True, bits_of=None, bits_at=()):
        sig = signature(x_shape, w_shape, conv_param, dtype, threads, compute_dx)
        candidates = applicable(w_shape, conv_param, x_shape)
        if bits_of is not None:
            what = signature(x_shape[1:], w_shape, conv_param, dtype, threads, compute_dx)
            candidates = self._same_bits(what, {x_shape[0], *bits_at}, bits_of, candidates,
                                         lambda a, n: self.same_bits(a, bits_of, (n, *x_shape[1:]), w_shape,
                                                                     conv_param, dtype, compute_dx=compute_dx))
        if len(candidates) == 1:
            return candidates[0]
        return self._choice(sig, candidates,
                            lambda a: self.measure(a, x_shape, w_shape, conv_param, dtype, compute_dx=compute_dx))

    def choose_dx_form(self, rows, w_shape, dtype, threads=1, bits_of=None, bits_at=()):
        from .layers.affine import DX_FORMS
        sig = dx_signature(rows, w_shape, dtype, threads)
        candidates = list(DX_FORMS)
        if bits_of is not None:
            candidates = self._same_bits(dx_signature("n", w_shape, dtype, threads), {rows, *bits_at}, bits_of,
                                         candidates, lambda form, n: self.same_dx(form, bits_of, n, w_shape, dtype))
        if len(candidates) == 1:
            return candidates[0]
        return self._choice(sig, candidates, lambda form: self.measure_dx(form, rows, w_shape, dtype))

    def _same_bits(self, what, images, reference, candidates, check):
        """The candidates that give `reference`'s bits (reference always) for the layer `what`
        at every count in `images`, by check(c, n); each check made once by this tuner."""
        def same(c):
            for n in sorted(images):
                key = (what, n, reference, c)
                if key not in self._checked:
                    self._checked[key] = bool(check(c, n))
                if not self._checked[key]:
                    return False
            return True
        return [c for c in candidates if c == reference or same(c)]

    def _choice(self, sig, candidates, measure):
        """The candidate with the fewest seconds of measure(c) for sig: from the cache where every
        candidate has been measured (a cached choice made before a new candidate existed is
        measured again), else measured now and cached."""
        known = self._load().get(self.key, {}).get(sig)
        seconds = known.get("seconds") if isinstance(known, dict) else None
        seconds = ({c: t for c, t in seconds.items() if isinstance(t, (int, float)) and not isinstance(t, bool)}
                   if isinstance(seconds, dict) else {})  # an entry of another form is measured again
        if not set(candidates) <= set(seconds):
            seconds.update({c: measure(c) for c in candidates})
            self.measured += 1
            self._save(sig, {"choice": min(candidates, key=seconds.get), "seconds": seconds})
        return min(candidates, key=seconds.get)

    def _save(self, key, entry):
        cache = self._load()  # another process may have written meanwhile
        cache.setdefault(self.key, {})[key] = entry
        try:
            with atomic_path(self.path) as tmp, open(tmp, "w") as fh:
                json.dump(cache, fh, indent=1, sort_keys=True)
        except OSError:
            pass  # an unwritable cache costs a measurement next time, nothing else


def tune_model(model, images, tuner=None, threads=1, bits_of=None, bits_at=()):
    """{layer: algorithm} for the convolutions of `model` (model.conv_layers()) at `images`
    images per forward pass (bits_of, bits_at: as Tuner's). Every model's first convolution
    takes the data and makes no input gradient: it is timed without one."""
    tuner = tuner or Tuner()
    layers = model.conv_layers()
    first = min((layer for layer, *_ in layers), default=None)
    return {layer: tuner.choose((images, *in_shape), w_shape, conv_param, model.dtype, threads, layer != first,
                                bits_of, bits_at)
            for layer, in_shape, w_shape, conv_param in layers}


def tune_dx_forms(model, images, tuner=None, threads=1, bits_of=None, bits_at=()):
    """{weight: form} for the affine layers of `model` (model.affine_weights()) at `images`
    images per pass (bits_of, bits_at: as Tuner's)."""
    tuner = tuner or Tuner()
    return {name: tuner.choose_dx_form(images, shape, model.dtype, threads, bits_of, bits_at)
            for name, shape in model.affine_weights()}
