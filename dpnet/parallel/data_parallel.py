"""DataParallel: every rank computes the gradient of the global batch from its shard.

Randomness policy: whatever must agree across ranks (initial weights, the shuffling
order) comes from shared seeds, and the initial parameters and batchnorm statistics
are broadcast from rank 0 anyway; whatever must differ per rank (dropout masks,
augmentation) comes from generators seeded with (seed, rank).
"""

import contextlib
import queue
import threading
import time

import numpy as np

from ..flat import FlatParams
from ..models.base import add_scaled
from ..optim import UPDATE_RULES

ELEMENTWISE_RULES = frozenset(UPDATE_RULES.values())  # rules whose update of a slice needs only that slice


REDUCTIONS = ("auto", "shared-memory", "allreduce")


class ParameterDriftError(RuntimeError):
    """Ranks that should hold identical parameters do not."""


def checksum(array):
    """A uint64 digest of the bytes of a float array (sum of its 32-bit words, mod 2**64)."""
    words = np.ascontiguousarray(array).reshape(-1).view(np.uint32)
    return np.add.reduce(words, dtype=np.uint64)


class DataParallel:
    """Wraps a dpnet model for data-parallel training over `comm`.

        dp = DataParallel(model, comm)         # broadcasts rank 0's parameters
        loss, grads = dp.loss(X_shard, y_shard)  # global-batch loss and gradients
        dp.step(update_rule, config)           # one fused update of the parameters
        dp.close()                             # releases shared memory, if any (collective)

    The global-batch gradient is sum_r (n_r / N) g_r, exact for unequal and empty
    shards: each rank averages its shard's loss over the global count N (so batchnorm
    backward receives the global loss's gradient), and one reduction sums the packed
    gradients and losses; the L2 term is counted once (after an Allreduce; with shared
    memory each rank adds its gradient to its own slice of the sum, and the loss of its
    slice of the weights to the sum, in the gradients' dtype). With bn_mode 'sync' the
    model's batchnorm layers reduce over `comm`.

    How gradients are summed over ranks (`reduction`):
    - 'shared-memory': the ranks on a node write their gradients into one MPI-3 shared
      window and each sums its own slice of all of them, reading the others' memory
      directly (dpnet.parallel.shared_memory); across nodes each slice is then Allreduced
      with its owners on the other nodes. The node's ranks also hold one copy of the
      parameters and optimizer state, and step() has each update only its own slice of
      them (the optimizer's work is divided, not repeated). The fastest within a node.
      The returned gradients are shared by the node's ranks and read-only; the
      parameters are shared too, so a write by one rank is seen by its whole node.
    - 'allreduce': MPI Allreduce on the flat buffer, in place. By default one call after
      backward. With bucket_bytes set, the buffer (laid out in the order backward
      finishes the parameters) is cut into buckets of about that size and, under MPI
      with MPI_THREAD_MULTIPLE, a worker thread reduces each bucket on a duplicate
      communicator as soon as its last gradient is ready, while backward goes on with
      earlier layers; the last bucket carries the loss. Overlap pays where the reduction
      does not compete with backward for the same cores and memory bandwidth (other
      nodes, a network); on one 2-core machine it measured slower.
    - 'auto' (default): 'shared-memory' under MPI when bucket_bytes is None and every
      node holds the same number (> 1) of ranks with room in /dev/shm, else 'allreduce'.
    benchmarks/bench_parallel.py measures each.

    Inputs:
    - model: a dpnet.models.Model; its params are rebound to views of one flat buffer
      (in shared memory with reduction 'shared-memory', until close())
    - comm: a dpnet.parallel communicator
    - seed: seeds per-rank dropout streams, as (seed, rank)
    - check_every: verify every k steps that all ranks hold identical parameters
      (0: never); a drift raises ParameterDriftError naming the step and ranks
    - bucket_bytes: reduce gradients in buckets of about this many bytes, overlapped with
      backward under MPI (reduction 'allreduce' only); None: one reduction after backward
    - reduction: 'auto', 'shared-memory' or 'allreduce', as above
    - timeout: with an MPI communicator, abort the job when one step (its forward,
      backward and collectives) takes longer than this many seconds, naming the rank(s)
      that never reached it (dpnet.parallel.watchdog); None: wait forever
    """

    def __init__(self, model, comm, seed=0, check_every=0, timeout=None, bucket_bytes=None,
                 reduction="auto"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if reduction == "shared-memory" and bucket_bytes:
            raise ValueError("bucket_bytes applies to reduction 'allreduce' only; "
                             "'shared-memory' sums all gradients at once after backward")
        self.model = model
        self.comm = comm
        self.check_every = check_every
        self.steps = 0
        self.comm_seconds = 0.0  # wall time spent in the gradient reduction
        self.stop_requested = False  # this rank's vote to stop (e.g. on SIGTERM)
        self.stop_agreed = False  # some rank voted, as of the last loss(): all ranks agree
        if model.bn_mode == "sync":
            model.comm = comm
        if model.dropout_param is not None:
            model.dropout_param["rng"] = np.random.default_rng([seed, comm.rank])
        # gradients in the order backward finishes them, then [loss, stop votes]
        order = model.backward_order()
        count = sum(int(np.size(w)) for w in model.params.values()) + 2
        self._shared, self.reduction, self.why_not_shared_memory = None, "allreduce", None
        if comm.size > 1 and reduction != "allreduce" and not bucket_bytes:
            self._shared, why_not = self._shared_memory_reducer(comm, count, model.dtype, reduction)
            if self._shared is not None:
                self.reduction = "shared-memory"
            self.why_not_shared_memory = why_not
        self.flat = FlatParams(model.params, extra=2, order=order,
                               buffer=None if self._shared is None else self._shared.result)
        if self._shared is not None:
            # one copy of the parameters per node, each rank updating its own slice (see step);
            # node rank 0 brings its initial values, broadcast_state() below spreads world rank 0's
            shared = self._shared.shared_array(self.flat.data.size)
            self._move_parameters_to(shared)
            self._owned = (min(self._shared.lo, shared.size), min(self._shared.hi, shared.size))
            self._work_arrays = {}  # the rule's '_'-prefixed scratch arrays for this rank's slice
            self._configs = []  # optimizer configs whose state lives in shared memory
            self._shared_state = []  # those state arrays
            self._node_zero_configs = []  # configs of other rules, kept by node rank 0 alone
        self._send_into(self.flat.buffer if self._shared is None else self._shared.send)
        self.buckets = self._make_buckets(bucket_bytes or len(self.flat.buffer) * self.flat.data.itemsize)
        self._bucket_of = {name: b for b, (_, _, names) in enumerate(self.buckets) for name in names}
        self._overlap = (len(self.buckets) > 1 and comm.size > 1
                         and getattr(comm, "thread_multiple", False))
        if self._overlap:
            self._bucket_comm = comm.dup()
            self._queue = queue.Queue()
            self._failure = None
            threading.Thread(target=self._reduce_buckets, name="dpnet-allreduce", daemon=True).start()
        self.watchdog = None
        if timeout and comm.size > 1 and hasattr(comm, "MPI"):
            from .watchdog import Watchdog
            self.watchdog = Watchdog(comm, timeout)
        self.broadcast_state()

    @property
    def grads(self):
        """The last reduced gradients, by parameter name (views of the fused buffer)."""
        return self.flat.grads

    def _bn_state(self):
        return [bn[key] for bn in self.model.bn_params for key in ("running_mean", "running_var")]

    def broadcast_state(self, root=0):
        """Make every rank's parameters and batchnorm statistics equal to root's."""
        if self._shared is None:
            self.comm.bcast(self.flat.data, root)
        elif root == 0:  # world rank 0 holds node 0's copy
            self._shared.broadcast(self.flat.data)
        else:
            raise ValueError("with shared-memory parameters only rank 0 can broadcast them")
        for array in self._bn_state():
            self.comm.bcast(array, root)

    @contextlib.contextmanager
    def writing_parameters(self):
        """Collective context for code that sets the parameters on every rank, such as
        loading a checkpoint: inside, each rank writes its own private copy (never the
        node's shared one, which ranks would write at once); on leaving, rank 0's values
        become every rank's (broadcast_state)."""
        if self._shared is None:
            yield
            self.broadcast_state()
            return
        shared = self.flat.data
        self.flat.rebind(data=shared.copy())
        yield
        self._move_parameters_to(shared)
        self.broadcast_state()

    def _move_parameters_to(self, shared):
        """Rebind the parameters to the node's shared array, filled with node rank 0's
        private values (collective over the node)."""
        self._shared.sync()  # nobody reads the node's copy while it is replaced
        if self._shared.node.Get_rank() == 0:
            shared[...] = self.flat.data
        self.flat.rebind(data=shared)

    def loss(self, X, y, global_batch_size=None):
        """Loss and gradients of the global batch formed by every rank's (X, y) shard.

        Inputs:
        - X, y: this rank's shard (any length, 0 included)
        - global_batch_size: the total number of examples over all ranks when the caller
          knows it (saves one small reduction); it must be the same on every rank

        Returns (loss, grads): identical on every rank; grads are views of the fused buffer.
        """
        if self.watchdog:  # guards the step's every collective (sync batchnorm's included)
            self.watchdog.enter(self.steps)
        with self._disarmed_on_error():
            return self._loss(X, y, global_batch_size)

    @contextlib.contextmanager
    def _disarmed_on_error(self):
        """Stop guarding the step if it fails here: a caller that handles the error must not
        be aborted later."""
        try:
            yield
        except BaseException:
            if self.watchdog:
                self.watchdog.disarm()
            raise

    def _loss(self, X, y, global_batch_size):
        total = global_batch_size
        if total is None:
            total = int(self.comm.allreduce(np.array([len(X)], dtype=np.int64))[0])
        if total < 1:
            raise ValueError("the global batch is empty: every rank passed an empty shard")
        buffer = self.flat.buffer
        pending = [len(names) for _, _, names in self.buckets]

        def on_grad(name, grad):  # pack each gradient as it is made; send full buckets off
            self._send_grads[name][...] = grad
            b = self._bucket_of[name]
            pending[b] -= 1
            if pending[b] == 0 and b < len(self.buckets) - 1 and self._overlap:
                self._queue.put(self.buckets[b])

        data_loss, _ = self.model.data_loss(X, y, batch_size=total, on_grad=on_grad)
        if any(pending):  # a gradient stored twice or never: its bucket would go unreduced
            raise RuntimeError(f"backward stored {sum(len(n) for _, _, n in self.buckets) - sum(pending)} "
                               f"gradients for {len(self.flat.names)} parameters; each must be stored once")
        self._send[-2] = data_loss
        if self._shared is not None and self._shared.cross.Get_rank() == 0:
            # this rank's part of the L2 loss, over its slice of the weights, rides in the sum (from
            # the first node only); read them now: after reduce() a faster rank may be updating them
            self._send[-2] += self._regularization_loss_of_slice(*self._owned)
        self._send[-1] = float(self.stop_requested)
        start = time.perf_counter()
        if self._shared is not None:  # the L2 term joins each rank's slice of the sum, once
            l2_seconds = [0.0]

            def finish(grad, lo, hi):
                started = time.perf_counter()
                self._regularize_slice(grad, lo, hi)
                l2_seconds[0] += time.perf_counter() - started
            self._shared.reduce(finish=finish if self.model.reg else None)
            start += l2_seconds[0]  # computation, not communication (the allreduce path adds L2 after)
        elif self._overlap:
            self._queue.put(self.buckets[-1])
            self._queue.join()  # every bucket of this step reduced
            if self._failure is not None:
                raise self._failure
        else:
            self.comm.allreduce(buffer)
        if self.watchdog:
            self.watchdog.leave(self.steps)
        self.comm_seconds += time.perf_counter() - start
        self.stop_agreed = bool(buffer[-1] > 0)
        if self._shared is not None:
            loss = float(buffer[-2])
        else:
            loss = float(buffer[-2]) + self.model.add_regularization(self.flat.grads)
        self.steps += 1
        if self.check_every and self.steps % self.check_every == 0:
            self.check_consistency()
        return loss, self.flat.grads

    @staticmethod
    def _shared_memory_reducer(comm, count, dtype, reduction):
        """(SharedMemoryAllreduce, None), or (None, why not) when it cannot serve 'auto'."""
        if not hasattr(comm, "MPI"):
            if reduction == "shared-memory":
                raise ValueError(f"reduction 'shared-memory' needs an MPI communicator, got {comm!r}")
            return None, f"{type(comm).__name__} has no shared memory"
        from .shared_memory import SharedMemoryAllreduce
        reducer, why_not = SharedMemoryAllreduce.create(comm, count, dtype,
                                                        shared_nodes_only=reduction == "auto")
        if reducer is None and reduction == "shared-memory":
            raise RuntimeError(f"reduction 'shared-memory' is unavailable: {why_not}")
        return reducer, why_not

    def _weight_ranges(self, lo, hi):
        """The [a, b) ranges of the flat layout inside [lo, hi) that hold L2-regularised weights."""
        for name in self.model.weight_names():
            start = self.flat.offsets[name]
            a, b = max(lo, start), min(hi, start + self.flat.sizes[name])
            if a < b:
                yield a, b

    def _regularize_slice(self, grad, lo, hi):
        """Add reg * W to the weights' entries of the flat gradient grad[lo:hi]."""
        for a, b in self._weight_ranges(lo, hi):
            add_scaled(grad[a:b], self.flat.data[a:b], self.model.reg)

    def _regularization_loss_of_slice(self, lo, hi):
        """0.5 * reg * sum(W^2) over the weights' entries among the flat parameters [lo, hi)."""
        if not self.model.reg:
            return 0.0
        return 0.5 * self.model.reg * sum(float(np.vdot(self.flat.data[a:b], self.flat.data[a:b]))
                                          for a, b in self._weight_ranges(lo, hi))

    def close(self):
        """Release the shared memory, if any (collective). The parameters, the last
        gradients and the optimizer state move to private copies first, so the model, the
        configs passed to step() and this object stay usable (it then sums with
        'allreduce'); views taken of them earlier point into released memory."""
        if self._shared is None:
            return
        self._shared.sync()  # nobody still updates a slice
        self.flat.rebind(data=self.flat.data.copy(), buffer=np.array(self.flat.buffer))
        for config in self._configs:
            for key, value in config.items():
                if self._is_state(value):
                    config[key] = value.copy()
        for config in self._node_zero_configs:  # from now on every rank runs the rule itself
            state = self._shared.node.bcast(config, root=0)
            if self._shared.node.Get_rank() != 0:
                config.clear()
                config.update(state)
        self._shared.free()
        self._shared = None
        self.reduction = "allreduce"  # from now on, on the private buffer
        self._send_into(self.flat.buffer)

    def _send_into(self, send):
        """Write this rank's gradients (and loss, stop vote) into `send`: the reduced buffer
        itself, or this rank's segment of a shared-memory sum."""
        self._send = send
        self._send_grads = {name: self.flat.view(send, name) for name in self.flat.names}

    def _make_buckets(self, bucket_bytes):
        """[(start, stop, names)] slices of the flat buffer in backward order, each at least
        bucket_bytes except the last, which also takes the [loss, stop] tail."""
        buckets, names, start = [], [], 0
        itemsize = self.flat.data.itemsize
        for name in self.flat.names:
            names.append(name)
            stop = self.flat.offsets[name] + self.flat.sizes[name]
            if (stop - start) * itemsize >= bucket_bytes:
                buckets.append((start, stop, names))
                names, start = [], stop
        if names or not buckets:
            buckets.append((start, len(self.flat.buffer), names))
        else:  # the last parameter closed a bucket: give it the tail
            start, _, names = buckets.pop()
            buckets.append((start, len(self.flat.buffer), names))
        return buckets

    def _reduce_buckets(self):
        while True:
            start, stop, _ = self._queue.get()
            try:
                if self._failure is None:
                    self._bucket_comm.allreduce(self.flat.buffer[start:stop])
            except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
                self._failure = exc
            finally:
                self._queue.task_done()

    def request_stop(self):
        """Vote to stop; after the next loss() every rank sees stop_agreed at the same step."""
        self.stop_requested = True

    def step(self, update_rule, config):
        """Apply update_rule once to the flat parameters with the last reduced gradients.

        With shared-memory reduction the ranks of a node hold one copy of the parameters,
        and with one of dpnet.optim's rules (all elementwise) each rank updates only its
        own slice of them and of the optimizer state, which also moves to shared memory
        (config's state arrays are replaced by shared ones on the first step): the
        optimizer's work is divided among the ranks instead of repeated by each. Any
        other rule updates every parameter on node rank 0 only, so only node rank 0's
        config holds its state (close() hands it to the node's other ranks)."""
        if self._shared is None:
            update_rule(self.flat.data, self.flat.grad, config)
            return config
        step = self.steps - 1  # loss() has counted this step already
        if self.watchdog:  # from here: moving state to shared memory is collective too
            self.watchdog.enter(step, part=1)
        with self._disarmed_on_error():
            self._shared_step(update_rule, config, step)
        return config

    def _shared_step(self, update_rule, config, step):
        if update_rule in ELEMENTWISE_RULES:
            lo, hi = self._owned
            view = self._slice_config(config, lo, hi)
            update_rule(self.flat.data[lo:hi], self.flat.grad[lo:hi], view)
            self._store_slice_config(config, view, lo, hi)
        else:
            if not any(config is seen for seen in self._node_zero_configs):
                self._node_zero_configs.append(config)
            if self._shared.node.Get_rank() == 0:
                update_rule(self.flat.data, self.flat.grad, config)
        start = time.perf_counter()
        self._shared.sync()  # every slice updated before anyone's next forward
        if self.watchdog:
            self.watchdog.leave(step, part=1)
        self.comm_seconds += time.perf_counter() - start

    def _is_state(self, value):
        """An optimizer state array: one value per parameter."""
        return isinstance(value, np.ndarray) and value.shape == self.flat.data.shape

    def _slice_config(self, config, lo, hi):
        """The config an update of parameters [lo, hi) sees: state arrays cut to the slice
        (moved to shared memory first, e.g. after a resume), this rank's own work arrays
        ('_'-prefixed, kept out of config), other entries as they are."""
        if not any(config is seen for seen in self._configs):  # `in` would compare arrays
            self._configs.append(config)
        for key in sorted(config):  # the same keys, in the same order, on every rank
            value = config[key]
            if self._is_state(value) and not any(value is a for a in self._shared_state):
                config[key] = self._new_shared_state(fill=value)
        view = {key: value[lo:hi] if self._is_state(value) else value
                for key, value in config.items() if not key.startswith("_")}
        view.update(self._work_arrays)
        return view

    def _store_slice_config(self, config, view, lo, hi):
        for key in sorted(view):  # the same keys, in the same order, on every rank
            value = view[key]
            if key.startswith("_"):
                self._work_arrays[key] = value
            elif self._is_state(config.get(key)) or (
                    key not in config and isinstance(value, np.ndarray) and value.shape == (hi - lo,)):
                if not self._is_state(config.get(key)):  # state the rule has just created
                    config[key] = self._new_shared_state()
                if not np.shares_memory(value, config[key]):
                    config[key][lo:hi] = value
            else:
                config[key] = value

    def _new_shared_state(self, fill=None):
        array = self._shared.shared_array(self.flat.data.size, fill=fill)
        self._shared_state.append(array)
        return array

    def average_running_stats(self):
        """Average local-mode batchnorm running statistics over ranks, so every rank
        evaluates and saves the same model (sync mode: already identical, untouched)."""
        state = self._bn_state()
        if self.model.bn_mode == "sync" or not state or self.comm.size == 1:
            return
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
        step = self.steps if step is None else step
        parts = [self.flat.data] + (self._bn_state() if self.model.bn_mode == "sync" else [])
        digest = np.array([checksum(a) for a in parts], dtype=np.uint64)
        digests = self.comm.allgather(digest)
        drifted = [r for r in range(self.comm.size) if not np.array_equal(digests[r], digests[0])]
        if drifted:
            raise ParameterDriftError(
                f"at step {step} the parameters of rank(s) {drifted} differ from rank 0's "
                f"(checksums {[int(d[0]) for d in digests]})"
            )
