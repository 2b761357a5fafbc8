"""Training across hosts: a cluster of network-namespace hosts on this machine
(launch/netns_cluster.py), jobs started across them by mpiexec over TCP. Needs root and
network namespaces; skipped otherwise (the test session's header says why)."""

import os
import re
import sys
import time

import numpy as np
import pytest

from dpnet.parallel.guardian import GUARDIAN_NAME
from launch.netns_cluster import Cluster, available
from tests.train_helpers import (TINY, cifar_dir, clean_env, finish, mpirun_path,  # noqa: F401 (fixture)
                                 read_checkpoint, run_ok, start)

AVAILABLE, WHY_NOT = available(reason=True)
pytestmark = [pytest.mark.cluster, pytest.mark.skipif(not AVAILABLE, reason=f"cluster tests: {WHY_NOT}")]

CKPT = "checkpoint.h5"
STEPS = 6


def train_args(data, *extra):
    return ["--data", data, *TINY, "--max-steps", str(STEPS), "--dtype", "float64", "--no-augment",
            "--checkpoint", CKPT, "--metrics", "", "--threads", "1", *extra]


def run_across(ranks, args, cwd, rate=None, timeout=180):
    """Train on a fresh cluster with ranks[i] ranks on host i; returns (Run, MiB that crossed the links)."""
    with Cluster(len(ranks), rate=rate) as cluster:
        before = sum(map(sum, cluster.link_bytes()))
        mpiexec = os.path.join(os.path.dirname(mpirun_path()), "mpiexec")
        cmd = cluster.mpiexec(ranks, [sys.executable, "-m", "dpnet.train", *args], mpiexec=mpiexec)
        started = time.monotonic()
        run = finish(start(cmd, cwd, clean_env()), cmd, cwd, started, timeout)
        crossed = (sum(map(sum, cluster.link_bytes())) - before) / 2**20
    assert run.returncode == 0, str(run)
    return run, crossed


def gradients_line(run):
    """The start-up line on how gradients are summed."""
    return next((line for line in run.lines if line.startswith("gradients: ")), "")


def assert_same_params(a, b, exact):
    for name, value in a["params"].items():
        if exact:
            assert np.array_equal(b["params"][name], value), name
        else:
            assert np.abs(b["params"][name] - value).max() <= 1e-12 * np.abs(value).max(), name


@pytest.mark.parametrize("ranks", [(2, 2), (2, 2, 2)], ids=["2x2", "3x2"])
def test_training_across_hosts_equals_one_host(cifar_dir, tmp_path, ranks):
    """Across hosts the gradients are summed in shared memory within each host and by
    Allreduce over TCP across hosts; the start-up line says so, the gradients really cross
    the links, and the parameters equal those of the same layout on one host (nodes
    pretended with DPNET_RANKS_PER_NODE): bit for bit over 2 hosts, to rounding over 3."""
    (tmp_path / "cluster").mkdir()
    (tmp_path / "one").mkdir()
    run, crossed = run_across(list(ranks), train_args(cifar_dir), tmp_path / "cluster")
    hosts, per_host = len(ranks), ranks[0]
    assert (f"; {hosts} nodes x {per_host} ranks: shared memory within each node, Allreduce across nodes"
            in gradients_line(run)), str(run)
    gradient_mib = float(gradients_line(run).split("gradients: ")[1].split(" MiB")[0])
    assert crossed > STEPS * gradient_mib / per_host, (crossed, str(run))  # each slice crosses every step
    one = run_ok(train_args(cifar_dir), tmp_path / "one", sum(ranks),
                 env=clean_env(DPNET_RANKS_PER_NODE=str(per_host)))
    assert gradients_line(run) == gradients_line(one)
    assert_same_params(read_checkpoint(one.path(CKPT)), read_checkpoint(run.path(CKPT)), exact=hosts == 2)


