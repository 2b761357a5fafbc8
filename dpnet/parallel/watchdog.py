"""A watchdog that ends an MPI job whose collective has hung, naming the silent rank(s).

When it starts a guarded step every rank posts a tiny non-blocking heartbeat (the
step number) to every other rank on a private duplicate of the communicator, and
receives its peers' heartbeats once the step's last collective has completed, so nothing
piles up. A background thread answers other ranks' pings (one probe a second) and
watches: when the main thread has been inside one step for longer than `timeout`
seconds, it probes which peers never posted that step's heartbeat (they never reached
it) and pings the others (those that do not answer within PING_SECONDS are unreachable:
a lost link, a dead host, a process stopped), prints that, and aborts the job. Whatever
MPI does then, the rank ends itself EXIT_GRACE_SECONDS later, so no rank outlives its
job, even one that no abort reaches. MPI must provide MPI_THREAD_MULTIPLE (mpi4py asks
for it by default).

    guard = make_guard(comm, timeout)   # a Watchdog, or Unguarded where none can serve
    guard.enter(step); ...collectives...; guard.leave(step)
    guard.close()                       # collective: thread and communicator released
"""

import atexit
import contextlib
import os
import sys
import threading
import time

import numpy as np

from .comm import waiting_in_collective

PING_SECONDS = 3.0  # how long a peer may take to answer a ping before it counts as unreachable
EXIT_GRACE_SECONDS = 10.0  # after a timeout, the rank ends itself this much later whatever MPI does
PING, PONG = 32766, 32767  # tags above the heartbeats' (which stay below 32766)


def make_guard(comm, timeout):
    """A Watchdog over comm, or Unguarded where there is nothing to guard (one rank, no
    timeout) or no way to end a hung rank (threads of one process)."""
    if timeout and comm.size > 1 and comm.abort_ends_every_rank:
        return Watchdog(comm, timeout)
    return Unguarded()


class _Guard:
    @contextlib.contextmanager
    def guarding(self, step, part):
        """Guard the collectives of the block as `part` (one of PARTS) at `step`."""
        self.enter(step, part)
        with self.disarmed_on_error():
            yield
            self.leave(step, part)

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

    def enter(self, step, part="step"):
        pass

    def leave(self, step, part="step"):
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
        self._ping = np.zeros(1, dtype=np.int64)
        self._pongs = []
        self._thread = threading.Thread(target=self._watch, name="dpnet-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self._stop)  # before mpi4py finalizes MPI at exit (atexit runs last-in first-out)

    def enter(self, step, part="step"):
        """Call when a guarded part of the run (one of PARTS: a step's gradients, its update,
        an evaluation, a checkpoint or the start-up, at `step`) starts, before its first
        collective."""
        self._stamp[0] = step
        tag = _tag(step, part)
        self._sends = [self.heartbeats.isend(self._stamp, dest=peer, tag=tag) for peer in self.peers]
        with self._lock:
            self._heard = set()
            self._inside = (step, tag, time.monotonic(), part)

    def leave(self, step, part="step"):
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
        self._stop()
        self.heartbeats.free()

    def _stop(self):
        """Stop the watching thread (it makes MPI calls: none may come after MPI_Finalize)."""
        self._closed.set()
        self._thread.join()

    def _watch(self):
        while not self._closed.wait(min(1.0, self.timeout / 4)):
            self._answer_pings()
            with self._lock:
                inside, heard = self._inside, set(self._heard)
            if inside is None or time.monotonic() - inside[2] < self.timeout:
                continue
            self._end_job(inside[0], inside[1], inside[3], heard)

    def _answer_pings(self):
        self._pongs = [(r, buffer) for r, buffer in self._pongs if not r.Test()]
        while True:
            status = self.heartbeats.probe_status(tag=PING)
            if status is None:
                return
            self.heartbeats.recv(self._ping, source=status, tag=PING)
            pong = np.array([int(waiting_in_collective())], dtype=np.int64)  # each send keeps its own buffer
            self._pongs.append((self.heartbeats.isend(pong, dest=status, tag=PONG), pong))

    def _end_job(self, step, tag, part, heard):
        what_part = _describe(step, part)
        threading.Thread(target=_exit_later, args=(self.comm.rank, what_part), name="dpnet-exit", daemon=True).start()
        silent = [p for p in self.peers if p not in heard and not self.heartbeats.iprobe(source=p, tag=tag)]
        answers = self._ping_all(self.peers)  # peer -> waiting in a collective, for those that answer
        unreachable = [p for p in self.peers if p not in answers]
        never = [p for p in silent if p in answers]
        answers[self.comm.rank] = int(waiting_in_collective())  # this rank may be the one holding the others up
        busy = [p for p in sorted(answers) if answers[p] == 0 and p not in never]
        what = []
        if unreachable:
            what.append(f"rank(s) {unreachable} do not answer (unreachable: a lost link, a dead host or a "
                        "stopped process)")
        if never:
            what.append(f"rank(s) {never} never reached it")
        if busy:
            what.append(f"rank(s) {busy} reached it but wait in no collective (still computing, or stuck)")
        sys.stderr.write(
            f"[rank {self.comm.rank}] watchdog: {what_part} has not completed in {self.timeout:g} s; "
            f"{'; '.join(what) or 'every rank reached it and answers'}. Aborting the job.\n")
        sys.stderr.flush()
        time.sleep(0.5)  # let the launcher forward the message before Abort tears it down
        self.comm.abort(1)

    def _ping_all(self, peers):
        """{peer: 1 if it waits in a collective, else 0} for the peers that answer a ping within
        PING_SECONDS."""
        stamp = np.zeros(1, dtype=np.int64)
        sends = [self.heartbeats.isend(stamp, dest=p, tag=PING) for p in peers]
        answers, deadline = {}, time.monotonic() + PING_SECONDS
        while len(answers) < len(peers) and time.monotonic() < deadline:
            self._answer_pings()  # two watchdogs may be pinging each other
            for p in peers:
                if p not in answers and self.heartbeats.iprobe(source=p, tag=PONG):
                    reply = np.zeros(1, dtype=np.int64)
                    self.heartbeats.recv(reply, source=p, tag=PONG)
                    answers[p] = int(reply[0])
            time.sleep(0.05)
        del sends  # never waited for: an unreachable peer would never complete them
        return answers


def _exit_later(rank, what_part):
    """End this process EXIT_GRACE_SECONDS from now, whether or not MPI's abort reaches it."""
    time.sleep(EXIT_GRACE_SECONDS)
    sys.stderr.write(f"[rank {rank}] watchdog: the job did not end {EXIT_GRACE_SECONDS:g} s after {what_part} "
                     "timed out (no abort reached this rank, or MPI did not answer); ending it.\n")
    sys.stderr.flush()
    from .guardian import expect_exit
    from .shm_leftovers import unlink_own
    unlink_own()
    expect_exit()
    os._exit(1)


# what a guarded part of the run can be
PARTS = ("step", "update", "evaluation", "checkpoint", "start-up", "shutdown")


def _describe(step, part):
    if part in ("start-up", "shutdown"):
        return f"the {part}"
    return f"step {step}" if part == "step" else f"the {part} of step {step}" if part == "update" else \
        f"the {part} after step {step}"


def _tag(step, part):
    # MPI guarantees tags up to 32767; PING and PONG stay free
    return (len(PARTS) * step + PARTS.index(part)) % PING
