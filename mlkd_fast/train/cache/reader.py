"""Reading a teacher cache in training (``mlkd-train --teacher-cache DIR``).

:class:`TeacherCache` opens a folder and checks it against a run's data and settings (an error naming
each field that differs) and against a method's traits; :class:`CachedSource` replays it: the training
source's own batches with the stored teacher outputs, each shard verified once against the order and
views this run draws. Training reads the fields the table (:data:`.format.FIELDS`) feeds to an output
slot, decoded by that slot's decoder (:data:`.format.SLOTS`).
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from ...methods import Outputs
from ...methods.base import ModelSpec
from .. import data as D
from ..errors import InputError, MissingInputError
from . import checks
from .format import MANIFEST, SLOTS, fields, read_manifest, shard_path
from .inputs import CacheData


def spec_from_json(d: dict[str, Any]) -> ModelSpec:
    """The teacher's :class:`ModelSpec` as the manifest stores it (:func:`.writer.spec_json`)."""
    return ModelSpec(num_classes=int(d["num_classes"]), feature_dim=int(d["feature_dim"]),
                     stages={k: tuple(v) for k, v in d.get("stages", {}).items()},
                     input_shape=tuple(d.get("input_shape", ())), feature_module=d.get("feature_module"),
                     stage_note=d.get("stage_note", ""))


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
        """The cache in ``folder``: its manifest read and every shard present (errors say how to finish it)."""
        if not os.path.isdir(folder):
            raise MissingInputError(f"--teacher-cache {folder!r}: no such folder (make one with mlkd-cache)")
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            raise MissingInputError(f"--teacher-cache {folder!r}: no {MANIFEST} in it (not a teacher cache; make one "
                                    f"with mlkd-cache)")
        cache = cls(folder, read_manifest(path))
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

    def check_against(self, data: CacheData, seed: int, rotations: int, epochs: int, wrap: bool,
                      teacher_arch: Optional[str] = None, teacher_sha256: Optional[str] = None) -> None:
        """Refuses a cache of another data, augmentation, seed, teacher (where given) or view count than
        a run's, naming each field and both values; and a run of more epochs than cached (unless
        ``wrap``: --cache-wrap)."""
        wanted: dict[str, Any] = {"data": data.identity(), "augmentation": data.augmentation(), "seed": seed}
        keys = [f"data.{k}" for k in wanted["data"] if k not in ("root", "hashed", "sha256")] + ["data.sha256"]
        keys += [f"augmentation.{k}" for k in sorted(set(wanted["augmentation"]) | set(self.manifest["augmentation"]))]
        keys.append("seed")
        if teacher_arch is not None:
            wanted["teacher"] = {"arch": teacher_arch}
            keys.append("teacher.arch")
        if teacher_sha256 is not None:
            wanted.setdefault("teacher", {})["weights_sha256"] = teacher_sha256
            keys.append("teacher.weights_sha256")
        differ = checks.differences(self.manifest, wanted, keys)
        if rotations > self.views:
            differ.append(f"rotations is {self.views} in the cache but {rotations} in this run (a cache of more "
                          f"views serves fewer, not the reverse)")
        if differ:
            raise InputError(f"--teacher-cache {self.folder!r} is not of this run: {'; '.join(differ)} (its "
                             f"{MANIFEST}). Make a cache with this run's settings, or train with the cache's")
        if epochs > self.epochs and not wrap:
            raise InputError(f"--teacher-cache {self.folder!r} holds {self.epochs} epoch(s) of views, fewer than --epochs "
                             f"{epochs}: make it with mlkd-cache --epochs {epochs}, or add --cache-wrap to replay "
                             f"epoch e mod {self.epochs}")

    def check_method(self, distiller, method: str) -> None:
        """Refuses, from its traits, a method the cache cannot serve (:func:`.checks.check_method`)."""
        checks.check_method(self.folder, self.has_features, distiller, method)

    def nbytes(self) -> int:
        """The size of its shard files together, in bytes."""
        per_epoch = self.manifest["shards"]["per_epoch"]
        return sum(os.path.getsize(shard_path(self.folder, e, k)) for e in range(self.epochs) for k in range(per_epoch))

    def shard(self, epoch: int, k: int) -> dict[str, Any]:
        """Shard k of a cached epoch, read and checked (:func:`.checks.read_shard`)."""
        return checks.read_shard(shard_path(self.folder, epoch, k), self.manifest, epoch, k)


