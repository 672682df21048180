"""Writing a teacher cache: ``mlkd-cache`` (also ``python -m mlkd_fast.cache``; from Python :func:`main`,
which returns the manifest).

The writer is built from the training data (:class:`.inputs.CacheData`: the source that draws the
views, its size, classes and identity) and a device setup, both handed over by
:func:`._trainer_glue.writer_setup`; it fills the fields of :data:`.format.FIELDS` that the manifest
switches on, naming none of them. Its parts, in the order :func:`create` runs them: the flags
(:func:`parse_cache_args`), the ``--out`` checks (:func:`check_cache_out`), the manifest
(:func:`new_manifest`, reconciled with a cache being resumed by :func:`settle_manifest`), the shards
left to write (:func:`shards_to_write`), and the teacher pass (:class:`ShardAssembler` fills shards
from teacher batches, :class:`ShardWriter` writes finished ones in the background).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..._hashing import file_sha256
from ...methods.base import ModelSpec
from ...methods.taps import TappedNetwork, model_spec
from .. import data as D
from .. import flags
from ..checkpoint import CACHE_FILES, RUN_FILES, check_writable, move_aside, present, write_json_atomic
from ..data import with_rotations
from ..errors import InputError, UserError, exit_status, one_line
from ..method_lists import cache_feature_methods
from . import _trainer_glue as glue
from ._trainer_glue import writer_setup  # public here: the data, device and teacher of the arguments
from .checks import differences, read_shard
from .format import (DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, SHARD_NAME, Manifest, TeacherBatch, fields,
                     library_version, new_shard, read_manifest, shard_path, shard_span, write_shard)
from .inputs import WriterSetup

PROG = "mlkd-cache"

USAGE = """Run a frozen teacher once over the views E epochs of mlkd-train draw, and store its outputs.

    mlkd-cache --data cifar100:~/data --teacher-arch resnet32x4 --teacher-weights t.pth --epochs 240 \\
        --top-k 10 --logits-dtype fp16 --features --out cache/r32x4
    mlkd-train --data cifar100:~/data --recipe cifar --method dkd --teacher-cache cache/r32x4

The data flags are mlkd-train's (the same training set and views: --data, --seed, --label-noise,
--noise-type, --imbalance, --train-per-class, --rotations, --image-size, --decode); --epochs is the
number of epochs cached; --batch-size is the teacher's forward batch only (mlkd-train's per-process
--batch-size is a good choice: its teacher batches are then training's own). --teacher-weights is
required (a cache of a teacher trained by mlkd-train: its teacher.pt or student.pt). Synthetic data
is refused (random batches: nothing to cache).

