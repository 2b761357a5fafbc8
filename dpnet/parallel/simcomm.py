"""SimComm: N logical ranks as threads of one process, with MPI's collective semantics.

    results = SimComm(4).run(fn, *args)   # fn(comm, *args) runs once per rank

Each rank gets its own communicator (rank r of size N). A collective is a rendezvous:
every rank deposits a copy of its contribution and a description of the call (kind,
shape, dtype, root, and where in the code it was made); the call completes when all
N have arrived. Then every rank checks that all descriptions agree and computes the
result from the contributions in rank order. Hence:

- a mismatched collective (different kind, shape, dtype or root) fails at once on
  every rank with SimCommError naming each rank's call and call site;
- a missing collective fails as soon as the rank that skipped it returns or raises,
  naming the ranks left waiting and where;
- a rank that never arrives fails the others after `timeout` seconds.

run() returns the ranks' results in rank order or re-raises the first rank's own
exception (a SimCommError only if no rank raised anything else).
"""

import copy
import os
import sys
import threading
import traceback

import numpy as np

from .comm import _check_op, ranks_per_node
from .threads import run_threads

DEFAULT_TIMEOUT = 120.0


class SimCommError(RuntimeError):
    """A collective could not complete: mismatched, missing, or timed out."""


def _call_site():
    """'file:line in function' of the first frame outside dpnet/parallel."""
    here = os.path.dirname(os.path.abspath(__file__))
    for frame in reversed(traceback.extract_stack()[:-1]):
        if not os.path.abspath(frame.filename).startswith(here):
            return f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}"
    return "?"


class _World:
    """Shared state of one simulated job, or of a communicator split or duplicated from it
    (`members`: its ranks' ranks in the parent)."""

    def __init__(self, size, timeout, members=None, ranks_per_node=None):
        self.size = size
        self.timeout = timeout
        self.ranks_per_node = ranks_per_node
        self.members = list(range(size)) if members is None else members
        self.children = {}  # split key -> _World; a failure or finish reaches them too
        self.cond = threading.Condition()
        self.pending = [None] * size  # this generation's calls, by rank
        self.arrived = 0
        self.generation = 0
        self.completed = None  # the last completed generation's calls
        self.failure = None  # message once the job has failed
        self.finished = set()  # ranks whose function returned

    def fail(self, message):
        with self.cond:
            if self.failure is None:
                self.failure = message
            self.cond.notify_all()
            children = list(self.children.values())
        for child in children:
            child.fail(message)

    def finish(self, rank):
        with self.cond:
            self.finished.add(rank)
            self.cond.notify_all()
            children = list(self.children.values())
        for child in children:
            if rank in child.members:
                child.finish(child.members.index(rank))

    def child(self, key, members):
        """The sub-world `key` over the parent ranks `members` (made by whoever asks first)."""
        with self.cond:
            if key not in self.children:
                self.children[key] = _World(len(members), self.timeout, members, self.ranks_per_node)
            return self.children[key]

    def _waiting_description(self):
        return ", ".join(f"rank {r} in {c['kind']} at {c['site']}"
                         for r, c in enumerate(self.pending) if c is not None)

    def exchange(self, rank, call):
        """Deposit `call` for this generation and return all ranks' calls once complete."""
        with self.cond:
            if self.failure:
                raise SimCommError(self.failure)
            if self.finished:
                msg = (f"rank {rank} called {call['kind']} at {call['site']}, but rank(s) "
                       f"{sorted(self.finished)} already finished without calling it")
                self.failure = msg
                self.cond.notify_all()
                raise SimCommError(msg)
            generation = self.generation
            self.pending[rank] = call
            self.arrived += 1
            if self.arrived == self.size:
                self.completed = self.pending
                self.pending = [None] * self.size
                self.arrived = 0
                self.generation += 1
                self.cond.notify_all()
                return self.completed

            def done():
                return self.generation != generation or self.failure or self.finished

            if not self.cond.wait_for(done, self.timeout):
                missing = [r for r, c in enumerate(self.pending) if c is None]
                self.failure = (f"collective timed out after {self.timeout:g} s: "
                                f"{self._waiting_description()}; rank(s) {missing} never arrived")
                self.cond.notify_all()
            if self.generation != generation:
                return self.completed
            if not self.failure:  # some rank returned while we wait for it
                self.failure = (f"missing collective: rank(s) {sorted(self.finished)} finished while "
                                f"{self._waiting_description()}")
                self.cond.notify_all()
            raise SimCommError(self.failure)


def _signature(call):
    """What must agree across ranks: (kind, then sorted details), without site and payload."""
    details = sorted((k, v) for k, v in call.items() if k not in ("kind", "site", "payload"))
    return (("kind", call["kind"]), *details)


