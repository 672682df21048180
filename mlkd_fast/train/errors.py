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

__all__ = ["UserError", "InputError", "MissingInputError", "MissingDependencyError", "CorruptImageError",
           "one_line"]


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
