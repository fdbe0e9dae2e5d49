"""``python -m surgery``: the same as the ``surgery`` console script."""

import sys

from .cli import main

sys.exit(main())
