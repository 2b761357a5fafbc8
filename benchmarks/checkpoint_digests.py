"""Train short runs under mpirun and print a digest of each checkpoint's contents.

    python benchmarks/checkpoint_digests.py [--checkout DIR] [--data DIR] [--steps N] [--ranks 2 4]

For each model, reduction and rank count it runs `mpirun -n R python -m dpnet.train` from
DIR (default: this checkout) for N steps and prints one line: the sha256 of the
parameters, of the optimizer state and of the batchnorm statistics (each dataset's
bytes in sorted name order; file paths and other attributes are left out). Run it
against two checkouts to show that a change of code left training bit for bit alone.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np

RUNS = {  # name -> extra flags
    "shared-memory": ["--reduction", "shared-memory"],
    "allreduce": ["--reduction", "allreduce"],
    "buckets": ["--reduction", "allreduce", "--bucket-mb", "1"],
}


def group_digest(group, only=""):
    """sha256 of the datasets in `group` whose path ends with `only`, and its attributes."""
    h = hashlib.sha256()

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and name.endswith(only):
            h.update(name.encode())
            h.update(np.ascontiguousarray(obj[()]).tobytes())
    group.visititems(visit)
    for key in sorted(group.attrs):  # optimizer scalars (t, learning_rate, ...)
        h.update(key.encode())
        h.update(repr(group.attrs[key]).encode())
    return h.hexdigest()[:16]


def digests(path):
    with h5py.File(path, "r") as f:
        return {"params": group_digest(f["params"]), "optimizer": group_digest(f["optimizer"]),
                "bn mean": group_digest(f["batchnorm"], "running_mean"),
                "bn var": group_digest(f["batchnorm"], "running_var"), "step": int(f.attrs["step"])}


def main():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", default=here)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(here), "shared", "data", "cifar-10-batches-py"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--models", nargs="+", default=["threelayer", "convnet"])
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.checkout), OMP_NUM_THREADS="1")
    args.data = os.path.abspath(args.data)
    print(f"{'model':<11} {'ranks':>5} {'reduction':<14} {'params':<17} {'optimizer':<17} {'bn mean':<17} "
          f"{'bn var':<17} step")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for ranks in args.ranks:
                for name, flags in RUNS.items():
                    ckpt = os.path.join(tmp, f"{model}-{ranks}-{name}.h5")
                    cmd = ["mpirun", "-n", str(ranks), sys.executable, "-m", "dpnet.train", "--data", args.data,
                           "--model", model, "--max-steps", str(args.steps), "--threads", "1",
                           "--checkpoint", ckpt, "--metrics", "", "--no-progress", *flags]
                    run = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
                    if run.returncode != 0:
                        print(f"{model:<11} {ranks:>5} {name:<14} FAILED: {run.stderr.strip()[-300:]}")
                        continue
                    d = digests(ckpt)
                    print(f"{model:<11} {ranks:>5} {name:<14} {d['params']:<17} {d['optimizer']:<17} "
                          f"{d['bn mean']:<17} {d['bn var']:<17} {d['step']}", flush=True)


if __name__ == "__main__":
    main()
