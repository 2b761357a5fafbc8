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
from .shared_memory import SharedMemoryReducer

GRID_BITS = 62  # a sum of M values each below 2^(62 - log2 M) stays below 2^62
TREE_PIECE_BYTES = 1 << 16  # the tree sums this much of each part at a time: M parts and M / 2 partial sums stay in cache


def tree_sum_into(parts, out, scratch):
    """out[...] = the pairwise tree over parts (a power-of-two number of arrays shaped like out),
    without writing parts; scratch: len(parts) // 2 arrays
    shaped like out (any for one part)."""
    n = len(parts)
    if n == 1:
        out[...] = parts[0]
        return out
    level = parts
    while n > 1:
        n //= 2
        for i in range(n):
            np.add(level[2 * i], level[2 * i + 1], out=out if n == 1 else scratch[i])
        level = scratch
    return out


def tree_sum_pieces(parts, out, lo, hi, piece, scratch, finish=None):
    """tree_sum_into over entries [lo, hi) of parts ((M, count) or M arrays) into out, `piece`
    entries at a time so that the partial sums stay in cache; finish(out, a, b) after each piece.
    scratch: (M // 2, >= piece) array."""
    for a in range(lo, hi, piece):
        b = min(a + piece, hi)
        tree_sum_into([part[a:b] for part in parts], out[a:b], [row[:b - a] for row in scratch])
        if finish is not None:
            finish(out, a, b)
    return out


class TreeSum:
    name = "tree"

    def __init__(self, comm):
        self.comm = comm
        self._scratch = None

    def _tree(self, parts, out):
        piece = max(1, TREE_PIECE_BYTES // out.itemsize)
        if self._scratch is None or self._scratch.shape[0] < len(parts) // 2:
            self._scratch = np.empty((max(1, len(parts) // 2), piece), dtype=out.dtype)
        return tree_sum_pieces(parts, out, 0, len(out), piece, self._scratch)

    def combine(self, buffers, out):
        if self.comm.size == 1:
            return self._tree(buffers, out)
        local = self._tree(buffers, np.empty_like(out)) if len(buffers) > 1 else buffers[0]
        parts = self.comm.allgather(local)  # (N, count), in rank order
        return self._tree(parts, out)


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


class SharedTreeReducer(SharedMemoryReducer):
    """The tree sum on one node, through shared memory: every micro-shard's pass writes its
    gradients into a shared segment of its own (M segments, rank r's k passes writing r*k ..
    r*k + k - 1), and each rank sums its slice of all M of them as the pairwise tree over
    micro-shard index, piece by piece in cache, into the shared result: the bits of TreeSum,
    with each buffer read once, by one rank, and no copies through MPI. Like
    SharedMemoryReducer, the ranks share one copy of the parameters and each updates its slice
    (DividedUpdate: the update rules are elementwise, so the bits are those of every rank
    updating everything). Collectives per step, over the node: fence, fence.

    The L2 loss rides in micro-shard 0's buffer only, for all the weights: the same sum at any N."""

    def __init__(self, comm, node, cross, count, dtype, micro_shards):
        if cross.size != 1:
            raise ValueError("SharedTreeReducer sums on one node; across nodes use TreeSum")
        super().__init__(comm, node, cross, count, dtype, segments=micro_shards)
        self.loss_range = (0, count if comm.rank == 0 else 0)
        self.loss_ranges = [self.loss_range] + [(0, 0)] * (len(self.sends) - 1)
        self._piece = max(1, TREE_PIECE_BYTES // self.dtype.itemsize)
        self._scratch = np.empty((max(1, micro_shards // 2), self._piece), dtype=self.dtype)
        self.name = "reproducible-shared-memory-tree"

    def describe(self):
        return (f"reproducible: {len(self.sends)} micro-shard(s) per rank, summed by tree "
                f"in shared memory ({self.node.size} ranks)")

    def _sum_node(self, lo, hi):
        tree_sum_into([part[lo:hi] for part in self._segments], self._result[lo:hi],
                      [row[:hi - lo] for row in self._scratch])
