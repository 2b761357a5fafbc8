"""The multi-host gradient sum against a flat Allreduce on the same hosts: ThreeLayerConvNet
(hidden 500, float32, global batch 128, one BLAS thread per rank) on a cluster of
network-namespace hosts on this machine (launch/netns_cluster.py; needs root).

    sudo python benchmarks/bench_cluster.py [--ranks 2,2] [--rates unlimited 1gbit] [--repeats 3]

For each link rate it makes a fresh cluster and runs, alternating, benchmarks/bench_parallel.py's
training-step worker with dpnet's default reduction (across hosts: shared memory within each
host, then Allreduce of each rank's slice across hosts) and with one flat Allreduce over every
rank. It prints images/s (best and median of the repeats), the share of step time spent waiting
in communication, and the ratio default / flat. All hosts share this machine's 2 cores, so
the figures show the relative cost of the two ways of summing, not a real cluster's speed.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # launch/ beside benchmarks/

from launch.netns_cluster import Cluster  # noqa: E402

VARIANTS = {"default (shared memory within hosts, Allreduce across)": {},
            "flat Allreduce over every rank": {"reduction": "allreduce"}}


def run_worker(cluster, ranks, options):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    worker = [sys.executable, os.path.join(HERE, "bench_parallel.py"), "--worker", json.dumps(options)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), OMP_NUM_THREADS="1")
    out = subprocess.run(cluster.mpiexec(ranks, worker, mpiexec=mpiexec), env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="2,2", help="ranks per host (default 2,2)")
    parser.add_argument("--rates", nargs="+", default=["unlimited", "1gbit"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ranks = [int(n) for n in args.ranks.split(",")]
    print(f"ThreeLayerConvNet, hidden 500, float32, global batch 128, {len(ranks)} hosts x {args.ranks} ranks, "
          f"1 BLAS thread per rank; best of {args.repeats} (median in brackets)")
    for rate in args.rates:
        with Cluster(len(ranks), rate=None if rate == "unlimited" else rate) as cluster:
            runs = {label: [] for label in VARIANTS}
            for _ in range(args.repeats):
                for label, options in VARIANTS.items():
                    runs[label].append(run_worker(cluster, ranks, options))
        print(f"  link {rate}:")
        best = {}
        for label, results in runs.items():
            rates = sorted(r["images_per_s"] for r in results)
            top = max(results, key=lambda r: r["images_per_s"])
            best[label] = top["images_per_s"]
            print(f"    {label}: {top['images_per_s']:6.0f} images/s ({rates[len(rates) // 2]:.0f}), "
                  f"communication {top['comm_fraction']:.0%} to {top['comm_fraction_max']:.0%} of step time")
        default, flat = best.values()
        print(f"    default / flat: {default / flat:.2f}")


if __name__ == "__main__":
    main()
