"""``mlkd-train`` / ``python -m mlkd_fast.train``: the command line (:mod:`.cli`) and the run
(:mod:`.run`); ``python -m mlkd_fast.train --help`` lists every flag."""
import sys

from .run import main

if __name__ == "__main__":
    main()
    sys.exit(0)
