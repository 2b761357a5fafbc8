"""The gradient checks themselves: a gradient that is 0 in theory, whose numerical estimate
is only rounding noise, must pass; a gradient that is wrong must fail. Built from exact
arrays, so no result depends on the BLAS kernels of the machine."""

import numpy as np
import pytest

from dpnet.gradient_check import normwise_rel_error, rel_error

# A gradient with a large entry, an exact zero (a dead channel) and ordinary entries.
ANALYTIC = np.array([[3.0, 0.0], [-1.5, 0.5]])
# Its centred-difference estimate: the zero entry gets 4e-11 of rounding noise, as on an
# AVX2 machine (OpenBLAS Haswell kernels) for a dead channel of the convnet with batchnorm.
NUMERICAL = ANALYTIC + np.array([[0.0, 4e-11], [0.0, 0.0]])


def linear_layer(coef, wrong=None):
    """A layer out = (sum(coef * w),) that reports `coef` (or `wrong`) as its gradient."""
    reported = coef if wrong is None else wrong

    def forward(w):
        return np.array([np.sum(coef * w)]), None

    def backward(dout, cache):
        return dout[0] * reported

    return forward, backward


def test_layer_check_accepts_rounding_noise_on_a_zero_gradient(check_gradients):
    """The true gradient is ANALYTIC, zero entry included, but the layer's output moves by
    4e-11 per unit of that entry: its numerical gradient there is noise, not an error."""
    forward, backward = linear_layer(NUMERICAL, wrong=ANALYTIC)
    check_gradients(forward, backward, {"w": np.ones((2, 2))}, wrt=("w",))


@pytest.mark.parametrize("wrong", [ANALYTIC * 1.01, ANALYTIC * [[1, 1], [1, -1]],
                                   ANALYTIC + [[3e-4, 0], [0, 0]]],
                         ids=["scaled-1.01", "sign-flip", "1e-4-of-largest"])
def test_layer_check_rejects_a_wrong_gradient(wrong, check_gradients):
    forward, backward = linear_layer(ANALYTIC, wrong=wrong)
    with pytest.raises(AssertionError, match="gradient errors above"):
        check_gradients(forward, backward, {"w": np.ones((2, 2))}, wrt=("w",))


def test_normwise_error_is_relative_to_the_largest_entry():
    """The elementwise rel_error (the homework's) turns the noise on the zero entry into
    4e-11 / 1e-8 = 4e-3; against the largest entry, 3.0, it is 4e-11 / 3."""
    assert rel_error(NUMERICAL, ANALYTIC) == pytest.approx(4e-3)
    assert normwise_rel_error(NUMERICAL, ANALYTIC) == pytest.approx(4e-11 / 3, rel=1e-5)
    assert normwise_rel_error(np.zeros(3), np.zeros(3)) == 0


def test_normwise_error_sees_a_real_error():
    """Negative control: 1e-4 relative on the largest entry is an error of 1e-4."""
    wrong = ANALYTIC.copy()
    wrong[0, 0] *= 1 + 1e-4
    assert normwise_rel_error(NUMERICAL, wrong) == pytest.approx(1e-4, rel=1e-3)
