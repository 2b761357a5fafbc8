"""How a rank computes its contribution to a step: the forward and backward passes.

- SinglePass: one pass over the rank's whole shard; each gradient is packed into the reducer's
  send buffer as backward finishes it, and the reducer is told (it may start summing it while
  backward goes on).
- MicroShardPasses (the reproducible mode): one pass per micro-shard of the rank
  (dpnet.parallel.microshards), each on a view of the model that shares its parameters but has
  batchnorm statistics of its own and reduces them over the micro-shards, each packing its
  gradients into a send buffer of its own (the reducer sums them in a canonical order). The
  passes make each affine layer's products with the weight as one GEMM over their stacked rows
  (StackedProducts), where that gives every row the bits it has alone.

Interface: run(X, y, total, step) -> one data loss per send buffer of the reducer, in order.
"""

import copy
import functools

import numpy as np

from ..layers.affine import WeightGradFactors
from .microshards import StackedProducts, ordered_sum
from .sharding import rank_bounds, shard_bounds

BN_STATS = ("running_mean", "running_var")


def _pack_into(flat, send, on_ready=None, slots=None):
    """(on_grad, stored): a callback that copies each gradient into its place in `send`, and the
    count of stores per parameter (each must be stored once per pass). An affine weight gradient
    given as factors (WeightGradFactors) is stored as its factors where `slots` (the reducer's
    FactorSlots for this pass, or None) takes them, else multiplied out into its place."""
    views = {name: flat.view(send, name) for name in flat.names}
    stored = dict.fromkeys(flat.names, 0)

    def on_grad(name, grad):
        if not isinstance(grad, WeightGradFactors):
            views[name][...] = grad
        elif slots is None or not slots.store(flat.offsets[name], grad, send):
            grad.into(views[name])
        stored[name] += 1
        if on_ready is not None:
            lo = flat.offsets[name]
            on_ready(lo, lo + flat.sizes[name])
    return on_grad, stored


def _check_stored(stored):
    if any(count != 1 for count in stored.values()):  # its bucket would go unreduced, or early
        raise RuntimeError(f"backward stored {sum(stored.values())} gradients for {len(stored)} "
                           "parameters; each must be stored once")


class SinglePass:
    def __init__(self, model, flat, reducer):
        self.model, self.flat, self.reducer = model, flat, reducer

    def run(self, X, y, total, step):
        on_grad, stored = _pack_into(self.flat, self.reducer.send, self.reducer.ready)
        data_loss, _ = self.model.data_loss(X, y, batch_size=total, on_grad=on_grad)
        _check_stored(stored)
        return [data_loss]


class MicroShardPasses:
    """Inputs: model; flat (its FlatParams); reducer (reducer.sends: one buffer per pass);
    group, a dpnet.parallel.microshards.MicroShardGroup; seed (dropout streams are drawn from
    (seed, step, micro-shard))."""

    def __init__(self, model, flat, reducer, group, seed=0):
        self.model, self.flat, self.reducer, self.group, self.seed = model, flat, reducer, group, seed
        self.views = [self._view(j) for j in range(group.k)]

    def _view(self, j):
        model, comm = self.model, self.group.comms[j]
        view = copy.copy(model)  # shares params, layout and algorithms
        view.bn_params = [{**bn, **{key: bn[key].copy() for key in BN_STATS}} for bn in model.bn_params]
        view.comm = comm if model.bn_mode == "sync" else None
        view.dw_factors = True  # affine weight gradients as factors: the reducer may take them
        if self.group.k > 1:  # the rank's passes make each affine product as one
            view.products = functools.partial(StackedProducts, self.group, j)
        if model.dropout_param is not None:
            view.dropout_param = dict(model.dropout_param)
        return view

    def run(self, X, y, total, step):
        comm, group = self.group.comm, self.group
        start, stop = rank_bounds(total, group.size, comm.size, comm.rank)
        if len(X) != stop - start:
            raise ValueError(f"in reproducible mode rank {comm.rank} must pass its micro-shards, examples "
                             f"[{start}, {stop}) of the global batch of {total} (dpnet.parallel.sharding."
                             f"rank_bounds), got {len(X)} examples")
        for view in self.views:  # every pass starts from the model's statistics
            for bn, own in zip(self.model.bn_params, view.bn_params):
                for key in BN_STATS:
                    own[key][...] = bn[key]

        def one_pass(j):
            view, micro = self.views[j], group.comms[j]
            lo, hi = (b - start for b in shard_bounds(total, group.size, micro.rank))
            if view.dropout_param is not None:
                view.dropout_param["rng"] = np.random.default_rng([self.seed, step, micro.rank])
            on_grad, stored = _pack_into(self.flat, self.reducer.sends[j], slots=self.reducer.factor_slots(j, total))
            data_loss, _ = view.data_loss(X[lo:hi], y[lo:hi], batch_size=total, on_grad=on_grad)
            _check_stored(stored)
            return data_loss

        losses = group.run(one_pass)
        self._keep_statistics()
        return losses

    def _keep_statistics(self):
        """The model's running statistics after the step: with sync batchnorm every pass has the
        same ones; with local batchnorm (each micro-shard's own statistics) their mean over the
        M micro-shards, summed in micro-shard order."""
        if not self.model.bn_params:
            return
        if self.model.bn_mode == "sync":
            for bn, own in zip(self.model.bn_params, self.views[0].bn_params):
                for key in BN_STATS:
                    bn[key][...] = own[key]
            return
        local = np.stack([np.concatenate([bn[key] for bn in view.bn_params for key in BN_STATS])
                          for view in self.views])
        total = ordered_sum(self.group.comm.allgather(local).reshape(self.group.size, -1))
        total /= self.group.size  # a power of two: exact
        offset = 0
        for bn in self.model.bn_params:
            for key in BN_STATS:
                bn[key][...] = total[offset:offset + bn[key].size]
                offset += bn[key].size
