"""DataParallel's threads and communicators under mpirun: close() releases them all."""

import threading

import pytest

from tests import parallel_cases as cases

pytestmark = pytest.mark.mpi(min_size=2)


def alive(name):
    return sum(t.name == name and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("path", ["allreduce", "buckets", "shared-memory"])
def test_close_ends_the_watchdog_and_worker_threads(path):
    """With a timeout a watchdog thread runs (and with buckets a reducing worker); after
    close() neither is left, and the object still computes the same loss, unguarded."""
    from dpnet.parallel import DataParallel, get_comm
    comm = get_comm()
    before = {name: alive(name) for name in ("dpnet-watchdog", "dpnet-allreduce")}
    dp = DataParallel(cases.make_model("threelayer"), comm, timeout=30, **cases.PATHS[path])
    X, y = cases.make_batch(8)
    shard = slice(comm.rank, None, comm.size)
    loss, _ = dp.loss(X[shard], y[shard])
    assert alive("dpnet-watchdog") == before["dpnet-watchdog"] + 1
    assert alive("dpnet-allreduce") == before["dpnet-allreduce"] + (path == "buckets")
    dp.close()
    assert {name: alive(name) for name in before} == before
    again, _ = dp.loss(X[shard], y[shard])
    assert again == pytest.approx(loss, rel=1e-12)  # the L2 loss may be summed in another order
