"""Under mpirun: only rank 0 writes pytest's report, and a test failing on any rank
aborts the whole job with that rank's report (other ranks would otherwise wait forever
in the collective the failed rank never reaches)."""

import os
import sys
import time

import pytest

from dpnet.parallel import launched_by_mpi


def _world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if launched_by_mpi() and _world().Get_rank() != 0:
        sys.stdout = open(os.devnull, "w")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and launched_by_mpi() and _world().Get_size() > 1:
        rank = _world().Get_rank()
        sys.stderr.write(f"\n[rank {rank}] {report.nodeid} failed; aborting all ranks\n"
                         f"{report.longreprtext}\n")
        sys.stderr.flush()
        time.sleep(0.5)  # let mpirun forward the report before Abort tears it down
        _world().Abort(1)
