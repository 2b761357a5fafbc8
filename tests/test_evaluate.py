"""`python -m dpnet.evaluate CHECKPOINT`: the accuracy a run reported, per-class accuracy and the
confusion matrix, the same at any number of ranks."""

import json
import os
import sys

import numpy as np
import pytest

from tests.train_helpers import (TINY, clean_env, finish, mpirun_path, read_checkpoint, read_metrics,  # noqa: F401
                                 run_ok, start, write_cifar_folder)

CKPT = os.path.join("dpnet_run", "checkpoint.h5")
METRICS = os.path.join("dpnet_run", "metrics.jsonl")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-rank run on a tiny CIFAR-10 folder whose test set (1,100 images) spans three of the
    500-image chunks the ranks share out: (folder of the run, data folder)."""
    root = tmp_path_factory.mktemp("evaluate")
    data = write_cifar_folder(str(root / "cifar-10-batches-py"), test_size=1100, seed=5)
    run_ok(["--data", data, *TINY, "--epochs", "2"], root, 2, timeout=120)
    return root, data


def evaluate(args, cwd, ranks=None, timeout=120, env=None):
    cmd = ([mpirun_path(), "-n", str(ranks)] if ranks else []) + [sys.executable, "-m", "dpnet.evaluate", *args]
    import time
    return finish(start(cmd, cwd, env), cmd, cwd, time.monotonic(), timeout)


def test_accuracy_equals_what_training_reported_at_any_number_of_ranks(trained):
    root, _ = trained
    reported = read_metrics(root / METRICS)[-1]["test_acc"]
    results = {}
    for ranks in (None, 2, 3):
        run = evaluate([CKPT, "--json"], root, ranks)
        assert run.returncode == 0 and run.stdout.count("\n") == 1, str(run)  # one JSON line, from rank 0
        results[ranks] = json.loads(run.stdout)
    result = results[None]
    assert result["test_acc"] == reported and result["total"] == 1100
    counts = np.array(result["confusion"])
    assert counts.shape == (10, 10) and counts.sum() == 1100 and np.trace(counts) == result["correct"]
    assert result["correct"] / 1100 == reported
    for k, label in enumerate(result["labels"]):
        assert result["per_class"][label] == pytest.approx(counts[k, k] / counts[k].sum(), rel=1e-15)
    assert results[2] == result and results[3] == result  # each image counted once, same predictions


def test_text_report_and_confusion_plot(trained, tmp_path):
    root, data = trained
    png = tmp_path / "confusion.png"
    run = evaluate([str(root / CKPT), "--data", data, "--plot", str(png)], tmp_path)
    assert run.returncode == 0, str(run)
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"{root / CKPT} (step 10): test accuracy 0.") and lines[0].endswith("/1100)")
    assert lines[2] == "per class:" and lines[3].split()[0] == "airplane" and len(lines) == 3 + 10 + 2 + 10
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("found", ["env", "synthetic"])
def test_the_checkpoint_names_the_data_the_run_found(trained, tmp_path, found):
    """A run that found CIFAR-10 through $DPNET_DATA (no --data), or that trained on the synthetic
    set: evaluating and resuming its checkpoint, where $DPNET_DATA is unset or names another data
    set, use the run's own images (else the accuracy silently changes)."""
    _, data = trained
    other = write_cifar_folder(str(tmp_path / "other" / "cifar-10-batches-py"), test_size=60, seed=9)
    first, later = (data, None) if found == "env" else (other, other)
    args = [*TINY, "--max-steps", "3"] + (["--data", "synthetic"] if found == "synthetic" else [])
    run_ok(args, tmp_path, env=clean_env(DPNET_DATA=first))
    assert read_checkpoint(tmp_path / CKPT)["attrs"]["config"]["data"] == (data if found == "env" else "synthetic")
    reported = read_metrics(tmp_path / METRICS)[-1]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = evaluate([str(tmp_path / CKPT), "--json"], elsewhere, env=clean_env(DPNET_DATA=later))
    assert result.returncode == 0, str(result)
    result = json.loads(result.stdout)
    assert (result["test_acc"], result["synthetic"]) == (reported["test_acc"], found == "synthetic")
    assert result["total"] == (1100 if found == "env" else 1000)

    resumed = run_ok(["--resume", str(tmp_path / CKPT), "--max-steps", "4", "--checkpoint", "more.h5",
                      "--metrics", "more.jsonl", "--no-progress"], elsewhere, env=clean_env(DPNET_DATA=later))
    source = "CIFAR-10 from " + data if found == "env" else "SYNTHETIC data (--data synthetic)"
    assert source in resumed.stdout, str(resumed)


@pytest.mark.parametrize("case", ["missing", "garbage"])
def test_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path, case):
    path = tmp_path / "ck.h5"
    if case == "garbage":
        path.write_bytes(b"not hdf5")
    run = evaluate([str(path)], tmp_path)
    assert run.returncode == 2 and len(run.err_lines) == 1, str(run)
    assert run.err_lines[0].startswith(f"python -m dpnet.evaluate: error: {path}"), str(run)


class BatchDependentModel:
    """Scores that depend on the other images of the batch (each centred on the batch mean), as a
    model in training-mode batchnorm would: the counts then depend on how the set is cut."""

    def scores(self, x):
        return x - x.mean(axis=0)


def test_the_counts_do_not_depend_on_the_number_of_ranks_even_where_batches_matter():
    from dpnet.parallel import SerialComm, SimComm
    from dpnet.train.scoring import confusion_matrix
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((1100, 10)), rng.integers(0, 10, 1100)
    model = BatchDependentModel()
    one = confusion_matrix(model, SerialComm(), x, y, lambda a: a, 10)
    assert one.sum() == 1100
    for ranks in (2, 3):
        counts = SimComm(ranks).run(lambda comm: confusion_matrix(model, comm, x, y, lambda a: a, 10))
        assert all(np.array_equal(c, one) for c in counts), ranks
    # negative control: the same model scored in each rank's contiguous share of the set (the
    # obvious split, which changes with the number of ranks) gives other counts
    for ranks in (2, 3):
        split = sum(confusion_matrix(model, SerialComm(), xs, ys, lambda a: a, 10, chunk=len(xs))
                    for xs, ys in zip(np.array_split(x, ranks), np.array_split(y, ranks)))
        assert split.sum() == 1100 and not np.array_equal(split, one), ranks


def test_the_checkpoints_layer_choices_compute_the_logits(trained, tmp_path, monkeypatch):
    """A run's measured choices (here written into a copy of the checkpoint as an auto run
    would) are the ones evaluation computes with: its very logits."""
    import shutil

    import h5py

    import dpnet.layers.sandwich as sandwich
    from dpnet.evaluate import evaluate_checkpoint
    from dpnet.parallel import SerialComm
    root, _ = trained
    path = str(tmp_path / "auto.h5")
    shutil.copy(root / CKPT, path)
    with h5py.File(path, "a") as f:
        f.attrs["layer_choices"] = json.dumps({"conv": {"1": "im2col-whole"}, "dx": {}})
    algorithms, conv_forward = [], sandwich.conv_forward

    def spy(x, w, b, conv_param):
        algorithms.append(conv_param.get("algorithm"))
        return conv_forward(x, w, b, conv_param)

    monkeypatch.setattr(sandwich, "conv_forward", spy)
    evaluate_checkpoint(path, SerialComm())
    assert algorithms and set(algorithms) == {"im2col-whole"}
