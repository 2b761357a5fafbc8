"""Which process is which rank: the rank map a supervisor (`python -m dpnet.launch`) asks for.

When DPNET_RANK_MAP names a file, rank 0 writes there, at start-up, a JSON list with one
{"rank", "host", "pid", "guardian"} per rank (guardian: the PID of the rank's guardian process,
dpnet.parallel.guardian, or null). A launcher that reports a dead process by its PID (Hydra:
"PID 1402 RUNNING AT node3", the guardian's PID where there is one) can then say which rank it was.
"""

import json
import os
import socket

from ..atomic import atomic_path
from ..parallel.guardian import guardian_pid

RANK_MAP_ENV = "DPNET_RANK_MAP"


def write_rank_map(comm, environ=None):
    """Collective: gather every rank's host and PID; rank 0 writes them where RANK_MAP_ENV says."""
    path = (os.environ if environ is None else environ).get(RANK_MAP_ENV)
    if not path:
        return
    ranks = comm.allgather_obj((socket.gethostname(), os.getpid(), guardian_pid()))
    if comm.rank == 0:
        with atomic_path(path) as tmp, open(tmp, "w") as fh:
            json.dump([{"rank": r, "host": host, "pid": pid, "guardian": guardian}
                       for r, (host, pid, guardian) in enumerate(ranks)], fh)


def read_rank_map(path):
    """The list write_rank_map wrote, or [] where there is none (the job died before writing it)."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return []