class SimRankComm:
    """One logical rank's communicator inside a SimComm job."""

    thread_multiple = True  # a collective is a rendezvous: any thread may make one (on a dup())
    abort_ends_every_rank = False  # a hung thread cannot be ended: no watchdog

    def __init__(self, world, rank):
        self._world = world
        self.rank = rank
        self.size = world.size
        self._splits = 0  # splits made so far: the same count on every rank names each one

    def _collective(self, kind, payload=None, **details):
        call = {"kind": kind, "site": _call_site(), "payload": payload, **details}
        calls = self._world.exchange(self.rank, call)
        signatures = [_signature(c) for c in calls]
        if any(sig != signatures[0] for sig in signatures):
            lines = "; ".join(f"rank {r}: {c['kind']}({', '.join(f'{k}={v}' for k, v in sig[1:])}) "
                              f"at {c['site']}" for r, (c, sig) in enumerate(zip(calls, signatures)))
            msg = f"mismatched collectives: {lines}"
            self._world.fail(msg)
            raise SimCommError(msg)
        return [c["payload"] for c in calls]

    def allreduce(self, array, op="sum"):
        _check_op(op)
        parts = self._collective("allreduce", np.array(array, copy=True), op=op,
                                 shape=np.shape(array), dtype=str(array.dtype))
        result = parts[0].copy()
        combine = {"sum": np.add, "min": np.minimum, "max": np.maximum}[op]
        for part in parts[1:]:
            combine(result, part, out=result)
        array[...] = result
        return array

    def allgather(self, array):
        array = np.asarray(array)
        parts = self._collective("allgather", array.copy(), shape=array.shape, dtype=str(array.dtype))
        return np.stack(parts)

    def bcast(self, array, root=0):
        parts = self._collective("bcast", np.array(array, copy=True), root=root,
                                 shape=np.shape(array), dtype=str(array.dtype))
        array[...] = parts[root]
        return array

    def bcast_obj(self, obj, root=0):
        parts = self._collective("bcast_obj", obj if self.rank == root else None, root=root)
        return copy.deepcopy(parts[root])

    def allgather_obj(self, obj):
        return copy.deepcopy(self._collective("allgather_obj", obj))

    def barrier(self):
        self._collective("barrier")

    def split(self, color, key=None):
        """Collective: the communicator of the ranks that passed the same color, ordered by
        (key, rank)."""
        key = self.rank if key is None else key
        everyone = self._collective("split", (color, key))
        members = sorted((k, r) for r, (c, k) in enumerate(everyone) if c == color)
        members = [r for _, r in members]
        self._splits += 1
        world = self._world.child((self._splits, color), members)
        return SimRankComm(world, members.index(self.rank))

    def dup(self):
        return self.split(0)

    def split_by_node(self):
        # one process is one node, unless SimComm(ranks_per_node=k) or DPNET_RANKS_PER_NODE pretends more
        per_node = self._world.ranks_per_node or ranks_per_node() or self.size
        node = self.split(self.rank // per_node)
        cross = self.split(node.rank)
        return node, cross

    def allocate_shared(self, length, dtype):
        """Collective: one array, the very same object on every rank (threads share memory)."""
        fresh = np.zeros(length, dtype=dtype) if self.rank == 0 else None
        return self._collective("allocate_shared", fresh, length=length, dtype=str(np.dtype(dtype)))[0]

    def fence(self):
        self.barrier()  # the rendezvous's lock orders every thread's writes before the others' reads

    def shared_bytes_free(self):
        return None  # process memory: no separate limit

    def free(self):
        pass

    def abort(self, code=1):
        msg = f"rank {self.rank} called abort({code})"
        self._world.fail(msg)
        raise SimCommError(msg)

    def __repr__(self):
        return f"SimRankComm(rank={self.rank}, size={self.size})"


class SimComm:
    """A simulated job of `size` ranks; `run(fn, *args)` calls fn(comm, *args) on each.
    ranks_per_node: how many ranks split_by_node() puts on each node (default: all on one,
    or DPNET_RANKS_PER_NODE)."""

    def __init__(self, size, timeout=DEFAULT_TIMEOUT, ranks_per_node=None):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.size = size
        self.timeout = timeout
        self.ranks_per_node = ranks_per_node

    def run(self, fn, *args, **kwargs):
        world = _World(self.size, self.timeout, ranks_per_node=self.ranks_per_node)
        results, errors = run_threads(
            lambda rank: fn(SimRankComm(world, rank), *args, **kwargs), self.size, "simrank",
            on_error=lambda rank, exc: world.fail(f"rank {rank} raised {type(exc).__name__}: {exc}"),
            on_success=world.finish)
        own = [(r, e) for r, e in enumerate(errors) if e is not None and not isinstance(e, SimCommError)]
        first = own[0] if own else next(((r, e) for r, e in enumerate(errors) if e is not None), None)
        if first is not None:
            rank, exc = first
            if sys.version_info >= (3, 11):
                exc.add_note(f"(raised on simulated rank {rank} of {self.size})")
            raise exc
        return results
