"""The teacher cache: the frozen teacher's outputs on exactly the views training draws, paid once.

``mlkd-cache`` (:mod:`.writer`; also ``python -m mlkd_fast.cache``; from Python :func:`main`, which
returns the manifest) runs the teacher over every (epoch, sample) view that E epochs of
``mlkd-train`` draw and writes a folder::

    DIR/manifest.json            what the cache is of (written first, checked on resume and by training)
    DIR/e0000-s00000.pt ...      one shard per (epoch, block of positions in the epoch's order)

``mlkd-train --teacher-cache DIR`` (:mod:`.reader`) then trains without a teacher network: the data
pipeline replays the same views (the augmentation is a function of seed, epoch and sample index:
data.augment_params, data.keyed_crop_params), checks that the views it draws are the stored ones,
and hands the stored outputs to the method (``Distillation(..., teacher_outputs=...)``).

The package: :mod:`.format` (names, the field table, shards on disk), :mod:`.checks` (every
refusal), :mod:`.inputs` (the training data and device a cache is made of), :mod:`.writer`,
:mod:`.reader`, and :mod:`._trainer_glue` (the writer's one way into the trainer).

Shards. Shard ``k`` of epoch ``e`` holds the positions ``[k S, (k + 1) S)`` of ``epoch_order(n, seed,
e)`` (S = ``--shard-size``, a multiple of the teacher batch): training reads an epoch's shards in
order, whatever its batch size or number of processes, and with the same per-process batch as the
cache's teacher batch its teacher batches are training's own batches (CPU results bit for bit).
Each shard is a ``torch.save`` dict, written atomically (temp file, fsync, rename) and carrying the
sha256 of its tensors: the fields of :data:`.format.FIELDS` that the manifest switches on.
``index`` (int32, the sample at each position), ``valid`` (bool: False for an undecodable image),
``aug`` (int32 (m, P): the view's parameters, ``(top, left, flipped)`` for the in-memory sets,
``(top, left, height, width, flipped)`` for folders), and per view (``--rotations``: V = 1 or 4,
view-major as training batches them) either ``logits`` (m, V, C) or ``topk_values`` (m, V, k),
``topk_indices`` (int32) and ``rest_lse`` (fp32: the log-sum-exp of the C - k other logits), and
with ``--features`` ``feats`` (m, V, D), the pooled pre-logit features.

Top-k rebuild. The full logits are rebuilt as the k stored logits at their classes and ``rest_lse -
log(C - k)`` at every other class: at temperature 1 the softmax gives the top k classes their exact
probabilities and the rest's exact total mass, spread uniformly over the C - k others. At T != 1
the top k keep their exact ratios, but the rest's tempered mass is that of C - k equal logits: an
upper bound at T > 1 (the true rest is less flat), a lower bound at T < 1 (power-mean inequality);
the cache stores no temperature, so the same cache serves every T.
"""
from __future__ import annotations

from typing import Any

from .checks import read_shard
from .format import (DTYPES, FIELDS, FORMAT, FORMAT_VERSION, MANIFEST, SHARD_NAME, Field, rebuild_logits, shard_layout,
                     shard_path, shard_span, write_shard)
from .reader import CachedSource, TeacherCache

# The writer's names are loaded on first use: importing the reader side (the trainer does, through
# mlkd_fast.train.replay) must not import the writer, which reaches into the trainer.
_WRITER_NAMES = ("PROG", "USAGE", "check_cache_out", "cli", "create", "main", "parse_cache_args")

__all__ = ["CachedSource", "DTYPES", "FIELDS", "FORMAT", "FORMAT_VERSION", "Field", "MANIFEST", "SHARD_NAME",
           "TeacherCache", "read_shard", "rebuild_logits", "shard_layout", "shard_path", "shard_span", "write_shard",
           *_WRITER_NAMES]


def __getattr__(name: str) -> Any:
    if name in _WRITER_NAMES:
        from . import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
