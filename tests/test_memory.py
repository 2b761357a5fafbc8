"""dpnet.memory.keep_freed_memory: freed arrays are reused by the process instead of being handed
back to the kernel and faulted in afresh (glibc; a no-op elsewhere)."""

import platform
import subprocess
import sys

import pytest

from tests.train_helpers import clean_env

CHURN = """
import resource
from dpnet.memory import keep_freed_memory
taken = keep_freed_memory()
import numpy as np
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
x = np.ones((128, 16, 32, 32), np.float32)  # 8 MiB, above glibc's default mmap threshold
one = faults() - before  # faulting one such array in: the unit, whatever the page size
before = faults()
for _ in range(50):
    y = x * 2  # allocated, then freed: a training step's activations
    z = y + 1
    del y, z
print(taken, one, faults() - before)
"""


def churn(**env):
    out = subprocess.run([sys.executable, "-c", CHURN], env=clean_env(**env), capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory sets glibc's malloc thresholds; elsewhere it does nothing")
def test_freed_arrays_are_reused_not_faulted_in_again():
    untouched, one, system_faults = churn(DPNET_MALLOC="system")
    assert not untouched
    if system_faults < 10 * one:
        pytest.skip(f"this C library reuses freed arrays by itself ({system_faults} faults in 50 steps, "
                    f"{one} for one array): nothing to show")
    taken, one, faults = churn()
    assert taken
    assert faults <= 3 * one, (faults, one, system_faults)  # kept: the loop's two arrays faulted in once
