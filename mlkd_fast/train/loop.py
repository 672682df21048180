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
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..methods import Distiller
from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .data import with_rotations
from .errors import InputError
from .distributed import DistInfo, broadcast_buffers, sum_across

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
    best_top1: float = -1.0
    best_epoch: int = 0
    history: list = field(default_factory=list)

    def state(self, epoch: int, step: int, completed: dict[str, Any],
              config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Checkpoint of this phase at (epoch, step); ``completed`` holds the results of finished phases,
        ``config`` the run's settings that a resume must share (checked by the caller)."""
        return {"phase": self.name, "completed": dict(completed), "arch": self.arch, "epoch": epoch, "step": step,
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


def _progress(total: int, initial: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the train extra
        return None
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True,
                unit="step")


def train_epoch(phase: Phase, source, epoch: int, start_step: int, ctx: RunContext) -> dict[str, Any]:
    """One epoch (from ``start_step``); stops early, returning ``interrupted_at``, when asked to."""
    phase.step_module.train()
    if phase.teacher is not None:
        phase.teacher.eval()
    views = phase.views
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    images, steps = 0, 0
    bar = _progress(source.steps_per_epoch(), start_step, f"{phase.name} {epoch + 1}/{phase.epochs}",
                    ctx.progress and ctx.dist.main)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    start = time.perf_counter()
    interrupted_at = None
    distiller = phase.distiller
    if distiller is not None:
        distiller.set_epoch(epoch, phase.epochs)
    wants_index = distiller is not None and "index" in distiller.needs.context
    # per-step records: every log_every-th optimiser step of the phase (counted over its epochs), stacked on the
    # device and read back once at the end of the epoch (reading them each step would sync the host every step)
    every = ctx.log_every if ctx.log_steps is not None else 0
    per_epoch = source.steps_per_epoch()
    lr = phase.optimizer.param_groups[0]["lr"]  # the schedule steps per epoch
    rows: list = []
    keys: Optional[list[str]] = None
    # a source replaying a teacher cache yields (x, y, index, the teacher's Outputs) and the teacher does not run
    cached = getattr(source, "yields_teacher_outputs", False)
    if cached:
        batches = source.epoch(epoch, start_step)
    else:
        batches = source.epoch(epoch, start_step, with_index=True) if wants_index else source.epoch(epoch, start_step)
    for step, batch in enumerate(batches, start=start_step):
        teacher_out = None
        if cached:
            x, y, index, teacher_out = batch
            index = index if wants_index else None
        else:
            x, y, index = batch if wants_index else (*batch, None)
        if ctx.should_stop(step):
            interrupted_at = step
            break
        if views > 1:
            x = with_rotations(x, views)
        with ctx.autocast():
            if teacher_out is None:
                loss = phase.step_module(x, y, index)
            else:
                loss = phase.step_module(x, y, index, teacher_outputs=teacher_out)
        phase.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        phase.optimizer.step()
        total += loss.detach().double() * y.shape[0]
        if every and (epoch * per_epoch + step) % every == 0:
            terms = distiller.last if distiller is not None else {}
            if keys is None:
                keys = [k for k, v in terms.items() if not torch.is_tensor(v) or v.numel() == 1]
            nan = torch.full((), float("nan"), device=loss.device)
            rows.append((step, torch.stack([loss.detach().float()] + [
                torch.as_tensor(terms[k], device=loss.device).detach().float().reshape(()) if k in terms else nan
                for k in keys])))
        images += y.shape[0]
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
    if rows:
        values = torch.stack([r[1] for r in rows]).cpu().tolist()
        ctx.log_steps([{"phase": phase.name, "epoch": epoch + 1, "step": s, "global_step": epoch * per_epoch + s + 1,
                        "loss": v[0], **dict(zip(keys, v[1:])), "lr": lr} for (s, _), v in zip(rows, values)])
    loss_sum, count = sum_across([float(total), float(images)], ctx.device)
    return {"loss": loss_sum / max(count, 1), "images": count, "seconds": elapsed, "steps": steps,
            "images_per_s": count / max(elapsed, 1e-9), "step_ms": 1e3 * elapsed / max(steps, 1),
            "interrupted_at": interrupted_at}


@torch.no_grad()
def evaluate(model: nn.Module, batches, ctx: RunContext) -> tuple[float, float]:
    """``(top1, top5)`` accuracy in percent over this rank's share of ``batches``, summed over ranks.
    Top-5 is NaN (reported as n/a) with 5 classes or fewer, where it is 100 by definition."""
    model.eval()
    correct = torch.zeros(2, dtype=torch.int64, device=ctx.device)
    count, classes = 0, 0
    for x, y in batches:
        with ctx.autocast():
            logits, _ = model(x)
        classes = logits.shape[1]
        top = logits.topk(min(5, classes), dim=1).indices == y[:, None]
        correct += torch.stack([top[:, 0].sum(), top.any(1).sum()])
        count += y.shape[0]
    c1, c5, n = sum_across([float(correct[0]), float(correct[1]), float(count)], ctx.device)
    return 100.0 * c1 / max(n, 1), (100.0 * c5 / max(n, 1) if classes > 5 else float("nan"))


def run_phase(phase: Phase, source, eval_batches: Optional[Callable[[], Any]], ctx: RunContext,
              resume: Optional[dict[str, Any]] = None,
              val_batches: Optional[Callable[[], Any]] = None) -> dict[str, Any]:
    """Trains ``phase`` to its last epoch (or until stopped); checkpoints after every epoch and when
    stopped. Returns ``{"finished": bool, "last_top1", "best_top1", "best_epoch", "images_per_s"}``, and
    ``last_val_top1`` with ``val_batches`` (a validation split held out of the training data, evaluated
    beside the test set: every ``ctx.eval_every`` epochs and after the last)."""
    epoch, step = phase.load(resume) if resume is not None else (0, 0)
    last_top1 = phase.history[-1]["top1"] if phase.history else float("nan")
    last_top5 = phase.history[-1].get("top5", float("nan")) if phase.history else float("nan")
    while epoch < phase.epochs:
        stats = train_epoch(phase, source, epoch, step, ctx)
        if stats["interrupted_at"] is not None:
            if ctx.dist.main:
                save_checkpoint(ctx.checkpoint_path,
                                phase.state(epoch, stats["interrupted_at"], ctx.completed, ctx.config))
            return {"finished": False, "epoch": epoch, "step": stats["interrupted_at"]}
        phase.scheduler.step()
        # every rank evaluates (and rank 0 saves) the same statistics: rank 0's
        broadcast_buffers(phase.model, phase.distiller)
        evaluates = (epoch + 1) % ctx.eval_every == 0 or epoch + 1 == phase.epochs
        top1, top5 = (evaluate(phase.model, eval_batches(), ctx) if eval_batches is not None and evaluates
                      else (float("nan"),) * 2)
        if top1 > phase.best_top1:
            phase.best_top1, phase.best_epoch = top1, epoch + 1
        if evaluates:
            last_top1, last_top5 = top1, top5
        val_top1 = evaluate(phase.model, val_batches(), ctx)[0] if val_batches is not None and evaluates else None
        record = {"phase": phase.name, "epoch": epoch + 1, "loss": round(stats["loss"], 5),
                  "top1": round(top1, 3) if not math.isnan(top1) else None,
                  "top5": round(top5, 3) if not math.isnan(top5) else None,
                  "images_per_s": round(stats["images_per_s"], 1), "step_ms": round(stats["step_ms"], 2),
                  "lr": phase.optimizer.param_groups[0]["lr"], "corrupt_images": getattr(source, "corrupt", 0)}
        if val_top1 is not None:
            record["val_top1"] = round(val_top1, 3)
        if phase.distiller is not None and phase.distiller.last:
            record.update({k: round(float(v), 5) for k, v in phase.distiller.last.items()})
        phase.history.append({"epoch": epoch + 1, "top1": top1, "top5": top5, "val_top1": val_top1,
                              "images_per_s": stats["images_per_s"]})
        ctx.log(record)
        epoch, step = epoch + 1, 0
        if ctx.dist.main:
            save_checkpoint(ctx.checkpoint_path, phase.state(epoch, 0, ctx.completed, ctx.config))
    rates = [h["images_per_s"] for h in phase.history]
    last_val = phase.history[-1].get("val_top1") if phase.history else None
    return {"finished": True, "last_top1": last_top1, "last_top5": last_top5, "last_val_top1": last_val,
            "best_top1": phase.best_top1,
            "best_epoch": phase.best_epoch,
            "last_epoch": phase.epochs, "images_per_s": sum(rates) / max(len(rates), 1)}
