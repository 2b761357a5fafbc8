"""DataParallel: every rank computes the gradient of the global batch from its shard.

It composes four pieces, each behind a small interface:
- a reducer (dpnet.parallel.reducer) sums the packed gradients over ranks, chosen by
  dpnet.parallel.choice.choose_reducer: AllreduceReducer, BucketedAllreduce,
  SharedMemoryReducer or HierarchicalReducer; in the reproducible mode by
  choose_canonical_reducer: SharedTreeReducer or CanonicalReducer (dpnet.parallel.canonical);
- an update strategy (dpnet.parallel.update), which the reducer supplies: every rank
  updates its own copy (ReplicatedUpdate), or the ranks of a node share one copy and
  each updates its slice (DividedUpdate);
- a guard (dpnet.parallel.watchdog): a Watchdog that aborts a hung job naming the
  silent ranks, or Unguarded;
- the drift check (dpnet.parallel.consistency).

The collectives of one training step (loss(), then step()), in order:
1. guard.enter: with a Watchdog, a non-blocking heartbeat to every peer (point to point)
2. Allreduce of the shard lengths, only when the caller does not pass global_batch_size
3. forward and backward: per batchnorm layer with bn_mode 'sync', an Allgather of the
   shard moments (forward), later an Allreduce of two per-channel sums (backward)
4. the gradient sum, by reducer:
   - allreduce:     Allreduce(buffer)
   - buckets:       Allreduce(bucket b) for each bucket, in backward order, on a worker
                    thread's duplicate communicator, the last one after backward
   - shared-memory: node fence; (each rank sums and finishes its slice) node fence
   - hierarchical:  node fence; Allreduce(own slice) among the slice's owners on the
                    other nodes; node fence
   - reproducible (dpnet.parallel.microshards): instead of 3 and 4, per batchnorm layer with
                    bn_mode 'sync' an Allgather of the rank's micro-shard rows (forward) and
                    another (backward); then tree on one node: node fence, (each rank sums
                    its slice of every micro-shard's shared buffer) node fence; tree across
                    nodes: Allgather(which weights are factors), Allgather(subtree sum and
                    factors); fixed-point: Allreduce(max of each parameter),
                    Allreduce(int64 buffer); with bn_mode 'local', an Allgather of the running
                    statistics
5. guard.leave: a receive of every peer's heartbeat
6. every check_every steps, an Allgather of parameter digests (the drift check)
7. step(): with DividedUpdate, guard.enter ("update"), a node fence, guard.leave ("update");
   with ReplicatedUpdate, none
Collectives outside loss() and step() (evaluation, checkpointing) are guarded the same way
inside `with dp.guarded("evaluation" | "checkpoint"):`.

Randomness policy: whatever must agree across ranks (initial weights, the shuffling
order) comes from shared seeds, and the initial parameters and batchnorm statistics
are broadcast from rank 0 anyway; whatever must differ per rank (dropout masks,
augmentation) comes from generators seeded with (seed, rank).
"""

import contextlib
import time

import numpy as np

from ..flat import FlatParams
from .allreduce import AllreduceReducer
from .choice import choose_canonical_reducer, choose_reducer
from .consistency import check_consistency
from .microshards import MicroShardGroup
from .passes import MicroShardPasses, SinglePass
from .regularization import SlicedL2
from .watchdog import Unguarded, make_guard

TAIL = 2  # entries after the gradients in the reduced buffer: [loss, stop votes]


