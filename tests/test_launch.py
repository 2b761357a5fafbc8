"""`python -m dpnet.launch`, the supervisor that restarts failed jobs from their newest checkpoint.

The end-to-end tests run real jobs under mpiexec on the tiny CIFAR-10 folder: ranks killed
with SIGKILL several times, and the final checkpoint compared bit for bit with an
uninterrupted run's; failures that must not be restarted; the restart budget; srun inside
SLURM; signals passed on; no job outliving a killed supervisor.
"""

import os
import random
import re
import shlex
import shutil
import signal
import sys
import time

import pytest

from dpnet.checkpoint import newest_checkpoint, step_checkpoint_path
from dpnet.launch import choose_launcher, death_report, restart_argv
from tests.train_helpers import (TINY, assert_same_state, cifar_dir, clean_env, describe_processes,  # noqa: F401
                                 finish, job_processes, kill_group, read_checkpoint, read_metrics, run_ok, start)

CKPT = os.path.join("dpnet_run", "checkpoint.h5")
METRICS = os.path.join("dpnet_run", "metrics.jsonl")
EPOCHS, STEPS_PER_EPOCH, EVERY = 40, 5, 10  # 200 steps, a step checkpoint every 10
PREFIX = "dpnet.launch: "


def train_args(data, *extra):
    return ["--data", data, *TINY, "--epochs", str(EPOCHS), "--checkpoint-every", str(EVERY), *extra]


def launch_command(args, *options):
    return [sys.executable, "-m", "dpnet.launch", *options, "--", *args]


def supervised(args, cwd, *options, env=None, timeout=180):
    cmd = launch_command(args, *options)
    return finish(start(cmd, cwd, env), cmd, cwd, time.monotonic(), timeout)


def notes(run):
    """The supervisor's own lines."""
    return [line[len(PREFIX):] for line in run.stderr.splitlines() if line.startswith(PREFIX)]


# ------------------------------------------------------------------ pieces

def test_restart_argv_resumes_from_the_newest_checkpoint(tmp_path):
    """The restart's own flags come last, so they win over any earlier spelling (an abbreviation,
    --resume=..., a --config file)."""
    from dpnet.train import parse_args
    toml = tmp_path / "run.toml"
    toml.write_text('resume = "pretrained.h5"\nreset_optimizer = true\n')
    for argv in (["--data", "d", "--resume", "old.h5", "--reset-optim", "--lr", "0.1"],
                 ["--data", "d", "--resume=older.h5", "--reset-optimizer", "--lr", "0.1"],
                 ["--config", str(toml), "--data", "d", "--lr", "0.1"]):
        config = parse_args(restart_argv(argv, "new.h5"))
        assert (config.resume, config.reset_optimizer, config.lr, config.data) == ("new.h5", False, 0.1, "d"), argv


def test_newest_checkpoint_is_the_one_with_most_steps(tmp_path):
    import h5py
    path = str(tmp_path / "checkpoint.h5")
    assert newest_checkpoint(path) is None
    for step, name in ((10, path), (30, step_checkpoint_path(path, 30)), (20, step_checkpoint_path(path, 20))):
        with h5py.File(name, "w") as f:
            f.attrs["step"] = step
    assert newest_checkpoint(path) == (30, step_checkpoint_path(path, 30))
    with open(step_checkpoint_path(path, 40), "wb") as fh:  # not a checkpoint: skipped
        fh.write(b"garbage")
    assert newest_checkpoint(path) == (30, step_checkpoint_path(path, 30))
    os.utime(step_checkpoint_path(path, 30), (1e9, 1e9))  # written long ago: not this run's
    assert newest_checkpoint(path, since=time.time() - 3600) == (20, step_checkpoint_path(path, 20))


HYDRA_REPORT = """
===================================================================================
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   PID 1402 RUNNING AT 198.18.7.11
=   EXIT CODE: 9
=   CLEANING UP REMAINING PROCESSES
"""


