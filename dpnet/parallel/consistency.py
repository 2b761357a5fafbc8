"""The drift check: do all ranks hold bit-identical parameters?

Collectives: one Allgather of a few uint64 digests per check.
"""

import numpy as np


class ParameterDriftError(RuntimeError):
    """Ranks that should hold identical parameters do not."""


def checksum(array):
    """A uint64 digest of the bytes of a float array (sum of its 32-bit words, mod 2**64)."""
    words = np.ascontiguousarray(array).reshape(-1).view(np.uint32)
    return np.add.reduce(words, dtype=np.uint64)


def check_consistency(comm, arrays, step):
    """Raise ParameterDriftError, naming `step` and the ranks, unless every rank's `arrays`
    (the flat parameters, batchnorm statistics, ...) are bit-identical to rank 0's."""
    digest = np.array([checksum(a) for a in arrays], dtype=np.uint64)
    digests = comm.allgather(digest)
    drifted = [r for r in range(comm.size) if not np.array_equal(digests[r], digests[0])]
    if drifted:
        raise ParameterDriftError(
            f"at step {step} the parameters of rank(s) {drifted} differ from rank 0's "
            f"(checksums {[int(d[0]) for d in digests]})"
        )