class DataParallel:
    """Wraps a dpnet model for data-parallel training over `comm`.

        dp = DataParallel(model, comm)         # broadcasts rank 0's parameters
        loss, grads = dp.loss(X_shard, y_shard)  # global-batch loss and gradients
        dp.step(update_rule, config)           # one fused update of the parameters
        dp.close()                             # releases threads, communicators, shared memory

    The global-batch gradient is sum_r (n_r / N) g_r, exact for unequal and empty
    shards: each rank averages its shard's loss over the global count N (so batchnorm
    backward receives the global loss's gradient), and one reduction sums the packed
    gradients and losses. The L2 term is counted once: each rank adds reg * W to the
    entries of the sum it finishes (reducer.owned), and the L2 loss of its share of the
    weights (reducer.loss_range) to its contribution before the sum. With bn_mode
    'sync' the model's batchnorm layers reduce over `comm`.

    How gradients are summed over ranks (`reduction`; dpnet.parallel.choice):
    - 'shared-memory': the ranks on a node write their gradients into one shared array
      and each sums its own slice of all of them; across nodes each slice is then
      Allreduced with its owners on the other nodes (hierarchical). The node's ranks
      also hold one copy of the parameters and optimizer state and step() has each
      update only its own slice. The returned gradients are then read-only, and a write
      to the parameters by one rank is seen by its whole node.
    - 'allreduce': Allreduce on the flat buffer, in place: one call after backward, or
      with bucket_bytes, buckets of about that size overlapped with backward.
    - 'auto' (default): 'shared-memory' when bucket_bytes is None and every node holds
      the same number (> 1) of ranks with room for the shared arrays, else 'allreduce'.
    benchmarks/bench_parallel.py measures each.

    Inputs:
    - model: a dpnet.models.Model; its params are rebound to views of one flat buffer
    - comm: a dpnet.parallel communicator
    - seed: seeds per-rank dropout streams, as (seed, rank)
    - check_every: verify every k steps that all ranks hold identical parameters
      (0: never); a drift raises ParameterDriftError naming the step and ranks
    - bucket_bytes: reduce gradients in buckets of about this many bytes, overlapped with
      backward (reduction 'allreduce' only); None: one reduction after backward
    - reduction: 'auto', 'shared-memory' or 'allreduce', as above
    - timeout: where abort ends every rank (MPI), abort the job when one step (its
      forward, backward and collectives) takes longer than this many seconds, naming
      the rank(s) that never reached it; None: wait forever
    - guard: a guard from dpnet.parallel.watchdog.make_guard to use (and close) instead of
      one made from timeout, e.g. one that has guarded the job's start-up already
    - reproducible: None, or M, a power of two that the number of ranks divides: the
      reproducible mode (dpnet.parallel.microshards), whose losses, gradients and updates
      are the same bits at any number of ranks; each rank passes its micro-shards
      (rank_bounds) and the reduction and bucket_bytes are not used
    - workers: in the reproducible mode, how many of a rank's micro-shard passes compute at
      once (give the process one BLAS thread: the passes' GEMMs and the sum's products must
      not depend on the thread count)
    - canonical_sum: in the reproducible mode, 'tree' or 'fixed-point' (dpnet.parallel.canonical);
      the tree runs through shared memory where every rank is on one node (and, at more than
      one rank, the parameters are then shared and the gradients read-only, as with
      'shared-memory'), else through MPI

    Attributes: reducer, reduction (its name), why_not_shared_memory (why the gradients do
    not go through shared memory, or None), flat, steps (steps taken: set it when resuming a run, so
    messages name the run's step), comm_seconds (time spent waiting in the reductions).
    """

    def __init__(self, model, comm, seed=0, check_every=0, timeout=None, bucket_bytes=None,
                 reduction="auto", guard=None, reproducible=None, workers=1, canonical_sum="tree"):
        self.model = model
        self.comm = comm
        self.check_every = check_every
        self.steps = 0
        self.comm_seconds = 0.0
        self.stop_requested = False  # this rank's vote to stop (e.g. on SIGTERM)
        self.stop_agreed = False  # some rank voted, as of the last loss(): all ranks agree
        self.reproducible = reproducible
        if model.bn_mode == "sync":
            model.comm = comm
        if model.dropout_param is not None:
            model.dropout_param["rng"] = np.random.default_rng([seed, comm.rank])
        order = model.backward_order()  # gradients in the order backward finishes them
        sizes = [int(np.size(model.params[name])) for name in order]
        if reproducible:
            group = MicroShardGroup(comm, reproducible, workers)
            self.reducer, self.why_not_shared_memory = choose_canonical_reducer(
                comm, canonical_sum, reproducible, [np.shape(model.params[name]) for name in order], TAIL,
                model.dtype, group.k)
        else:
            self.reducer, self.why_not_shared_memory = choose_reducer(comm, reduction, bucket_bytes, sizes,
                                                                      TAIL, model.dtype)
        self.flat = FlatParams(model.params, extra=TAIL, order=order, buffer=self.reducer.result)
        self.passes = (MicroShardPasses(model, self.flat, self.reducer, group, seed) if reproducible else
                       SinglePass(model, self.flat, self.reducer))
        self.l2 = SlicedL2(model, self.flat)
        self.update = self.reducer.make_update(self.flat)
        self.guard = make_guard(comm, timeout) if guard is None else guard
        self.broadcast_state()

    @property
    def reduction(self):
        return self.reducer.name

    @property
    def grads(self):
        """The last reduced gradients, by parameter name (views of the fused buffer)."""
        return self.flat.grads

    def _bn_state(self):
        return [bn[key] for bn in self.model.bn_params for key in ("running_mean", "running_var")]

    def broadcast_state(self, root=0):
        """Make every rank's parameters and batchnorm statistics equal to root's."""
        self.update.broadcast(root)
        for array in self._bn_state():
            self.comm.bcast(array, root)

    @contextlib.contextmanager
    def writing_parameters(self):
        """Collective context for code that sets the parameters on every rank, such as
        loading a checkpoint: inside, each rank writes its own private copy (never a node's
        shared one, which ranks would write at once); on leaving, rank 0's parameters and
        batchnorm statistics become every rank's."""
        with self.update.writing():
            yield
        self.broadcast_state()

    def loss(self, X, y, global_batch_size=None):
        """Loss and gradients of the global batch formed by every rank's (X, y) shard.

        Inputs:
        - X, y: this rank's shard (any length, 0 included)
        - global_batch_size: the total number of examples over all ranks when the caller
          knows it (saves one small reduction); it must be the same on every rank

        Returns (loss, grads): identical on every rank; grads are views of the fused buffer.
        """
        self.guard.enter(self.steps)  # guards the step's every collective (sync batchnorm's too)
        with self.guard.disarmed_on_error():
            return self._loss(X, y, global_batch_size)

    def _loss(self, X, y, global_batch_size):
        total = global_batch_size
        if total is None:
            total = int(self.comm.allreduce(np.array([len(X)], dtype=np.int64))[0])
        if total < 1:
            raise ValueError("the global batch is empty: every rank passed an empty shard")
        self.reducer.begin()
        data_losses = self.passes.run(X, y, total, self.steps)
        for send, data_loss, loss_range in zip(self.reducer.sends, data_losses, self.reducer.loss_ranges):
            # this rank's share of the L2 loss rides in the sum; read the weights now: after the
            # sum a faster rank may be updating a node's shared copy
            send[-2] = data_loss + self.l2.loss(*loss_range)
            send[-1] = float(self.stop_requested)
        l2_seconds = [0.0]

        def finish(result, lo, hi):  # the L2 gradient joins each finished entry of the sum once
            started = time.perf_counter()
            self.l2.add_gradient(result, lo, hi)
            l2_seconds[0] += time.perf_counter() - started

        start = time.perf_counter()
        result = self.reducer.reduce(finish)
        self.guard.leave(self.steps)
        self.comm_seconds += time.perf_counter() - start - l2_seconds[0]  # computation, not communication
        self.stop_agreed = bool(result[-1] > 0)
        loss = float(result[-2])
        self.steps += 1
        if self.check_every and self.steps % self.check_every == 0:
            self.check_consistency()
        return loss, self.flat.grads

    @contextlib.contextmanager
    def guarded(self, part):
        """Collective context that guards collectives outside loss() and step() with the
        watchdog: part is 'evaluation' or 'checkpoint' (dpnet.parallel.watchdog.PARTS)."""
        with self.guard.guarding(self.steps, part):
            yield

    def request_stop(self):
        """Vote to stop; after the next loss() every rank sees stop_agreed at the same step."""
        self.stop_requested = True

    def step(self, update_rule, config):
        """Apply update_rule (`next_w, config = rule(w, dw, config)`) once to the flat
        parameters with the last reduced gradients; returns config, which holds the rule's
        state. See dpnet.parallel.update for who updates what."""
        self.comm_seconds += self.update.step(update_rule, config, self.guard, self.steps - 1)
        return config

    def close(self):
        """Collective: stop the watchdog and any worker thread, release their communicators
        and the shared memory. The parameters, the last gradients and the optimizer state
        move to private copies first, so the model, the configs passed to step() and this
        object stay usable (unguarded, summing with one Allreduce); views taken of them
        earlier may point into released memory."""
        with self.guard.guarding(self.steps, "shutdown"):  # a rank that never gets here is named
            self.update = self.update.close()
            self.flat.rebind(buffer=np.array(self.flat.buffer))
            self.reducer.close()
        self.reducer = AllreduceReducer(self.comm, self.flat.buffer)
        self.passes = SinglePass(self.model, self.flat, self.reducer)
        self.guard.close()
        self.guard = Unguarded()

    def average_running_stats(self):
        """Average local-mode batchnorm running statistics over ranks, so every rank
        evaluates and saves the same model (sync mode: already identical, untouched)."""
        state = self._bn_state()
        if self.model.bn_mode == "sync" or self.reproducible or not state or self.comm.size == 1:
            return  # reproducible: MicroShardPasses keeps them identical already
        packed = np.concatenate(state)
        self.comm.allreduce(packed)
        packed /= self.comm.size
        offset = 0
        for array in state:
            array[...] = packed[offset:offset + array.size]
            offset += array.size

    def check_consistency(self, step=None):
        """Raise ParameterDriftError unless every rank holds bit-identical parameters
        (and, in sync mode, batchnorm statistics)."""
        arrays = [self.flat.data] + (self._bn_state() if self.model.bn_mode == "sync" else [])
        check_consistency(self.comm, arrays, self.steps if step is None else step)
