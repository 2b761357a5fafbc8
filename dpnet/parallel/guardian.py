"""A guardian per rank: under an MPI launcher, `python -m dpnet.train` forks before MPI starts.
The child is the rank and trains; the parent, the process the launcher started and watches,
waits for it. Where the rank ended without saying why (os._exit or exit() in C code, or a
signal), the guardian names it, on stderr:

    [rank 1] ended with exit status 3 and no report (os._exit, or exit() in C code); PID 4242 on node3

and then, since the job cannot go on, ends the host's other ranks (their guardians first, then
the ranks: what the launcher's clean-up does, without depending on it), and ends the same way
(the same status, or the same signal).

Why a second process: Hydra reports a rank killed by a signal by its PID only, says nothing of
a rank that exits on its own, and SIGKILLs the other ranks within milliseconds, before any of
them could report (measured: they receive no catchable signal first). Only a process outside
the rank, yet started by the launcher, is there to see and say which rank it was.

The rank tells its guardian that an end is its own doing (a normal exit, which reports what it
has to; an abort or a watchdog exit, which report first) with expect_exit(); any other end is
reported, status 0 included. The guardian passes on the signals it receives (Hydra signals whole
process groups; a rank without a terminal leaves its guardian's group, so it gets each one once;
one with a terminal stays, so it can read it, and may get a signal twice: see dpnet.train.cli's
Ctrl-C), and the rank dies with its guardian (PR_SET_PDEATHSIG), so killing the guardian ends
the rank. The launcher's exit status is not always the rank's: Hydra may pass on the status of
another rank it killed while cleaning up (9); the guardian's line says how the rank ended.
Linux only; elsewhere the rank runs unguarded, as before.
"""

import atexit
import os
import signal
import socket
import sys

from ..proc import pids, proc_stat
from .comm import launched_by_mpi, launcher_rank

GUARDIAN_NAME = "dpnet-guardian"  # the guardian's process name (ps -o comm, /proc/PID/stat)
PASSED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15

_notice_fd = [None]    # in a guarded rank: the write end of the pipe to its guardian
_guardian_pid = [None]


def guardian_pid():
    """The PID of this rank's guardian, or None when it runs unguarded."""
    return _guardian_pid[0]


def expect_exit():
    """In a guarded rank: the coming end of this process is its own doing and is reported (or
    needs no report); the guardian stays quiet. Harmless anywhere else and when called twice."""
    fd, _notice_fd[0] = _notice_fd[0], None
    if fd is not None:
        try:
            os.write(fd, b"x")
        except OSError:
            pass


def guard_this_rank():
    """Fork into guardian and rank when this process is a rank an MPI launcher started and MPI
    is not yet initialised; return in the rank, never in the guardian. A no-op otherwise."""
    if not launched_by_mpi() or _guardian_pid[0] is not None or "mpi4py.MPI" in sys.modules or not _linux():
        return
    rank = launcher_rank()
    parent = os.getpid()
    read_fd, write_fd = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    # signals wait until each side has its handlers (the guardian's pass them on; the rank's own)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, PASSED_ON)
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        _notice_fd[0], _guardian_pid[0] = write_fd, parent
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent:  # the guardian died before the line above took effect
            os._exit(1)
        if not _has_terminal():
            # group signals (Hydra signals each rank's group) reach the guardian only, which passes
            # each on once; a rank with a terminal stays in its foreground group, to read from it
            os.setpgid(0, 0)
        atexit.register(expect_exit)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return
    os.close(write_fd)
    _guard(child, rank, read_fd, blocked, os.getppid())


def set_parent_death_signal(signum):
    """Have the kernel send signum to this process when its parent dies (Linux; else nothing)."""
    _prctl(_PR_SET_PDEATHSIG, int(signum))


def _guard(child, rank, read_fd, blocked, launcher):
    """The guardian: pass signals on to the rank, wait for it, report an unexplained end (and
    end the host's other ranks), and end as it ended. launcher: the PID of the process that
    started it (Hydra's proxy). Never returns."""
    import ctypes
    _prctl(_PR_SET_NAME, ctypes.c_char_p(GUARDIAN_NAME.encode()))
    for signum in PASSED_ON:
        signal.signal(signum, lambda signum, frame: _pass_on(child, signum))
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    _, status = os.waitpid(child, 0)  # retried after each signal handler (PEP 475)
    for signum in PASSED_ON:  # the rank is gone: nothing to pass on any more
        signal.signal(signum, signal.SIG_IGN)
    os.set_blocking(read_fd, False)
    try:
        expected = os.read(read_fd, 1) == b"x"
    except OSError:
        expected = False
    where = f"PID {child} on {socket.gethostname()}"
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if not expected:
            _report(f"[rank {rank}] was killed by {_signal_name(signum)}; {where}")
            _end_local_peers(launcher)
        _end_by_signal(signum)
    code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1
    if not expected:  # even status 0: a rank that ended mid-run without finishing
        _report(f"[rank {rank}] ended with exit status {code} and no report (os._exit, or exit() in C code); "
                f"{where}")
        _end_local_peers(launcher)
    os._exit(code)


def _end_local_peers(launcher):
    """After its rank's unexplained end the job cannot go on: SIGKILL the other guardians the
    same launcher process started on this host, then their ranks, as the launcher's own clean-up
    would, so that their end never depends on it (twice in CI a job outlived that clean-up).
    Nothing if this guardian's launcher is gone (it would then be another process's child)."""
    if os.getppid() != launcher or launcher <= 1:
        return
    table = {pid: stat for pid, stat in ((pid, proc_stat(pid)) for pid in pids()) if stat}
    me = os.getpid()
    peers = [pid for pid, stat in table.items() if stat.ppid == launcher and pid != me and stat.name == GUARDIAN_NAME]
    for guardian in peers:  # the guardian first: killed first, it cannot report its rank's death
        ranks = [pid for pid, stat in table.items() if stat.ppid == guardian]
        for pid in [guardian] + ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _pass_on(child, signum):
    try:
        os.kill(child, signum)
    except ProcessLookupError:
        pass


def _end_by_signal(signum):
    """End this process by signum, as the rank ended, without a core file."""
    import resource
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    if signum not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # a signal whose default action is not to end the process


def _report(line):
    if sys.stderr is None:  # started with stderr closed: nowhere to say it
        return
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _has_terminal():
    """True if this process has a controlling terminal (Hydra starts ranks in sessions without one)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
        return True
    except OSError:
        return False


def _linux():
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def _prctl(option, value):
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass
