"""What the reproducible mode costs: training-step images/s of DataParallel(..., reproducible=M)
against the default mode, for ThreeLayerConvNet and ConvNet as `python -m dpnet.train` builds
them by default (sync batchnorm, the model's recipe: optimizer, L2, layout), float32, global
batch 128.

    python benchmarks/bench_reproducible.py [--models threelayer convnet] [--ranks 1 2] [--repeats 2]
                                            [--affine-dx auto|plain|transposed] [--quick]

In one run, each configuration in fresh processes under mpirun (1 or 2 ranks), the machine's
cores shared among the ranks (cores / ranks BLAS threads per rank in the default mode, as the
trainer's default does on an unbound machine; as many micro-shard passes at a time, one BLAS
thread each, in the reproducible mode):
- the default mode;
- the reproducible mode with M = 8 micro-shards, summed by the pairwise tree and by the exact
  fixed-point sum;
- the tree with M = 2 (when the ranks divide it), 4 and 16: what M costs as it grows (not with
  --quick).
Layer choices: as the trainer makes them by default (auto: each conv's algorithm and affine dx
form measured at the configuration's images per pass, cached; in the reproducible mode only among
the ways with im2col's and plain's bits); --affine-dx plain|transposed sets the dx form in every
configuration.
Each figure is the best of REPEATS runs of STEPS steps after WARMUP, printed with its ratio to
the default mode at the same number of ranks. Name the CPU and BLAS kernels beside any figure
you quote (printed first).
"""

import argparse
import json
import os
import subprocess
import sys

STEPS, WARMUP, BATCH, REPEATS = 12, 3, 128, 2


def worker(model_name, options, affine_dx):
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"
    import time

    import numpy as np
    from threadpoolctl import threadpool_limits

    from dpnet.parallel import DataParallel, get_comm, shard_bounds
    from dpnet.parallel.microshards import DEFAULT_MICRO_SHARDS
    from dpnet.parallel.sharding import rank_bounds
    from dpnet.train import TrainConfig, build_model, build_update_rule
    from dpnet.train.loop import measure_layer_choices
    from dpnet.train.recipes import with_recipe

    comm = get_comm()
    cores = os.cpu_count() or 1
    threads = max(1, cores // comm.size)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, BATCH)
    micro = options.get("reproducible")
    train_config = with_recipe(TrainConfig(model=model_name, dtype="float32", batch_size=BATCH, affine_dx=affine_dx,
                                           reproducible=bool(micro), micro_shards=micro or DEFAULT_MICRO_SHARDS))
    model = build_model(train_config, comm)  # with its fixed layer choices
    update = build_update_rule(train_config)
    # as the trainer: rank 0 measures (or reads its cache), every rank uses its choices
    conv, dx, _ = measure_layer_choices(model, comm, train_config, BATCH, threads)
    model.set_conv_algorithms(conv or {})
    model.set_dx_forms(dx or {})
    dp = DataParallel(model, comm, workers=threads if micro else 1, **options)
    lo, hi = rank_bounds(BATCH, micro, comm.size, comm.rank) if micro else shard_bounds(BATCH, comm.size, comm.rank)
    config = {"learning_rate": train_config.lr}
    with threadpool_limits(1 if micro else threads, user_api="blas"):
        for i in range(WARMUP + STEPS):
            if i == WARMUP:
                comm.barrier()
                start = time.perf_counter()
            dp.loss(X[lo:hi], y[lo:hi], global_batch_size=BATCH)
            dp.step(update, config)
        comm.barrier()
        seconds = time.perf_counter() - start
    if comm.rank == 0:
        print(json.dumps({"images_per_s": BATCH * STEPS / seconds, "step_ms": 1e3 * seconds / STEPS}))
    dp.close()


def launch(ranks, model, options, affine_dx):
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    command = [mpirun if os.path.exists(mpirun) else "mpirun", "-n", str(ranks), sys.executable, __file__,
               "--worker", model, json.dumps(options), affine_dx]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def variants(ranks, quick=False):
    """(label, DataParallel options) of every configuration measured at `ranks` ranks; quick:
    the default and the tree at M = 8 only."""
    found = [("default", {})]
    found += [(f"reproducible, M = 8, {name}", {"reproducible": 8, "canonical_sum": name})
              for name in ("tree", "fixed-point") if 8 % ranks == 0 and not (quick and name != "tree")]
    found += [(f"reproducible, M = {m}, tree", {"reproducible": m, "canonical_sum": "tree"})
              for m in (2, 4, 16) if m % ranks == 0 and not quick]
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["threelayer", "convnet"], choices=["threelayer", "convnet"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=REPEATS, help="runs of each configuration; the best counts")
    parser.add_argument("--affine-dx", default="auto", choices=["auto", "plain", "transposed"],
                        help="the affine layers' input-gradient form in every configuration (as the trainer's "
                             "option and default)")
    parser.add_argument("--quick", action="store_true", help="the default and the tree at M = 8 only")
    args = parser.parse_args(argv)
    import numpy  # noqa: F401  loads the BLAS that threadpoolctl then names
    from threadpoolctl import threadpool_info
    blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')} kernels)"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU") if os.path.exists("/proc/cpuinfo") else "unknown CPU"
    print(f"{cpu}, {os.cpu_count()} cores; BLAS: {', '.join(blas) or 'unknown'}; global batch {BATCH}, float32, "
          f"best of {args.repeats} runs of {STEPS} steps; --affine-dx {args.affine_dx}")
    for model in args.models:
        for ranks in args.ranks:
            print(f"{model}, {ranks} rank(s):")
            runs = {label: [] for label, _ in variants(ranks, args.quick)}
            for _ in range(args.repeats):  # configurations alternate: the machine's speed drifts
                for label, options in variants(ranks, args.quick):
                    runs[label].append(launch(ranks, model, options, args.affine_dx)["images_per_s"])
            base = max(runs["default"])
            for label, values in runs.items():
                print(f"  {label:34s} {max(values):7.0f} images/s  {max(values) / base:5.2f} of the default")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        from dpnet.memory import keep_freed_memory
        keep_freed_memory()  # as python -m dpnet.train does
        worker(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
    else:
        main()
