"""The teacher cache: the frozen teacher's outputs on exactly the views training draws, paid once.

``mlkd-cache`` (also ``python -m mlkd_fast.cache``; from Python :func:`main`, which returns the
manifest) runs the teacher over every (epoch, sample) view that E epochs of ``mlkd-train`` draw
and writes a folder::

    DIR/manifest.json            what the cache is of (written first, checked on resume and by training)
    DIR/e0000-s00000.pt ...      one shard per (epoch, block of positions in the epoch's order)

``mlkd-train --teacher-cache DIR`` then trains without a teacher network: the data pipeline replays
the same views (the augmentation is a function of seed, epoch and sample index: data.augment_params,
data.keyed_crop_params), checks batch by batch that the views it draws are the stored ones, and
hands the stored outputs to the method (``Distillation(..., teacher_outputs=...)``).

Shards. Shard ``k`` of epoch ``e`` holds the positions ``[k S, (k + 1) S)`` of ``epoch_order(n, seed,
e)`` (S = ``--shard-size``, a multiple of the teacher batch): training reads an epoch's shards in
order, whatever its batch size or number of processes, and with the same per-process batch as the
cache's teacher batch its teacher batches are training's own batches (CPU results bit for bit).
Each shard is a ``torch.save`` dict, written atomically (temp file, fsync, rename) and carrying the
sha256 of its tensors: ``index`` (int32, the sample at each position), ``valid`` (bool: False for an
undecodable image), ``aug`` (int32 (m, P): the view's parameters, ``(top, left, flipped)`` for the
in-memory sets, ``(top, left, height, width, flipped)`` for folders), and per view (``--rotations``:
V = 1 or 4, view-major as training batches them) either ``logits`` (m, V, C) or ``topk_values`` (m,
V, k), ``topk_indices`` (int32) and ``rest_lse`` (fp32: the log-sum-exp of the C - k other logits),
and with ``--features`` ``feats`` (m, V, D), the pooled pre-logit features.

Top-k rebuild. The full logits are rebuilt as the k stored logits at their classes and ``rest_lse -
log(C - k)`` at every other class: at temperature 1 the softmax gives the top k classes their exact
probabilities and the rest's exact total mass, spread uniformly over the C - k others. At T != 1
the top k keep their exact ratios, but the rest's tempered mass is that of C - k equal logits: an
upper bound at T > 1 (the true rest is less flat), a lower bound at T < 1 (power-mean inequality);
the cache stores no temperature, so the same cache serves every T.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..methods.taps import TappedNetwork, model_spec
from . import data as D
from .checkpoint import CACHE_FILES, RUN_FILES, check_writable, move_aside, present, write_json_atomic
from .cli import (DEFAULTS, _Parser, add_data_arguments, add_device_arguments, add_teacher_arguments,
                  add_version_argument, check_data_args, default_teacher_arch)
from .data import with_rotations
from .errors import InputError, UserError, one_line
from .replay import (DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, SHARD_NAME, _differences, _library_version, _read_manifest,
                     _spec_json, _write_shard, data_identity, file_sha256, read_shard, shard_layout, shard_path,
                     shard_span)

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
    functions add them: :func:`~.cli.add_data_arguments`, ...) and the cache's own."""
    p = _Parser(prog=PROG, description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(p)
    add_data_arguments(p)
    g = p.add_argument_group("teacher")
    add_teacher_arguments(g, weights_help="the teacher's state dict (torchvision, timm or mlkd-train .pt), used as "
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
    g.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                   help="epochs of views to cache: mlkd-train --epochs E reads epochs 0..E-1 (default: %(default)s, "
                        "mlkd-train's; --cache-wrap there reuses fewer)")
    g.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="the teacher's forward batch (default: %(default)s, mlkd-train's per-process batch: its "
                        "teacher batches are then training's own)")
    g.add_argument("--seed", type=int, default=0, help="mlkd-train's --seed: the order and views (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="store the K largest logits of each view (int32 class indices) and the log-sum-exp of "
                        "the others instead of all C (default: 0, all classes)")
    g.add_argument("--logits-dtype", choices=tuple(DTYPES), default="fp32",
                   help="dtype of the stored logits (default: %(default)s: exact)")
    g.add_argument("--features", action=argparse.BooleanOptionalAction, default=False,
                   help="also store the pooled features (for crd, pkt, rkd, cc, mlkd, paper) (default: off)")
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
    add_device_arguments(g)
    args = p.parse_args(argv)
    check_data_args(p, args)
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
    args.teacher_arch = args.teacher_arch or default_teacher_arch(args.data_kind)
    # what the run's data and device setup (run.Run) reads besides the flags above
    for name, value in dict(lr=0.0, scale_lr=False, sync_bn=False, teacher_new_head=False,
                            teacher_cache=None).items():
        setattr(args, name, value)
    return args


