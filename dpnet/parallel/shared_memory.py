"""Summing one array over MPI ranks through node-local shared memory (MPI-3 windows).

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
    reducer.share_slices(params)        # after each rank changed params[reducer.lo:reducer.hi]

`result` is shared by the ranks of a node, so it is returned read-only: a rank that
wrote into it would change every other rank's copy.
"""

import os

import numpy as np

ALIGN_BYTES = 64  # slices start on cache lines, so ranks never write the same line
PIECE_BYTES = 1 << 18  # on one node, sum and finish in pieces this size, which stay in cache
SHM_DIR = "/dev/shm"  # where MPICH and Open MPI place shared windows on Linux
SHM_HEADROOM = 1.25  # leave room in /dev/shm beyond the window itself


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
        MPI = comm.MPI
        self.comm, self.count, self.dtype = comm, count, np.dtype(dtype)
        self.node, self.cross = node_comm, cross_comm
        per_line = max(1, ALIGN_BYTES // self.dtype.itemsize)
        stride = -(-count // per_line) * per_line  # each segment starts on a cache line
        segments = self.node.Get_size() + 2  # one per rank, the result, a staging area
        nbytes = segments * stride * self.dtype.itemsize
        self.window = MPI.Win.Allocate_shared(nbytes if self.node.Get_rank() == 0 else 0,
                                              self.dtype.itemsize, comm=self.node)
        memory, _ = self.window.Shared_query(0)
        shared = np.ndarray(buffer=memory, dtype=self.dtype, shape=(segments, stride))
        self.window.Lock_all(MPI.MODE_NOCHECK)  # passive target: we synchronise with barriers
        rank, size = self.node.Get_rank(), self.node.Get_size()
        self._segments = shared[:size, :count]  # (ranks on the node, count)
        self._result = shared[size, :count]
        self._stage = shared[size + 1, :count]
        self.send = self._segments[rank]
        self._piece = PIECE_BYTES // self.dtype.itemsize
        lines = -(-count // per_line)
        self.lo = min(count, rank * lines // size * per_line)
        self.hi = min(count, (rank + 1) * lines // size * per_line)
        self.send[...] = 0  # first touch by the owner places its pages near it
        self._result[self.lo:self.hi] = 0
        self.result = self._result.view()
        self.result.flags.writeable = False
        self.sync()

    @classmethod
    def create(cls, comm, count, dtype, node_comm=None):
        """Collective over comm: (reducer, None), or (None, the reason) on every rank alike
        when shared memory cannot serve: ranks spread unevenly over nodes, or too little
        room in /dev/shm on some node."""
        MPI, world = comm.MPI, comm.comm
        if node_comm is None:
            node_comm = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
        node_size = node_comm.Get_size()
        needed = (node_size + 1) * count * np.dtype(dtype).itemsize
        free = _shm_bytes_free() if node_comm.Get_rank() == 0 else None
        short = int(free is not None and free < SHM_HEADROOM * needed)
        # [min ranks per node, max ranks per node, any node short of shared memory]
        facts = np.array([-node_size, node_size, short], dtype=np.int64)
        world.Allreduce(MPI.IN_PLACE, facts, op=MPI.MAX)
        if -facts[0] != facts[1]:
            node_comm.Free()
            return None, f"nodes hold different numbers of ranks ({-facts[0]} to {facts[1]})"
        if facts[2]:
            node_comm.Free()
            return None, (f"{SHM_DIR} has less than {SHM_HEADROOM:g} x {needed / 2**20:.1f} MiB free "
                          f"on some node")
        cross_comm = world.Split(color=node_comm.Get_rank(), key=world.Get_rank())
        return cls(comm, count, dtype, node_comm, cross_comm), None

    def sync(self):
        """Make every rank's writes to the window visible to every other rank on the node."""
        self.window.Sync()
        self.node.Barrier()
        self.window.Sync()

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

    def share_slices(self, array):
        """Make `array` (length <= count, one per rank) whole on every rank, when each
        rank has computed only its own slice array[lo:hi]: the others are copied in
        through shared memory. With several nodes every node must have computed the same
        slices (as after reduce(), whose slices agree over nodes), so this stays on the node.

        Between two calls there must be a reduce() or a sync(), so that no rank
        overwrites the staging area while another is still reading it."""
        lo, hi = min(self.lo, len(array)), min(self.hi, len(array))
        self._stage[lo:hi] = array[lo:hi]
        self.sync()
        array[:lo] = self._stage[:lo]
        array[hi:] = self._stage[hi:len(array)]

    def free(self):
        """Release the window and the communicators (collective over the node)."""
        self.window.Unlock_all()
        self.window.Free()
        self.node.Free()
        self.cross.Free()