Stored per (epoch, sample): the view's crop / shift and flip, the teacher's logits (all classes, or
--top-k K: K values with int32 class indices and the log-sum-exp of the other logits, rebuilding the
full distribution exactly at temperature 1: docs/design.md section 8), with --features the pooled
features; with --rotations 4 the four rotated views' outputs. An existing cache at --out is
refused unless --resume (continue it: complete shards are kept, the manifest is checked) or
--overwrite (move it aside). SIGINT / SIGTERM stop cleanly after the shards finished so far (exit
status 0, as mlkd-train's); --resume continues. Under torchrun each process writes its share of
the shards.
"""


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------
def parse_cache_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The checked arguments of ``mlkd-cache``: mlkd-train's data, teacher and device flags (the same
    functions add them: :func:`~.flags.add_data_arguments`, ...) and the cache's own."""
    p = flags.FlagParser(prog=PROG, description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_version_argument(p)
    flags.add_data_arguments(p)
    g = p.add_argument_group("teacher")
    flags.add_teacher_arguments(g, weights_help="the teacher's state dict (torchvision, timm or mlkd-train .pt), used as "
                                          "it is; required (its sha256 goes into the manifest)")
    g = p.add_argument_group("cache")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="the cache folder (created). An existing cache is refused before anything is written: "
                        "--resume continues it (keeps its complete shards, writes the rest; a larger --epochs grows "
                        "it), --overwrite moves it aside")
    g.add_argument("--resume", action="store_true",
                   help="continue the cache in --out (its manifest must match this command's settings, naming "
                        "each field that differs); without a cache there: start one")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds a cache (or a run): the old folder is moved aside to "
                        "<out>.old-<time> (nothing is deleted), once every check has passed")
    g.add_argument("--epochs", type=int, default=flags.DEFAULTS["epochs"],
                   help="epochs of views to cache: mlkd-train --epochs E reads epochs 0..E-1 (default: %(default)s, "
                        "mlkd-train's; --cache-wrap there reuses fewer)")
    g.add_argument("--batch-size", type=int, default=flags.DEFAULTS["batch_size"],
                   help="the teacher's forward batch (default: %(default)s, mlkd-train's per-process batch: its "
                        "teacher batches are then training's own)")
    g.add_argument("--seed", type=int, default=0, help="mlkd-train's --seed: the order and views (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="store the K largest logits of each view (int32 class indices) and the log-sum-exp of "
                        "the others instead of all C (default: 0, all classes)")
    g.add_argument("--logits-dtype", choices=tuple(DTYPES), default="fp32",
                   help="dtype of the stored logits (default: %(default)s: exact)")
    g.add_argument("--features", action=argparse.BooleanOptionalAction, default=False,
                   help=f"also store the pooled features (for {', '.join(cache_feature_methods())}) (default: off)")
    g.add_argument("--features-dtype", choices=("fp32", "fp16"), default="fp32",
                   help="dtype of the stored features (default: %(default)s)")
    g.add_argument("--shard-size", type=int, default=8192,
                   help="samples per shard file (rounded up to a multiple of --batch-size; default: %(default)s)")
    g.add_argument("--max-shards", type=int, default=None, metavar="N",
                   help="stop after writing N shards (per process); --resume continues")
    g.add_argument("--quiet", action="store_true",
                   help="no progress (a bar on a terminal, else a plain line every 30 s)")
    g.add_argument("--debug", action="store_true", help="on an error in what was given, show the traceback")
    g = p.add_argument_group("speed")
    flags.add_device_arguments(g)
    args = p.parse_args(argv)
    flags.check_data_args(p, args)
    if args.synthetic:
        p.error("--data synthetic: random batches and a random teacher have no samples worth caching")
    if args.teacher_weights is None:
        p.error("--teacher-weights is required: the cache is of a given teacher (a teacher trained by "
                "mlkd-train: its teacher.pt)")
    for name in ("epochs", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.top_k < 0:
        p.error("--top-k must be >= 0 (0: all classes)")
    if args.max_shards is not None and args.max_shards < 0:
        p.error("--max-shards must be >= 0")
    if args.resume and args.overwrite:
        p.error("--resume continues the cache in --out and --overwrite moves it aside to start afresh: give one "
                "of them")
    args.teacher_arch = args.teacher_arch or flags.default_teacher_arch(args.data_kind)
    return args


def check_cache_out(args: argparse.Namespace) -> None:
    """The ``--out`` checks of ``mlkd-cache``, before anything is read or written: a folder that can be
    written; not a training run's (only ``--overwrite`` moves one aside); an existing cache only with
    ``--resume`` (continue it) or ``--overwrite`` (move it aside), each refusal one line naming the
    folder, what it holds and the flags that proceed."""
    out = args.out
    check_writable(out)
    if not os.path.isdir(out) or args.overwrite:
        return
    cache_files, run_files = present(out, CACHE_FILES), present(out, RUN_FILES)
    aside = f"{os.path.normpath(out)}.old-<time>"
    if run_files and not cache_files:
        raise InputError(f"--out {out!r} holds a training run ({', '.join(run_files)}), not a teacher cache: give "
                         f"another --out, or --overwrite to move it aside to {aside!r}")
    if cache_files and not args.resume:
        raise InputError(f"--out {out!r} holds a teacher cache ({', '.join(cache_files)}): add --resume to continue "
                         f"it (complete shards are kept), or --overwrite to move it aside to {aside!r} and start "
                         f"afresh, or give another --out")


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------
def spec_json(spec: ModelSpec) -> dict[str, Any]:
    """A :class:`ModelSpec` as the manifest stores it (:func:`.reader.spec_from_json` reads it)."""
    d = asdict(spec)
    d["stages"] = {k: list(v) for k, v in spec.stages.items()}
    d["input_shape"] = list(spec.input_shape)
    return d


_TOPK_REBUILD = ("full logits = rest_lse - log(C - k) at the other classes, the k values at theirs: exact "
                 "probabilities of the top k and of the rest's total mass at T = 1 (the rest spread uniformly)")


def new_manifest(args: argparse.Namespace, setup: WriterSetup, spec: ModelSpec) -> dict[str, Any]:
    """What the cache of these arguments is of: teacher, data, views, seed, epochs, the stored formats
    and the shard layout (the teacher's accuracy is added by :func:`settle_manifest` for a new cache)."""
    n, classes = setup.data.num_samples, spec.num_classes
    top_k = args.top_k if 0 < args.top_k < classes else None
    size = math.ceil(args.shard_size / args.batch_size) * args.batch_size  # a multiple of the teacher batch
    per_epoch = math.ceil(n / size)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": library_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teacher": {"arch": args.teacher_arch, "weights": os.path.abspath(args.teacher_weights),
                    "weights_sha256": file_sha256(args.teacher_weights), "spec": spec_json(spec),
                    "precision": "bf16" if setup.amp_dtype is not None else "fp32", "device": setup.device.type},
        "data": setup.data.identity(),
        "augmentation": setup.data.augmentation(),
        "seed": args.seed, "epochs": args.epochs, "rotations": args.rotations,
        "logits": {"top_k": top_k, "dtype": args.logits_dtype, "rebuild": None if top_k is None else _TOPK_REBUILD},
        "features": {"dim": spec.feature_dim, "dtype": args.features_dtype} if args.features else None,
        "shards": {"size": size, "per_epoch": per_epoch, "count": args.epochs * per_epoch,
                   "teacher_batch": args.batch_size, "name": SHARD_NAME,
                   "order": "positions of data.epoch_order(n, seed, epoch)"},
    }


