"""Data-parallel scaling of the ThreeLayerConvNet training step (hidden 500, float32,
global batch 128, one BLAS thread per rank).

    python benchmarks/bench_parallel.py [--torch-python /path/to/torch-venv/bin/python]

In one run it measures, each in fresh processes launched with mpirun:
- images/s at 1 rank and at 2 ranks, and their ratio;
- the no-communication ceiling: two independent processes at once, each stepping on half
  the batch without communicating (what 2 ranks could reach if summing were free and
  each still ran the whole optimizer step);
- the exposed communication (time the step waits for the gradient sum after backward,
  and with shared memory for the barrier after the divided optimizer step) as a share of
  step time, on the rank that waits least and on the one that waits most, and the bytes
  summed per step;
- all of it for each way of summing gradients (DataParallel's `reduction`): through
  node-local shared memory after backward (the default under mpirun), one MPI Allreduce
  after backward, and 1 MiB Allreduce buckets overlapped with backward. Runs alternate,
  and each figure is the best of REPEATS runs, since this machine's throughput drifts
  by about 10% from run to run;
- with --torch-python (a Python that has torch), the same network in PyTorch
  DistributedDataParallel over gloo at 1 and 2 processes (benchmarks/torch_ddp.py).
"""

import json
import os
import subprocess
import sys

STEPS, WARMUP, BATCH, REPEATS = 30, 5, 128, 3
VARIANTS = {  # label: DataParallel options
    "shared memory after backward (default)": {"reduction": "shared-memory"},
    "one Allreduce after backward": {"reduction": "allreduce"},
    "1 MiB Allreduce buckets overlapped with backward": {"reduction": "allreduce", "bucket_bytes": 1 << 20},
}


def worker(no_comm, options):
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"
    import time

    import numpy as np
    from threadpoolctl import threadpool_limits

    from dpnet.models import ThreeLayerConvNet
    from dpnet.optim import adam
    from dpnet.parallel import DataParallel, SerialComm, get_comm, shard_bounds

    comm = SerialComm() if no_comm else get_comm()
    size = 2 if no_comm else comm.size  # an independent process takes half the batch
    rng = np.random.default_rng(0)
    X = rng.standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, BATCH)
    model = ThreeLayerConvNet(hidden_dim=500, weight_scale="he", dtype=np.float32)
    dp = DataParallel(model, comm, **options)
    lo, hi = shard_bounds(BATCH, size, 0 if no_comm else comm.rank)
    config = {"learning_rate": 1e-4}
    with threadpool_limits(1, user_api="blas"):
        for i in range(WARMUP + STEPS):
            if i == WARMUP:
                comm.barrier()
                start, comm_start = time.perf_counter(), dp.comm_seconds
            dp.loss(X[lo:hi], y[lo:hi], global_batch_size=BATCH)
            dp.step(adam, config)
        comm.barrier()
        seconds = time.perf_counter() - start
    fractions = comm.allgather(np.array([(dp.comm_seconds - comm_start) / seconds]))[:, 0]
    if comm.rank == 0:
        print(json.dumps({"images_per_s": (hi - lo) * STEPS / seconds * (1 if no_comm else size),
                          "step_ms": 1e3 * seconds / STEPS,
                          "comm_fraction": float(fractions.min()), "comm_fraction_max": float(fractions.max()),
                          "allreduce_bytes": int(dp.flat.buffer.nbytes)}))


def launch(ranks, options):
    out = subprocess.run(["mpirun", "-n", str(ranks), sys.executable, __file__, "--worker", json.dumps(options)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def launch_independent(copies=2):
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "{}", "--no-comm"], stdout=subprocess.PIPE,
                              text=True) for _ in range(copies)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return sum(r["images_per_s"] for r in results)


def best(runs):
    return max(runs, key=lambda r: r["images_per_s"])


def median(values):
    return sorted(values)[len(values) // 2]


def launch_torch(python, world):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_ddp.py")
    out = subprocess.run([python, script, "--world", str(world)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(torch_python=None):
    ones, ceilings, twos = [], [], {label: [] for label in VARIANTS}
    torch_runs = {1: [], 2: []}
    for _ in range(REPEATS):
        ones.append(launch(1, {}))
        for label, options in VARIANTS.items():
            twos[label].append(launch(2, options))
        ceilings.append(launch_independent())
        if torch_python:
            for world in torch_runs:
                torch_runs[world].append(launch_torch(torch_python, world))
    one, ceiling = best(ones), max(ceilings)
    print(f"ThreeLayerConvNet training step, hidden 500, float32, global batch {BATCH}, "
          f"1 BLAS thread per rank, {STEPS} timed steps; best of {REPEATS} runs (median in brackets)")
    print(f"  1 rank:                             {one['images_per_s']:6.0f} images/s "
          f"({median([r['images_per_s'] for r in ones]):.0f}), {one['step_ms']:.1f} ms/step")
    print(f"  2 independent processes (no comm): {ceiling:6.0f} images/s ({median(ceilings):.0f}) "
          f"= {ceiling / one['images_per_s']:.2f}x one rank: the ceiling")
    print(f"  gradients summed: {one['allreduce_bytes'] / 2**20:.1f} MiB per step")
    print("  exposed communication: share of step time spent in the gradient sum (and, with shared memory,\n"
          "  in the barrier that publishes the updated parameters), on the rank that waits least -- the\n"
          "  cost on the critical path -- and on the rank that waits most, whose extra is waiting for a\n"
          "  slower rank. The independent processes each run the whole optimizer step; ranks sharing\n"
          "  memory divide it, which is how they can pass the ceiling.")
    for label, runs in twos.items():
        two = best(runs)
        print(f"  2 ranks, {label}:")
        print(f"      {two['images_per_s']:6.0f} images/s ({median([r['images_per_s'] for r in runs]):.0f}), "
              f"{two['step_ms']:.1f} ms/step = {two['images_per_s'] / one['images_per_s']:.2f}x one rank = "
              f"{two['images_per_s'] / ceiling:.1%} of the ceiling; exposed communication "
              f"{two['comm_fraction']:.1%} (least waiting) to {two['comm_fraction_max']:.1%} (most waiting)")
    if torch_python:
        t1, t2 = best(torch_runs[1]), best(torch_runs[2])
        default = best(twos[next(iter(VARIANTS))])
        print(f"  PyTorch, same network: 1 process {t1['images_per_s']:.0f} images/s; DDP over gloo, 2 processes "
              f"{t2['images_per_s']:.0f} images/s = {t2['images_per_s'] / t1['images_per_s']:.2f}x; "
              f"dpnet's default 2 ranks / DDP's 2 = {default['images_per_s'] / t2['images_per_s']:.2f}")
    else:
        print("  PyTorch DDP: not measured (pass --torch-python PATH, a Python that has torch)")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        from dpnet.memory import keep_freed_memory
        keep_freed_memory()  # as python -m dpnet.train does (bench_cluster.py runs this worker too)
        worker(no_comm="--no-comm" in sys.argv, options=json.loads(sys.argv[sys.argv.index("--worker") + 1]))
    else:
        flag = "--torch-python"
        main(torch_python=sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else None)
