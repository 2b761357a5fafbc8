"""`python -m dpnet.plot`: curves from a dpnet.train metrics file, clear errors otherwise."""

import json
import subprocess
import sys

import pytest

from dpnet.plot import PlotError, main, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, epochs=3, final=True, extra=()):
    lines = [{"epoch": e, "step": 10 * e, "train_loss": 2.3 - 0.3 * e, "train_acc": 0.2 + 0.1 * e,
              "val_acc": 0.15 + 0.1 * e, "images_per_s": 900.0, "comm_fraction": 0.05, "seconds": 4.2,
              "synthetic": False} for e in range(1, epochs + 1)]
    if final:
        lines.append({"final": True, "step": 10 * epochs, "test_acc": 0.41, "synthetic": False})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "".join(extra))
    return path


def test_png_from_metrics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    metrics = write_metrics(tmp_path / "metrics.jsonl")
    out = tmp_path / "plots" / "curves.png"
    assert main([str(metrics), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert f"wrote {out}" in capsys.readouterr().out


def test_default_out_and_subprocess(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = write_metrics(tmp_path / "metrics.jsonl", final=False)  # a stopped run: no test accuracy
    result = subprocess.run([sys.executable, "-m", "dpnet.plot", str(metrics)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "metrics.png").read_bytes().startswith(PNG_SIGNATURE)


def test_resumed_run_keeps_last_record_per_epoch(tmp_path):
    redo = json.dumps({"epoch": 2, "step": 20, "train_loss": 9.0, "train_acc": 0.5, "val_acc": 0.5}) + "\n"
    records, final = read_metrics(write_metrics(tmp_path / "m.jsonl", extra=["\n", redo]))
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[1]["train_loss"] == 9.0 and final["test_acc"] == 0.41


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("", "is empty"),
    ("\n\n", "is empty"),
    ('{"epoch": 1, "train_loss": 2.0\n', ":1: not JSON"),
    ("[1, 2]\n", ":1: expected a JSON object"),
    ('{"epoch": 1, "train_loss": 2.0, "train_acc": 0.1}\n', ":1: missing or non-numeric val_acc"),
    ('{"final": true, "test_acc": 0.4}\n', "has no epoch records"),
])
def test_bad_metrics_files(tmp_path, capsys, content, message):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    assert main([str(path), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.png").exists()


def test_missing_matplotlib_message(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    metrics = write_metrics(tmp_path / "metrics.jsonl")
    assert main([str(metrics), "--out", str(tmp_path / "c.png")]) == 2
    assert 'pip install "dpnet[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()
    with pytest.raises(PlotError, match="matplotlib"):
        from dpnet.plot import plot_metrics
        plot_metrics(str(metrics), str(tmp_path / "c.png"))


def test_null_accuracy_from_an_empty_validation_set_is_drawn_as_a_gap(tmp_path):
    pytest.importorskip("matplotlib")
    from dpnet.plot import main
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"epoch": 1, "step": 3, "train_loss": 2.0, "train_acc": 0.3, "val_acc": None},
        {"epoch": 2, "step": 6, "train_loss": 1.5, "train_acc": 0.5, "val_acc": None},
        {"final": True, "step": 6, "test_acc": 0.4}]) + "\n")
    out = tmp_path / "c.png"
    assert main([str(metrics), "--out", str(out)]) in (0, None)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
