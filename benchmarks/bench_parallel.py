"""Data-parallel scaling of the ThreeLayerConvNet training step (hidden 500, float32,
global batch 128, one BLAS thread per rank).

    python benchmarks/bench_parallel.py

In one run it measures, each in fresh processes launched with mpirun:
- images/s at 1 rank and at 2 ranks, and their ratio;
- the no-communication ceiling: two independent processes at once, each stepping on half
  the batch without communicating (what 2 ranks could reach if the allreduce were free);
- the share of step time spent in the gradient allreduce, and its bytes per step.
"""

import json
import os
import subprocess
import sys

STEPS, WARMUP, BATCH = 30, 5, 128


def worker(no_comm):
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
    dp = DataParallel(model, comm)
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


def launch(ranks):
    out = subprocess.run(["mpirun", "-n", str(ranks), sys.executable, __file__, "--worker"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def launch_independent(copies=2):
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--no-comm"], stdout=subprocess.PIPE,
                              text=True) for _ in range(copies)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return sum(r["images_per_s"] for r in results)


def main():
    one = launch(1)
    two = launch(2)
    ceiling = launch_independent()
    print(f"ThreeLayerConvNet training step, hidden 500, float32, global batch {BATCH}, "
          f"1 BLAS thread per rank, {STEPS} timed steps")
    print(f"  1 rank:                          {one['images_per_s']:7.0f} images/s  ({one['step_ms']:.1f} ms/step)")
    print(f"  2 ranks:                         {two['images_per_s']:7.0f} images/s  ({two['step_ms']:.1f} ms/step)")
    print(f"  2 independent processes (no comm): {ceiling:5.0f} images/s")
    print(f"  scaling 2 ranks / 1 rank:        {two['images_per_s'] / one['images_per_s']:7.2f}x")
    print(f"  ceiling 2 independent / 1 rank:  {ceiling / one['images_per_s']:7.2f}x")
    print(f"  2 ranks as share of the ceiling: {two['images_per_s'] / ceiling:7.1%}")
    print(f"  gradient allreduce: {two['allreduce_bytes'] / 2**20:.1f} MiB per step, "
          f"{two['comm_fraction']:.1%} of step time at 2 ranks")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(no_comm="--no-comm" in sys.argv)
    else:
        main()
