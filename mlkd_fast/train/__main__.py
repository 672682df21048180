"""``mlkd-train`` / ``python -m mlkd_fast.train``: the command line (:mod:`.cli`) and the run
(:mod:`.run`); ``python -m mlkd_fast.train --help`` lists every flag.

:func:`main` is the command line's entry point and returns the exit status; from Python, call
:func:`mlkd_fast.train.main`, which returns the run's summary and raises errors.
"""
from __future__ import annotations

import sys
import traceback
from typing import Optional, Sequence

from .cli import config_note, parse_args_with_sources
from .errors import UserError, one_line
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
        args, sources = parse_args_with_sources(argv)
    except SystemExit as exc:  # --help / --version (0) or a bad flag (2), already printed
        return _status(exc, debug=False)
    try:
        run_parsed(args)  # a stopped run returns {"interrupted": True}: a clean stop, exit status 0
    except SystemExit as exc:
        return _status(exc, args.debug, sources)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        # a value read from --config is named as the file's, not blamed on the command line
        print(f"{PROG}: {config_note(one_line(exc), sources)}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as exc:  # training failed (not the user's input): one line, exit status 1
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: {one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: interrupted (no checkpoint saved since the last one)", file=sys.stderr, flush=True)
        return 130
    return 0


def _status(exc: SystemExit, debug: bool, sources: Optional[dict[str, str]] = None) -> int:
    """The exit status of a ``SystemExit``; a message in it is printed as one line (status 2), with
    the flags in it that came from ``--config`` (``sources``) named as the file's."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    if debug:
        traceback.print_exc()
    message = config_note(one_line(Exception(exc.code)), sources or {})
    prefix = f"{PROG}: "
    print(message if message.startswith(prefix) else prefix + message, file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
