"""Gradient reducers through node-local shared memory.

The ranks of a node share one array (comm.allocate_shared): a segment per rank, where each
rank writes its contribution (`send`; or k segments per rank, one per pass of a step, for the
reproducible mode's dpnet.parallel.canonical.SharedTreeReducer), and one `result` segment that
every rank of the node reads. To reduce, node rank r sums slice r of every rank's segment, in rank order,
into slice r of `result`. Every byte is read once from where it was written: no copies
through MPI's own buffers, which is what makes this faster than Allreduce within a node.

- SharedMemoryReducer (one node). Collectives per step, over the node: fence (every
  send written), then, once each rank has summed and finished its slice, fence (every
  slice summed before anyone reads the result or writes send again).
- HierarchicalReducer (several nodes of equal size, as Horovod's hierarchical allreduce):
  the same, with an Allreduce of each rank's summed slice among the ranks that own that
  slice on the other nodes (`cross`) between the two fences.

The node's ranks also hold one copy of the parameters and optimizer state
(shared_array; dpnet.parallel.update.DividedUpdate), each updating its own slice.
`result` is shared by the ranks of a node, so it is read-only: a rank that wrote into it
would change every other rank's copy.
"""

import numpy as np

from .reducer import Reducer

ALIGN_BYTES = 64  # slices start on cache lines, so ranks never write the same line
PIECE_BYTES = 1 << 18  # on one node, sum and finish in pieces this size, which stay in cache


class SharedMemoryReducer(Reducer):
    """Inputs: comm (the world), node and cross (from comm.split_by_node()), count
    (entries), dtype; segments: how many send segments the node holds (a multiple of its
    ranks, default one per rank), node rank r writing the k = segments / ranks segments
    r*k .. r*k + k - 1 (`sends`, one per pass of a step)."""

    name = "shared-memory"

    def __init__(self, comm, node, cross, count, dtype, segments=None):
        self.comm, self.node, self.cross = comm, node, cross
        self.count, self.dtype = count, np.dtype(dtype)
        per_line = max(1, ALIGN_BYTES // self.dtype.itemsize)
        lines = -(-count // per_line)  # each segment starts on a cache line
        rank, size = node.rank, node.size
        segments = size if segments is None else segments
        if segments % size:
            raise ValueError(f"{segments} send segments cannot be shared equally by {size} ranks")
        k = segments // size
        shared = node.allocate_shared((segments + 1) * lines * per_line, self.dtype).reshape(segments + 1, -1)
        self._segments = shared[:segments, :count]  # (segments, count)
        self._result = shared[segments, :count]
        self.lo = min(count, rank * lines // size * per_line)
        self.hi = min(count, (rank + 1) * lines // size * per_line)
        self._piece = PIECE_BYTES // self.dtype.itemsize
        result = self._result.view()
        result.flags.writeable = False
        super().__init__(self._segments[rank * k], result, (self.lo, self.hi),
                         (self.lo, self.hi) if cross.rank == 0 else (0, 0))
        self.sends = list(self._segments[rank * k:(rank + 1) * k])
        for send in self.sends:
            send[...] = 0  # first touch by the owner places its pages near it
        self._result[self.lo:self.hi] = 0
        node.fence()

    def describe(self):
        return f"1 node x {self.node.size} ranks: shared memory"

    def make_update(self, flat):
        from .update import DividedUpdate
        return DividedUpdate(self, flat)

    def shared_array(self, length, fill=None):
        """Collective over the node: a 1-d array of `length` (<= count) elements that every
        rank of the node sees as one. Each rank writes its slice [lo:hi) of fill (default
        zeros) into it, so it is whole once every rank has called fence()."""
        if length > self.count:
            raise ValueError(f"a shared array holds at most {self.count} elements, asked for {length}")
        array = self.node.allocate_shared(length, self.dtype)
        lo, hi = min(self.lo, length), min(self.hi, length)
        array[lo:hi] = 0 if fill is None else fill[lo:hi]  # first touch by the slice's owner
        return array

    def broadcast(self, array):
        """Collective: make a shared_array() equal, on every node, to node 0's copy (world
        rank 0 is rank 0 of node 0)."""
        self.node.fence()
        if self.node.rank == 0 and self.cross.size > 1:
            self.cross.bcast(array, root=0)
        self.node.fence()

    def reduce(self, finish=None):
        """Sum every rank's send into result (read-only, shared on the node) and return it.
        finish(result, lo, hi) is called with the writable result once result[lo:hi] holds
        the global sum, on disjoint pieces that cover [self.lo, self.hi)."""
        self.node.fence()  # every rank's send is written
        for lo in range(self.lo, self.hi, self._piece):  # piece by piece, in cache
            hi = min(lo + self._piece, self.hi)
            self._sum_node(lo, hi)
            if finish is not None:
                finish(self._result, lo, hi)
        self.node.fence()  # every slice is summed; nobody writes send again before reading it
        return self.result

    def _sum_node(self, lo, hi):
        """result[lo:hi] = the node's segments summed in rank order."""
        out, parts = self._result[lo:hi], self._segments[:, lo:hi]
        if len(parts) == 1:
            out[...] = parts[0]
            return
        np.add(parts[0], parts[1], out=out)
        for part in parts[2:]:
            out += part

    def close(self):
        self.node.free()  # its shared arrays with it
        self.cross.free()


class HierarchicalReducer(SharedMemoryReducer):
    """SharedMemoryReducer on each node, then an Allreduce of each slice across nodes."""

    name = "hierarchical"

    def describe(self):
        if self.node.size == 1:
            return f"{self.cross.size} nodes x 1 rank: Allreduce across nodes"
        return f"{self.cross.size} nodes x {self.node.size} ranks: shared memory within each node, Allreduce across nodes"

    def reduce(self, finish=None):
        self.node.fence()
        self._sum_node(self.lo, self.hi)
        self.cross.allreduce(self._result[self.lo:self.hi])
        if finish is not None:
            finish(self._result, self.lo, self.hi)
        self.node.fence()
        return self.result
