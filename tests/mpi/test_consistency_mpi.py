"""The multi-rank consistency suite under a real MPI launcher:

    mpirun -n 2 python -m pytest --with-mpi tests/mpi
    mpirun -n 4 python -m pytest --with-mpi tests/mpi

Without --with-mpi (the serial run) these tests are skipped; the same cases run under
SimComm in tests/test_parallel_consistency.py."""

import numpy as np
import pytest

from tests import parallel_cases as cases

pytestmark = pytest.mark.mpi(min_size=2)

KINDS = ["threelayer", "convnet"]
PATHS = list(cases.PATHS)  # every reduction path: overlapped buckets and shared memory


@pytest.fixture(scope="module")
def comm():
    from dpnet.parallel import MPIComm, get_comm
    comm = get_comm()
    assert isinstance(comm, MPIComm), "get_comm() under mpirun must give the MPI world"
    return comm


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_sync_bn_equals_full_batch(comm, kind, path):
    cases.case_sync_equals_full_batch(comm, kind, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_local_bn_equals_weighted_shards(comm, kind, path):
    cases.case_local_equals_weighted_shards(comm, kind, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_unequal_and_empty_shards(comm, kind, path):
    cases.case_unequal_and_empty_shards(comm, kind, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_adam_trajectory(comm, kind, path):
    cases.case_adam_trajectory(comm, kind, path)


@pytest.mark.parametrize("path", PATHS)
def test_broadcast_and_drift_check(comm, path):
    cases.case_broadcast_and_drift_check(comm, "threelayer", path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_simcomm_reproduces_mpi(comm, kind, path):
    """5. SimComm(size) in one process gives the mpirun results to 1e-12 (gradients after
    one step, parameters after 5 Adam steps), rank by rank; a perturbed copy fails (control)."""
    from dpnet.parallel import SimComm
    _, grads = cases.case_sync_equals_full_batch(comm, kind, path)
    params = cases.case_adam_trajectory(comm, kind, path)
    mine = np.concatenate([grads[k].ravel() for k in sorted(grads)] + [params])
    sim = SimComm(comm.size).run(
        lambda c: np.concatenate([v.ravel() for _, v in sorted(cases.case_sync_equals_full_batch(c, kind)[1].items())]
                                 + [cases.case_adam_trajectory(c, kind)]))
    expected = sim[comm.rank]
    scale = np.abs(expected).max()
    assert np.abs(mine - expected).max() <= 1e-12 * scale
    perturbed = expected.copy()
    perturbed[0] += 1e-9 * scale
    assert np.abs(mine - perturbed).max() > 1e-12 * scale


def test_buckets_are_reduced_overlapped_under_mpi(comm):
    """Under mpirun the cases above run the overlapped, multi-bucket reduction path."""
    from dpnet.parallel import DataParallel
    dp = DataParallel(cases.make_model("convnet"), comm, bucket_bytes=cases.BUCKET_BYTES)
    assert dp._overlap and len(dp.buckets) > 1
