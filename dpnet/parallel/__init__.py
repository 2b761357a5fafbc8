"""Exact data parallelism over MPI: communicators, sharding and DataParallel."""

from .comm import MPIComm, SerialComm, get_comm, launched_by_mpi, launcher_rank
from .data_parallel import REDUCTIONS, DataParallel, ParameterDriftError, checksum
from .sharding import epoch_permutation, shard_bounds, shard_indices, steps_per_epoch
from .simcomm import SimComm, SimCommError

__all__ = [
    "get_comm", "launched_by_mpi", "launcher_rank", "SerialComm", "MPIComm", "SimComm", "SimCommError",
    "DataParallel", "REDUCTIONS", "ParameterDriftError", "checksum",
    "shard_indices", "shard_bounds", "epoch_permutation", "steps_per_epoch",
]
