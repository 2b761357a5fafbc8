"""The shared-memory gradient sum (dpnet.parallel.shared_memory) under mpirun, against the
sum of every rank's array computed from an Allgather: in rank order within each node, then
over the nodes. Where the ranks span several hosts (or DPNET_RANKS_PER_NODE pretends so),
the reducer is the hierarchical one and each node has its own shared arrays."""

import numpy as np
import pytest

from dpnet.parallel import choose_reducer
from dpnet.parallel.comm import RANKS_PER_NODE_ENV

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def comm():
    from dpnet.parallel import get_comm
    return get_comm()


def shared_reducer(comm, count, dtype):
    """The reducer 'shared-memory' gives for a flat array of `count` entries."""
    reducer, _ = choose_reducer(comm, "shared-memory", None, [count], 0, dtype)
    assert reducer.name == ("hierarchical" if reducer.cross.size > 1 else "shared-memory")
    return reducer


def node_groups(reducer, comm):
    """The world ranks of each node, nodes in the order of their first rank."""
    first = reducer.node.allgather(np.array([comm.rank]))[0, 0]  # this node's first world rank
    firsts = comm.allgather(np.array([first]))[:, 0]
    return [[r for r in range(comm.size) if firsts[r] == f] for f in sorted(set(firsts.tolist()))]


def contributions(comm, count, dtype, step):
    """Every rank's array for this step, (size, count): each rank can compute all of them."""
    return np.stack([np.random.default_rng([r, step, count]).standard_normal(count).astype(dtype)
                     for r in range(comm.size)])


def in_rank_order(parts):
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


def assert_is_the_sum(result, parts, groups, plus=0.0):
    """result == each node's sum in rank order, summed over the nodes (+ plus): bit for bit
    with one or two nodes (a sum of two terms has one order), to rounding beyond (MPI orders
    the sum across nodes its own way)."""
    expected = in_rank_order([in_rank_order(parts[g]) for g in groups]) + plus
    if len(groups) <= 2:
        assert np.array_equal(result, expected)
    else:
        bound = 4 * np.finfo(parts.dtype).eps * np.abs(parts).sum(axis=0).max()
        assert np.abs(result - expected).max() <= bound


@pytest.mark.parametrize("count", [1, 5, 1001, 100_003])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_is_exact_and_identical_on_every_rank(comm, count, dtype):
    reducer = shared_reducer(comm, count, dtype)
    groups = node_groups(reducer, comm)
    for step in range(3):  # reuse: a rank must never read a segment another is rewriting
        parts = contributions(comm, count, dtype, step)
        reducer.send[...] = parts[comm.rank]
        result = reducer.reduce()
        assert result.dtype == dtype and result.shape == (count,)
        assert_is_the_sum(result, parts, groups)
    everyone = comm.allgather(np.array(result))
    assert all(np.array_equal(everyone[0], other) for other in everyone)
    with pytest.raises(ValueError, match="read-only"):
        result[0] = 1  # shared by the ranks of the node: writing would change everyone's
    reducer.close()


@pytest.mark.parametrize("count", [4099, 300_007])  # one piece per rank; many
def test_finish_changes_each_entry_once(comm, count):
    reducer = shared_reducer(comm, count, np.float64)
    groups = node_groups(reducer, comm)
    parts = contributions(comm, count, np.float64, 0)
    reducer.send[...] = parts[comm.rank]
    pieces = []

    def finish(result, lo, hi):
        pieces.append((lo, hi))
        result[lo:hi] += 1.0

    result = reducer.reduce(finish)
    assert_is_the_sum(result, parts, groups, plus=1.0)
    mine = np.array(pieces).reshape(-1)
    assert np.all(np.diff(mine) >= 0) and np.array_equal(mine[1:-1:2], mine[2::2])  # in order, no gaps
    owned = comm.allgather(np.array([mine[0], mine[-1]]))  # each node's ranks' slices tile the array
    for group in groups:
        assert owned[group[0]][0] == 0 and owned[group[-1]][1] == count
        assert all(owned[r][1] == owned[s][0] for r, s in zip(group, group[1:]))
    reducer.close()


