"""The scaling model (dpnet.scaling): its formulas against hand-computed values, predict's
JSON, the fit file, `fit --quick` end to end, and the prediction in dpnet.train's metrics.
No speed is asserted: measured times only have to be positive and finite."""

import json
import math
import os
import subprocess
import sys

import pytest

from dpnet.scaling import (auto_reducer, compute_s, fit_line, load_fit, machine, machine_key, predict,
                           recursive_doubling_s, ring_s, save_fit, step_s)
from dpnet.scaling import comm_s as comm_seconds
from dpnet.scaling.__main__ import main as scaling_main
from tests.train_helpers import REPO_ROOT, cifar_dir, clean_env  # noqa: F401 (fixture)

# a hand-made fit: links as 2-rank lines t = a + b bytes (alpha = a / 2, beta = b)
FIT = {
    "machine": {"cpu": "Test CPU", "blas": "testblas kernel 1"},
    "links": {"shm": {"a": 1e-4, "b": 1e-9}, "mpi-local": {"a": 2e-5, "b": 1e-9}, "1gbit": {"a": 1e-4, "b": 8e-9}},
    "models": {"threelayer": {"images": [8, 16], "compute_s": [0.1, 0.18], "optimizer_s": 0.02,
                              "backward_fraction": 0.5, "gradient_bytes": 1_000_000}},
}


def with_bytes(nbytes):
    return {**FIT, "models": {"threelayer": {**FIT["models"]["threelayer"], "gradient_bytes": nbytes}}}


def test_ring_and_recursive_doubling_by_hand():
    # ring: 2 (N-1) alpha + 2 (N-1)/N bytes beta
    assert ring_s(4, 1000, 1e-5, 1e-8) == pytest.approx(6e-5 + 1.5e-5)
    assert ring_s(1, 1000, 1e-5, 1e-8) == 0.0
    # recursive doubling: log2 N (alpha + bytes beta); 6 ranks take 3 exchanges
    assert recursive_doubling_s(8, 1000, 1e-5, 1e-8) == pytest.approx(3e-5 + 3e-5)
    assert recursive_doubling_s(6, 1000, 1e-5, 1e-8) == pytest.approx(6e-5)


def test_fit_line_pins_the_smallest_size_and_fits_the_slope():
    assert fit_line([1, 2, 4], [3, 5, 9]) == pytest.approx((1, 2))
    assert fit_line([1, 2, 4], [3, 2.9, 2.5]) == (3, 0)  # noise that shrinks with size: no negative bandwidth
    a, b = fit_line([0, 1, 2], [1, 2, 4])  # slope of (1, 3) over (1, 2) through the origin: 7 / 5
    assert (a, b) == pytest.approx((1, 1.4))


def test_compute_interpolates_and_extends_with_the_slope():
    m = FIT["models"]["threelayer"]  # 0.1 s at 8 images, 0.18 s at 16: 0.01 s per image
    assert compute_s(m, 12) == pytest.approx(0.14)
    assert compute_s(m, 24) == pytest.approx(0.26)
    assert compute_s(m, 4) == pytest.approx(0.06)


def test_flat_reducers_across_nodes_and_within_one():
    # 4 nodes of 1 rank over 1gbit: alpha 5e-5, beta 8e-9
    assert comm_seconds(FIT, "ring", 4, 1, 1e6, "1gbit") == pytest.approx(6 * 5e-5 + 1.5 * 1e6 * 8e-9)
    # 4 ranks on one node: MPI's own shared memory, alpha 1e-5, beta 1e-9
    assert comm_seconds(FIT, "ring", 4, 4, 1e6, "1gbit") == pytest.approx(6 * 1e-5 + 1.5 * 1e6 * 1e-9)
    # recursive doubling, 8 ranks in nodes of 2: one exchange within the node, two across,
    # where the node's 2 ranks share its link (beta x 2)
    assert comm_seconds(FIT, "recursive-doubling", 8, 2, 1e6, "1gbit") == pytest.approx(
        (1e-5 + 1e6 * 1e-9) + (2 * 5e-5 + 2 * 1e6 * 16e-9))


