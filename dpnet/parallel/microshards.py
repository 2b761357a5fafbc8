"""Micro-shards: the fixed cut of every global batch that makes training bit-identical at any
number of ranks (DataParallel(..., reproducible=M)).

The global batch of B examples is cut into M micro-shards by position (shard_bounds(B, M, m)),
the same cut whatever the number of ranks N; N divides M, both powers of two, and rank r holds
the k = M / N micro-shards r*k .. r*k + k - 1 (dpnet.parallel.sharding.rank_bounds). Each micro-shard gets a forward
and backward pass of its own, on a thread of its own, so every array of a pass has the same
shape at any N, and every reduction across examples is made per micro-shard, then combined in
one order fixed by micro-shard index:
- batchnorm's statistics and backward sums: MicroShardComm, the communicator a micro-shard's
  batchnorm layers reduce over, gathers all M micro-shards' rows in micro-shard order and
  sums them in that order;
- the gradients, the loss and the stop votes: a canonical sum (dpnet.parallel.canonical).

The passes of a rank run at most `workers` at a time (one BLAS thread each): a pass that waits
for the others in a collective gives its turn up.
"""

import threading

import numpy as np

from ..layers.affine import AffineProducts
from .threads import run_threads

DEFAULT_MICRO_SHARDS = 8


def is_power_of_two(n):
    return isinstance(n, (int, np.integer)) and n >= 1 and n & (n - 1) == 0


def valid_rank_counts(micro_shards):
    """The numbers of ranks that can run `micro_shards` micro-shards: its divisors."""
    return [n for n in range(1, micro_shards + 1) if micro_shards % n == 0]


def check_micro_shards(micro_shards, size):
    """ValueError unless micro_shards is a power of two and `size` ranks divide it."""
    if not is_power_of_two(micro_shards):
        raise ValueError(f"the number of micro-shards must be a power of two (1, 2, 4, 8, ...), got {micro_shards}")
    if micro_shards % size:
        raise ValueError(f"{size} ranks cannot share {micro_shards} micro-shards equally: the number of ranks "
                         f"must divide it ({', '.join(map(str, valid_rank_counts(micro_shards)))})")


def ordered_sum(parts):
    """parts[0] + parts[1] + ... in that order (micro-shard order): the same bits wherever the
    parts were computed."""
    total = np.array(parts[0], copy=True)
    for part in parts[1:]:
        total += part
    return total


class MicroShardFailure(RuntimeError):
    """Another pass of this rank failed while this one waited for it in a collective."""


class MicroShardGroup:
    """The k passes of one rank and what they share: the rendezvous of their collectives, made
    as one collective of the rank's communicator, and the turns to compute.

    comms[j] is the communicator of this rank's micro-shard j (micro-shard rank*k + j of M)."""

    def __init__(self, comm, micro_shards, workers=1):
        check_micro_shards(micro_shards, comm.size)
        self.comm, self.size = comm, micro_shards
        self.k = micro_shards // comm.size
        self.turns = threading.Semaphore(max(1, int(workers)))
        self.cond = threading.Condition()
        self.pending = [None] * self.k
        self.arrived, self.generation, self.result = 0, 0, None
        self.failure = None
        self.comms = [MicroShardComm(self, j) for j in range(self.k)]
        self._stackable = {}  # (product, dtype, parts' shapes and layouts) -> whether stacking keeps every row's bits

    def reset(self):
        """Before a new set of passes: forget an earlier failure."""
        with self.cond:
            self.pending, self.arrived, self.failure = [None] * self.k, 0, None

    def fail(self, exc):
        """A pass failed: wake the passes waiting for it (they raise MicroShardFailure)."""
        with self.cond:
            if self.failure is None:
                self.failure = exc
            self.cond.notify_all()

    def _meet(self, j, item):
        """Rendezvous of the k passes: pass j leaves `item`. The last to arrive gets (True, every
        pass's item in pass order) and must _publish() a result; the others wait for it and get
        (False, that result)."""
        with self.cond:
            if self.failure is not None:
                raise MicroShardFailure(f"another micro-shard pass failed: {self.failure}")
            generation = self.generation
            self.pending[j] = item
            self.arrived += 1
            if self.arrived < self.k:
                self.cond.wait_for(lambda: self.generation != generation or self.failure is not None)
                if self.generation == generation:
                    raise MicroShardFailure(f"another micro-shard pass failed: {self.failure}")
                return False, self.result
            items = self.pending
            self.pending, self.arrived = [None] * self.k, 0
            return True, items

    def _publish(self, result):
        with self.cond:
            self.result = result
            self.generation += 1
            self.cond.notify_all()
        return result

    def gather(self, j, array):
        """Collective of the k passes: (M,) + array.shape, every micro-shard's array in
        micro-shard order. The last pass to arrive makes the rank's collective."""
        self.turns.release()  # waiting: another pass may compute
        try:
            last, got = self._meet(j, np.array(array, copy=True))
            if not last:
                return got
            local = np.stack(got)
            try:
                gathered = self.comm.allgather(local)  # (N, k, ...): rank order, then pass order
            except BaseException as exc:
                self.fail(exc)
                raise
            return self._publish(gathered.reshape((self.size,) + local.shape[1:]))
        finally:
            self.turns.acquire()

    def stacked(self, j, rows, product):
        """Collective of the k passes, within this rank: product(every pass's `rows` stacked in
        pass order), each pass getting its own rows of the result. The last pass to arrive makes
        the product (with a turn to compute), on the stacked rows where stacking gives every row
        the bits it gets alone (same_bits_stacked, checked once per shape), else pass by pass."""
        self.turns.release()  # waiting: another pass may compute
        try:
            last, got = self._meet(j, rows)
            if not last:
                return got[j]
            try:
                with self.turns:
                    if self._may_stack(got, product):
                        whole = product(np.concatenate(got))
                        ends = np.cumsum([len(part) for part in got])
                        results = [whole[end - len(part):end] for part, end in zip(got, ends)]
                    else:
                        results = [product(part) for part in got]
            except BaseException as exc:
                self.fail(exc)
                raise
            return self._publish(results)[j]
        finally:
            self.turns.acquire()

    def _may_stack(self, parts, product):
        key = (product.signature, parts[0].dtype.str,
               tuple((part.shape, part.flags.c_contiguous, part.flags.f_contiguous) for part in parts))
        if key not in self._stackable:
            self._stackable[key] = same_bits_stacked(product, parts)
        return self._stackable[key]

    def run(self, fn):
        """Run fn(j) for the k passes, each on a thread of its own (inline when k is 1), at most
        `workers` computing at once; returns their results in pass order or raises the first
        pass's own exception."""
        self.reset()

        def one(j):
            with self.turns:
                return fn(j)

        if self.k == 1:
            return [one(0)]
        results, errors = run_threads(one, self.k, "dpnet-micro", on_error=lambda j, exc: self.fail(exc))
        own = [e for e in errors if e is not None and not isinstance(e, MicroShardFailure)]
        if own or any(errors):
            raise own[0] if own else next(e for e in errors if e is not None)
        return results


