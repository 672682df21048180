"""``mlkd-train`` / ``python -m mlkd_fast.train``: distil a student from a teacher.

With no arguments: the embedded default. A small CNN teacher is trained on scikit-learn's digits
(no network needed), then a smaller student is distilled from it with ``MLKDLoss``, on CPU, in well
under two minutes.

Other data: ``--data PATH`` (an ImageNet-style folder with train/ and val/, one sub-folder per class;
give ``--teacher-weights``) or ``--data synthetic`` (ImageNet-shaped random batches, for throughput).
Multi-GPU: ``torchrun --nproc_per_node N -m mlkd_fast.train ...`` (``--batch-size`` is per process;
the global batch is N times it; ``--scale-lr`` multiplies the lr by N, the linear scaling rule).

Outputs in ``--out``: ``config.json``, ``metrics.jsonl`` (one line per epoch), ``summary.json``
(teacher_top1, student_top1, best/last epoch, images/s; baseline_top1 with --compare-baseline),
``checkpoint.pt`` (every epoch, atomically; ``--resume`` continues exactly), ``<phase>.pt`` (final
weights of each trained network).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import torch

from . import data as D
from .checkpoint import load_checkpoint, save_checkpoint, write_json_atomic
from .distributed import convert_sync_batchnorm, gather_with_grad, init_distributed, shutdown_distributed
from .loop import LOSSES, DistillStep, Phase, RunContext, StopFlag, build_loss, run_phase
from .models import ARCHS, build_model, load_weights

__all__ = ["main", "parse_args", "write_json_atomic"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mlkd-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits",
                   help="'digits' (embedded default), 'synthetic', or an ImageNet-style folder (default: %(default)s)")
    g.add_argument("--image-size", type=int, default=224, help="crop size for folder/synthetic data (default: %(default)s)")
    g.add_argument("--num-classes", type=int, default=1000, help="classes of synthetic data (default: %(default)s)")
    g.add_argument("--steps-per-epoch", type=int, default=100, help="steps of a synthetic epoch (default: %(default)s)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loading processes per GPU for folder data (default: %(default)s)")
    g.add_argument("--decode", choices=("workers", "device"), default="workers",
                   help="folder data: decode + augment with PIL in the loader workers, or read bytes in the "
                        "workers and decode (nvJPEG on CUDA) + augment on the training device (default: %(default)s)")
    g.add_argument("--on-corrupt", choices=("skip", "fail"), default="skip",
                   help="an undecodable image: skip and count it, or fail naming the file (default: %(default)s)")
    g.add_argument("--rotations", type=int, choices=(1, 4), default=1,
                   help="views per image: 4 adds the 90/180/270 rotations (the authors' recipe: CE on the "
                        "plain views, rectangular correlation rotated x plain) (default: %(default)s)")
    g.add_argument("--label-noise", type=float, default=0.0,
                   help="fraction of training labels replaced by another class, fixed by --seed (digits)")
    g.add_argument("--imbalance", type=float, default=1.0,
                   help="long-tailed training set: largest / smallest class size ratio (digits; 1 = off)")

    g = p.add_argument_group("models")
    g.add_argument("--arch", choices=ARCHS, default=None, help="student (default: cnn-small on digits, else resnet18)")
    g.add_argument("--teacher-arch", choices=ARCHS, default=None,
                   help="teacher (default: cnn-large on digits, else resnet34)")
    g.add_argument("--teacher-weights", default=None,
                   help="teacher state dict (torchvision or mlkd-train .pt); digits trains the teacher when absent")

    g = p.add_argument_group("objective and optimisation")
    g.add_argument("--loss", choices=LOSSES, default="mlkd",
                   help="mlkd (CE + KD + correlation), kd (CE + KD), ce (no teacher), paper (the authors' weights "
                        "and heads: cifar100 preset on digits, imagenet otherwise) (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (default: %(default)s)")
    g.add_argument("--global-correlation", action="store_true",
                   help="under DDP, the correlation spans the global batch: each process's rows against "
                        "all processes' columns (all-gathered with gradient)")
    g.add_argument("--global-supcon", action="store_true",
                   help="under DDP, the SupCon term (--loss paper) spans the global batch: each process's "
                        "embeddings are contrasted with all processes' (all-gathered with gradient)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under DDP, BatchNorm in the trained networks and the loss heads normalises with the "
                        "global batch's statistics (SyncBatchNorm); a no-op in a single process")
    g.add_argument("--backend", default="auto", help="loss backend: auto, torch, triton, native (default: %(default)s)")
    g.add_argument("--teacher-epochs", type=int, default=30, help="digits teacher epochs (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=40, help="student epochs (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=64, help="per process (default: %(default)s)")
    g.add_argument("--lr", type=float, default=0.02, help="SGD (Nesterov, momentum 0.9) lr (default: %(default)s)")
    g.add_argument("--scale-lr", action="store_true", help="multiply --lr by the number of processes")
    g.add_argument("--lr-steps", default=None,
                   help="comma-separated epochs where the lr drops 10x (e.g. 30,60,90); default: cosine")
    g.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4 on digits, else 1e-4")

    g = p.add_argument_group("speed")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: %(default)s")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 autocast for student and teacher (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="NHWC activations (auto: on for CUDA image models)")
    g.add_argument("--compile", action="store_true", help="torch.compile the student and the teacher")

    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder (default: runs/<data>)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop (saving a checkpoint, as on SIGTERM) after this many optimiser steps")
    g.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    g.add_argument("--compare-baseline", action="store_true",
                   help="also train the same student with cross-entropy only and report baseline_top1")
    g.add_argument("--quiet", action="store_true", help="print only the final summary")
    args = p.parse_args(argv)

    for name in ("teacher_epochs", "epochs", "batch_size", "image_size", "num_classes", "steps_per_epoch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    if not args.lr > 0:
        p.error("--lr must be > 0")
    if not 0.0 <= args.label_noise < 1.0:
        p.error("--label-noise must be in [0, 1)")
    if not args.imbalance >= 1.0:
        p.error("--imbalance must be >= 1 (largest / smallest class)")
    if args.max_steps is not None and args.max_steps < 0:
        p.error("--max-steps must be >= 0")
    if args.lr_steps is not None:
        try:
            args.lr_steps = sorted(int(v) for v in args.lr_steps.split(","))
        except ValueError:
            p.error(f"--lr-steps must be comma-separated epochs, got {args.lr_steps!r}")
    args.digits = args.data == "digits"
    args.synthetic = args.data == "synthetic"
    if (args.label_noise > 0 or args.imbalance > 1) and not args.digits:
        p.error("--label-noise and --imbalance apply to the digits data")
    if not (args.digits or args.synthetic) and not os.path.isdir(args.data):
        p.error(f"--data {args.data!r}: no such folder (expected <data>/train and <data>/val)")
    if not (args.digits or args.synthetic) and args.loss != "ce" and args.teacher_weights is None:
        p.error("--teacher-weights is required to distil on a folder dataset")
    args.arch = args.arch or ("cnn-small" if args.digits else "resnet18")
    args.teacher_arch = args.teacher_arch or ("cnn-large" if args.digits else "resnet34")
    if args.weight_decay is None:
        args.weight_decay = 5e-4 if args.digits else 1e-4
    if args.out is None:
        args.out = os.path.join("runs", "digits" if args.digits else "synthetic" if args.synthetic
                                else os.path.basename(os.path.normpath(args.data)))
    return args


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
        self.channels_last = args.channels_last == "on" or (args.channels_last == "auto" and on_cuda
                                                              and not args.digits)
        self.shard = D.Shard(args.batch_size, self.dist.rank, self.dist.world)
        self.lr = args.lr * (self.dist.world if args.scale_lr else 1)
        self.info: dict[str, Any] = {}
        if args.sync_bn and not self.dist.enabled:
            print("mlkd-train: --sync-bn does nothing in a single process (BatchNorm already sees the whole "
                  "batch)", file=sys.stderr)
        self._load_data()

    # ---- data -----------------------------------------------------------------------------
    def _load_data(self) -> None:
        a = self.args
        if a.digits:
            x, y, x_test, y_test = D.load_digits_split(seed=a.seed)
            self.num_classes = 10
            if a.imbalance > 1:
                keep = D.imbalance_indices(y, a.imbalance, a.seed)
                x, y = x[keep], y[keep]
            if a.label_noise > 0:
                y, flipped = D.add_label_noise(y, a.label_noise, self.num_classes, a.seed)
                self.info["noisy_labels"] = int(flipped.sum())
            self.info["train_samples"] = len(y)
            self.train = D.TensorSource(x, y, self.shard, a.seed, self.device)
            x_test, y_test = x_test[self.dist.rank::self.dist.world], y_test[self.dist.rank::self.dist.world]
            self.eval_batches = lambda: [(x_test[i:i + 512].to(self.device), y_test[i:i + 512].to(self.device))
                                         for i in range(0, len(x_test), 512)]
        elif a.synthetic:
            self.num_classes = a.num_classes
            self.train = D.SyntheticSource(self.shard, self.device, a.image_size, a.num_classes, a.steps_per_epoch,
                                           channels_last=self.channels_last)
            self.eval_batches = None
        else:
            classes, train_samples = D.scan_image_folder(os.path.join(a.data, "train"))
            _, val_samples = D.scan_image_folder(os.path.join(a.data, "val"), classes)
            self.num_classes = len(classes)
            self.info.update(train_samples=len(train_samples), val_samples=len(val_samples), classes=len(classes))
            if self.shard.steps(len(train_samples)) < 1:
                raise SystemExit(f"mlkd-train: {len(train_samples)} training images are fewer than one global "
                                 f"batch ({self.shard.batch_size * self.shard.world})")
            common = dict(shard=self.shard, seed=a.seed, device=self.device, image_size=a.image_size,
                          workers=a.workers, channels_last=self.channels_last, on_corrupt=a.on_corrupt,
                          decode=a.decode)
            self.train = D.FolderSource(train_samples, train=True, **common)
            self.val = D.FolderSource(val_samples, train=False, **common)
            self.eval_batches = lambda: self.val.epoch(0)

    # ---- models and phases ----------------------------------------------------------------
    def make_phase(self, name: str, arch: str, epochs: int, loss: str,
                   teacher: Optional[torch.nn.Module] = None) -> Phase:
        a = self.args
        torch.manual_seed(a.seed + {"teacher": 0, "student": 100, "baseline": 100}[name])
        model = build_model(arch, self.num_classes).to(self.device)
        if a.sync_bn and self.dist.enabled:
            model = convert_sync_batchnorm(model, self.device.type)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        views = a.rotations if teacher is not None else 1
        loss_fn = None
        if teacher is not None:
            preset = "cifar100" if a.digits else "imagenet"
            loss_fn = build_loss(loss, model.feature_dim, teacher.feature_dim, a.temperature, a.backend, views, preset)
            loss_fn = loss_fn.to(self.device)
            if a.sync_bn and self.dist.enabled:
                loss_fn = convert_sync_batchnorm(loss_fn, self.device.type)
            if a.global_correlation:
                loss_fn.correlation_gather = gather_with_grad
            if a.global_supcon:
                loss_fn.supcon_gather = gather_with_grad
        step = DistillStep(torch.compile(model) if a.compile else model, loss_fn)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            step = DDP(step, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        params = list(model.parameters()) + (list(loss_fn.parameters()) if loss_fn is not None else [])
        opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=a.weight_decay, nesterov=True)
        if a.lr_steps:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, a.lr_steps, 0.1)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return Phase(name, model, step, opt, sched, epochs, arch, loss_fn, teacher, views)

    def load_teacher(self, path: str) -> torch.nn.Module:
        teacher = build_model(self.args.teacher_arch, self.num_classes, path)
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
    ``<out>/summary.json``, or ``{"interrupted": True}`` when stopped (checkpoint saved)."""
    summary = _train_all(parse_args(argv))  # its DDP modules are gone with it (shutdown_distributed says why)
    # a stopped run may have stopped its ranks at different steps: no barrier then (it would hang)
    shutdown_distributed(wait_for_all="interrupted" not in summary)
    return summary


