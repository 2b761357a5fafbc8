"""Scoring a model on a labelled set across ranks: the confusion matrix, each image counted once.

The set is cut into chunks of CHUNK images at fixed global positions and rank r scores chunks
r, r + size, ...: every image is scored in the same chunk at any number of ranks, so the
predictions, and the counts, do not depend on how many ranks share the work.
"""

import numpy as np

CHUNK = 500


def confusion_matrix(model, comm, x, y, to_input, classes, chunk=CHUNK):
    """(classes, classes) int64 counts, summed over the ranks of comm: row = true label,
    column = predicted label, in test mode."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    for start in range(comm.rank * chunk, len(x), comm.size * chunk):
        stop = min(start + chunk, len(x))
        predicted = model.scores(to_input(x[start:stop])).argmax(axis=1)
        pairs = np.asarray(y[start:stop], dtype=np.int64) * classes + predicted
        counts += np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)
    return comm.allreduce(counts)


def accuracy(counts):
    """The share of the confusion matrix on its diagonal; None for an empty set."""
    total = int(counts.sum())
    return float(np.trace(counts) / total) if total else None
