"""Helpers for the end-to-end tests of `python -m dpnet.train` (tests/test_train.py) and of
the CIFAR-10 loader (tests/test_cifar_loader.py): a tiny CIFAR-10 folder in the official
python format, a subprocess runner with a hard time bound, and a checkpoint reader.

Import the fixtures into a test module with `from tests.train_helpers import cifar_dir`.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dpnet.proc import pids, proc_stat

# ------------------------------------------------------------------ CIFAR-10 files

LABEL_NAMES = [name.encode() for name in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                          "frog", "horse", "ship", "truck")]
TRAIN_SIZES = (40, 40, 40, 40, 40)  # data_batch_1..5
TEST_SIZE = 40


def make_batch(n, seed, label="training batch", noise=25.0):
    """The dict of one official batch file: n 'learnable-ish' images (each class has its own
    mean colour, plus pixel noise). Returns (dict, labels as an int array)."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(12345).uniform(40, 215, size=(10, 3))  # class colours, shared
    labels = rng.integers(0, 10, n)
    images = means[labels][:, :, None, None] + rng.normal(0, noise, (n, 3, 32, 32))
    data = np.ascontiguousarray(np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072))
    return {b"batch_label": label.encode(), b"labels": [int(v) for v in labels], b"data": data,
            b"filenames": [f"image_{seed}_{i}.png".encode() for i in range(n)]}, labels


def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar_folder(root, train_sizes=TRAIN_SIZES, test_size=TEST_SIZE, seed=0):
    """Write cifar-10-batches-py at `root` (data_batch_1..5, test_batch, batches.meta)."""
    os.makedirs(root, exist_ok=True)
    for i, n in enumerate(train_sizes, start=1):
        write_pickle(os.path.join(root, f"data_batch_{i}"),
                     make_batch(n, seed * 100 + i, f"training batch {i} of 5")[0])
    write_pickle(os.path.join(root, "test_batch"), make_batch(test_size, seed * 100 + 99, "testing batch 1 of 1")[0])
    write_pickle(os.path.join(root, "batches.meta"),
                 {b"label_names": list(LABEL_NAMES), b"num_cases_per_batch": train_sizes[0], b"num_vis": 3072})
    return str(root)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A tiny CIFAR-10 folder: 5 x 40 training images, 40 test images."""
    return write_cifar_folder(str(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"))


# ------------------------------------------------------------------ running the command

# With --val-size 40 the 200 training images leave 160: 5 steps per epoch of global batch 32.
TINY_SPLIT = ["--val-size", "40", "--batch-size", "32", "--no-progress"]
TINY = [*TINY_SPLIT, "--hidden-dim", "16"]  # ResNets take no --hidden-dim: TINY_SPLIT
STEPS_PER_EPOCH = 5


def mpirun_path():
    beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return beside if os.path.exists(beside) else shutil.which("mpirun")


_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "OMPI_", "SLURM_", "MPI_LOCAL", "MPIR_", "DPNET_")


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clean_env(**extra):
    """The environment for a training subprocess: no launcher variables leaking from an outer
    mpirun, no DPNET_* switches but the tests' layer-choice cache (conftest.py), one BLAS/OpenMP
    thread per rank (2 cores), and this checkout's dpnet first on the path (the jobs run in a
    temporary directory, where an installed copy would otherwise be the one imported)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_LAUNCHER_PREFIXES) or k == "DPNET_AUTOTUNE_CACHE"}
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


class Run:
    """The outcome of one command: returncode, stdout, stderr, seconds, cwd."""

    def __init__(self, cmd, cwd, returncode, stdout, stderr, seconds):
        self.cmd, self.cwd = cmd, str(cwd)
        self.returncode, self.stdout, self.stderr, self.seconds = returncode, stdout, stderr, seconds

    def path(self, *parts):
        return os.path.join(self.cwd, *parts)

    @property
    def lines(self):
        return self.stdout.splitlines()

    @property
    def err_lines(self):
        return [line for line in self.stderr.splitlines() if line.strip()]

    def __str__(self):
        return (f"$ {' '.join(self.cmd)}  (cwd {self.cwd})\nexit {self.returncode} after {self.seconds:.1f} s\n"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}")


def train_command(args, ranks=None):
    """`[mpirun -n ranks] python -m dpnet.train args` (no mpirun when ranks is None)."""
    launcher = [mpirun_path(), "-n", str(ranks)] if ranks else []
    return launcher + [sys.executable, "-m", "dpnet.train"] + [str(a) for a in args]


