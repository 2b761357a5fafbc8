"""The multi-rank consistency cases, each a function of a communicator.

They run under SimComm in the serial suite (tests/test_parallel_consistency.py) and
under `mpirun -n 2|4` with pytest-mpi (tests/mpi/). Every rank computes the
one-process reference itself from the same seeded data, so a case needs no
communication beyond what it tests. Each case includes a negative control.
"""

import numpy as np

from dpnet.models import ConvNet, ResNet, ThreeLayerConvNet
from dpnet.optim import adam
from dpnet.parallel import DataParallel, ParameterDriftError, shard_bounds

INPUT = (3, 8, 8)
# Small buckets, so these tiny models' gradients are reduced in many buckets, overlapped with
# backward under MPI, as a large model's are.
BUCKET_BYTES = 256
# DataParallel options of each gradient reducer; every case takes one by name. 'hierarchical'
# is shared memory over nodes of ranks_per_node(path, size) ranks: the test harness makes
# the communicator so (SimComm(ranks_per_node=...), or DPNET_RANKS_PER_NODE under mpirun).
PATHS = {
    "allreduce": {"reduction": "allreduce"},
    "buckets": {"reduction": "allreduce", "bucket_bytes": BUCKET_BYTES},
    "shared-memory": {"reduction": "shared-memory"},
    "hierarchical": {"reduction": "shared-memory"},
}


def ranks_per_node(path, size):
    """The node size the harness sets up for `path` (None: every rank on one node)."""
    return max(1, size // 2) if path == "hierarchical" else None


def sim(size, path):
    """The SimComm that runs `path` at `size` ranks."""
    from dpnet.parallel import SimComm
    return SimComm(size, ranks_per_node=ranks_per_node(path, size))


def make_dp(model, comm, path, **options):
    """DataParallel over `path`'s reducer, checked to be that reducer."""
    dp = DataParallel(model, comm, **PATHS[path], **options)
    expected = path if comm.size > 1 or path == "buckets" else "allreduce"  # one rank: nothing to share
    if expected == "shared-memory" and dp.reducer.cross.size > 1:  # the job spans several hosts
        expected = "hierarchical"
    assert dp.reduction == expected, (dp.reduction, path, dp.why_not_shared_memory)
    return dp


def make_model(kind, bn_mode="sync", seed=0, dtype=np.float64):
    if kind == "threelayer":
        return ThreeLayerConvNet(input_dim=INPUT, num_filters=4, filter_size=3, hidden_dim=6,
                                 weight_scale=0.1, reg=0.05, dtype=dtype, use_batchnorm=True,
                                 bn_mode=bn_mode, seed=seed)
    if kind == "resnet":  # ResNet-8: one block per stage, both kinds of shortcut
        return ResNet(depth=8, input_dim=INPUT, widths=(3, 4, 5), reg=0.05, dtype=dtype, bn_mode=bn_mode, seed=seed)
    return ConvNet(input_dim=INPUT, stages=((4,), (5,)), hidden_dims=(6,), reg=0.05, dtype=dtype,
                   bn_mode=bn_mode, seed=seed)


def make_batch(n, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n,) + INPUT) * 2 + 0.5
    return X, rng.integers(0, 10, n)


def grad_errors(grads, ref):
    """Per parameter: max |g - ref| over the scale of ref's largest entry; a bias that feeds a
    batchnorm (true gradient 0, pure rounding noise), or a gradient that is exactly zero, is scaled
    by the largest entry of any gradient."""
    overall = max(np.abs(r).max() for r in ref.values())
    assert overall > 0, "every reference gradient is zero: the comparison would be empty"
    errors = {}
    for name, r in ref.items():
        feeds_bn = name.startswith("b") and f"gamma{name[1:]}" in ref
        own = np.abs(r).max()
        scale = overall if feeds_bn or own == 0 else own
        errors[name] = float(np.abs(grads[name] - r).max() / scale)
    return errors


def by_name(params):
    """Every parameter flattened into one vector, in name order (independent of buffer layouts)."""
    return np.concatenate([params[k].ravel() for k in sorted(params)])


def copies(grads):
    return {k: np.array(v, copy=True) for k, v in grads.items()}


def dp_grads(comm, kind, bn_mode, X, y, bounds=None, seed=None, path="buckets"):
    """Gradients from DataParallel with rank r taking X[bounds[r]] (default: even shards)."""
    model = make_model(kind, bn_mode, seed=comm.rank if seed is None else seed)
    dp = make_dp(model, comm, path)
    lo, hi = bounds[comm.rank] if bounds else shard_bounds(len(X), comm.size, comm.rank)
    loss, grads = dp.loss(X[lo:hi], y[lo:hi])
    grads = copies(grads)  # before close() releases the shared memory they may live in
    dp.close()
    return loss, grads


