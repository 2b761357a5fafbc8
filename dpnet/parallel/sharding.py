"""Which examples each rank sees: pure index math, no communication.

Each epoch uses one permutation of the data set drawn from (seed, epoch), identical on
every rank and independent of the number of ranks. The permutation is cut into global
minibatches of batch_size (the last one may be smaller: no example is dropped or seen
twice), and each global minibatch into `size` contiguous shards whose lengths differ by
at most one; rank r takes shard r (possibly empty when the batch has fewer examples
than there are ranks; that rank still joins every collective).
"""

import numpy as np


def epoch_permutation(num_examples, seed, epoch):
    """The order of the examples in `epoch`: a permutation of range(num_examples)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def shard_bounds(batch_len, size, rank):
    """(start, stop) of rank's contiguous shard of a batch of batch_len examples."""
    if not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, {size}), got {rank}")
    base, extra = divmod(batch_len, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def rank_bounds(batch_len, micro_shards, size, rank):
    """(start, stop) of the examples of a global batch of batch_len that rank holds in the
    reproducible mode (dpnet.parallel.microshards): its micro-shards, contiguous."""
    k = micro_shards // size
    return (shard_bounds(batch_len, micro_shards, rank * k)[0],
            shard_bounds(batch_len, micro_shards, rank * k + k - 1)[1])


def steps_per_epoch(num_examples, batch_size):
    """Global minibatches in an epoch, the last possibly partial."""
    return -(-num_examples // batch_size)


def shard_indices(num_examples, batch_size, rank, size, seed, epoch, micro_shards=None):
    """Example indices of this rank for every step of `epoch`: a list with one int array per
    global minibatch (an array may be empty). With micro_shards (the reproducible mode), the
    rank's shard is its micro-shards (rank_bounds)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = epoch_permutation(num_examples, seed, epoch)
    shards = []
    for start in range(0, num_examples, batch_size):
        batch = order[start:start + batch_size]
        lo, hi = (rank_bounds(len(batch), micro_shards, size, rank) if micro_shards else
                  shard_bounds(len(batch), size, rank))
        shards.append(batch[lo:hi])
    return shards
