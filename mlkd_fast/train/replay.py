"""The teacher cache's format and its replay in training (``mlkd-train --teacher-cache DIR``).

The format (the manifest, the shards, the top-k rebuild) is described in :mod:`.cache`, which
writes caches; this module reads them: :class:`TeacherCache` opens a folder and checks it against a
run (teacher, data, augmentation, seed, views, epochs: an error naming each field that differs) and
against a method's traits (:meth:`TeacherCache.check_method`), :func:`read_shard` checks each shard
(position, shapes, dtypes, sha256: an error naming the file), and :class:`CachedSource` replays it:
the training source's own batches, their views checked against the stored ones, with the stored
teacher outputs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from .._hashing import file_sha256  # noqa: F401 - also read as replay.file_sha256 by the cache writer
from ..methods import Outputs
from ..methods.base import ModelSpec
from . import data as D
from .checkpoint import _atomic_write
from .errors import InputError, MissingInputError

FORMAT = "mlkd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_NAME = "e{epoch:04d}-s{shard:05d}.pt"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# What a cache is of: the manifest
# --------------------------------------------------------------------------------------------


def _tensor_bytes(t: Tensor):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def data_identity(run) -> dict[str, Any]:
    """The training set of a run as the manifest names it: kind, root, a hash of its tensors (in-memory
    sets: images and labels after --imbalance / --label-noise) or of its file list (folders: paths
    relative to train/ and labels), its size, classes, input shape and the settings that made it."""
    a = run.args
    h = hashlib.sha256()
    if isinstance(run.train, D.MemorySource):
        h.update(str(tuple(run.train.x.shape)).encode() + str(run.train.x.dtype).encode())
        h.update(_tensor_bytes(run.train.x))
        h.update(_tensor_bytes(run.train.y.to(torch.int64)))
        hashed = "training tensors (images and labels)"
    else:
        train_root = os.path.join(a.data, "train")
        for path, label in run.train.samples:
            h.update(f"{os.path.relpath(path, train_root)}\t{label}\n".encode())
        hashed = "file list (paths relative to train/, labels)"
    return {"kind": a.data_kind, "root": a.data_path if a.data_kind in D.CIFAR_KINDS else
            (None if a.data_kind in ("digits", "mnist5k") else os.path.abspath(a.data)),
            "sha256": h.hexdigest(), "hashed": hashed, "num_samples": run.train_size,
            "num_classes": run.num_classes, "input_shape": list(run.input_shape()),
            "label_noise": a.label_noise, "noise_type": a.noise_type if a.label_noise > 0 else None,
            "imbalance": a.imbalance, "train_per_class": a.train_per_class,
            "val_fraction": getattr(a, "val_fraction", 0.0)}


def _spec_json(spec: ModelSpec) -> dict[str, Any]:
    d = asdict(spec)
    d["stages"] = {k: list(v) for k, v in spec.stages.items()}
    d["input_shape"] = list(spec.input_shape)
    return d


def spec_from_json(d: dict[str, Any]) -> ModelSpec:
    return ModelSpec(num_classes=int(d["num_classes"]), feature_dim=int(d["feature_dim"]),
                     stages={k: tuple(v) for k, v in d.get("stages", {}).items()},
                     input_shape=tuple(d.get("input_shape", ())), feature_module=d.get("feature_module"),
                     stage_note=d.get("stage_note", ""))


# manifest fields that do not make another cache: informational, or filled in after the first write
_NOT_COMPARED = ("created", "library_version", "teacher.weights", "teacher.top1", "teacher.top5", "data.root",
                 "teacher.device", "teacher.precision")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("spec", "stages"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _differences(stored: dict[str, Any], wanted: dict[str, Any], keys: Optional[Sequence[str]] = None) -> list[str]:
    a, b = _flat(stored), _flat(wanted)
    keys = keys if keys is not None else sorted(set(a) | set(b))
    return [f"{k} is {a.get(k)!r} in the cache but {b.get(k)!r} in this run" for k in keys
            if k not in _NOT_COMPARED and _norm(a.get(k)) != _norm(b.get(k))]


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v))  # tuples as lists, as stored


def _library_version() -> str:
    from .. import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------
def _shard_hash(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(str(tuple(tensors[name].shape)).encode() + str(tensors[name].dtype).encode())
        h.update(_tensor_bytes(tensors[name]))
    return h.hexdigest()


_SHARD_TENSORS = ("index", "valid", "aug", "logits", "topk_values", "topk_indices", "rest_lse", "feats")


def shard_layout(manifest: dict[str, Any], count: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors a shard of ``count`` samples holds: name -> (shape, dtype)."""
    v, c = manifest["rotations"], manifest["data"]["num_classes"]
    lg, feats = manifest["logits"], manifest["features"]
    layout = {"index": ((count,), torch.int32), "valid": ((count,), torch.bool),
              "aug": ((count, len(manifest["augmentation"]["params"])), torch.int32)}
    if lg["top_k"] is None:
        layout["logits"] = ((count, v, c), DTYPES[lg["dtype"]])
    else:
        k = lg["top_k"]
        layout.update(topk_values=((count, v, k), DTYPES[lg["dtype"]]), topk_indices=((count, v, k), torch.int32),
                      rest_lse=((count, v), torch.float32))
    if feats is not None:
        layout["feats"] = ((count, v, feats["dim"]), DTYPES[feats["dtype"]])
    return layout


