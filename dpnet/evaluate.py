"""`python -m dpnet.evaluate CHECKPOINT [--data D] [--json] [--plot FILE.png]`: test accuracy,
per-class accuracy and the confusion matrix of a checkpoint written by `python -m dpnet.train`.

The model, its dtype and the input normalisation (the channel statistics of the run's training
split) come from the checkpoint's stored settings, so the accuracy equals the one the run
reported on the same data. --data names another copy of the data set (default: the run's).
Under mpirun each rank scores a share of the test images and the counts are summed: each
image is counted once, and the counts do not depend on the number of ranks.
"""

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from .checkpoint import CheckpointError, load_checkpoint
from .data import DataError
from .parallel import get_comm, launcher_rank
from .train.config import ConfigError
from .train.inputs import SYNTHETIC, load_data, normaliser, split_train_val
from .train.loop import StartupError, build_model, on_every_rank
from .train.resume import stored_train_config
from .train.scoring import accuracy, confusion_matrix

PROG = "python -m dpnet.evaluate"


def evaluate_checkpoint(path, comm, data=None):
    """The evaluation of checkpoint `path` on the test set (collective): a dict with
    test_acc, correct, total, per_class ({label: accuracy}), confusion (rows: true labels),
    labels, step, checkpoint and synthetic."""
    def load():
        config = stored_train_config(path)
        if data:
            config = dataclasses.replace(config, data=data)
        model = build_model(config, comm)
        _, attrs = load_checkpoint(path, model)
        if attrs["layer_choices"]:  # the run's measured choices: its very logits
            model.set_layer_choices(attrs["layer_choices"])
        dataset, _, place = load_data(config)
        synthetic = place == SYNTHETIC
        (x_train, _), _ = split_train_val(dataset, config.val_size, config.seed)
        return config, model, attrs, dataset, synthetic, x_train

    # a file missing on one node ends every rank with one message, none waits for it
    config, model, attrs, dataset, synthetic, x_train = on_every_rank(comm, load)
    to_input = normaliser(x_train, np.dtype(config.dtype))
    counts = confusion_matrix(model, comm, dataset["x_test"], dataset["y_test"], to_input, model.num_classes)
    labels = list(dataset.get("label_names") or [str(k) for k in range(model.num_classes)])
    rows = counts.sum(axis=1)
    return {"checkpoint": path, "step": attrs["step"], "synthetic": synthetic, "test_acc": accuracy(counts),
            "correct": int(np.trace(counts)), "total": int(counts.sum()),
            "per_class": {label: (float(counts[k, k] / rows[k]) if rows[k] else None) for k, label in enumerate(labels)},
            "labels": labels, "confusion": counts.tolist()}


def report(result):
    """The evaluation as text: accuracy, then one line per class, then the confusion matrix."""
    width = max(len(label) for label in result["labels"])
    lines = [f"{result['checkpoint']} (step {result['step']}): test accuracy {result['test_acc']:.4f} "
             f"({result['correct']}/{result['total']})" + (" on SYNTHETIC data" if result["synthetic"] else ""),
             "", "per class:"]
    for label, value in result["per_class"].items():
        lines.append(f"  {label:<{width}}  {'n/a' if value is None else f'{value:.4f}'}")
    lines += ["", "confusion matrix (rows: true label, columns: predicted, in the order above):"]
    lines += ["  " + " ".join(f"{n:5d}" for n in row) for row in result["confusion"]]
    return "\n".join(lines)


def plot_confusion(result, out):
    """The confusion matrix as a PNG (needs the plot extra, matplotlib)."""
    from .plot import _figure_class
    Figure = _figure_class()
    counts = np.array(result["confusion"])
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = range(len(result["labels"]))
    ax.set_xticks(ticks, result["labels"], rotation=45, ha="right")
    ax.set_yticks(ticks, result["labels"])
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                color="white" if n > counts.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true label",
           title=f"test accuracy {result['test_acc']:.4f} (step {result['step']})")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100, format="png")


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by dpnet.train")
    parser.add_argument("--data", help="the data set (default: the one the run trained on)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the confusion matrix (needs dpnet[plot])")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        comm = get_comm()
        result = evaluate_checkpoint(args.checkpoint, comm, args.data)
        if comm.rank == 0:
            if args.plot:
                plot_confusion(result, args.plot)
            print(json.dumps(result) if args.json else report(result), flush=True)
    except (CheckpointError, ConfigError, DataError, StartupError, OSError, ValueError) as exc:
        if launcher_rank() == 0:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
