"""dpnet.memory.keep_freed_memory: freed arrays are reused by the process instead of being handed
back to the kernel and faulted in afresh (glibc; a no-op elsewhere)."""

import platform
import subprocess
import sys

import pytest

from tests.train_helpers import clean_env

CHURN = """
import resource, sys
from dpnet.memory import keep_freed_memory
taken = keep_freed_memory()
import numpy as np
x = np.ones((128, 16, 32, 32), np.float32)  # 8 MiB: above glibc's default mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    y = x * 2  # allocated, then freed: a training step's activations
    z = y + 1
    del y, z
print(taken, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def churn(**env):
    out = subprocess.run([sys.executable, "-c", CHURN], env=clean_env(**env), capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory sets glibc's malloc thresholds; elsewhere it does nothing")
def test_freed_arrays_are_reused_not_faulted_in_again():
    taken, faults = churn()
    untouched, system_faults = churn(DPNET_MALLOC="system")
    assert taken and not untouched
    pages = 8 << 20 >> 12  # an 8 MiB array's 4 KiB pages
    assert system_faults >= 10 * pages, system_faults  # glibc's default: the heap is trimmed and refaulted
    assert faults <= 3 * pages, faults                 # kept: the first two arrays' pages, once

