"""Fault injection for the tests: DPNET_FAULT=RANK:STEP:KIND makes one rank fail at one step."""

import os
import sys
import time

import numpy as np

from .config import ConfigError

FAULT_ENV = "DPNET_FAULT"
KINDS = ("raise", "exit", "sys-exit", "hang", "hang-update", "nan", "hang-start", "hang-evaluation", "hang-checkpoint",
         "hang-shutdown")


def fault_spec(environ=None):
    """(rank, step, kind) from DPNET_FAULT, or None; ConfigError if it is malformed (checked at
    start-up on every rank, so a typo never ends one rank in the middle of a run)."""
    spec = (os.environ if environ is None else environ).get(FAULT_ENV)
    if not spec:
        return None
    try:
        fault_rank, fault_step, kind = spec.split(":")
        fault_rank, fault_step = int(fault_rank), int(fault_step)
    except ValueError:
        raise ConfigError(f"{FAULT_ENV} must be RANK:STEP:KIND, got {spec!r}") from None
    if kind not in KINDS:
        raise ConfigError(f"{FAULT_ENV}: unknown fault kind {kind!r} ({', '.join(KINDS)})")
    return fault_rank, fault_step, kind


def inject_start_fault(rank):
    """hang-start: RANK sleeps forever while the job starts (STEP is ignored)."""
    spec = fault_spec()
    if spec is not None and spec[2] == "hang-start" and spec[0] == rank:
        while True:
            time.sleep(60)


def inject_part_fault(rank, step, part):
    """hang-evaluation, hang-checkpoint, hang-shutdown: RANK sleeps forever in the first such part
    of the run (evaluation, checkpoint writing, the shutdown) at or after STEP."""
    spec = fault_spec()
    if spec is not None and spec[2] == f"hang-{part}" and spec[0] == rank and step >= spec[1]:
        while True:
            time.sleep(60)


def inject_fault(rank, step, xb, after_loss=False):
    """Make this rank fail as DPNET_FAULT says, if it names this rank and step: raise (an
    exception), exit (os._exit(3), as a crash in C code ends a process), sys-exit (sys.exit(3)), hang (sleep forever), nan (NaN inputs, hence a NaN global
    loss), all before the step's loss, or hang-update (sleep forever after the gradient sum,
    before the update; called with after_loss=True). Returns the batch, poisoned for nan."""
    spec = fault_spec()
    if spec is None:
        return xb
    fault_rank, fault_step, kind = spec
    if rank != fault_rank or step != fault_step or after_loss != (kind == "hang-update") or \
            kind not in ("raise", "exit", "sys-exit", "hang", "hang-update", "nan"):
        return xb
    if kind in ("hang", "hang-update"):
        while True:
            time.sleep(60)
    if kind == "raise":
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")
    if kind == "exit":
        os._exit(3)
    if kind == "sys-exit":
        sys.exit(3)
    return np.full_like(xb, np.nan)  # nan
