"""Fully connected (affine) layer."""

import numpy as np

from ._validate import require_ndim

DX_FORMS = ("plain", "transposed")


class AffineProducts:
    """How an affine layer multiplies by its weight w (D, M): forward(x2, w) = x2 @ w, and
    input_grad(dout, w) = dout @ w.T made in `dx_form` (input_grad). The one interface for
    other ways of making the same products (the reproducible mode stacks its passes' rows into
    one GEMM: dpnet.parallel.microshards.StackedProducts)."""

    def __init__(self, dx_form="plain"):
        if dx_form not in DX_FORMS:
            raise ValueError(f"dx_form must be one of {DX_FORMS}, got {dx_form!r}")
        self.dx_form = dx_form

    def forward(self, x2, w):
        return x2 @ w

    def input_grad(self, dout, w):
        return input_grad(dout, w, self.dx_form)


PLAIN = AffineProducts()


def affine_forward(x, w, b, products=PLAIN):
    """Affine transform of flattened inputs.

    Inputs:
    - x: (N, d_1, ..., d_k); each example is flattened to D = d_1 * ... * d_k
    - w: weights, (D, M)
    - b: biases, (M,)
    - products: how the products with w are made, here and in affine_backward (AffineProducts)

    Returns (out, cache): out is (N, M).
    """
    require_ndim("w", w, 2, "(D, M)")
    x2 = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))  # (N, D); explicit D so N = 0 works
    if x2.shape[1] != w.shape[0]:
        raise ValueError(
            f"x flattens to {x2.shape[1]} features per example but w has shape {w.shape}: "
            f"expected w of shape ({x2.shape[1]}, M)"
        )
    if b.shape != (w.shape[1],):
        raise ValueError(f"b must have shape ({w.shape[1]},) to match w, got {b.shape}")
    out = products.forward(x2, w)  # (N, M)
    out += b
    return out, (x, w, products)


class WeightGradFactors:
    """An affine layer's weight gradient x2.T @ dout, (D, M), left as its two factors: x2, the
    flattened input (N, D), and dout (N, M). It costs N * (D + M) numbers instead of D * M, and
    the product can be made later, e.g. over the factors of several shards stacked (the
    reproducible mode's sum, dpnet.parallel.canonical). np.asarray() of it is the product."""

    def __init__(self, x2, dout):
        self.x2, self.dout = x2, dout
        self.shape = (x2.shape[1], dout.shape[1])
        self.dtype = np.result_type(x2, dout)

    def into(self, out):
        """Write the product into out, (D, M)."""
        return np.matmul(self.x2.T, self.dout, out=out)

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("WeightGradFactors has no array to share: its product is made anew")
        product = self.x2.T @ self.dout
        return product if dtype is None else product.astype(dtype)


def input_grad(dout, w, form="plain"):
    """dout @ w.T, (N, D), for dout (N, M) and w (D, M): made as written ('plain') or as
    (w @ dout.T).T ('transposed'), the same products summed in another BLAS call. Which call
    is faster depends on N, D, M and the machine (for few rows and a large w the transposed
    one can be twice as fast, for many rows slower), so it is measured there: dpnet.autotune."""
    if form == "plain":
        return dout @ w.T
    if form == "transposed":
        return (w @ dout.T).T
    raise ValueError(f"dx_form must be one of {DX_FORMS}, got {form!r}")


def affine_backward(dout, cache, compute_dx=True, dw_factors=False):
    """Backward pass of affine_forward.

    Inputs:
    - dout: upstream gradient, (N, M)
    - cache: from affine_forward (dx is made by its products' input_grad)
    - compute_dx: False skips dx (None is returned), for a layer whose input is data
    - dw_factors: True returns dw as WeightGradFactors(x2, dout), not yet multiplied

    Returns (dx, dw, db) with the shapes of x, w and b.
    """
    x, w, products = cache
    x2 = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))  # (N, D)
    dw = WeightGradFactors(x2, dout) if dw_factors else x2.T @ dout  # (D, M)
    db = dout.sum(axis=0)  # (M,)
    dx = products.input_grad(dout, w).reshape(x.shape) if compute_dx else None
    return dx, dw, db
