"""The sha256 of a file, read in 1 MiB blocks: what the teacher caches (images and language models) and
the LM demo record of the files they depend on. Imports nothing of the package."""
from __future__ import annotations

import hashlib


def file_sha256(path: str) -> str:
    """The hex sha256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
