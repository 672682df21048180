"""Everything that refuses a teacher cache, each refusal one error naming what differs or is wrong:
a manifest of other settings (:func:`differences`), a damaged shard (:func:`read_shard`), a method the
cache cannot serve (:func:`check_method`), stored views other than the ones training draws
(:func:`view_mismatch`)."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..errors import InputError, MissingInputError
from .format import Manifest, load_shard, shard_hash, shard_layout, shard_span

# manifest fields that do not make another cache: informational, or filled in after the first write
NOT_COMPARED = ("created", "library_version", "teacher.weights", "teacher.top1", "teacher.top5", "data.root",
                "teacher.device", "teacher.precision")


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------
def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("spec", "stages"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v))  # tuples as lists, as stored


def differences(stored: Manifest, wanted: Mapping[str, Any], keys: Optional[Sequence[str]] = None) -> list[str]:
    """``"<field> is <a> in the cache but <b> in this run"`` for each compared field (dotted, e.g.
    ``logits.dtype``; ``keys``: only these) where ``wanted`` differs from the stored manifest."""
    a, b = _flat(stored), _flat(wanted)
    keys = keys if keys is not None else sorted(set(a) | set(b))
    return [f"{k} is {a.get(k)!r} in the cache but {b.get(k)!r} in this run" for k in keys
            if k not in NOT_COMPARED and _norm(a.get(k)) != _norm(b.get(k))]


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------
def shard_problem(state: Any, manifest: Manifest, epoch: int, shard: int) -> Optional[str]:
    """What is wrong with a loaded shard against the manifest (its position, each field's shape and
    dtype, its checksum), or None."""
    start, stop = shard_span(manifest, shard)
    if not isinstance(state, dict):
        return "not a shard"
    if (state.get("epoch"), state.get("shard"), state.get("start"), state.get("count")) != (epoch, shard, start,
                                                                                           stop - start):
        return (f"it holds epoch {state.get('epoch')} shard {state.get('shard')} (positions from "
                f"{state.get('start')}, {state.get('count')} samples), not epoch {epoch} shard {shard} ({start}.."
                f"{stop - 1})")
    for name, (shape, dtype) in shard_layout(manifest, stop - start).items():
        t = state.get(name)
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else "none"
            return f"its {name} is {got}, the manifest says {shape} {dtype}"
    if state.get("sha256") != shard_hash(state):
        return "its checksum does not match its contents"
    return None


def read_shard(path: str, manifest: Manifest, epoch: int, shard: int) -> dict[str, Any]:
    """A shard, checked against the manifest (position, shapes, dtypes) and its sha256; an error naming
    the file when it is missing, truncated or corrupt."""
    if not os.path.isfile(path):
        raise MissingInputError(f"teacher cache shard {path!r} is missing: the cache is incomplete (run its mlkd-cache "
                                f"command again with --resume to finish it)")
    try:
        state = load_shard(path)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InputError(f"teacher cache shard {path!r} is unreadable (truncated or corrupt: {type(exc).__name__}: "
                         f"{reason}); delete it and run the mlkd-cache command again with --resume to rewrite "
                         f"it") from exc
    problem = shard_problem(state, manifest, epoch, shard)
    if problem:
        raise InputError(f"teacher cache shard {path!r} is corrupt: {problem}; delete it and run the mlkd-cache "
                         f"command again with --resume to rewrite it")
    return state


def view_mismatch(path: str, epoch: int, index: Tensor, stored: Tensor, drawn: Tensor,
                  params: Sequence[str]) -> Optional[InputError]:
    """The error for stored views (``stored``, (n, P) int32) other than the ones this run draws for the
    samples ``index`` (``drawn``), naming the shard and the first differing sample; None when equal."""
    drawn = drawn.to(torch.int32)
    if torch.equal(stored, drawn):
        return None
    i = int((stored != drawn).any(1).nonzero()[0])
    return InputError(f"teacher cache shard {path!r}: sample {int(index[i])} of epoch {epoch + 1} was cached with "
                      f"the view {stored[i].tolist()} but this run draws {drawn[i].tolist()} ({', '.join(params)}): "
                      f"another augmentation")


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------
def check_method(folder: str, has_features: bool, distiller: Any, method: str) -> None:
    """Refuses, from its traits (``distiller.needs``), a method the cache cannot serve: one that reads
    the teacher's stage maps, runs the teacher on samples it makes, or needs pooled features the cache
    lacks (:mod:`.serves` lists the registry's methods by the same rule)."""
    needs = distiller.needs
    where = f"--teacher-cache {folder!r}"
    if needs.teacher_stages:
        raise InputError(f"{where}: --method {method} reads the teacher's stage maps ({', '.join(needs.teacher_stages)}), "
                         f"which a teacher cache does not hold (logits and pooled features only): distil it from "
                         f"a live teacher (--teacher-weights)")
    if "teacher_fn" in needs.context:
        raise InputError(f"{where}: --method {method} runs the teacher on samples it makes during training, which "
                         f"a cache of the training views cannot answer: distil it from a live teacher "
                         f"(--teacher-weights)")
    if needs.feats and not has_features:
        raise InputError(f"{where}: --method {method} reads the teacher's pooled features, which this cache does "
                         f"not hold: make it with mlkd-cache --features")
