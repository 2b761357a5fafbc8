"""`python -m dpnet.launch`: run a training job and restart it from its newest checkpoint when it fails.

    python -m dpnet.launch -n 4 --max-restarts 3 -- --data DIR --checkpoint-every 50
    python -m dpnet.launch -n 4 --hosts 10.0.0.1,10.0.0.2 --min-ranks 2 -- --data DIR --checkpoint-every 50

The job is `python -m dpnet.train TRAIN_ARGS` on N ranks, started by mpiexec, or by srun inside
a SLURM allocation. When it fails (a rank crashed or was killed, a host was lost, the watchdog
ended it), the supervisor logs what failed, names the rank where the launcher names a process,
and starts the job again with `--resume` from the newest checkpoint of the run (--checkpoint and
its --checkpoint-every files), up to --max-restarts times. A restart at the same number of ranks
continues bit-identically: the checkpoint holds the parameters, the optimizer state, the
batchnorm statistics and every rank's random generators, and the sampler resumes at its step.

With --hosts, hosts that no longer answer are left out of the restart: the job goes on with the
ranks of the hosts left (--ranks-per-host each), if that is at least --min-ranks (default: N,
never fewer). Fewer ranks need --bn-mode sync (or none), whose math does not depend on how the
batch is split.

Not restarted: a bad option, data set or checkpoint (exit 2), a non-finite loss (exit 4), and a
job stopped by SIGTERM or Ctrl-C; the supervisor passes both signals on to the job.

A rank that ended without a report (its guardian's line) dooms the job. If the launcher has not
ended the job --launcher-grace seconds later (Hydra takes milliseconds), the supervisor ends it
itself: the launcher's process group and the ranks of the rank map that run on its machine.
"""

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from .checkpoint import newest_checkpoint
from .parallel.guardian import set_parent_death_signal
from .parallel.microshards import check_micro_shards
from .proc import pids, proc_stat
from .scaling.measure import mpiexec_path
from .train.cli import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USAGE, parse_args
from .train.config import ConfigError
from .train.loop import output_exists
from .train.ranks import RANK_MAP_ENV, read_rank_map

PREFIX = "dpnet.launch: "
FINAL_STATUSES = {0: "finished", EXIT_USAGE: "a bad option, data set or checkpoint",
                  EXIT_DIVERGED: "the loss became inf or nan", EXIT_INTERRUPTED: "interrupted (Ctrl-C)"}
PROBE_SECONDS = 20.0
LEFTOVER_SECONDS = 10.0  # how long a failed attempt's ranks may take to end before they are killed
LAUNCHER_GRACE_SECONDS = 10.0  # how long the launcher may take to end a job after a rank's unexplained end
RANK_MAP_PREFIX = ".dpnet-launch-ranks-"  # + the supervisor's PID: the rank map beside the checkpoint
# Hydra's report of a process that died: "PID 1402 RUNNING AT node3" ... "EXIT CODE: 9"
HYDRA_DEATH = re.compile(r"PID (\d+) RUNNING AT (\S+)")
HYDRA_CODE = re.compile(r"EXIT CODE: (\d+)")
# A rank's guardian (dpnet.parallel.guardian), on stderr: it names the rank, where Hydra's report,
# which comes after its cleanup, may name another rank's PID
# (not anchored: the line may follow a progress bar's unfinished line, or a launcher's prefix)
GUARDIAN_REPORT = re.compile(r"\[rank (\d+)\] (?:was killed by (\S+)|ended with exit status (\d+) and no report)"
                             r".*?; PID (\d+) on (\S+)$", re.M)