def test_death_report_names_the_rank_of_the_pid():
    ranks = [{"rank": 0, "host": "a", "pid": 1401}, {"rank": 1, "host": "a", "pid": 1402}]
    assert death_report(HYDRA_REPORT, ranks) == ("rank 1 (PID 1402 on 198.18.7.11) died, killed by SIGKILL", True,
                                                 None)
    assert death_report(HYDRA_REPORT, []) == ("a rank (PID 1402 on 198.18.7.11) died, killed by SIGKILL", True, None)
    assert death_report("no report here", ranks) == (None, False, None)
    guarded = [{"rank": 0, "host": "a", "pid": 7, "guardian": 1401},
               {"rank": 1, "host": "a", "pid": 8, "guardian": 1402}]
    assert death_report(HYDRA_REPORT, guarded)[0] == "rank 1 (PID 1402 on 198.18.7.11) died, killed by SIGKILL"


def test_a_guardians_report_wins_over_hydras():
    """Hydra's report comes after its cleanup and may name another rank's guardian; the line of
    the guardian whose rank died names the rank itself."""
    killed = "[rank 2] was killed by SIGSEGV; PID 5150 on node7\n" + HYDRA_REPORT
    assert death_report(killed, []) == ("rank 2 (PID 5150 on node7) died, killed by SIGSEGV", True, 11)
    exited = ("[rank 1] ended with exit status 2 and no report (os._exit, or exit() in C code); PID 5151 on node7\n"
              "epoch 1/2: loss 2.1\n")  # 2 is a bad option's status, but nothing reported one: a crash
    assert death_report(exited, []) == ("rank 1 (PID 5151 on node7) ended with exit status 2 and no report", True, 2)
    # after a progress bar's unfinished line, or behind mpiexec -l's prefix
    glued = "\repoch 1/2:  40%|####  | 2/5 [00:01, loss=2.185][rank 1] was killed by SIGKILL; PID 5152 on node7\n"
    assert death_report(glued, [])[0] == "rank 1 (PID 5152 on node7) died, killed by SIGKILL"
    assert death_report("[1] [rank 1] was killed by SIGKILL; PID 5153 on n7\n", [])[0].startswith("rank 1 (PID 5153")


