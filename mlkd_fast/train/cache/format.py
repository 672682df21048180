"""The teacher cache's on-disk format: names, the manifest's own fields, and the field table.

Every tensor a shard may hold is one row of :data:`FIELDS` (name, per-sample shape, dtype, the
manifest switch that puts it in a shard, the :class:`~mlkd_fast.methods.Outputs` slot it feeds in
training, and the function producing it from the teacher's outputs). The writer
(:mod:`.writer`) fills the fields a manifest switches on, the checks (:mod:`.checks`) compare a
shard with :func:`shard_layout`, and the reader (:mod:`.reader`) hands each slot's fields to that
slot's decoder in :data:`SLOTS`; none of them names a field. A new field is one row here (with its
producer) and, if it feeds a new slot, one decoder.

Nothing here may change what an existing cache reads as: the layout, the dtypes, the key order of a
shard's dict and the checksum are those of :data:`FORMAT_VERSION` 1 (a fixture made before the
table existed is read in ``tests/test_cache_format.py``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

# an atomic torch.save (temp file, fsync, rename): checkpoint's public one, whatever its name says
from ..checkpoint import save_checkpoint as save_atomic
from ..errors import InputError

FORMAT = "mlkd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_NAME = "e{epoch:04d}-s{shard:05d}.pt"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# a shard's scalar entries, before its tensors (the dict's key order is part of the file's bytes)
SHARD_HEADER = ("format_version", "epoch", "shard", "start", "count")

Manifest = Mapping[str, Any]


# --------------------------------------------------------------------------------------------
# What the producers read: the teacher's outputs on one teacher batch
# --------------------------------------------------------------------------------------------
@dataclass
class TeacherBatch:
    """The teacher's outputs on ``b`` samples, per view: ``logits`` (b, V, C) and ``feats`` (b, V, D)
    in fp32 on the teacher's device (``feats`` None when the cache stores none), and the cache's top k."""

    logits: Tensor
    feats: Optional[Tensor]
    top_k: Optional[int]

    @cached_property
    def topk(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(values, classes, rest_lse)``: the k largest logits, their classes and the log-sum-exp of
        the C - k others (computed once for the three fields that store them)."""
        values, classes = self.logits.topk(self.top_k, dim=-1)
        rest = self.logits.scatter(-1, classes, float("-inf")).logsumexp(-1)
        return values, classes, rest


# --------------------------------------------------------------------------------------------
# The field table
# --------------------------------------------------------------------------------------------
#: when a field is in a shard, by the manifest
SWITCHES: dict[str, Callable[[Manifest], bool]] = {
    "always": lambda m: True,
    "all classes": lambda m: m["logits"]["top_k"] is None,
    "top-k": lambda m: m["logits"]["top_k"] is not None,
    "features": lambda m: m["features"] is not None,
}


def dims(manifest: Manifest) -> dict[str, Optional[int]]:
    """The symbols of the fields' shapes: V views, C classes, k the top k, D the feature width, P the
    view parameters (crop, flip) per sample; None where the manifest has none."""
    features = manifest["features"]
    return {"V": manifest["rotations"], "C": manifest["data"]["num_classes"], "k": manifest["logits"]["top_k"],
            "D": None if features is None else features["dim"], "P": len(manifest["augmentation"]["params"])}


@dataclass(frozen=True)
class Field:
    """One tensor of a shard: ``(count, *shape)`` of ``dtype`` where the manifest ``switch`` is on.

    ``shape``: per-sample dimensions, symbols of :func:`dims`. ``dtype``: a torch dtype, or a
    manifest entry naming one of :data:`DTYPES` (``"logits.dtype"``: the user's choice). ``slot``: the
    :class:`~mlkd_fast.methods.Outputs` field it feeds in training (None: the record of the view, checked
    and not fed; a fed field is per view, ``("V", ...)``, and its slot's decoder in :data:`SLOTS` reads
    it). ``produce``: the stored value (b, *shape) from the teacher's outputs, on the teacher's device
    (None: the writer records it from the data pipeline).

    A new field: one row below with its producer, e.g. ``Field("margin", ("V",), torch.float32,
    "always", None, lambda t: ...)`` (``tests/test_cache_format.py`` writes and checks one); a new
    kind of cache adds a switch, a new output for training a slot decoder."""

    name: str
    shape: tuple[str, ...]
    dtype: Any
    switch: str
    slot: Optional[str]
    produce: Optional[Callable[[TeacherBatch], Tensor]] = None

    def present(self, manifest: Manifest) -> bool:
        """Whether a shard of ``manifest`` holds this field (its switch)."""
        return SWITCHES[self.switch](manifest)

    def torch_dtype(self, manifest: Manifest) -> torch.dtype:
        """The stored dtype under ``manifest``."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        section, _, key = self.dtype.partition(".")
        return DTYPES[manifest[section][key]]


#: every tensor a shard may hold, in the order a shard stores them
FIELDS: tuple[Field, ...] = (
    Field("index", (), torch.int32, "always", None),               # the sample at each position of the epoch
    Field("valid", (), torch.bool, "always", None),                # False: undecodable when cached
    Field("aug", ("P",), torch.int32, "always", None),             # the view: crop / shift and flip
    Field("logits", ("V", "C"), "logits.dtype", "all classes", "logits", lambda t: t.logits),
    Field("topk_values", ("V", "k"), "logits.dtype", "top-k", "logits", lambda t: t.topk[0]),
    Field("topk_indices", ("V", "k"), torch.int32, "top-k", "logits", lambda t: t.topk[1]),
    Field("rest_lse", ("V",), torch.float32, "top-k", "logits", lambda t: t.topk[2]),
    Field("feats", ("V", "D"), "features.dtype", "features", "feats", lambda t: t.feats),
)


def fields(manifest: Manifest) -> tuple[Field, ...]:
    """The fields a shard of this manifest holds, in their stored order (the table is read at each
    call: the writer, the checks and the reader all follow it)."""
    return tuple(f for f in FIELDS if f.present(manifest))


def shard_layout(manifest: Manifest, count: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors a shard of ``count`` samples holds: name -> (shape, dtype)."""
    sizes = dims(manifest)
    return {f.name: ((count, *(sizes[d] for d in f.shape)), f.torch_dtype(manifest)) for f in fields(manifest)}


