"""The multi-rank consistency suite under SimComm (N logical ranks in this process), for
every gradient reducer. The same cases run under mpirun in tests/mpi/test_consistency_mpi.py."""

import pytest

from tests import parallel_cases as cases
from dpnet.parallel import SimComm

SIZES = [2, 4]
KINDS = ["threelayer", "convnet", "resnet"]
PATHS = list(cases.PATHS)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_sync_bn_equals_full_batch(size, kind, path):
    cases.sim(size, path).run(cases.case_sync_equals_full_batch, kind, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_local_bn_equals_weighted_shards(size, kind, path):
    cases.sim(size, path).run(cases.case_local_equals_weighted_shards, kind, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_unequal_and_empty_shards(size, kind, path):
    cases.sim(size, path).run(cases.case_unequal_and_empty_shards, kind, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_adam_trajectory(size, kind, path):
    cases.sim(size, path).run(cases.case_adam_trajectory, kind, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("size", SIZES)
def test_broadcast_and_drift_check(size, path):
    cases.sim(size, path).run(cases.case_broadcast_and_drift_check, "threelayer", path)


def test_one_rank_is_the_serial_model():
    """SimComm(1) and sync BN at one rank give exactly the plain model's results."""
    loss, grads = SimComm(1).run(cases.case_sync_equals_full_batch, "convnet")[0]
    X, y = cases.make_batch(12)
    ref_loss, ref = cases.make_model("convnet", "sync").loss(X, y)
    assert loss == ref_loss
    assert all((grads[k] == ref[k]).all() for k in ref)


@pytest.mark.parametrize("size", [2, 4, 8])
@pytest.mark.parametrize("kind, bn_mode, canonical_sum, path", [
    ("threelayer", "sync", "tree", "allreduce"), ("convnet", "sync", "fixed-point", "allreduce"),
    ("resnet", "sync", "tree", "allreduce"), ("convnet", "local", "tree", "allreduce"),
    ("threelayer", "local", "fixed-point", "allreduce"), ("threelayer", "sync", "tree", "hierarchical")])
def test_reproducible_mode_is_bit_identical_at_any_size(size, kind, bn_mode, canonical_sum, path):
    """One BLAS thread, as the mode asks (python -m dpnet.train --reproducible sets it). The tree
    runs in shared memory on one node and through Allgather across nodes ('hierarchical': nodes
    of size / 2 ranks)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        cases.sim(size, path).run(cases.case_reproducible_is_bit_identical_at_any_size, kind, bn_mode, canonical_sum)
