"""Atomic checkpoints and the random-number state that makes ``--resume`` exact."""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from typing import Any

import torch

from .errors import InputError, MissingInputError


def _atomic_write(path: str, write) -> None:
    """Writes through a temp file in the same folder, then renames: a crash never leaves a torn file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj: dict) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    _atomic_write(path, lambda f: torch.save(state, f))


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
