"""The L2 term of a data-parallel loss, slice by slice of the flat parameter layout, so
that each weight is counted once wherever the ranks divide the parameters among them."""

import numpy as np

from ..models.base import add_scaled


class SlicedL2:
    """Inputs: model (its reg and weight_names()), flat (the dpnet.flat.FlatParams layout)."""

    def __init__(self, model, flat):
        self.model, self.flat = model, flat

    def _weight_ranges(self, lo, hi):
        """The [a, b) ranges of the flat layout inside [lo, hi) that hold L2-regularised weights."""
        for name in self.model.weight_names():
            start = self.flat.offsets[name]
            a, b = max(lo, start), min(hi, start + self.flat.sizes[name])
            if a < b:
                yield a, b

    def add_gradient(self, grad, lo, hi):
        """Add reg * W to the weights' entries of the flat gradient grad[lo:hi]."""
        if not self.model.reg:
            return
        for a, b in self._weight_ranges(lo, hi):
            add_scaled(grad[a:b], self.flat.data[a:b], self.model.reg)

    def loss(self, lo, hi):
        """0.5 * reg * sum(W^2) over the weights' entries among the flat parameters [lo, hi)."""
        if not self.model.reg:
            return 0.0
        return 0.5 * self.model.reg * sum(float(np.vdot(self.flat.data[a:b], self.flat.data[a:b]))
                                          for a, b in self._weight_ranges(lo, hi))
