"""``python -m fusion``: see ``fusion.cli``."""

import sys

from .cli import main

sys.exit(main(prog="python -m fusion"))
