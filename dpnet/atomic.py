"""Write a file so that a crash at any moment leaves either the old file or the new one."""

import contextlib
import glob
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; once the block has written it, flush it to disk
    and rename it over `path`. On any failure the temporary file is removed and `path` is
    left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(path):
    """Remove the temporary files that writers of `path` killed mid-write left beside it;
    returns how many. Call it only where no other process is writing `path`."""
    pattern = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.*.tmp")
    removed = 0
    for tmp in glob.glob(pattern):
        with contextlib.suppress(OSError):
            os.remove(tmp)
            removed += 1
    return removed
