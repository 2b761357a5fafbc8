"""Canonical sums: the M micro-shards' flat buffers (gradients, then [loss, stop vote]) summed to
the same bits at any number of ranks N (the reproducible mode, dpnet.parallel.microshards).
Each rank holds k = M / N of them, in micro-shard order.

- The tree ('tree'): the pairwise tree over micro-shard index, ((g0 + g1) + (g2 + g3)) + ...:
  float additions in one fixed tree give the same bits at any N (a sum of two is the same either
  way round). An affine weight's gradient that the passes stored as its factors (FactorLayout)
  is instead one product over the whole global batch, tile by tile (MicroShardSum). Where it runs:
  - SharedTreeReducer, every rank on one node: each rank sums its slice of all M buffers, which
    live in shared memory. Collectives per step: node fence, node fence.
  - CanonicalReducer with TreeSum, across nodes (or at one rank): each rank sums its k buffers
    as the subtree they form and sends it, with its micro-shards' factors, to every rank, which
    finishes the tree over the N subtrees in rank order and makes the products. Collectives per
    step: Allgather(which weights are factors), Allgather(subtree sum and factors).
- FixedPointSum ('fixed-point'): every value becomes an integer on a grid fixed per parameter
  (2^-s, s from the largest magnitude among all M buffers, so a sum of M cannot overflow 62
  bits), and integers add exactly in any order: the int64 sums go through one Allreduce, then
  back to floats. Within about M * 2^-62 of the largest entry of each parameter of the exact
  sum, closer than a float32 sum. It takes no factors. Collectives per step: Allreduce(max) of
  one value per parameter, Allreduce(int64 buffer).

Interface of TreeSum and FixedPointSum: combine(buffers, out, packed) writes the sum of every
rank's buffers into out (packed: which weights this rank's passes stored as factors).
"""

import numpy as np

from .reducer import Reducer, finish_all
from .shared_memory import SharedMemoryReducer

GRID_BITS = 62  # a sum of M values each below 2^(62 - log2 M) stays below 2^62
TREE_PIECE_BYTES = 1 << 16  # the tree sums this much of each part at a time: M parts and M / 2 partial sums stay in cache
TILE_BYTES = 1 << 18  # output of one GEMM of a factored weight gradient (fixed: the tiles shape the bits)


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


def piece_starts(sizes):
    """Where consecutive pieces of these sizes start in a flat buffer: [0, s0, s0 + s1, ...]."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


class FactorLayout:
    """Where the 2-d parameters (affine weights, (D, C)) lie in the flat buffer; shapes: every
    piece of the buffer in order. Pass j of a step may store such a weight's gradient as its
    factors (dpnet.layers.WeightGradFactors: n rows of the layer input, (n, D), then n rows of
    the output gradient, (n, C)) in the gradient's own place, when they fit there for the
    step's largest micro-shard; packed[j, p] then holds n, else -1."""

    def __init__(self, shapes):
        offsets = piece_starts([int(np.prod(shape)) for shape in shapes]).tolist()
        self.weights = [(o, int(shape[0]), int(shape[1])) for o, shape in zip(offsets, shapes) if len(shape) == 2]
        self.index = {o: p for p, (o, _, _) in enumerate(self.weights)}

    def fits(self, p, rows):
        _, d, c = self.weights[p]
        return rows * (d + c) <= d * c


