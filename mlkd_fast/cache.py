"""``mlkd-cache`` / ``python -m mlkd_fast.cache``: the teacher's outputs on every training view, computed
once, for ``mlkd-train --teacher-cache DIR``. The code is :mod:`mlkd_fast.train.cache` (``main(argv)``
builds a cache from Python and returns its manifest)."""
import sys

from .train.cache import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    sys.exit(cli())
