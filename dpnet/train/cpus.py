"""How many BLAS threads a rank runs: --threads, else a count set in the environment, else its
share of the CPUs it may run on."""

import os
import socket
from collections import Counter

# OpenBLAS reads these, in this order; MKL_NUM_THREADS is MKL's alone
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def usable_cpus():
    """The CPUs (ids) this process may run on: its affinity mask (taskset, a cpuset, a
    launcher's or scheduler's binding) where the OS reports one, else all of the machine's."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def thread_setting(environ):
    """The thread count the environment sets (None: none): the first of THREAD_VARIABLES that
    holds a positive count; of an OpenMP list per nesting level ("4,2"), its first."""
    for name in THREAD_VARIABLES:
        first = environ.get(name, "").split(",")[0].strip()
        if first.isdigit() and int(first) > 0:
            return int(first)
    return None


def cpu_share(cpus, host, ranks):
    """This rank's share of its CPUs `cpus` (ids) on `host`: each CPU counts 1 / the number of
    ranks on that host that may run on it. `ranks`: every rank's (host, cpus), this one's too.
    Ranks bound to CPUs of their own keep them all; ranks that share a mask divide it. At least 1."""
    sharing = Counter(cpu for rank_host, rank_cpus in ranks if rank_host == host for cpu in rank_cpus)
    return max(1, int(sum(1 / sharing[cpu] for cpu in cpus) + 1e-9))


def blas_threads(config, comm, environ=os.environ):
    """BLAS threads per rank (in the reproducible mode, micro-shard passes at a time, each on one
    BLAS thread): --threads; else, in the default mode, a count set in the environment (no more
    than the usable CPUs, as OpenBLAS caps it); else this rank's share of the CPUs it may use,
    among the ranks of its node. Collective: every rank of comm calls it."""
    cpus = usable_cpus()
    ranks = comm.allgather_obj((socket.gethostname(), cpus))  # collective even where unused
    if config.threads:
        return config.threads
    set_here = None if config.reproducible else thread_setting(environ)
    if set_here:
        return min(set_here, len(cpus))
    return cpu_share(cpus, socket.gethostname(), ranks)
