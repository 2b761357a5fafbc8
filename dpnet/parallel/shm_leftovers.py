"""MPICH's shared-memory segments (/dev/shm/mpich_shm_*) outlive a job that is aborted or
killed: MPICH removes them in MPI_Finalize only. dpnet removes them itself:

- a rank that aborts the job first unlinks the segments it maps (unlink_own); they stay
  valid for the processes that still map them and vanish with the last of those;
- at start-up, segments older than STALE_SECONDS that no live process maps (a killed job's)
  are removed (remove_stale).
"""

import glob
import os
import time

SEGMENTS = "/dev/shm/mpich_shm_*"
STALE_SECONDS = 60.0  # younger segments may belong to a job that is starting right now


def _mapped(maps_path):
    try:
        with open(maps_path) as fh:
            return {line.split()[-1] for line in fh if "/dev/shm/mpich_shm_" in line}
    except OSError:  # the process ended, or is not ours to read
        return set()


def segments():
    """Every MPICH segment in /dev/shm."""
    return set(glob.glob(SEGMENTS))


def mapped_segments():
    """The MPICH segments some live process maps."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        mapped |= _mapped(maps)
    return mapped


def unlink_own():
    """Unlink the MPICH segments this process maps; returns how many."""
    removed = 0
    for path in _mapped("/proc/self/maps"):
        try:
            os.unlink(path)
            removed += 1
        except OSError:  # another rank of the node was first
            pass
    return removed


def remove_stale(now=None):
    """Remove segments older than STALE_SECONDS that no live process maps; returns how many."""
    now = time.time() if now is None else now
    candidates = []
    for path in segments():
        try:
            if now - os.stat(path).st_mtime > STALE_SECONDS:
                candidates.append(path)
        except OSError:
            pass
    if not candidates:
        return 0
    mapped = mapped_segments()
    removed = 0
    for path in candidates:
        if path not in mapped:
            try:
                os.unlink(path)
                removed += 1
            except OSError:
                pass
    return removed
