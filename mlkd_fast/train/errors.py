"""What ``mlkd-train`` reports as a user error and what as a bug.

The loop's own checks of what the user gave it (flags, folders, images, weights files, checkpoints,
``--resume`` settings) raise the exceptions below. Each is also the builtin type a caller would
expect (``ValueError``, ``FileNotFoundError``, ...), so ``except ValueError`` keeps working, but
only these types (and the ``SystemExit`` of the flag checks) are user errors to the command line:
one line on stderr, exit status 2 (:func:`mlkd_fast.train.__main__.main`). A plain ``ValueError``
or ``RuntimeError``, from torch, from a method or from a bug, is not assumed to be the user's fault:
it keeps its traceback.
"""
from __future__ import annotations

import sys
import traceback
from typing import Any, Callable

__all__ = ["UserError", "InputError", "MissingInputError", "MissingDependencyError", "CorruptImageError",
           "one_line", "exit_status", "system_exit_status"]


class UserError(Exception):
    """Marker of the errors that come from what the user gave the loop, not from the loop itself."""


class InputError(UserError, ValueError):
    """A flag value, a data folder, a weights file or a checkpoint that cannot be used as given."""


class MissingInputError(UserError, FileNotFoundError):
    """A folder or file the user named (data, weights, checkpoint) that does not exist."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a flag needs (torchvision for ``--arch resnet18``, scikit-learn for digits)."""


class CorruptImageError(UserError, RuntimeError):
    """An undecodable image with ``--on-corrupt fail``."""


def one_line(exc: BaseException) -> str:
    """The message of a user error on one line. An error raised in a DataLoader worker arrives as
    ``Caught X in DataLoader worker process 0.`` followed by the worker's traceback, whose last line
    holds the original message: that line is the one kept."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "worker" in lines[0]:
        last = lines[-1]
        name, sep, message = last.partition(": ")
        return message if sep and " " not in name else last
    return " ".join(lines) or type(exc).__name__


def _as_is(message: str) -> str:
    return message


def system_exit_status(exc: SystemExit, prog: str, debug: bool = False,
                       note: Callable[[str], str] = _as_is) -> int:
    """The exit status of a ``SystemExit``: its code when it has one (``--help``: 0; a flag error,
    already printed by the parser: 2); a message in it is a user error, printed as one line
    ``<prog>: <message>`` (``note`` may add to it; a message written for ``mlkd-train`` is shown
    under ``prog``), status 2."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    if debug:
        traceback.print_exc()
    message = note(one_line(Exception(exc.code)))
    for prefix in (f"{prog}: ", "mlkd-train: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
            break
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    return 2


def exit_status(command: Callable[[], Any], prog: str, *, debug: bool = False,
                note: Callable[[str], str] = _as_is, failures: tuple[type[BaseException], ...] = (),
                interrupted: str = "interrupted") -> int:
    """Runs ``command`` and returns the exit status every ``mlkd-*`` command gives its outcome:

    - 0: it finished, or stopped cleanly (a stop it saved state for returns normally);
    - 2: a user error, one line on stderr ``<prog>: <message>`` (``--debug``: the traceback too):
      a ``SystemExit`` with a message (:func:`system_exit_status`) or a :class:`UserError`;
    - 1, one line: one of ``failures`` (what the command computed went wrong, e.g. a non-finite loss);
    - 130: Ctrl-C before anything could be saved (``interrupted`` says what is kept);
    - anything else propagates: Python prints its traceback and exits with 1 (a bug is not the user's).

    ``note`` rewrites a user error's message (``mlkd-train`` names the flags a ``--config`` file set)."""
    try:
        command()
    except SystemExit as exc:
        return system_exit_status(exc, prog, debug, note)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog}: {note(one_line(exc))}", file=sys.stderr, flush=True)
        return 2
    except failures as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog}: {one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: {interrupted}", file=sys.stderr, flush=True)
        return 130
    return 0
