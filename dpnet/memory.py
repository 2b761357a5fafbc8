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

MALLOC_ENV = "DPNET_MALLOC"  # 'system': leave the C library's allocator as it is
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((M_MMAP_THRESHOLD, 1 << 30),   # blocks up to 1 GiB come from the heap, not mmap
            (M_TRIM_THRESHOLD, 1 << 30),   # the heap's free top is given back only beyond 1 GiB
            (M_TOP_PAD, 64 << 20))         # each heap growth takes 64 MiB more (address space)


def keep_freed_memory():
    """Set glibc's thresholds (SETTINGS) for this process; True if they were taken. A no-op
    (False) where the C library has no mallopt (macOS) or refuses it (musl), or with
    DPNET_MALLOC=system."""
    if os.environ.get(MALLOC_ENV) == "system":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for param, value in SETTINGS:  # in order: a refused mmap threshold leaves the trim alone
        if mallopt(param, value) != 1:
            return False
    return True