def case_sync_equals_full_batch(comm, kind, path="buckets"):
    """1. sync BN: N-rank gradients == one-process full batch to 1e-10; local BN differs."""
    X, y = make_batch(12)
    ref_loss, ref = make_model(kind, "sync").loss(X, y)
    loss, grads = dp_grads(comm, kind, "sync", X, y, path=path)
    errors = grad_errors(grads, ref)
    assert max(errors.values()) <= 1e-10, errors
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    if comm.size > 1:  # control: per-rank statistics are not the global batch's
        _, local = dp_grads(comm, kind, "local", X, y, path=path)
        assert max(grad_errors(local, ref).values()) > 1e-3
    return loss, grads


def case_local_equals_weighted_shards(comm, kind, path="buckets"):
    """2. local BN: N-rank gradients == count-weighted mean of per-shard one-process gradients."""
    X, y = make_batch(11)
    model = make_model(kind, "local")
    ref = {k: np.zeros_like(v) for k, v in model.params.items()}
    for r in range(comm.size):
        lo, hi = shard_bounds(len(X), comm.size, r)
        if hi > lo:
            _, g = model.data_loss(X[lo:hi], y[lo:hi])
            for k in ref:
                ref[k] += (hi - lo) / len(X) * g[k]
    model.add_regularization(ref)
    _, grads = dp_grads(comm, kind, "local", X, y, path=path)
    errors = grad_errors(grads, ref)
    assert max(errors.values()) <= 1e-10, errors
    _, full = make_model(kind, "local").loss(X, y)  # control: not the full-batch gradient
    assert max(grad_errors(full, ref).values()) > 1e-3
    return grads


def case_unequal_and_empty_shards(comm, kind, path="buckets"):
    """3. unequal and empty shards stay exact: global batches of 2 * size + 2 and size - 1
    (10 and 3 over 4 ranks), and a caller's own lopsided split."""
    for n in (2 * comm.size + 2, max(comm.size - 1, 1)):
        X, y = make_batch(n)
        _, ref = make_model(kind, "sync").loss(X, y)
        _, grads = dp_grads(comm, kind, "sync", X, y, path=path)
        assert max(grad_errors(grads, ref).values()) <= 1e-10, (n, grad_errors(grads, ref))
    X, y = make_batch(9)
    _, ref = make_model(kind, "sync").loss(X, y)
    cuts = [0] + [min(9, 5 + 2 * r) for r in range(comm.size - 1)] + [9]  # rank 0 takes 5
    bounds = list(zip(cuts[:-1], cuts[1:]))
    _, grads = dp_grads(comm, kind, "sync", X, y, bounds=bounds, path=path)
    assert max(grad_errors(grads, ref).values()) <= 1e-10
    # control: the mean of per-rank means is not the global gradient for unequal shards
    wrong = {k: np.zeros_like(v) for k, v in ref.items()}
    model = make_model(kind, "sync")
    nonempty = [(lo, hi) for lo, hi in bounds if hi > lo]
    for lo, hi in nonempty:
        _, g = model.data_loss(X[lo:hi], y[lo:hi])
        for k in wrong:
            wrong[k] += g[k] / len(nonempty)
    model.add_regularization(wrong)
    if len(nonempty) > 1:
        assert max(grad_errors(wrong, ref).values()) > 1e-3


def train_steps(comm, kind, bn_mode, steps=5, batch=10, path="buckets", nudge=False):
    """Run `steps` Adam steps on even shards of fresh batches; return the parameters by_name.
    nudge: change one input value of the first batch by 1e-6 of itself (a control's change)."""
    model = make_model(kind, bn_mode, seed=comm.rank)
    dp = make_dp(model, comm, path, check_every=1)
    config = {"learning_rate": 1e-2}
    for step in range(steps):
        X, y = make_batch(batch, seed=100 + step)
        if nudge and step == 0:
            X[0, 0, 0, 0] *= 1 + 1e-6
        lo, hi = shard_bounds(batch, comm.size, comm.rank)
        dp.loss(X[lo:hi], y[lo:hi])
        dp.step(adam, config)
    dp.close()
    return by_name(model.params)


def one_process_trajectory(kind, bn_mode, steps=5, batch=10):
    model = make_model(kind, bn_mode)
    from dpnet.flat import FlatParams
    flat = FlatParams(model.params)
    config = {"learning_rate": 1e-2}
    for step in range(steps):
        X, y = make_batch(batch, seed=100 + step)
        _, grads = model.loss(X, y)
        adam(flat.data, flat.pack_grads(grads), config)
    return by_name(model.params)


def case_adam_trajectory(comm, kind, path="buckets"):
    """4. after 5 Adam steps parameters are bit-identical across ranks and equal the
    one-process trajectory to 1e-9; with local BN they leave it (control)."""
    params = train_steps(comm, kind, "sync", path=path)
    everyone = comm.allgather(params)
    assert all(np.array_equal(everyone[0], p) for p in everyone)
    ref = one_process_trajectory(kind, "sync")
    assert np.abs(params - ref).max() <= 1e-9 * np.abs(ref).max()
    if comm.size > 1:
        local = train_steps(comm, kind, "local", path=path)
        assert np.abs(local - ref).max() > 1e-6 * np.abs(ref).max()
    return params


