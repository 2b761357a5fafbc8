"""Node-local shared memory (MPI-3 windows) for data parallelism: summing gradients over
ranks, and arrays that the ranks of a node hold as one.

The ranks on a node share one window: a segment per rank, where each rank writes its
contribution (`send`), and one `result` segment that every rank on the node reads. To
reduce, node-local rank r sums slice r of every rank's segment, in rank order, into
slice r of `result`; with several nodes it then Allreduces that slice with the ranks
that own the same slice on the other nodes (a hierarchical allreduce, as Horovod's).
Every byte is read once from where it was written: no copies through MPI's own
buffers, which is what makes this faster than Allreduce between ranks of one node.

    reducer, why_not = SharedMemoryAllreduce.create(comm, count, np.float32)  # None, reason if unusable
    reducer.send[...] = my_contribution
    total = reducer.reduce()            # reducer.result: the sum, the same on every rank
    params = reducer.shared_array(n)    # one array for the whole node (collective)

`result` is shared by the ranks of a node, so it is returned read-only: a rank that
wrote into it would change every other rank's copy.
"""

import os

import numpy as np

ALIGN_BYTES = 64  # slices start on cache lines, so ranks never write the same line
PIECE_BYTES = 1 << 18  # on one node, sum and finish in pieces this size, which stay in cache
SHM_DIR = "/dev/shm"  # where MPICH and Open MPI place shared windows on Linux
SHM_HEADROOM = 1.25  # leave room in /dev/shm beyond the windows themselves
RANKS_PER_NODE_ENV = "DPNET_RANKS_PER_NODE"  # testing: treat each group of this many ranks as a node
SPARE_ARRAYS = 3  # shared_array()s of `count` elements room is checked for: parameters, Adam's m and v


