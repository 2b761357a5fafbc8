"""Which gradient reducer a job uses: the policy behind DataParallel's `reduction`."""

import numpy as np

from .allreduce import AllreduceReducer, BucketedAllreduce, bucket_bounds
from .shared_memory import HierarchicalReducer, SharedMemoryReducer

REDUCTIONS = ("auto", "shared-memory", "allreduce")
SHM_HEADROOM = 1.25  # leave room for shared arrays beyond what they need
SPARE_ARRAYS = 3  # shared arrays of `count` elements room is checked for: parameters, Adam's m and v


class ReducerUnavailable(RuntimeError):
    """The reduction asked for cannot serve this job (raised on every rank alike)."""


def choose_reducer(comm, reduction, bucket_bytes, sizes, extra, dtype):
    """(reducer, reason): the reducer for `reduction`, and why shared memory is not used
    when 'auto' could not use it (None otherwise). Collective over comm.

    - sizes: the parameters' sizes in buffer order (backward order); extra: entries after them
    - 'allreduce', or bucket_bytes given: AllreduceReducer, or BucketedAllreduce with buckets
      of about bucket_bytes
    - 'shared-memory': SharedMemoryReducer on one node, HierarchicalReducer on several;
      ReducerUnavailable if it cannot serve (nodes of unequal size, too little room)
    - 'auto': 'shared-memory' where it can serve and nodes hold more than one rank, else
      'allreduce'
    With one rank there is nothing to sum: AllreduceReducer (or buckets, as asked).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "shared-memory" and bucket_bytes:
        raise ValueError("bucket_bytes applies to reduction 'allreduce' only; "
                         "'shared-memory' sums all gradients at once after backward")
    dtype = np.dtype(dtype)
    count = int(sum(sizes)) + extra
    if comm.size > 1 and reduction != "allreduce" and not bucket_bytes:
        reducer, why_not = _shared_memory(comm, count, dtype, auto=reduction == "auto")
        if reducer is not None:
            return reducer, None
        if reduction == "shared-memory":
            raise ReducerUnavailable(f"reduction 'shared-memory' is unavailable: {why_not}")
        return AllreduceReducer(comm, np.zeros(count, dtype)), why_not
    if bucket_bytes:
        ends = np.cumsum(sizes).tolist()
        return BucketedAllreduce(comm, np.zeros(count, dtype),
                                 bucket_bounds(ends, count, bucket_bytes, dtype.itemsize)), None
    return AllreduceReducer(comm, np.zeros(count, dtype)), None


def choose_canonical_reducer(comm, canonical_sum, micro_shards, shapes, extra, dtype, passes):
    """(reducer, reason) for the reproducible mode: SharedTreeReducer where every rank is on one
    node with room for its shared arrays and the sum is the tree, else CanonicalReducer with
    canonical_sum over comm (reason: why not shared memory). Collective over comm.
    shapes: the parameters' shapes in buffer order; passes: this rank's micro-shard passes
    (micro_shards / comm.size)."""
    from .canonical import CanonicalReducer, FactorLayout, SharedTreeReducer, canonical_summer
    dtype = np.dtype(dtype)
    shapes = [tuple(shape) for shape in shapes] + [(1,)] * extra
    count = int(sum(int(np.prod(shape)) for shape in shapes))
    layout = FactorLayout(shapes)
    why_not = "one rank: nothing to share"
    if comm.size > 1:
        why_not = f"the {canonical_sum} sum goes through MPI"
        if canonical_sum == "tree":
            node, cross, why_not = _node_split(comm, count, dtype, micro_shards, auto=False, one_node=True)
            if why_not is None:
                return SharedTreeReducer(comm, node, cross, count, dtype, micro_shards, layout), None
    summer = canonical_summer(canonical_sum, comm, micro_shards, shapes, dtype)
    return CanonicalReducer(comm, count, dtype, passes, summer, layout), why_not


def _shared_memory(comm, count, dtype, auto):
    """(reducer, None), or (None, why not) on every rank alike."""
    node, cross, why_not = _node_split(comm, count, dtype, None, auto, one_node=False)
    if why_not is not None:
        return None, why_not
    kind = SharedMemoryReducer if cross.size == 1 else HierarchicalReducer
    return kind(comm, node, cross, count, dtype), None


def _node_split(comm, count, dtype, segments, auto, one_node):
    """(node, cross, None) where shared memory can hold `segments` send segments of `count`
    entries per node (None: one per rank), or (None, None, why not), on every rank alike."""
    node, cross = comm.split_by_node()
    segments = node.size if segments is None else segments
    needed = (segments + 1 + SPARE_ARRAYS) * count * dtype.itemsize
    free = node.shared_bytes_free() if node.rank == 0 else None
    short = int(free is not None and free < SHM_HEADROOM * needed)
    # [-min ranks per node, max ranks per node, any node short of shared memory]
    facts = comm.allreduce(np.array([-node.size, node.size, short], dtype=np.int64), op="max")
    why_not = None
    if -facts[0] != facts[1]:
        why_not = f"nodes hold different numbers of ranks ({-facts[0]} to {facts[1]})"
    elif one_node and facts[1] != comm.size:
        why_not = "the ranks span several nodes: the tree is summed through MPI"
    elif auto and facts[1] == 1:
        why_not = "one rank per node: nothing to share"
    elif facts[2]:
        why_not = f"shared memory has less than {SHM_HEADROOM:g} x {needed / 2**20:.1f} MiB free on some node"
    if why_not is not None:
        node.free()
        cross.free()
        return None, None, why_not
    return node, cross, None
