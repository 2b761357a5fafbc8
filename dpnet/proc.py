"""What Linux's /proc says of the processes on this machine: their PIDs, and each one's name,
state, parent, process group and session. The supervisor, the rank guardians and the progress
display read it; without /proc (not Linux) there is nothing to read."""

import collections
import os

ProcStat = collections.namedtuple("ProcStat", "name state ppid pgid sid")


def pids():
    """The PIDs /proc lists ([] without /proc)."""
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []


def proc_stat(pid):
    """ProcStat of process pid (state: R, S, D, Z, ...), or None where it cannot be read (ended,
    no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        # pid (name) state ppid pgrp session ...; the name may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2:].split()
        return ProcStat(stat[stat.index("(") + 1:stat.rindex(")")], fields[0], int(fields[1]), int(fields[2]),
                        int(fields[3]))
    except (OSError, ValueError, IndexError):
        return None
