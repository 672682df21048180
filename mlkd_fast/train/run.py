"""One invocation of ``mlkd-train``: its data, networks and phases (teacher, student, baseline),
checkpoints and resume checks. :func:`train_all` runs them in order; :mod:`.loop` trains each."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .. import methods as M
from . import data as D
from .checkpoint import (CACHE_FILES, RUN_FILES, check_writable, load_checkpoint, move_aside, present,
                         save_checkpoint, write_json_atomic)
from .cli import parse_args
from .distributed import convert_sync_batchnorm, gather_with_grad, init_distributed, shutdown_distributed, sum_across
from .errors import InputError, MissingInputError
from .logs import RunLogs, check_tensorboard, plot_curves
from .loop import NonFiniteLossError, Phase, RunContext, StopFlag, run_phase
from .models import build_model, load_weights
from .preflight import check_student_method
from .training_data import data_kind, load_training_data


def _device(args) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("mlkd-train: --device cuda but no CUDA GPU is visible")
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


class Run:
    """The data, models and phases of one invocation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = _device(args)
        self.dist = init_distributed(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank if self.dist.enabled else torch.cuda.current_device())
        on_cuda = self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and on_cuda) else None
        kind = data_kind(args.data)
        self.channels_last = args.channels_last == "on" or (args.channels_last == "auto" and on_cuda
                                                              and kind.channels_last_pays)
        self.shard = D.Shard(args.batch_size, self.dist.rank, self.dist.world)
        self.lr = args.lr * (self.dist.world if args.scale_lr else 1)
        if args.sync_bn and not self.dist.enabled:
            print("mlkd-train: --sync-bn does nothing in a single process (BatchNorm already sees the whole "
                  "batch)", file=sys.stderr)
        self.data = load_training_data(args, self.shard, self.device, self.channels_last)
        self.info: dict[str, Any] = dict(self.data.info)  # what the summary reports of the run's inputs
        self.cache = None  # --teacher-cache: the teacher's outputs come from it, no teacher network is built
        if args.teacher_cache is not None:
            from .replay import TeacherCache

            self.cache = TeacherCache.open(args.teacher_cache)
            self.cache.check_run(self)  # the same teacher, data, views, seed (an error naming each field)
            args.teacher_arch = self.cache.teacher_arch
            if "top1" in self.cache.manifest["teacher"]:
                self.info.update(teacher_top1=self.cache.manifest["teacher"]["top1"],
                                 teacher_top5=self.cache.manifest["teacher"].get("top5"))

    # ---- data -----------------------------------------------------------------------------
    # what other modules read of the run's data (the cache writer and replay, benchmarks): the data object's
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

    # ---- models and phases ----------------------------------------------------------------
    def input_shape(self) -> tuple[int, int, int]:
        return self.data.input_shape

    def _network(self, arch: str) -> nn.Module:
        model = build_model(arch, self.num_classes, in_channels=self.input_shape()[0]).to(self.device)
        if self.args.sync_bn and self.dist.enabled:
            model = convert_sync_batchnorm(model, self.device.type)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def data_facts(self) -> dict[str, Any]:
        """What a method's ``data_options`` may ask of the training data."""
        return {"num_samples": self.train_size}

    def build_distillation(self, phase: str, method: str, model: nn.Module, teacher: Optional[nn.Module],
                           views: int) -> M.Distillation:
        """The student, the teacher and the method as one module, with the run's options: the student
        phase's method takes ``--method-opt`` (the teacher and baseline phases never see them), and
        every method takes what its traits ask of the run (``--temperature`` and ``--backend`` where
        it has those options, the rotation views where it takes views, the data facts of its
        ``data_options``, peers built like the student, its gather hooks under DDP)."""
        a = self.args
        cls = M.method_class(method)
        known = cls.options()
        options = dict(a.method_options) if phase == "student" else {}
        if a.temperature is not None and "temperature" in known:
            options.setdefault("temperature", a.temperature)
        if "backend" in known:
            options.setdefault("backend", a.backend)
        if cls.takes_views:
            options.setdefault("views", views)
        facts = self.data_facts()
        for option, fact in cls.data_options.items():
            if options.get(option) is None and facts.get(fact) is not None:
                options[option] = facts[fact]
        cached = phase == "student" and self.cache is not None and cls.needs_teacher  # outputs from the cache
        try:  # what the method finds missing in this run (crd's indices on synthetic data, stages) is the user's
            distill = M.Distillation(torch.compile(model) if a.compile else model,
                                     teacher if cls.needs_teacher and not cached else None, method,
                                     input_shape=self.input_shape(), peer_factory=lambda: self._network(a.arch),
                                     teacher_spec=self.cache.teacher_spec if cached else None, **options)
        except ValueError as exc:
            raise InputError(f"--method {a.method if phase == 'student' else method}: {exc}") from exc
        if cached:  # what the cache cannot give (stage maps, a live teacher, features it lacks): from the traits
            self.cache.check_method(distill.distiller, a.method)
        distill = distill.to(self.device)
        if a.sync_bn and self.dist.enabled:
            distill.distiller = convert_sync_batchnorm(distill.distiller, self.device.type)
        if self.dist.enabled:
            for hook, always in cls.gather_hooks.items():
                if always or getattr(a, f"global_{hook}", False):
                    distill.distiller.set_gather(hook, gather_with_grad)
        return distill

    def make_phase(self, name: str, arch: str, epochs: int, method: str,
                   teacher: Optional[torch.nn.Module] = None) -> Phase:
        a = self.args
        torch.manual_seed(a.seed + {"teacher": 0, "student": 100, "baseline": 100}[name])
        model = self._network(arch)
        cached = name == "student" and self.cache is not None and M.method_class(method).needs_teacher
        views = a.rotations if teacher is not None or cached else 1
        distill = self.build_distillation(name, method, model, teacher, views)
        step: nn.Module = distill
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            step = DDP(distill, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                       find_unused_parameters=not distill.distiller.uses_all_parameters)
        params = list(model.parameters()) + list(distill.distiller.parameters())
        opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=a.weight_decay, nesterov=a.nesterov)
        if a.lr_steps:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, a.lr_steps, 0.1)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return Phase(name, model, step, opt, sched, epochs, arch, distill.distiller, distill.teacher, views)

    def source(self, phase: Phase):
        """The training source of a phase: with --teacher-cache, the student's replays the cache (the same
        views, checked, with the teacher's stored outputs); every other phase reads the data itself."""
        if self.cache is not None and phase.name == "student" and phase.distiller.needs_teacher:
            from .replay import CachedSource

            return CachedSource(self.train, self.cache, self.device, phase.views, wrap=self.args.cache_wrap)
        return self.train

    def load_teacher(self, path: str) -> torch.nn.Module:
        teacher = build_model(self.args.teacher_arch, self.num_classes, path, in_channels=self.input_shape()[0])
        return self.frozen(teacher)

    def frozen(self, teacher: torch.nn.Module) -> torch.nn.Module:
        teacher = teacher.to(self.device).eval().requires_grad_(False)
        if self.amp_dtype is not None and self.device.type == "cuda":
            teacher = teacher.to(self.amp_dtype)
        if self.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        return torch.compile(teacher) if self.args.compile else teacher


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs ``mlkd-train`` with ``argv`` (default: the command line). Returns the summary written to
    ``<out>/summary.json``, or ``{"interrupted": True}`` when stopped (checkpoint saved). For use from
    Python: errors are raised (the user's as :class:`~.errors.UserError` or ``SystemExit``); the command
    line's exit status and one-line messages are :func:`mlkd_fast.train.__main__.main`'s."""
    return run_parsed(parse_args(argv))


def run_parsed(args: argparse.Namespace) -> dict:
    """:func:`main` with the arguments already parsed by :func:`~.cli.parse_args`."""
    summary = train_all(args)  # its DDP modules are gone with it (shutdown_distributed says why)
    # a stopped run may have stopped its ranks at different steps: no barrier then (it would hang)
    shutdown_distributed(wait_for_all="interrupted" not in summary)
    return summary


def check_out(args: argparse.Namespace) -> None:
    """The ``--out`` checks, before anything is read or written: a folder (not a file) that can be
    written; one holding a run (or a teacher cache) only with ``--resume`` (continue it) or
    ``--overwrite`` (move it aside once every other check has passed), each refusal one line naming
    the folder, what it holds and the flags that proceed. Under torchrun every process looks; the main one
    writes only once all have (:func:`train_all`'s all-reduce before the first write)."""
    out = args.out
    if args.resume and args.overwrite:
        raise InputError("--resume continues the run in --out and --overwrite moves it aside to start afresh: "
                         "give one of them")
    check_writable(out)
    if not os.path.isdir(out) or args.overwrite:
        return
    run_files, cache_files = present(out, RUN_FILES), present(out, CACHE_FILES)
    aside = f"{os.path.normpath(out)}.old-<time>"
    if cache_files:
        raise InputError(f"--out {out!r} holds a teacher cache ({', '.join(cache_files)}), not a run: give another "
                         f"--out, or --overwrite to move it aside to {aside!r} and start afresh")
    if args.resume:
        if "checkpoint.pt" not in run_files and "summary.json" in run_files:
            raise InputError(f"--resume: {out!r} holds a finished run ({', '.join(run_files)}) but no checkpoint.pt "
                             f"to continue from: --overwrite moves it aside to {aside!r} to start afresh, or give "
                             f"another --out")
        return
    if run_files:
        raise InputError(f"--out {out!r} holds a run ({', '.join(run_files)}): add --resume to continue it, or "
                         f"--overwrite to move it aside to {aside!r} and start afresh, or give another --out")


def prepare_out(args: argparse.Namespace, main_rank: bool) -> None:
    """The first write of the run, after every check passed: with ``--overwrite`` the folder's previous
    run (or cache) is moved aside (said on stderr), then the folder is created."""
    out = args.out
    if not main_rank:
        return
    if args.overwrite and os.path.isdir(out) and (present(out, RUN_FILES) or present(out, CACHE_FILES)):
        moved = move_aside(out)
        print(f"mlkd-train: --overwrite: moved the previous contents of {out} to {moved}", file=sys.stderr,
              flush=True)
    os.makedirs(out, exist_ok=True)


def train_all(args: argparse.Namespace) -> dict:
    """Trains every phase of ``args`` (resuming from the checkpoint with ``--resume``); returns the
    summary also written to ``<out>/summary.json``, or ``{"interrupted": True}``.

    Every check of what was given (flags, ``--out``, data, teacher weights or cache, the method's
    options, the resume checkpoint and its settings, optional packages) runs before anything is
    written: a failing command leaves an existing folder as it was."""
    check_out(args)
    if args.tensorboard:
        check_tensorboard()
    run = Run(args)
    out = args.out
    main_rank = run.dist.main
    ckpt_path = os.path.join(out, "checkpoint.pt")
    config = resume_config(args, run)
    resume_state = load_checkpoint(ckpt_path) if args.resume and os.path.isfile(ckpt_path) else None
    if resume_state is not None:
        check_resume(ckpt_path, resume_state, config)
        check_lengths(resume_state, args)
    done: dict[str, Any] = dict(resume_state.get("completed", {})) if resume_state else {}
    uses_teacher = M.method_class(args.method).needs_teacher
    baseline = M.baseline()  # plain training: the teacher phase and --compare-baseline

    # ---- everything that can fail on what was given, before the folder is touched ----
    # teacher: given (--teacher-weights); or trained here on digits or folder data for --teacher-epochs, from
    # scratch, or from the weights with a new classifier (--teacher-new-head); or random (synthetic)
    teacher, teacher_phase = None, None
    if run.cache is None and (uses_teacher or args.teacher_epochs > 0):  # with a cache: no teacher at all
        if args.teacher_weights and not args.teacher_new_head:
            teacher = run.load_teacher(args.teacher_weights)
        elif run.data.kind.has_samples:
            teacher_phase = run.make_phase("teacher", args.teacher_arch, args.teacher_epochs, baseline)
            if "teacher" in done:  # never retrained: the student learnt from it
                load_weights(teacher_phase.model, os.path.join(out, "teacher.pt"), args.teacher_arch)
                teacher, teacher_phase = run.frozen(teacher_phase.model), None
                if done["teacher"].get("last_epoch", args.teacher_epochs) != args.teacher_epochs and main_rank:
                    print(f"mlkd-train: the teacher finished its {done['teacher']['last_epoch']} epochs before: "
                          f"--teacher-epochs {args.teacher_epochs} does not retrain it", file=sys.stderr)
            elif args.teacher_new_head and not (resume_state is not None and resume_state["phase"] == "teacher"):
                load_weights(teacher_phase.model, args.teacher_weights, args.teacher_arch, new_head=True)
        else:  # synthetic: a random teacher is enough to measure throughput
            teacher = run.frozen(build_model(args.teacher_arch, run.num_classes, in_channels=run.input_shape()[0]))
    phases = [("student", args.method)] + ([("baseline", baseline)] if args.compare_baseline else [])
    # the phases to train: not finished, or finished with another --epochs (trained on from their final state)
    todo = [(name, loss) for name, loss in phases
            if name not in done or done[name].get("last_epoch", args.epochs) != args.epochs]
    finals = {name: final_state(out, name) for name, _ in todo
              if name in done and not (resume_state is not None and resume_state["phase"] == name)}
    built: dict[str, Phase] = {}
    if todo and teacher_phase is None:  # the first phase to train is built now (the same order of draws as later)
        name, loss = todo[0]
        built[name] = run.make_phase(name, args.arch, args.epochs, loss,
                                     teacher if name == "student" and uses_teacher else None)
        state = resume_state if resume_state is not None and resume_state["phase"] == name else finals.get(name)
        if state is not None:
            built[name].load(state)  # a checkpoint that does not fit fails here (loaded again when it trains)
    elif any(name == "student" for name, _ in todo):  # the teacher trains first: its student's method is built now
        check_student_method(run)
    if resume_state is not None and teacher_phase is not None and resume_state["phase"] == "teacher":
        teacher_phase.load(resume_state)

    # ---- the folder: from here on it is written ----
    if run.dist.enabled:  # every process has made every check (--out included) before the main one writes
        sum_across([0.0], run.device)
    prepare_out(args, main_rank)
    if main_rank:
        # every flag's value (--config FILE replays it) and what the run made of them
        write_json_atomic(os.path.join(out, "config.json"), {
            **vars(args), "world_size": run.dist.world, "device_used": str(run.device), "lr_used": run.lr,
            "precision_used": config["precision"], "data_sha256": config["data_sha256"],
            "teacher_sha256": config["teacher_sha256"]})
    if args.resume and resume_state is None and main_rank:
        print(f"mlkd-train: --resume but no {ckpt_path}: starting afresh", file=sys.stderr)
    # metrics.jsonl, steps.jsonl, TensorBoard
    metrics = RunLogs(out, bool(resume_state), args.tensorboard, args.quiet) if main_rank else None
    try:
        return _train_phases(args, run, config, resume_state, done, metrics, teacher, teacher_phase, todo, finals,
                             built)
    except NonFiniteLossError as exc:
        kept = (f"the last checkpoint, {ckpt_path}, is kept (finite weights)" if os.path.isfile(ckpt_path)
                else "no checkpoint was saved before it")
        raise NonFiniteLossError(f"{exc}; stopped: {kept}. Lower --lr, or --on-nonfinite skip to skip such "
                                 f"steps") from None
    finally:
        if metrics is not None:
            metrics.close()


def _train_phases(args: argparse.Namespace, run: Run, config: dict[str, Any], resume_state: Optional[dict],
                  done: dict[str, Any], metrics: Optional[RunLogs], teacher: Optional[nn.Module],
                  teacher_phase: Optional[Phase], todo: list[tuple[str, str]], finals: dict[str, dict],
                  built: dict[str, Phase]) -> dict:
    """:func:`train_all` once the folder is prepared: the phases, the curves and the summary."""
    out = args.out
    main_rank = run.dist.main
    ckpt_path = os.path.join(out, "checkpoint.pt")

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.epoch(record)

    start = time.perf_counter()
    summary: dict[str, Any] = {"method": args.method, "loss": args.method, "world_size": run.dist.world, **run.info}
    if run.cache is not None:
        summary["teacher_cache"] = os.path.abspath(args.teacher_cache)
    uses_teacher = M.method_class(args.method).needs_teacher
    # the finished, extendable phase whose final state checkpoint.pt holds (its only copy): kept as
    # <phase>_state.pt before another phase's checkpoints replace it
    held = None
    if resume_state is not None and resume_state["phase"] in EXTENDABLE and resume_state["phase"] in done \
            and resume_state["step"] == 0 and resume_state["epoch"] == done[resume_state["phase"]].get("last_epoch"):
        held = resume_state["phase"]
    with StopFlag() as stop:
        ctx = RunContext(run.device, run.dist, run.amp_dtype, ckpt_path, log, stop,
                         progress=not args.quiet, max_steps=args.max_steps, completed=done, config=config,
                         log_steps=metrics.step_records if metrics is not None else None, log_every=args.log_every,
                         eval_every=args.eval_every, on_nonfinite=args.on_nonfinite)

        trained: list[str] = []  # the phases this invocation trains

        def train(phase: Phase) -> bool:
            """Runs a phase (resuming it if the checkpoint is of it; a finished one trains on from its final
            state to another --epochs); True when it finished."""
            nonlocal held
            state = resume_state if resume_state is not None and resume_state["phase"] == phase.name else None
            if state is None:
                state = finals.get(phase.name)
            if held is not None and held != phase.name and main_rank:
                keep_final_state(out, held)  # its checkpoint.pt is about to be replaced
            held = None
            trained.append(phase.name)
            result = run_phase(phase, run.source(phase), run.eval_batches, ctx, state, run.val_batches)
            if not result["finished"]:
                if main_rank:
                    print(f"mlkd-train: stopped in {phase.name} epoch {result['epoch'] + 1} step {result['step']}; "
                          f"checkpoint {ckpt_path} (continue with --resume)", flush=True)
                return False
            done[phase.name] = {k: v for k, v in result.items() if k != "finished"}
            if main_rank:
                save_checkpoint(os.path.join(out, f"{phase.name}.pt"), {"model": phase.model.state_dict(),
                                                                       "arch": phase.arch})
                # the final state, for a later --resume with a larger --epochs (one copy, in checkpoint.pt)
                save_checkpoint(ckpt_path, phase.state(phase.epochs, 0, done, ctx.config))
            if phase.name in EXTENDABLE:
                held = phase.name
            return True

        if teacher_phase is not None:
            if not train(teacher_phase):
                return {"interrupted": True}
            teacher = run.frozen(teacher_phase.model)
        if "teacher" in done:
            summary["teacher_top1"] = done["teacher"]["last_top1"]
            summary["teacher_top5"] = done["teacher"].get("last_top5")

        for name, loss in todo:
            phase = built.pop(name, None) or run.make_phase(name, args.arch, args.epochs, loss,
                                                            teacher if name == "student" and uses_teacher else None)
            if not train(phase):
                return {"interrupted": True}
        if metrics is not None and args.curves and trained:
            metrics.close()
            try:
                plot_curves(out)
            except Exception as exc:  # a plot must never cost the run its summary
                print(f"mlkd-train: curves.png not drawn: {type(exc).__name__}: {exc}", file=sys.stderr)
        if resume_state is not None and not trained and main_rank:
            print(f"mlkd-train: the run in {out} is finished ({args.epochs} epoch{'s' * (args.epochs != 1)}): "
                  f"nothing to train (--resume with a larger --epochs trains it on)", file=sys.stderr, flush=True)

    s = done["student"]
    if s.get("last_val_top1") is not None:
        summary["val_top1"] = s["last_val_top1"]
    summary.update(student_top1=s["last_top1"], student_top5=s.get("last_top5"), best_top1=s["best_top1"],
                   best_epoch=s["best_epoch"],
                   last_epoch=s["last_epoch"], images_per_s=round(s["images_per_s"], 1),
                   corrupt_images=run.train.corrupt)
    if "baseline" in done:
        summary["baseline_top1"] = done["baseline"]["last_top1"]
        summary["baseline_top5"] = done["baseline"].get("last_top5")
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary = {k: (None if isinstance(v, float) and v != v else v) for k, v in summary.items()}  # NaN: no eval
    if main_rank:
        summary_path = os.path.join(out, "summary.json")
        if trained or not os.path.isfile(summary_path):
            write_json_atomic(summary_path, summary)
        else:  # nothing trained: the finished run's own summary (its training time) stays
            with open(summary_path) as f:
                summary = json.load(f)
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}%"  # noqa: E731
        line = f"student ({args.method}) top-1 {fmt(summary['student_top1'])}"
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
                   "global_correlation", "global_supcon", "seed", "label_noise", "noise_type", "imbalance",
                   "train_per_class", "val_fraction", "lr_steps", "teacher_new_head", "nesterov", "lr", "scale_lr",
                   "weight_decay", "batch_size", "sync_bn", "cache_wrap", "image_size", "steps_per_epoch", "decode")
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


