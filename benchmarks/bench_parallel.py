"""Data-parallel scaling of the ThreeLayerConvNet training step (hidden 500, float32,
global batch 128, one BLAS thread per rank).

    python benchmarks/bench_parallel.py

In one run it measures, each in fresh processes launched with mpirun:
- images/s at 1 rank and at 2 ranks, and their ratio;
- the no-communication ceiling: two independent processes at once, each stepping on half
  the batch without communicating (what 2 ranks could reach if the allreduce were free);
- the exposed communication (time the step waits for the gradient allreduce after
  backward) as a share of step time, and the allreduce bytes per step;
- all of it with one Allreduce after backward (the default) and with 1 MiB gradient
  buckets reduced during backward (overlap), alternated; each figure is the best of
  REPEATS runs, since this machine's throughput drifts by about 10% from run to run.
"""

import json
import os
import subprocess
import sys

STEPS, WARMUP, BATCH, REPEATS = 30, 5, 128, 3
OVERLAP_BUCKET = 1 << 20  # bucket_bytes for the overlapped variant; 0 below means None (one Allreduce)


def worker(no_comm, bucket_bytes):
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
    dp = DataParallel(model, comm, bucket_bytes=bucket_bytes or None)
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
    if comm.rank == 0:
        print(json.dumps({"images_per_s": (hi - lo) * STEPS / seconds * (1 if no_comm else size),
                          "step_ms": 1e3 * seconds / STEPS,
                          "comm_fraction": (dp.comm_seconds - comm_start) / seconds,
                          "allreduce_bytes": int(dp.flat.buffer.nbytes)}))


def launch(ranks, bucket_bytes=0):
    out = subprocess.run(["mpirun", "-n", str(ranks), sys.executable, __file__, "--worker", str(bucket_bytes)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def launch_independent(copies=2):
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "0", "--no-comm"], stdout=subprocess.PIPE,
                              text=True) for _ in range(copies)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return sum(r["images_per_s"] for r in results)


def best(runs):
    return max(runs, key=lambda r: r["images_per_s"])


def main():
    ones, twos, overlapped, ceilings = [], [], [], []
    for _ in range(REPEATS):
        ones.append(launch(1))
        twos.append(launch(2))
        overlapped.append(launch(2, OVERLAP_BUCKET))
        ceilings.append(launch_independent())
    one, two, over, ceiling = best(ones), best(twos), best(overlapped), max(ceilings)
    print(f"ThreeLayerConvNet training step, hidden 500, float32, global batch {BATCH}, "
          f"1 BLAS thread per rank, {STEPS} timed steps, best of {REPEATS} runs")
    print(f"  1 rank:                          {one['images_per_s']:7.0f} images/s  ({one['step_ms']:.1f} ms/step)")
    print(f"  2 ranks:                         {two['images_per_s']:7.0f} images/s  ({two['step_ms']:.1f} ms/step)")
    print(f"  2 independent processes (no comm): {ceiling:5.0f} images/s")
    print(f"  scaling 2 ranks / 1 rank:        {two['images_per_s'] / one['images_per_s']:7.2f}x")
    print(f"  ceiling 2 independent / 1 rank:  {ceiling / one['images_per_s']:7.2f}x")
    print(f"  2 ranks as share of the ceiling: {two['images_per_s'] / ceiling:7.1%}")
    print(f"  gradient allreduce: {two['allreduce_bytes'] / 2**20:.1f} MiB per step")
    print(f"  exposed communication at 2 ranks, one Allreduce after backward (default): "
          f"{two['comm_fraction']:5.1%} of step time")
    print(f"  exposed communication at 2 ranks, 1 MiB buckets overlapped with backward: "
          f"{over['comm_fraction']:5.1%} of step time ({over['images_per_s']:.0f} images/s, "
          f"{over['step_ms']:.1f} ms/step, {over['images_per_s'] / one['images_per_s']:.2f}x one rank)")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(no_comm="--no-comm" in sys.argv, bucket_bytes=int(sys.argv[sys.argv.index("--worker") + 1]))
    else:
        main()
