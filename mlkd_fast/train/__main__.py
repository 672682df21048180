"""``mlkd-train`` / ``python -m mlkd_fast.train``: the command line (:mod:`.cli`) and the run
(:mod:`.run`); ``python -m mlkd_fast.train --help`` lists every flag.

:func:`main` is the command line's entry point and returns the exit status; from Python, call
:func:`mlkd_fast.train.main`, which returns the run's summary and raises errors.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from .cli import config_note, parse_args_with_sources
from .errors import exit_status, system_exit_status
from .loop import NonFiniteLossError
from .run import run_parsed

PROG = "mlkd-train"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``mlkd-train`` with ``argv`` (default: the command line) and returns its exit status.

    - 0: the run finished, or stopped cleanly (SIGINT / SIGTERM / ``--max-steps``, checkpoint saved;
      ``--resume`` continues), or ``--help`` / ``--version``.
    - 2: a user error, reported as one line on stderr, ``mlkd-train: <message>``, no traceback
      (``--debug``: the traceback too). User errors are exactly: the ``SystemExit`` of the flag
      checks (argparse's and :func:`~.cli.parse_args`'s, already printed as one line) and the
      ``SystemExit("mlkd-train: ...")`` of the run's own checks (``--device cuda`` without a GPU,
      fewer images than one batch, a method the data cannot serve); and the
      :class:`~.errors.UserError` exceptions raised by the loop's checks of what it was given
      (missing data folder, ``train/`` or ``val/``, an empty class folder, a missing or unreadable
      weights file or checkpoint, weights or a checkpoint of another architecture or class count, a
      ``--resume`` checkpoint written with other settings, an undecodable image with
      ``--on-corrupt fail``, a missing optional package).
    - 1, one line: a non-finite loss stopped the run (``--on-nonfinite stop``; the last checkpoint kept).
    - 130: interrupted before a checkpoint could be saved (Ctrl-C before training began, or twice).
    - 1, with the traceback: anything else. A plain ``ValueError``, ``FileNotFoundError`` or
      ``RuntimeError`` (from torch, a method, or a bug in the loop) is not taken for the user's.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config, sources = parse_args_with_sources(argv)
    except SystemExit as exc:  # --help / --version (0) or a bad flag (2), already printed
        return system_exit_status(exc, PROG)
    # a stopped run returns {"interrupted": True}: a clean stop, exit status 0; run_parsed is looked up
    # when called (a test replaces it)
    return exit_status(lambda: run_parsed(config), PROG, debug=config.debug,
                       # a value read from --config is named as the file's, not blamed on the command line
                       note=lambda message: config_note(message, sources), failures=(NonFiniteLossError,),
                       interrupted="interrupted (no checkpoint saved since the last one)")


if __name__ == "__main__":
    sys.exit(main())
