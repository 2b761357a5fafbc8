"""`python -m dpnet.train`: see dpnet.train.cli."""

import sys

from ..memory import keep_freed_memory
from ..parallel.guardian import guard_this_rank
from .cli import main

keep_freed_memory()  # freed arrays are reused by the next step, not faulted in afresh
guard_this_rank()  # under an MPI launcher: a parent process that names this rank if it dies unreported
sys.exit(main())