def test_hierarchical_is_a_node_sum_then_a_ring_of_slices_over_the_nodes():
    # 8 ranks, 2 per node: shm sum of all the bytes, then a ring over 4 nodes of half the
    # bytes, the node's 2 slices sharing its link
    node_sum = 1e-4 + 1e-9 * 1e6
    across = 6 * 5e-5 + 1.5 * 5e5 * (8e-9 * 2)
    assert comm_seconds(FIT, "shared-memory", 8, 2, 1e6, "1gbit") == pytest.approx(node_sum + across)
    parts = step_s(FIT, "threelayer", 8, 16, "shared-memory", ranks_per_node=2)
    # the node's 2 ranks share one optimizer step
    assert parts["step_s"] == pytest.approx(0.18 + 0.02 / 2 + node_sum + across)
    # on one node, shared memory is the node sum alone
    assert comm_seconds(FIT, "shared-memory", 2, 2, 1e6, "1gbit") == pytest.approx(node_sum)


def test_overlap_hides_communication_up_to_the_backward_time():
    # 4 ranks, 1 per node: ring 0.0123 s; backward = 0.5 x 0.1 s = 0.05 s hides all of it
    ring = 6 * 5e-5 + 1.5 * 1e6 * 8e-9
    hidden = step_s(FIT, "threelayer", 4, 8, "ring", overlap=True)
    assert hidden["comm_s"] == pytest.approx(ring) and hidden["exposed_s"] == 0.0
    assert hidden["step_s"] == pytest.approx(0.1 + 0.02)
    # 10 MB: ring 0.1203 s, of which 0.05 s hides behind backward
    big = step_s(with_bytes(10_000_000), "threelayer", 4, 8, "ring", overlap=True)
    assert big["exposed_s"] == pytest.approx(6 * 5e-5 + 1.5 * 1e7 * 8e-9 - 0.05)
    plain = step_s(with_bytes(10_000_000), "threelayer", 4, 8, "ring")
    assert plain["step_s"] - big["step_s"] == pytest.approx(0.05)


def test_strong_and_weak_scaling():
    one = 0.18 + 0.02  # 16 images on one rank: 80 images/s
    ring2 = 2 * 5e-5 + 1e6 * 8e-9
    strong = predict(FIT, "threelayer", 16, [1, 2], reducers=[("ring", False)])
    assert [r["images_per_rank"] for r in strong] == [16, 8]
    assert strong[0]["step_s"] == pytest.approx(one) and strong[0]["efficiency"] == pytest.approx(1)
    assert strong[1]["step_s"] == pytest.approx(0.1 + 0.02 + ring2)
    assert strong[1]["images_per_s"] == pytest.approx(16 / (0.12 + ring2))
    assert strong[1]["efficiency"] == pytest.approx(16 / (0.12 + ring2) / (2 * 80))
    weak = predict(FIT, "threelayer", 16, [2], weak=True, reducers=[("ring", False)])
    assert weak[0]["images_per_rank"] == 16
    assert weak[0]["images_per_s"] == pytest.approx(32 / (one + ring2))
    assert weak[0]["efficiency"] == pytest.approx(one / (one + ring2))
    # strong scaling past the batch: one image on the slowest rank
    assert predict(FIT, "threelayer", 16, [32], reducers=[("ring", False)])[0]["images_per_rank"] == 1


def test_ranks_sharing_cores_slow_compute():
    assert step_s(FIT, "threelayer", 4, 8, "ring", cores=2)["compute_s"] == pytest.approx(0.2)
    assert step_s(FIT, "threelayer", 2, 8, "ring", cores=2)["compute_s"] == pytest.approx(0.1)


def test_auto_follows_dpnets_policy():
    assert auto_reducer(1, 1) == "none"
    assert auto_reducer(2, 2) == "shared-memory"
    assert auto_reducer(8, 2) == "shared-memory"
    assert auto_reducer(8, 1) == "ring"
    assert auto_reducer(6, 4) == "ring"  # nodes of 4 and 2: unequal, so Allreduce


