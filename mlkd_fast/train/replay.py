"""The trainer's side of the teacher cache (``mlkd-train --teacher-cache DIR``): the names the run uses,
taking its run object as it is.

The cache lives in :mod:`mlkd_fast.train.cache` (:mod:`~.cache.format`, :mod:`~.cache.checks`,
:mod:`~.cache.reader`, :mod:`~.cache.writer`). This module adapts it to the trainer's
:class:`~.run.Run`, read by attribute (``args``, ``train``, ``train_size``, ``num_classes``,
``input_shape()``); it imports nothing of the trainer, so that the trainer may import it.
"""
from __future__ import annotations

from typing import Any

from .._hashing import file_sha256
from .cache.checks import read_shard
from .cache.format import (DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, SHARD_NAME, rebuild_logits, shard_layout,
                           shard_path, shard_span, write_shard)
from .cache.inputs import CacheData
from .cache.reader import CachedSource
from .cache.reader import TeacherCache as _TeacherCache
from .cache.reader import spec_from_json

__all__ = ["CachedSource", "DTYPES", "FORMAT", "FORMAT_VERSION", "MANIFEST", "SHARD_NAME", "TeacherCache",
           "data_identity", "file_sha256", "read_shard", "rebuild_logits", "shard_layout", "shard_path", "shard_span",
           "spec_from_json", "write_shard"]


def data_identity(run: Any) -> dict[str, Any]:
    """The training set of a run as a cache's manifest names it (:meth:`.cache.inputs.CacheData.identity`);
    its ``sha256`` is also what a checkpoint stores of the data."""
    return CacheData.of_run(run).identity()


class TeacherCache(_TeacherCache):
    """:class:`.cache.reader.TeacherCache` with the check the run calls with itself."""

    def check_run(self, run: Any) -> None:
        """Refuses a cache of another teacher, data, augmentation, seed or view count than ``run``'s,
        naming each field and both values; and a run of more epochs than cached (without --cache-wrap)."""
        a = run.args
        self.check_against(CacheData.of_run(run), a.seed, a.rotations, a.epochs, a.cache_wrap, a.teacher_arch,
                           None if a.teacher_weights is None else file_sha256(a.teacher_weights))
