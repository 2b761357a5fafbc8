"""The scaling model: step time of data-parallel training from a measured fit (pure math, no MPI).

A fit (dpnet.scaling.measure) holds, for one machine:
- links[name] = {"a": s, "b": s/byte}: a line t = a + b * bytes through measured times of
  one gradient sum at 2 ranks. "shm": SharedMemoryReducer on one host (the node sum);
  "mpi-local": MPI Allreduce on one host; "1gbit", "10gbit": MPI Allreduce between two
  hosts over TCP. For an Allreduce, a = 2 alpha (a 2-rank ring sends 2 messages) and
  b = beta (it moves 2 (N-1)/N = 1 x the bytes through each rank's link).
- models[name] = {"images": [n...], "compute_s": [s...], "optimizer": name, "optimizer_s": s,
  "backward_fraction": f, "gradient_bytes": bytes}: forward + backward time at n images per
  rank (one BLAS thread), the step of the model's default optimizer (`optimizer`, from its
  recipe) over all parameters, and the share of
  forward + backward that backward takes after its first gradient is ready.

One step, per rank:  compute(n) + optimizer + exposed communication, where
- compute(n) interpolates the measured points (beyond them: the end point plus the slope
  of the least-squares line c0 + c1 n), times max(1, ranks sharing a machine / its cores);
- optimizer is divided by K where a node's K ranks share one copy (shared memory);
- exposed communication is the reducer's time, less the backward time with overlap.
"""

import math

import numpy as np

REDUCERS = ("ring", "recursive-doubling", "shared-memory")  # shared-memory: with a ring across nodes
NETWORK_LINKS = ("1gbit", "10gbit")


def fit_line(x, y):
    """(a, b) of t = a + b x: the line through the point of smallest x (latency-bound;
    a kept >= 0) whose slope b fits all points by least squares (the large ones weigh
    most: bandwidth); b is kept >= 0 too (times that shrink as messages grow are noise, e.g.
    another job on the machine: the caller says so).
    A plain least-squares intercept is not used: it can come out negative, and small
    messages that fit a link's token bucket (netns_cluster's burst) bend the line."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    first = int(np.argmin(x))
    dx, dy = x - x[first], y - y[first]
    b = max(float(np.sum(dx * dy) / np.sum(dx * dx)), 0.0) if np.any(dx) else 0.0
    return max(float(y[first] - b * x[first]), 0.0), b


def alpha_beta(link):
    """(alpha s, beta s/byte) of an Allreduce link from its 2-rank line."""
    return link["a"] / 2, link["b"]


def ring_s(ranks, nbytes, alpha, beta):
    """Ring Allreduce (reduce-scatter then allgather): 2 (N-1) alpha + 2 (N-1)/N bytes beta."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * nbytes * beta


def recursive_doubling_s(ranks, nbytes, alpha, beta):
    """Recursive doubling: ceil(log2 N) exchanges of the whole buffer."""
    if ranks <= 1:
        return 0.0
    steps = math.ceil(math.log2(ranks))
    return steps * alpha + steps * nbytes * beta


def shm_sum_s(ranks_per_node, nbytes, shm):
    """The node sum through shared memory: each of K ranks reads its 1/K slice of K
    segments, bytes in all, whatever K is (assumes memory bandwidth grows with the cores)."""
    if ranks_per_node <= 1:
        return 0.0
    return shm["a"] + shm["b"] * nbytes


def compute_s(model, images):
    """Forward + backward seconds at `images` per rank (one BLAS thread)."""
    xs, ts = np.asarray(model["images"], float), np.asarray(model["compute_s"], float)
    slope = np.polyfit(xs, ts, 1)[0] if len(xs) > 1 else ts[0] / xs[0]  # c1 of c0 + c1 n
    if images < xs[0]:
        return max(float(ts[0] - slope * (xs[0] - images)), 0.0)
    if images > xs[-1]:
        return float(ts[-1] + slope * (images - xs[-1]))
    return float(np.interp(images, xs, ts))