def resume_config(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    """The settings stored in every checkpoint and compared by :func:`check_resume`: the flags of
    :data:`RESUME_SETTINGS` (image size only where the data has one), and the identity of the data (the
    sha256 of the teacher cache's manifest: :func:`~.replay.data_identity`) and of the teacher's weights."""
    from .replay import data_identity, file_sha256

    config = {k: getattr(args, k, None) for k in RESUME_SETTINGS + MID_EPOCH_SETTINGS}
    kind = run.data.kind
    if not kind.takes_image_size:
        config["image_size"] = None  # digits, mnist5k and CIFAR have their own size: the flag changes nothing
    if not kind.decodes_files:
        config["decode"] = None  # only folder images are decoded
    if run.cache is not None:
        teacher = run.cache.manifest["teacher"]["weights_sha256"]
    elif args.teacher_weights:
        if not os.path.isfile(args.teacher_weights):
            raise MissingInputError(f"weights file {args.teacher_weights!r} does not exist")
        teacher = file_sha256(args.teacher_weights)
    else:
        teacher = None
    config.update(num_classes=run.num_classes, world_size=run.dist.world,
                  data_sha256=data_identity(run)["sha256"] if kind.has_samples else None, teacher_sha256=teacher,
                  precision="bf16" if run.amp_dtype is not None else "fp32")
    return config


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


def check_lengths(ckpt: dict[str, Any], args: argparse.Namespace) -> None:
    """Refuses a resume whose --epochs (or --teacher-epochs, for a teacher still training) is fewer than
    what the checkpoint's phases have trained already: they cannot be untrained."""
    completed = ckpt.get("completed") or {}
    phases = [(ckpt["phase"], ckpt["epoch"], ckpt["step"])] if ckpt["phase"] not in completed else []
    phases += [(name, done["last_epoch"], 0) for name, done in completed.items()
               if name in EXTENDABLE and "last_epoch" in done]  # a finished teacher is never retrained
    for name, epoch, step in phases:
        flag, wanted = ("--teacher-epochs", args.teacher_epochs) if name == "teacher" else ("--epochs", args.epochs)
        if epoch > wanted or (epoch == wanted and step > 0):
            trained = f"{epoch} epoch(s)" + (f" and {step} step(s)" if step else "")
            raise InputError(f"--resume: the {name} has trained {trained} already, more than {flag} {wanted}: "
                             f"give {flag} {epoch + (step > 0)} or more, or another --out to start afresh")



