"""How long each kind of failure takes to end a job, and how long a supervised restart takes.

    python benchmarks/failure_times.py [--repeats 3] [--timeout 10]

Each case runs `mpirun -n 2 python -m dpnet.train` (ThreeLayerConvNet, hidden 16, synthetic data,
global batch 32, a progress line after every step) and makes rank 1 fail once it is under way:
an exception, an exit, a hang in a step or in a checkpoint write (DPNET_FAULT), SIGKILL, SIGSTOP,
and, as root, the loss of a namespace host's link (2 hosts x 1 rank). The moment of the failure
is when rank 0's progress line for the step before it arrives (a step takes about 15 ms here,
so it may be up to a step early);
for SIGKILL, SIGSTOP and the link, when the benchmark acts. It prints the median seconds from
the failure to the end of the whole job (every process gone) and the exit status. The last
case runs under `python -m dpnet.launch --checkpoint-every 20`: SIGKILL of rank 1, and the
seconds until the restarted job trains again (its first progress line), and the steps lost.
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from dpnet.parallel.guardian import GUARDIAN_NAME  # noqa: E402
from dpnet.scaling.measure import mpiexec_path  # noqa: E402

FAULT_STEP = 20
ARGS = ["--hidden-dim", "16", "--batch-size", "32", "--epochs", "100", "--checkpoint-every", "20"]


class Job:
    """A command whose output lines are stamped with their arrival times."""

    def __init__(self, cmd, cwd, env):
        self.lines, self.started = [], time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def wait_for(self, pattern, after=0.0, timeout=120):
        """Arrival time of the first line after `after` that matches `pattern`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for stamp, line in list(self.lines):
                if stamp > after and re.search(pattern, line):
                    return stamp
            if self.proc.poll() is not None and not any(re.search(pattern, l) for s, l in self.lines if s > after):
                break
            time.sleep(0.005)
        raise RuntimeError(f"no line matching {pattern!r}:\n" + "".join(l for _, l in self.lines[-30:]))

    def end(self, timeout=120):
        """(status, monotonic time) once the job and every process of its group are gone."""
        status = self.proc.wait(timeout=timeout)
        while True:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return status, time.monotonic()
            time.sleep(0.01)


def rank_pid(cwd, rank):
    """The PID of the training process of `rank` (not its guardian) running in folder cwd."""
    for entry in os.listdir("/proc"):
        try:
            if not entry.isdigit() or os.readlink(f"/proc/{entry}/cwd") != cwd:
                continue
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
            guardian = open(f"/proc/{entry}/comm").read().strip() == GUARDIAN_NAME
        except OSError:
            continue
        if (f"PMI_RANK={rank}".encode() in environ and not guardian
                and b"dpnet.train" in open(f"/proc/{entry}/cmdline", "rb").read()):
            return int(entry)
    raise RuntimeError(f"rank {rank} not found")


def environment(fault=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "DPNET_"))}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DPNET_PROGRESS_SECONDS="0", PYTHONUNBUFFERED="1")
    if fault:
        env["DPNET_FAULT"] = fault
    return env


def run_case(case, timeout):
    """(seconds from the failure to the end of the job, exit status) of one run of `case`."""
    with tempfile.TemporaryDirectory(prefix="dpnet-failure-") as cwd:
        args = [*ARGS, "--timeout", str(timeout), "--checkpoint", os.path.join(cwd, "ck.h5"),
                "--metrics", os.path.join(cwd, "m.jsonl")]
        fault = {"exception": "raise", "exit": "exit", "hang in a step": "hang",
                 "hang in a checkpoint write": "hang-checkpoint"}.get(case)
        env = environment(f"1:{FAULT_STEP}:{fault}" if fault else None)
        if case == "host loses its link":
            return run_lost_link(args, cwd, env, timeout)
        job = Job([mpiexec_path(), "-n", "2", sys.executable, "-m", "dpnet.train", *args], cwd, env)
        # the line of the step before the failure: rank 1 may fail before rank 0 prints step 20's
        failed = job.wait_for(rf"step {FAULT_STEP - 1}/")
        if case == "SIGKILL":
            os.kill(rank_pid(cwd, 1), signal.SIGKILL)
            failed = time.monotonic()
        elif case == "SIGSTOP (a stopped process)":
            os.kill(rank_pid(cwd, 1), signal.SIGSTOP)
            failed = time.monotonic()
        status, ended = job.end()
        return ended - failed, status


