"""`python -m dpnet.train`: see dpnet.train.cli."""

import sys

from ..parallel.guardian import guard_this_rank
from .cli import main

guard_this_rank()  # under an MPI launcher: a parent process that names this rank if it dies unreported
sys.exit(main())
