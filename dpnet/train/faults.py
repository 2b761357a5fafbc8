"""Fault injection for the tests: DPNET_FAULT makes one rank fail at one step."""

import os
import time

import numpy as np

from .config import ConfigError

FAULT_ENV = "DPNET_FAULT"


def inject_fault(rank, step, xb, after_loss=False):
    """For tests: DPNET_FAULT=RANK:STEP:KIND makes RANK fail at STEP with KIND one of
    raise (an exception), exit (os._exit(3)), hang (sleep forever), nan (NaN inputs,
    hence a NaN global loss), all before the step's loss, or hang-update (sleep forever
    after the gradient sum, before the update; called with after_loss=True).
    Returns the batch, poisoned for nan."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return xb
    try:
        fault_rank, fault_step, kind = spec.split(":")
        fault_rank, fault_step = int(fault_rank), int(fault_step)
    except ValueError:
        raise ConfigError(f"{FAULT_ENV} must be RANK:STEP:KIND, got {spec!r}") from None
    if rank != fault_rank or step != fault_step or after_loss != (kind == "hang-update"):
        return xb
    if kind in ("hang", "hang-update"):
        while True:
            time.sleep(60)
    if kind == "raise":
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")
    if kind == "exit":
        os._exit(3)
    if kind == "nan":
        return np.full_like(xb, np.nan)
    raise ConfigError(f"{FAULT_ENV}: unknown fault kind {kind!r} (raise, exit, hang, hang-update, nan)")