# --------------------------------------------------------------------------------------------
# Creation
# --------------------------------------------------------------------------------------------
class _Batches:
    """The teacher batches ``(epoch, indices)`` of a list of shards, lazily (len() without building them)."""

    def __init__(self, shards: list[tuple[int, int]], manifest: dict[str, Any], orders) -> None:
        self.shards, self.manifest, self.orders = shards, manifest, orders
        self.batch = manifest["shards"]["teacher_batch"]

    def per_shard(self, shard: int) -> int:
        start, stop = shard_span(self.manifest, shard)
        return math.ceil((stop - start) / self.batch)

    def __len__(self) -> int:
        return sum(self.per_shard(k) for _, k in self.shards)

    def __iter__(self):
        for epoch, k in self.shards:
            start, stop = shard_span(self.manifest, k)
            order = self.orders(epoch)
            for j in range(start, stop, self.batch):
                yield epoch, order[j:min(j + self.batch, stop)]


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


def _to_host(t: Tensor) -> Tensor:
    return t.to("cpu", non_blocking=True) if t.is_cuda else t


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Runs ``mlkd-cache`` with ``argv`` (default: the command line); returns the manifest, with a
    ``"status"`` entry (not in the file): ``complete``, shards ``written`` / ``kept`` / ``total`` by this
    process, ``images_per_s``. Errors are raised (the user's as :class:`~.errors.UserError` or
    ``SystemExit``); :func:`cli` is the command line's entry point."""
    return create(parse_cache_args(argv))


