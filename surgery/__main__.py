"""``python -m surgery``: the same as the ``surgery`` console script."""

import sys

from .cli import entry

sys.exit(entry())
