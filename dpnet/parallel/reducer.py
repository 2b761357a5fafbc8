"""The interface every gradient reducer implements.

A reducer sums one flat array (the packed gradients, then [loss, stop vote]) over the
ranks of a communicator. DataParallel writes this rank's contribution into `send`,
tells the reducer as each parameter's range of it becomes final (`ready`), and calls
`reduce(finish)`; afterwards `result` holds the sum, the same bits on every rank.

    reducer.begin()
    reducer.send[...] = contribution       # in pieces, calling reducer.ready(lo, hi) for each
    result = reducer.reduce(finish)        # finish(result, lo, hi) edits this rank's entries
    update = reducer.make_update(flat)     # how step() applies an update rule (dpnet.parallel.update)
    reducer.close()                        # collective: threads, communicators, memory released

Attributes:
- name: 'allreduce', 'buckets', 'shared-memory' or 'hierarchical'
- send, result: (count,) arrays (the same array for an in-place Allreduce)
- owned: (lo, hi), the entries of result this rank finishes after the sum: all of them
  where every rank holds its own copy, its own slice where a node's ranks share one
- loss_range: (lo, hi), the parameters whose L2 loss this rank adds to its contribution
  before the sum; over all ranks, each parameter is counted exactly once
- sends, loss_ranges: the send buffers and their loss ranges, one per pass of a step: [send]
  and [loss_range], except for the reproducible mode's CanonicalReducer and SharedTreeReducer
  (a buffer per micro-shard pass)
"""

class Reducer:
    name = None

    def __init__(self, send, result, owned, loss_range):
        self.send, self.result = send, result
        self.owned, self.loss_range = owned, loss_range
        self.sends, self.loss_ranges = [send], [loss_range]  # one per pass of a step (dpnet.parallel.passes)

    def begin(self):
        """A new step's contributions begin."""

    def ready(self, lo, hi):
        """Entries [lo, hi) of send are final for this step (a reducer may start on them)."""

    def reduce(self, finish=None):
        raise NotImplementedError

    def factor_slots(self, j, total):
        """Where pass j may store affine weight gradients as factors this step (global batch of
        `total`; dpnet.parallel.canonical.FactorSlots), or None: store the products."""
        return None

    def make_update(self, flat):
        """The update strategy that goes with where this reducer keeps the parameters."""
        from .update import ReplicatedUpdate
        return ReplicatedUpdate(self.comm, flat)

    def describe(self):
        """How the gradients travel, in a few words for the start-up message."""
        raise NotImplementedError

    def close(self):
        """Collective: release what the reducer holds. `result` stays readable."""


def finish_all(result, finish, lo, hi):
    if finish is not None and hi > lo:
        finish(result, lo, hi)