def say(text):
    print(PREFIX + text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ launchers

class MpiexecLauncher:
    """Hydra's mpiexec (`mpiexec -n N [-hosts H1:k,H2:k] python -m dpnet.train ...`).
    prefix: the mpiexec command and any options of its own, as a list."""

    name = "mpiexec"

    def __init__(self, prefix):
        self.prefix = prefix

    def command(self, ranks, hosts, train_argv):
        placement = ["-hosts", ",".join(f"{host}:{ranks // len(hosts)}" for host in hosts)] if hosts else []
        return [*self.prefix, *placement, "-n", str(ranks), sys.executable, "-m", "dpnet.train", *train_argv]

    def reachable(self, host, timeout):
        """True if a one-rank job starts and ends on `host` within `timeout` seconds."""
        probe = subprocess.Popen([*self.prefix, "-hosts", f"{host}:1", "-n", "1", sys.executable, "-c", "pass"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            return probe.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            _kill_group(probe)


class SrunLauncher:
    """SLURM's srun inside an allocation: srun places the ranks; --hosts is SLURM's to decide."""

    name = "srun"

    def __init__(self, prefix):
        self.prefix = prefix

    def command(self, ranks, hosts, train_argv):
        return [*self.prefix, "--ntasks", str(ranks), "--kill-on-bad-exit=1",
                sys.executable, "-m", "dpnet.train", *train_argv]

    def reachable(self, host, timeout):
        return True


def choose_launcher(kind, command, environ=None):
    """The launcher: `kind` auto (srun inside a SLURM allocation where srun exists, else
    mpiexec), mpiexec or srun; `command` overrides its command line (a string, split as a shell would)."""
    environ = os.environ if environ is None else environ
    if kind == "auto":
        kind = "srun" if environ.get("SLURM_JOB_ID") and shutil.which("srun", path=environ.get("PATH")) else "mpiexec"
    if command:
        prefix = shlex.split(command)
    elif kind == "srun":
        prefix = ["srun"]
    else:
        prefix = [mpiexec_path()]
    return SrunLauncher(prefix) if kind == "srun" else MpiexecLauncher(prefix)


# ------------------------------------------------------------------ the command lines of the attempts

def restart_argv(train_argv, resume):
    """train_argv for a restart from checkpoint `resume`: the run's own options, then
    --no-reset-optimizer (the run's optimizer state is what continues; a --reset-optimizer,
    however given, applied to the first start only) and --resume. Later flags win over earlier
    ones and over a --config file, whatever their spelling."""
    return list(train_argv) + ["--no-reset-optimizer", "--resume", resume]


def death_report(output, rank_map):
    """(what the job's output says about a rank that died, whether a rank crashed, the job's
    status as that rank's end gives it): a rank's guardian's report (an end it did not explain:
    a signal, Hydra's status k for signal k, or an exit, its own status), else the launcher's
    report of a death by signal, with its rank where the rank map knows the PID (status None:
    the launcher's); (None, False, None) where neither said anything."""
    guardian = GUARDIAN_REPORT.search(output)
    if guardian:
        rank, signame, code, pid, host = guardian.groups()
        where = f"rank {rank} (PID {pid} on {host})"
        if signame:
            number = getattr(signal, signame, None)
            return f"{where} died, killed by {signame}", True, int(number) if number else None
        return f"{where} ended with exit status {code} and no report", True, int(code)
    return _hydra_report(output, rank_map)


def _hydra_report(output, rank_map):
    death = HYDRA_DEATH.search(output)
    if not death:
        return None, False, None
    pid, host = int(death.group(1)), death.group(2)
    code = HYDRA_CODE.search(output, death.end())
    ranks = [entry["rank"] for entry in rank_map if pid in (entry["pid"], entry.get("guardian"))]
    who = f"rank {ranks[0]}" if len(ranks) == 1 else f"one of ranks {ranks}" if ranks else "a rank"
    how = ""
    if code:
        status = int(code.group(1))
        how = f", exit code {status}"
        if 0 < status < 64:
            try:
                how = f", killed by {signal.Signals(status).name}"
            except ValueError:
                pass
    return f"{who} (PID {pid} on {host}) died{how}", True, None


# ------------------------------------------------------------------ the supervisor

class Supervisor:
    """Runs the attempts. ranks: N at the start; hosts: list or None; min_ranks: the fewest
    ranks a restart may go on with."""

    def __init__(self, launcher, ranks, train_argv, config, hosts=None, max_restarts=3, min_ranks=None,
                 probe_seconds=PROBE_SECONDS, launcher_grace=LAUNCHER_GRACE_SECONDS):
        self.launcher, self.ranks, self.train_argv, self.config = launcher, ranks, train_argv, config
        self.hosts = list(hosts) if hosts else None
        self.max_restarts, self.min_ranks = max_restarts, min_ranks or ranks
        self.probe_seconds, self.launcher_grace = probe_seconds, launcher_grace
        self.stop = None  # the signal the user sent: no restart after it
        self.signals, self.forwarded = [], 0  # the signals received, and how many reached the job
        self.job = None
        self.started = time.time()  # checkpoints written since are this run's
        # restarting from scratch may replace only this run's own files
        self.fresh_may_overwrite = config.overwrite or not any(
            path and output_exists(option, path) for option, path in (("checkpoint", config.checkpoint),
                                                                      ("metrics", config.metrics)))

    def run(self):
        """Attempts until one ends in a final status or the restarts are spent; returns the exit status."""
        argv, restarts = list(self.train_argv), 0
        while True:
            status, seconds, report, crashed = self.attempt(argv, restarts)
            # a rank killed by signal k makes Hydra exit k, and a rank may exit on its own with any
            # status: either may look like a final status
            if (status in FINAL_STATUSES and not crashed) or self.stop:
                if restarts and status == 0:
                    say(f"finished after {restarts} restart(s)")
                return status
            say(f"attempt {restarts + 1} failed after {seconds:.1f} s with exit status {status}"
                + (f": {report}" if report else ""))
            if restarts >= self.max_restarts:
                say(f"giving up: {restarts} restart(s) made, --max-restarts {self.max_restarts}")
                return status
            if not self.keep_reachable_hosts():
                return status
            restarts += 1
            argv, start = self.next_argv()
            if argv is None or self.stop:
                return status
            say(f"restart {restarts} of {self.max_restarts}: {start} on {self.ranks} rank(s)"
                + (f" on {', '.join(self.hosts)}" if self.hosts else ""))

    def attempt(self, argv, restarts):
        """Run the job once; returns (exit status, seconds, which rank died and how or None, whether
        a rank died by a signal)."""
        with self.rank_map_path() as rank_map:
            env = {**os.environ, RANK_MAP_ENV: rank_map}
            cmd = self.launcher.command(self.ranks, self.hosts, argv)
            if restarts == 0:
                say(f"{self.ranks} rank(s) by {self.launcher.name}, up to {self.max_restarts} restart(s)"
                    + ("" if self.config.checkpoint_every or not self.max_restarts else
                       "; without --checkpoint-every a restart goes back to the last epoch's end"))
            started = time.monotonic()
            self.forwarded = len(self.signals)  # a signal before this attempt was for the last one
            self.job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        start_new_session=True, preexec_fn=_end_with_parent)
            self.forward_pending()
            tail, doomed = [], []  # doomed: when a guardian first reported its rank's unexplained end
            forwards = [threading.Thread(target=_forward, args=(stream, out, tail, lambda line: _note_doom(line, doomed)),
                                         daemon=True)
                        for stream, out in ((self.job.stdout, sys.stdout), (self.job.stderr, sys.stderr))]
            for forward in forwards:
                forward.start()
            status = self.wait_for_job(doomed, rank_map)
            for forward in forwards:
                forward.join(timeout=5)
            _kill_group(self.job)  # what the launcher left of its own group
            ranks = read_rank_map(rank_map)
            report, crashed, rank_status = death_report("".join(tail), ranks)
            _end_leftover_ranks(ranks, rank_map)  # Hydra starts its ranks in sessions of their own
        status = _exit_status(status)
        if crashed:  # Hydra's own status may be that of another rank it killed while cleaning up
            status = rank_status or status or 1
        return status, time.monotonic() - started, report, crashed

    def wait_for_job(self, doomed, rank_map):
        """The launcher's exit status. Once a rank's guardian has reported an end the rank did not
        explain, the job cannot go on, and the launcher (Hydra: within milliseconds) ends the
        others; if it has not ended the job launcher_grace seconds later, the supervisor ends it:
        the launcher's process group, and the ranks and guardians the rank map names on this
        machine (a rank that outlived the launcher's clean-up must not hold the restart up until
        its --timeout)."""
        while True:
            try:
                return self.job.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                pass
            if doomed and time.monotonic() - doomed[0] > self.launcher_grace:
                ranks = read_rank_map(rank_map)
                alive = [f"rank {e['rank']} (PID {e['pid']})" for e in _on_this_host(ranks) if _rank_alive(e["pid"])]
                say(f"the launcher had not ended the job {self.launcher_grace:g} s after a rank's unexplained "
                    f"end; ending it" + (f" and {', '.join(alive)}, still running" if alive else ""))
                _kill_group(self.job)
                _end_leftover_ranks(ranks, rank_map, grace=0)
                return self.job.wait()

    @contextlib.contextmanager
    def rank_map_path(self):
        """Where rank 0 writes the rank map for one attempt: beside the checkpoint, which rank 0
        writes anyway and the supervisor reads (a shared file system on a cluster), else in a
        temporary folder here. Removed after the attempt."""
        if self.config.checkpoint:
            folder = os.path.dirname(os.path.abspath(self.config.checkpoint))
            os.makedirs(folder, exist_ok=True)
            _remove_stale_rank_maps(folder)
            path = os.path.join(folder, f"{RANK_MAP_PREFIX}{os.getpid()}.json")
            try:
                yield path
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        else:
            with tempfile.TemporaryDirectory(prefix="dpnet-launch-") as scratch:
                yield os.path.join(scratch, "ranks.json")

    def keep_reachable_hosts(self):
        """With --hosts: leave out the hosts that no longer answer; False if too few ranks are left."""
        if not self.hosts:
            return True
        alive = [h for h in self.hosts if self.launcher.reachable(h, self.probe_seconds)]
        lost = [h for h in self.hosts if h not in alive]
        if not lost:
            return True
        per_host = self.ranks // len(self.hosts)
        ranks = per_host * len(alive)
        say(f"host(s) {', '.join(lost)} did not answer within {self.probe_seconds:.0f} s")
        if ranks < self.min_ranks or not alive:
            say(f"giving up: the {len(alive)} host(s) left hold {ranks} rank(s), fewer than --min-ranks "
                f"{self.min_ranks}")
            return False
        newest = self.newest_own_checkpoint()
        source = newest[1] if newest else self.config.resume
        problem = fewer_ranks_problem(self.config, _stored_settings(source) if source else {}, ranks)
        if problem:
            say(f"giving up: {problem}")
            return False
        self.hosts, self.ranks = alive, ranks
        return True

    def next_argv(self):
        """(argv, where it starts) of the next attempt: --resume from the newest checkpoint, or a
        fresh start; (None, None) where neither may be."""
        newest = self.newest_own_checkpoint()
        if newest:
            return restart_argv(self.train_argv, newest[1]), f"from {newest[1]} (step {newest[0]})"
        if self.config.resume:  # nothing newer written yet: where the first attempt started
            return list(self.train_argv), f"from {self.config.resume} again"
        if self.fresh_may_overwrite:  # what the failed attempt wrote is this run's own
            return [a for a in self.train_argv if a != "--no-overwrite"] + ["--overwrite"], \
                "from the start (no checkpoint written yet)"
        say("giving up: no checkpoint of this run to restart from, and --checkpoint/--metrics "
            "hold an earlier run's files (pass --overwrite to start afresh)")
        return None, None

    def newest_own_checkpoint(self):
        """(step, file) of the newest checkpoint this run's attempts wrote (not an earlier run's
        at the same path), or None."""
        if not self.config.checkpoint:
            return None
        return newest_checkpoint(self.config.checkpoint, since=self.started)

    def forward_signal(self, signum, frame):
        """SIGTERM or Ctrl-C: pass it on to the job (which saves and stops) and restart no more."""
        self.stop = self.stop or signal.Signals(signum).name
        self.signals.append(signum)
        self.forward_pending()

    def forward_pending(self):
        """Send the job the signals it has not had yet (one that came while it was being started
        is sent once it exists)."""
        if self.job is None or self.job.poll() is not None:
            return
        while self.forwarded < len(self.signals):
            self.forwarded += 1
            self.job.send_signal(self.signals[self.forwarded - 1])


def _forward(stream, ours, tail, on_line=None, keep=400):
    """Copy one of the job's output streams to ours (stdout or stderr) as it comes (a progress
    bar's carriage returns too), keeping the last `keep` lines of both in `tail` and showing each
    whole line to on_line. If ours is gone or fails (closed, a closed pipe, a terminal hung up),
    go on reading, so the job never blocks on a full pipe."""
    out, partial = getattr(ours, "buffer", None), ""
    for chunk in iter(lambda: _read_some(stream), b""):
        if out is not None:
            try:
                out.write(chunk)
                out.flush()
            except (OSError, ValueError):
                out = None
        lines = (partial + chunk.decode(errors="replace")).split("\n")
        partial = lines.pop()
        tail.extend(line + "\n" for line in lines)
        del tail[:-keep]
        for line in lines if on_line else ():
            on_line(line)
    if partial:
        tail.append(partial)


def _read_some(stream):
    """Up to 64 KiB of what the stream has; b"" at its end, or when it cannot be read any more."""
    try:
        return os.read(stream.fileno(), 65536)
    except OSError:
        return b""


def _note_doom(line, doomed):
    """Record the time of the first guardian's report of a rank's unexplained end."""
    if not doomed and GUARDIAN_REPORT.search(line):
        doomed.append(time.monotonic())


def _remove_stale_rank_maps(folder):
    """Remove the rank maps that supervisors no longer running (killed) left in folder."""
    for name in os.listdir(folder):
        if not (name.startswith(RANK_MAP_PREFIX) and name.endswith(".json")):
            continue
        owner = name[len(RANK_MAP_PREFIX):-len(".json")]
        if owner.isdigit() and not _process_running(int(owner)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def _proc_state(pid):
    """The state letter of process pid in /proc (R, S, Z, ...), or None if it cannot be read."""
    stat = proc_stat(pid)
    return stat.state if stat else None


def _process_running(pid):
    """True if process pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: running
        return True
    return _proc_state(pid) != "Z"


def _rank_alive(pid):
    """True while process pid runs dpnet.train (not ended, not a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"dpnet.train" not in fh.read():
                return False
    except OSError:
        return False
    return _proc_state(pid) not in (None, "Z")


def _started_with(name, value):
    """PIDs of this machine's processes (not this one) whose environment holds name=value
    (Linux /proc; [] elsewhere, or where an environment cannot be read)."""
    wanted, found = f"{name}={value}".encode(), []
    for pid in pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if wanted in fh.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            continue
    return found


def _on_this_host(ranks):
    """The rank map's entries for ranks on this machine (a PID means nothing on another)."""
    here = socket.gethostname()
    return [entry for entry in ranks if entry.get("host", here) == here]


def _end_leftover_ranks(ranks, rank_map, grace=LEFTOVER_SECONDS):
    """Wait up to `grace` seconds for the processes of a finished attempt that run on this
    machine to end, then SIGKILL them: a restart must not overlap them (after kill -9 of
    mpiexec, its proxies and ranks go on in their own sessions for a while). They are the ranks
    and guardians of the rank map, and, for a job that died before rank 0 wrote the map, the
    processes started with this attempt's rank map path in their environment."""
    deadline = time.monotonic() + grace
    mapped = [pid for entry in _on_this_host(ranks)
              for pid in (entry.get("guardian"), entry["pid"]) if pid]  # a guardian first: it would report its rank

    def still_running():
        alive = [pid for pid in mapped if _rank_alive(pid)]
        return alive + [pid for pid in _started_with(RANK_MAP_ENV, rank_map)
                        if pid not in alive and _process_running(pid)]
    left = still_running()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = still_running()
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _exit_status(returncode):
    return 128 - returncode if returncode < 0 else returncode  # killed by signal k: 128 + k, as a shell says


def _stored_settings(path):
    """The TrainConfig (a dict) a checkpoint was written with; {} where it cannot be read."""
    from .train.resume import stored_config
    try:
        return stored_config(path)
    except Exception:
        return {}


def fewer_ranks_problem(config, stored, ranks):
    """Why the run cannot go on at `ranks` ranks (None: it can): its settings are the stored ones
    of its checkpoint where there is one, else config's. Sync batchnorm (or none) computes the same
    model at any number of ranks; the reproducible mode computes the same bits at any number that
    divides its micro-shards, whatever the batchnorm."""
    setting = {key: stored.get(key, getattr(config, key)) for key in ("bn_mode", "reproducible", "micro_shards")}
    if setting["reproducible"]:
        try:
            check_micro_shards(setting["micro_shards"], ranks)
        except ValueError as exc:
            return f"--reproducible: {exc}"
        return None
    if setting["bn_mode"] == "local":
        return ("fewer ranks change what --bn-mode local computes (statistics per rank's shard); use --bn-mode "
                "sync, or --reproducible, to go on with fewer ranks")
    return None


def _end_with_parent():
    """In the job's launcher process, before exec: SIGTERM it if the supervisor dies (Linux), so
    no job outlives a supervisor that was killed."""
    set_parent_death_signal(signal.SIGTERM)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------ the command line

def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m dpnet.launch", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s -n N [options] -- TRAIN_ARGS")
    parser.add_argument("-n", "--ranks", type=int, required=True, help="ranks to start")
    parser.add_argument("--max-restarts", type=int, default=3, help="restarts after failures (default: 3)")
    parser.add_argument("--hosts", help="comma-separated hosts (IP addresses or names), --ranks spread evenly "
                                        "over them (mpiexec only)")
    parser.add_argument("--min-ranks", type=int, help="with --hosts: go on with as few as this many ranks when "
                                                      "hosts are lost (default: --ranks, never fewer)")
    parser.add_argument("--launcher", choices=("auto", "mpiexec", "srun"), default="auto",
                        help="auto: srun inside a SLURM allocation, else mpiexec")
    parser.add_argument("--launcher-command", help="the launcher's command with options of its own, "
                                                   "e.g. 'mpiexec -launcher ssh' (default: mpiexec beside python)")
    parser.add_argument("--probe-seconds", type=float, default=PROBE_SECONDS,
                        help=f"with --hosts: how long a host may take to run a one-rank job before it counts as "
                             f"lost (default: {PROBE_SECONDS:.0f})")
    parser.add_argument("--launcher-grace", type=float, default=LAUNCHER_GRACE_SECONDS,
                        help=f"how long the launcher may take to end the job after a rank ended without a report "
                             f"before the supervisor ends it (default: {LAUNCHER_GRACE_SECONDS:.0f})")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="options of python -m dpnet.train, after --")
    args = parser.parse_args(argv)
    args.train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    hosts = [h for h in (args.hosts or "").split(",") if h]
    if args.ranks < 1:
        parser.error(f"-n must be at least 1, got {args.ranks}")
    if args.max_restarts < 0:
        parser.error(f"--max-restarts must not be negative, got {args.max_restarts}")
    if hosts and args.ranks % len(hosts):
        parser.error(f"-n {args.ranks} does not spread evenly over {len(hosts)} host(s)")
    if args.min_ranks is not None and not 1 <= args.min_ranks <= args.ranks:
        parser.error(f"--min-ranks must be between 1 and -n {args.ranks}, got {args.min_ranks}")
    if args.min_ranks is not None and not hosts:
        parser.error("--min-ranks applies with --hosts: the hosts that stop answering are left out")
    if args.probe_seconds <= 0:
        parser.error(f"--probe-seconds must be positive, got {args.probe_seconds}")
    if not args.launcher_grace > 0:
        parser.error(f"--launcher-grace must be positive, got {args.launcher_grace}")
    args.hosts = hosts
    return args


def main(argv=None):
    for signum in (signal.SIGINT, signal.SIGTERM):  # before any job: end quietly
        signal.signal(signum, lambda number, frame: sys.exit(128 + number))
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_args(args.train_args)
    except ConfigError as exc:
        print(f"python -m dpnet.launch: error: dpnet.train options: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if config.simulate_ranks:
        print("python -m dpnet.launch: error: --simulate-ranks runs one process; the launcher starts real ranks",
              file=sys.stderr)
        return EXIT_USAGE
    if args.max_restarts and not config.checkpoint:
        print("python -m dpnet.launch: error: restarts continue from checkpoints, and --checkpoint is '' "
              "(give a path, or --max-restarts 0)", file=sys.stderr)
        return EXIT_USAGE
    stored = _stored_settings(config.resume) if config.resume and os.path.isfile(config.resume) else {}
    problem = fewer_ranks_problem(config, stored, args.min_ranks) if args.min_ranks and args.min_ranks < args.ranks \
        else None
    if problem:
        print(f"python -m dpnet.launch: error: --min-ranks {args.min_ranks}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    launcher = choose_launcher(args.launcher, args.launcher_command)
    if args.hosts and launcher.name == "srun":
        print("python -m dpnet.launch: error: --hosts is for mpiexec; under srun, SLURM places the ranks",
              file=sys.stderr)
        return EXIT_USAGE
    supervisor = Supervisor(launcher, args.ranks, args.train_args, config, hosts=args.hosts,
                            max_restarts=args.max_restarts, min_ranks=args.min_ranks,
                            probe_seconds=args.probe_seconds, launcher_grace=args.launcher_grace)
    signal.signal(signal.SIGTERM, supervisor.forward_signal)
    signal.signal(signal.SIGINT, supervisor.forward_signal)
    try:
        return supervisor.run()
    except OSError as exc:  # the launcher cannot be started, the checkpoint folder cannot be made
        print(f"python -m dpnet.launch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
