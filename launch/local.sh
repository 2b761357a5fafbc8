#!/usr/bin/env bash
# Run dpnet.train on this machine with N ranks: launch/local.sh N [dpnet.train options]
# BLAS gets the usable CPUs / N threads per rank (at least 1), so ranks do not oversubscribe the
# CPUs this shell may run on (all of the machine's, or fewer under taskset or a cpuset) unless N
# exceeds them.
set -euo pipefail
ranks=${1:?usage: launch/local.sh N [dpnet.train options]}
shift
cores=$(python3 -c 'import os; print(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)')
threads=$(( cores / ranks > 0 ? cores / ranks : 1 ))
export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
exec mpirun -n "$ranks" python -m dpnet.train --threads "$threads" "$@"