def shard_path(folder: str, epoch: int, shard: int) -> str:
    return os.path.join(folder, SHARD_NAME.format(epoch=epoch, shard=shard))


def shard_span(manifest: dict[str, Any], shard: int) -> tuple[int, int]:
    size, n = manifest["shards"]["size"], manifest["data"]["num_samples"]
    return shard * size, min(n, (shard + 1) * size)


def read_shard(path: str, manifest: dict[str, Any], epoch: int, shard: int) -> dict[str, Any]:
    """A shard, checked against the manifest (position, shapes, dtypes) and its sha256; an error naming
    the file when it is missing, truncated or corrupt."""
    if not os.path.isfile(path):
        raise MissingInputError(f"teacher cache shard {path!r} is missing: the cache is incomplete (run its mlkd-cache "
                                f"command again with --resume to finish it)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InputError(f"teacher cache shard {path!r} is unreadable (truncated or corrupt: {type(exc).__name__}: "
                         f"{reason}); delete it and run the mlkd-cache command again with --resume to rewrite "
                         f"it") from exc
    start, stop = shard_span(manifest, shard)
    problem = None
    if not isinstance(state, dict):
        problem = "not a shard"
    elif (state.get("epoch"), state.get("shard"), state.get("start"), state.get("count")) != (epoch, shard, start,
                                                                                              stop - start):
        problem = (f"it holds epoch {state.get('epoch')} shard {state.get('shard')} (positions from "
                   f"{state.get('start')}, {state.get('count')} samples), not epoch {epoch} shard {shard} ({start}.."
                   f"{stop - 1})")
    else:
        for name, (shape, dtype) in shard_layout(manifest, stop - start).items():
            t = state.get(name)
            if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else "none"
                problem = f"its {name} is {got}, the manifest says {shape} {dtype}"
                break
        else:
            tensors = {k: state[k] for k in _SHARD_TENSORS if k in state}
            if state.get("sha256") != _shard_hash(tensors):
                problem = "its checksum does not match its contents"
    if problem:
        raise InputError(f"teacher cache shard {path!r} is corrupt: {problem}; delete it and run the mlkd-cache "
                         f"command again with --resume to rewrite it")
    return state


def _write_shard(path: str, state: dict[str, Any]) -> None:
    tensors = {k: state[k] for k in _SHARD_TENSORS if k in state}
    state["sha256"] = _shard_hash(tensors)
    _atomic_write(path, lambda f: torch.save(state, f))


def _read_manifest(path: str) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------
# Reading: mlkd-train --teacher-cache
# --------------------------------------------------------------------------------------------
class TeacherCache:
    """A cache folder opened for training: its manifest, the checks against a run, its shards."""

    def __init__(self, folder: str, manifest: dict[str, Any]) -> None:
        self.folder, self.manifest = folder, manifest
        self.teacher_spec = spec_from_json(manifest["teacher"]["spec"])
        self.epochs = int(manifest["epochs"])
        self.views = int(manifest["rotations"])
        self.has_features = manifest["features"] is not None

    @classmethod
    def open(cls, folder: str) -> "TeacherCache":
        if not os.path.isdir(folder):
            raise MissingInputError(f"--teacher-cache {folder!r}: no such folder (make one with mlkd-cache)")
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            raise MissingInputError(f"--teacher-cache {folder!r}: no {MANIFEST} in it (not a teacher cache; make one "
                                    f"with mlkd-cache)")
        cache = cls(folder, _read_manifest(path))
        m = cache.manifest["shards"]
        missing = [shard_path(folder, e, k) for e in range(cache.epochs) for k in range(m["per_epoch"])
                   if not os.path.isfile(shard_path(folder, e, k))]
        if missing:
            raise InputError(f"--teacher-cache {folder!r} is incomplete: {len(missing)} of {m['count']} shards missing "
                             f"(the first: {os.path.basename(missing[0])}); run its mlkd-cache command again with "
                             f"--resume to finish it")
        return cache

    @property
    def teacher_arch(self) -> str:
        return self.manifest["teacher"]["arch"]

    def check_run(self, run) -> None:
        """Refuses a cache of another teacher, data, augmentation, seed or view count than ``run``'s,
        naming each field and both values; and a run of more epochs than cached (without --cache-wrap)."""
        a = run.args
        wanted: dict[str, Any] = {"data": data_identity(run), "augmentation": run.train.augmentation(), "seed": a.seed}
        keys = [f"data.{k}" for k in wanted["data"] if k not in ("root", "hashed", "sha256")] + ["data.sha256"]
        keys += [f"augmentation.{k}" for k in sorted(set(wanted["augmentation"]) | set(self.manifest["augmentation"]))]
        keys.append("seed")
        if a.teacher_arch is not None:
            wanted["teacher"] = {"arch": a.teacher_arch}
            keys.append("teacher.arch")
        if a.teacher_weights is not None:
            wanted.setdefault("teacher", {})["weights_sha256"] = file_sha256(a.teacher_weights)
            keys.append("teacher.weights_sha256")
        differ = _differences(self.manifest, wanted, keys)
        if a.rotations > self.views:
            differ.append(f"rotations is {self.views} in the cache but {a.rotations} in this run (a cache of more "
                          f"views serves fewer, not the reverse)")
        if differ:
            raise InputError(f"--teacher-cache {self.folder!r} is not of this run: {'; '.join(differ)} (its "
                             f"{MANIFEST}). Make a cache with this run's settings, or train with the cache's")
        if a.epochs > self.epochs and not a.cache_wrap:
            raise InputError(f"--teacher-cache {self.folder!r} holds {self.epochs} epoch(s) of views, fewer than --epochs "
                             f"{a.epochs}: make it with mlkd-cache --epochs {a.epochs}, or add --cache-wrap to replay "
                             f"epoch e mod {self.epochs}")

    def check_method(self, distiller, method: str) -> None:
        """Refuses, from its traits, a method the cache cannot serve: one that reads the teacher's stage
        maps, runs the teacher on samples it makes, or needs pooled features the cache lacks."""
        needs = distiller.needs
        where = f"--teacher-cache {self.folder!r}"
        if needs.teacher_stages:
            raise InputError(f"{where}: --method {method} reads the teacher's stage maps ({', '.join(needs.teacher_stages)}), "
                             f"which a teacher cache does not hold (logits and pooled features only): distil it from "
                             f"a live teacher (--teacher-weights)")
        if "teacher_fn" in needs.context:
            raise InputError(f"{where}: --method {method} runs the teacher on samples it makes during training, which "
                             f"a cache of the training views cannot answer: distil it from a live teacher "
                             f"(--teacher-weights)")
        if needs.feats and not self.has_features:
            raise InputError(f"{where}: --method {method} reads the teacher's pooled features, which this cache does "
                             f"not hold: make it with mlkd-cache --features")

    def shard(self, epoch: int, k: int) -> dict[str, Any]:
        return read_shard(shard_path(self.folder, epoch, k), self.manifest, epoch, k)


def rebuild_logits(values: Tensor, indices: Tensor, rest_lse: Tensor, num_classes: int) -> Tensor:
    """Full logits from a top-k record (:mod:`.cache` and docs/design.md §8.3): the k values at their classes,
    ``rest_lse - log(C - k)`` elsewhere, in fp32."""
    k = values.shape[-1]
    fill = (rest_lse.float() - math.log(num_classes - k)).unsqueeze(-1)
    full = fill.expand(*values.shape[:-1], num_classes).clone()
    return full.scatter_(-1, indices.long(), values.float())


_OUTPUT_TENSORS = ("logits", "topk_values", "topk_indices", "rest_lse", "feats")


class CachedSource:
    """A training source replaying a teacher cache: the batches of ``base`` (the same views, checked
    against the stored ones batch by batch) with the stored teacher outputs, ``(x, y, index, Outputs)``
    (``yields_teacher_outputs``: the loop passes them to the Distillation). With ``wrap``, epoch e
    replays the cache's epoch e mod E."""

    yields_teacher_outputs = True

    def __init__(self, base, cache: TeacherCache, device: torch.device, views: int, wrap: bool = False) -> None:
        self.base, self.cache, self.device, self.views, self.wrap = base, cache, device, views, wrap
        m = cache.manifest
        self.n, self.size, self.per_epoch = m["data"]["num_samples"], m["shards"]["size"], m["shards"]["per_epoch"]
        self.num_classes = m["data"]["num_classes"]
        self.top_k = m["logits"]["top_k"]
        self._loaded: dict[tuple[int, int], Any] = {}
        self._pool = ThreadPoolExecutor(1)  # reads the next shard while this one trains

    @property
    def corrupt(self) -> int:
        return self.base.corrupt

    def steps_per_epoch(self) -> int:
        return self.base.steps_per_epoch()

    def _shard(self, epoch: int, k: int) -> dict[str, Any]:
        """Shard k of a cached epoch, read (and checked) in the background while the one before it
        trains; the next one, across the epoch's end too, is queued at once."""
        key = (epoch, k)
        if key not in self._loaded:
            self._loaded[key] = self._pool.submit(self.cache.shard, epoch, k)
        state = self._loaded[key].result()
        if k + 1 < self.per_epoch:
            nxt: Optional[tuple[int, int]] = (epoch, k + 1)
        else:
            following = (epoch + 1) % self.cache.epochs if self.wrap else epoch + 1
            nxt = (following, 0) if following < self.cache.epochs else None
        if nxt is not None and nxt not in self._loaded:
            self._loaded[nxt] = self._pool.submit(self.cache.shard, *nxt)
        for old in [s for s in self._loaded if s not in (key, nxt)]:
            del self._loaded[old]
        return state

    def epoch(self, epoch: int, start_step: int = 0, with_index: bool = False) -> Iterator[tuple[Any, ...]]:
        cached = epoch % self.cache.epochs if self.wrap else epoch
        if cached >= self.cache.epochs:
            raise InputError(f"--teacher-cache {self.cache.folder!r} holds {self.cache.epochs} epoch(s), not epoch "
                             f"{epoch + 1} (--cache-wrap replays epoch e mod {self.cache.epochs})")
        order = D.epoch_order(self.n, self.cache.manifest["seed"], cached)
        position = torch.empty(self.n, dtype=torch.long)
        position[order] = torch.arange(self.n)
        for x, y, index, (index_cpu, params) in self.base.epoch(cached, start_step, with_index=True, with_params=True):
            yield x, y, index, self._outputs(cached, index_cpu, params, position)

    def _rows(self, epoch: int, k: int, rows: Tensor, index: Tensor, params: Tensor) -> dict[str, Tensor]:
        """The stored outputs of ``rows`` of shard k, after checking that they are of the samples and views
        this run draws there (an error naming the shard otherwise)."""
        state = self._shard(epoch, k)
        path = shard_path(self.cache.folder, epoch, k)
        if not torch.equal(state["index"][rows], index.to(torch.int32)):
            raise InputError(f"teacher cache shard {path!r} holds other samples at these positions of epoch "
                             f"{epoch + 1} than this run draws (another order): the cache is not of this run")
        valid = state["valid"][rows]
        if not bool(valid.all()):
            raise InputError(f"teacher cache shard {path!r} holds no outputs for sample {int(index[~valid][0])} "
                             f"(undecodable when the cache was made, decodable now): make the cache again")
        stored = state["aug"][rows]
        if not torch.equal(stored, params.to(torch.int32)):
            i = int((stored != params.to(torch.int32)).any(1).nonzero()[0])
            raise InputError(f"teacher cache shard {path!r}: sample {int(index[i])} of epoch {epoch + 1} was cached "
                             f"with the view {stored[i].tolist()} but this run draws {params[i].tolist()} "
                             f"({', '.join(self.cache.manifest['augmentation']['params'])}): another augmentation")
        return {name: state[name][rows, :self.views] for name in _OUTPUT_TENSORS if name in state}

    def _outputs(self, epoch: int, index: Tensor, params: Tensor, position: Tensor) -> Outputs:
        pos = position[index]
        shard_of = pos // self.size
        first, last = int(shard_of[0]), int(shard_of[-1])
        if first == last and bool((shard_of == first).all()):  # the usual case: one shard
            got = self._rows(epoch, first, pos - first * self.size, index, params)
        else:  # a batch across shards (positions of a batch are in order: the parts concatenate in it)
            parts: dict[str, list[Tensor]] = {}
            chosen = []
            for k in shard_of.unique().tolist():
                sel = (shard_of == k).nonzero().squeeze(1)
                for name, t in self._rows(epoch, k, pos[sel] - k * self.size, index[sel], params[sel]).items():
                    parts.setdefault(name, []).append(t)
                chosen.append(sel)
            sel = torch.cat(chosen)
            back = torch.empty_like(sel)
            back[sel] = torch.arange(len(sel))
            got = {name: torch.cat(ts)[back] for name, ts in parts.items()}  # the batch's rows in its order
        dev = {name: t.to(self.device, non_blocking=True) for name, t in got.items()}

        def view_major(t: Tensor) -> Tensor:  # (b, V, ...) -> (V * b, ...), as with_rotations batches
            return t.transpose(0, 1).reshape(-1, *t.shape[2:])

        if self.top_k is None:
            logits = view_major(dev["logits"]).float()
        else:
            logits = rebuild_logits(view_major(dev["topk_values"]), view_major(dev["topk_indices"]),
                                    view_major(dev["rest_lse"]), self.num_classes)
        feats = view_major(dev["feats"]).float() if "feats" in dev else None
        return Outputs(logits, feats)
