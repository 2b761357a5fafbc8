"""Measuring this machine for the scaling model, and the fit file.

The fit file (default ~/.cache/dpnet/scaling.json, or $DPNET_SCALING_FIT) maps a machine
key, "<CPU model> | <BLAS library> <kernel> <version>" (threadpoolctl), to that
machine's fit (see dpnet.scaling.model), so fits of several machines can share a file
and none is used on the wrong machine.

measure_fit() measures, each time a median of repeats:
- the gradient sum at 2 ranks under mpiexec (dpnet.scaling.worker): SharedMemoryReducer
  and MPI Allreduce on one host, and Allreduce between two network-namespace hosts at
  each of NETWORK_LINKS (launch/netns_cluster.py; needs root and a dpnet checkout);
- per model, in this process with one BLAS thread and float32: forward + backward at
  several images per rank, the step of the model's default optimizer (its recipe,
  dpnet/train/recipes.py) over all parameters, the gradient bytes, and the
  share of forward + backward after the first gradient is ready (the backward that
  overlapped communication could hide behind).
"""

import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np

from ..atomic import atomic_path
from .model import NETWORK_LINKS, fit_line

FIT_ENV = "DPNET_SCALING_FIT"
MODELS = ("threelayer", "convnet")
SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]  # bytes
IMAGES = [8, 16, 32, 64, 128]
QUICK_SIZES, QUICK_IMAGES = [4 << 10, 256 << 10, 4 << 20], [8, 32]


def cache_file(name, env):
    """$env, or ~/.cache/dpnet/<name>: where dpnet keeps what it measured of this machine."""
    return os.environ.get(env) or os.path.join(os.path.expanduser("~"), ".cache", "dpnet", name)


def cpuinfo(field):
    """The first value of `field` in /proc/cpuinfo, or None (not Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith(field)), None)
    except OSError:
        return None


def default_path():
    return cache_file("scaling.json", FIT_ENV)


def machine():
    """{"cpu": model name, "blas": library, kernel and version}: what the fit depends on."""
    import numpy  # noqa: F401  (loads the BLAS threadpoolctl reports)
    from threadpoolctl import threadpool_info

    cpu = cpuinfo("model name")
    if cpu is None:
        import platform
        cpu = platform.processor() or "unknown CPU"
    blas = next((i for i in threadpool_info() if i.get("user_api") == "blas"), {})
    return {"cpu": cpu, "blas": " ".join(str(blas.get(k, "?")) for k in ("internal_api", "architecture", "version"))}


def machine_key(info=None):
    info = info or machine()
    return f"{info['cpu']} | {info['blas']}"


def load_fit(path=None, key=None):
    """This machine's fit (or `key`'s) from the fit file; None when there is none."""
    path = path or default_path()
    try:
        with open(path) as fh:
            fits = json.load(fh)
    except (OSError, ValueError):
        return None
    return fits.get(key or machine_key())


def save_fit(fit, path=None):
    """Store fit under its machine key, keeping other machines' fits. Returns the path."""
    path = path or default_path()
    try:
        with open(path) as fh:
            fits = json.load(fh)
    except (OSError, ValueError):
        fits = {}
    fits[machine_key(fit["machine"])] = fit
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(fits, fh, indent=1)
    return path


def _build(name):
    """(model, update rule, optimizer name): model `name` as dpnet.train builds it by default,
    float32, and its recipe's optimizer."""
    from ..parallel import SerialComm
    from ..train import TrainConfig, build_model, build_update_rule
    from ..train.recipes import with_recipe
    config = with_recipe(TrainConfig(model=name, dtype="float32"))
    return build_model(config, SerialComm()), build_update_rule(config), config.optimizer


