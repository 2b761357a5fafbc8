"""A measured scaling model of data-parallel training: `python -m dpnet.scaling`.

    model.py    the math (pure functions, no MPI): reducer costs, step time, strong and weak scaling
    measure.py  measuring this machine (compute, optimizer, gradient sums), the fit file
    worker.py   the MPI worker that times gradient sums under mpiexec
    run.py      a training run's predicted step (for dpnet.train's metrics)
    __main__.py `fit` and `predict`
"""

from .measure import default_path, load_fit, machine, machine_key, measure_fit, save_fit
from .model import (REDUCERS, auto_reducer, comm_s, compute_s, fit_line, predict, recursive_doubling_s, ring_s,
                    shm_sum_s, step_s)
from .run import run_prediction

__all__ = [
    "REDUCERS", "auto_reducer", "comm_s", "compute_s", "fit_line", "predict", "recursive_doubling_s", "ring_s",
    "shm_sum_s", "step_s", "default_path", "load_fit", "machine", "machine_key", "measure_fit", "save_fit",
    "run_prediction",
]