def _barrier(setup: WriterSetup) -> None:
    if setup.dist.enabled:
        import torch.distributed as dist

        dist.barrier()


def settle_manifest(args: argparse.Namespace, setup: WriterSetup, manifest: dict[str, Any],
                    teacher: torch.nn.Module) -> dict[str, Any]:
    """The manifest the shards are written against, on disk before any shard: a new cache's (with the
    teacher's accuracy; ``--overwrite`` moves an old folder aside first), or with ``--resume`` the
    stored one, refused when another setting differs (naming each field) and grown to a larger
    ``--epochs`` (a cache never shrinks)."""
    out = args.out
    path = os.path.join(out, MANIFEST)
    existed = os.path.isfile(path) and args.resume  # --overwrite: moved aside below, once everything is checked
    _barrier(setup)  # every rank has looked before the main one writes
    main_rank = setup.dist.main
    if args.resume and not existed and main_rank:
        print(f"{PROG}: --resume but no cache in {out}: starting one", file=sys.stderr, flush=True)
    if existed:
        stored = read_manifest(path)
        before = stored["epochs"]
        longer = max(before, args.epochs)
        for m in (stored, manifest):
            m["epochs"], m["shards"]["count"] = longer, longer * m["shards"]["per_epoch"]
        differ = differences(stored, manifest)
        if differ:
            raise InputError(f"--resume: {out!r} holds a teacher cache of other settings ({'; '.join(differ)}): give "
                             f"the cache's settings to resume it, or --overwrite (moves it aside) or another --out "
                             f"to start afresh")
        manifest = stored
        if longer > before and main_rank:  # the manifest first, then the new epochs' shards
            write_json_atomic(path, manifest)
    else:
        if setup.teacher_accuracy is not None:  # the teacher's accuracy, for the runs that read the cache
            top1, top5 = setup.teacher_accuracy(teacher)
            manifest["teacher"].update(top1=top1, top5=None if math.isnan(top5) else top5)
        if main_rank:
            if args.overwrite and os.path.isdir(out) and (present(out, CACHE_FILES) or present(out, RUN_FILES)):
                moved = move_aside(out)
                print(f"{PROG}: --overwrite: moved the previous contents of {out} to {moved}", file=sys.stderr,
                      flush=True)
            os.makedirs(out, exist_ok=True)
            write_json_atomic(path, manifest)  # first: the shards are of it
    _barrier(setup)
    return manifest


