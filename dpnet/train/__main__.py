"""`python -m dpnet.train`: see dpnet.train.cli."""

import sys

from .cli import main

sys.exit(main())
