"""A watchdog that ends an MPI job whose collective has hung, naming the silent rank(s).

When it starts a guarded step every rank posts a tiny non-blocking heartbeat (the
step number) to every other rank on a private duplicate of the communicator, and
receives its peers' heartbeats once the step's last collective has completed, so nothing
piles up. A background thread makes no MPI call while all is well; when the main thread
has been inside one step for longer than `timeout` seconds, it probes which peers never
posted that step's heartbeat (those are the silent ranks), prints that, and aborts the
job. MPI must provide MPI_THREAD_MULTIPLE (mpi4py asks for it by default).

    guard = make_guard(comm, timeout)   # a Watchdog, or Unguarded where none can serve
    guard.enter(step); ...collectives...; guard.leave(step)
    guard.close()                       # collective: thread and communicator released
"""

import contextlib
import sys
import threading
import time

import numpy as np


def make_guard(comm, timeout):
    """A Watchdog over comm, or Unguarded where there is nothing to guard (one rank, no
    timeout) or no way to end a hung rank (threads of one process)."""
    if timeout and comm.size > 1 and comm.abort_ends_every_rank:
        return Watchdog(comm, timeout)
    return Unguarded()


class _Guard:
    @contextlib.contextmanager
    def disarmed_on_error(self):
        """Stop guarding the step if it fails here: a caller that handles the error must not
        be aborted later."""
        try:
            yield
        except BaseException:
            self.disarm()
            raise


class Unguarded(_Guard):
    """The guard of a job with no watchdog: every call does nothing."""

    def enter(self, step, part=0):
        pass

    def leave(self, step, part=0):
        pass

    def disarm(self):
        pass

    def close(self):
        pass


class Watchdog(_Guard):
    """Inputs: comm, an MPIComm; timeout, seconds a guarded step may take."""

    def __init__(self, comm, timeout):
        self.comm = comm
        self.timeout = timeout
        self.heartbeats = comm.dup()
        self.peers = [r for r in range(comm.size) if r != comm.rank]
        self._inside = None  # (step, tag, entered at) while in a guarded collective
        self._heard = set()  # peers whose heartbeat for it leave() has received
        self._lock = threading.Lock()
        self._sends = []
        self._stamp = np.zeros(1, dtype=np.int64)
        self._inbox = np.zeros(1, dtype=np.int64)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dpnet-watchdog", daemon=True)
        self._thread.start()

    def enter(self, step, part=0):
        """Call when the guarded `step` (or its part 0 or 1: gradients, update) starts,
        before its first collective."""
        self._stamp[0] = step
        tag = _tag(step, part)
        self._sends = [self.heartbeats.isend(self._stamp, dest=peer, tag=tag) for peer in self.peers]
        with self._lock:
            self._heard = set()
            self._inside = (step, tag, time.monotonic())

    def leave(self, step, part=0):
        """Call once the last collective of `step` (or its part) has completed. Waits, still
        guarded, for every peer's heartbeat: a collective over only some ranks (a node's)
        says nothing of the others."""
        for peer in self.peers:
            self.heartbeats.recv(self._inbox, source=peer, tag=_tag(step, part))
            with self._lock:
                self._heard.add(peer)
        with self._lock:
            self._inside = None
        self.heartbeats.wait_all(self._sends)

    def disarm(self):
        """Stop guarding the current step without waiting for the peers (it failed here)."""
        with self._lock:
            self._inside = None

    def close(self):
        """Collective: stop the watching thread and release the heartbeat communicator."""
        self._closed.set()
        self._thread.join()
        self.heartbeats.free()

    def _watch(self):
        while not self._closed.wait(min(1.0, self.timeout / 4)):
            with self._lock:
                inside, heard = self._inside, set(self._heard)
            if inside is None or time.monotonic() - inside[2] < self.timeout:
                continue
            step, tag = inside[:2]
            silent = [p for p in self.peers
                      if p not in heard and not self.heartbeats.iprobe(source=p, tag=tag)]
            who = f"rank(s) {silent} never reached it" if silent else "every rank reached it"
            sys.stderr.write(
                f"[rank {self.comm.rank}] watchdog: step {step} has not completed in {self.timeout:g} s; "
                f"{who}. Aborting the job.\n")
            sys.stderr.flush()
            time.sleep(0.5)  # let the launcher forward the message before Abort tears it down
            self.comm.abort(1)


def _tag(step, part):
    return (2 * step + part) % 32768  # MPI guarantees tags up to 32767
