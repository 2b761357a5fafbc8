"""A model's parameters as views into one contiguous buffer.

Packing every parameter (and its gradient) into one flat array lets an update rule
run once over the whole model and lets a data-parallel gradient reduction be one
collective call instead of one per parameter.
"""

import numpy as np


class FlatParams:
    """Rebinds `params[name]` to views of one flat buffer `data`; `grad` is a flat
    gradient buffer of the same layout, and `grads[name]` its views.

    Inputs:
    - params: dict name -> array, all of one floating dtype; its entries are replaced
      in place by views, so update `params[name][...]`, never rebind it.
    - extra: slots appended after the gradients in `buffer` (= grad + tail), so other
      values (a loss) can ride along in the same reduction.
    - order: the parameter names in buffer order (default: the dict's order)
    - buffer: storage to use as `buffer` (length: parameters + extra, the parameters'
      dtype), e.g. shared memory; default: a new zeroed array
    """

    def __init__(self, params, extra=0, order=None, buffer=None):
        dtypes = {np.asarray(v).dtype for v in params.values()}
        if len(dtypes) != 1:
            raise ValueError(f"all parameters must share one dtype, got {sorted(map(str, dtypes))}")
        self.names = list(params) if order is None else list(order)
        if sorted(self.names) != sorted(params):
            raise ValueError(f"order {self.names} must name each parameter {sorted(params)} once")
        self.shapes = {k: np.shape(params[k]) for k in self.names}
        sizes = [int(np.prod(self.shapes[k])) for k in self.names]
        self.offsets = dict(zip(self.names, np.cumsum([0] + sizes[:-1]).tolist()))
        self.sizes = dict(zip(self.names, sizes))
        dtype = dtypes.pop()
        data = np.empty(sum(sizes), dtype=dtype)
        for name in self.names:
            self.view(data, name)[...] = params[name]
        if buffer is None:
            buffer = np.zeros(sum(sizes) + extra, dtype=dtype)
        elif buffer.shape != (sum(sizes) + extra,) or buffer.dtype != dtype:
            raise ValueError(f"buffer must have shape ({sum(sizes) + extra},) and dtype {dtype}, "
                             f"got {buffer.shape} {buffer.dtype}")
        self.params = params
        self.rebind(data=data, buffer=buffer)

    def rebind(self, data=None, buffer=None):
        """Move the parameters to `data` and/or the gradient buffer to `buffer` (same
        layouts; their contents are taken as they are), rebinding params and grads."""
        if data is not None:
            self.data = data
            for name in self.names:
                self.params[name] = self.view(data, name)
        if buffer is not None:
            self.buffer = buffer
            self.grad = buffer[:len(self.data)]
            self.grads = {name: self.view(self.grad, name) for name in self.names}

    def view(self, flat, name):
        """The slice of a flat array (laid out like `data`) that holds `name`, in its shape."""
        o = self.offsets[name]
        return flat[o:o + self.sizes[name]].reshape(self.shapes[name])

    def pack_grads(self, grads):
        """Copy a dict of gradients into `grad` and return it."""
        missing = set(self.names) - set(grads)
        if missing:
            raise ValueError(f"gradients missing for parameters {sorted(missing)}")
        for name in self.names:
            self.grads[name][...] = grads[name]
        return self.grad

    def is_bound(self):
        """True while every params entry is still a view of `data` (nobody rebound one)."""
        return all(np.shares_memory(self.params[k], self.data) for k in self.names)