def layout(ranks, ranks_per_node):
    """(K, nodes): ranks per node and nodes; K = ranks when they fit on one node."""
    k = max(1, min(ranks_per_node, ranks))
    return k, -(-ranks // k)


def auto_reducer(ranks, ranks_per_node):
    """What DataParallel's 'auto' picks: shared memory (one node) or shared memory plus a
    ring across nodes when every node holds K > 1 ranks, else a flat Allreduce (MPICH's is
    a ring for large messages); 'none' for one rank."""
    k, nodes = layout(ranks, ranks_per_node)
    if ranks == 1:
        return "none"
    if k > 1 and ranks % k == 0:
        return "shared-memory"
    return "ring"


def comm_s(fit, reducer, ranks, ranks_per_node, nbytes, link):
    """Seconds of one gradient sum of nbytes over `ranks` by `reducer`.

    The ranks of one node talk through "mpi-local" (flat reducers) or "shm"; across nodes
    through fit["links"][link]. A node's K ranks share its one link: when they all send at
    once (the ring across nodes of shared-memory, recursive doubling's cross-node steps),
    each gets 1/K of its bandwidth."""
    k, nodes = layout(ranks, ranks_per_node)
    links = fit["links"]
    local = alpha_beta(links["mpi-local"])
    net = alpha_beta(links[link]) if nodes > 1 else local
    if reducer == "none" or ranks == 1:
        return 0.0
    if reducer == "ring":  # each node's ring edges in and out cross its link once
        return ring_s(ranks, nbytes, *net)
    if reducer == "recursive-doubling":  # log2 K steps within a node, the rest across, K at once
        within = math.ceil(math.log2(k)) if k > 1 else 0
        return (recursive_doubling_s(2 ** within, nbytes, *local)
                + recursive_doubling_s(nodes, nbytes, net[0], net[1] * k))
    if reducer == "shared-memory":  # node sum, then each rank's 1/K slice in a ring over the nodes
        return shm_sum_s(k, nbytes, links["shm"]) + ring_s(nodes, nbytes / k, net[0], net[1] * k)
    raise ValueError(f"reducer must be one of {REDUCERS} or 'none', got {reducer!r}")


def step_s(fit, model, ranks, images, reducer, overlap=False, ranks_per_node=1, link="1gbit", cores=None):
    """One training step's parts, in seconds: {compute_s, optimizer_s, comm_s, exposed_s, step_s}.

    Inputs:
    - fit: see the module docstring; model: its name in fit["models"]
    - ranks; images: per rank; reducer: one of REDUCERS or 'none'
    - overlap: communication hidden behind backward, up to backward's time
    - ranks_per_node: K; link: the network between nodes ("1gbit", "10gbit")
    - cores: cores of the one machine every rank runs on, when ranks share it (compute
      slows by ranks / cores beyond one rank per core); None: a core per rank
    """
    m = fit["models"][model]
    k, _ = layout(ranks, ranks_per_node)
    compute = compute_s(m, images) * (max(1.0, ranks / cores) if cores else 1.0)
    shared = reducer == "shared-memory" and k > 1
    optimizer = m["optimizer_s"] / k if shared else m["optimizer_s"]
    comm = comm_s(fit, reducer, ranks, ranks_per_node, m["gradient_bytes"], link)
    exposed = max(0.0, comm - m["backward_fraction"] * compute) if overlap else comm
    return {"compute_s": compute, "optimizer_s": optimizer, "comm_s": comm, "exposed_s": exposed,
            "step_s": compute + optimizer + exposed}


def predict(fit, model, batch_size, ranks_list, ranks_per_node=1, link="1gbit", weak=False, reducers=None,
            cores=None):
    """Rows {ranks, reducer, overlap, images_per_rank, step_s, images_per_s, efficiency, ...}
    for each rank count and reducer (None: every reducer, with and without overlap, and
    'auto', dpnet's choice). Strong scaling (weak=False): a global batch of batch_size,
    ceil(B / N) images on the slowest rank; weak: batch_size per rank. Efficiency is
    images/s over N times one rank's images/s at batch_size images."""
    base = step_s(fit, model, 1, batch_size, "none", cores=cores)["step_s"]
    rows = []
    for ranks in ranks_list:
        images = batch_size if weak else math.ceil(batch_size / ranks)
        total = batch_size * ranks if weak else batch_size
        variants = reducers or [(r, o) for r in REDUCERS for o in (False, True)] + [("auto", False)]
        for reducer, overlap in variants:
            name = auto_reducer(ranks, ranks_per_node) if reducer == "auto" else reducer
            parts = step_s(fit, model, ranks, images, name, overlap, ranks_per_node, link, cores)
            rows.append({"ranks": ranks, "reducer": name, "auto": reducer == "auto", "overlap": overlap,
                         "images_per_rank": images, **parts, "images_per_s": total / parts["step_s"],
                         "efficiency": total / parts["step_s"] / (ranks * batch_size / base)})
    return rows