def same_bits_stacked(product, parts, seed=0):
    """Whether product(rows) gives every row the same bits when the rows of several passes are
    stacked into one call as when each pass calls it alone, on random data shaped and laid out
    (C or F order) as `parts`. BLAS libraries may sum in an order that depends on the number
    of rows or the layout (a kernel for few rows, another for many); where they do, a stacked
    product would make the bits depend on how many passes a rank holds, i.e. on the number of
    ranks. (Checked under the BLAS threads of the call; the reproducible mode fixes them at 1.)"""
    rng = np.random.default_rng(seed)
    samples = [np.empty_like(part) for part in parts]  # each in its part's memory order
    for sample in samples:
        sample[...] = rng.standard_normal(sample.shape)
    whole = product(np.concatenate(samples))
    start = 0
    for sample in samples:
        if not np.array_equal(whole[start:start + len(sample)], product(sample)):
            return False
        start += len(sample)
    return True


class StackedProducts:
    """The products of an affine layer (dpnet.layers.affine.AffineProducts' interface) made for
    the k passes of a rank at once: x2 @ w and dout @ w.T over the passes' rows stacked, which
    reads the weight once instead of k times (a large weight is read from memory, not cache, so
    k small products cost up to k times one). Where stacking would change a bit it is not used
    (MicroShardGroup.stacked). group: the passes' MicroShardGroup; j: this pass; dx_form: as
    AffineProducts'."""

    def __init__(self, group, j, dx_form="plain"):
        self.group, self.j, self.alone = group, j, AffineProducts(dx_form)

    def forward(self, x2, w):
        return self.group.stacked(self.j, x2, _Product(self.alone.forward, w, "forward"))

    def input_grad(self, dout, w):
        return self.group.stacked(self.j, dout, _Product(self.alone.input_grad, w, self.alone.dx_form))


class _Product:
    """rows -> fn(rows, w); `signature` names what it computes, for the stacking check."""

    def __init__(self, fn, w, kind):
        self.fn, self.w = fn, w
        self.signature = (kind, w.shape, w.dtype.str, w.flags.c_contiguous)

    def __call__(self, rows):
        return self.fn(rows, self.w)


class MicroShardComm:
    """What the batchnorm layers of one micro-shard's pass reduce over: the M micro-shards of
    the global batch (rank = this micro-shard's index). allgather returns every micro-shard's
    array in micro-shard order; allreduce sums them in that order, so both give the same bits
    at any number of ranks."""

    def __init__(self, group, j):
        self.group, self.j = group, j
        self.rank = group.comm.rank * group.k + j
        self.size = group.size

    def allgather(self, array):
        return self.group.gather(self.j, np.asarray(array))

    def allreduce(self, array, op="sum"):
        if op != "sum":
            raise ValueError(f"micro-shard allreduce sums only, got op {op!r}")
        array[...] = ordered_sum(self.group.gather(self.j, array))
        return array

    def __repr__(self):
        return f"MicroShardComm(micro-shard {self.rank} of {self.size})"
