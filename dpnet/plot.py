"""`python -m dpnet.plot METRICS [--out curves.png]`: training curves from dpnet.train's metrics.

METRICS is the JSON-lines file dpnet.train writes (--metrics, default dpnet_run/metrics.jsonl):
one object per epoch (epoch, train_loss, train_acc, val_acc, ...) and a last one with
"final": true and test_acc. The PNG shows the training loss and the train / validation
accuracy per epoch, with the test accuracy marked. Needs matplotlib: pip install "dpnet[plot]".
"""

import argparse
import json
import os
import sys

import numpy as np

PROG = "python -m dpnet.plot"
EPOCH_KEYS = ("epoch", "train_loss", "train_acc", "val_acc")
OPTIONAL_KEYS = ("train_acc", "val_acc")


class PlotError(ValueError):
    """The metrics file is missing or malformed, or matplotlib is not installed."""


def read_metrics(path):
    """(epoch records sorted by epoch, final record or None). A resumed run appends to the
    file; for an epoch that appears twice the later record wins."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as exc:
        raise PlotError(f"cannot read {path}: {exc.strerror or exc}") from exc
    epochs, final = {}, None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PlotError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise PlotError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        if record.get("final"):
            final = record
            continue
        # accuracies may be null (an empty validation set: --val-size 0), drawn as gaps
        missing = [k for k in EPOCH_KEYS if not isinstance(record.get(k), (int, float))
                   and not (k in OPTIONAL_KEYS and k in record and record[k] is None)]
        if missing:
            raise PlotError(f"{path}:{number}: missing or non-numeric {', '.join(missing)} "
                            "(not a dpnet.train metrics file?)")
        epochs[int(record["epoch"])] = record
    if not epochs:
        what = "is empty" if not any(line.strip() for line in lines) else "has no epoch records"
        raise PlotError(f"{path} {what}: nothing to plot (dpnet.train writes a line per completed epoch)")
    return [epochs[e] for e in sorted(epochs)], final


def _figure_class():
    try:
        import matplotlib  # noqa: F401  (Figure alone uses the Agg canvas, no GUI backend)
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError('plotting needs matplotlib, an optional extra: pip install "dpnet[plot]"') from None
    return Figure


def plot_metrics(path, out):
    """Draw the curves of the metrics file `path` into the PNG `out`; return out."""
    records, final = read_metrics(path)
    Figure = _figure_class()
    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in records], "o-", label="train loss")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="training loss")
    for key, style, label in (("train_acc", "o-", "train"), ("val_acc", "s-", "validation")):
        acc_ax.plot(epochs, [np.nan if r[key] is None else r[key] for r in records], style, label=label)
    if final is not None and isinstance(final.get("test_acc"), (int, float)):
        acc_ax.plot([epochs[-1]], [final["test_acc"]], "*", markersize=14, color="tab:red",
                    label=f"test {final['test_acc']:.3f}")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    if any(r.get("synthetic") for r in records):
        fig.suptitle("synthetic data (not CIFAR-10)")
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", metavar="METRICS", help="metrics file written by dpnet.train")
    parser.add_argument("--out", help="PNG to write (default: METRICS with the suffix .png)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or os.path.splitext(args.metrics)[0] + ".png"
    try:
        plot_metrics(args.metrics, out)
    except (PlotError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