@dataclass
class _Shard:
    """A shard read and verified (when the replay was built, or read in the background and verified on
    its first use): its tensors, the error its first use raises (samples of another order, views of
    another augmentation), whether every sample in it has outputs, whether its views were checked as a
    whole (then a batch's are not), and its slots decoded whole where that is a view of its tensors (one
    view, stored as training reads it: a batch is then one slice per slot), else None."""

    state: dict[str, Any]
    start: int
    path: str
    error: Optional[InputError]
    all_valid: bool
    views_checked: bool
    slots: Optional[dict[str, Tensor]] = None


#: the largest cache (its shard files together) that a :class:`CachedSource` reads whole when it is built
PRELOAD_MAX_BYTES = 256 * 2**20


class CachedSource:
    """A training source replaying a teacher cache: the batches of ``base`` (the same views) with the
    stored teacher outputs, ``(x, y, index, Outputs)`` (``yields_teacher_outputs``: the loop passes them
    to the Distillation). With ``wrap``, epoch e replays the cache's epoch e mod E.

    How it reads: a cache of at most :data:`PRELOAD_MAX_BYTES` on disk (every shard file together) is
    read, checksummed and verified whole when the source is built, so that an epoch of it reads no file
    (a shard read is ~0.4 ms of Python holding the interpreter lock, which a background thread takes
    from the training steps: 6% of a digits epoch on a 2-core CPU); a shard's error still surfaces on
    its first use, as when streaming. A larger cache streams: each shard read and checksummed in the
    background while the one before it trains.

    What is checked, and when: each shard once, before its first use (its samples are the epoch order's
    at its positions; where the base source's views are a function of (seed, epoch, index) alone,
    ``base.epoch_params(epoch)`` as in the in-memory sets, its stored views are those drawn; whether
    every sample has outputs). A batch of an in-memory set (consecutive positions of the
    epoch order, which is compared with the cache's once per epoch) then costs slices of the stored
    tensors (no copy on CPU); any other batch a position lookup and slices or a gather. Views
    drawn by the loader workers (folders: they depend on each image's size) and samples that had no
    outputs when cached are checked batch by batch."""

    yields_teacher_outputs = True

    def __init__(self, base, cache: TeacherCache, device: torch.device, views: int, wrap: bool = False) -> None:
        self.base, self.cache, self.device, self.views, self.wrap = base, cache, device, views, wrap
        m = cache.manifest
        self.n, self.size, self.per_epoch = m["data"]["num_samples"], m["shards"]["size"], m["shards"]["per_epoch"]
        self.fed = tuple(f for f in fields(m) if f.slot is not None)  # the fields training reads
        self.slots = tuple(dict.fromkeys(f.slot for f in self.fed))
        self.view_params = m["augmentation"]["params"]
        # the views of an epoch without its images: the in-memory sets' (seed, epoch, index) -> crop and flip
        self._epoch_params = getattr(base, "epoch_params", None)
        self._loaded: dict[tuple[int, int], Future] = {}
        self._current: Optional[tuple[tuple[int, int], _Shard]] = None
        self._orders: dict[int, Tensor] = {}
        self._pool = ThreadPoolExecutor(1)  # reads the next shard while this one trains (no torch compute there)
        # (epoch, shard) -> the shard verified, or the error reading it raised (raised again on first use)
        self._held: dict[tuple[int, int], Any] = {}
        try:
            small = cache.nbytes() <= PRELOAD_MAX_BYTES
        except OSError:  # a shard gone since the cache was opened: streamed, its error raised where it is read
            small = False
        if small:
            for e in range(cache.epochs):
                for k in range(self.per_epoch):
                    try:
                        self._held[(e, k)] = self._verify(e, k, cache.shard(e, k))
                    except (InputError, MissingInputError) as exc:
                        self._held[(e, k)] = exc

    @property
    def corrupt(self) -> int:
        return self.base.corrupt

    def steps_per_epoch(self) -> int:
        return self.base.steps_per_epoch()

    def _order(self, epoch: int) -> Tensor:
        """The cached epoch's order (the last two kept: a batch's epoch and the shard verified ahead of it)."""
        if epoch not in self._orders:
            if len(self._orders) > 1:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = D.epoch_order(self.n, self.cache.manifest["seed"], epoch)
        return self._orders[epoch]

    def _verify(self, epoch: int, k: int, state: dict[str, Any]) -> _Shard:
        """Shard k of a cached epoch verified against this run's order and, where the source can say them
        without the images, its views. On the training thread, once per shard: torch ops on the reading
        thread would start a second OpenMP team beside training's, whose spinning workers slowed a
        2-core CPU's steps 2.6x (measured on digits)."""
        start = state["start"]
        path = shard_path(self.cache.folder, epoch, k)
        index = state["index"]
        error = None
        if not torch.equal(index, self._order(epoch)[start:start + state["count"]].to(torch.int32)):
            error = InputError(f"teacher cache shard {path!r} holds other samples at these positions of epoch "
                               f"{epoch + 1} than this run draws (another order): the cache is not of this run")
        valid = state["valid"]
        views_checked = self._epoch_params is not None
        if error is None and views_checked:
            sample = index[valid].long()
            error = checks.view_mismatch(path, epoch, sample, state["aug"][valid], self._epoch_params(epoch)[sample],
                                         self.view_params)
        shard = _Shard(state, start, path, error, bool(valid.all()), views_checked)
        if error is None and shard.all_valid and views_checked and self.views == 1 and self.device.type == "cpu":
            got = {f.name: state[f.name][:, :1] for f in self.fed}
            slots = {slot: SLOTS[slot](got, self.cache.manifest) for slot in self.slots}
            stored = {t.untyped_storage().data_ptr() for t in got.values()}
            if all(t.untyped_storage().data_ptr() in stored for t in slots.values()):  # views: no copy of the shard
                shard.slots = slots
        return shard

    def _shard(self, epoch: int, k: int) -> _Shard:
        """Shard k of a cached epoch (the one of the batch before, mostly); a newly needed one is
        awaited (read and checksummed in the background), verified, its error raised, and the next one,
        across the epoch's end too, queued."""
        key = (epoch, k)
        if self._current is not None and self._current[0] == key:
            return self._current[1]
        held = self._held.get(key)
        if held is not None:
            if isinstance(held, Exception):
                raise held
            if held.error is not None:
                raise held.error
            self._current = (key, held)
            return held
        if key not in self._loaded:
            self._loaded[key] = self._pool.submit(self.cache.shard, epoch, k)
        shard = self._verify(epoch, k, self._loaded[key].result())
        if k + 1 < self.per_epoch:
            nxt: Optional[tuple[int, int]] = (epoch, k + 1)
        else:
            following = (epoch + 1) % self.cache.epochs if self.wrap else epoch + 1
            nxt = (following, 0) if following < self.cache.epochs else None
        if nxt is not None and nxt not in self._loaded:
            self._loaded[nxt] = self._pool.submit(self.cache.shard, *nxt)
        for old in [s for s in self._loaded if s not in (key, nxt)]:
            del self._loaded[old]
        if shard.error is not None:
            raise shard.error
        self._current = (key, shard)
        return shard

    def epoch(self, epoch: int, start_step: int = 0, with_index: bool = False) -> Iterator[tuple[Any, ...]]:
        cached = epoch % self.cache.epochs if self.wrap else epoch
        if cached >= self.cache.epochs:
            raise InputError(f"--teacher-cache {self.cache.folder!r} holds {self.cache.epochs} epoch(s), not epoch "
                             f"{epoch + 1} (--cache-wrap replays epoch e mod {self.cache.epochs})")
        order = self._order(cached)
        if self._epoch_params is not None and hasattr(self.base, "order"):
            # an in-memory set: every batch is the consecutive positions of the epoch order from the one its
            # source names, so one comparison of the orders, here, checks every batch's samples (and each
            # shard's views were checked whole when it was read)
            if not torch.equal(self.base.order(cached), order):
                raise InputError(f"--teacher-cache {self.cache.folder!r}: this run draws epoch {cached + 1}'s samples "
                                 f"in another order than the cache holds: the cache is not of this run")
            for x, y, index, first in self.base.epoch(cached, start_step, with_index=True, with_start=True):
                yield x, y, index, self._outputs_at(cached, first, len(y))
            return
        position = torch.empty(self.n, dtype=torch.long)
        position[order] = torch.arange(self.n)
        for x, y, index, (index_cpu, params) in self.base.epoch(cached, start_step, with_index=True, with_params=True):
            yield x, y, index, self._outputs(cached, index_cpu, params, position, order)

    def batches(self, epoch: int, start_step: int = 0,
                with_index: bool = False) -> Iterator[tuple[Tensor, Tensor, dict[str, Any]]]:
        """The batches of :meth:`epoch` as ``(x, y, extras)`` for a loop that calls the step with
        ``(x, y, **extras)``: ``extras`` holds ``teacher_outputs`` (the stored :class:`Outputs`) and, with
        ``with_index``, ``index`` (the samples' indices on the device)."""
        for x, y, index, outputs in self.epoch(epoch, start_step):
            yield x, y, ({"index": index, "teacher_outputs": outputs} if with_index else {"teacher_outputs": outputs})

    def _rows(self, epoch: int, k: int, rows: Any, index: Optional[Tensor], params: Optional[Tensor]) -> dict[str, Tensor]:
        """The stored outputs of ``rows`` (a slice or positions) of shard k, (b, V, ...), after the checks
        its verification left to the batch (an error naming the shard): the samples' ``index`` and their
        drawn views ``params`` are read only where the shard's views were not checked whole."""
        shard = self._shard(epoch, k)
        state = shard.state  # its samples are the epoch order's at its positions (verified when it was read)
        if not shard.all_valid:
            valid = state["valid"][rows]
            if not bool(valid.all()):
                raise InputError(f"teacher cache shard {shard.path!r} holds no outputs for sample "
                                 f"{int(state['index'][rows][~valid][0])} (undecodable when the cache was made, "
                                 f"decodable now): make the cache again")
        if not shard.views_checked:
            error = checks.view_mismatch(shard.path, epoch, index, state["aug"][rows], params, self.view_params)
            if error is not None:
                raise error
        return {f.name: state[f.name][rows, :self.views] for f in self.fed}

    def _decoded(self, got: dict[str, Tensor]) -> Outputs:
        """The teacher's :class:`Outputs` from the stored fields of a batch, on the training device."""
        if self.device.type != "cpu":
            got = {name: t.to(self.device, non_blocking=True) for name, t in got.items()}
        return Outputs(**{slot: SLOTS[slot](got, self.cache.manifest) for slot in self.slots})

    def _outputs_at(self, epoch: int, first: int, b: int) -> Outputs:
        """The stored outputs of the ``b`` consecutive positions of the epoch order from ``first``: slices
        of one shard (no copy on CPU), or of two where the batch crosses a shard's end."""
        k, last = first // self.size, (first + b - 1) // self.size
        if k == last:
            shard = self._shard(epoch, k)
            if shard.slots is not None:
                a = first - k * self.size
                return Outputs(**{slot: t[a:a + b] for slot, t in shard.slots.items()})
        parts = [self._rows(epoch, j, slice(max(first, j * self.size) - j * self.size,
                                            min(first + b, (j + 1) * self.size) - j * self.size), None, None)
                 for j in range(k, last + 1)]
        return self._decoded(parts[0] if len(parts) == 1 else
                             {name: torch.cat([p[name] for p in parts]) for name in parts[0]})

    def _outputs(self, epoch: int, index: Tensor, params: Tensor, position: Tensor, order: Tensor) -> Outputs:
        b = len(index)
        first = int(position[index[0]])
        k = first // self.size
        if (first + b - 1) // self.size == k and torch.equal(index, order[first:first + b]):
            # the usual batch: consecutive positions of one shard (every batch of an in-memory set), as slices
            # (no copy on CPU); the shard's samples are the order's there (verified when it was read)
            got = self._rows(epoch, k, slice(first - k * self.size, first - k * self.size + b), index, params)
        else:  # positions left out (undecodable images), or across shards: gathered, in the batch's order
            pos = position[index]
            shard_of = pos // self.size
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
            got = {name: torch.cat(ts)[back] for name, ts in parts.items()}
        return self._decoded(got)
