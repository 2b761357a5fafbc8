#!/usr/bin/env bash
# Run dpnet.train on this machine with N ranks: launch/local.sh N [dpnet.train options]
# BLAS gets cores / N threads per rank (at least 1), so ranks never oversubscribe the cores.
set -euo pipefail
ranks=${1:?usage: launch/local.sh N [dpnet.train options]}
shift
cores=$(python3 -c 'import os; print(os.cpu_count() or 1)')
threads=$(( cores / ranks > 0 ? cores / ranks : 1 ))
export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
exec mpirun -n "$ranks" python -m dpnet.train --threads "$threads" "$@"
