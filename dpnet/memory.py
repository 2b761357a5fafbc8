"""Keep freed memory in the process for the next step, as PyTorch's caching allocator does.

A training step allocates and frees the same large arrays every time (activations, column
blocks, gradients: megabytes each). glibc's malloc hands blocks above its thresholds back to
the kernel when they are freed (munmap, or trimming the heap), so the next step's arrays fault
their pages in afresh and the kernel zeroes them. keep_freed_memory() raises those thresholds
(mallopt) so that freed blocks are reused. The process then holds its peak memory until it
exits, which a training process reaches every step anyway.

The README ("Performance") gives what it saved here: mostly kernel time (page faults).
"""

import ctypes
import os
import sys

MALLOC_ENV = "DPNET_MALLOC"  # 'system': leave the C library's allocator as it is
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# blocks up to this size come from the heap, not mmap: 1 GiB, or 32 MiB, the most that older
# glibc (2.30, for one) takes on 64-bit systems
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
SETTINGS = ((M_TRIM_THRESHOLD, 1 << 30),   # the heap's free top is given back only beyond 1 GiB
            (M_TOP_PAD, 64 << 20))         # each heap growth takes 64 MiB more (address space)


def keep_freed_memory():
    """Set glibc's thresholds for this process; True if they were taken. A no-op (False) off
    Linux, where the C library has no mallopt or refuses it (musl), or with DPNET_MALLOC=system."""
    if os.environ.get(MALLOC_ENV) == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: a trim threshold alone would pin glibc's mmap threshold low
    if not any(mallopt(M_MMAP_THRESHOLD, value) == 1 for value in MMAP_THRESHOLDS):
        return False
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