def _shm_bytes_free(path=SHM_DIR):
    """Bytes free in the shared-memory file system, or None where there is none to check."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class SharedMemoryAllreduce:
    """Sum of `send` over the ranks of an MPIComm, into the read-only `result`.

    Build it with create(), which every rank must call; use reduce() on every rank, in
    the same order as the communicator's other collectives.

    Inputs of create():
    - comm: a dpnet MPIComm
    - count: elements in the array
    - dtype: its floating dtype
    - node_comm: an mpi4py communicator of the ranks that share memory with this one
      (default: comm split by shared-memory domain, i.e. by node); every node must
      hold the same number of ranks
    """

    def __init__(self, comm, count, dtype, node_comm, cross_comm):
        self.comm, self.count, self.dtype = comm, count, np.dtype(dtype)
        self.node, self.cross = node_comm, cross_comm
        per_line = max(1, ALIGN_BYTES // self.dtype.itemsize)
        lines = -(-count // per_line)  # each segment starts on a cache line
        rank, size = self.node.Get_rank(), self.node.Get_size()
        self.windows = []
        shared = self._allocate((size + 1, lines * per_line))
        self._segments = shared[:size, :count]  # (ranks on the node, count)
        self._result = shared[size, :count]
        self.send = self._segments[rank]
        self._piece = PIECE_BYTES // self.dtype.itemsize
        self.lo = min(count, rank * lines // size * per_line)
        self.hi = min(count, (rank + 1) * lines // size * per_line)
        self.send[...] = 0  # first touch by the owner places its pages near it
        self._result[self.lo:self.hi] = 0
        self.result = self._result.view()
        self.result.flags.writeable = False
        self.sync()

    @classmethod
    def create(cls, comm, count, dtype, node_comm=None, shared_nodes_only=False):
        """Collective over comm: (reducer, None), or (None, the reason) on every rank alike
        when shared memory cannot serve: ranks spread unevenly over nodes, too little room
        in /dev/shm on some node, or (with shared_nodes_only) one rank per node, where
        there is nothing to share."""
        MPI, world = comm.MPI, comm.comm
        if node_comm is None:
            node_comm = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
            per_node = os.environ.get(RANKS_PER_NODE_ENV)
            if per_node:  # pretend nodes are smaller: exercises the multi-node path on one machine
                real = node_comm
                node_comm = real.Split(color=real.Get_rank() // int(per_node), key=real.Get_rank())
                real.Free()
        node_size = node_comm.Get_size()
        needed = (node_size + 1 + SPARE_ARRAYS) * count * np.dtype(dtype).itemsize
        free = _shm_bytes_free() if node_comm.Get_rank() == 0 else None
        short = int(free is not None and free < SHM_HEADROOM * needed)
        # [min ranks per node, max ranks per node, any node short of shared memory]
        facts = np.array([-node_size, node_size, short], dtype=np.int64)
        world.Allreduce(MPI.IN_PLACE, facts, op=MPI.MAX)
        why_not = None
        if -facts[0] != facts[1]:
            why_not = f"nodes hold different numbers of ranks ({-facts[0]} to {facts[1]})"
        elif shared_nodes_only and facts[1] == 1:
            why_not = "one rank per node: nothing to share"
        elif facts[2]:
            why_not = f"{SHM_DIR} has less than {SHM_HEADROOM:g} x {needed / 2**20:.1f} MiB free on some node"
        if why_not is not None:
            node_comm.Free()
            return None, why_not
        cross_comm = world.Split(color=node_comm.Get_rank(), key=world.Get_rank())
        return cls(comm, count, dtype, node_comm, cross_comm), None

    def _allocate(self, shape):
        """A new window of `shape` (self.dtype) held by node rank 0, mapped by every rank."""
        MPI = self.comm.MPI
        nbytes = int(np.prod(shape)) * self.dtype.itemsize
        window = MPI.Win.Allocate_shared(nbytes if self.node.Get_rank() == 0 else 0,
                                         self.dtype.itemsize, comm=self.node)
        window.Lock_all(MPI.MODE_NOCHECK)  # passive target: we synchronise with barriers
        self.windows.append(window)
        memory, _ = window.Shared_query(0)
        return np.ndarray(buffer=memory, dtype=self.dtype, shape=shape)

    def shared_array(self, length, fill=None):
        """Collective over the node: a 1-d array of `length` (<= count) elements that
        every rank of the node sees as one. Each rank writes its slice [lo:hi) of fill
        (default zeros) into it, so it is whole once every rank has called sync()."""
        if length > self.count:
            raise ValueError(f"a shared array holds at most {self.count} elements, asked for {length}")
        array = self._allocate((length,))
        lo, hi = min(self.lo, length), min(self.hi, length)
        array[lo:hi] = 0 if fill is None else fill[lo:hi]  # first touch by the slice's owner
        return array

    def broadcast(self, array):
        """Collective: make a shared_array() equal, on every node, to node 0's copy (world
        rank 0 is rank 0 of node 0): one Bcast among the nodes' first ranks."""
        self.sync()
        if self.node.Get_rank() == 0 and self.cross.Get_size() > 1:
            self.cross.Bcast(array, root=0)
        self.sync()

    def sync(self):
        """Make every rank's writes to shared memory visible to every other rank on the node."""
        for window in self.windows:
            window.Sync()
        self.node.Barrier()
        for window in self.windows:
            window.Sync()

    def reduce(self, finish=None):
        """Sum every rank's `send` into `result` and return it (read-only, shared on the node).

        finish(result, lo, hi): optional; called with the writable result once
        result[lo:hi] holds the global sum, to change that slice in place before the
        other ranks can read it. The calls cover this rank's slice [self.lo, self.hi)
        in one or more disjoint pieces; no two ranks get the same entries.
        """
        self.sync()  # every rank's send is written
        if self.cross.Get_size() == 1:  # one node: sum and finish piece by piece, in cache
            for lo in range(self.lo, self.hi, self._piece):
                hi = min(lo + self._piece, self.hi)
                self._sum_node(lo, hi)
                if finish is not None:
                    finish(self._result, lo, hi)
        else:
            self._sum_node(self.lo, self.hi)
            self.cross.Allreduce(self.comm.MPI.IN_PLACE, self._result[self.lo:self.hi], op=self.comm.MPI.SUM)
            if finish is not None:
                finish(self._result, self.lo, self.hi)
        self.sync()  # every slice is summed; nobody writes send again before reading it
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

    def free(self):
        """Release the windows and the communicators (collective over the node); arrays
        from shared_array() and `result` must not be used after."""
        for window in self.windows:
            window.Unlock_all()
            window.Free()
        self.windows = []
        self.node.Free()
        self.cross.Free()
