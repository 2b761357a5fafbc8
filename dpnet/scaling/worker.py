"""MPI worker of `python -m dpnet.scaling fit`: times one gradient sum of float32 arrays
of several sizes and prints JSON from rank 0.

    mpiexec -n 2 python -m dpnet.scaling.worker --sizes 4096,65536 --repeats 5 [--shm]

Prints {"allreduce": [[bytes, seconds], ...], "shm": [...]} ("shm" with --shm: the
SharedMemoryReducer sum, which needs every rank on one node). Each time is the median
over repeats of the slowest rank's time, each repeat starting after a barrier.
"""

import argparse
import json
import time

import numpy as np

from ..parallel import MPIComm, choose_reducer

WARMUP = 2


def _median_time(comm, run, repeats):
    times = []
    for i in range(WARMUP + repeats):
        comm.barrier()
        start = time.perf_counter()
        run()
        elapsed = comm.allreduce(np.array([time.perf_counter() - start]), op="max")[0]
        if i >= WARMUP:
            times.append(elapsed)
    return float(np.median(times))


def allreduce_times(comm, sizes, repeats):
    """[[bytes, seconds]] of comm.allreduce on a float32 array of each size in bytes."""
    out = []
    for nbytes in sizes:
        buffer = np.ones(nbytes // 4, np.float32)
        out.append([nbytes, _median_time(comm, lambda: comm.allreduce(buffer), repeats)])
    return out


def shm_times(comm, sizes, repeats):
    """[[bytes, seconds]] of SharedMemoryReducer.reduce() on float32 arrays of each size."""
    out = []
    for nbytes in sizes:
        reducer, _ = choose_reducer(comm, "shared-memory", None, [nbytes // 4], 0, np.float32)
        reducer.send[...] = 1
        out.append([nbytes, _median_time(comm, reducer.reduce, repeats)])
        reducer.close()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", required=True, help="bytes, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shm", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    comm = MPIComm()
    result = {"ranks": comm.size, "allreduce": allreduce_times(comm, sizes, args.repeats)}
    if args.shm:
        result["shm"] = shm_times(comm, sizes, args.repeats)
    if comm.rank == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
