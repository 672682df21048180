"""One invocation of ``mlkd-train``: its data, networks and phases (teacher, student, baseline),
checkpoints and resume checks. :func:`train_all` runs them in order; :mod:`.loop` trains each."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .. import methods as M
from ..backends import pinned_backend
from . import data as D
from .checkpoint import (CACHE_FILES, RUN_FILES, check_writable, load_checkpoint, move_aside, present,
                         save_checkpoint, write_json_atomic)
from .cli import parse_args
from .config import TrainConfig
from .distributed import convert_sync_batchnorm, gather_with_grad, shutdown_distributed, sum_across
from .errors import InputError, MissingInputError
from .logs import RunLogs, check_tensorboard, plot_curves
from .loop import NonFiniteLossError, Phase, RunContext, StopFlag, run_phase
from .method_lists import gather_hook_dests
from .models import build_model, load_weights
from .placement import frozen, place
from .preflight import check_student_method
from .teacher_source import CACHE, LiveBatches, StepBatches, teacher_source
from .training_data import load_training_data

# the seed of each phase's networks: the student and the baseline start from the same weights
PHASE_SEEDS = {"teacher": 0, "student": 100, "baseline": 100}


class Run:
    """The data, models and phases of one invocation, built from its :class:`~.config.TrainConfig`
    (which it reads and never changes)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        placement = place(config.device, config.precision, config.channels_last, config.kind.channels_last_pays)
        self.placement = placement
        self.device, self.dist = placement.device, placement.dist
        self.amp_dtype, self.channels_last = placement.amp_dtype, placement.channels_last
        self.shard = D.Shard(config.batch_size, self.dist.rank, self.dist.world)
        self.lr = config.lr * (self.dist.world if config.scale_lr else 1)
        if config.sync_bn and not self.dist.enabled:
            print("mlkd-train: --sync-bn does nothing in a single process (BatchNorm already sees the whole "
                  "batch)", file=sys.stderr)
        self.data = load_training_data(config, self.shard, self.device, self.channels_last)
        self.info: dict[str, Any] = dict(self.data.info)  # what the summary reports of the run's inputs
        self.cache = None  # --teacher-cache: the teacher's outputs come from it, no teacher network is built
        if config.teacher_cache is not None:
            from .replay import TeacherCache

            self.cache = TeacherCache.open(config.teacher_cache)
            self.cache.check_run(self)  # the same teacher, data, views, seed (an error naming each field)
            self.config = config.with_teacher_arch(self.cache.teacher_arch)
            if "top1" in self.cache.manifest["teacher"]:
                self.info.update(teacher_top1=self.cache.manifest["teacher"]["top1"],
                                 teacher_top5=self.cache.manifest["teacher"].get("top5"))

    @property
    def args(self) -> TrainConfig:
        """The config under its older name (the teacher cache's checks read ``run.args``)."""
        return self.config

    # ---- data: what other modules read of it (the cache writer and replay, benchmarks) -------
    @property
    def train(self) -> Any:
        return self.data.train

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def train_size(self) -> Optional[int]:
        return self.data.train_size

    @property
    def eval_batches(self) -> Optional[Callable[[], Any]]:
        return self.data.eval_batches

    @property
    def val_batches(self) -> Optional[Callable[[], Any]]:
        return self.data.val_batches

    def input_shape(self) -> tuple[int, int, int]:
        return self.data.input_shape

    def data_facts(self) -> dict[str, Any]:
        """What a method's ``data_options`` may ask of the training data (:meth:`.TrainingData.fact`)."""
        return {name: self.data.fact(name) for name in ("num_samples", "class_counts")}

    # ---- models and phases ----------------------------------------------------------------
    def network(self, arch: str) -> nn.Module:
        """A new network of ``arch`` for the data's classes and channels, on the device, in the run's
        layout (SyncBatchNorm with ``--sync-bn`` under DDP)."""
        model = build_model(arch, self.num_classes, in_channels=self.input_shape()[0]).to(self.device)
        if self.config.sync_bn and self.dist.enabled:
            model = convert_sync_batchnorm(model, self.device.type)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    _network = network  # the older name

    def teacher_source(self, phase: str, method: type) -> Optional[str]:
        """Where the teacher outputs of ``phase`` (training with ``method``) come from: decided here
        once, read by everything that builds or feeds the phase (:mod:`.teacher_source`)."""
        return teacher_source(phase, method.needs_teacher, self.cache is not None)

    def build_distillation(self, phase: str, method: str, model: nn.Module, teacher: Optional[nn.Module],
                           views: int, compile: Optional[bool] = None) -> M.Distillation:
        """The student, the teacher and the method as one module, with the run's options: the student
        phase's method takes ``--method-opt`` (the teacher and baseline phases never see them), and
        every method takes what its traits ask of the run (``--temperature`` and ``--backend`` where
        it has those options, the rotation views where it takes views, the data facts of its
        ``data_options``, peers built like the student, its gather hooks under DDP). ``compile``:
        whether the student is compiled (default ``--compile``)."""
        config = self.config
        cls = M.method_class(method)
        cached = self.teacher_source(phase, cls) == CACHE
        distill = self._distillation(phase, method, cls, model, None if cached else teacher,
                                     self.cache.teacher_spec if cached else None, views,
                                     config.compile if compile is None else compile)
        if cached:  # what the cache cannot give (stage maps, a live teacher, features it lacks): from the traits
            self.cache.check_method(distill.distiller, config.method)
        distill = distill.to(self.device)
        if config.sync_bn and self.dist.enabled:
            distill.distiller = convert_sync_batchnorm(distill.distiller, self.device.type)
        if self.dist.enabled:
            for hook, always in cls.gather_hooks.items():
                if always or getattr(config, f"global_{hook}", False):
                    distill.distiller.set_gather(hook, gather_with_grad)
        return distill

    def _distillation(self, phase: str, method: str, cls: type, model: nn.Module, teacher: Optional[nn.Module],
                      teacher_spec: Any, views: int, compile: bool) -> M.Distillation:
        """:meth:`build_distillation`'s module with the method's options; what the method finds missing
        in this run (crd's indices on synthetic data, stages) is the user's error, named by the method."""
        config = self.config
        known = cls.options()
        options = dict(config.method_options) if phase == "student" else {}
        if config.temperature is not None and "temperature" in known:
            options.setdefault("temperature", config.temperature)
        if "backend" in known:
            options.setdefault("backend", pinned_backend(config.backend, self.device))
        if cls.takes_views:
            options.setdefault("views", views)
        for option, fact in cls.data_options.items():
            if options.get(option) is None and self.data.fact(fact) is not None:
                options[option] = self.data.fact(fact)
        try:
            return M.Distillation(torch.compile(model) if compile else model,
                                  teacher if cls.needs_teacher else None, method,
                                  input_shape=self.input_shape(), peer_factory=lambda: self.network(config.arch),
                                  teacher_spec=teacher_spec, **options)
        except ValueError as exc:
            raise InputError(f"--method {config.method if phase == 'student' else method}: {exc}") from exc

    def make_phase(self, name: str, arch: str, epochs: int, method: str,
                   teacher: Optional[torch.nn.Module] = None) -> Phase:
        """A phase ready to train: its network (seeded per phase), the method around it, DDP, the SGD
        optimiser and the lr schedule (steps with ``--lr-steps``, else cosine)."""
        config = self.config
        torch.manual_seed(config.seed + PHASE_SEEDS[name])
        model = self.network(arch)
        source = self.teacher_source(name, M.method_class(method))
        views = config.rotations if teacher is not None or source == CACHE else 1
        distill = self.build_distillation(name, method, model, teacher, views)
        step: nn.Module = distill
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            step = DDP(distill, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                       find_unused_parameters=not distill.distiller.uses_all_parameters)
        params = list(model.parameters()) + list(distill.distiller.parameters())
        opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=config.weight_decay,
                              nesterov=config.nesterov)
        if config.lr_steps:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, config.lr_steps, 0.1)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return Phase(name, model, step, opt, sched, epochs, arch, distill.distiller, distill.teacher, views,
                     teacher_source=source)

    def source(self, phase: Phase) -> StepBatches:
        """The batches a phase trains on, ``(x, y, extras)``: with --teacher-cache, the student's replay
        the cache (the same views, checked, with the teacher's stored outputs); every other phase
        reads the data itself."""
        if phase.teacher_source == CACHE:
            from .replay import CachedSource

            return CachedSource(self.train, self.cache, self.device, phase.views, wrap=self.config.cache_wrap)
        return LiveBatches(self.train)

    def load_teacher(self, path: str) -> torch.nn.Module:
        """The teacher of ``--teacher-arch`` with the weights at ``path``, frozen (:meth:`frozen`)."""
        teacher = build_model(self.config.teacher_arch, self.num_classes, path, in_channels=self.input_shape()[0])
        return self.frozen(teacher)

    def frozen(self, teacher: torch.nn.Module) -> torch.nn.Module:
        """A teacher ready to give outputs on the run's device, precision and layout (:func:`.placement.frozen`)."""
        return frozen(teacher, self.placement, self.config.compile)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs ``mlkd-train`` with ``argv`` (default: the command line). Returns the summary written to
    ``<out>/summary.json``, or ``{"interrupted": True}`` when stopped (checkpoint saved). For use from
    Python: errors are raised (the user's as :class:`~.errors.UserError` or ``SystemExit``); the command
    line's exit status and one-line messages are :func:`mlkd_fast.train.__main__.main`'s."""
    return run_parsed(parse_args(argv))


def run_parsed(config: TrainConfig) -> dict:
    """:func:`main` with the arguments already parsed by :func:`~.cli.parse_args`."""
    summary = train_all(config)  # its DDP modules are gone with it (shutdown_distributed says why)
    # a stopped run may have stopped its ranks at different steps: no barrier then (it would hang)
    shutdown_distributed(wait_for_all="interrupted" not in summary)
    return summary


def check_out(config: TrainConfig) -> None:
    """The ``--out`` checks, before anything is read or written: a folder (not a file) that can be
    written; one holding a run (or a teacher cache) only with ``--resume`` (continue it) or
    ``--overwrite`` (move it aside once every other check has passed), each refusal one line naming
    the folder, what it holds and the flags that proceed. Under torchrun every process looks; the main one
    writes only once all have (:func:`train_all`'s all-reduce before the first write)."""
    out = config.out
    if config.resume and config.overwrite:
        raise InputError("--resume continues the run in --out and --overwrite moves it aside to start afresh: "
                         "give one of them")
    check_writable(out)
    if not os.path.isdir(out) or config.overwrite:
        return
    run_files, cache_files = present(out, RUN_FILES), present(out, CACHE_FILES)
    aside = f"{os.path.normpath(out)}.old-<time>"
    if cache_files:
        raise InputError(f"--out {out!r} holds a teacher cache ({', '.join(cache_files)}), not a run: give another "
                         f"--out, or --overwrite to move it aside to {aside!r} and start afresh")
    if config.resume:
        if "checkpoint.pt" not in run_files and "summary.json" in run_files:
            raise InputError(f"--resume: {out!r} holds a finished run ({', '.join(run_files)}) but no checkpoint.pt "
                             f"to continue from: --overwrite moves it aside to {aside!r} to start afresh, or give "
                             f"another --out")
        return
    if run_files:
        raise InputError(f"--out {out!r} holds a run ({', '.join(run_files)}): add --resume to continue it, or "
                         f"--overwrite to move it aside to {aside!r} and start afresh, or give another --out")


def prepare_out(config: TrainConfig, main_rank: bool) -> None:
    """The first write of the run, after every check passed: with ``--overwrite`` the folder's previous
    run (or cache) is moved aside (said on stderr), then the folder is created."""
    out = config.out
    if not main_rank:
        return
    if config.overwrite and os.path.isdir(out) and (present(out, RUN_FILES) or present(out, CACHE_FILES)):
        moved = move_aside(out)
        print(f"mlkd-train: --overwrite: moved the previous contents of {out} to {moved}", file=sys.stderr,
              flush=True)
    os.makedirs(out, exist_ok=True)


@dataclass
class PhasePlan:
    """What this invocation trains after the teacher: the phases not finished (or finished with another
    ``--epochs``: trained on from their final state), those final states, and the first phase, built
    already (a checkpoint that does not fit it fails before the folder is touched)."""

    todo: list[tuple[str, str]]                    # (phase, method)
    finals: dict[str, dict] = field(default_factory=dict)
    built: dict[str, Phase] = field(default_factory=dict)


def train_all(config: TrainConfig) -> dict:
    """Trains every phase of ``config`` (resuming from the checkpoint with ``--resume``); returns the
    summary also written to ``<out>/summary.json``, or ``{"interrupted": True}``.

    Every check of what was given (flags, ``--out``, data, teacher weights or cache, the method's
    options, the resume checkpoint and its settings, optional packages) runs before anything is
    written: a failing command leaves an existing folder as it was."""
    check_out(config)
    if config.tensorboard:
        check_tensorboard()
    run = Run(config)
    config = run.config  # with --teacher-cache: the cache's teacher architecture
    ckpt_path = os.path.join(config.out, "checkpoint.pt")
    settings = resume_config(config, run)
    resume_state = load_checkpoint(ckpt_path) if config.resume and os.path.isfile(ckpt_path) else None
    if resume_state is not None:
        check_resume(ckpt_path, resume_state, settings)
        check_lengths(resume_state, config)
    done: dict[str, Any] = dict(resume_state.get("completed", {})) if resume_state else {}

    # ---- everything that can fail on what was given, before the folder is touched ----
    teacher, teacher_phase = build_teacher(run, done, resume_state)
    plan = plan_phases(run, done, resume_state, teacher, teacher_phase)
    if teacher_phase is not None and resume_state is not None and resume_state["phase"] == "teacher":
        teacher_phase.load(resume_state)  # the teacher stopped mid-way continues

    # ---- the folder: from here on it is written ----
    write_run_folder(run, settings, resume_state)
    metrics = RunLogs(config.out, bool(resume_state), config.tensorboard, config.quiet) if run.dist.main else None
    try:
        return _train_phases(run, settings, resume_state, done, metrics, teacher, teacher_phase, plan)
    except NonFiniteLossError as exc:
        kept = (f"the last checkpoint, {ckpt_path}, is kept (finite weights)" if os.path.isfile(ckpt_path)
                else "no checkpoint was saved before it")
        raise NonFiniteLossError(f"{exc}; stopped: {kept}. Lower --lr, or --on-nonfinite skip to skip such "
                                 f"steps") from None
    finally:
        if metrics is not None:
            metrics.close()


def build_teacher(run: Run, done: dict[str, Any],
                  resume_state: Optional[dict]) -> tuple[Optional[nn.Module], Optional[Phase]]:
    """The student's teacher network, or the phase that trains it first: given (``--teacher-weights``);
    trained here for ``--teacher-epochs`` from scratch, or from the weights with a new classifier
    (``--teacher-new-head``), never retrained once finished (the student learnt from it); random on
    synthetic data (enough to measure throughput); none with a teacher cache or a method without one."""
    config = run.config
    if run.cache is not None or not (config.method_class.needs_teacher or config.teacher_epochs > 0):
        return None, None
    if config.teacher_weights and not config.teacher_new_head:
        return run.load_teacher(config.teacher_weights), None
    if not run.data.kind.has_samples:
        return run.frozen(build_model(config.teacher_arch, run.num_classes, in_channels=run.input_shape()[0])), None
    teacher_phase = run.make_phase("teacher", config.teacher_arch, config.teacher_epochs, M.baseline())
    if "teacher" in done:
        load_weights(teacher_phase.model, os.path.join(config.out, "teacher.pt"), config.teacher_arch)
        if done["teacher"].get("last_epoch", config.teacher_epochs) != config.teacher_epochs and run.dist.main:
            print(f"mlkd-train: the teacher finished its {done['teacher']['last_epoch']} epochs before: "
                  f"--teacher-epochs {config.teacher_epochs} does not retrain it", file=sys.stderr)
        return run.frozen(teacher_phase.model), None
    if config.teacher_new_head and not (resume_state is not None and resume_state["phase"] == "teacher"):
        load_weights(teacher_phase.model, config.teacher_weights, config.teacher_arch, new_head=True)
    return None, teacher_phase


def plan_phases(run: Run, done: dict[str, Any], resume_state: Optional[dict], teacher: Optional[nn.Module],
                teacher_phase: Optional[Phase]) -> PhasePlan:
    """The student (and with ``--compare-baseline`` the baseline) phases still to train, their final
    states where they train on, and the first of them built now, in the order of draws a run without
    a teacher phase makes; when a teacher trains first, the student's method is built on stand-ins
    instead (:func:`~.preflight.check_student_method`), so that a bad option fails before it trains."""
    config = run.config
    phases = [("student", config.method)] + ([("baseline", M.baseline())] if config.compare_baseline else [])
    plan = PhasePlan([(name, method) for name, method in phases
                      if name not in done or done[name].get("last_epoch", config.epochs) != config.epochs])
    plan.finals = {name: final_state(config.out, name) for name, _ in plan.todo
                   if name in done and not (resume_state is not None and resume_state["phase"] == name)}
    if plan.todo and teacher_phase is None:
        name, method = plan.todo[0]
        plan.built[name] = run.make_phase(name, config.arch, config.epochs, method, student_teacher(run, name, teacher))
        state = resume_state if resume_state is not None and resume_state["phase"] == name else plan.finals.get(name)
        if state is not None:
            plan.built[name].load(state)  # a checkpoint that does not fit fails here (loaded again when it trains)
    elif any(name == "student" for name, _ in plan.todo):
        check_student_method(run)
    return plan


def student_teacher(run: Run, phase: str, teacher: Optional[nn.Module]) -> Optional[nn.Module]:
    """The teacher network a phase distils from: the student's, when its method needs one; no other phase has one."""
    return teacher if phase == "student" and run.config.method_class.needs_teacher else None


def write_run_folder(run: Run, settings: dict[str, Any], resume_state: Optional[dict]) -> None:
    """The first writes, once every process has made every check: the folder (the previous run moved
    aside with ``--overwrite``) and ``config.json``: every flag's value (``--config FILE`` replays it)
    and what the run made of them."""
    config = run.config
    if run.dist.enabled:  # every process has made every check (--out included) before the main one writes
        sum_across([0.0], run.device)
    prepare_out(config, run.dist.main)
    if run.dist.main:
        write_json_atomic(os.path.join(config.out, "config.json"), {
            **config.recorded(), "world_size": run.dist.world, "device_used": str(run.device), "lr_used": run.lr,
            "precision_used": settings["precision"], "data_sha256": settings["data_sha256"],
            "teacher_sha256": settings["teacher_sha256"]})
    ckpt_path = os.path.join(config.out, "checkpoint.pt")
    if config.resume and resume_state is None and run.dist.main:
        print(f"mlkd-train: --resume but no {ckpt_path}: starting afresh", file=sys.stderr)


def _held_final_state(resume_state: Optional[dict], done: dict[str, Any]) -> Optional[str]:
    """The finished, extendable phase whose final state checkpoint.pt holds (its only copy): kept as
    ``<phase>_state.pt`` before another phase's checkpoints replace it."""
    if resume_state is not None and resume_state["phase"] in EXTENDABLE and resume_state["phase"] in done \
            and resume_state["step"] == 0 and resume_state["epoch"] == done[resume_state["phase"]].get("last_epoch"):
        return resume_state["phase"]
    return None


def _train_phases(run: Run, settings: dict[str, Any], resume_state: Optional[dict], done: dict[str, Any],
                  metrics: Optional[RunLogs], teacher: Optional[nn.Module], teacher_phase: Optional[Phase],
                  plan: PhasePlan) -> dict:
    """:func:`train_all` once the folder is prepared: the teacher (when it trains here), then the
    student and the baseline, the curves and the summary; ``{"interrupted": True}`` when stopped."""
    config = run.config
    start = time.perf_counter()
    summary: dict[str, Any] = {"method": config.method, "loss": config.method, "world_size": run.dist.world,
                               **run.info}
    if run.cache is not None:
        summary["teacher_cache"] = os.path.abspath(config.teacher_cache)
    with StopFlag() as stop:
        phases = PhaseTrainer(run, run_context(run, settings, metrics, stop, done), resume_state, plan.finals, done)
        if teacher_phase is not None:
            if not phases.train(teacher_phase):
                return {"interrupted": True}
            teacher = run.frozen(teacher_phase.model)
        if "teacher" in done:
            summary["teacher_top1"] = done["teacher"]["last_top1"]
            summary["teacher_top5"] = done["teacher"].get("last_top5")
        for name, method in plan.todo:
            phase = plan.built.pop(name, None) or run.make_phase(name, config.arch, config.epochs, method,
                                                                 student_teacher(run, name, teacher))
            if not phases.train(phase):
                return {"interrupted": True}
        if metrics is not None and config.curves and phases.trained:
            metrics.close()
            try:
                plot_curves(config.out)
            except Exception as exc:  # a plot must never cost the run its summary
                print(f"mlkd-train: curves.png not drawn: {type(exc).__name__}: {exc}", file=sys.stderr)
        if resume_state is not None and not phases.trained and run.dist.main:
            print(f"mlkd-train: the run in {config.out} is finished ({config.epochs} epoch"
                  f"{'s' * (config.epochs != 1)}): nothing to train (--resume with a larger --epochs trains it on)",
                  file=sys.stderr, flush=True)
    summary.update(phase_results(done, run))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary = {k: (None if isinstance(v, float) and v != v else v) for k, v in summary.items()}  # NaN: no eval
    return write_summary(summary, run, bool(phases.trained)) if run.dist.main else summary


def run_context(run: Run, settings: dict[str, Any], metrics: Optional[RunLogs], stop: StopFlag,
                done: dict[str, Any]) -> RunContext:
    """What the loop needs of the run besides a phase: device, processes, precision, the checkpoint
    path and the settings it records, the logs, the stop flag, the logging and stopping flags."""
    config = run.config

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.epoch(record)

    return RunContext(run.device, run.dist, run.amp_dtype, os.path.join(config.out, "checkpoint.pt"), log, stop,
                      progress=not config.quiet, max_steps=config.max_steps, completed=done, config=settings,
                      log_steps=metrics.step_records if metrics is not None else None,
                      log_every=config.log_every, eval_every=config.eval_every, on_nonfinite=config.on_nonfinite)


class PhaseTrainer:
    """Trains the phases of one invocation in turn, each from where it stands (the checkpoint's phase
    resumed; a finished one trained on from its final state to another ``--epochs``; else afresh),
    and saves each finished phase's weights (``<phase>.pt``) and final state (``checkpoint.pt``)."""

    def __init__(self, run: Run, ctx: RunContext, resume_state: Optional[dict], finals: dict[str, dict],
                 done: dict[str, Any]) -> None:
        self.run, self.ctx, self.resume_state, self.finals, self.done = run, ctx, resume_state, finals, done
        # the finished phase whose final state only checkpoint.pt holds: kept aside before it is replaced
        self.held = _held_final_state(resume_state, done)
        self.trained: list[str] = []  # the phases this invocation trains

    def train(self, phase: Phase) -> bool:
        """Runs ``phase``; True when it finished, False when it stopped (its checkpoint saved)."""
        run, out = self.run, self.run.config.out
        ckpt_path = os.path.join(out, "checkpoint.pt")
        state = self.resume_state if self.resume_state is not None and self.resume_state["phase"] == phase.name \
            else None
        if state is None:
            state = self.finals.get(phase.name)
        if self.held is not None and self.held != phase.name and run.dist.main:
            keep_final_state(out, self.held)  # its checkpoint.pt is about to be replaced
        self.held = None
        self.trained.append(phase.name)
        result = run_phase(phase, run.source(phase), run.eval_batches, self.ctx, state, run.val_batches)
        if not result["finished"]:
            if run.dist.main:
                print(f"mlkd-train: stopped in {phase.name} epoch {result['epoch'] + 1} step {result['step']}; "
                      f"checkpoint {ckpt_path} (continue with --resume)", flush=True)
            return False
        self.done[phase.name] = {k: v for k, v in result.items() if k != "finished"}
        if run.dist.main:
            save_checkpoint(os.path.join(out, f"{phase.name}.pt"), {"model": phase.model.state_dict(),
                                                                   "arch": phase.arch})
            # the final state, for a later --resume with a larger --epochs (one copy, in checkpoint.pt)
            save_checkpoint(ckpt_path, phase.state(phase.epochs, 0, self.done, self.ctx.config))
        if phase.name in EXTENDABLE:
            self.held = phase.name
        return True


def phase_results(done: dict[str, Any], run: Run) -> dict[str, Any]:
    """What the summary reports of the finished student (and baseline)."""
    s = done["student"]
    results: dict[str, Any] = {}
    if s.get("last_val_top1") is not None:
        results["val_top1"] = s["last_val_top1"]
        results["val_balanced_top1"] = s.get("last_val_balanced_top1")
    results.update(student_top1=s["last_top1"], student_top5=s.get("last_top5"),
                   balanced_top1=s.get("last_balanced_top1"), best_top1=s["best_top1"],
                   best_epoch=s["best_epoch"], last_epoch=s["last_epoch"], images_per_s=round(s["images_per_s"], 1),
                   corrupt_images=run.train.corrupt)
    if "baseline" in done:
        results["baseline_top1"] = done["baseline"]["last_top1"]
        results["baseline_top5"] = done["baseline"].get("last_top5")
    return results


def write_summary(summary: dict[str, Any], run: Run, trained: bool) -> dict[str, Any]:
    """``summary.json`` (a run that trained nothing keeps its own, with its training time) and the
    one line that reports it; returns the summary as written."""
    out = run.config.out
    summary_path = os.path.join(out, "summary.json")
    if trained or not os.path.isfile(summary_path):
        write_json_atomic(summary_path, summary)
    else:
        with open(summary_path) as f:
            summary = json.load(f)
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}%"  # noqa: E731
    line = f"student ({run.config.method}) top-1 {fmt(summary['student_top1'])}"
    if summary.get("student_top5") is not None:
        line += f" top-5 {fmt(summary['student_top5'])}"
    if "teacher_top1" in summary:
        line = f"teacher top-1 {fmt(summary['teacher_top1'])}  " + line
    if "baseline_top1" in summary:
        line += f"  CE-only baseline top-1 {fmt(summary['baseline_top1'])}"
    print(line + f"  {summary['images_per_s']:.0f} img/s ({summary['seconds']} s) -> "
          f"{os.path.join(out, 'summary.json')}", flush=True)
    return summary


# What a checkpoint must share with the run that resumes it: the networks, the objective, the
# training data and its order, the optimisation. A resume with other values would continue a different
# run silently (or, for the optimiser's settings, ignore them while config.json recorded them).
RESUME_SETTINGS = ("arch", "teacher_arch", "method", "method_options", "num_classes", "rotations", "temperature",
                   *gather_hook_dests(), "seed", "label_noise", "noise_type", "imbalance",
                   "train_per_class", "subset_seed", "val_fraction", "lr_steps", "teacher_new_head", "nesterov", "lr",
                   "scale_lr", "weight_decay", "batch_size", "sync_bn", "cache_wrap", "image_size", "steps_per_epoch",
                   "decode")
# ... and what the run made of its inputs (resume_config): the data's and the teacher's identity, precision
DERIVED_SETTINGS = ("data_sha256", "teacher_sha256", "precision")
# Not among them: --epochs and --teacher-epochs. A resume with another count trains the phase to it on
# the schedule of a run of that length (loop.fit_schedule); a finished student or baseline trains on
# from its final state (in checkpoint.pt, or <out>/<phase>_state.pt once another phase followed it; the
# teacher is never retrained once finished). Nor what does not change the numbers a run computes (the
# device, workers, backend, compile, the logging flags): cli.py's --resume help lists them.
EXTENDABLE = ("student", "baseline")
# Also these when stopped mid-epoch: the saved step index counts global batches of this size.
MID_EPOCH_SETTINGS = ("world_size",)
_SETTING_NAMES = {"num_classes": "number of classes (--num-classes, or the class folders of --data)",
                  "world_size": "number of processes (torchrun --nproc_per_node)",
                  "data_sha256": "training data (--data and its corruption flags; sha256 of its images and labels, "
                                 "or of its file list)",
                  "teacher_sha256": "teacher's weights (sha256 of --teacher-weights, or of the teacher cache's)",
                  "precision": "precision (--precision, as resolved on the device)"}


def resume_config(config: TrainConfig, run: Run) -> dict[str, Any]:
    """The settings stored in every checkpoint and compared by :func:`check_resume`: the flags of
    :data:`RESUME_SETTINGS` (image size only where the data has one), and the identity of the data (the
    sha256 of the teacher cache's manifest: :func:`~.replay.data_identity`) and of the teacher's weights."""
    from .replay import data_identity, file_sha256

    settings = {k: getattr(config, k, None) for k in RESUME_SETTINGS + MID_EPOCH_SETTINGS}
    kind = run.data.kind
    if not kind.takes_image_size:
        settings["image_size"] = None  # digits, mnist5k and CIFAR have their own size: the flag changes nothing
    if not kind.decodes_files:
        settings["decode"] = None  # only folder images are decoded
    if run.cache is not None:
        teacher = run.cache.manifest["teacher"]["weights_sha256"]
    elif config.teacher_weights:
        if not os.path.isfile(config.teacher_weights):
            raise MissingInputError(f"weights file {config.teacher_weights!r} does not exist")
        teacher = file_sha256(config.teacher_weights)
    else:
        teacher = None
    settings.update(num_classes=run.num_classes, world_size=run.dist.world,
                    data_sha256=data_identity(run)["sha256"] if kind.has_samples else None, teacher_sha256=teacher,
                    precision="bf16" if run.amp_dtype is not None else "fp32")
    return settings


def _shown(key: str, value: Any) -> str:
    """A setting's value as an error message shows it."""
    if key in ("data_sha256", "teacher_sha256") and isinstance(value, str):
        return repr(value[:12])
    if key == "lr_steps" and value is None:
        return "cosine"
    return repr(value)


def check_resume(path: str, ckpt: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuses a checkpoint written with other settings, naming each one and both values (one line).
    A setting the checkpoint lacks (written by an older version) is not compared."""
    saved = ckpt.get("config") or {}  # absent in older checkpoints: the architecture is still checked on load
    keys = RESUME_SETTINGS + DERIVED_SETTINGS + (MID_EPOCH_SETTINGS if ckpt.get("step") else ())
    differ = [k for k in keys if k in saved and saved[k] != config.get(k)]
    if differ:
        detail = "; ".join(f"{_SETTING_NAMES.get(k, '--' + k.replace('_', '-'))} is {_shown(k, saved[k])} in the "
                           f"checkpoint but {_shown(k, config.get(k))} in this run" for k in differ)
        raise InputError(f"--resume: {path!r} was written with other settings: {detail}. Resume with the "
                         f"checkpoint's settings, or --overwrite (moves the run aside) or another --out to start "
                         f"afresh")


def final_state_path(out: str, phase: str) -> str:
    """Where a finished student or baseline keeps its final training state once another phase's
    checkpoints have replaced it in checkpoint.pt (:func:`keep_final_state`)."""
    return os.path.join(out, f"{phase}_state.pt")


def keep_final_state(out: str, phase: str) -> None:
    """checkpoint.pt, which holds ``phase``'s final state, also as ``<phase>_state.pt``: a hard link (no
    second copy on disk; the next atomic save of checkpoint.pt replaces only that name), or a copy
    where the file system has no links. Atomic: a temp name, then a rename."""
    src, dst = os.path.join(out, "checkpoint.pt"), final_state_path(out, phase)
    tmp = dst + ".tmp-link"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def final_state(out: str, phase: str) -> dict[str, Any]:
    """The final training state of a finished phase whose checkpoint.pt holds another phase, to train
    it on to a larger ``--epochs`` (where checkpoint.pt holds it, the resume state is used instead)."""
    path = final_state_path(out, phase)
    if not os.path.isfile(path):
        raise InputError(f"--resume with another --epochs trains the finished {phase} on from its final state, "
                         f"but {path!r} is missing (runs of older versions kept only the last phase's, in "
                         f"checkpoint.pt): --overwrite (moves the run aside) or another --out trains afresh")
    state = load_checkpoint(path)
    if state["phase"] != phase:
        raise InputError(f"{path!r} holds the {state['phase']!r} phase, not the {phase}")
    return state


def check_lengths(ckpt: dict[str, Any], config: TrainConfig) -> None:
    """Refuses a resume whose --epochs (or --teacher-epochs, for a teacher still training) is fewer than
    what the checkpoint's phases have trained already: they cannot be untrained."""
    completed = ckpt.get("completed") or {}
    phases = [(ckpt["phase"], ckpt["epoch"], ckpt["step"])] if ckpt["phase"] not in completed else []
    phases += [(name, done["last_epoch"], 0) for name, done in completed.items()
               if name in EXTENDABLE and "last_epoch" in done]  # a finished teacher is never retrained
    for name, epoch, step in phases:
        flag, wanted = ("--teacher-epochs", config.teacher_epochs) if name == "teacher" else ("--epochs", config.epochs)
        if epoch > wanted or (epoch == wanted and step > 0):
            trained = f"{epoch} epoch(s)" + (f" and {step} step(s)" if step else "")
            raise InputError(f"--resume: the {name} has trained {trained} already, more than {flag} {wanted}: "
                             f"give {flag} {epoch + (step > 0)} or more, or another --out to start afresh")