def case_broadcast_and_drift_check(comm, kind, path="buckets"):
    """6. broadcast at start makes differently seeded ranks identical; the consistency
    check catches one perturbed rank and names it. (With shared memory the ranks of a
    node hold one copy of the parameters, which cannot drift apart, so the drift check
    runs on per-rank copies, as across nodes.)"""
    model = make_model(kind, "sync", seed=comm.rank)
    before = comm.allgather(model.params["W1"].reshape(-1).copy())
    if comm.size > 1:  # control: the seeds really differ before the broadcast
        assert not np.array_equal(before[0], before[1])
    dp = make_dp(model, comm, path)
    after = comm.allgather(model.params["W1"].reshape(-1).copy())
    assert all(np.array_equal(after[0], a) for a in after)
    dp.check_consistency(step=0)  # identical: no error
    dp.close()
    dp = DataParallel(make_model(kind, "sync", seed=comm.rank), comm, reduction="allreduce")
    model = dp.model
    dp.check_consistency(step=0)
    if comm.size > 1:
        if comm.rank == comm.size - 1:
            w = model.params["W1"].reshape(-1)
            w[0] = np.nextafter(w[0], np.inf)  # one ulp
        try:
            dp.check_consistency(step=7)
        except ParameterDriftError as exc:
            assert "step 7" in str(exc) and f"[{comm.size - 1}]" in str(exc), str(exc)
        else:
            raise AssertionError("a perturbed rank was not detected")


# ------------------------------------------------------------------ the reproducible mode

MICRO_SHARDS = 8


def reproducible_run(comm, kind, bn_mode, canonical_sum, steps=3, n=19, reproducible=MICRO_SHARDS, workers=1):
    """A few Adam steps of a float32 model in the reproducible mode over comm, each rank passing
    its micro-shards of every global batch of n (19: micro-shards of 2 and 3 examples).
    Returns (losses, parameters by name, running statistics): copies."""
    from dpnet.parallel.sharding import rank_bounds
    model = make_model(kind, bn_mode, seed=comm.rank, dtype=np.float32)  # rank 0's broadcast wins
    dp = DataParallel(model, comm, reproducible=reproducible, workers=workers, canonical_sum=canonical_sum)
    shared = False  # the tree runs in shared memory where every rank is on one node, else through MPI
    if comm.size > 1 and canonical_sum == "tree":
        node, cross = comm.split_by_node()
        shared = node.size == comm.size
        node.free()
        cross.free()
    assert dp.reduction == ("reproducible-shared-memory-tree" if shared else f"reproducible-{canonical_sum}"), \
        (dp.reduction, dp.why_not_shared_memory)
    config, losses = {"learning_rate": 1e-2}, []
    for step in range(steps):
        X, y = make_batch(n, seed=10 + step)
        lo, hi = rank_bounds(n, reproducible, comm.size, comm.rank)
        loss, _ = dp.loss(X[lo:hi].astype(np.float32), y[lo:hi], global_batch_size=n)
        losses.append(loss)
        dp.step(adam, config)
    state = [np.array(bn[key]) for bn in model.bn_params for key in ("running_mean", "running_var")]
    result = losses, copies(model.params), state
    dp.close()
    return result


def default_run(comm, kind, steps=3, n=19):
    """The same steps in the default mode (even shards, one pass each, Allreduce)."""
    model = make_model(kind, "sync", seed=comm.rank, dtype=np.float32)
    dp = make_dp(model, comm, "allreduce")
    config = {"learning_rate": 1e-2}
    for step in range(steps):
        X, y = make_batch(n, seed=10 + step)
        lo, hi = shard_bounds(n, comm.size, comm.rank)
        dp.loss(X[lo:hi].astype(np.float32), y[lo:hi], global_batch_size=n)
        dp.step(adam, config)
    params = copies(model.params)
    dp.close()
    return params


def assert_same_run(a, b, what):
    losses_a, params_a, state_a = a
    losses_b, params_b, state_b = b
    assert losses_a == losses_b, (what, losses_a, losses_b)
    for name in params_a:
        assert np.array_equal(params_a[name], params_b[name]), (what, name)
    assert all(np.array_equal(x, z) for x, z in zip(state_a, state_b)), what


def case_reproducible_is_bit_identical_at_any_size(comm, kind, bn_mode="sync", canonical_sum="tree"):
    """4. the reproducible mode: 3 Adam steps over comm give the very bits of one process
    (losses, parameters, batchnorm statistics); control: the default mode's bits differ."""
    from dpnet.parallel import SerialComm
    one = reproducible_run(SerialComm(), kind, bn_mode, canonical_sum)
    assert_same_run(reproducible_run(comm, kind, bn_mode, canonical_sum), one, f"{comm.size} ranks")
    if comm.size > 1:
        mine, alone = default_run(comm, kind), default_run(SerialComm(), kind)
        assert any(not np.array_equal(mine[k], alone[k]) for k in mine), "the default mode gave one process's bits"
