"""The scaling model's prediction for a running `python -m dpnet.train` job (its metrics).

The fit describes the models as dpnet.train builds them by default (hidden 500, float32,
one BLAS thread per rank), so a job that differs gets no prediction. Ranks per node come
from the shared-memory reducer, or else from the launcher (MPI_LOCALNRANKS); the network
between nodes is $DPNET_LINK (default 1gbit, the slowest link the fit measures).
"""

import math
import os

from .measure import load_fit
from .model import NETWORK_LINKS, step_s

LINK_ENV = "DPNET_LINK"


def ranks_per_node(dp, comm_size):
    node = getattr(dp.reducer, "node", None)
    if node is not None:
        return node.size
    return min(comm_size, int(os.environ.get("MPI_LOCALNRANKS") or 1))


def run_prediction(config, dp, comm_size, threads, fit=None):
    """{"predicted_step_s", "predicted_comm_s"} for this job's layout: seconds, or None when
    there is no fit for this machine or the job is not what the fit measured."""
    none = {"predicted_step_s": None, "predicted_comm_s": None}
    fit = fit or load_fit()
    if (fit is None or config.model not in fit["models"] or threads != 1 or config.dtype != "float32"
            or config.hidden_dim != 500 or config.bucket_mb or config.reproducible):
        return none  # the reproducible mode's passes and sums are not what the fit measured
    if int(dp.flat.buffer.nbytes) != fit["models"][config.model]["gradient_bytes"]:
        return none  # another variant of the model (batchnorm off, other sizes)
    k = ranks_per_node(dp, comm_size)
    reducer = {"allreduce": "ring", "shared-memory": "shared-memory", "hierarchical": "shared-memory"}[dp.reduction]
    if comm_size == 1:
        reducer = "none"
    link = os.environ.get(LINK_ENV, NETWORK_LINKS[0])
    needed = ["shm", "mpi-local"] + ([link] if comm_size > k else [])
    if not all(name in fit["links"] for name in needed):
        return none
    # every node is taken to have this node's cores: K ranks on fewer cores share them
    cores = (os.cpu_count() or 1) * max(1, comm_size // k)
    parts = step_s(fit, config.model, comm_size, math.ceil(config.batch_size / comm_size), reducer,
                   ranks_per_node=k, link=link, cores=cores)
    return {"predicted_step_s": parts["step_s"], "predicted_comm_s": parts["comm_s"]}
