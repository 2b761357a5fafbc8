"""Exact data parallelism over MPI: communicators, sharding and DataParallel.

One module per concern: comm and simcomm (communicators), sharding (who sees which
examples), reducer, allreduce and shared_memory (summing gradients), choice (which
reducer), update (who updates which parameters), regularization (the L2 term, slice by
slice), watchdog (ending hung jobs), consistency (the drift check), and data_parallel,
which composes them.
"""

from .allreduce import AllreduceReducer, BucketedAllreduce
from .choice import REDUCTIONS, ReducerUnavailable, choose_reducer
from .comm import MPIComm, SerialComm, get_comm, launched_by_mpi, launcher_rank
from .consistency import ParameterDriftError, checksum
from .data_parallel import DataParallel
from .sharding import epoch_permutation, shard_bounds, shard_indices, steps_per_epoch
from .shared_memory import HierarchicalReducer, SharedMemoryReducer
from .simcomm import SimComm, SimCommError

__all__ = [
    "get_comm", "launched_by_mpi", "launcher_rank", "SerialComm", "MPIComm", "SimComm", "SimCommError",
    "DataParallel", "REDUCTIONS", "ParameterDriftError", "checksum",
    "choose_reducer", "ReducerUnavailable", "AllreduceReducer", "BucketedAllreduce", "SharedMemoryReducer", "HierarchicalReducer",
    "shard_indices", "shard_bounds", "epoch_permutation", "steps_per_epoch",
]