# --------------------------------------------------------------------------------------------
# The shards to write, and their teacher batches
# --------------------------------------------------------------------------------------------
def shards_to_write(out: str, manifest: Manifest, rank: int, world: int,
                    max_shards: Optional[int]) -> tuple[list[tuple[int, int]], int]:
    """``(epoch, shard)`` of this process's share (shard i of all goes to process i mod world) that are
    not on disk complete and intact (a damaged one is rewritten, said on stderr), at most
    ``max_shards``; and how many were kept."""
    per_epoch = manifest["shards"]["per_epoch"]
    todo, kept = [], 0
    for e in range(manifest["epochs"]):
        for k in range(per_epoch):
            if (e * per_epoch + k) % world != rank:
                continue
            p = shard_path(out, e, k)
            if os.path.isfile(p):
                try:
                    read_shard(p, manifest, e, k)
                    kept += 1
                    continue
                except UserError as exc:
                    print(f"{PROG}: rewriting {p}: {one_line(exc)}", file=sys.stderr, flush=True)
            todo.append((e, k))
    return (todo if max_shards is None else todo[:max_shards]), kept


class EpochOrders:
    """The order of an epoch (:func:`~.data.epoch_order`) and each sample's position in it, for the
    last two epochs asked (shards are written epoch by epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._orders: dict[int, tuple[Tensor, Tensor]] = {}

    def _get(self, epoch: int) -> tuple[Tensor, Tensor]:
        if epoch not in self._orders:
            if len(self._orders) > 1:
                self._orders.pop(min(self._orders))
            order = D.epoch_order(self.n, self.seed, epoch)
            position = torch.empty(self.n, dtype=torch.long)
            position[order] = torch.arange(self.n)
            self._orders[epoch] = (order, position)
        return self._orders[epoch]

    def order(self, epoch: int) -> Tensor:
        return self._get(epoch)[0]

    def position(self, epoch: int) -> Tensor:
        return self._get(epoch)[1]


class TeacherBatches:
    """The teacher batches ``(epoch, indices)`` of a list of shards, lazily (len() without building them):
    each shard's positions in its epoch's order, ``teacher_batch`` at a time."""

    def __init__(self, shards: list[tuple[int, int]], manifest: Manifest, orders: EpochOrders) -> None:
        self.shards, self.manifest, self.orders = shards, manifest, orders
        self.batch = manifest["shards"]["teacher_batch"]

    def per_shard(self, shard: int) -> int:
        start, stop = shard_span(self.manifest, shard)
        return math.ceil((stop - start) / self.batch)

    def __len__(self) -> int:
        return sum(self.per_shard(k) for _, k in self.shards)

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        for epoch, k in self.shards:
            start, stop = shard_span(self.manifest, k)
            order = self.orders.order(epoch)
            for j in range(start, stop, self.batch):
                yield epoch, order[j:min(j + self.batch, stop)]


# --------------------------------------------------------------------------------------------
# Filling and writing shards
# --------------------------------------------------------------------------------------------
class ShardWriter:
    """Writes finished shards on a background thread, in order; a failed write stops the writes
    queued after it (as a kill would) and is raised at the next hand-over or at :meth:`wait`."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.handed = 0
        self._pool = ThreadPoolExecutor(1)
        self._pending: list[Future] = []
        self._failed: list[BaseException] = []

    def _write(self, path: str, state: dict[str, Any]) -> None:
        if self._failed:
            return
        try:
            write_shard(path, state)  # looked up at call time: tests replace it to simulate a kill
        except BaseException as exc:
            self._failed.append(exc)
            raise

    def submit(self, state: dict[str, Any]) -> None:
        if self._failed:
            raise self._failed[0]
        self.handed += 1
        self._pending.append(self._pool.submit(self._write, shard_path(self.out, state["epoch"], state["shard"]),
                                               state))

    def wait(self) -> None:
        for f in self._pending:
            f.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class ShardAssembler:
    """Fills the shards of :class:`TeacherBatches` in order from the teacher's outputs and the views'
    parameters, and hands each complete one to the :class:`ShardWriter` (a shard is complete when all
    its teacher batches are stored)."""

    def __init__(self, manifest: Manifest, batches: TeacherBatches, orders: EpochOrders, writer: ShardWriter) -> None:
        self.manifest, self.batches, self.orders, self.writer = manifest, batches, orders, writer
        self.dtypes = {f.name: f.torch_dtype(manifest) for f in fields(manifest)}
        self._shards = iter(batches.shards)
        self._current: Optional[dict[str, Any]] = None
        self._handed = 0  # teacher batches of the current shard given out
        self._todo: dict[int, int] = {}  # id(shard state) -> its batches not yet stored

    def next_batch_shard(self) -> dict[str, Any]:
        """The shard the next teacher batch belongs to (a new one when the current one has all its batches)."""
        if self._current is None or self._handed == self.batches.per_shard(self._current["shard"]):
            epoch, k = next(self._shards)
            self._current = new_shard(self.manifest, epoch, k)
            start = self._current["start"]
            self._current["index"] = self.orders.order(epoch)[start:start + self._current["count"]].to(torch.int32)
            self._todo[id(self._current)] = self.batches.per_shard(k)
            self._handed = 0
        self._handed += 1
        return self._current

    def store(self, state: dict[str, Any], index: Tensor, params: Tensor, host: dict[str, Tensor]) -> None:
        """One teacher batch's rows of ``state``: the samples ``index`` marked valid, their view
        parameters and the fields produced (``host``: field -> (b, V, ...) on the host)."""
        rows = self.orders.position(state["epoch"])[index] - state["start"]
        if len(rows) and int(rows[-1]) - int(rows[0]) + 1 == len(rows):  # consecutive positions: a slice, no scatter
            rows = slice(int(rows[0]), int(rows[-1]) + 1)
        state["valid"][rows] = True
        state["aug"][rows] = params.to(torch.int32)
        for name, t in host.items():
            state[name][rows] = t.to(self.dtypes[name])
        self._todo[id(state)] -= 1
        if self._todo[id(state)] == 0:
            del self._todo[id(state)]
            self.writer.submit(state)


