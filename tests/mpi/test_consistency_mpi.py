"""The multi-rank consistency suite under a real MPI launcher:

    mpirun -n 2 python -m pytest --with-mpi tests/mpi
    mpirun -n 4 python -m pytest --with-mpi tests/mpi

Without --with-mpi (the serial run) these tests are skipped; the same cases run under
SimComm in tests/test_parallel_consistency.py."""

import numpy as np
import pytest

from tests import parallel_cases as cases

pytestmark = pytest.mark.mpi(min_size=2)

KINDS = ["threelayer", "convnet", "resnet"]
PATHS = list(cases.PATHS)  # every reducer


@pytest.fixture(scope="module")
def comm():
    from dpnet.parallel import MPIComm, get_comm
    comm = get_comm()
    assert isinstance(comm, MPIComm), "get_comm() under mpirun must give the MPI world"
    return comm


@pytest.fixture
def layout(comm, path, monkeypatch):
    """Under mpirun the 'hierarchical' path needs nodes: pretend them with DPNET_RANKS_PER_NODE."""
    from dpnet.parallel.comm import RANKS_PER_NODE_ENV
    per_node = cases.ranks_per_node(path, comm.size)
    if per_node:
        monkeypatch.setenv(RANKS_PER_NODE_ENV, str(per_node))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_sync_bn_equals_full_batch(comm, kind, path, layout):
    cases.case_sync_equals_full_batch(comm, kind, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_local_bn_equals_weighted_shards(comm, kind, path, layout):
    cases.case_local_equals_weighted_shards(comm, kind, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_unequal_and_empty_shards(comm, kind, path, layout):
    cases.case_unequal_and_empty_shards(comm, kind, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_adam_trajectory(comm, kind, path, layout):
    cases.case_adam_trajectory(comm, kind, path)


@pytest.mark.parametrize("path", PATHS)
def test_broadcast_and_drift_check(comm, path, layout):
    cases.case_broadcast_and_drift_check(comm, "threelayer", path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_simcomm_reproduces_mpi(comm, kind, path, layout):
    """5. SimComm(size) in one process runs the same reducer as mpirun: gradients after one
    step and parameters after 5 Adam steps agree rank by rank, bit for bit at 2 ranks (every
    sum of two terms has one order) and to 1e-12 beyond (MPI may order a sum of more terms its
    own way). Control: dpnet given one input value changed by 1e-6 gives different results."""
    _, grads = cases.case_sync_equals_full_batch(comm, kind, path)
    params = cases.case_adam_trajectory(comm, kind, path)
    mine = np.concatenate([grads[k].ravel() for k in sorted(grads)] + [params])

    def in_process(nudge):
        def fn(c):
            _, g = cases.case_sync_equals_full_batch(c, kind, path)
            trajectory = cases.train_steps(c, kind, "sync", path=path, nudge=nudge)
            return np.concatenate([g[k].ravel() for k in sorted(g)] + [trajectory])
        return cases.sim(comm.size, path).run(fn)[comm.rank]

    expected = in_process(nudge=False)
    scale = np.abs(expected).max()
    if comm.size == 2:
        assert np.array_equal(mine, expected)
    assert np.abs(mine - expected).max() <= 1e-12 * scale
    nudged = in_process(nudge=True)  # a trajectory from a nudged input
    assert not np.array_equal(mine, nudged)
    assert np.abs(mine - nudged).max() > 1e-12 * scale


def test_buckets_are_reduced_overlapped_under_mpi(comm):
    """Under mpirun the 'buckets' cases above run the overlapped, multi-bucket path."""
    from dpnet.parallel import DataParallel
    dp = DataParallel(cases.make_model("convnet"), comm, bucket_bytes=cases.BUCKET_BYTES)
    assert dp.reducer.overlapped and len(dp.reducer.buckets) > 1
    dp.close()


@pytest.mark.parametrize("kind, bn_mode, canonical_sum", [
    ("threelayer", "sync", "tree"), ("convnet", "sync", "fixed-point"), ("resnet", "local", "tree")])
def test_reproducible_mode_is_bit_identical_at_any_size(comm, kind, bn_mode, canonical_sum):
    """Under mpirun, the reproducible mode's 3 steps equal one process's bits (computed by every
    rank itself), on one BLAS thread."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        cases.case_reproducible_is_bit_identical_at_any_size(comm, kind, bn_mode, canonical_sum)