def run_lost_link(args, cwd, env, timeout):
    from launch.netns_cluster import Cluster
    with Cluster(2) as cluster:
        job = Job(cluster.mpiexec([1, 1], [sys.executable, "-m", "dpnet.train", *args], mpiexec=mpiexec_path()),
                  cwd, env)
        job.wait_for(rf"step {FAULT_STEP}/")
        subprocess.run(["ip", "link", "set", cluster.veths[1], "down"], check=True)
        failed = time.monotonic()
        status = job.proc.wait(timeout=120)  # the job; the cut-off rank ends itself later
        return time.monotonic() - failed, status


def run_restart(timeout):
    """Seconds from SIGKILL of rank 1 to the restarted job's first step, and the steps lost."""
    with tempfile.TemporaryDirectory(prefix="dpnet-failure-") as cwd:
        args = [*ARGS, "--timeout", str(timeout), "--checkpoint", os.path.join(cwd, "ck.h5"),
                "--metrics", os.path.join(cwd, "m.jsonl")]
        job = Job([sys.executable, "-m", "dpnet.launch", "-n", "2", "--", *args], cwd, environment())
        job.wait_for(rf"step {FAULT_STEP + 10}/")
        os.kill(rank_pid(cwd, 1), signal.SIGKILL)
        killed = time.monotonic()
        done = max(int(m.group(1)) for _, line in job.lines for m in [re.search(r"step (\d+)/", line)] if m)
        resumed = job.wait_for(r"resumed from .* at step", after=killed)
        back = job.wait_for(r"step \d+/", after=resumed)
        step = int(re.search(r"at step (\d+)", next(l for s, l in job.lines if s == resumed)).group(1))
        os.killpg(job.proc.pid, signal.SIGTERM)
        job.proc.wait(timeout=60)
        return back - killed, done - step


def machine():
    import numpy  # noqa: F401 (loads the BLAS that threadpoolctl reports)
    from threadpoolctl import threadpool_info
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU")
    blas = next((f"{i['internal_api']} {i.get('architecture')} {i['version']}" for i in threadpool_info()
                 if i["user_api"] == "blas"), "unknown BLAS")
    return f"{cpu} | {blas} | {os.cpu_count()} cores"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=10.0, help="the job's --timeout (seconds)")
    args = parser.parse_args()
    cases = ["exception", "exit", "SIGKILL", "hang in a step", "hang in a checkpoint write",
             "SIGSTOP (a stopped process)"]
    if os.geteuid() == 0:
        cases.append("host loses its link")
    print(f"{machine()}; 2 ranks, --timeout {args.timeout:g}; median of {args.repeats}")
    print("| failure of rank 1 | seconds to the end of the job | exit status |\n|---|---:|---|")
    for case in cases:
        runs = [run_case(case, args.timeout) for _ in range(args.repeats)]
        statuses = sorted({s for _, s in runs})
        print(f"| {case} | {statistics.median(t for t, _ in runs):.2f} | {', '.join(map(str, statuses))} |",
              flush=True)
    restarts = [run_restart(args.timeout) for _ in range(args.repeats)]
    print(f"\nunder python -m dpnet.launch, --checkpoint-every 20: SIGKILL of rank 1 at step {FAULT_STEP + 10}+, "
          f"training again after {statistics.median(t for t, _ in restarts):.2f} s (median), "
          f"steps lost {sorted(s for _, s in restarts)}")


if __name__ == "__main__":
    main()
