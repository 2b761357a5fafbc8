"""BLAS threads per rank (dpnet.train.cpus): --threads, a count set in the environment, or the
rank's share of the CPUs it may run on."""

import os
import subprocess
import sys

import pytest

from dpnet.parallel import SerialComm, SimComm
from dpnet.train import TrainConfig
from dpnet.train.cpus import blas_threads, cpu_share, thread_setting, usable_cpus
from tests.train_helpers import clean_env


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"OMP_NUM_THREADS": "3"}, 3),
    ({"OMP_NUM_THREADS": "3,2"}, 3),                                # OpenMP's list per nesting level
    ({"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "5"}, 2),     # OpenBLAS reads its own first
    ({"GOTO_NUM_THREADS": "4", "OMP_NUM_THREADS": "5"}, 4),
    ({"OMP_NUM_THREADS": "0"}, None),                               # not a count: ignored
    ({"OMP_NUM_THREADS": "many", "GOTO_NUM_THREADS": " 6 "}, 6),
])
def test_thread_setting_reads_the_variables_as_openblas_does(environ, expected):
    assert thread_setting(environ) == expected


@pytest.mark.parametrize("mine, ranks, expected", [
    ([0, 1, 2, 3], [("a", [0, 1, 2, 3])], 4),                            # alone on the host
    ([0, 1, 2, 3], [("a", [0, 1, 2, 3])] * 4, 1),                        # 4 ranks, one shared mask
    ([0, 1, 2, 3], [("a", [0, 1, 2, 3])] * 3, 1),                        # 4/3 CPUs: 1
    ([0, 1], [("a", [0, 1]), ("a", [2, 3]), ("a", [4, 5])], 2),          # bound: its own CPUs
    ([0, 1, 2, 3], [("a", [0, 1, 2, 3]), ("a", [0, 1]), ("b", [0, 1, 2, 3])], 3),  # 2 + 2 halves; b is elsewhere
    ([0], [("a", [0])] * 8, 1),                                         # oversubscribed: still 1
])
def test_cpu_share_divides_each_cpu_among_the_ranks_of_the_host_that_may_use_it(mine, ranks, expected):
    assert cpu_share(mine, "a", ranks) == expected


def test_blas_threads_of_a_run():
    cpus = len(usable_cpus())
    assert blas_threads(TrainConfig(), SerialComm(), {}) == cpus
    assert blas_threads(TrainConfig(threads=7), SerialComm(), {"OMP_NUM_THREADS": "3"}) == 7  # --threads wins
    assert blas_threads(TrainConfig(), SerialComm(), {"OMP_NUM_THREADS": "1"}) == 1
    assert blas_threads(TrainConfig(), SerialComm(), {"OMP_NUM_THREADS": str(cpus + 5)}) == cpus  # capped
    # the reproducible mode runs every pass on one BLAS thread: the variables do not count passes
    assert blas_threads(TrainConfig(reproducible=True), SerialComm(), {"OMP_NUM_THREADS": "1"}) == cpus
    # logical ranks, threads of one process, share its CPUs
    threads = SimComm(2).run(lambda comm: blas_threads(TrainConfig(), comm, {}))
    assert threads == [max(1, cpus // 2)] * 2


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_a_process_confined_to_one_cpu_takes_one_thread():
    """A run confined to one CPU (taskset, a cpuset, a scheduler's binding) takes one BLAS
    thread, not one per core of the machine: more would make OpenBLAS's threads wait on each other."""
    code = ("import os; from dpnet.parallel import SerialComm; from dpnet.train import TrainConfig\n"
            "from dpnet.train.cpus import blas_threads\n"
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "print(blas_threads(TrainConfig(), SerialComm(), {}))")
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
