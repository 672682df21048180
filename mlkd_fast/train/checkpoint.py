"""Atomic checkpoints and the random-number state that makes ``--resume`` exact."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from typing import Any, BinaryIO, Callable

import torch

from .errors import InputError, MissingInputError


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# read once, at import (in the main thread): os.umask can only be read by setting it, which would race
# with files created by other threads (the teacher cache writes its shards from a thread)
_UMASK = _read_umask()


def file_mode() -> int:
    """The permissions of a new file under the process's umask (0644 under the usual 022), which
    ``tempfile.mkstemp`` does not give (it always creates 0600)."""
    return 0o666 & ~_UMASK


def atomic_write(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Writes ``path`` with ``write(file)`` through a temp file in the same folder, then renames: a crash never leaves a torn file.
    The file gets ordinary permissions (:func:`file_mode`), not the temp file's private 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- the output folder ------------------------------------------------------------------------
# What makes a folder a run of mlkd-train (any of these) or a teacher cache of mlkd-cache
RUN_FILES = ("summary.json", "checkpoint.pt", "config.json", "metrics.jsonl", "steps.jsonl", "student.pt",
             "teacher.pt")
CACHE_FILES = ("manifest.json",)


_atomic_write = atomic_write  # the older name


def present(folder: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` exist in ``folder``."""
    return [n for n in names if os.path.exists(os.path.join(folder, n))]


def check_writable(path: str, flag: str = "--out") -> None:
    """Refuses (InputError, one line) an output folder that is an existing file, or that cannot be
    created or written (its nearest existing parent is a file, or not writable): checked by creating
    an unnamed temporary file, which leaves nothing behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path!r} is an existing file, not a folder: give a folder path")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{flag} {path!r} cannot be created: {parent!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        what = "written in" if parent == os.path.abspath(path) else "created in"
        raise InputError(f"{flag} {path!r} cannot be {what} {parent!r}: {exc.strerror or exc}") from None


def aside_path(path: str) -> str:
    """Where :func:`move_aside` puts ``path``: ``<path>.old-<local time>`` (``-2``, ``-3``... if taken)."""
    base = f"{os.path.normpath(path)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = base, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def move_aside(path: str) -> str:
    """Renames the folder ``path`` to :func:`aside_path` (nothing is deleted); returns the new path."""
    target = aside_path(path)
    os.rename(path, target)
    return target


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None: strict JSON has no such
    numbers (``json.dumps`` would write ``NaN``, which strict parsers refuse), and null says "no value"."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`strict_json` (``allow_nan=False``: a NaN that slipped through is an error)."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def write_json_atomic(path: str, obj: dict) -> None:
    """``obj`` as strict, indented JSON at ``path``, written atomically."""
    atomic_write(path, lambda f: f.write((dumps_strict(obj, indent=2) + "\n").encode()))


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


_CHECKPOINT_KEYS = ("phase", "epoch", "step", "model", "optimizer", "scheduler", "rng")


def read_torch_file(path: str, weights_only: bool) -> Any:
    """``torch.load`` onto the CPU; a file that cannot be read (cut short by a full disk or a copy,
    overwritten, not a PyTorch file) raises a ValueError naming it instead of an archive error."""
    if not os.path.isfile(path):
        raise MissingInputError(f"no such file: {path!r}")
    try:
        if weights_only:  # RepDistiller's checkpoints also pickle their run's argparse.Namespace ("opt")
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # zip, unpickling and EOF errors alike: the file is unusable
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InputError(f"{path!r} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                         f"{type(exc).__name__}: {reason}") from exc


def load_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` for ``--resume``, with a clear error naming
    ``path`` when it is missing, unreadable or not an mlkd-train checkpoint."""
    if not os.path.isfile(path):
        raise MissingInputError(f"no checkpoint to resume from at {path!r}")
    state = read_torch_file(path, weights_only=False)
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise InputError(f"{path!r} is not an mlkd-train checkpoint (it lacks {', '.join(missing)}); "
                         f"remove it or start without --resume")
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