def test_srun_is_the_launcher_inside_slurm(tmp_path):
    fake = tmp_path / "srun"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    inside = {"SLURM_JOB_ID": "7", "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    assert choose_launcher("auto", None, inside).name == "srun"
    assert choose_launcher("auto", None, {"PATH": inside["PATH"]}).name == "mpiexec"  # no allocation
    assert choose_launcher("auto", None, {"SLURM_JOB_ID": "7", "PATH": "/nonexistent"}).name == "mpiexec"
    command = choose_launcher("srun", None).command(4, None, ["--lr", "0.1"])
    assert command[:4] == ["srun", "--ntasks", "4", "--kill-on-bad-exit=1"]
    assert command[-4:] == ["-m", "dpnet.train", "--lr", "0.1"]
    mpiexec = choose_launcher("mpiexec", "mpiexec -launcher ssh").command(4, ["h1", "h2"], [])
    assert mpiexec[:7] == ["mpiexec", "-launcher", "ssh", "-hosts", "h1:2,h2:2", "-n", "4"]


# ------------------------------------------------------------------ restarts, end to end

def job_ranks(cwd):
    """{rank: pid} of the dpnet.train ranks (not their guardians) running in folder cwd."""
    return job_processes(cwd)[0]


def newest_step(cwd):
    newest = newest_checkpoint(str(cwd / CKPT))
    return newest[0] if newest else -1


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the ranks to kill through /proc (Linux)")
def test_killed_ranks_are_restarted_and_the_run_ends_bit_identical(cifar_dir, tmp_path):
    """SIGKILL to a random rank, three times at random moments of a 2-rank run with augmentation:
    the supervisor names each killed rank, restarts from the newest step checkpoint, and the final
    checkpoint equals an uninterrupted run's bit for bit."""
    args = train_args(cifar_dir)
    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    straight = run_ok(args, tmp_path / "straight", 2, timeout=180)
    cwd = tmp_path / "killed"
    cmd = launch_command(args, "-n", "2", "--max-restarts", "5")
    proc = start(cmd, cwd)
    chooser, killed, last = random.Random(20261201), [], -1
    try:
        for _ in range(3):
            deadline = time.monotonic() + 90
            while newest_step(cwd) <= last:  # progress since the last kill (or the start)
                assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled"
                time.sleep(0.01)
            time.sleep(chooser.uniform(0, 0.3))
            ranks = job_ranks(cwd)
            assert len(ranks) == 2, ranks
            rank = chooser.choice(sorted(ranks))
            os.kill(ranks[rank], signal.SIGKILL)
            killed.append(rank)
            last = newest_step(cwd)
            while job_ranks(cwd).get(rank) == ranks[rank]:  # until this attempt is gone
                assert time.monotonic() < deadline, "the killed job did not end"
                time.sleep(0.01)
        run = finish(proc, cmd, cwd, time.monotonic(), timeout=180)
    finally:
        kill_group(proc)
    assert run.returncode == 0, str(run)
    failures = [line for line in notes(run) if re.match(r"attempt \d+ failed", line)]
    assert len(failures) == 3, str(run)
    for line, rank in zip(failures, killed):
        assert re.search(rf"with exit status 9: rank {rank} \(PID \d+ on \S+\) died, killed by SIGKILL$", line), line
    restarts = [line for line in notes(run) if line.startswith("restart ")]
    assert len(restarts) == 3 and all(re.search(r"from dpnet_run/checkpoint(-step\d{8})?\.h5 \(step \d+\) on 2 rank", line)
                                      for line in restarts), str(run)
    assert notes(run)[-1] == "finished after 3 restart(s)", str(run)
    kept = sorted(os.listdir(cwd / "dpnet_run"))  # the run's files, nothing of the supervisor's
    assert kept == ["checkpoint-step00000180.h5", "checkpoint-step00000190.h5", "checkpoint-step00000200.h5",
                    "checkpoint.h5", "metrics.jsonl"], kept
    mine, theirs = read_checkpoint(cwd / CKPT), read_checkpoint(straight.path(CKPT))
    assert mine["attrs"]["step"] == EPOCHS * STEPS_PER_EPOCH
    assert_same_state(mine, theirs, "after 3 restarts")
    assert mine["attrs"]["rng_states"] == theirs["attrs"]["rng_states"]
    assert read_metrics(cwd / METRICS)[-1]["test_acc"] == read_metrics(straight.path(METRICS))[-1]["test_acc"]


def test_a_repeating_failure_uses_up_the_restarts(cifar_dir, tmp_path):
    """Rank 1 exits at step 7 whenever it gets there: each restart resumes at step 5 and fails
    again; after --max-restarts 2 the supervisor gives up with the job's status."""
    args = ["--data", cifar_dir, *TINY, "--epochs", "2", "--checkpoint-every", "5"]
    run = supervised(args, tmp_path, "-n", "2", "--max-restarts", "2", env=clean_env(DPNET_FAULT="1:7:exit"))
    assert run.returncode == 3, str(run)
    lines = notes(run)
    failures = [line for line in lines if " failed after " in line]
    assert [line.split(" failed")[0] for line in failures] == ["attempt 1", "attempt 2", "attempt 3"], str(run)
    # Hydra says nothing of a rank that exits on its own; its guardian does
    assert all(re.search(r"with exit status 3: rank 1 \(PID \d+ on \S+\) ended with exit status 3 and no report$", line)
               for line in failures), str(run)
    assert [line.split(":")[0] for line in lines if line.startswith("restart ")] == \
        ["restart 1 of 2", "restart 2 of 2"], str(run)
    assert all(line.endswith("(step 5) on 2 rank(s)") for line in lines if line.startswith("restart ")), str(run)
    assert lines[-1] == "giving up: 2 restart(s) made, --max-restarts 2", str(run)


@pytest.mark.parametrize("case", ["bad-option", "nan-loss"])
def test_final_failures_are_not_restarted(cifar_dir, tmp_path, case):
    args = ["--data", cifar_dir, *TINY, "--epochs", "2"]
    env = None
    if case == "bad-option":
        args += ["--batch-size", "0"]
        expected = 2
    else:
        env = clean_env(DPNET_FAULT="1:3:nan")
        expected = 4
    run = supervised(args, tmp_path, "-n", "2", env=env, timeout=60)
    assert run.returncode == expected, str(run)
    assert not [line for line in notes(run) if "failed" in line or "restart" in line.split(",")[0]], str(run)
    assert len([line for line in run.stderr.splitlines() if "error:" in line]) == 1, str(run)


def test_srun_inside_a_slurm_allocation(cifar_dir, tmp_path):
    """Inside an allocation the job is started by srun (here a stand-in that records its options
    and runs the ranks with mpiexec), with srun's options for killing the job when a task fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = mpiexec if os.path.exists(mpiexec) else "mpiexec"
    (bin_dir / "srun").write_text(f"""#!/bin/sh
echo "$@" > {tmp_path}/srun-options
[ "$1" = "--ntasks" ] || exit 99
n=$2; shift 3
exec {mpiexec} -n "$n" "$@"
""")
    (bin_dir / "srun").chmod(0o755)
    (tmp_path / "work").mkdir()
    env = clean_env(SLURM_JOB_ID="4242", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = supervised(["--data", cifar_dir, *TINY, "--epochs", "1"], tmp_path / "work", "-n", "2", env=env)
    assert run.returncode == 0, str(run)
    assert (tmp_path / "srun-options").read_text().split()[:3] == ["--ntasks", "2", "--kill-on-bad-exit=1"]
    assert "2 rank(s) by srun" in run.stderr, str(run)
    assert read_checkpoint(tmp_path / "work" / CKPT)["attrs"]["world_size"] == 2


def wait_for_training(cwd, proc, steps=EVERY):
    deadline = time.monotonic() + 60
    while newest_step(cwd) < steps:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled"
        time.sleep(0.02)


def test_sigterm_is_passed_on_and_not_restarted(cifar_dir, tmp_path):
    args = train_args(cifar_dir)
    cmd = launch_command(args, "-n", "2")
    proc = start(cmd, tmp_path)
    try:
        wait_for_training(tmp_path, proc)
        proc.send_signal(signal.SIGTERM)
        run = finish(proc, cmd, tmp_path, time.monotonic(), timeout=30)
    finally:
        kill_group(proc)
    assert run.returncode == 0, str(run)
    saved = re.findall(r"^stop requested \(SIGTERM\): checkpoint saved at step (\d+)", run.stdout, re.M)
    assert len(saved) == 1 and read_checkpoint(tmp_path / CKPT)["attrs"]["step"] == int(saved[0]), str(run)
    assert not [line for line in notes(run) if "failed" in line or line.startswith("restart")], str(run)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the job's processes through /proc (Linux)")
def test_no_job_outlives_a_killed_supervisor(cifar_dir, tmp_path):
    cmd = launch_command(train_args(cifar_dir), "-n", "2")
    proc = start(cmd, tmp_path)
    try:
        wait_for_training(tmp_path, proc)
        assert len(job_ranks(tmp_path)) == 2
        os.kill(proc.pid, signal.SIGKILL)  # the supervisor only, not its job
        deadline = time.monotonic() + 20
        while job_ranks(tmp_path):
            assert time.monotonic() < deadline, f"ranks still running 20 s after the supervisor died: {job_ranks(tmp_path)}"
            time.sleep(0.1)
    finally:
        kill_group(proc)
        for pid in job_ranks(tmp_path).values():
            os.kill(pid, signal.SIGKILL)
    # what the killed supervisor left (its rank map) goes with the next one's start
    assert [n for n in os.listdir(tmp_path / "dpnet_run") if n.startswith(".dpnet-launch-ranks-")]
    run = supervised(train_args(cifar_dir, "--resume", CKPT, "--max-steps", "25"), tmp_path, "-n", "2")
    assert run.returncode == 0, str(run)
    assert not [n for n in os.listdir(tmp_path / "dpnet_run") if n.startswith(".dpnet-launch-ranks-")]


def stand_in_launcher(tmp_path, body):
    """An executable script to pass as --launcher-command: `body` (sh), which receives the
    launcher's arguments (-n N python -m dpnet.train ...)."""
    script = tmp_path / "stand-in-launcher"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def assert_no_sleep_left(cwd):
    """No `sleep` (a stand-in's leftover) still runs in folder cwd, 5 s at most after the end."""
    deadline = time.monotonic() + 5
    while " sleep: " in describe_processes(-1, cwd) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert " sleep: " not in describe_processes(-1, cwd), describe_processes(-1, cwd)


def test_a_launcher_that_does_not_end_a_doomed_job_is_ended(cifar_dir, tmp_path):
    """Rank 1 exits without a report; the launcher (a stand-in: mpiexec, then a long sleep, as a
    launcher whose clean-up left a rank behind) does not end. --launcher-grace 1 s after the
    guardian's line the supervisor ends the launcher's group itself and reports the rank's status."""
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    stuck = stand_in_launcher(tmp_path, f"{mpiexec if os.path.exists(mpiexec) else 'mpiexec'} \"$@\"\nexec sleep 300\n")
    (tmp_path / "work").mkdir()
    args = ["--data", cifar_dir, *TINY, "--epochs", "1"]
    run = supervised(args, tmp_path / "work", "-n", "2", "--max-restarts", "0", "--launcher-command", stuck,
                     "--launcher-grace", "1", env=clean_env(DPNET_FAULT="1:2:exit"), timeout=60)
    assert run.returncode == 3, str(run)
    assert any(line.startswith("the launcher had not ended the job 1 s after a rank's unexplained end; ending it")
               for line in notes(run)), str(run)
    assert re.search(r"attempt 1 failed after [\d.]+ s with exit status 3: rank 1 \(PID \d+ on \S+\) ended "
                     r"with exit status 3 and no report", run.stderr), str(run)
    assert_no_sleep_left(tmp_path / "work")  # the stand-in's sleep went with its group


def test_a_doomed_job_without_a_rank_map_leaves_no_process(tmp_path):
    """A job doomed before rank 0 wrote the rank map (a stand-in launcher: one process in a
    session of its own, as Hydra starts ranks, then a guardian's line, then no end): the
    supervisor finds what the attempt started by the rank map path in its environment."""
    stuck = stand_in_launcher(tmp_path, "setsid sleep 300 &\necho '[rank 1] ended with exit status 3 and no report "
                                        "(os._exit, or exit() in C code); PID 4242 on here' >&2\nexec sleep 301\n")
    run = supervised(["--data", "unused"], tmp_path, "-n", "2", "--max-restarts", "0", "--launcher-command", stuck,
                     "--launcher-grace", "1", timeout=60)
    assert run.returncode == 3, str(run)
    assert_no_sleep_left(tmp_path)


def test_a_restart_never_resumes_an_earlier_runs_checkpoint(cifar_dir, tmp_path):
    """An earlier, finished run's files at the same paths, replaced with --overwrite: the new run
    fails before its first checkpoint, and the restart starts it afresh, not from the earlier
    run's step 10."""
    args = ["--data", cifar_dir, *TINY, "--epochs", "2", "--checkpoint-every", "5"]
    run_ok(args, tmp_path, 2)
    assert newest_checkpoint(str(tmp_path / CKPT))[0] == 10
    run = supervised(args + ["--overwrite"], tmp_path, "-n", "2", "--max-restarts", "1",
                     env=clean_env(DPNET_FAULT="1:2:exit"))
    assert run.returncode == 3, str(run)
    restarts = [line for line in notes(run) if line.startswith("restart ")]
    assert restarts == ["restart 1 of 1: from the start (no checkpoint written yet) on 2 rank(s)"], str(run)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the ranks to kill through /proc (Linux)")
def test_a_rank_killed_by_a_signal_numbered_like_a_final_status_is_restarted(cifar_dir, tmp_path):
    """Hydra exits k when a rank dies of signal k: SIGILL (4) looks like a non-finite loss's
    status, yet the launcher's report shows a death, and the job is restarted."""
    cmd = launch_command(train_args(cifar_dir), "-n", "2")
    proc = start(cmd, tmp_path)
    try:
        wait_for_training(tmp_path, proc)
        os.kill(job_ranks(tmp_path)[1], signal.SIGILL)
        run = finish(proc, cmd, tmp_path, time.monotonic(), timeout=180)
    finally:
        kill_group(proc)
    assert run.returncode == 0, str(run)
    assert re.search(r"attempt 1 failed after [\d.]+ s with exit status 4: rank 1 \(PID \d+ on \S+\) died, "
                     r"killed by SIGILL", run.stderr), str(run)
    assert notes(run)[-1] == "finished after 1 restart(s)", str(run)


@pytest.mark.skipif(not (shutil.which("script") and os.path.isdir("/proc/self")),
                    reason="needs util-linux's script (a terminal for the supervisor) and /proc")
def test_the_live_bar_reaches_a_terminal_through_the_supervisor(cifar_dir, tmp_path):
    """python -m dpnet.launch on a terminal: the job's output passes through the supervisor as it
    comes, carriage returns and all, so rank 0 draws tqdm's live bar."""
    args = [a for a in train_args(cifar_dir, "--epochs", "1") if a != "--no-progress"]
    command = shlex.join(launch_command(args, "-n", "2"))
    typescript = tmp_path / "typescript"
    cmd = ["script", "-qec", command, str(typescript)]
    run = finish(start(cmd, tmp_path, clean_env(DPNET_PROGRESS_SECONDS="0")), cmd, tmp_path, time.monotonic(), 90)
    assert run.returncode == 0, str(run)
    shown = typescript.read_bytes().decode(errors="replace")
    assert re.search(r"\repoch 1/1: +\d+%\|", shown), shown
    assert "epoch 1/1: step " not in shown, shown


@pytest.mark.skipif(not (shutil.which("script") and os.path.isdir("/proc/self")),
                    reason="needs util-linux's script (a terminal for the supervisor) and /proc")
def test_output_piped_to_another_program_gets_lines_not_a_bar(cifar_dir, tmp_path):
    """python -m dpnet.launch ... 2>&1 | cat > log on a terminal: the output goes to another
    program, not the terminal: progress lines, no bar."""
    args = [a for a in train_args(cifar_dir, "--epochs", "1") if a != "--no-progress"]
    command = shlex.join(launch_command(args, "-n", "2")) + " 2>&1 | cat > log"
    cmd = ["script", "-qec", command, str(tmp_path / "typescript")]
    run = finish(start(cmd, tmp_path, clean_env(DPNET_PROGRESS_SECONDS="0")), cmd, tmp_path, time.monotonic(), 90)
    assert run.returncode == 0, str(run)
    log = (tmp_path / "log").read_text()
    assert "\r" not in log and "epoch 1/1: step " in log, log


def test_the_supervisor_keeps_reading_when_its_own_output_fails(tmp_path):
    """Its stderr closed (2>&-) or a terminal gone: the job's output is still drained, so the job
    never blocks writing it."""
    from dpnet.launch import _forward

    class Failing:
        class buffer:
            @staticmethod
            def write(data):
                raise OSError(5, "Input/output error")

    import threading

    def write(fd):
        with os.fdopen(fd, "wb") as writer:
            writer.write(b"x" * 200000 + b"\nlast line\n")  # more than a pipe holds

    for ours in (None, Failing):
        read_end, write_end = os.pipe()
        writer = threading.Thread(target=write, args=(write_end,))
        writer.start()
        with os.fdopen(read_end, "rb") as stream:
            tail = []
            _forward(stream, ours, tail)
        writer.join(timeout=10)
        assert not writer.is_alive() and tail[-1] == "last line\n"