def test_predict_prints_dpnets_choice_as_json(tmp_path, capsys):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({machine_key(): FIT}))
    assert scaling_main(["predict", "--fit", str(path), "--model", "threelayer", "--batch-size", "16",
                         "--ranks", "1,2,4,1024", "--ranks-per-node", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["ranks"] for r in rows] == [1, 2, 4, 1024]
    assert [r["reducer"] for r in rows] == ["none", "shared-memory", "shared-memory", "shared-memory"]
    for row in rows:
        assert {"ranks", "step_s", "images_per_s", "efficiency", "reducer"} <= set(row)
        assert row["step_s"] > 0 and row["images_per_s"] == pytest.approx(16 / row["step_s"])
    assert rows[0]["step_s"] == pytest.approx(0.2)


def test_predict_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({machine_key(): FIT}))
    scaling_main(["predict", "--fit", str(path), "--model", "threelayer", "--ranks", "1,2,4", "--weak", "--link", "shm",
                  "--plot", str(tmp_path / "curves.png")])
    out = capsys.readouterr().out
    assert out.startswith("threelayer, weak, 128 per rank, one node") and len(out.splitlines()) == 6
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_fit_round_trip_keeps_other_machines(tmp_path):
    path = str(tmp_path / "sub" / "scaling.json")
    other = {**FIT, "machine": {"cpu": "Other CPU", "blas": "x"}}
    save_fit(other, path)
    mine = {**FIT, "machine": machine()}
    save_fit(mine, path)
    assert load_fit(path) == json.loads(json.dumps(mine))
    assert load_fit(path, key="Other CPU | x") == json.loads(json.dumps(other))
    assert load_fit(str(tmp_path / "missing.json")) is None


def test_fit_quick_end_to_end(tmp_path):
    """`fit --quick` measures this machine (4-20 s here; TCP links only where network
    namespaces can be made) and `predict` reads what it wrote."""
    path = tmp_path / "fit.json"
    env = clean_env()
    run = subprocess.run([sys.executable, "-m", "dpnet.scaling", "fit", "--quick", "--out", str(path)],
                         capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    fit = json.loads(path.read_text())[machine_key()]
    assert fit["quick"] is True and {"shm", "mpi-local"} <= set(fit["links"])
    for line in fit["links"].values():
        assert line["a"] >= 0 and line["b"] >= 0 and math.isfinite(line["b"])  # 0: too noisy, and said
    for name in ("threelayer", "convnet"):
        m = fit["models"][name]
        assert m["images"] == [8, 32] and all(t > 0 for t in m["compute_s"]) and m["optimizer_s"] > 0
        assert 0 < m["backward_fraction"] < 1
    # the optimizer step timed is each model's default (its recipe's): momentum, not Adam, for threelayer
    assert fit["models"]["threelayer"]["optimizer"] == "momentum" and fit["models"]["convnet"]["optimizer"] == "adam"
    assert fit["models"]["threelayer"]["gradient_bytes"] == 4 * (16429248 // 4)
    out = subprocess.run([sys.executable, "-m", "dpnet.scaling", "predict", "--fit", str(path), "--ranks", "1,2",
                          "--link", "shm", "--json"], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert [r["ranks"] for r in json.loads(out.stdout)] == [1, 2]


@pytest.mark.parametrize("have_fit", [True, False], ids=["fit", "no-fit"])
def test_training_metrics_carry_the_accounting(cifar_dir, tmp_path, monkeypatch, have_fit):  # noqa: F811
    """Each epoch's metrics: bytes summed and seconds per step, and the model's prediction
    for the layout when this machine has a fit (else null)."""
    from dpnet.parallel import SerialComm
    from dpnet.train import TrainConfig, train

    path = tmp_path / "fit.json"
    fit = {**with_bytes(16429248), "machine": machine()}
    if have_fit:
        path.write_text(json.dumps({machine_key(): fit}))
    monkeypatch.setenv("DPNET_SCALING_FIT", str(path))
    metrics = tmp_path / "metrics.jsonl"
    config = TrainConfig(data=cifar_dir, max_steps=2, batch_size=16, threads=1, metrics=str(metrics),
                         checkpoint="", val_size=20, progress=False)
    train(config, SerialComm())
    record = json.loads(metrics.read_text().splitlines()[0])
    assert record["bytes_per_step"] == 0  # one rank sums nothing
    assert record["step_s"] == pytest.approx(record["seconds"] / 2)
    assert 0 <= record["comm_s_per_step"] < record["step_s"]
    if have_fit:
        assert record["predicted_step_s"] == pytest.approx(0.1 + 0.01 * 8 + 0.02)  # 16 images on 1 rank
        assert record["predicted_comm_s"] == 0.0
    else:
        assert record["predicted_step_s"] is None and record["predicted_comm_s"] is None
