import os


def pytest_report_header(config):
    """One line on whether the cluster tests (tests/test_cluster.py) run here, and why not."""
    from dpnet.parallel import launched_by_mpi
    if launched_by_mpi():
        return None
    from launch.netns_cluster import available
    ok, why = available(reason=True)
    return "cluster tests (network-namespace hosts): " + ("run" if ok else f"skipped, {why}")


# ---------------------------------------------------------------- the layer-choice cache

def pytest_configure(config):
    """Training runs measure their layer choices (dpnet.autotune) at first use: the tests keep
    those in a cache of their own, never the user's, which their subprocesses share
    (train_helpers.clean_env passes it on)."""
    import tempfile

    from dpnet.autotune import CACHE_ENV
    config._autotune_dir = tempfile.mkdtemp(prefix="dpnet-tests-autotune-")
    os.environ[CACHE_ENV] = os.path.join(config._autotune_dir, "autotune.json")


def pytest_unconfigure(config):
    import shutil
    shutil.rmtree(getattr(config, "_autotune_dir", ""), ignore_errors=True)


# ---------------------------------------------------------------- /dev/shm hygiene

def pytest_sessionstart(session):
    from dpnet.parallel.shm_leftovers import segments
    session.config._mpich_segments_before = segments()


def pytest_sessionfinish(session):
    """Jobs the tests abort on purpose (fault injection, MPI_Abort) leave MPICH's 2-4 MiB
    shared-memory segment behind in /dev/shm; remove the ones created during this session
    that no process maps any more, so repeated test runs do not fill it."""
    before = getattr(session.config, "_mpich_segments_before", None)
    if before is None:
        return
    from dpnet.parallel.shm_leftovers import mapped_segments, segments
    for path in segments() - before - mapped_segments():
        try:
            os.remove(path)
        except OSError:
            pass


# ---------------------------------------------------------------- layer-test helpers
# (used by test_layers.py, test_conv_pool.py and test_batchnorm.py)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dpnet.gradient_check import eval_numerical_gradient_array, normwise_rel_error  # noqa: E402

# Largest error relative to the gradient's largest entry (dpnet.gradient_check.
# normwise_rel_error) accepted between an analytic gradient and its centred-difference
# estimate, in float64. The layer checks stay of order 1e-10 (rounding of order 1e-16 / h
# plus truncation of order h^2), 1e4 below the bound; a wrong gradient is off by far more than 1e-6 (the controls in
# test_gradient_check.py: 1% scale, one sign flip, 1e-4 of the largest entry).
GRAD_TOL = 1e-6
# Largest absolute value accepted for a gradient that is exactly zero in theory (a bias
# feeding a batchnorm: the whole array vanishes, so there is no scale to be relative to).
ZERO_GRAD_ATOL = 1e-8


def check_layer_gradients(forward, backward, args, wrt, seed=0, tol=GRAD_TOL, vanishing=()):
    """Check a layer's backward pass against numerical gradients.

    - forward: called as forward(*args.values()), returns (out, cache)
    - backward: called as backward(dout, cache), returns the gradients with respect to
      the arguments named in `wrt`, in that order (a bare array if there is one)
    - args: dict of the forward arguments, in call order; the float64 arrays named in
      `wrt` are perturbed in place (and restored) by the numerical gradient
    - vanishing: names in `wrt` whose gradient is identically zero (a bias feeding a
      batchnorm); both the analytic and numerical gradient must be within ZERO_GRAD_ATOL of 0
    - seed: picks the fixed random upstream gradient dout; the checked scalar is
      sum(out * dout)

    Returns {name: normwise_rel_error} after asserting each is <= tol.
    """
    out, cache = forward(*args.values())
    # a seed sequence no test uses for its inputs: an upstream gradient equal to the noise
    # that made x would, e.g., make batchnorm's dx vanish and the relative error meaningless
    dout = np.random.default_rng([seed, 0xD0]).standard_normal(out.shape)
    grads = backward(dout, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    assert len(grads) == len(wrt), f"backward returned {len(grads)} gradients, expected {wrt}"
    errors = {}
    for name, grad in zip(wrt, grads):
        assert grad.shape == args[name].shape, f"d{name} has shape {grad.shape}"
        numerical = eval_numerical_gradient_array(
            lambda _: forward(*args.values())[0], args[name], dout
        )
        if name in vanishing:
            largest = max(np.max(np.abs(grad)), np.max(np.abs(numerical)))
            assert largest <= ZERO_GRAD_ATOL, f"d{name} should vanish, has entries of {largest:.1e}"
            continue
        errors[name] = normwise_rel_error(numerical, grad)
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative gradient errors above {tol}: {bad}"
    return errors


@pytest.fixture
def check_gradients():
    """The check_layer_gradients helper, as a fixture for the layer test modules."""
    return check_layer_gradients


@pytest.fixture
def rng():
    """A fresh, fixed-seed Generator per test."""
    return np.random.default_rng(1234)
