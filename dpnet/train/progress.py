"""Progress of an epoch on rank 0: a live bar where the output ends on a terminal, else a line
every DPNET_PROGRESS_SECONDS (10 s by default), which suits a log file, a pipe or a SLURM log.

Under mpirun the ranks' output reaches the terminal through the launcher, a pipe: the ranks
have no terminal of their own (Hydra starts them in a session of their own). Where the
launcher runs on rank 0's machine, its stderr tells: a terminal there gets the live bar
(Hydra passes the bar's carriage returns on as they come).
"""

import os
import sys
import time

from ..proc import proc_stat

PROGRESS_SECONDS_ENV = "DPNET_PROGRESS_SECONDS"


def progress(total, done, description):
    """A progress display for `total` steps of which `done` are done: a tqdm bar or LineProgress.
    Both take update(1), set_postfix(**fields) and close()."""
    if sys.stderr.isatty() or launcher_on_terminal():
        from tqdm import tqdm
        return tqdm(total=total, initial=done, desc=description, leave=False, file=sys.stderr)
    seconds = float(os.environ.get(PROGRESS_SECONDS_ENV) or 10)
    return LineProgress(total, done, description, seconds, sys.stderr)


def launcher_on_terminal(levels=6):
    """True if, under an MPI launcher on this machine, the output ends on a terminal: going up
    the parent processes (the rank's guardian, Hydra's proxy, mpiexec, a dpnet.launch supervisor)
    while each one's stderr is a pipe that its parent reads, the first whose stderr is not a pipe
    has a tty there. False without /proc (not Linux), where the output ends in a file or in a
    pipe to another program (`| tee log`), or where the launcher runs elsewhere (ssh, srun)."""
    from ..parallel import launched_by_mpi
    if not launched_by_mpi():
        return False
    pid = os.getpid()
    try:
        stderr = os.readlink(f"/proc/{pid}/fd/2")
        for _ in range(levels):
            if not stderr.startswith("pipe:"):
                return stderr.startswith(("/dev/pts/", "/dev/tty"))
            stat = proc_stat(pid)
            if stat is None:
                return False
            pid = stat.ppid
            if pid <= 1 or not any(os.readlink(f"/proc/{pid}/fd/{fd}") == stderr
                                   for fd in os.listdir(f"/proc/{pid}/fd")):
                return False  # the pipe leads to another program, not to the parent
            stderr = os.readlink(f"/proc/{pid}/fd/2")
    except OSError:
        return False
    return False


class LineProgress:
    """One line `description: step k/total, field value, ...` every `seconds` seconds."""

    def __init__(self, total, done, description, seconds, stream):
        self.total, self.done, self.description = total, done, description
        self.seconds, self.stream = seconds, stream
        self.fields = {}
        self.last = time.monotonic()

    def update(self, steps):
        self.done += steps

    def set_postfix(self, **fields):
        self.fields = fields
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            shown = ", ".join(f"{key.replace('_', '/')} {value}" for key, value in self.fields.items())
            self.stream.write(f"{self.description}: step {self.done}/{self.total}, {shown}\n")
            self.stream.flush()

    def close(self):
        pass