def _to_host(t: Tensor) -> Tensor:
    return t.to("cpu", non_blocking=True) if t.is_cuda else t


def produce_fields(manifest: Manifest, outputs: TeacherBatch, dtypes: dict[str, torch.dtype]) -> dict[str, Tensor]:
    """The fields of the manifest that come from the teacher's outputs, in their stored dtypes, on
    their way to the host."""
    return {f.name: _to_host(f.produce(outputs).to(dtypes[f.name])) for f in fields(manifest) if f.produce is not None}


# --------------------------------------------------------------------------------------------
# Creation
# --------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Runs ``mlkd-cache`` with ``argv`` (default: the command line); returns the manifest, with a
    ``"status"`` entry (not in the file): ``complete``, shards ``written`` / ``kept`` / ``total`` by this
    process, ``images_per_s``. Errors are raised (the user's as :class:`~.errors.UserError` or
    ``SystemExit``); :func:`cli` is the command line's entry point."""
    return create(parse_cache_args(argv))


def create(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`main` with the arguments parsed by :func:`parse_cache_args`."""
    from ..distributed import shutdown_distributed

    try:
        return _create(args)
    finally:
        shutdown_distributed()


def _create(args: argparse.Namespace) -> dict[str, Any]:
    from ..logs import progress

    check_cache_out(args)  # --out: before anything is read or written
    setup = writer_setup(args)
    teacher = setup.load_teacher(args.teacher_weights)
    spec = model_spec(teacher, setup.data.input_shape)
    manifest = settle_manifest(args, setup, new_manifest(args, setup, spec), teacher)
    out, rank, world = args.out, setup.dist.rank, setup.dist.world
    todo, kept = shards_to_write(out, manifest, rank, world, args.max_shards)
    orders = EpochOrders(setup.data.num_samples, args.seed)
    batches = TeacherBatches(todo, manifest, orders)
    total = sum(shard_span(manifest, k)[1] - shard_span(manifest, k)[0] for _, k in todo)
    # a bar on a terminal; in a log file a plain line every 30 s (no carriage returns)
    bar = progress(total, 0, f"{PROG} rank {rank}" if world > 1 else PROG, not args.quiet and bool(todo), unit="img")
    writer = ShardWriter(out)
    assembler = ShardAssembler(manifest, batches, orders, writer)
    tapped = TappedNetwork(teacher, (), spec.feature_module)
    start_time = time.perf_counter()
    try:
        done_images, stopped = _teacher_pass(setup, manifest, tapped, batches, assembler, bar)
        writer.wait()
    finally:
        writer.close()
        if bar is not None:
            bar.close()
        tapped.close()
    elapsed = time.perf_counter() - start_time
    written = writer.handed
    _barrier(setup)
    epochs, per_epoch = manifest["epochs"], manifest["shards"]["per_epoch"]
    complete = all(os.path.isfile(shard_path(out, e, k)) for e in range(epochs) for k in range(per_epoch))
    rate = done_images * world / max(elapsed, 1e-9)
    if setup.dist.main:
        state = "complete" if complete else "incomplete (the same command with --resume continues it)"
        print(f"{PROG}: {out}: " + ("stopped; " if stopped else "") + f"{written} shard(s) written, {kept} kept, of "
              f"{manifest['shards']['count']}; the cache is {state}"
              + (f"; {done_images * world} views in {elapsed:.1f} s, {rate:.0f} img/s" if written else ""), flush=True)
    return {**manifest, "status": {"complete": complete, "written": written, "kept": kept, "stopped": stopped,
                                   "total": manifest["shards"]["count"], "images": done_images,
                                   "seconds": round(elapsed, 3), "images_per_s": round(rate, 1)}}


def _teacher_pass(setup: WriterSetup, manifest: Manifest, tapped: TappedNetwork, batches: TeacherBatches,
                  assembler: ShardAssembler, bar) -> tuple[int, bool]:
    """Runs the teacher over the views of ``batches`` and stores its outputs; returns ``(images stored,
    stopped by a signal)``. On CUDA a batch's outputs are copied to the host while the next batch runs
    (stored one batch late); SIGINT / SIGTERM stop after the batch in progress, the shard in progress
    dropped (``--resume`` writes it)."""
    views = manifest["rotations"]
    top_k = manifest["logits"]["top_k"]
    with_feats = manifest["features"] is not None
    cuda = setup.device.type == "cuda"
    pending = None  # the previous batch: (shard, index, params, host fields, CUDA event)
    done = 0

    def drain() -> None:
        nonlocal pending, done
        if pending is None:
            return
        state, index, params, host, event = pending
        if event is not None:
            event.synchronize()
        assembler.store(state, index, params, host)
        done += len(index)
        pending = None

    with torch.no_grad(), glue.StopFlag() as stop:
        for x, index, params in setup.data.source.views(batches):
            if stop.requested:  # the batch before this one is stored; the shard in progress is dropped
                drain()
                return done, True
            state = assembler.next_batch_shard()
            host: dict[str, Tensor] = {}
            event = None
            if x is not None:  # None: no sample of the batch decodes (they stay invalid)
                with (torch.autocast(setup.device.type, dtype=setup.amp_dtype) if setup.amp_dtype is not None
                      else contextlib.nullcontext()):
                    out = tapped(with_rotations(x, views))
                b = len(index)

                def per_view(t: Tensor) -> Tensor:  # (V * b, ...) view-major -> (b, V, ...)
                    return t.float().reshape(views, b, -1).transpose(0, 1)

                outputs = TeacherBatch(per_view(out.logits), per_view(out.feats) if with_feats else None, top_k)
                host = produce_fields(manifest, outputs, assembler.dtypes)
                if cuda:
                    event = torch.cuda.Event()
                    event.record()
            drain()
            pending = (state, index, params, host, event)
            if bar is not None:
                bar.update(len(index))
        drain()
    return done, False


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``mlkd-cache``'s entry point: exit status 0 (done, or stopped cleanly: by --max-shards, SIGINT or
    SIGTERM, the finished shards written; --resume continues), as ``mlkd-train``'s; 2 after an error in
    what was given (one line on stderr); 130 when interrupted before the cache was started, or by a
    second Ctrl-C; 1 with a traceback otherwise."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "lm":  # mlkd-cache lm: the language-model top-k cache (mlkd_fast.lm.cache)
        from ...lm.cache import cli as lm_cli

        return lm_cli(argv[1:])
    try:
        args = parse_cache_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    return exit_status(lambda: create(args), PROG, debug=args.debug,
                       interrupted="interrupted; the shards written so far are kept: the same command with "
                                   "--resume continues")
