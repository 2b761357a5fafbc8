"""dpnet.parallel without MPI: sharding index math, SimComm's MPI semantics and its error
reports, SerialComm and get_comm, synchronized batchnorm numerics, and DataParallel's
bookkeeping (running statistics, global batch size, empty batches, drift checks)."""

import sys
import time

import numpy as np
import pytest

from dpnet.layers import (batchnorm_backward, batchnorm_forward, spatial_batchnorm_backward,
                          spatial_batchnorm_forward)
from dpnet.parallel import (DataParallel, ParameterDriftError, SerialComm, SimComm, SimCommError,
                            epoch_permutation, get_comm, launched_by_mpi, shard_bounds,
                            shard_indices, steps_per_epoch)
from dpnet.parallel.comm import LAUNCHER_SIZE_VARIABLES
from tests.parallel_cases import make_batch, make_model

# ================================================================ sharding

SHARD_CASES = [  # (num_examples, batch_size, size)
    (10, 4, 3),   # partial last batch, uneven shards
    (12, 4, 4),   # everything divides
    (7, 3, 4),    # batch < size: empty shards
    (5, 2, 4),    # batch < size, partial last batch of 1
    (1, 1, 3),
    (9, 9, 2),    # one step
    (13, 5, 1),
    (20, 50, 3),  # batch larger than the data set
]


def all_shards(n, batch, size, seed=0, epoch=0):
    """shards[rank][step] for every rank."""
    return [shard_indices(n, batch, r, size, seed, epoch) for r in range(size)]


@pytest.mark.parametrize("n,batch,size", SHARD_CASES)
def test_epoch_covers_every_example_once(n, batch, size):
    shards = all_shards(n, batch, size)
    steps = steps_per_epoch(n, batch)
    assert all(len(per_rank) == steps for per_rank in shards)
    everything = np.concatenate([s for per_rank in shards for s in per_rank])
    assert len(everything) == n  # no duplicates, none dropped
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))
    for step in range(steps):
        sizes = [len(shards[r][step]) for r in range(size)]
        assert max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the extra examples go to the first ranks
        assert sum(sizes) == min(batch, n - step * batch)
    if batch < size:
        assert any(len(s) == 0 for per_rank in shards for s in per_rank)


@pytest.mark.parametrize("n,batch", [(10, 4), (7, 3), (5, 2), (13, 5)])
def test_global_batches_do_not_depend_on_the_number_of_ranks(n, batch):
    order = epoch_permutation(n, seed=7, epoch=2)
    expected = [order[i:i + batch] for i in range(0, n, batch)]
    for size in (1, 2, 3, 4):
        shards = all_shards(n, batch, size, seed=7, epoch=2)
        for step, global_batch in enumerate(expected):
            np.testing.assert_array_equal(np.concatenate([shards[r][step] for r in range(size)]),
                                          global_batch)


def test_epoch_permutation_seeding():
    a = epoch_permutation(50, seed=1, epoch=3)
    np.testing.assert_array_equal(np.sort(a), np.arange(50))
    np.testing.assert_array_equal(a, epoch_permutation(50, seed=1, epoch=3))
    assert not np.array_equal(a, epoch_permutation(50, seed=1, epoch=4))
    assert not np.array_equal(a, epoch_permutation(50, seed=2, epoch=3))
    s1 = shard_indices(50, 8, 1, 3, seed=1, epoch=3)
    s2 = shard_indices(50, 8, 1, 3, seed=1, epoch=3)
    s3 = shard_indices(50, 8, 1, 3, seed=1, epoch=4)
    assert all(np.array_equal(x, y) for x, y in zip(s1, s2))
    assert not all(np.array_equal(x, y) for x, y in zip(s1, s3))


@pytest.mark.parametrize("batch_len,size,expected", [
    (10, 3, [(0, 4), (4, 7), (7, 10)]),
    (2, 4, [(0, 1), (1, 2), (2, 2), (2, 2)]),
    (0, 2, [(0, 0), (0, 0)]),
    (8, 1, [(0, 8)]),
])
def test_shard_bounds_values(batch_len, size, expected):
    assert [shard_bounds(batch_len, size, r) for r in range(size)] == expected