def test_unequal_hosts_fall_back_with_a_reason(cifar_dir, tmp_path):
    """3 + 1 ranks: shared memory cannot serve nodes of unequal size; the job says why and
    sums with one Allreduce, training the model a one-host Allreduce run trains."""
    (tmp_path / "cluster").mkdir()
    (tmp_path / "one").mkdir()
    run, _ = run_across([3, 1], train_args(cifar_dir), tmp_path / "cluster")
    assert gradients_line(run).endswith("; one Allreduce after backward (shared memory unavailable: "
                                 "nodes hold different numbers of ranks (1 to 3))"), str(run)
    one = run_ok(train_args(cifar_dir, "--reduction", "allreduce"), tmp_path / "one", 4)
    assert_same_params(read_checkpoint(one.path(CKPT)), read_checkpoint(run.path(CKPT)), exact=False)


def test_a_link_limited_to_1_gbit_trains_the_same_model(cifar_dir, tmp_path):
    (tmp_path / "fast").mkdir()
    (tmp_path / "slow").mkdir()
    fast, _ = run_across([2, 2], train_args(cifar_dir), tmp_path / "fast")
    slow, crossed = run_across([2, 2], train_args(cifar_dir), tmp_path / "slow", rate="1gbit")
    assert crossed > 0
    assert_same_params(read_checkpoint(fast.path(CKPT)), read_checkpoint(slow.path(CKPT)), exact=True)


def test_the_mpi_suite_passes_across_two_hosts(tmp_path):
    """tests/mpi, the multi-rank consistency suite, on 2 hosts x 2 ranks."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with Cluster(2) as cluster:
        mpiexec = os.path.join(os.path.dirname(mpirun_path()), "mpiexec")
        cmd = cluster.mpiexec([2, 2], [sys.executable, "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider",
                                       os.path.join(repo, "tests", "mpi")], mpiexec=mpiexec)
        started = time.monotonic()
        run = finish(start(cmd, repo, clean_env()), cmd, repo, started, 300)
    assert run.returncode == 0, str(run)
    assert " passed" in run.stdout and " failed" not in run.stdout, str(run)


def test_what_a_killed_run_left_is_removed_by_the_next(tmp_path):
    """kill -9 of the cluster script mid-job leaves namespaces, links and processes behind;
    the next cluster (or --cleanup) removes all of them, and leaves concurrent runs alone."""
    import glob
    import json
    import signal
    import subprocess

    from launch.netns_cluster import STATE_DIR, cleanup_stale

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "netns_cluster.py")
    before = set(glob.glob(os.path.join(STATE_DIR, "*.json")))
    with Cluster(1) as alive:  # a concurrent run, which must survive the cleanup
        victim = subprocess.Popen([sys.executable, script, "--ranks", "1,1", "--", "sleep", "600"],
                                  env=clean_env(), start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            new = set(glob.glob(os.path.join(STATE_DIR, "*.json"))) - before - {alive.state_path}
            states = [json.load(open(path)) for path in new]
            pids = [p for s in states for ns in s["namespaces"]
                    for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]
            if len(pids) >= 2:  # both hosts' sleep (and proxies) are running
                break
            time.sleep(0.2)
        assert states and pids, "the victim's job never started"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        assert cleanup_stale() == [states[0]["id"]]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for link in states[0]["links"]:
            assert f" {link}:" not in links and f" {link}@" not in links, link
        for ns in states[0]["namespaces"]:
            assert ns not in namespaces
        assert not os.path.exists(states[0]["workdir"])
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", pid
        assert alive.namespaces[0] in namespaces  # the concurrent run is untouched



# ---------------------------------------------------------------- faults across hosts

class Job:
    """A training job across a cluster, its output read as it comes."""

    def __init__(self, cluster, ranks, args, cwd):
        import subprocess
        import threading
        mpiexec = os.path.join(os.path.dirname(mpirun_path()), "mpiexec")
        self.cmd = cluster.mpiexec(ranks, [sys.executable, "-m", "dpnet.train", *args], mpiexec=mpiexec)
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=clean_env(), start_new_session=True, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()

    def wait_for(self, text, timeout=60):
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline and self.proc.poll() is None, f"no {text!r} in:\n{self.output}"
            time.sleep(0.1)

    @property
    def output(self):
        return "".join(self.lines)


def ranks_in(namespace):
    """{world rank: pid} of the dpnet ranks running in a host's namespace."""
    import subprocess
    found = {}
    for pid in subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split():
        try:
            with open(f"/proc/{pid}/environ") as fh:
                env = dict(item.split("=", 1) for item in fh.read().split("\0") if "=" in item)
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        if stat.split(") ")[1][0] == "Z" or f"({GUARDIAN_NAME})" in stat:  # a guardian is not the rank
            continue
        if "PMI_RANK" in env:
            found[int(env["PMI_RANK"])] = int(pid)
    return found


