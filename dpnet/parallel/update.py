"""How DataParallel.step applies an update rule: where the parameters live, who updates them.

- ReplicatedUpdate: every rank holds its own copy of the parameters and optimizer state
  and applies the rule to all of them (after an Allreduce every rank has the whole sum).
  Collectives per step: none.
- DividedUpdate: the ranks of a node hold one copy of the parameters and optimizer state
  in shared memory. A rule that declares itself elementwise (`rule.elementwise = True`,
  as every rule in dpnet.optim does: updating a slice of w with the same slices of dw
  and of the state gives exactly that slice of the whole update) is applied by each rank
  to its own slice only, so the optimizer's work is divided instead of repeated; any
  other rule updates everything on node rank 0. Collectives per step, over the node:
  fence (every slice updated before anyone's next forward). On the first step with a
  config, its state arrays move to shared memory (one shared array each: collective).

Rules keep the homework's contract `next_w, config = rule(w, dw, config)`: a rule that
returns a new array instead of updating w in place is honoured (it is copied into w).
"""

import contextlib
import time

import numpy as np

from ..optim import apply_update


def _keep_in(config, returned):
    """Make the caller's dict hold what the rule returned (a rule may return a new dict)."""
    if returned is not None and returned is not config:
        config.clear()
        config.update(returned)


class ReplicatedUpdate:
    """Every rank updates its own copy of every parameter."""

    def __init__(self, comm, flat):
        self.comm, self.flat = comm, flat

    def step(self, rule, config, guard, step):
        """Apply rule once to the flat parameters; returns seconds spent waiting for other ranks."""
        _keep_in(config, apply_update(rule, self.flat.data, self.flat.grad, config))
        return 0.0

    def broadcast(self, root=0):
        self.comm.bcast(self.flat.data, root)

    @contextlib.contextmanager
    def writing(self):
        """Each rank writes its own copy already."""
        yield

    def close(self):
        return self


class DividedUpdate:
    """The ranks of a node share the parameters and optimizer state; each updates its slice.

    Inputs: reducer, a dpnet.parallel.shared_memory.SharedMemoryReducer (its node, its
    slices and its shared arrays); flat, the dpnet.flat.FlatParams to move into shared memory.
    """

    def __init__(self, reducer, flat):
        self.reducer, self.node, self.flat = reducer, reducer.node, flat
        shared = reducer.shared_array(flat.data.size)
        self._move_parameters_to(shared)  # node rank 0 brings its values; broadcast() spreads rank 0's
        self.owned = (min(reducer.lo, shared.size), min(reducer.hi, shared.size))
        self._work_arrays = {}  # the rule's '_'-prefixed scratch arrays for this rank's slice
        self._configs = []  # optimizer configs whose state lives in shared memory
        self._shared_state = []  # those state arrays
        self._node_zero_configs = []  # configs of other rules, kept by node rank 0 alone

    def broadcast(self, root=0):
        if root != 0:  # world rank 0 holds node 0's copy
            raise ValueError("with shared-memory parameters only rank 0 can broadcast them")
        self.reducer.broadcast(self.flat.data)

    @contextlib.contextmanager
    def writing(self):
        """Each rank writes a private copy (never the node's shared one, which ranks would
        write at once); on leaving, node rank 0's copy becomes the node's."""
        shared = self.flat.data
        self.flat.rebind(data=shared.copy())
        yield
        self._move_parameters_to(shared)

    def _move_parameters_to(self, shared):
        """Rebind the parameters to the node's shared array, filled with node rank 0's
        private values (collective over the node)."""
        self.node.fence()  # nobody reads the node's copy while it is replaced
        if self.node.rank == 0:
            shared[...] = self.flat.data
        self.flat.rebind(data=shared)

    def step(self, rule, config, guard, step):
        with guard.guarding(step, "update"):  # moving state to shared memory is collective too
            if getattr(rule, "elementwise", False):
                lo, hi = self.owned
                view = self._slice_config(config, lo, hi)
                view = apply_update(rule, self.flat.data[lo:hi], self.flat.grad[lo:hi], view)
                self._store_slice_config(config, view, lo, hi)
            else:
                if not any(config is seen for seen in self._node_zero_configs):
                    self._node_zero_configs.append(config)
                if self.node.rank == 0:
                    _keep_in(config, apply_update(rule, self.flat.data, self.flat.grad, config))
            start = time.perf_counter()
            self.node.fence()  # every slice updated before anyone's next forward
        return time.perf_counter() - start

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
        array = self.reducer.shared_array(self.flat.data.size, fill=fill)
        self._shared_state.append(array)
        return array

    def close(self):
        """Collective over the node: the parameters and the optimizer state move to private
        copies (the shared memory is about to be released); returns the ReplicatedUpdate
        that carries on."""
        self.node.fence()  # nobody still updates a slice
        self.flat.rebind(data=self.flat.data.copy())
        for config in self._configs:
            for key, value in config.items():
                if self._is_state(value):
                    config[key] = value.copy()
        for config in self._node_zero_configs:  # from now on every rank runs the rule itself
            state = self.node.bcast_obj(config, root=0)
            if self.node.rank != 0:
                config.clear()
                config.update(state)
        return ReplicatedUpdate(self.reducer.comm, self.flat)