def create(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`main` with the arguments parsed by :func:`parse_cache_args`."""
    from .distributed import shutdown_distributed

    try:
        return _create(args)
    finally:
        shutdown_distributed()


def _create(args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist

    from .logs import progress
    from .loop import RunContext, StopFlag, evaluate
    from .run import Run

    check_cache_out(args)  # --out: before anything is read or written
    run = Run(args)
    if run.train_size is None:  # pragma: no cover - synthetic data is refused by the flags
        raise InputError("--data synthetic has no samples to cache")
    n, views = run.train_size, args.rotations
    teacher = run.load_teacher(args.teacher_weights)
    spec = model_spec(teacher, run.input_shape())
    tapped = TappedNetwork(teacher, (), spec.feature_module)
    classes = spec.num_classes
    top_k = args.top_k if 0 < args.top_k < classes else None
    batch = args.batch_size
    size = math.ceil(args.shard_size / batch) * batch
    per_epoch = math.ceil(n / size)
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": _library_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teacher": {"arch": args.teacher_arch, "weights": os.path.abspath(args.teacher_weights),
                    "weights_sha256": file_sha256(args.teacher_weights), "spec": _spec_json(spec),
                    "precision": "bf16" if run.amp_dtype is not None else "fp32", "device": run.device.type},
        "data": data_identity(run),
        "augmentation": run.train.augmentation(),
        "seed": args.seed, "epochs": args.epochs, "rotations": views,
        "logits": {"top_k": top_k, "dtype": args.logits_dtype,
                   "rebuild": None if top_k is None else
                   "full logits = rest_lse - log(C - k) at the other classes, the k values at theirs: exact "
                   "probabilities of the top k and of the rest's total mass at T = 1 (the rest spread uniformly)"},
        "features": {"dim": spec.feature_dim, "dtype": args.features_dtype} if args.features else None,
        "shards": {"size": size, "per_epoch": per_epoch, "count": args.epochs * per_epoch, "teacher_batch": batch,
                   "name": SHARD_NAME, "order": "positions of data.epoch_order(n, seed, epoch)"},
    }
    out = args.out
    path = os.path.join(out, MANIFEST)
    existed = os.path.isfile(path) and args.resume  # --overwrite: moved aside below, once everything is checked
    if run.dist.enabled:
        dist.barrier()  # every rank has looked before the main one writes
    if args.resume and not existed and run.dist.main:
        print(f"{PROG}: --resume but no cache in {out}: starting one", file=sys.stderr, flush=True)
    if existed:
        stored = _read_manifest(path)
        before = stored["epochs"]
        longer = max(before, args.epochs)  # a cache grows to a larger --epochs, never shrinks
        for m in (stored, manifest):
            m["epochs"], m["shards"]["count"] = longer, longer * m["shards"]["per_epoch"]
        differ = _differences(stored, manifest)
        if differ:
            raise InputError(f"--resume: {out!r} holds a teacher cache of other settings ({'; '.join(differ)}): give "
                             f"the cache's settings to resume it, or --overwrite (moves it aside) or another --out "
                             f"to start afresh")
        manifest = stored
        if longer > before and run.dist.main:  # the manifest first, then the new epochs' shards
            write_json_atomic(path, manifest)
    else:
        ctx = RunContext(run.device, run.dist, run.amp_dtype, "", lambda r: None, StopFlag())
        if run.eval_batches is not None:  # the teacher's accuracy, for the runs that read the cache
            top1, top5 = evaluate(teacher, run.eval_batches(), ctx)
            manifest["teacher"].update(top1=top1, top5=None if math.isnan(top5) else top5)
        if run.dist.main:
            if args.overwrite and os.path.isdir(out) and (present(out, CACHE_FILES) or present(out, RUN_FILES)):
                moved = move_aside(out)
                print(f"{PROG}: --overwrite: moved the previous contents of {out} to {moved}", file=sys.stderr,
                      flush=True)
            os.makedirs(out, exist_ok=True)
            write_json_atomic(path, manifest)  # first: the shards are of it
    if run.dist.enabled:
        dist.barrier()

    rank, world = run.dist.rank, run.dist.world
    epochs = manifest["epochs"]
    mine = [(e, k) for e in range(epochs) for k in range(per_epoch) if (e * per_epoch + k) % world == rank]
    todo, kept = [], 0
    for e, k in mine:
        p = shard_path(out, e, k)
        if os.path.isfile(p):
            try:
                read_shard(p, manifest, e, k)
                kept += 1
                continue
            except UserError as exc:
                print(f"{PROG}: rewriting {p}: {one_line(exc)}", file=sys.stderr, flush=True)
        todo.append((e, k))
    if args.max_shards is not None:
        todo = todo[:args.max_shards]
    orders: dict[int, tuple[Tensor, Tensor]] = {}  # epoch -> (order, position of each sample in it)

    def _epoch(epoch: int) -> tuple[Tensor, Tensor]:
        if epoch not in orders:
            if len(orders) > 1:
                orders.pop(min(orders))
            order = D.epoch_order(n, args.seed, epoch)
            position = torch.empty(n, dtype=torch.long)
            position[order] = torch.arange(n)
            orders[epoch] = (order, position)
        return orders[epoch]

    def order_of(epoch: int) -> Tensor:
        return _epoch(epoch)[0]

    def position_of(epoch: int) -> Tensor:
        return _epoch(epoch)[1]

    batches = _Batches(todo, manifest, order_of)
    layout_dtypes = {k: dt for k, (_, dt) in shard_layout(manifest, 1).items()}
    total = sum(shard_span(manifest, k)[1] - shard_span(manifest, k)[0] for _, k in todo)
    # a bar on a terminal; in a log file a plain line every 30 s (no carriage returns)
    bar = progress(total, 0, f"{PROG} rank {rank}" if world > 1 else PROG, not args.quiet and bool(todo), unit="img")
    writer = ThreadPoolExecutor(1)
    pending_writes: list[Future] = []
    cuda = run.device.type == "cuda"
    start_time = time.perf_counter()
    done_images = 0

    def new_shard(epoch: int, k: int) -> dict[str, Any]:
        lo, hi = shard_span(manifest, k)
        state: dict[str, Any] = {"format_version": FORMAT_VERSION, "epoch": epoch, "shard": k, "start": lo,
                                 "count": hi - lo}
        for name, (shape, dtype) in shard_layout(manifest, hi - lo).items():
            state[name] = torch.zeros(shape, dtype=dtype)
        state["index"] = order_of(epoch)[lo:hi].to(torch.int32)
        state["todo"] = batches.per_shard(k)  # batches not yet stored (dropped before writing)
        return state

    def store(state: dict[str, Any], index: Tensor, params: Tensor, host: dict[str, Tensor]) -> None:
        rows = position_of(state["epoch"])[index] - state["start"]
        if len(rows) and int(rows[-1]) - int(rows[0]) + 1 == len(rows):  # consecutive positions: a slice, no scatter
            rows = slice(int(rows[0]), int(rows[-1]) + 1)
        state["valid"][rows] = True
        state["aug"][rows] = params.to(torch.int32)
        for name, t in host.items():
            state[name][rows] = t.to(layout_dtypes[name])

    failed: list[BaseException] = []  # a failed write stops the writes queued after it (as a kill would)

    def write(p: str, state: dict[str, Any]) -> None:
        if failed:
            return
        try:
            _write_shard(p, state)
        except BaseException as exc:
            failed.append(exc)
            raise

    finished = 0  # shards handed to the writer

    def finish(state: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        del state["todo"]
        if failed:
            raise failed[0]
        pending_writes.append(writer.submit(write, shard_path(out, state["epoch"], state["shard"]), state))

    shard_iter = iter(todo)
    current: Optional[dict[str, Any]] = None
    handed = 0  # batches of the current shard given to the teacher
    pending = None  # the previous batch's outputs, copied to the host while the next one runs (CUDA)

    def drain() -> None:
        nonlocal pending, done_images
        if pending is None:
            return
        state, index, params, host, event = pending
        if event is not None:
            event.synchronize()
        store(state, index, params, host)
        state["todo"] -= 1
        done_images += len(index)
        if state["todo"] == 0:
            finish(state)
        pending = None

    stopped = False
    try:
        with torch.no_grad(), StopFlag() as stop:  # SIGINT / SIGTERM: the shards finished so far are written
            for x, index, params in run.train.views(batches):
                if stop.requested:  # the shard in progress is dropped (--resume writes it)
                    stopped = True
                    break
                if current is None or handed == batches.per_shard(current["shard"]):
                    e, k = next(shard_iter)
                    current, handed = new_shard(e, k), 0
                handed += 1
                host: dict[str, Tensor] = {}
                event = None
                if x is not None:
                    xv = with_rotations(x, views)
                    ctx_amp = (torch.autocast(run.device.type, dtype=run.amp_dtype) if run.amp_dtype is not None
                               else _null())
                    with ctx_amp:
                        out_t = tapped(xv)
                    b = len(index)
                    logits = out_t.logits.float().reshape(views, b, -1).transpose(0, 1)  # (b, V, C)
                    if top_k is None:
                        host["logits"] = _to_host(logits.to(layout_dtypes["logits"]))
                    else:
                        values, classes_k = logits.topk(top_k, dim=-1)
                        rest = logits.scatter(-1, classes_k, float("-inf")).logsumexp(-1)
                        host.update(topk_values=_to_host(values.to(layout_dtypes["topk_values"])),
                                    topk_indices=_to_host(classes_k.to(torch.int32)), rest_lse=_to_host(rest))
                    if manifest["features"] is not None:
                        feats = out_t.feats.float().reshape(views, b, -1).transpose(0, 1)
                        host["feats"] = _to_host(feats.to(layout_dtypes["feats"]))
                    if cuda:
                        event = torch.cuda.Event()
                        event.record()
                drain()
                pending = (current, index, params, host, event)
                if bar is not None:
                    bar.update(len(index))
            drain()
        for f in pending_writes:
            f.result()
    finally:
        writer.shutdown(wait=True)
        if bar is not None:
            bar.close()
        tapped.close()
    elapsed = time.perf_counter() - start_time
    written = finished
    if run.dist.enabled:
        dist.barrier()
    complete = all(os.path.isfile(shard_path(out, e, k)) for e in range(epochs) for k in range(per_epoch))
    rate = done_images * world / max(elapsed, 1e-9)
    if run.dist.main:
        state = "complete" if complete else "incomplete (the same command with --resume continues it)"
        print(f"{PROG}: {out}: " + ("stopped; " if stopped else "") + f"{written} shard(s) written, {kept} kept, of "
              f"{manifest['shards']['count']}; the cache is {state}"
              + (f"; {done_images * world} views in {elapsed:.1f} s, {rate:.0f} img/s" if written else ""), flush=True)
    return {**manifest, "status": {"complete": complete, "written": written, "kept": kept, "stopped": stopped,
                                   "total": manifest["shards"]["count"], "images": done_images,
                                   "seconds": round(elapsed, 3), "images_per_s": round(rate, 1)}}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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
        from ..lm.cache import cli as lm_cli

        return lm_cli(argv[1:])
    try:
        args = parse_cache_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        create(args)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(f"{PROG}: {one_line(Exception(exc.code))}".replace(f"{PROG}: mlkd-train: ", f"{PROG}: "),
              file=sys.stderr, flush=True)
        return 2
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the shards written so far are kept: the same command with --resume continues",
              file=sys.stderr, flush=True)
        return 130
    return 0
