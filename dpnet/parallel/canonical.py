"""Canonical sums: the M micro-shards' flat buffers (gradients, then [loss, stop vote]) summed to
the same bits at any number of ranks N (the reproducible mode, dpnet.parallel.microshards).
Each rank holds k = M / N of them, in micro-shard order.

- TreeSum ('tree'): the pairwise tree over micro-shard index, ((g0 + g1) + (g2 + g3)) + ...:
  each rank sums its k buffers as the subtree they form, the ranks' sums are gathered, and every
  rank finishes the tree over them in rank order. Float additions in one fixed tree: the same
  bits at any N (a sum of two is the same either way round). Collectives per step:
  Allgather(buffer) (each rank receives N buffers).
- FixedPointSum ('fixed-point'): every value becomes an integer on a grid fixed per parameter
  (2^-s, s from the largest magnitude among all M buffers, so a sum of M cannot overflow 62
  bits), and integers add exactly in any order: the int64 sums go through one Allreduce, then
  back to floats. Within about M * 2^-62 of the largest entry of each parameter of the exact
  sum, closer than a float32 sum. Collectives per step: Allreduce(max) of one value per
  parameter, Allreduce(int64 buffer).

Interface: combine(buffers, out) writes the sum of every rank's buffers into out.
"""

import numpy as np

from .reducer import Reducer, finish_all

GRID_BITS = 62  # a sum of M values each below 2^(62 - log2 M) stays below 2^62


def pairwise_sum(buffers):
    """Sum a power-of-two number of arrays as the pairwise tree over their order, in place:
    the result is in buffers[0]."""
    n = len(buffers)
    step = 1
    while step < n:
        for i in range(0, n, 2 * step):
            buffers[i] += buffers[i + step]
        step *= 2
    return buffers[0]


class TreeSum:
    name = "tree"

    def __init__(self, comm):
        self.comm = comm

    def combine(self, buffers, out):
        local = pairwise_sum(buffers)
        if self.comm.size == 1:
            out[...] = local
            return out
        parts = self.comm.allgather(local)  # (N, count), in rank order
        out[...] = pairwise_sum(list(parts))
        return out


class FixedPointSum:
    name = "fixed-point"

    def __init__(self, comm, micro_shards, sizes):
        """sizes: the lengths of the consecutive pieces of the flat buffer that get a grid each
        (one per parameter, one per tail entry)."""
        self.comm = comm
        self.headroom = int(np.log2(micro_shards))
        self.sizes = np.array(sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    def combine(self, buffers, out):
        largest = np.zeros(len(self.starts), dtype=np.float64)
        for buf in buffers:
            np.maximum(largest, np.maximum.reduceat(np.abs(buf), self.starts), out=largest)
        self.comm.allreduce(largest, op="max")
        _, exponent = np.frexp(largest)  # largest < 2^exponent
        shift = np.minimum(GRID_BITS - self.headroom - exponent, 1000)  # 2^shift stays a finite float64
        scale = np.repeat(np.ldexp(1.0, shift), self.sizes)
        total = np.zeros(len(scale), dtype=np.int64)
        for buf in buffers:
            grid = buf * scale  # exact: times a power of two, in float64
            np.rint(grid, out=grid)
            total += grid.astype(np.int64)
        self.comm.allreduce(total)
        out[...] = total / scale  # the int64 rounds to float64 once, then to out's dtype
        return out


CANONICAL_SUMS = ("tree", "fixed-point")


def canonical_summer(name, comm, micro_shards, sizes):
    """The canonical sum called `name` (CANONICAL_SUMS) over comm; sizes: the flat buffer's pieces."""
    if name == "tree":
        return TreeSum(comm)
    if name == "fixed-point":
        return FixedPointSum(comm, micro_shards, sizes)
    raise ValueError(f"canonical sum must be one of {CANONICAL_SUMS}, got {name!r}")


class CanonicalReducer(Reducer):
    """The reducer of the reproducible mode: one send buffer per micro-shard pass of this rank
    (sends), summed by a canonical sum (TreeSum or FixedPointSum) into result; every rank holds
    its own copy and finishes every entry. The L2 loss rides in micro-shard 0's buffer only."""

    def __init__(self, comm, count, dtype, passes, summer):
        sends = [np.zeros(count, dtype=dtype) for _ in range(passes)]
        super().__init__(sends[0], np.zeros(count, dtype=dtype), (0, count), (0, count if comm.rank == 0 else 0))
        self.sends, self.loss_ranges = sends, [self.loss_range] + [(0, 0)] * (passes - 1)
        self.comm, self.summer = comm, summer
        self.name = f"reproducible-{summer.name}"

    def describe(self):
        return f"reproducible: {len(self.sends)} micro-shard(s) per rank, summed by {self.summer.name}"

    def reduce(self, finish=None):
        self.summer.combine(self.sends, self.result)
        finish_all(self.result, finish, *self.owned)
        return self.result