def shm_segments():
    """MPICH's segments in /dev/shm that no live process maps (a concurrent job's are mapped)."""
    from dpnet.parallel.shm_leftovers import mapped_segments, segments
    return segments() - mapped_segments()


def test_a_host_that_loses_its_link_ends_the_job(cifar_dir, tmp_path):
    """Host 1 loses its link mid-run: the ranks on host 0 name ranks 2 and 3 as unreachable
    and end the job within the timeout plus a few seconds, non-zero; the cut-off ranks, which
    no abort can reach, end themselves; no shared-memory segment of the job is left."""
    import subprocess

    from dpnet.parallel.watchdog import EXIT_GRACE_SECONDS, PING_SECONDS
    timeout = 4
    before = shm_segments()
    args = train_args(cifar_dir, "--timeout", str(timeout), "--max-steps", "100000", "--epochs", "100000")
    with Cluster(2) as cluster:
        job = Job(cluster, [2, 2], args, str(tmp_path))
        job.wait_for("gradients: ")
        time.sleep(2)  # a few steps in
        cut = time.monotonic()
        subprocess.run(["ip", "link", "set", cluster.veths[1], "down"], check=True)
        try:
            job.proc.wait(timeout=timeout + PING_SECONDS + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job had not ended {time.monotonic() - cut:.0f} s after the cut\n{job.output}")
        ended = time.monotonic() - cut
        assert job.proc.returncode != 0, job.output
        assert "rank(s) [2, 3] do not answer (unreachable" in job.output, job.output
        deadline = time.monotonic() + EXIT_GRACE_SECONDS + timeout + 5
        while (ranks_in(cluster.namespaces[0]) or ranks_in(cluster.namespaces[1])) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not ranks_in(cluster.namespaces[0]) and not ranks_in(cluster.namespaces[1]), "ranks outlived the job"
    assert ended <= timeout + PING_SECONDS + 8, f"the job took {ended:.1f} s to end\n{job.output}"
    assert not shm_segments() - before, "the aborted job left MPICH segments in /dev/shm"


def test_kill_9_of_a_rank_on_another_host_ends_the_job(cifar_dir, tmp_path):
    """kill -9 of rank 2 (on host 1): the job ends within seconds, non-zero, and the launcher's
    report names the killed process (its pid and host); no rank outlives the job."""
    import signal
    args = train_args(cifar_dir, "--timeout", "30", "--max-steps", "100000", "--epochs", "100000")
    with Cluster(2) as cluster:
        job = Job(cluster, [2, 2], args, str(tmp_path))
        job.wait_for("gradients: ")
        time.sleep(2)
        victim = ranks_in(cluster.namespaces[1])[2]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        job.proc.wait(timeout=20)
        ended = time.monotonic() - killed
        assert job.proc.returncode != 0, job.output
        # the rank's guardian names it (Hydra's report, after its cleanup, may name another rank's guardian)
        assert re.search(rf"^\[rank 2\] was killed by SIGKILL; PID {victim} on \S+$", job.output, re.M), job.output
        deadline = time.monotonic() + 10
        while (ranks_in(cluster.namespaces[0]) or ranks_in(cluster.namespaces[1])) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not ranks_in(cluster.namespaces[0]) and not ranks_in(cluster.namespaces[1])
    assert ended < 10, f"the job took {ended:.1f} s to end\n{job.output}"


def test_the_supervisor_names_the_rank_killed_on_another_host(cifar_dir, tmp_path):
    """The same kill -9 under python -m dpnet.launch: its report names rank 2, by the PID that
    Hydra names and the rank map that rank 0 wrote beside the checkpoint."""
    import shlex
    import signal
    args = train_args(cifar_dir, "--timeout", "30", "--max-steps", "100000", "--epochs", "100000")
    with Cluster(2) as cluster:
        mpiexec = os.path.join(os.path.dirname(mpirun_path()), "mpiexec")
        cmd = [sys.executable, "-m", "dpnet.launch", "-n", "4", "--hosts", ",".join(cluster.addresses),
               "--max-restarts", "0", "--launcher-command", shlex.join(cluster.mpiexec_prefix(mpiexec=mpiexec)),
               "--", *args]
        proc = start(cmd, tmp_path, clean_env())
        try:
            deadline = time.monotonic() + 60
            while len(ranks_in(cluster.namespaces[1])) < 2 or not os.path.exists(tmp_path / CKPT):
                assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled"
                time.sleep(0.1)
            victim = ranks_in(cluster.namespaces[1])[2]
            os.kill(victim, signal.SIGKILL)
            run = finish(proc, cmd, tmp_path, time.monotonic(), timeout=30)
        finally:
            proc.kill()
    assert run.returncode != 0, str(run)  # across hosts Hydra's own status: 9 or 255
    assert re.search(rf"dpnet\.launch: attempt 1 failed after [\d.]+ s with exit status {run.returncode}: rank 2 "
                     rf"\(PID {victim} on \S+\) died, killed by SIGKILL", run.stderr), str(run)
    assert "giving up: 0 restart(s) made, --max-restarts 0" in run.stderr, str(run)


def supervised_losing_host_1(args, cwd):
    """python -m dpnet.launch -n 4 on 2 namespace hosts with --min-ranks 2; once the run has a
    step checkpoint at step 20 or later, host 1's link goes down. Returns (the supervisor's Run,
    which must have ended with status 0; the cluster, removed by then)."""
    import shlex
    import subprocess

    from dpnet.checkpoint import newest_checkpoint
    with Cluster(2) as cluster:
        mpiexec = os.path.join(os.path.dirname(mpirun_path()), "mpiexec")
        cmd = [sys.executable, "-m", "dpnet.launch", "-n", "4", "--hosts", ",".join(cluster.addresses),
               "--min-ranks", "2", "--probe-seconds", "5",
               "--launcher-command", shlex.join(cluster.mpiexec_prefix(mpiexec=mpiexec)), "--", *args]
        proc = start(cmd, cwd, clean_env())
        try:
            deadline = time.monotonic() + 60
            while (newest_checkpoint(str(cwd / CKPT)) or (0,))[0] < 20:
                assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled"
                time.sleep(0.05)
            subprocess.run(["ip", "link", "set", cluster.veths[1], "down"], check=True)
            run = finish(proc, cmd, cwd, time.monotonic(), timeout=150)
        finally:
            proc.kill()
    assert run.returncode == 0, str(run)
    return run, cluster


def test_the_supervisor_goes_on_with_fewer_ranks_after_losing_a_host(cifar_dir, tmp_path):
    """python -m dpnet.launch on 2 hosts x 2 ranks with --min-ranks 2: host 1 loses its link; the
    job ends (watchdog), the supervisor finds host 1 gone, restarts from the newest step
    checkpoint on host 0's 2 ranks, and the run completes. Sync batchnorm in float64 without
    augmentation: the result equals an uninterrupted 2-rank run to rounding."""
    steps = 300
    args = train_args(cifar_dir, "--timeout", "4", "--max-steps", str(steps), "--epochs", "100000",
                      "--checkpoint-every", "5")
    (tmp_path / "straight").mkdir()
    (tmp_path / "lost").mkdir()
    straight = run_ok(args, tmp_path / "straight", 2, timeout=180)
    cwd = tmp_path / "lost"
    run, cluster = supervised_losing_host_1(args, cwd)
    notes = [line for line in run.stderr.splitlines() if line.startswith("dpnet.launch: ")]
    assert f"dpnet.launch: host(s) {cluster.addresses[1]} did not answer within 5 s" in notes, str(run)
    assert any(re.fullmatch(rf"dpnet\.launch: restart 1 of 3: from checkpoint(-step\d{{8}})?\.h5 \(step \d+\) on 2 rank\(s\) on "
                            rf"{re.escape(cluster.addresses[0])}", line) for line in notes), str(run)
    assert "rank(s) [2, 3] do not answer (unreachable" in run.stderr, str(run)
    mine, theirs = read_checkpoint(cwd / CKPT), read_checkpoint(straight.path(CKPT))
    assert (mine["attrs"]["step"], mine["attrs"]["world_size"]) == (steps, 2)
    for name, value in theirs["params"].items():  # 4 ranks' sums, then 2's: the same math, other rounding
        assert np.abs(mine["params"][name] - value).max() <= 1e-9 * np.abs(value).max(), name


@pytest.mark.parametrize("model", ["threelayer", "convnet"])
def test_the_reproducible_mode_gives_one_process_bits_across_hosts(cifar_dir, tmp_path, model):
    """--reproducible on 2 hosts x 2 ranks (shared memory within each, TCP across): the checkpoint
    after 20 steps (sync batchnorm, float32, augmentation on) is bit for bit one process's."""
    from tests.test_reproducible_train import args as reproducible_args, assert_identical
    args = reproducible_args(cifar_dir, model, "--reproducible", "--checkpoint", CKPT, "--metrics", "")
    (tmp_path / "cluster").mkdir()
    (tmp_path / "one").mkdir()
    run, _ = run_across([2, 2], args, tmp_path / "cluster")
    assert "reproducible: 2 micro-shard(s) per rank, summed by tree" in gradients_line(run), str(run)
    one = run_ok(args, tmp_path / "one")
    assert_identical(read_checkpoint(run.path(CKPT)), read_checkpoint(one.path(CKPT)), f"{model} on 2x2 hosts")


def test_after_losing_a_host_the_reproducible_run_ends_with_the_same_bits(cifar_dir, tmp_path):
    """The supervisor on 2 hosts x 2 ranks, --reproducible: host 1 loses its link mid-run, the
    job goes on from the newest step checkpoint on host 0's 2 ranks, and the final checkpoint is
    bit for bit that of an uninterrupted one-process run."""
    from tests.test_reproducible_train import args as reproducible_args, assert_identical
    steps = 120
    args = reproducible_args(cifar_dir, "threelayer", "--reproducible", "--timeout", "4", "--max-steps", str(steps),
                             "--checkpoint-every", "5", "--checkpoint", CKPT, "--metrics", "")
    args[args.index("--epochs") + 1] = "100000"
    (tmp_path / "straight").mkdir()
    (tmp_path / "lost").mkdir()
    straight = run_ok(args, tmp_path / "straight", timeout=180)
    cwd = tmp_path / "lost"
    run, cluster = supervised_losing_host_1(args, cwd)
    assert any(line.startswith("dpnet.launch: restart 1 of 3: ") and line.endswith(f"on 2 rank(s) on {cluster.addresses[0]}")
               for line in run.stderr.splitlines()), str(run)
    mine = read_checkpoint(cwd / CKPT)
    assert (mine["attrs"]["step"], mine["attrs"]["world_size"]) == (steps, 2)
    assert_identical(mine, read_checkpoint(straight.path(CKPT)), "after losing a host")
