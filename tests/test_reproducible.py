"""The reproducible mode's pieces: micro-shard bounds, the canonical sums, the passes of a rank.
Bit-identity across numbers of ranks is in tests/parallel_cases.py (SimComm and mpirun)."""

import math

import numpy as np
import pytest

from dpnet.parallel import DataParallel, SerialComm, SimComm
from dpnet.parallel import canonical
from dpnet.parallel.canonical import FactorLayout, FixedPointSum, MicroShardSum, SharedTreeReducer, TreeSum
from dpnet.parallel.choice import choose_canonical_reducer
from dpnet.parallel.microshards import check_micro_shards
from dpnet.parallel.sharding import rank_bounds, shard_bounds
from dpnet.parallel.shared_memory import SharedMemoryReducer
from tests import parallel_cases as cases


def test_ranks_hold_whole_micro_shards_that_tile_the_batch():
    for batch in (0, 3, 19, 128):
        for size in (1, 2, 4, 8):
            bounds = [rank_bounds(batch, 8, size, r) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == batch
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            micro = [shard_bounds(batch, 8, m) for m in range(8)]  # the same cut at any size
            k = 8 // size
            assert all(bounds[r] == (micro[r * k][0], micro[r * k + k - 1][1]) for r in range(size))


@pytest.mark.parametrize("micro_shards, size, message", [
    (6, 2, "must be a power of two (1, 2, 4, 8, ...), got 6"),
    (8, 3, "3 ranks cannot share 8 micro-shards equally: the number of ranks must divide it (1, 2, 4, 8)"),
    (4, 8, "8 ranks cannot share 4 micro-shards equally: the number of ranks must divide it (1, 2, 4)")])
def test_a_count_that_cannot_work_is_refused_naming_the_valid_ones(micro_shards, size, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_micro_shards(micro_shards, size)


def test_the_tree_sum_is_the_pairwise_tree_over_micro_shard_index(monkeypatch):
    monkeypatch.setattr(canonical, "TREE_PIECE_BYTES", 4 * 97)  # pieces of 97 entries: the last one partial
    rng = np.random.default_rng(0)
    parts = [(rng.standard_normal(1000) * 10.0 ** rng.integers(-3, 4)).astype(np.float32) for _ in range(8)]
    tree = ((parts[0] + parts[1]) + (parts[2] + parts[3])) + ((parts[4] + parts[5]) + (parts[6] + parts[7]))
    sequential = parts[0] + parts[1] + parts[2] + parts[3] + parts[4] + parts[5] + parts[6] + parts[7]
    assert not np.array_equal(tree, sequential)  # control: the order shows in the bits
    layout, none_packed = FactorLayout([(1000,)]), np.zeros((8, 0), dtype=np.int64)
    copies = [p.copy() for p in parts]
    out = np.empty(1000, np.float32)
    MicroShardSum(layout, np.float32).sum(copies, None, none_packed, 0, 1000, out)  # no weights: no factors
    assert np.array_equal(out, tree)
    assert all(np.array_equal(c, p) for c, p in zip(copies, parts))  # the parts are left as they were
    for size in (1, 2, 4):
        k = 8 // size
        out = SimComm(size).run(lambda comm: TreeSum(comm, layout, np.float32).combine(
            [p.copy() for p in parts[comm.rank * k:(comm.rank + 1) * k]], np.empty(1000, np.float32),
            none_packed[:k]))
        assert all(np.array_equal(o, tree) for o in out)


@pytest.mark.parametrize("size", [2, 4, 8])
def test_the_shared_memory_tree_is_the_same_tree(size, monkeypatch):
    """SharedTreeReducer: each rank sums its slice of the 8 micro-shard segments, in pieces."""
    monkeypatch.setattr(canonical, "TREE_PIECE_BYTES", 4 * 37)  # many pieces, slices ending mid-piece
    rng = np.random.default_rng(2)
    parts = [(rng.standard_normal(1001) * 10.0 ** rng.integers(-3, 4)).astype(np.float32) for _ in range(8)]
    tree = ((parts[0] + parts[1]) + (parts[2] + parts[3])) + ((parts[4] + parts[5]) + (parts[6] + parts[7]))
    k = 8 // size

    def reduce(comm):
        node, cross = comm.split_by_node()
        reducer = SharedTreeReducer(comm, node, cross, 1001, np.float32, 8, FactorLayout([(1001,)]))
        assert len(reducer.sends) == k and reducer.loss_ranges[0] == ((0, 1001) if comm.rank == 0 else (0, 0))
        for j, send in enumerate(reducer.sends):
            send[...] = parts[comm.rank * k + j]
        finished = []
        result = reducer.reduce(lambda res, lo, hi: finished.append((lo, hi)))
        return np.array(result), finished

    outs = SimComm(size).run(reduce)
    assert all(np.array_equal(out, tree) for out, _ in outs)
    pieces = sorted(piece for _, finished in outs for piece in finished)  # each entry finished once
    assert pieces[0][0] == 0 and pieces[-1][1] == 1001 and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))