def _train_all(args: argparse.Namespace) -> dict:
    run = Run(args)
    out = args.out
    main_rank = run.dist.main
    ckpt_path = os.path.join(out, "checkpoint.pt")
    config = resume_config(args, run)
    resume_state = load_checkpoint(ckpt_path) if args.resume and os.path.isfile(ckpt_path) else None
    if resume_state is not None:
        check_resume(ckpt_path, resume_state, config)
    if main_rank:
        os.makedirs(out, exist_ok=True)
        write_json_atomic(os.path.join(out, "config.json"), {**vars(args), "world_size": run.dist.world,
                                                             "device": str(run.device), "lr_used": run.lr})
    if args.resume and resume_state is None and main_rank:
        print(f"mlkd-train: --resume but no {ckpt_path}: starting afresh", file=sys.stderr)
    metrics = open(os.path.join(out, "metrics.jsonl"), "a" if resume_state else "w") if main_rank else None

    def log(record: dict) -> None:
        if metrics is None:
            return
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if not args.quiet:
            top1 = f"{record['top1']:6.2f}%" if record["top1"] is not None else "   n/a"
            print(f"[{record['phase']:>8}] epoch {record['epoch']:3d}  loss {record['loss']:.4f}  top1 {top1}  "
                  f"{record['images_per_s']:8.0f} img/s  {record['step_ms']:7.2f} ms/step", flush=True)

    start = time.perf_counter()
    summary: dict[str, Any] = {"loss": args.loss, "world_size": run.dist.world, **run.info}
    with StopFlag() as stop:
        ctx = RunContext(run.device, run.dist, run.amp_dtype, ckpt_path, log, stop,
                         progress=not args.quiet, max_steps=args.max_steps,
                         completed=dict(resume_state.get("completed", {})) if resume_state else {}, config=config)
        done = ctx.completed

        def train(phase: Phase) -> bool:
            """Runs a phase (resuming it if the checkpoint is of it); True when it finished."""
            state = resume_state if resume_state is not None and resume_state["phase"] == phase.name else None
            result = run_phase(phase, run.train, run.eval_batches, ctx, state)
            if not result["finished"]:
                if main_rank:
                    print(f"mlkd-train: stopped in {phase.name} epoch {result['epoch'] + 1} step {result['step']}; "
                          f"checkpoint {ckpt_path} (continue with --resume)", flush=True)
                return False
            done[phase.name] = {k: v for k, v in result.items() if k != "finished"}
            if main_rank:
                save_checkpoint(os.path.join(out, f"{phase.name}.pt"), {"model": phase.model.state_dict(),
                                                                       "arch": phase.arch})
                save_checkpoint(ckpt_path, phase.state(phase.epochs, 0, done, ctx.config))
            return True

        # teacher: trained here on digits unless given; loaded otherwise
        teacher = None
        if args.loss != "ce" or args.digits:
            if args.teacher_weights:
                teacher = run.load_teacher(args.teacher_weights)
            elif args.digits:
                phase = run.make_phase("teacher", args.teacher_arch, args.teacher_epochs, "ce")
                if "teacher" in done:
                    load_weights(phase.model, os.path.join(out, "teacher.pt"), args.teacher_arch)
                elif not train(phase):
                    return _stopped(metrics)
                teacher = run.frozen(phase.model)
            else:  # synthetic: a random teacher is enough to measure throughput
                teacher = run.frozen(build_model(args.teacher_arch, run.num_classes))
        if "teacher" in done:
            summary["teacher_top1"] = done["teacher"]["last_top1"]

        student_teacher = teacher if args.loss != "ce" else None
        phases = [("student", args.loss, student_teacher)]
        if args.compare_baseline:
            phases.append(("baseline", "ce", None))
        for name, loss, t in phases:
            if name not in done:
                phase = run.make_phase(name, args.arch, args.epochs, loss, t)
                if not train(phase):
                    return _stopped(metrics)
        if metrics is not None:
            metrics.close()

    s = done["student"]
    summary.update(student_top1=s["last_top1"], best_top1=s["best_top1"], best_epoch=s["best_epoch"],
                   last_epoch=s["last_epoch"], images_per_s=round(s["images_per_s"], 1),
                   corrupt_images=run.train.corrupt)
    if "baseline" in done:
        summary["baseline_top1"] = done["baseline"]["last_top1"]
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary = {k: (None if isinstance(v, float) and v != v else v) for k, v in summary.items()}  # NaN: no eval
    if main_rank:
        write_json_atomic(os.path.join(out, "summary.json"), summary)
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}%"  # noqa: E731
        line = f"student ({args.loss}) top-1 {fmt(summary['student_top1'])}"
        if "teacher_top1" in summary:
            line = f"teacher top-1 {fmt(summary['teacher_top1'])}  " + line
        if "baseline_top1" in summary:
            line += f"  CE-only baseline top-1 {fmt(summary['baseline_top1'])}"
        print(line + f"  {summary['images_per_s']:.0f} img/s ({summary['seconds']} s) -> "
              f"{os.path.join(out, 'summary.json')}", flush=True)
    return summary


