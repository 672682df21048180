"""Training one network (teacher, student or baseline) for some epochs: the step, the epoch, the
evaluation, checkpoints every epoch, exact resume, and a clean stop on SIGTERM / SIGINT.

Read top to bottom: :class:`Phase` -> :func:`train_epoch` -> :func:`run_phase`. What a phase trains
is a :class:`mlkd_fast.methods.Distillation` (student, frozen teacher and method in one module, the
one DDP wraps); the loop never looks inside the method: it reads the traits the method declares
(``needs``, ``set_epoch``) and calls it (plain CE for a teacher or a baseline).
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..methods import Distiller
from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .logs import progress
from .data import with_rotations
from .errors import InputError
from .distributed import DistInfo, broadcast_buffers, sum_across
from .teacher_source import StepBatches

class StopFlag:
    """Set by SIGTERM / SIGINT; the loop saves a checkpoint at the next step boundary and returns."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Phase:
    """One network's training: its model, optimiser, schedule, and (for a student) the teacher."""

    name: str
    model: nn.Module                   # unwrapped (for checkpoints and evaluation)
    step_module: nn.Module             # the Distillation, possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: Any
    epochs: int
    arch: str
    distiller: Optional[Distiller] = None
    teacher: Optional[nn.Module] = None
    views: int = 1
    teacher_source: Optional[str] = None  # where its teacher outputs come from (.teacher_source), decided once
    best_top1: float = -1.0
    best_epoch: int = 0
    history: list = field(default_factory=list)

    def state(self, epoch: int, step: int, completed: dict[str, Any],
              config: Optional[dict[str, Any]] = None, partial: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Checkpoint of this phase at (epoch, step); ``completed`` holds the results of finished phases,
        ``config`` the run's settings that a resume must share (checked by the caller), ``partial`` the
        running sums of the interrupted epoch (mid-epoch: :func:`train_epoch`'s ``sums``)."""
        return {"phase": self.name, "completed": dict(completed), "arch": self.arch, "epoch": epoch, "step": step,
                "partial": partial if step else None,
                "config": dict(config or {}), "model": self.model.state_dict(),
                "distiller": self.distiller.state_dict() if self.distiller is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "best": (self.best_top1, self.best_epoch), "history": self.history, "rng": rng_state()}

    def load(self, ckpt: dict[str, Any]) -> tuple[int, int]:
        """Restores a checkpoint of this phase; returns ``(epoch, step)`` to continue from. A checkpoint
        of a run of another length (``--resume`` with another ``--epochs``) continues on the schedule of
        a run of this length (:func:`fit_schedule`)."""
        if ckpt.get("arch") != self.arch:
            raise InputError(f"checkpoint is of --arch {ckpt.get('arch')!r} but this {self.name} is {self.arch!r}")
        try:
            self.model.load_state_dict(ckpt["model"])
            if self.distiller is not None:
                self.distiller.load_state_dict(ckpt["distiller"])
        except (RuntimeError, AttributeError, TypeError) as exc:
            raise InputError(f"checkpoint does not fit this {self.name} ({self.arch}, distiller): "
                             f"{str(exc).splitlines()[0]}") from exc
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        fit_schedule(self.scheduler, self.optimizer, self.epochs)
        self.best_top1, self.best_epoch = ckpt["best"]
        self.history = list(ckpt["history"])
        set_rng_state(ckpt["rng"])
        return ckpt["epoch"], ckpt["step"]


def fit_schedule(scheduler: Any, optimizer: torch.optim.Optimizer, epochs: int) -> None:
    """Makes a restored lr schedule that of a run of ``epochs`` epochs, from the epoch it was saved at.

    Cosine (``CosineAnnealingLR``) saved for another ``T_max``: ``T_max`` becomes ``epochs`` and the
    lr that of the longer (or shorter) cosine at the saved epoch, so every later epoch trains at the
    lr a fresh run of ``epochs`` epochs has there. A finished run trained on to a larger ``--epochs``
    has reached lr ~0: its lr jumps back up (e.g. 40 -> 60 epochs: to 25% of the base lr, then down
    to 0 at epoch 60). Step schedules (``MultiStepLR``, ``--lr-steps``) depend on the epoch only:
    their milestones stay and nothing changes."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) or scheduler.T_max == epochs:
        return
    scheduler.T_max = epochs
    done, low = scheduler.last_epoch, scheduler.eta_min  # epochs finished: the next one trains at the lr set here
    lrs = [low + (base - low) * (1 + math.cos(math.pi * done / epochs)) / 2 for base in scheduler.base_lrs]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


@dataclass
class RunContext:
    """What every phase shares: device, precision, ranks, output, logging, stop conditions."""

    device: torch.device
    dist: DistInfo
    amp_dtype: Optional[torch.dtype]
    checkpoint_path: str
    log: Callable[[dict], None]
    stop: StopFlag
    progress: bool = True
    max_steps: Optional[int] = None     # optimiser steps in this invocation, then stop as if signalled
    steps_done: int = 0
    completed: dict = field(default_factory=dict)  # results of the phases already finished
    config: dict = field(default_factory=dict)     # settings a resume must share, stored in checkpoints
    # per-step values (loss, the method's terms, lr) every ``log_every`` optimiser steps: kept on the device
    # during the epoch (no host sync in the step) and handed to ``log_steps(records)`` at its end
    log_steps: Optional[Callable[[list], None]] = None
    log_every: int = 10
    eval_every: int = 1  # epochs between evaluations (the last epoch always evaluates)
    on_nonfinite: str = "stop"  # a non-finite loss: "stop" (NonFiniteLossError) or "skip" the step's update
    corrupt_warned: int = 0  # the most undecodable images an epoch skipped that a warning line reported
    prog: str = "mlkd-train"  # the name warnings start with

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def should_stop(self, step: int) -> bool:
        if self.max_steps is not None and self.steps_done >= self.max_steps:
            return True
        if not self.dist.enabled:
            return self.stop.requested
        if step % 20:  # ranks agree on stopping every 20 steps (one tiny all-reduce)
            return False
        return sum_across([float(self.stop.requested)], self.device)[0] > 0


class NonFiniteLossError(RuntimeError):
    """A non-finite loss (or non-finite weights after an epoch) stopped the run: nothing after it was
    saved, the last checkpoint (which holds finite weights) is kept. The command line reports it as
    one line with exit status 1 (training failed; not an error in what was given)."""


def _scalar(value: Any, like: torch.Tensor) -> torch.Tensor:
    """A term (a 0-dim or one-element tensor, or a number) as a detached fp32 0-dim tensor on the loss's
    device; the usual one (a detached fp32 0-dim tensor: the distillers' ``.last``) as it is."""
    if (type(value) is torch.Tensor and value.dtype is torch.float32 and value.ndim == 0 and not value.requires_grad
            and value.device == like.device):
        return value
    return torch.as_tensor(value, device=like.device).detach().float().reshape(())


def _term_keys(terms: dict[str, Any]) -> list[str]:
    return [k for k, v in terms.items() if not torch.is_tensor(v) or v.numel() == 1]


def nonfinite_detail(keys: list[str], values: list[float]) -> str:
    """``loss nan; term kd is nan`` from the loss and the terms of one step (``keys[0]`` is the loss):
    the terms that are not finite, the total only when no term is named."""
    loss = values[0]
    bad = [(k, v) for k, v in zip(keys[1:], values[1:]) if v is not None and not math.isfinite(v)]
    named = [(k, v) for k, v in bad if k != "total"] or bad
    if not named:
        return f"loss {loss}"
    return f"loss {loss}; term{'s' * (len(named) > 1)} " + ", ".join(f"{k} is {v}" for k, v in named)


def weights_finite(phase: Phase) -> bool:
    """True when every floating parameter and buffer of the phase's network and its method's heads is
    finite (one host sync): a checkpoint is only written of finite weights."""
    modules = [phase.model] + ([phase.distiller] if phase.distiller is not None else [])
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())


def checks_each_step(ctx: RunContext) -> bool:
    """Whether the loss is checked for non-finite values in the step, before its update: on the CPU in
    one process (free: no device to wait for) and with ``--on-nonfinite skip`` (the step must know;
    under DDP every rank agrees, one tiny all-reduce a step). Otherwise (CUDA, DDP) the first non-finite
    step is kept on the device and read at the end of the epoch: no host sync in the step."""
    return ctx.on_nonfinite == "skip" or (ctx.device.type != "cuda" and not ctx.dist.enabled)


class EpochSums:
    """An epoch's running sums, on the device: ``[loss, *terms]`` each times the batch size (a term is
    first seen in some step, the usual case being the epoch's first), the images per key on the host
    (a term absent from a step is not counted), and the values of the first non-finite step (for the
    deferred check). Rank 0 starts from an interrupted epoch's global sums (``partial``)."""

    def __init__(self, device: torch.device, partial: Optional[dict[str, Any]], main: bool) -> None:
        self.keys: list[str] = ["loss"]
        self.sums = torch.zeros(1, dtype=torch.float64, device=device)
        self.counts = [0]
        self.skipped = 0
        if partial and main:
            self.keys = ["loss"] + list(partial["terms"])
            self.sums = torch.tensor([partial["loss_sum"]] + [v for v, _ in partial["terms"].values()],
                                     dtype=torch.float64, device=device)
            self.counts = [partial["images"]] + [n for _, n in partial["terms"].values()]
            self.skipped = partial.get("skipped", 0)
        self.bad_values = self.sums.new_zeros(len(self.keys))

    def values(self, loss: torch.Tensor, terms: dict[str, Any]) -> tuple[torch.Tensor, list[bool]]:
        """A step's ``[loss, *terms]`` as one fp64 vector (one stack and one cast: the terms are fp32
        scalars), 0 for a term absent from it, and which are present."""
        new = [k for k in _term_keys(terms) if k not in self.keys]
        if new:
            self.keys += new
            self.counts += [0] * len(new)
            self.sums = torch.cat([self.sums, self.sums.new_zeros(len(new))])
            self.bad_values = torch.cat([self.bad_values, self.bad_values.new_zeros(len(new))])
        present = [True] + [k in terms for k in self.keys[1:]]
        values = torch.stack([_scalar(loss.detach(), loss)] + [_scalar(terms[k], loss) if here
                                                      else loss.new_zeros((), dtype=torch.float32)
                                                      for k, here in zip(self.keys[1:], present[1:])]).double()
        return values, present

    def add(self, values: torch.Tensor, present: list[bool], batch: int) -> None:
        """A trained step's values, weighted by its batch size."""
        self.sums += values * batch
        for i, here in enumerate(present):
            self.counts[i] += batch if here else 0

    def totals(self, ctx: "RunContext", images: int) -> tuple[dict[str, Optional[float]], dict[str, Any], float, int]:
        """Over ranks: the means per key, the sums a mid-epoch checkpoint keeps, the images trained
        and the skipped steps."""
        totals = sum_across(self.sums.tolist() + [float(c) for c in self.counts] + [float(images), float(self.skipped)],
                            ctx.device)
        n = len(self.keys)
        global_sums, global_counts = totals[:n], [int(c) for c in totals[n:2 * n]]
        count, skipped_all = totals[2 * n], int(totals[2 * n + 1])
        means = {k: v / c if c else None for k, v, c in zip(self.keys, global_sums, global_counts)}
        if not global_counts[0]:
            means["loss"] = float("nan")
        sums = {"loss_sum": global_sums[0], "images": global_counts[0], "skipped": skipped_all,
                "terms": {k: (v, c) for k, v, c in zip(self.keys[1:], global_sums[1:], global_counts[1:])}}
        return means, sums, count, skipped_all


class NonFiniteGuard:
    """An epoch's check for a non-finite loss (``where``: "teacher epoch 3", for its message).

    Where the check costs nothing (one process on CPU, or ``--on-nonfinite skip``, where every step is
    checked: a host sync on CUDA) each step is checked before its update (:meth:`skips`); elsewhere
    (CUDA, DDP) the first non-finite step is kept on the device, with no sync in the step, and read
    once by :meth:`finish` at the end of the epoch."""

    def __init__(self, where: str, acc: "EpochSums", ctx: RunContext):
        self.where, self.acc, self.ctx = where, acc, ctx
        self.immediate = checks_each_step(ctx)
        self.skip = ctx.on_nonfinite == "skip"
        self.first_bad = torch.full((), -1, dtype=torch.long, device=ctx.device)

    def skips(self, step: int, loss: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether the step is to be skipped (``--on-nonfinite skip``); raises :class:`NonFiniteLossError`
        naming the step and its terms under ``stop``. False without a look where the check is deferred."""
        if not self.immediate:
            fresh = (self.first_bad < 0) & ~torch.isfinite(loss.detach())
            self.first_bad = torch.where(fresh, step, self.first_bad)
            self.acc.bad_values = torch.where(fresh, values, self.acc.bad_values)
            return False
        bad = not bool(torch.isfinite(loss.detach()))
        if self.ctx.dist.enabled:  # every rank skips (or stops at) the same step
            bad = sum_across([float(bad)], self.ctx.device)[0] > 0
        if bad and not self.skip:
            raise NonFiniteLossError(f"non-finite loss at {self.where} step {step} ("
                                     + nonfinite_detail(self.acc.keys, values.tolist()) + ")")
        return bad

    def finish(self) -> None:
        """The deferred check: raises when a step of any process was non-finite (every rank stops: the
        all-reduced weights are non-finite on all of them)."""
        if self.immediate:
            return
        at = int(self.first_bad)
        seen = sum_across([float(at >= 0)], self.ctx.device)[0] > 0 if self.ctx.dist.enabled else at >= 0
        if seen:
            where = (f"step {at} ({nonfinite_detail(self.acc.keys, self.acc.bad_values.tolist())})" if at >= 0
                     else "a step of another process")
            raise NonFiniteLossError(f"non-finite loss at {self.where} {where}")


def train_epoch(phase: Phase, source: StepBatches, epoch: int, start_step: int, ctx: RunContext,
                partial: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One epoch (from ``start_step``); stops early, returning ``interrupted_at``, when asked to.

    ``source`` yields batches ``(x, y, extras)``; the step is called as ``step(x, y, **extras)``
    (the sample indices where the method reads them, the teacher's outputs where a cache gives them:
    :mod:`.teacher_source`).

    Returns the epoch's means (``loss`` and ``terms``: each of the method's terms, weighted by batch
    size like the loss), the lr it trained with, the skipped steps (``--on-nonfinite skip``) and the
    running ``sums`` (summed over ranks) that a mid-epoch checkpoint keeps: ``partial``, the sums of a
    checkpoint's interrupted epoch, makes the resumed epoch's means those of the whole epoch.

    A non-finite loss raises :class:`NonFiniteLossError` naming the step and the term (when it is
    checked: :class:`NonFiniteGuard`), before anything of the epoch is saved.
    """
    phase.step_module.train()
    if phase.teacher is not None:
        phase.teacher.eval()
    views = phase.views
    acc = EpochSums(ctx.device, partial, ctx.dist.main)
    guard = NonFiniteGuard(f"{phase.name} epoch {epoch + 1}", acc, ctx)
    images, steps = 0, 0
    bar = progress(source.steps_per_epoch(), start_step, f"{phase.name} {epoch + 1}/{phase.epochs}",
                   ctx.progress and ctx.dist.main)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    start = time.perf_counter()
    interrupted_at = None
    distiller = phase.distiller
    if distiller is not None:
        distiller.set_epoch(epoch, phase.epochs)
    # per-step records: every log_every-th optimiser step of the phase (counted over its epochs), stacked on the
    # device and read back once at the end of the epoch (reading them each step would sync the host every step)
    every = ctx.log_every if ctx.log_steps is not None else 0
    per_epoch = source.steps_per_epoch()
    lr = phase.optimizer.param_groups[0]["lr"]  # the schedule steps per epoch: this epoch trains at this lr
    rows: list = []
    with_index = distiller is not None and "index" in distiller.needs.context  # a per-sample memory (crd)
    for step, (x, y, extras) in enumerate(source.batches(epoch, start_step, with_index), start=start_step):
        if ctx.should_stop(step):
            interrupted_at = step
            break
        if views > 1:
            x = with_rotations(x, views)
        with ctx.autocast():
            loss = phase.step_module(x, y, **extras)
        values, present = acc.values(loss, distiller.last if distiller is not None else {})
        if guard.skips(step, loss, values):  # --on-nonfinite skip: no update from this step, counted
            acc.skipped += 1
            if bar is not None:
                bar.update(1)
            continue
        phase.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        phase.optimizer.step()
        b = y.shape[0]
        acc.add(values, present, b)
        if every and (epoch * per_epoch + step) % every == 0:
            rows.append((step, values.float(), present))
        images += b
        steps += 1
        ctx.steps_done += 1
        if bar is not None:
            bar.update(1)
            if steps % 10 == 1:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", img_s=f"{images * ctx.dist.world / elapsed:.0f}")
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    guard.finish()  # the deferred check, before anything of this epoch is logged or saved
    if rows:
        ctx.log_steps(step_records(rows, acc.keys, phase.name, epoch, per_epoch, lr))
    means, sums, count, skipped_all = acc.totals(ctx, images)
    return {"loss": means["loss"], "terms": {k: means[k] for k in acc.keys[1:]},
            "lr": lr, "skipped": skipped_all, "images": count, "seconds": elapsed, "steps": steps,
            "images_per_s": count / max(elapsed, 1e-9), "step_ms": 1e3 * elapsed / max(steps, 1),
            "interrupted_at": interrupted_at, "sums": sums}


def step_records(rows: list, keys: list[str], phase: str, epoch: int, per_epoch: int, lr: float) -> list[dict]:
    """The steps.jsonl records of an epoch's logged steps, read back from the device in one copy."""
    flat = torch.cat([r[1] for r in rows]).cpu().tolist()
    records, at = [], 0
    for s, v, present in rows:
        vals, at = flat[at:at + len(v)], at + len(v)
        terms = {k: (val if here else None) for k, val, here in zip(keys[1:], vals[1:], present[1:])}
        records.append({"phase": phase, "epoch": epoch + 1, "step": s,
                        "global_step": epoch * per_epoch + s + 1, "loss": vals[0], **terms, "lr": lr})
    return records


def _round(value: Optional[float], digits: int) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def _warn_corrupt(count: int, phase: str, epoch: int, ctx: RunContext) -> None:
    """One warning line on stderr when an epoch skipped undecodable images, and again only when a later
    epoch skipped more (the same files are met every epoch): they are counted in ``corrupt_images``."""
    if count > ctx.corrupt_warned and ctx.dist.main:
        ctx.corrupt_warned = count
        print(f"{ctx.prog}: warning: {count} undecodable image(s) skipped in {phase} epoch {epoch + 1} (counted "
              f"in corrupt_images; --on-corrupt fail stops at the first, naming it)", file=sys.stderr, flush=True)


class Accuracy(tuple):
    """What :func:`evaluate` returns: ``(top1, top5)`` (unpacked as before), with ``balanced_top1`` as an
    attribute: the mean over the classes present in the batches of each class's top-1 (its recall), in
    percent; NaN without samples. On a long-tailed split it weighs every class alike, as a balanced test
    set does."""

    balanced_top1: float

    def __new__(cls, top1: float, top5: float, balanced_top1: float = float("nan")) -> "Accuracy":
        accuracy = super().__new__(cls, (top1, top5))
        accuracy.balanced_top1 = balanced_top1
        return accuracy


def balanced_top1(correct: torch.Tensor, count: torch.Tensor) -> float:
    """The class-balanced top-1 in percent: the mean of ``correct[c] / count[c]`` over the classes c with
    ``count[c] > 0`` (NaN when none has samples)."""
    present = count > 0
    if not bool(present.any()):
        return float("nan")
    return 100.0 * float((correct[present].double() / count[present].double()).mean())


def _classes_across(classes: int, device: torch.device) -> int:
    """The classes of the logits on any rank (a rank without evaluation batches saw none): every rank's
    per-class sums then have one length."""
    import torch.distributed as tdist

    if not tdist.is_initialized():
        return classes
    t = torch.tensor([classes], dtype=torch.int64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


@torch.no_grad()
def evaluate(model: nn.Module, batches, ctx: RunContext) -> Accuracy:
    """``(top1, top5)`` accuracy in percent over this rank's share of ``batches``, summed over ranks,
    with the class-balanced top-1 as ``.balanced_top1`` (:class:`Accuracy`). Top-5 is NaN (reported as
    n/a) with 5 classes or fewer, where it is 100 by definition."""
    model.eval()
    correct = torch.zeros(2, dtype=torch.int64, device=ctx.device)
    per_class: Optional[torch.Tensor] = None  # (2, classes): right at top-1, samples
    count, classes = 0, 0
    for x, y in batches:
        with ctx.autocast():
            logits, _ = model(x)
        classes = logits.shape[1]
        top = logits.topk(min(5, classes), dim=1).indices == y[:, None]
        correct += torch.stack([top[:, 0].sum(), top.any(1).sum()])
        count += y.shape[0]
        if per_class is None:
            per_class = torch.zeros(2, classes, dtype=torch.int64, device=ctx.device)
        per_class[0] += torch.bincount(y[top[:, 0]], minlength=classes)[:classes]
        per_class[1] += torch.bincount(y, minlength=classes)[:classes]
    c1, c5, n = sum_across([float(correct[0]), float(correct[1]), float(count)], ctx.device)
    k = _classes_across(classes, ctx.device)
    sums = torch.zeros(2, k, dtype=torch.int64) if per_class is None else per_class.cpu()
    by_class = torch.tensor(sum_across(sums.flatten().tolist(), ctx.device), dtype=torch.float64).view(2, k)
    return Accuracy(100.0 * c1 / max(n, 1), (100.0 * c5 / max(n, 1) if classes > 5 else float("nan")),
                    balanced_top1(by_class[0], by_class[1]))


def run_phase(phase: Phase, source: StepBatches, eval_batches: Optional[Callable[[], Any]], ctx: RunContext,
              resume: Optional[dict[str, Any]] = None,
              val_batches: Optional[Callable[[], Any]] = None) -> dict[str, Any]:
    """Trains ``phase`` to its last epoch (or until stopped); checkpoints after every epoch and when
    stopped. Returns ``{"finished": bool, "last_top1", "best_top1", "best_epoch", "images_per_s"}``, and
    ``last_val_top1`` with ``val_batches`` (a validation split held out of the training data, evaluated
    beside the test set: every ``ctx.eval_every`` epochs and after the last)."""
    epoch, step = phase.load(resume) if resume is not None else (0, 0)
    partial = resume.get("partial") if resume is not None and step else None
    last_top1 = phase.history[-1]["top1"] if phase.history else float("nan")
    last_top5 = phase.history[-1].get("top5", float("nan")) if phase.history else float("nan")
    last_balanced = phase.history[-1].get("balanced_top1", float("nan")) if phase.history else float("nan")
    while epoch < phase.epochs:
        corrupt_before = source.corrupt
        stats = train_epoch(phase, source, epoch, step, ctx, partial)
        partial = None
        if not weights_finite(phase):  # every loss was finite, but an update overflowed: save nothing of it
            raise NonFiniteLossError(f"non-finite weights after {phase.name} epoch {epoch + 1} step "
                                     f"{stats['interrupted_at'] if stats['interrupted_at'] is not None else 'end'} "
                                     f"(every loss was finite: an update overflowed)")
        _warn_corrupt(source.corrupt - corrupt_before, phase.name, epoch, ctx)
        if stats["interrupted_at"] is not None:
            if ctx.dist.main:
                save_checkpoint(ctx.checkpoint_path,
                                phase.state(epoch, stats["interrupted_at"], ctx.completed, ctx.config, stats["sums"]))
            return {"finished": False, "epoch": epoch, "step": stats["interrupted_at"]}
        phase.scheduler.step()
        # every rank evaluates (and rank 0 saves) the same statistics: rank 0's
        broadcast_buffers(phase.model, phase.distiller)
        evaluates = (epoch + 1) % ctx.eval_every == 0 or epoch + 1 == phase.epochs
        test = (evaluate(phase.model, eval_batches(), ctx) if eval_batches is not None and evaluates
                else Accuracy(float("nan"), float("nan")))
        top1, top5 = test
        balanced = getattr(test, "balanced_top1", float("nan"))
        if top1 > phase.best_top1:
            phase.best_top1, phase.best_epoch = top1, epoch + 1
        if evaluates:
            last_top1, last_top5, last_balanced = top1, top5, balanced
        val = evaluate(phase.model, val_batches(), ctx) if val_batches is not None and evaluates else None
        val_top1 = val[0] if val is not None else None
        val_balanced = getattr(val, "balanced_top1", float("nan")) if val is not None else None
        if val_balanced is not None and math.isnan(val_balanced):
            val_balanced = None
        # one meaning per field: the epoch's means (the loss and every term, over the whole epoch, a resumed
        # one included) and the lr the epoch trained with (the scheduler has already stepped to the next)
        record = {"phase": phase.name, "epoch": epoch + 1, "loss": _round(stats["loss"], 5),
                  "top1": round(top1, 3) if not math.isnan(top1) else None,
                  "top5": round(top5, 3) if not math.isnan(top5) else None,
                  "balanced_top1": round(balanced, 3) if not math.isnan(balanced) else None,
                  "images_per_s": round(stats["images_per_s"], 1), "step_ms": round(stats["step_ms"], 2),
                  "lr": stats["lr"], "corrupt_images": source.corrupt}
        if ctx.on_nonfinite == "skip":
            record["skipped_steps"] = stats["skipped"]
        if val_top1 is not None:
            record["val_top1"] = round(val_top1, 3)
            record["val_balanced_top1"] = round(val_balanced, 3) if val_balanced is not None else None
        record.update({k: _round(v, 5) for k, v in stats["terms"].items()})
        phase.history.append({"epoch": epoch + 1, "top1": top1, "top5": top5, "balanced_top1": balanced,
                              "val_top1": val_top1, "val_balanced_top1": val_balanced,
                              "images_per_s": stats["images_per_s"]})
        ctx.log(record)
        epoch, step = epoch + 1, 0
        if ctx.dist.main:
            save_checkpoint(ctx.checkpoint_path, phase.state(epoch, 0, ctx.completed, ctx.config))
    rates = [h["images_per_s"] for h in phase.history]
    last_val = phase.history[-1].get("val_top1") if phase.history else None
    last_val_balanced = phase.history[-1].get("val_balanced_top1") if phase.history else None
    return {"finished": True, "last_top1": last_top1, "last_top5": last_top5, "last_val_top1": last_val,
            "last_balanced_top1": last_balanced, "last_val_balanced_top1": last_val_balanced,
            "best_top1": phase.best_top1,
            "best_epoch": phase.best_epoch,
            "last_epoch": phase.epochs, "images_per_s": sum(rates) / max(len(rates), 1)}
