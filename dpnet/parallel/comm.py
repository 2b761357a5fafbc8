"""Communicators: one small interface, three implementations.

Every communicator has `rank`, `size` and these collectives, all on NumPy arrays
(buffer-based, no pickling) except `bcast_obj`, which is for small metadata:

- allreduce(array, op="sum") -> array   reduces in place over ranks ("sum", "min", "max")
- allgather(array) -> (size, *array.shape) array of every rank's array, in rank order
- bcast(array, root=0) -> array          overwrites array with root's, in place
- bcast_obj(obj, root=0) -> obj           pickled broadcast of a small object
- allgather_obj(obj) -> list              pickled gather of a small object from every rank
- barrier()
- abort(code)                             ends every rank of the job at once

Capabilities that data parallelism builds on (SimComm and MPIComm have them all;
SerialComm, a world of one, needs none of them):

- split_by_node() -> (node, cross)        node: the ranks that share memory with this one
                                           (DPNET_RANKS_PER_NODE=k pretends nodes hold k);
                                           cross: the ranks with this one's node rank, one per node
- allocate_shared(length, dtype) -> array collective over a node communicator: one 1-d array
                                           every rank of it sees; contents undefined until written
- fence()                                 every rank's writes to shared arrays become visible
                                           to every other rank (a barrier with memory ordering)
- shared_bytes_free() -> int or None      room left for shared arrays on this node
- dup() -> comm                           the same ranks, collectives that never mix with these
- free()                                  releases a communicator from split_by_node() or dup()
                                           and its shared arrays
- thread_multiple                         another thread may run collectives (on a dup())
- abort_ends_every_rank                   abort() ends even a rank that hangs (processes: yes;
                                           threads: no), so a watchdog can end a hung job

MPIComm alone has point-to-point calls, which its watchdog's heartbeats use:
isend(array, dest, tag) -> request, recv(array, source, tag), iprobe(source, tag), probe_status(tag),
wait_all(requests).

SerialComm is the world of one process; MPIComm wraps an mpi4py communicator;
SimComm (dpnet.parallel.simcomm) runs N logical ranks as threads of one process.
"""

import os
import pickle

import numpy as np

# Environment variables that MPI launchers (MPICH/Intel hydra, Open MPI, PMIx, SLURM srun) set per rank.
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")

REDUCE_OPS = ("sum", "min", "max")


def _check_op(op):
    if op not in REDUCE_OPS:
        raise ValueError(f"op must be one of {REDUCE_OPS}, got {op!r}")


class SerialComm:
    """The communicator of a single process: every collective is the identity."""

    rank = 0
    size = 1

    def allreduce(self, array, op="sum"):
        _check_op(op)
        return array

    def allgather(self, array):
        return np.asarray(array)[None].copy()

    def bcast(self, array, root=0):
        return array

    def bcast_obj(self, obj, root=0):
        return obj

    def allgather_obj(self, obj):
        return [obj]

    def barrier(self):
        pass

    def abort(self, code=1):
        os._exit(code)

    thread_multiple = True  # nothing to reduce: no thread ever waits for another rank
    abort_ends_every_rank = True

    def __repr__(self):
        return "SerialComm()"


RANKS_PER_NODE_ENV = "DPNET_RANKS_PER_NODE"  # testing: treat each group of this many ranks as a node
SHM_DIR = "/dev/shm"  # where MPICH and Open MPI place shared windows on Linux


def ranks_per_node(environ=None):
    """The node size DPNET_RANKS_PER_NODE asks to pretend (None: the real nodes)."""
    value = (os.environ if environ is None else environ).get(RANKS_PER_NODE_ENV)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{RANKS_PER_NODE_ENV} must be a positive integer, got {value!r}")
    return int(value)