FACTOR_SHAPES = [(7,), (40, 30), (5, 3), (1,), (1,)]  # a bias, a weight whose factors fit, one whose do not, the tail


def _factored_sum(comm, batch, path):
    """The reproducible tree's sum of 8 micro-shards of a float32 batch: the (40, 30) weight's
    gradient stored as factors (rows of X (batch, 40), G (batch, 30)); the other entries dense."""
    from dpnet.layers import WeightGradFactors
    rng = np.random.default_rng(3)
    x, g = rng.standard_normal((batch, 40)).astype(np.float32), rng.standard_normal((batch, 30)).astype(np.float32)
    dense = [rng.standard_normal(sum(int(np.prod(s)) for s in FACTOR_SHAPES)).astype(np.float32) for _ in range(8)]
    reducer, _ = choose_canonical_reducer(comm, "tree", 8, FACTOR_SHAPES[:-2], 2, np.float32, 8 // comm.size)
    assert type(reducer).__name__ == path, type(reducer).__name__
    k = 8 // comm.size
    for j, send in enumerate(reducer.sends):
        m = comm.rank * k + j
        lo, hi = shard_bounds(batch, 8, m)
        send[...] = dense[m]
        slots = reducer.factor_slots(j, batch)
        assert slots.store(7, WeightGradFactors(x[lo:hi], g[lo:hi]), send)
        assert not slots.store(7 + 1200, WeightGradFactors(x[lo:hi, :5], g[lo:hi, :3]), send)  # 3 rows of 8 > 15
    finished = []
    result = np.array(reducer.reduce(lambda res, lo, hi: finished.append((lo, hi))))
    reducer.close()
    return result, finished, x, g, dense


@pytest.mark.parametrize("size, path", [(1, "CanonicalReducer"), (2, "SharedTreeReducer"), (4, "SharedTreeReducer"),
                                        (8, "SharedTreeReducer"), (2, "CanonicalReducer"), (4, "CanonicalReducer")])
def test_factored_weight_gradients_are_one_product_over_the_global_batch(size, path, monkeypatch):
    """A weight whose gradient the passes store as factors gets X.T @ G of the whole batch, in
    tiles (here of 4 rows: slices and tiles cross); its bits are the same at any N, on one node
    (shared memory) and across nodes (Allgather); the other entries are the tree."""
    monkeypatch.setattr(canonical, "TILE_BYTES", 4 * 30 * 4)
    monkeypatch.setattr(canonical, "TREE_PIECE_BYTES", 4 * 13)
    batch = 19  # micro-shards of 2 and 3 rows
    nodes = size // 2 if path == "CanonicalReducer" and size > 1 else None  # 2 nodes: the Allgather tree
    outs = SimComm(size, ranks_per_node=nodes).run(_factored_sum, batch, path)
    one, _, x, g, dense = _factored_sum(SerialComm(), batch, "CanonicalReducer")
    assert all(np.array_equal(out, one) for out, _, _, _, _ in outs)
    weight = one[7:1207].reshape(40, 30)
    exact = x.astype(np.float64).T @ g.astype(np.float64)
    assert np.allclose(weight, exact, rtol=1e-5, atol=1e-5), np.abs(weight - exact).max()
    d = dense
    tree = ((d[0] + d[1]) + (d[2] + d[3])) + ((d[4] + d[5]) + (d[6] + d[7]))
    assert np.array_equal(one[:7], tree[:7]) and np.array_equal(one[1207:], tree[1207:])
    finished = sorted(piece for out in outs for piece in out[1])
    if path == "SharedTreeReducer":  # each entry finished once, by the rank that owns it
        assert finished[0][0] == 0 and finished[-1][1] == len(one)
        assert all(a[1] == b[0] for a, b in zip(finished, finished[1:]))


def test_factors_of_another_shape_are_refused():
    """A factor pair of the wrong weight shape must not spill over the next parameter."""
    from dpnet.layers import WeightGradFactors
    reducer, _ = choose_canonical_reducer(SerialComm(), "tree", 2, [(4, 3), (5,)], 2, np.float64, 2)
    before = reducer.sends[0].copy()
    with pytest.raises(ValueError, match=r"factors of a \(3, 3\) weight gradient given for the \(4, 3\) weight"):
        reducer.factor_slots(0, 2).store(0, WeightGradFactors(np.ones((1, 3)), np.ones((1, 3))), reducer.sends[0])
    np.testing.assert_array_equal(reducer.sends[0], before)


def test_send_segments_the_ranks_cannot_share_are_refused():
    def build(comm):
        node, cross = comm.split_by_node()
        with pytest.raises(ValueError, match="3 send segments cannot be shared equally by 2 ranks"):
            SharedMemoryReducer(comm, node, cross, 10, np.float32, segments=3)
    SimComm(2).run(build)


def test_micro_shards_that_disagree_on_factors_are_refused():
    from dpnet.layers import WeightGradFactors
    reducer, _ = choose_canonical_reducer(SerialComm(), "tree", 2, [(4, 3)], 2, np.float64, 2)
    rng = np.random.default_rng(0)
    reducer.factor_slots(0, 2).store(0, WeightGradFactors(rng.standard_normal((1, 4)), rng.standard_normal((1, 3))),
                                     reducer.sends[0])
    reducer.factor_slots(1, 2)  # pass 1 stores its product instead
    with pytest.raises(RuntimeError, match="micro-shards disagree on which affine weights"):
        reducer.reduce()


def test_the_fixed_point_sum_is_within_its_grid_of_the_exact_sum_at_any_size():
    rng = np.random.default_rng(1)
    sizes = [40, 25, 1, 1]  # two parameters, then [loss, stop vote]
    scales = np.repeat([1e3, 1e-6, 1.0, 1.0], sizes)
    parts = [rng.standard_normal(sum(sizes)) * scales for _ in range(8)]
    exact = np.array([math.fsum(p[i] for p in parts) for i in range(sum(sizes))])
    one = FixedPointSum(SerialComm(), 8, sizes).combine([p.copy() for p in parts], np.empty(sum(sizes)))
    largest = np.repeat([np.abs(np.array(parts)[:, a:a + n]).max() for a, n in
                         zip(np.cumsum([0] + sizes[:-1]), sizes)], sizes)
    grid = 2.0 ** (np.frexp(largest)[1] - (62 - 3))  # each part rounds to within half of it
    assert np.all(np.abs(one - exact) <= 8 * grid / 2 + np.spacing(np.abs(exact))), np.abs(one - exact).max()
    for size in (2, 4, 8):
        k = 8 // size
        out = SimComm(size).run(lambda comm: FixedPointSum(comm, 8, sizes).combine(
            [p.copy() for p in parts[comm.rank * k:(comm.rank + 1) * k]], np.empty(sum(sizes))))
        assert all(np.array_equal(o, one) for o in out), size


def test_in_float64_the_mode_computes_the_full_batch_gradient():
    """Sync batchnorm, float64, 4 ranks: the reproducible mode's gradients are the one-process
    full-batch gradients to rounding (it is the same math, summed in another order)."""
    X, y = cases.make_batch(19)
    ref_loss, ref = cases.make_model("convnet", "sync").loss(X, y)

    def run(comm):
        dp = DataParallel(cases.make_model("convnet", "sync"), comm, reproducible=8)
        lo, hi = rank_bounds(19, 8, comm.size, comm.rank)
        loss, grads = dp.loss(X[lo:hi], y[lo:hi], global_batch_size=19)
        return loss, cases.copies(grads)
    for loss, grads in SimComm(4).run(run):
        assert abs(loss - ref_loss) <= 1e-12 * ref_loss
        assert max(cases.grad_errors(grads, ref).values()) <= 1e-10


def test_passes_that_compute_two_at_a_time_give_the_same_bits():
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        one = SimComm(2).run(cases.reproducible_run, "convnet", "sync", "tree", workers=1)
        two = SimComm(2).run(cases.reproducible_run, "convnet", "sync", "tree", workers=2)
    for a, b in zip(one, two):
        cases.assert_same_run(a, b, "workers=2")


def test_the_passes_compute_with_the_models_layer_choices(monkeypatch):
    """Choices set after DataParallel is built (as a resume sets them) reach every micro-shard
    pass: each affine input gradient is made in the chosen form, each conv by the chosen
    algorithm (seen by spies, whatever bits the forms give on this machine's BLAS)."""
    import dpnet.layers.affine as affine
    import dpnet.layers.sandwich as sandwich
    forms, algorithms = [], []
    input_grad, conv_forward = affine.input_grad, sandwich.conv_forward

    def grad_spy(dout, w, form="plain"):
        forms.append(form)
        return input_grad(dout, w, form)

    def conv_spy(x, w, b, conv_param):
        algorithms.append(conv_param.get("algorithm"))
        return conv_forward(x, w, b, conv_param)

    monkeypatch.setattr(affine, "input_grad", grad_spy)
    monkeypatch.setattr(sandwich, "conv_forward", conv_spy)
    model = cases.make_model("threelayer")
    dp = DataParallel(model, SerialComm(), reproducible=4)
    model.set_layer_choices({"conv": {"1": "im2col-whole"}, "dx": {"W2": "transposed", "W3": "transposed"}})
    X, y = cases.make_batch(8)
    dp.loss(X, y, global_batch_size=8)
    assert set(forms) == {"transposed"} and len(forms) >= 2  # 2 affine layers, passes stacked or not
    assert algorithms == ["im2col-whole"] * 4
    assert model.layer_choices() == {"conv": {"1": "im2col-whole"}, "dx": {"W2": "transposed", "W3": "transposed"}}


class _RowsProduct:
    """A stand-in affine product for MicroShardGroup.stacked: records the rows of every call;
    with `by_count`, each row's result depends on how many rows the call has (as a BLAS whose
    kernel changes with the row count)."""

    def __init__(self, by_count=False):
        self.by_count, self.calls = by_count, []
        self.signature = ("test", by_count)

    def __call__(self, rows):
        self.calls.append(len(rows))
        return rows * 2.0 + (len(rows) if self.by_count else 0)


@pytest.mark.parametrize("by_count", [False, True], ids=["same-bits", "bits-change-with-rows"])
def test_the_passes_of_a_rank_stack_their_products_only_where_that_keeps_every_rows_bits(by_count):
    """k = 4 passes of 3, 2, 2 and 2 rows: where the product gives every row the same bits in
    any stacking, one call over the 9 rows serves them all (after a one-time check on random
    rows); where it does not, each pass gets its product alone. Either way each pass gets
    exactly the rows it would alone."""
    from dpnet.parallel.microshards import MicroShardGroup
    group = MicroShardGroup(SerialComm(), 4)
    product = _RowsProduct(by_count)
    rows = [np.arange(n * 5, dtype=np.float64).reshape(n, 5) + 100 * j for j, n in enumerate((3, 2, 2, 2))]
    for _ in range(2):  # the second step: the check is not made again
        got = group.run(lambda j: group.stacked(j, rows[j], product))
        for j, part in enumerate(rows):  # what the pass's own call gives
            np.testing.assert_array_equal(got[j], part * 2.0 + (len(part) if by_count else 0))
    if by_count:  # the check (9 stacked, then the first pass's 3 differ) said no: pass by pass, both steps
        assert product.calls == [9, 3] + [3, 2, 2, 2] * 2
    else:
        assert product.calls == [9, 3, 2, 2, 2] + [9] * 2


def test_stacked_affine_products_give_every_pass_its_own_bits(monkeypatch):
    """ThreeLayerConvNet in the reproducible mode: at one rank (8 passes of 2 or 3 of the 19
    examples) each of the 4 affine products of a step (forward and dx of W2 and W3) is one call
    over the passes' 19 stacked rows wherever the check shows this machine's BLAS keeps the
    bits, and the run is bit-identical to 8 ranks of one micro-shard each, which stack nothing."""
    import dpnet.parallel.microshards as microshards
    rows, verdicts = [], []
    product_call, check = microshards._Product.__call__, microshards.same_bits_stacked

    def spy(self, stacked):
        rows.append(len(stacked))
        return product_call(self, stacked)

    def checked(product, parts):
        verdicts.append(check(product, parts))
        return verdicts[-1]

    monkeypatch.setattr(microshards._Product, "__call__", spy)
    monkeypatch.setattr(microshards, "same_bits_stacked", checked)
    one = cases.reproducible_run(SerialComm(), "threelayer", "sync", "tree")  # 3 steps
    assert len(verdicts) == 4  # one check per product, for the whole run
    assert rows.count(19) - len(verdicts) == 3 * sum(verdicts)  # beyond the checks' own: 1 per product and step
    rows.clear()
    alone = SimComm(8).run(cases.reproducible_run, "threelayer", "sync", "tree")
    assert rows == []
    for result in alone:
        cases.assert_same_run(result, one, "8 ranks")


def test_a_rank_must_pass_its_micro_shards():
    dp = DataParallel(cases.make_model("threelayer"), SerialComm(), reproducible=8)
    X, y = cases.make_batch(10)
    with pytest.raises(ValueError, match=r"must pass its micro-shards, examples \[0, 19\) of the global batch of 19"):
        dp.loss(X, y, global_batch_size=19)


def test_a_pass_that_fails_fails_the_step_at_once():
    """A pass that raises while the others wait for it in sync batchnorm's collective: the step
    raises that error (no pass is left waiting)."""

    class Failing(type(cases.make_model("convnet"))):
        def _forward(self, X):
            if len(X) and X[0, 0, 0, 0] == 123.0:
                raise RuntimeError("pass failed")
            return super()._forward(X)

    X, y = cases.make_batch(16)
    X[10, 0, 0, 0] = 123.0  # the first example of micro-shard 5, on rank 1 of 2

    def run(comm):
        model = Failing(input_dim=cases.INPUT, stages=((4,), (5,)), hidden_dims=(6,), bn_mode="sync")
        dp = DataParallel(model, comm, reproducible=8)
        lo, hi = rank_bounds(16, 8, comm.size, comm.rank)
        dp.loss(X[lo:hi], y[lo:hi], global_batch_size=16)
    with pytest.raises(RuntimeError, match="pass failed"):
        SimComm(2, timeout=20).run(run)