class FactorSlots:
    """What a pass uses to store affine weight gradients as factors in its send buffer, for a
    step whose global batch of `total` is cut into `micro_shards` (the largest holds rows_max)."""

    def __init__(self, layout, packed_row, total, micro_shards):
        self.layout, self.packed_row, self.rows_max = layout, packed_row, -(-total // micro_shards)
        packed_row[...] = -1

    def store(self, offset, factors, send):
        """Store factors (WeightGradFactors) of the weight at `offset` into send; False (nothing
        stored) where that weight takes no factors."""
        p = self.layout.index.get(offset)
        if p is None or not self.layout.fits(p, self.rows_max):
            return False
        n, (d, c) = factors.x2.shape[0], factors.shape
        if (d, c) != self.layout.weights[p][1:]:
            raise ValueError(f"factors of a ({d}, {c}) weight gradient given for the {self.layout.weights[p][1:]} "
                             f"weight at offset {offset} of the flat buffer")
        send[offset:offset + n * d].reshape(n, d)[...] = factors.x2
        send[offset + n * d:offset + n * (d + c)].reshape(n, c)[...] = factors.dout
        self.packed_row[p] = n
        return True


class InPlace:
    """The factors of a micro-shard that lie in its own buffer: self[p] starts at weight p's place."""

    def __init__(self, buffer, layout):
        self.buffer, self.layout = buffer, layout

    def __getitem__(self, p):
        return self.buffer[self.layout.weights[p][0]:]


def in_place(buffers, layout):
    return [InPlace(buffer, layout) for buffer in buffers]


class MicroShardSum:
    """The canonical sum of M micro-shard buffers, over a range of entries:
    - the gradient of an affine weight that every micro-shard stored as factors is X.T @ G over
      the whole global batch, X (B, D) and G (B, C) being the micro-shards' factors stacked in
      micro-shard order: one GEMM per tile of TILE_BYTES of output rows, tiles fixed by the
      weight's shape, so every entry comes from the same product at any N;
    - every other entry is the pairwise tree over micro-shard index (tree_sum_into), piece by
      piece in cache.
    Inputs: layout (FactorLayout), dtype."""

    def __init__(self, layout, dtype):
        self.layout, self.dtype = layout, np.dtype(dtype)
        self.piece = max(1, TREE_PIECE_BYTES // self.dtype.itemsize)
        self._scratch = {}

    def _buffer(self, key, shape):
        if key not in self._scratch or self._scratch[key].shape != shape:
            self._scratch[key] = np.empty(shape, dtype=self.dtype)
        return self._scratch[key]

    def factored(self, packed):
        """The weights (indices into layout.weights) every micro-shard stored as factors."""
        if not self.layout.weights:
            return []
        as_factors = np.asarray(packed) >= 0  # (M, weights)
        mixed = as_factors.any(axis=0) & ~as_factors.all(axis=0)
        if mixed.any():
            offsets = [self.layout.weights[p][0] for p in np.flatnonzero(mixed)]
            raise RuntimeError(f"micro-shards disagree on which affine weights they stored as factors (the weights "
                               f"at flat offsets {offsets}): every pass must store the same ones")
        return np.flatnonzero(as_factors.all(axis=0)).tolist()

    def sum(self, dense_parts, factors, packed, lo, hi, out, finish=None):
        """out[lo:hi] = the canonical sum; finish(out, a, b) after each finished piece.
        dense_parts: a power-of-two number of buffers whose entries outside the factored weights
        are tree-summed (the M micro-shards' buffers, or subtree sums of them); factors: for each
        of the M micro-shards, factors[m][p] is the flat array that starts with its factors of
        weight p (in_place(buffers) where they lie in the buffers; None: leave the factored
        weights' entries); packed: (M, weights), as in FactorLayout."""
        if hi <= lo:
            return
        factored = self.factored(packed)
        spans = sorted((o, o + d * c, p) for p, (o, d, c) in enumerate(self.layout.weights) if p in factored)
        at = lo
        for start, stop, p in spans + [(hi, hi, None)]:
            if stop <= at:
                continue
            self._tree(dense_parts, at, min(start, hi), out, finish)
            if p is None or start >= hi:
                break
            if factors is not None:
                self._product(factors, np.asarray(packed)[:, p], p, max(at, start), min(stop, hi), out, finish)
            at = min(stop, hi)

    def _tree(self, parts, lo, hi, out, finish):
        scratch = self._buffer("tree", (max(1, len(parts) // 2), self.piece))
        for a in range(lo, hi, self.piece):
            b = min(a + self.piece, hi)
            tree_sum_into([part[a:b] for part in parts], out[a:b], [row[:b - a] for row in scratch])
            if finish is not None:
                finish(out, a, b)

    def _product(self, factors, rows, p, lo, hi, out, finish):
        """Entries [lo, hi) of weight p's gradient, X.T @ G, tile by tile."""
        o, d, c = self.layout.weights[p]
        total = int(rows.sum())
        grads = self._buffer(("G", p), (total, c))  # G, (B, C): every micro-shard's rows in order
        starts = np.concatenate([[0], np.cumsum(rows)]).astype(int)
        parts = [shard[p] for shard in factors]  # each: X rows (n, d), then G rows (n, c), flat
        for m, part in enumerate(parts):
            n = int(rows[m])
            grads[starts[m]:starts[m + 1]] = part[n * d:n * (d + c)].reshape(n, c)
        tile = min(d, max(1, TILE_BYTES // (c * self.dtype.itemsize)))  # rows of the weight per GEMM
        inputs = self._buffer(("X", p), (total, tile))
        staged = self._buffer(("out", p), (tile, c))
        row_end = -(-(hi - o) // c)
        first, last = (lo - o) // c // tile, -(-row_end // tile)
        for t in range(first, last):
            a, b = t * tile, min((t + 1) * tile, d)  # weight rows of this tile
            x_tile = inputs[:, :b - a]
            for m, part in enumerate(parts):
                n = int(rows[m])
                x_tile[starts[m]:starts[m + 1]] = part[:n * d].reshape(n, d)[:, a:b]
            u, v = max(lo, o + a * c), min(hi, o + b * c)  # the tile's entries in the range
            inside = u == o + a * c and v == o + b * c
            dest = out[u:v].reshape(b - a, c) if inside else staged[:b - a]
            np.matmul(x_tile.T, grads, out=dest)
            if not inside:
                out[u:v] = dest.reshape(-1)[u - (o + a * c):v - (o + a * c)]
            if finish is not None:
                finish(out, u, v)


class TreeSum:
    name = "tree"
    takes_factors = True

    def __init__(self, comm, layout, dtype):
        self.comm, self.layout = comm, layout
        self.summer = MicroShardSum(layout, dtype)
        self._local = self._subtrees = None  # this rank's subtree sum; every rank's, as received

    def combine(self, buffers, out, packed):
        """buffers: this rank's k micro-shard buffers; packed: (k, weights)."""
        count = len(out)
        if self.comm.size == 1:
            self.summer.sum(buffers, in_place(buffers, self.layout), packed, 0, count, out)
            return out
        # each rank sends the subtree sum of its buffers' other entries, then its micro-shards' factors
        weights, k, size = len(self.layout.weights), len(buffers), self.comm.size
        packed_all = (self.comm.allgather(np.ascontiguousarray(packed)).reshape(-1, weights) if weights else
                      np.zeros((k * size, 0), dtype=np.int64))
        factored = self.summer.factored(packed_all)
        spans = sorted((self.layout.weights[p][0], p, int(packed_all[:, p].max()) * sum(self.layout.weights[p][1:]))
                       for p in factored)  # (offset, weight, factor values each micro-shard sends)
        dense, at = [], 0  # the ranges of the buffer outside the factored weights
        for o, p, _ in spans:
            _, d, c = self.layout.weights[p]
            dense.append((at, o))
            at = o + d * c
        dense.append((at, count))
        width = sum(b - a for a, b in dense) + k * sum(n for _, _, n in spans)
        if self._local is None or len(self._local) != count:
            self._local = np.empty(count, dtype=out.dtype)
            self._subtrees = np.empty((size, count), dtype=out.dtype)
        self.summer.sum(buffers, None, packed, 0, count, self._local)  # the subtree; factored entries left
        wire = np.empty(width, dtype=out.dtype)
        at = 0
        for a, b in dense:
            wire[at:at + b - a] = self._local[a:b]
            at += b - a
        for buf in buffers:
            for o, _, n in spans:
                wire[at:at + n] = buf[o:o + n]
                at += n
        gathered = self.comm.allgather(wire)  # (N, width), in rank order
        factors = []
        for row, subtree in zip(gathered, self._subtrees):
            at = 0
            for a, b in dense:
                subtree[a:b] = row[at:at + b - a]
                at += b - a
            for _ in buffers:
                shard = {}
                for _, p, n in spans:
                    shard[p] = row[at:at + n]
                    at += n
                factors.append(shard)
        self.summer.sum(list(self._subtrees), factors, packed_all, 0, count, out)
        return out


class FixedPointSum:
    name = "fixed-point"
    takes_factors = False

    def __init__(self, comm, micro_shards, sizes):
        """sizes: the lengths of the consecutive pieces of the flat buffer that get a grid each
        (one per parameter, one per tail entry)."""
        self.comm = comm
        self.headroom = int(np.log2(micro_shards))
        self.sizes = np.array(sizes, dtype=np.int64)
        self.starts = piece_starts(self.sizes)

    def combine(self, buffers, out, packed=None):
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


def canonical_summer(name, comm, micro_shards, shapes, dtype):
    """The canonical sum called `name` (CANONICAL_SUMS) over comm; shapes: the flat buffer's pieces."""
    if name == "tree":
        return TreeSum(comm, FactorLayout(shapes), dtype)
    if name == "fixed-point":
        return FixedPointSum(comm, micro_shards, [int(np.prod(shape)) for shape in shapes])
    raise ValueError(f"canonical sum must be one of {CANONICAL_SUMS}, got {name!r}")


class CanonicalReducer(Reducer):
    """The reducer of the reproducible mode: one send buffer per micro-shard pass of this rank
    (sends), summed by a canonical sum (TreeSum or FixedPointSum) into result; every rank holds
    its own copy and finishes every entry. The L2 loss rides in micro-shard 0's buffer only.
    With the tree, the passes store affine weight gradients as factors (factor_slots)."""

    def __init__(self, comm, count, dtype, passes, summer, layout):
        sends = [np.zeros(count, dtype=dtype) for _ in range(passes)]
        super().__init__(sends[0], np.zeros(count, dtype=dtype), (0, count), (0, count if comm.rank == 0 else 0))
        self.sends, self.loss_ranges = sends, [self.loss_range] + [(0, 0)] * (passes - 1)
        self.comm, self.summer, self.layout = comm, summer, layout
        self.packed = np.full((passes, len(layout.weights)), -1, dtype=np.int64)
        self.micro_shards = passes * comm.size
        self.name = f"reproducible-{summer.name}"

    def describe(self):
        return f"reproducible: {len(self.sends)} micro-shard(s) per rank, summed by {self.summer.name}"

    def factor_slots(self, j, total):
        """Where pass j stores factors this step (global batch of `total`), or None."""
        if not self.summer.takes_factors:
            return None
        return FactorSlots(self.layout, self.packed[j], total, self.micro_shards)

    def reduce(self, finish=None):
        self.summer.combine(self.sends, self.result, self.packed)
        finish_all(self.result, finish, *self.owned)
        return self.result


class SharedTreeReducer(SharedMemoryReducer):
    """The tree sum on one node, through shared memory: every micro-shard's pass writes its
    gradients into a shared segment of its own (M segments, rank r's k passes writing r*k ..
    r*k + k - 1), and each rank sums its slice of all M of them as the pairwise tree over
    micro-shard index, piece by piece in cache, into the shared result: the bits of TreeSum,
    with no copies through MPI (each buffer entry is read by one rank, except the factors of
    factored weights, which every rank reads: all of G, the X columns of its tiles). Like
    SharedMemoryReducer, the ranks share one copy of the parameters and each updates its slice
    (DividedUpdate: the update rules are elementwise, so the bits are those of every rank
    updating everything). Collectives per step, over the node: fence, fence.

    The L2 loss rides in micro-shard 0's buffer only, for all the weights: the same sum at any N."""

    def __init__(self, comm, node, cross, count, dtype, micro_shards, layout):
        if cross.size != 1:
            raise ValueError("SharedTreeReducer sums on one node; across nodes use TreeSum")
        super().__init__(comm, node, cross, count, dtype, segments=micro_shards)
        self.loss_range = (0, count if comm.rank == 0 else 0)
        self.loss_ranges = [self.loss_range] + [(0, 0)] * (len(self.sends) - 1)
        self.layout, self.micro_shards = layout, micro_shards
        self.summer = MicroShardSum(layout, dtype)
        weights = len(layout.weights)
        self.packed = node.allocate_shared(max(1, micro_shards * weights), np.int64)[:micro_shards * weights]
        self.packed = self.packed.reshape(micro_shards, weights)  # row m: micro-shard m's pass
        self._first = node.rank * len(self.sends)
        self.name = "reproducible-shared-memory-tree"

    def describe(self):
        return (f"reproducible: {len(self.sends)} micro-shard(s) per rank, summed by tree "
                f"in shared memory ({self.node.size} ranks)")

    def factor_slots(self, j, total):
        return FactorSlots(self.layout, self.packed[self._first + j], total, self.micro_shards)

    def reduce(self, finish=None):
        self.node.fence()  # every micro-shard's buffer and factors are written
        parts = list(self._segments)
        self.summer.sum(parts, in_place(parts, self.layout), self.packed, self.lo, self.hi, self._result, finish)
        self.node.fence()  # every slice is summed; nobody writes a buffer again before reading it
        return self.result