@pytest.mark.parametrize("batch_size", [0, -3])
def test_bad_batch_size_raises(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        shard_indices(10, batch_size, 0, 2, seed=0, epoch=0)


@pytest.mark.parametrize("rank,size", [(2, 2), (-1, 2), (0, 0)])
def test_bad_rank_raises(rank, size):
    with pytest.raises(ValueError, match="rank"):
        shard_bounds(10, size, rank)
    with pytest.raises(ValueError, match="rank"):
        shard_indices(10, 4, rank, size, seed=0, epoch=0)


# ================================================================ SimComm

def do_allreduce(comm, x):
    return comm.allreduce(x)


def do_allgather(comm, x):
    return comm.allgather(x)


def site(fn):
    """The 'file:line' SimComm reports for a collective made on fn's first body line."""
    return f"test_parallel_units.py:{fn.__code__.co_firstlineno + 1}"


def test_collectives_have_mpi_semantics():
    def fn(comm):
        r = comm.rank
        x = np.array([r + 1.0, -r, 2.0 * r])
        out = {}
        for op in ("sum", "min", "max"):
            a = x.copy()
            res = comm.allreduce(a, op=op)
            assert res is a  # in place
            out[op] = a
        out["gather"] = comm.allgather(x)
        b = np.full(2, float(r))
        assert comm.bcast(b, root=1) is b
        out["bcast"] = b
        out["obj"] = comm.bcast_obj({"from": r, "list": [r]} if r == 2 else None, root=2)
        comm.barrier()
        out["rank"], out["size"] = comm.rank, comm.size
        return out

    results = SimComm(3).run(fn)
    for r, out in enumerate(results):
        assert (out["rank"], out["size"]) == (r, 3)
        np.testing.assert_array_equal(out["sum"], [6.0, -3.0, 6.0])
        np.testing.assert_array_equal(out["min"], [1.0, -2.0, 0.0])
        np.testing.assert_array_equal(out["max"], [3.0, 0.0, 4.0])
        np.testing.assert_array_equal(out["gather"], [[1, 0, 0], [2, -1, 2], [3, -2, 4]])
        np.testing.assert_array_equal(out["bcast"], [1.0, 1.0])
        assert out["obj"] == {"from": 2, "list": [2]}
    assert results[0]["obj"] is not results[1]["obj"]  # every rank gets its own copy


def test_results_in_rank_order():
    def fn(comm):
        time.sleep(0.02 * (comm.size - comm.rank))  # later ranks finish first
        return comm.rank * 10

    assert SimComm(4).run(fn) == [0, 10, 20, 30]


def test_invalid_op_raises():
    with pytest.raises(ValueError, match="op"):
        SimComm(2).run(lambda comm: comm.allreduce(np.zeros(2), op="prod"))


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_size_raises(size):
    with pytest.raises(ValueError, match="size"):
        SimComm(size)


def test_mismatched_collective_names_every_rank_and_call_site():
    def fn(comm):
        x = np.zeros(3)
        try:
            if comm.rank == 1:
                do_allgather(comm, x)
            else:
                do_allreduce(comm, x)
        except SimCommError as exc:
            return str(exc)
        return None

    messages = SimComm(3).run(fn)
    assert all(m is not None for m in messages)  # detected on every rank
    msg = messages[0]
    assert msg.startswith("mismatched collectives")
    for r in range(3):
        kind, fn_ = ("allgather", do_allgather) if r == 1 else ("allreduce", do_allreduce)
        assert f"rank {r}: {kind}(" in msg, msg
        assert site(fn_) in msg, msg
    with pytest.raises(SimCommError, match="mismatched"):  # and run() raises it
        SimComm(3).run(lambda comm: do_allgather(comm, np.zeros(1)) if comm.rank == 1
                       else do_allreduce(comm, np.zeros(1)))


@pytest.mark.parametrize("what", ["shape", "dtype", "root"])
def test_mismatched_details_of_the_same_collective(what):
    def fn(comm):
        if what == "shape":
            comm.allreduce(np.zeros(2 + comm.rank))
        elif what == "dtype":
            comm.allreduce(np.zeros(2, dtype=np.float32 if comm.rank else np.float64))
        else:
            comm.bcast(np.zeros(2), root=comm.rank)

    with pytest.raises(SimCommError) as info:
        SimComm(2).run(fn)
    msg = str(info.value)
    expected = {"shape": ("shape=(2,)", "shape=(3,)"), "dtype": ("dtype=float64", "dtype=float32"),
                "root": ("root=0", "root=1")}[what]
    assert all(e in msg for e in expected), msg


def test_missing_collective_names_the_finished_rank():
    def fn(comm):
        if comm.rank == 2:
            return "skipped"
        time.sleep(0.05 * comm.rank)
        do_allreduce(comm, np.zeros(2))

    start = time.monotonic()
    with pytest.raises(SimCommError) as info:
        SimComm(3, timeout=30).run(fn)
    assert time.monotonic() - start < 10  # detected at once, not by the timeout
    msg = str(info.value)
    assert "[2]" in msg and "finished" in msg, msg
    assert site(do_allreduce) in msg, msg


def test_hang_times_out_naming_the_absent_rank():
    def fn(comm):
        if comm.rank == 1:
            time.sleep(0.8)
        do_allreduce(comm, np.zeros(2))

    start = time.monotonic()
    with pytest.raises(SimCommError) as info:
        SimComm(2, timeout=0.3).run(fn)
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "timed out" in msg and "rank(s) [1] never arrived" in msg, msg
    assert f"rank 0 in allreduce at {site(do_allreduce)}" in msg, msg


def test_own_exception_is_reraised_as_itself():
    raised = []

    def fn(comm):
        if comm.rank == 1:
            exc = KeyError("boom")
            raised.append(exc)
            raise exc
        do_allreduce(comm, np.zeros(2))

    with pytest.raises(KeyError) as info:
        SimComm(3, timeout=30).run(fn)
    assert info.value is raised[0]
    assert not isinstance(info.value, SimCommError)


def test_a_clean_run_after_a_failed_one():
    """Every run() is a fresh world: a failure does not leak into the next job."""
    with pytest.raises(SimCommError):
        SimComm(2).run(lambda comm: do_allreduce(comm, np.zeros(comm.rank + 1)))
    out = SimComm(2).run(lambda comm: do_allreduce(comm, np.ones(2)))
    np.testing.assert_array_equal(out[0], [2.0, 2.0])


# ================================================================ SerialComm and get_comm

def test_serial_comm_identities():
    comm = SerialComm()
    assert (comm.rank, comm.size) == (0, 1)
    x = np.array([1.0, -2.0, 3.0])
    for op in ("sum", "min", "max"):
        assert comm.allreduce(x, op=op) is x
    np.testing.assert_array_equal(x, [1.0, -2.0, 3.0])
    with pytest.raises(ValueError, match="op"):
        comm.allreduce(x, op="prod")
    gathered = comm.allgather(x)
    assert gathered.shape == (1, 3) and not np.shares_memory(gathered, x)
    np.testing.assert_array_equal(gathered[0], x)
    assert comm.bcast(x) is x
    obj = {"a": 1}
    assert comm.bcast_obj(obj) is obj
    comm.barrier()


LAUNCHER_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def clear_launcher_env(monkeypatch):
    for name in set(LAUNCHER_VARIABLES) | set(LAUNCHER_SIZE_VARIABLES):
        monkeypatch.delenv(name, raising=False)


def test_get_comm_without_launcher_is_serial(monkeypatch):
    clear_launcher_env(monkeypatch)
    assert not launched_by_mpi()
    assert isinstance(get_comm(), SerialComm)


@pytest.mark.parametrize("name", LAUNCHER_VARIABLES)
def test_launched_by_mpi(name):
    assert launched_by_mpi({name: "4"})
    assert not launched_by_mpi({})
    assert not launched_by_mpi({"HOME": "/root", "PATH": "/usr/bin"})


def test_get_comm_without_mpi4py_explains_the_install(monkeypatch):
    clear_launcher_env(monkeypatch)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` fail
    with pytest.raises(ImportError, match="pip install mpi4py"):
        get_comm()


# ================================================================ synchronized batchnorm

BN_VARIANTS = {
    "spatial": (spatial_batchnorm_forward, spatial_batchnorm_backward, (2, 3), (0, 2, 3)),
    "plain": (batchnorm_forward, batchnorm_backward, (), (0,)),
}


def bn_data(n, variant, dtype=np.float64, seed=0, mean=(3.0, -2.0, 10.0), std=(2.0, 0.5, 4.0)):
    """(x, gamma, beta, dout) with 3 channels of the given per-channel mean and std."""
    _, _, spatial, _ = BN_VARIANTS[variant]
    rng = np.random.default_rng(seed)
    shape = (n, 3) + spatial
    bshape = (1, 3) + (1,) * len(spatial)
    x = np.reshape(mean, bshape) + np.reshape(std, bshape) * rng.standard_normal(shape)
    gamma, beta = rng.uniform(0.5, 2.0, 3), rng.standard_normal(3)
    dout = rng.standard_normal(shape)
    return (x.astype(dtype), gamma.astype(dtype), beta.astype(dtype), dout.astype(dtype))


def bn_step(variant, comm, x, gamma, beta, dout, momentum=0.9):
    """Forward and backward of one train step; returns (out, dx, dgamma, dbeta, bn_param)."""
    forward, backward, _, _ = BN_VARIANTS[variant]
    bn_param = {"mode": "train", "momentum": momentum}
    out, cache = forward(x, gamma, beta, bn_param, comm)
    dx, dgamma, dbeta = backward(dout, cache)
    return out, dx, dgamma, dbeta, bn_param


def bn_shards(comm, variant, data, sizes, momentum=0.9):
    """Rank r steps on its slice of the whole batch (and of dout), per `sizes`."""
    x, gamma, beta, dout = data
    lo = sum(sizes[:comm.rank])
    sl = slice(lo, lo + sizes[comm.rank])
    return bn_step(variant, comm, x[sl], gamma, beta, dout[sl], momentum)


def test_sync_batchnorm_float32_large_mean_variance():
    """float32 inputs with mean 1e3 and std 1 over uneven shards: the merged variance is the
    whole batch's to 1% and the outputs have unit std (a one-pass E[x^2] - E[x]^2 in float32
    would lose most of the variance)."""
    sizes = (5, 1, 3, 7)
    x, gamma, beta, dout = bn_data(sum(sizes), "spatial", np.float32, mean=(1e3,) * 3, std=(1.0,) * 3)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    results = SimComm(4).run(bn_shards, "spatial", (x, gamma, beta, dout), sizes, 0.0)
    x64 = x.astype(np.float64)
    for out, _, _, _, bn_param in results:
        assert bn_param["running_var"].dtype == np.float32
        np.testing.assert_allclose(bn_param["running_var"], x64.var(axis=(0, 2, 3)), rtol=0.01)
        np.testing.assert_allclose(bn_param["running_mean"], x64.mean(axis=(0, 2, 3)), rtol=1e-6)
        np.testing.assert_array_equal(bn_param["running_var"], results[0][4]["running_var"])
    out = np.concatenate([r[0] for r in results]).astype(np.float64)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1.0, rtol=0.01)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0.0, atol=0.01)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("variant", sorted(BN_VARIANTS))
@pytest.mark.parametrize("comm_kind", ["simcomm1", "serial"])
def test_sync_batchnorm_one_rank_is_the_serial_layer(comm_kind, variant, dtype):
    data = bn_data(6, variant, dtype)
    ref = bn_step(variant, None, *data)
    if comm_kind == "serial":
        got = bn_step(variant, SerialComm(), *data)
    else:
        got = SimComm(1).run(lambda comm: bn_step(variant, comm, *data))[0]
    for a, b in zip(ref[:4], got[:4]):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(a, b)
    for key in ("running_mean", "running_var"):
        np.testing.assert_array_equal(ref[4][key], got[4][key])


@pytest.mark.parametrize("variant", sorted(BN_VARIANTS))
def test_sync_batchnorm_uneven_and_empty_shards_equal_the_whole_batch(variant):
    sizes = (4, 0, 2)
    data = bn_data(sum(sizes), variant)
    x, gamma, beta, dout = data
    axes = BN_VARIANTS[variant][3]
    ref_out, ref_dx, ref_dgamma, ref_dbeta, ref_param = bn_step(variant, None, *data)
    results = SimComm(3).run(bn_shards, variant, data, sizes)
    out = np.concatenate([r[0] for r in results])
    dx = np.concatenate([r[1] for r in results])
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-12, atol=1e-12)
    # parameter gradients are each rank's shard sums; their sum is the whole batch's
    bshape = (1, 3) + (1,) * (x.ndim - 2)
    x_hat = (x - x.mean(axis=axes).reshape(bshape)) / np.sqrt(x.var(axis=axes) + 1e-5).reshape(bshape)
    lo = 0
    for size, (_, dx_r, dgamma_r, dbeta_r, _) in zip(sizes, results):
        sl = slice(lo, lo + size)
        lo += size
        assert dx_r.shape == (size,) + x.shape[1:]
        np.testing.assert_allclose(dbeta_r, dout[sl].sum(axis=axes), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dgamma_r, (dout[sl] * x_hat[sl]).sum(axis=axes), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sum(r[2] for r in results), ref_dgamma, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sum(r[3] for r in results), ref_dbeta, rtol=1e-12, atol=1e-12)
    assert np.all(results[1][2] == 0) and np.all(results[1][3] == 0)
    # every rank, the empty one included, holds the whole batch's running statistics
    for r in results:
        for key in ("running_mean", "running_var"):
            np.testing.assert_array_equal(r[4][key], results[0][4][key])
            np.testing.assert_allclose(r[4][key], ref_param[key], rtol=1e-12)
    # control: rank 0's shard normalised on its own is not the whole batch's normalisation
    local = bn_step(variant, None, x[:4], gamma, beta, dout[:4])
    assert np.max(np.abs(local[0] - ref_out[:4])) > 1e-3


# ================================================================ DataParallel

def running_stats(model):
    return np.concatenate([bn[k] for bn in model.bn_params for k in ("running_mean", "running_var")])


def test_average_running_stats_local_mode():
    def fn(comm):
        model = make_model("threelayer", "local")
        dp = DataParallel(model, comm)
        X, y = make_batch(4, seed=10 + comm.rank)  # every rank sees different data
        dp.loss(X, y)
        before = comm.allgather(running_stats(model))
        dp.average_running_stats()
        return before, running_stats(model)

    results = SimComm(2).run(fn)
    before = results[0][0]
    assert not np.allclose(before[0], before[1])  # control: the ranks' statistics differ
    for _, after in results:
        np.testing.assert_allclose(after, before.mean(axis=0), rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_average_running_stats_leaves_sync_mode_untouched():
    def fn(comm):
        model = make_model("threelayer", "sync")
        dp = DataParallel(model, comm)
        X, y = make_batch(4, seed=10 + comm.rank)
        dp.loss(X, y)
        if comm.rank == 1:  # a visible difference the method must not average away
            model.bn_params[0]["running_mean"] += 1.0
        before = running_stats(model)
        dp.average_running_stats()
        return before, running_stats(model)

    for before, after in SimComm(2).run(fn):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("size", [2, 3])
def test_loss_with_global_batch_size_equals_loss_without(size):
    n = 10

    def fn(comm):
        model = make_model("threelayer", "sync")
        dp = DataParallel(model, comm)
        X, y = make_batch(n)
        lo, hi = shard_bounds(n, comm.size, comm.rank)
        loss1, grads = dp.loss(X[lo:hi], y[lo:hi])
        grads1 = {k: v.copy() for k, v in grads.items()}
        loss2, grads2 = dp.loss(X[lo:hi], y[lo:hi], global_batch_size=n)
        same = loss1 == loss2 and all(np.array_equal(grads1[k], grads2[k]) for k in grads1)
        loss3, _ = dp.loss(X[lo:hi], y[lo:hi], global_batch_size=2 * n)  # control
        return same, loss1, loss3

    X, y = make_batch(n)
    ref_loss, _ = make_model("threelayer", "sync").loss(X, y)
    for same, loss1, loss3 in SimComm(size).run(fn):
        assert same
        assert loss1 == pytest.approx(ref_loss, rel=1e-12)
        assert abs(loss3 - loss1) > 0.1


@pytest.mark.parametrize("global_batch_size", [None, 0])
def test_every_rank_empty_raises(global_batch_size):
    def fn(comm):
        dp = DataParallel(make_model("threelayer", "sync"), comm)
        dp.loss(np.zeros((0, 3, 8, 8)), np.zeros(0, dtype=int), global_batch_size=global_batch_size)

    with pytest.raises(ValueError, match="empty"):
        SimComm(2).run(fn)


def test_one_empty_rank_is_fine():
    def fn(comm):
        dp = DataParallel(make_model("threelayer", "sync"), comm)
        X, y = make_batch(3)
        return dp.loss(X, y)[0] if comm.rank == 0 else dp.loss(X[:0], y[:0])[0]

    losses = SimComm(2).run(fn)
    assert losses[0] == losses[1]


def test_drift_check_names_the_step_and_rank():
    def fn(comm, perturb):
        model = make_model("threelayer", "sync")
        # private copies per rank: with shared memory a node's ranks hold one, which cannot drift
        dp = DataParallel(model, comm, check_every=1, reduction="allreduce")
        X, y = make_batch(6)
        lo, hi = shard_bounds(6, comm.size, comm.rank)
        dp.loss(X[lo:hi], y[lo:hi])  # step 1: consistent
        if perturb and comm.rank == 1:
            w = model.params["W2"].reshape(-1)
            w[3] = np.nextafter(w[3], np.inf)  # one ulp
        dp.loss(X[lo:hi], y[lo:hi])  # step 2
        return dp.steps

    assert SimComm(2).run(fn, False) == [2, 2]  # control: no perturbation, no error
    with pytest.raises(ParameterDriftError) as info:
        SimComm(2).run(fn, True)
    msg = str(info.value)
    assert "step 2" in msg and "[1]" in msg, msg


# ---------------------------------------------------------------- gradient buckets

@pytest.mark.parametrize("bucket_bytes", [1, 256, 4096, 1 << 30])
def test_buckets_tile_the_flat_buffer_in_backward_order(bucket_bytes):
    from dpnet.parallel import DataParallel, SerialComm
    model = make_model("convnet", "sync")
    dp = DataParallel(model, SerialComm(), bucket_bytes=bucket_bytes)
    assert dp.flat.names == model.backward_order()
    starts, stops = zip(*dp.reducer.buckets)
    assert starts[0] == 0 and stops[-1] == len(dp.flat.buffer)  # last bucket carries the tail
    assert starts[1:] == stops[:-1]  # contiguous, no gaps or overlaps
    ends = {dp.flat.offsets[n] + dp.flat.sizes[n] for n in dp.flat.names}
    assert set(stops[:-1]) <= ends  # buckets end where parameters end
    itemsize = dp.flat.data.itemsize
    assert all((stop - start) * itemsize >= bucket_bytes for start, stop in dp.reducer.buckets[:-1])
    expected = {1: len(dp.flat.names), 1 << 30: 1}  # one bucket per parameter; one in all
    assert len(dp.reducer.buckets) == expected.get(bucket_bytes, len(dp.reducer.buckets))
    assert not dp.reducer.overlapped  # one rank: nothing to overlap


def test_default_is_one_allreduce_after_backward():
    from dpnet.parallel import AllreduceReducer, DataParallel, SerialComm
    dp = DataParallel(make_model("convnet", "sync"), SerialComm())
    assert type(dp.reducer) is AllreduceReducer and dp.reduction == "allreduce"


def test_backward_order_puts_the_last_layer_first():
    model = make_model("threelayer", "sync")
    assert model.backward_order() == ["W3", "b3", "W2", "b2", "gamma2", "beta2", "W1", "b1", "gamma1", "beta1"]


def test_a_gradient_stored_twice_is_an_error_not_a_skipped_bucket():
    """Model._backward, the hook a model subclass implements, must store each gradient once."""
    from dpnet.models import ThreeLayerConvNet
    from dpnet.parallel import DataParallel, SerialComm

    class StoresW3Twice(ThreeLayerConvNet):
        def _backward(self, dscores, caches, grads):
            super()._backward(dscores, caches, grads)
            grads["W3"] = grads["W3"]  # stored again: the bucket counts would be off

    X, y = make_batch(4)
    for model_class, fails in ((StoresW3Twice, True), (ThreeLayerConvNet, False)):  # control: the real one
        model = model_class(input_dim=(3, 8, 8), num_filters=4, filter_size=3, hidden_dim=6,
                            use_batchnorm=True, bn_mode="sync")
        dp = DataParallel(model, SerialComm(), bucket_bytes=256)
        if fails:
            with pytest.raises(RuntimeError, match="each must be stored once"):
                dp.loss(X, y)
        else:
            dp.loss(X, y)


# ---------------------------------------------------------------- choosing the reduction

def test_reduction_choice(monkeypatch):
    """'auto' shares memory where every node holds the same number (> 1) of ranks, across
    nodes hierarchically; 'shared-memory' where nodes are uneven is an error that says why."""
    from dpnet.parallel import DataParallel, ReducerUnavailable, SerialComm, SimComm
    from dpnet.parallel.comm import RANKS_PER_NODE_ENV

    def chosen(size, **options):
        return SimComm(size).run(lambda c: (DataParallel(make_model("threelayer"), c, **options).reduction,
                                            DataParallel(make_model("threelayer"), c, **options).why_not_shared_memory))

    dp = DataParallel(make_model("threelayer", "sync"), SerialComm(), reduction="shared-memory")
    assert dp.reduction == "allreduce"  # one rank: nothing to sum
    assert chosen(2) == [("shared-memory", None)] * 2
    assert chosen(2, bucket_bytes=256) == [("buckets", None)] * 2
    assert chosen(2, reduction="allreduce") == [("allreduce", None)] * 2
    monkeypatch.setenv(RANKS_PER_NODE_ENV, "2")
    assert chosen(4) == [("hierarchical", None)] * 4
    uneven = "nodes hold different numbers of ranks (1 to 2)"
    assert chosen(3) == [("allreduce", uneven)] * 3
    with pytest.raises(ReducerUnavailable, match=r"'shared-memory' is unavailable: nodes hold different numbers"):
        chosen(3, reduction="shared-memory")
    monkeypatch.setenv(RANKS_PER_NODE_ENV, "1")
    assert chosen(2) == [("allreduce", "one rank per node: nothing to share")] * 2
    assert chosen(2, reduction="shared-memory") == [("hierarchical", None)] * 2  # still possible
    with pytest.raises(ValueError, match="reduction must be one of"):
        DataParallel(make_model("threelayer"), SerialComm(), reduction="nccl")
    with pytest.raises(ValueError, match="bucket_bytes applies to reduction 'allreduce' only"):
        DataParallel(make_model("threelayer"), SerialComm(), reduction="shared-memory", bucket_bytes=256)


def test_regularized_slices_add_l2_once_per_entry():
    """The shared-memory path adds reg * W slice by slice; the slices of any tiling give
    exactly add_regularization's gradients."""
    from dpnet.parallel import DataParallel, SerialComm
    from dpnet.parallel.regularization import SlicedL2
    model = make_model("threelayer", "sync")
    dp = DataParallel(model, SerialComm())
    l2 = SlicedL2(model, dp.flat)
    rng = np.random.default_rng(0)
    grad = rng.standard_normal(len(dp.flat.buffer))
    expected = {name: dp.flat.view(grad, name).copy() for name in dp.flat.names}
    model.add_regularization(expected)
    before = grad.copy()
    cuts = [0, 1, 7, 100, len(grad) // 2, len(grad) - 1, len(grad)]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        l2.add_gradient(grad, lo, hi)
    for name in dp.flat.names:
        assert np.array_equal(dp.flat.view(grad, name), expected[name]), name
    assert model.reg > 0 and all(not np.array_equal(dp.flat.view(before, n), expected[n])
                                 for n in model.weight_names())  # control: L2 changes every weight


# ---------------------------------------------------------------- update rules and close()

def out_of_place_sgd(w, dw, config=None):
    """The homework starter code's sgd: returns a new next_w and leaves w untouched."""
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    return w - config["learning_rate"] * dw, config


def elementwise_out_of_place_sgd(w, dw, config=None):
    return out_of_place_sgd(w, dw, config)


elementwise_out_of_place_sgd.elementwise = True


@pytest.mark.parametrize("path", ["allreduce", "buckets", "shared-memory", "hierarchical"])
@pytest.mark.parametrize("rule", [out_of_place_sgd, elementwise_out_of_place_sgd])
def test_step_uses_what_an_out_of_place_rule_returns(path, rule):
    """DataParallel.step honours the homework's contract next_w, config = rule(w, dw, config):
    a rule that returns a new array moves the model exactly as dpnet's in-place sgd does."""
    from dpnet.optim import sgd
    from tests.parallel_cases import make_dp, sim

    def fn(comm, update_rule):
        dp = make_dp(make_model("threelayer"), comm, path)
        config = {"learning_rate": 1e-1}
        for step in range(3):
            X, y = make_batch(8, seed=step)
            lo, hi = shard_bounds(8, comm.size, comm.rank)
            dp.loss(X[lo:hi], y[lo:hi])
            dp.step(update_rule, config)
        params = np.array(dp.flat.data)
        dp.close()
        return params

    start = np.array(DataParallel(make_model("threelayer"), SerialComm()).flat.data)
    moved = sim(2, path).run(fn, rule)
    expected = sim(2, path).run(fn, sgd)
    assert not np.array_equal(expected[0], start)  # control: the model moves
    assert all(np.array_equal(m, expected[0]) for m in moved + expected)


def test_close_stops_the_bucket_worker_thread():
    """close() ends the worker thread that reduces buckets (and frees its communicator)."""
    import threading

    def workers():
        return sum(t.name == "dpnet-allreduce" and t.is_alive() for t in threading.enumerate())

    def fn(comm):
        dp = DataParallel(make_model("threelayer"), comm, bucket_bytes=256)
        overlapped = dp.reducer.overlapped
        X, y = make_batch(6)
        lo, hi = shard_bounds(6, comm.size, comm.rank)
        dp.loss(X[lo:hi], y[lo:hi])
        comm.barrier()  # every rank's worker has started
        running = workers()
        comm.barrier()  # every rank has counted before any closes
        dp.close()
        loss, _ = dp.loss(X[lo:hi], y[lo:hi])  # still usable: one Allreduce after backward
        return overlapped, running, loss

    before = workers()
    results = SimComm(2).run(fn)
    assert all(overlapped and running == before + 2 for overlapped, running, _ in results)
    assert workers() == before
    assert results[0][2] == results[1][2]


@pytest.mark.parametrize("reduction,per_node", [("allreduce", None), ("shared-memory", None), ("shared-memory", 2),
                                                ("shared-memory", 1)])
@pytest.mark.parametrize("count", [1, 1001, 100_003])
def test_every_reducer_sums_in_rank_order_in_process(reduction, per_node, count):
    """Under SimComm each reducer (shared memory and hierarchical included) gives exactly the
    rank-order sum (per node, then across nodes) on every rank, as under mpirun (tests/mpi/test_shared_memory_mpi.py), and
    its finish() calls cover each entry once across the ranks."""
    from dpnet.parallel import choose_reducer

    def parts(size):
        return [np.random.default_rng([r, count]).standard_normal(count).astype(np.float32) for r in range(size)]

    def fn(comm):
        reducer, _ = choose_reducer(comm, reduction, None, [count], 0, np.float32)
        reducer.send[...] = parts(comm.size)[comm.rank]
        pieces = []
        result = reducer.reduce(lambda out, lo, hi: pieces.append((lo, hi)))
        total = np.array(result)
        reducer.close()
        return reducer.name, total, pieces

    def in_order(arrays):
        total = arrays[0].copy()
        for array in arrays[1:]:
            total += array
        return total

    results = SimComm(4, ranks_per_node=per_node).run(fn)
    size = per_node or 4  # hierarchical: each node's sum in rank order, then the nodes' sums in node order
    expected = in_order([in_order(parts(4)[i:i + size]) for i in range(0, 4, size)])
    name = {("allreduce", None): "allreduce", ("shared-memory", None): "shared-memory"}.get(
        (reduction, per_node), "hierarchical")
    assert all(r[0] == name and np.array_equal(r[1], expected) for r in results)
    owners = 1 if reduction == "allreduce" else per_node or 4  # ranks that finish disjoint slices of one copy
    covered = sorted(piece for _, _, pieces in results[:owners] for piece in pieces if piece[1] > piece[0])
    assert covered[0][0] == 0 and covered[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