# --------------------------------------------------------------------------------------------
# The slots: what training reads, decoded from the fields that feed each
# --------------------------------------------------------------------------------------------
def view_major(t: Tensor) -> Tensor:
    """(b, V, ...) -> (V * b, ...): the rows in the order ``data.with_rotations`` batches the views."""
    return t.transpose(0, 1).reshape(-1, *t.shape[2:])


def rebuild_logits(values: Tensor, indices: Tensor, rest_lse: Tensor, num_classes: int) -> Tensor:
    """Full logits from a top-k record (:mod:`mlkd_fast.train.cache` and docs/design.md §8.3): the k values
    at their classes, ``rest_lse - log(C - k)`` elsewhere, in fp32."""
    k = values.shape[-1]
    fill = (rest_lse.float() - math.log(num_classes - k)).unsqueeze(-1)
    full = fill.expand(*values.shape[:-1], num_classes).clone()
    return full.scatter_(-1, indices.long(), values.float())


def _decode_logits(got: Mapping[str, Tensor], manifest: Manifest) -> Tensor:
    if "logits" in got:
        return view_major(got["logits"]).float()
    return rebuild_logits(view_major(got["topk_values"]), view_major(got["topk_indices"]),
                          view_major(got["rest_lse"]), manifest["data"]["num_classes"])


#: slot -> its decoder: the slot's fields (b, V, ...) as read -> the (V * b, ...) fp32 tensor training reads
SLOTS: dict[str, Callable[[Mapping[str, Tensor], Manifest], Tensor]] = {
    "logits": _decode_logits,
    "feats": lambda got, manifest: view_major(got["feats"]).float(),
}


# --------------------------------------------------------------------------------------------
# Shards on disk
# --------------------------------------------------------------------------------------------
def shard_path(folder: str, epoch: int, shard: int) -> str:
    """The file of shard ``shard`` of epoch ``epoch`` in a cache folder."""
    return os.path.join(folder, SHARD_NAME.format(epoch=epoch, shard=shard))


def shard_span(manifest: Manifest, shard: int) -> tuple[int, int]:
    """The positions ``[start, stop)`` of its epoch's order that a shard holds."""
    size, n = manifest["shards"]["size"], manifest["data"]["num_samples"]
    return shard * size, min(n, (shard + 1) * size)


def tensor_bytes(t: Tensor):
    """A tensor's bytes (as a numpy uint8 view of a CPU copy), for hashing."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def shard_hash(state: Mapping[str, Any]) -> str:
    """The sha256 a shard stores of its tensors: each field present, by name, with its shape and dtype."""
    h = hashlib.sha256()
    for name in sorted(f.name for f in FIELDS if f.name in state):
        t = state[name]
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def new_shard(manifest: Manifest, epoch: int, shard: int) -> dict[str, Any]:
    """An empty shard of the manifest: its header and its fields zeroed (``valid`` all False)."""
    start, stop = shard_span(manifest, shard)
    state: dict[str, Any] = dict(zip(SHARD_HEADER, (FORMAT_VERSION, epoch, shard, start, stop - start)))
    for name, (shape, dtype) in shard_layout(manifest, stop - start).items():
        state[name] = torch.zeros(shape, dtype=dtype)
    return state


def write_shard(path: str, state: dict[str, Any]) -> None:
    """Writes a shard atomically (temp file, fsync, rename) with the checksum of its tensors."""
    state["sha256"] = shard_hash(state)
    save_atomic(path, state)


def load_shard(path: str) -> Any:
    """A shard file's contents, unchecked (tensors only: ``weights_only``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------
def read_manifest(path: str) -> dict[str, Any]:
    """A manifest file, refused (an error naming the file) unless of this format and version."""
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path!r} is not a readable teacher-cache manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path!r} is not a teacher-cache manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path!r} is a teacher cache of format version {manifest.get('format_version')}; this "
                         f"library reads version {FORMAT_VERSION}: make it again with this version's mlkd-cache")
    return manifest


def library_version() -> str:
    """This library's version (recorded in a manifest, never compared)."""
    from ... import __version__

    return __version__