@pytest.mark.mpi(min_size=4)
def test_hierarchical_sum_over_two_nodes(comm, monkeypatch):
    """Ranks split into two 'nodes' of size/2: a node-local sum, then an Allreduce per slice
    across nodes; equal to the rank-order sum to rounding and bit-identical on all ranks."""
    count = 10_007
    monkeypatch.setenv(RANKS_PER_NODE_ENV, str(comm.size // 2))
    reducer = shared_reducer(comm, count, np.float64)
    assert reducer.name == "hierarchical" and reducer.cross.size == 2 and reducer.node.size == comm.size // 2
    parts = contributions(comm, count, np.float64, 0)
    reducer.send[...] = parts[comm.rank]
    result = reducer.reduce()
    expected = in_rank_order(parts)
    assert np.abs(result - expected).max() <= 1e-13 * np.abs(expected).max()
    everyone = comm.allgather(np.array(result))
    assert all(np.array_equal(everyone[0], other) for other in everyone)
    reducer.close()


@pytest.mark.mpi(min_size=3)
def test_uneven_nodes_are_refused_on_every_rank(comm, monkeypatch):
    node, cross = comm.split_by_node()
    hosts = cross.size
    node.free()
    cross.free()
    if hosts > 1:
        pytest.skip("the job spans several hosts: uneven nodes cannot be pretended (the cluster tests run 3+1 hosts)")
    monkeypatch.setenv(RANKS_PER_NODE_ENV, str(comm.size - 1))  # nodes of size-1 and 1 ranks
    reducer, why_not = choose_reducer(comm, "auto", None, [10], 0, np.float32)
    assert reducer.name == "allreduce"
    assert why_not == f"nodes hold different numbers of ranks (1 to {comm.size - 1})"
    with pytest.raises(RuntimeError, match="nodes hold different numbers of ranks"):
        choose_reducer(comm, "shared-memory", None, [10], 0, np.float32)


def test_data_parallel_uses_shared_memory_by_default(comm):
    """Under mpirun DataParallel sums through shared memory unless buckets or 'allreduce'
    are asked for; its gradients are then read-only."""
    from tests import parallel_cases as cases
    from dpnet.parallel import DataParallel
    dp = DataParallel(cases.make_model("threelayer"), comm)
    assert dp.reduction == ("hierarchical" if dp.reducer.cross.size > 1 else "shared-memory"), dp.why_not_shared_memory
    X, y = cases.make_batch(8)
    _, grads = dp.loss(X[comm.rank::comm.size], y[comm.rank::comm.size])
    with pytest.raises(ValueError, match="read-only"):
        grads["W1"] *= 2
    dp.close()
    assert DataParallel(cases.make_model("threelayer"), comm, reduction="allreduce").reduction == "allreduce"
    dp = DataParallel(cases.make_model("threelayer"), comm, bucket_bytes=256)
    assert dp.reduction == "buckets" and len(dp.reducer.buckets) > 1 and dp.reducer.overlapped
    dp.close()
    with pytest.raises(ValueError, match="bucket_bytes applies to reduction 'allreduce' only"):
        DataParallel(cases.make_model("threelayer"), comm, bucket_bytes=256, reduction="shared-memory")


@pytest.mark.parametrize("length", [3, 1001])  # shorter than the ranks' slices; all of count
def test_shared_array_is_one_array_per_node(comm, length):
    reducer = shared_reducer(comm, 1001, np.float32)
    fill = np.arange(length, dtype=np.float32)
    array = reducer.shared_array(length, fill=fill)  # each rank copies only its own slice
    reducer.node.fence()
    assert np.array_equal(array, fill)
    reducer.node.fence()  # everyone has looked before the node's first rank writes
    node = next(i for i, group in enumerate(node_groups(reducer, comm)) if comm.rank in group)
    if reducer.node.rank == 0:
        array[0] = -1 - node
    reducer.node.fence()
    assert array[0] == -1 - node  # written by the node's first rank, seen by every rank of its node
    with pytest.raises(ValueError, match="at most 1001 elements"):
        reducer.shared_array(1002)
    reducer.close()


@pytest.mark.parametrize("rule", ["sgd", "sgd_momentum", "sgd_nesterov_momentum", "rmsprop", "adam"])
def test_sharded_update_equals_the_full_update(comm, rule):
    """With shared memory each rank updates only its slice of the node's one copy of the
    parameters and optimizer state; after 3 steps both equal those of every rank
    updating everything (reduction 'allreduce'), on every rank, also after close()."""
    from tests import parallel_cases as cases
    from dpnet.optim import UPDATE_RULES
    from dpnet.parallel import DataParallel
    results = {}
    for reduction in ("shared-memory", "allreduce"):
        dp = DataParallel(cases.make_model("threelayer"), comm, reduction=reduction)
        config = {"learning_rate": 1e-2}
        for step in range(3):
            X, y = cases.make_batch(10, seed=step)
            dp.loss(X[comm.rank::comm.size], y[comm.rank::comm.size])
            dp.step(UPDATE_RULES[rule], config)
        dp.close()  # shared memory released: parameters and state must have moved out of it
        state = sorted(k for k, v in config.items() if isinstance(v, np.ndarray) and not k.startswith("_"))
        params = np.concatenate([dp.model.params[k].ravel() for k in dp.flat.names])
        results[reduction] = np.concatenate([params] + [config[k] for k in state]), state, config
    (sharded, keys, config), (full, full_keys, _) = results["shared-memory"], results["allreduce"]
    assert keys == full_keys and not any(k.startswith("_") for k in config)  # work arrays stay private
    assert np.abs(sharded - full).max() <= 1e-12 * np.abs(full).max(), rule
    everyone = comm.allgather(sharded)
    assert all(np.array_equal(everyone[0], other) for other in everyone)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("kind", ["threelayer", "convnet"])
def test_data_parallel_over_two_nodes(comm, kind, monkeypatch):
    """DPNET_RANKS_PER_NODE splits this machine into 'nodes' of size/2 ranks: gradients are
    summed on each node, then across nodes; each node keeps its own copy of the parameters.
    The sync-BN gradients and the 5-step Adam trajectory still equal one process's."""
    from tests import parallel_cases as cases
    from dpnet.parallel import DataParallel
    monkeypatch.setenv(RANKS_PER_NODE_ENV, str(comm.size // 2))
    dp = DataParallel(cases.make_model(kind), comm, reduction="shared-memory")
    assert dp.reduction == "hierarchical"
    assert dp.reducer.node.size == comm.size // 2 and dp.reducer.cross.size == 2
    dp.close()
    cases.case_sync_equals_full_batch(comm, kind, "hierarchical")
    params = cases.case_adam_trajectory(comm, kind, "hierarchical")  # bit-identical on all ranks
    cases.case_broadcast_and_drift_check(comm, kind, "hierarchical")
    assert params.size > 0


def test_loss_equals_one_process_when_one_rank_lags(comm):
    """The L2 part of the loss reads the node's shared weights (each rank its own slice);
    it must do so before the sum, while no rank can be updating them. With the last rank
    lagging 0.2 s at that read, every rank's loss still equals one process's, step by step."""
    import time

    from tests import parallel_cases as cases
    from dpnet.flat import FlatParams
    from dpnet.optim import adam
    from dpnet.parallel import DataParallel
    from dpnet.parallel.regularization import SlicedL2

    class LaggingL2(SlicedL2):
        def loss(self, lo, hi):
            if comm.rank == comm.size - 1:
                time.sleep(0.2)
            return super().loss(lo, hi)
    dp = DataParallel(cases.make_model("threelayer"), comm, reduction="shared-memory")
    dp.l2 = LaggingL2(dp.model, dp.flat)
    reference = cases.make_model("threelayer")
    flat = FlatParams(reference.params)
    configs = {"learning_rate": 1e-1}, {"learning_rate": 1e-1}
    for step in range(3):
        X, y = cases.make_batch(10, seed=step)
        loss, _ = dp.loss(X[comm.rank::comm.size], y[comm.rank::comm.size])
        dp.step(adam, configs[0])
        ref_loss, grads = reference.loss(X, y)
        adam(flat.data, flat.pack_grads(grads), configs[1])
        assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss), (step, loss, ref_loss)
    mine, ref = cases.by_name(dp.model.params), cases.by_name(reference.params)
    assert np.abs(mine - ref).max() <= 1e-10 * np.abs(ref).max()
    dp.close()


def test_data_parallel_goes_on_after_close(comm):
    """close() releases the shared memory; the object then sums with Allreduce, and a
    second config dict with the same keys (a reloaded one) is fine before and after."""
    from tests import parallel_cases as cases
    from dpnet.optim import adam
    from dpnet.parallel import DataParallel
    dp = DataParallel(cases.make_model("threelayer"), comm, reduction="shared-memory")
    ref = DataParallel(cases.make_model("threelayer"), comm, reduction="allreduce")
    configs = {id(dp): {"learning_rate": 1e-2}, id(ref): {"learning_rate": 1e-2}}
    for step in range(4):
        X, y = cases.make_batch(10, seed=step)
        for each in (dp, ref):
            each.loss(X[comm.rank::comm.size], y[comm.rank::comm.size])
            each.step(adam, configs[id(each)])
        if step == 1:
            configs[id(dp)] = {k: np.array(v) if isinstance(v, np.ndarray) else v
                               for k, v in configs[id(dp)].items()}  # same keys, new dict
        if step == 2:
            dp.close()
            assert dp.reduction == "allreduce"
    assert np.abs(dp.flat.data - ref.flat.data).max() <= 1e-12 * np.abs(ref.flat.data).max()
    ref.close()


def test_auto_does_not_share_one_rank_per_node(comm, monkeypatch):
    from tests import parallel_cases as cases
    from dpnet.parallel import DataParallel
    monkeypatch.setenv(RANKS_PER_NODE_ENV, "1")
    dp = DataParallel(cases.make_model("threelayer"), comm)
    assert dp.reduction == "allreduce" and dp.why_not_shared_memory == "one rank per node: nothing to share"
    dp = DataParallel(cases.make_model("threelayer"), comm, reduction="shared-memory")  # still possible
    assert dp.reduction == "hierarchical"
    dp.close()


def test_other_update_rules_run_on_node_rank_0_and_survive_close(comm):
    """A rule dpnet does not know to be elementwise updates the node's parameters on node
    rank 0 alone; after close() every rank holds its state and carries on in step."""
    from tests import parallel_cases as cases
    from dpnet.optim import adam
    from dpnet.parallel import DataParallel

    def my_adam(w, dw, config):  # a user's rule: DataParallel cannot know it is elementwise
        return adam(w, dw, config)
    results = []
    for rule in (my_adam, adam):
        dp = DataParallel(cases.make_model("threelayer"), comm, reduction="shared-memory")
        config = {"learning_rate": 1e-2}
        for step in range(4):
            X, y = cases.make_batch(10, seed=step)
            dp.loss(X[comm.rank::comm.size], y[comm.rank::comm.size])
            dp.step(rule, config)
            if step == 1:
                dp.close()
        assert config["t"] == 4
        results.append(np.array(dp.flat.data))
    everyone = comm.allgather(results[0])
    assert all(np.array_equal(everyone[0], other) for other in everyone)
    assert np.array_equal(results[0], results[1])


def test_a_caught_error_in_loss_does_not_leave_the_watchdog_armed(comm):
    """loss() raising (here: a bad shard, on every rank) must not leave the step guarded:
    a caller that handles the error and waits past the timeout is not aborted."""
    import time

    from tests import parallel_cases as cases
    from dpnet.parallel import DataParallel
    for reduction in ("shared-memory", "allreduce"):
        dp = DataParallel(cases.make_model("threelayer"), comm, reduction=reduction, timeout=1)
        X, y = cases.make_batch(8)
        with pytest.raises(ValueError):
            dp.loss(X[:, :2], y)  # 2 channels where 3 are expected
        time.sleep(2.5)  # the watchdog checks every 0.25 s: armed, it would abort the job now
        dp.loss(X[comm.rank::comm.size], y[comm.rank::comm.size])
        dp.close()