# What a checkpoint must share with the run that resumes it: the networks, the objective, the
# training data and its order. A resume with other values would continue a different run silently.
RESUME_SETTINGS = ("arch", "teacher_arch", "loss", "num_classes", "rotations", "temperature", "global_correlation",
                   "global_supcon", "seed", "label_noise", "imbalance")
# Also these when stopped mid-epoch: the saved step index counts global batches of this size.
MID_EPOCH_SETTINGS = ("batch_size", "world_size")
_SETTING_NAMES = {"num_classes": "number of classes (--num-classes, or the class folders of --data)",
                  "world_size": "number of processes (torchrun --nproc_per_node)"}


def resume_config(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    """The settings stored in every checkpoint and compared by :func:`check_resume`."""
    config = {k: getattr(args, k) for k in RESUME_SETTINGS + MID_EPOCH_SETTINGS if hasattr(args, k)}
    config.update(num_classes=run.num_classes, world_size=run.dist.world)
    return config


def check_resume(path: str, ckpt: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuses a checkpoint written with other settings, naming each one and both values."""
    saved = ckpt.get("config") or {}  # absent in older checkpoints: the architecture is still checked on load
    keys = RESUME_SETTINGS + (MID_EPOCH_SETTINGS if ckpt.get("step") else ())
    differ = [k for k in keys if k in saved and saved[k] != config.get(k)]
    if differ:
        detail = "; ".join(f"{_SETTING_NAMES.get(k, '--' + k.replace('_', '-'))} is {saved[k]!r} in the checkpoint "
                           f"but {config.get(k)!r} in this run" for k in differ)
        raise ValueError(f"--resume: {path!r} was written with other settings: {detail}. Resume with the "
                         f"checkpoint's settings, or give another --out to start afresh")


def _stopped(metrics) -> dict:
    if metrics is not None:
        metrics.close()
    return {"interrupted": True}


if __name__ == "__main__":
    main()
    sys.exit(0)