class MPIComm:
    """dpnet's interface over an mpi4py communicator (default: COMM_WORLD).

    The array collectives are MPI's non-blocking ones, waited for by polling: a blocking
    MPICH collective that cannot finish (a lost link) keeps MPI's lock, and then no other
    thread, the watchdog's included, could make an MPI call to find out why."""

    def __init__(self, mpi_comm=None):
        MPI = import_mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._ops = {"sum": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}
        self._windows = []  # from allocate_shared

    def allreduce(self, array, op="sum"):
        _check_op(op)
        if not array.flags.c_contiguous:
            raise ValueError("allreduce needs a C-contiguous array (it reduces in place)")
        _wait(self.comm.Iallreduce(self.MPI.IN_PLACE, array, op=self._ops[op]))
        return array

    def allgather(self, array):
        array = np.ascontiguousarray(array)
        out = np.empty((self.size,) + array.shape, dtype=array.dtype)
        _wait(self.comm.Iallgather(array, out))
        return out

    def bcast(self, array, root=0):
        if not array.flags.c_contiguous:
            raise ValueError("bcast needs a C-contiguous array (it broadcasts in place)")
        _wait(self.comm.Ibcast(array, root=root))
        return array

    def bcast_obj(self, obj, root=0):
        # a bytearray, so the root's buffer is writable as Ibcast wants
        data = np.frombuffer(bytearray(pickle.dumps(obj)), dtype=np.uint8) if self.rank == root else None
        size = np.array([0 if data is None else data.size], dtype=np.int64)
        self.bcast(size, root)
        data = np.empty(int(size[0]), dtype=np.uint8) if data is None else data
        self.bcast(data, root)
        return pickle.loads(data.tobytes())

    def allgather_obj(self, obj):
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        sizes = self.allgather(np.array([data.size], dtype=np.int64))[:, 0]
        out = np.empty(int(sizes.sum()), dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        _wait(self.comm.Iallgatherv(data, [out, (sizes, offsets), self.MPI.BYTE]))
        return [pickle.loads(out[o:o + n].tobytes()) for o, n in zip(offsets, sizes)]

    def barrier(self):
        _wait(self.comm.Ibarrier())

    def dup(self):
        """A new communicator over the same ranks whose collectives never mix with these
        (another thread may use it concurrently under MPI_THREAD_MULTIPLE)."""
        return MPIComm(self.comm.Dup())

    def split_by_node(self):
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        per_node = ranks_per_node()
        if per_node:  # pretend nodes are smaller: exercises the multi-node paths on one machine
            real = node
            node = real.Split(color=real.Get_rank() // per_node, key=real.Get_rank())
            real.Free()
        cross = self.comm.Split(color=node.Get_rank(), key=self.rank)
        return MPIComm(node), MPIComm(cross)

    def allocate_shared(self, length, dtype):
        MPI, dtype = self.MPI, np.dtype(dtype)
        window = MPI.Win.Allocate_shared(length * dtype.itemsize if self.rank == 0 else 0, dtype.itemsize,
                                         comm=self.comm)
        window.Lock_all(MPI.MODE_NOCHECK)  # passive target: fence() synchronises with barriers
        self._windows.append(window)
        memory, _ = window.Shared_query(0)
        return np.ndarray(buffer=memory, dtype=dtype, shape=(length,))

    def fence(self):
        for window in self._windows:
            window.Sync()
        _wait(self.comm.Ibarrier())
        for window in self._windows:
            window.Sync()

    def shared_bytes_free(self):
        try:
            st = os.statvfs(SHM_DIR)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def free(self):
        for window in self._windows:
            window.Unlock_all()
            window.Free()
        self._windows = []
        self.comm.Free()

    def isend(self, array, dest, tag):
        return self.comm.Isend(array, dest=dest, tag=tag)

    def recv(self, array, source, tag):
        _wait(self.comm.Irecv(array, source=source, tag=tag))

    def iprobe(self, source, tag):
        return self.comm.Iprobe(source=source, tag=tag)

    def probe_status(self, tag):
        """The source of a waiting message with `tag` from any rank, or None."""
        status = self.MPI.Status()
        if self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=tag, status=status):
            return status.Get_source()
        return None

    def wait_all(self, requests):
        self.MPI.Request.Waitall(requests)

    @property
    def thread_multiple(self):
        return self.MPI.Query_thread() == self.MPI.THREAD_MULTIPLE

    abort_ends_every_rank = True

    def abort(self, code=1):
        from .shm_leftovers import unlink_own
        from .guardian import expect_exit
        unlink_own()  # MPICH would leave its shared-memory segments behind
        expect_exit()  # whoever aborts has said why
        self.comm.Abort(code)

    def __repr__(self):
        return f"MPIComm(rank={self.rank}, size={self.size})"


_waiting = [0]  # threads of this process waiting in a collective now (see waiting_in_collective)


def waiting_in_collective():
    """True while a thread of this process waits for an MPIComm collective to complete: what a
    watchdog tells its peers, so a rank busy elsewhere (computing, stuck) can be told apart."""
    return _waiting[0] > 0


def _wait(request):
    """Wait for a non-blocking MPI call, leaving MPI's lock free between polls (and the core
    to another process between them: ranks may outnumber cores)."""
    _waiting[0] += 1
    try:
        while not request.Test():
            os.sched_yield()
    finally:
        _waiting[0] -= 1


def import_mpi():
    """Import mpi4py.MPI, or explain how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "dpnet needs mpi4py to run under an MPI launcher: `pip install mpi4py mpich` installs "
            "both with a bundled MPICH; on a cluster, build mpi4py against the system MPI with "
            "`env MPICC=$(which mpicc) pip install --no-binary mpi4py mpi4py` "
            f"(import failed: {exc})"
        ) from exc
    return MPI


LAUNCHER_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def launcher_rank(environ=None):
    """This process's rank as the launcher's environment says (0 without a launcher), read
    without initialising MPI: for deciding who prints an error found before MPI starts."""
    environ = os.environ if environ is None else environ
    for name in LAUNCHER_RANK_VARIABLES:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 0


def launched_by_mpi(environ=None):
    """True when an MPI launcher (mpirun/mpiexec/srun) started this process."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in LAUNCHER_SIZE_VARIABLES)


def get_comm():
    """The MPI world when launched by mpirun/mpiexec/srun, else a SerialComm.

    A plain `python ...` never initialises MPI, so single-process runs and most tests
    need no launcher.
    """
    if launched_by_mpi():
        return MPIComm()
    return SerialComm()