def start(cmd, cwd, env=None):
    """Popen in a new session (so that the whole job can be killed by process group)."""
    return subprocess.Popen(cmd, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env() if env is None else env, start_new_session=True)


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_members(pgid):
    """Live (not zombie) processes of process group pgid, as (pid, command) pairs."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [(pgid, "?")]
    stats = ((pid, proc_stat(pid)) for pid in pids())
    return [(pid, stat.name) for pid, stat in stats if stat and stat.pgid == pgid and stat.state != "Z"]


def job_processes(cwd):
    """({rank: pid} of the dpnet.train ranks running in folder cwd, {rank: pid} of their guardians),
    found through /proc (Linux) by command line, folder and PMI_RANK."""
    from dpnet.parallel.guardian import GUARDIAN_NAME
    ranks, guardians = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            if b"dpnet.train" not in cmdline or os.readlink(f"/proc/{entry}/cwd") != str(cwd):
                continue
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        stat = proc_stat(int(entry))
        rank = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"PMI_RANK=")]
        if rank and stat and stat.state != "Z":
            found = guardians if stat.name == GUARDIAN_NAME else ranks
            found[int(rank[0])] = int(entry)
    return ranks, guardians


def describe_processes(root, cwd):
    """One line per process that descends from PID root or runs in folder cwd (Linux /proc):
    PID, parent, group, session, state, kernel wait channel, name, and its open files, so that
    a hung job's failure shows who was still alive and what each held (pipes, sockets)."""
    if not os.path.isdir("/proc/self"):
        return "(no /proc)"
    table, here = {}, set()
    for pid in pids():
        stat = proc_stat(pid)
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(cwd):
                here.add(pid)
        except OSError:
            continue
        if stat:
            table[pid] = stat
    def descends(pid):
        while pid in table and pid != root:
            pid = table[pid].ppid
        return pid == root
    lines = []
    for pid in sorted(p for p in table if p in here or descends(p)):
        name, state, ppid, pgid, sid = table[pid]
        try:
            wchan = open(f"/proc/{pid}/wchan").read() or "-"
        except OSError:
            wchan = "?"
        files = []
        try:
            for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
                try:
                    files.append(f"{fd}:{os.readlink(f'/proc/{pid}/fd/{fd}')}")
                except OSError:
                    pass
        except OSError:
            pass
        lines.append(f"{pid} ppid {ppid} pgid {pgid} sid {sid} {state} {wchan} {name}: {' '.join(files)}")
    return "\n".join(lines) or "(none)"


def group_alive(pgid):
    return bool(group_members(pgid))


def finish(proc, cmd, cwd, started, timeout):
    """Wait for proc at most `timeout` seconds (counted from `started`); on overrun kill its
    whole process group and fail the test."""
    try:
        out, err = proc.communicate(timeout=max(0.1, timeout - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        processes = describe_processes(proc.pid, cwd)  # what was still there, for the failure's message
        kill_group(proc)
        out, err = proc.communicate()
        run = Run(cmd, cwd, proc.returncode, out, err, time.monotonic() - started)
        pytest.fail(f"the job did not end within {timeout} s; killed\n{run}\n--- its processes then\n{processes}")
    run = Run(cmd, cwd, proc.returncode, out, err, time.monotonic() - started)
    # nothing of the job may outlive it (a hung rank, an orphaned proxy)
    deadline = time.monotonic() + 5
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftover = group_members(proc.pid)
    kill_group(proc)
    assert not leftover, f"processes of the job were still running 5 s after it ended: {leftover}\n{run}"
    return run


def run_train(args, cwd, ranks=None, env=None, timeout=120):
    """Run the training command to its end (at most `timeout` seconds) and return a Run."""
    cmd = train_command(args, ranks)
    started = time.monotonic()
    return finish(start(cmd, cwd, env), cmd, cwd, started, timeout)


def run_ok(args, cwd, ranks=None, env=None, timeout=120):
    run = run_train(args, cwd, ranks, env, timeout)
    assert run.returncode == 0, str(run)
    assert "Traceback" not in run.stderr, str(run)
    return run


# ------------------------------------------------------------------ outputs

def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_checkpoint(path):
    """Everything in a checkpoint file, read with h5py directly (not dpnet's loader)."""
    import h5py

    with h5py.File(path, "r") as f:
        out = {
            "params": {k: v[()] for k, v in f["params"].items()},
            "optimizer": {f"{k}/{name}": v[name][()] for k, v in f["optimizer"].items() for name in v},
            "optimizer_attrs": {k: (v.item() if hasattr(v, "item") else v) for k, v in f["optimizer"].attrs.items()},
            "batchnorm": {f"{g}/{k}": v[()] for g in f["batchnorm"] for k, v in f["batchnorm"][g].items()},
            "attrs": dict(f.attrs),
            "groups": sorted(f),
        }
    for key in ("config", "rng_states", "layer_choices"):
        if key in out["attrs"]:
            out["attrs"][key] = json.loads(out["attrs"][key])
    return out


def assert_same_state(a, b, what=""):
    """Bit-identical parameters, optimizer state and batchnorm statistics of two checkpoints."""
    for group in ("params", "optimizer", "batchnorm"):
        assert sorted(a[group]) == sorted(b[group]), f"{what}: {group} names differ"
        for name in a[group]:
            x, y = a[group][name], b[group][name]
            assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {group}/{name} dtype/shape differ"
            if not np.array_equal(x, y):
                diff = np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))
                pytest.fail(f"{what}: {group}/{name} differs (max abs difference {diff:.3g})")
    assert a["optimizer_attrs"] == b["optimizer_attrs"], f"{what}: optimizer scalars differ"
    assert a["attrs"]["step"] == b["attrs"]["step"], what
    assert a["attrs"]["epoch"] == b["attrs"]["epoch"], what
