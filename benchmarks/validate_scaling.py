"""The scaling model against real training steps: predicted vs measured step time.

    python -m dpnet.scaling fit                      # once: this machine's fit
    python benchmarks/validate_scaling.py [--repeats 3] [--fit FILE]

For ThreeLayerConvNet and ConvNet (as dpnet.train builds them: float32, sync batchnorm,
dpnet's default reduction, one BLAS thread per rank), global batch 128 (strong) and 128
per rank (weak), it measures the median step (DataParallel.loss + the step of the model's
default optimizer, its recipe's; random data) at 1 rank, 2 ranks on this host, and 2 hosts x 1 and 2 hosts x 2 ranks of a
network-namespace cluster with 1 Gbit/s links (launch/netns_cluster.py, needs root), and
prints it beside the fit's prediction for the same layout and reducer, and the same for
the time in the gradient sum (on the rank that waits least, as benchmarks/bench_parallel.py). Every rank here
shares this machine's cores: the prediction scales compute by ranks / cores beyond one
rank per core (the "shared cores" column); "a core each" is what a real cluster would
see. Each cell is the median over --repeats runs, the runs of all cells taking turns.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BATCH, WARMUP = 128, 2
STEPS = {"threelayer": 12, "convnet": 6}
LAYOUTS = [  # label, ranks per host, link (None: one host, no cluster)
    ("1 rank", [1], None),
    ("2 ranks, 1 host", [2], None),
    ("2 hosts x 1, 1 Gbit/s", [1, 1], "1gbit"),
    ("2 hosts x 2, 1 Gbit/s", [2, 2], "1gbit"),
]


def worker(model_name, global_batch, steps):
    import time

    import numpy as np
    from threadpoolctl import threadpool_limits

    from dpnet.parallel import DataParallel, get_comm, shard_bounds
    from dpnet.train import TrainConfig, build_model, build_update_rule

    comm = get_comm()
    train_config = TrainConfig(model=model_name, dtype="float32")
    model = build_model(train_config, comm)
    rule = build_update_rule(train_config)
    dp = DataParallel(model, comm)
    lo, hi = shard_bounds(global_batch, comm.size, comm.rank)
    rng = np.random.default_rng(comm.rank)
    X = rng.standard_normal((hi - lo, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, hi - lo)
    config, times = {"learning_rate": 1e-6}, []
    with threadpool_limits(1, user_api="blas"):
        comm.barrier()
        for i in range(WARMUP + steps):
            if i == WARMUP:
                comm_before = dp.comm_seconds
            start = time.perf_counter()
            dp.loss(X, y, global_batch_size=global_batch)
            dp.step(rule, config)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
    waits = comm.allgather(np.array([(dp.comm_seconds - comm_before) / steps]))[:, 0]
    node = getattr(dp.reducer, "node", None)
    reduction = dp.reduction
    dp.close()
    if comm.rank == 0:
        print(json.dumps({"step_s": float(np.median(times)), "comm_s": float(waits.min()), "reduction": reduction,
                          "ranks_per_node": node.size if node is not None else 1}))


def command(model_name, global_batch):
    return [sys.executable, os.path.abspath(__file__), "--worker", model_name, str(global_batch),
            str(STEPS[model_name])]


def run(cmd):
    from dpnet.scaling.measure import worker_env
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=worker_env(), timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def cells():
    """(model, layout index, mode, global batch) of every cell; weak at 1 rank is strong's."""
    for model_name in STEPS:
        for i, (_, hosts, _) in enumerate(LAYOUTS):
            ranks = sum(hosts)
            yield model_name, i, "strong", BATCH
            if ranks > 1:
                yield model_name, i, "weak", BATCH * ranks


def measure(repeats):
    from dpnet.scaling.measure import mpiexec_path
    from launch.netns_cluster import Cluster

    results = {}
    for _ in range(repeats):
        for i, (label, hosts, link) in enumerate(LAYOUTS):
            todo = [c for c in cells() if c[1] == i]
            if link is None:
                for cell in todo:
                    cmd = [mpiexec_path(), "-n", str(hosts[0]), *command(cell[0], cell[3])]
                    results.setdefault(cell, []).append(run(cmd))
                continue
            with Cluster(len(hosts), rate=link) as cluster:
                for cell in todo:
                    cmd = cluster.mpiexec(hosts, command(cell[0], cell[3]), mpiexec=mpiexec_path())
                    results.setdefault(cell, []).append(run(cmd))
    return results


def main(repeats, fit_path):
    import numpy as np

    from dpnet.scaling import load_fit, machine_key, step_s
    from dpnet.scaling.model import auto_reducer

    fit = load_fit(fit_path)
    if fit is None:
        raise SystemExit("no fit of this machine: run `python -m dpnet.scaling fit` first")
    results = measure(repeats)
    cores = os.cpu_count()
    print(f"{machine_key()}; {cores} cores; median of {repeats} runs per cell, each the median of "
          f"{STEPS} timed steps")
    print("| model | layout | scaling | images/rank | reducer | measured ms | predicted ms, shared cores "
          "| predicted / measured | predicted ms, a core each | comm ms: measured, predicted |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    for cell, runs in results.items():
        model_name, i, mode, global_batch = cell
        label, hosts, link = LAYOUTS[i]
        ranks, per_node = sum(hosts), hosts[0]
        measured = float(np.median([r["step_s"] for r in runs]))
        images = -(-global_batch // ranks)
        reducer = auto_reducer(ranks, per_node)
        kwargs = dict(ranks_per_node=per_node, link=link or "1gbit")
        predicted = step_s(fit, model_name, ranks, images, reducer, cores=cores, **kwargs)
        shared = predicted["step_s"]
        own = step_s(fit, model_name, ranks, images, reducer, **kwargs)["step_s"]
        ratio = shared / measured
        comm = float(np.median([r["comm_s"] for r in runs]))
        mark = "" if abs(ratio - 1) <= 0.25 else " **outside 25%**"
        print(f"| {model_name} | {label} | {mode} | {images} | {runs[0]['reduction']} | {1e3 * measured:.1f} | "
              f"{1e3 * shared:.1f} | {ratio:.2f}{mark} | {1e3 * own:.1f} | "
              f"{1e3 * comm:.1f}, {1e3 * predicted['comm_s']:.1f} |")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        from dpnet.memory import keep_freed_memory
        keep_freed_memory()  # as python -m dpnet.train does
        i = sys.argv.index("--worker")
        worker(sys.argv[i + 1], int(sys.argv[i + 2]), int(sys.argv[i + 3]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        parser.add_argument("--repeats", type=int, default=3)
        parser.add_argument("--fit", help="fit file (default: dpnet.scaling's)")
        args = parser.parse_args()
        main(args.repeats, args.fit)