def measure_model(name, images, repeats):
    """{"images", "compute_s", "optimizer", "optimizer_s", "backward_fraction", "gradient_bytes"}
    of model `name` as dpnet.train builds it by default, float32, one BLAS thread; the optimizer
    step is its recipe's update rule (dpnet/train/recipes.py)."""
    from threadpoolctl import threadpool_limits

    from ..parallel import DataParallel, SerialComm

    model, rule, optimizer_name = _build(name)
    dp = DataParallel(model, SerialComm())
    rng = np.random.default_rng(0)
    batches = {n: (rng.standard_normal((n, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, n)) for n in images}
    compute, optimizer, fractions = {n: [] for n in images}, [], []
    config = {"learning_rate": 1e-6}
    with threadpool_limits(1, user_api="blas"):
        for i in range(1 + repeats):  # one warm-up; sizes take turns, so a burst of load hits them alike
            for n, (X, y) in batches.items():
                start = time.perf_counter()
                dp.loss(X, y, global_batch_size=n)
                middle = time.perf_counter()
                dp.step(rule, config)
                if i:
                    compute[n].append(middle - start)
                    optimizer.append(time.perf_counter() - middle)
        for X, y in batches.values():
            first = []  # when backward hands over its first gradient

            def on_grad(_name, _grad):
                if not first:
                    first.append(time.perf_counter())
            start = time.perf_counter()
            model.data_loss(X, y, on_grad=on_grad)
            end = time.perf_counter()
            fractions.append((end - first[0]) / (end - start))
    nbytes = int(dp.flat.buffer.nbytes)
    dp.close()
    return {"images": list(images), "compute_s": [float(np.median(compute[n])) for n in images],
            "optimizer": optimizer_name, "optimizer_s": float(np.median(optimizer)),
            "backward_fraction": float(np.median(fractions)), "gradient_bytes": nbytes}


def _worker_command(sizes, repeats, shm):
    return [sys.executable, "-m", "dpnet.scaling.worker", "--sizes", ",".join(map(str, sizes)),
            "--repeats", str(repeats)] + (["--shm"] if shm else [])


def worker_env():
    """The environment of MPI workers: one BLAS thread, this dpnet first on the path."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def mpiexec_path():
    """The mpiexec beside this Python (the venv's MPICH), else the one on PATH."""
    import shutil
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else (shutil.which("mpiexec") or "mpiexec")


def _run(command, timeout=300):
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=worker_env(),
                         timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


def _line(points, how):
    a, b = fit_line([p[0] for p in points], [p[1] for p in points])
    return {"a": a, "b": b, "points": points, "how": how}


def _warn_flat(links, say):
    for name, line in links.items():
        if line["b"] == 0:
            say(f"fit: the {name} link's times did not grow with the message size (noise: another job on the "
                f"machine?), so its per-byte time is 0; measure again on a quiet machine")


def measure_links(sizes, repeats, say=print):
    """{name: line} for 'shm' and 'mpi-local', and each of NETWORK_LINKS where a cluster of
    network-namespace hosts can be made here (else said, and left out)."""
    local = _run([mpiexec_path(), "-n", "2", *_worker_command(sizes, repeats, shm=True)])
    links = {"shm": _line(local["shm"], "SharedMemoryReducer.reduce, 2 ranks on one host"),
             "mpi-local": _line(local["allreduce"], "MPI Allreduce, 2 ranks on one host")}
    try:
        from launch.netns_cluster import Cluster, available
    except ImportError:
        say("fit: TCP links not measured: launch/netns_cluster.py is not importable (run from a dpnet checkout)")
        return links
    ok, why = available(reason=True)
    if not ok:
        say(f"fit: TCP links not measured: {why}")
        return links
    for rate in NETWORK_LINKS:
        with Cluster(2, rate=rate) as cluster:
            command = cluster.mpiexec([1, 1], _worker_command(sizes, repeats, shm=False), mpiexec=mpiexec_path())
            points = _run(command)["allreduce"]
        links[rate] = _line(points, f"MPI Allreduce over TCP between 2 network-namespace hosts, links at {rate}")
    return links


def measure_fit(quick=False, say=print):
    """This machine's fit (a dict for dpnet.scaling.model); quick: fewer sizes, images and repeats."""
    sizes, images, repeats = (QUICK_SIZES, QUICK_IMAGES, 3) if quick else (SIZES, IMAGES, 7)
    info = machine()
    say(f"fit: {machine_key(info)}")
    links = measure_links(sizes, repeats, say)
    _warn_flat(links, say)
    for name, line in links.items():
        say(f"  {name:9s}: a = {1e6 * line['a']:8.1f} us, b = {1e9 * line['b']:7.3f} ns/byte")
    models = {}
    for name in MODELS:
        models[name] = measure_model(name, images, repeats)
        m = models[name]
        say(f"  {name}: forward + backward " + ", ".join(f"{n}: {1e3 * t:.1f} ms" for n, t in
                                                         zip(m["images"], m["compute_s"]))
            + f"; optimizer ({m['optimizer']}) {1e3 * m['optimizer_s']:.1f} ms; backward after its first gradient "
              f"{m['backward_fraction']:.0%}; gradients {m['gradient_bytes'] / 2**20:.1f} MiB")
    return {"machine": info, "quick": quick, "measured": datetime.datetime.now().isoformat(timespec="seconds"),
            "links": links, "models": models}
