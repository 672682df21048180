"""The command line of ``mlkd-train``: every flag, checked, with its default."""
from __future__ import annotations

import argparse
import ast
import os
from typing import Any, Optional, Sequence

from .. import methods as M
from .data import NOISE_TYPES
from .models import ARCHS

USAGE = """Distil a student from a teacher.

With no arguments: the embedded default. A small CNN teacher is trained on scikit-learn's digits
(no network needed), then a smaller student is distilled from it with MLKD (CE + KD + batch
correlation), on CPU, in well under a minute. --method picks any method of the distiller zoo
(mlkd_fast.methods) instead; --method-opt sets its options.

Other data: --data PATH (an ImageNet-style folder with train/ and val/, one sub-folder per class;
give --teacher-weights, or --teacher-epochs N to train the teacher there first) or --data synthetic
(ImageNet-shaped random batches and a random teacher, for throughput).
Multi-GPU: torchrun --nproc_per_node N -m mlkd_fast.train ... (--batch-size is per process; the
global batch is N times it; --scale-lr multiplies the lr by N, the linear scaling rule).

Outputs in --out: config.json, metrics.jsonl (one line per epoch), summary.json (teacher_top1,
student_top1, best/last epoch, images/s; baseline_top1 with --compare-baseline), checkpoint.pt
(every epoch, atomically; --resume continues exactly), <phase>.pt (final weights of each trained
network), student_state.pt (the student's final training state, for --resume with a larger --epochs;
baseline_state.pt too with --compare-baseline).

Exit status: 0 after a run that finished or stopped cleanly (SIGINT / SIGTERM / --max-steps: the
checkpoint is saved); 2 after an error in what was given (flags, data, weights, checkpoint: one line
on stderr, --debug adds the traceback); 1 with a traceback after an internal error.
"""


# the zoo's registered methods and its presets ("paper": MLKD with its authors' recipe)
METHODS = tuple(M.available()) + tuple(M.presets())


def parse_method_options(items: Sequence[str]) -> dict[str, Any]:
    """``["beta=2", "negatives=batch"]`` -> ``{"beta": 2, "negatives": "batch"}`` (literals where they parse)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--method-opt {item!r}: expected KEY=VALUE")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag as one line on stderr, ``mlkd-train: <what is wrong>``, and exits with status 2
    (argparse's own usage block is for ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (mlkd-train --help lists every flag)\n")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The checked arguments of ``mlkd-train`` (``argv``: default the command line)."""
    p = _Parser(prog="mlkd-train", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                   help="fraction of training labels replaced by another class, fixed by --seed")
    g.add_argument("--noise-type", choices=NOISE_TYPES, default="symmetric",
                   help="symmetric: a noisy label is a uniformly drawn other class; asymmetric: class c becomes "
                        "class (c + 1) mod K, the same fraction in every class (default: %(default)s)")
    g.add_argument("--imbalance", type=float, default=1.0,
                   help="long-tailed training set: largest / smallest class size ratio, class k keeping "
                        "ratio^(-k/(K-1)) of the largest class's size (1 = off)")
    g.add_argument("--train-per-class", type=int, default=None,
                   help="digits: this many training images per class, every other image in the test set "
                        "(default: a stratified 75/25 split)")

    g = p.add_argument_group("models")
    g.add_argument("--arch", choices=ARCHS, default=None, help="student (default: cnn-small on digits, else resnet18)")
    g.add_argument("--teacher-arch", choices=ARCHS, default=None,
                   help="teacher (default: cnn-large on digits, else resnet34)")
    g.add_argument("--teacher-weights", default=None,
                   help="teacher state dict (torchvision or mlkd-train .pt), used as it is; its classifier must have "
                        "the data's classes (else --teacher-new-head). Without it the teacher is trained first "
                        "(--teacher-epochs)")
    g.add_argument("--teacher-new-head", action="store_true",
                   help="replace the classifier of --teacher-weights with a new one for the data's classes and "
                        "fine-tune the whole teacher on the training data for --teacher-epochs epochs (weights "
                        "trained on other classes, e.g. ImageNet's 1000)")

    g = p.add_argument_group("objective and optimisation")
    g.add_argument("--method", "--loss", dest="method", choices=METHODS, default="mlkd",
                   help="the distillation method of the student (--loss is an alias), any method of the zoo "
                        "(mlkd_fast.methods): " + ", ".join(M.available()) + "; or a preset: "
                        + "; ".join(f"{k} ({v})" for k, v in M.presets().items())
                        + f"; {M.baseline()} is plain training (default: %(default)s)")
    g.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the student's method (repeatable), e.g. --method dkd --method-opt beta=2 "
                        "--method-opt warmup=5; values are Python literals (numbers, tuples, True) or plain "
                        "strings; the teacher and baseline phases train with their defaults. "
                        "python -c \"import mlkd_fast.methods as m; print(m.method_class('dkd').options())\" "
                        "lists a method's options")
    g.add_argument("--temperature", type=float, default=None,
                   help="temperature option of the methods that have one (default: each method's own, e.g. 4 for "
                        "mlkd and kd)")
    g.add_argument("--global-correlation", action="store_true",
                   help="under DDP, the correlation spans the global batch: each process's rows against "
                        "all processes' columns (all-gathered with gradient)")
    g.add_argument("--global-supcon", action="store_true",
                   help="under DDP, the SupCon term (mlkd with w_supcon > 0, e.g. paper) spans the global batch: "
                        "each process's "
                        "embeddings are contrasted with all processes' (all-gathered with gradient)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under DDP, BatchNorm in the trained networks and the loss heads normalises with the "
                        "global batch's statistics (SyncBatchNorm); a no-op in a single process")
    g.add_argument("--backend", default="auto", help="loss backend: auto, torch, triton, native (default: %(default)s)")
    g.add_argument("--teacher-epochs", type=int, default=None,
                   help="epochs of the teacher phase, which trains the teacher with CE on the training data when "
                        "no --teacher-weights are given (or fine-tunes them with --teacher-new-head); 0 trains "
                        "none (for the methods that need no teacher). Default: 30 on digits; 0 on folder data, "
                        "where a teacher is trained only when asked (--teacher-epochs N), and on synthetic data "
                        "(a random teacher). A finished teacher is never retrained by --resume")
    g.add_argument("--epochs", type=int, default=40,
                   help="student (and baseline) epochs. --resume with another value trains on to it: a finished "
                        "run continues from its final state; the lr schedule becomes that of a run of the new "
                        "length from the saved epoch on (cosine: the lr jumps back up from ~0 to the longer "
                        "cosine's value there, e.g. 25%% of --lr at epoch 40 of 60; --lr-steps: the milestones "
                        "stay) (default: %(default)s)")
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
    g.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.pt (mid-epoch exactly; with a larger --epochs a finished "
                        "run trains on; a finished run resumed unchanged says so and trains nothing). The "
                        "networks, method, data and seed must be the checkpoint's")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop (saving a checkpoint, as on SIGTERM) after this many optimiser steps")
    g.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    g.add_argument("--compare-baseline", action="store_true",
                   help="also train the same student with cross-entropy only and report baseline_top1")
    g.add_argument("--quiet", action="store_true", help="print only the final summary")
    g.add_argument("--debug", action="store_true",
                   help="on an error in what was given (a missing file, a bad checkpoint...), show the full "
                        "traceback instead of the one-line message")
    args = p.parse_args(argv)

    if args.teacher_epochs is not None and args.teacher_epochs < 0:
        p.error("--teacher-epochs must be >= 0")
    for name in ("epochs", "batch_size", "image_size", "num_classes", "steps_per_epoch"):
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
    if (args.label_noise > 0 or args.imbalance > 1) and args.synthetic:
        p.error("--label-noise and --imbalance apply to digits or folder data, not synthetic")
    if args.train_per_class is not None and not args.digits:
        p.error("--train-per-class applies to the digits data")
    if args.train_per_class is not None and not 1 <= args.train_per_class <= 150:
        p.error("--train-per-class must be in [1, 150] (the smallest digits class has 174 images)")
    if not (args.digits or args.synthetic) and not os.path.isdir(args.data):
        p.error(f"--data {args.data!r}: no such folder (expected <data>/train and <data>/val)")
    try:
        args.method_options = parse_method_options(args.method_opt)
    except ValueError as exc:
        p.error(str(exc))
    method = M.method_class(args.method)  # its traits decide what the flags below may ask of it
    unknown = sorted(set(args.method_options) - set(method.options()))
    if unknown and args.method_options:
        p.error(f"--method-opt: method {args.method!r} has no option {', '.join(map(repr, unknown))}; its options "
                f"are: {', '.join(method.options())}")
    with_views = [m for m in METHODS if M.method_class(m).takes_views]
    if args.rotations > 1 and not method.takes_views:
        p.error(f"--rotations {args.rotations} applies to methods that take rotated views ({', '.join(with_views)}), "
                f"not {args.method}")
    for hook in ("correlation", "supcon"):
        if getattr(args, f"global_{hook}") and hook not in method.gather_hooks:
            p.error(f"--global-{hook} applies to methods with a {hook} term spanning the batch "
                    f"({', '.join(m for m in METHODS if hook in M.method_class(m).gather_hooks)}), not {args.method}")
    if args.temperature is not None and not args.temperature > 0:
        p.error("--temperature must be > 0")
    if args.teacher_epochs == 0 and method.needs_teacher and args.teacher_weights is None:
        p.error(f"--teacher-epochs 0 trains no teacher, but --method {args.method} distils from one: "
                f"give --teacher-weights")
    args.loss = args.method  # the name the summary and older scripts read
    if (not (args.digits or args.synthetic) and method.needs_teacher and args.teacher_weights is None
            and not args.teacher_epochs):
        p.error("--teacher-weights is required to distil on a folder dataset, unless --teacher-epochs N (N >= 1) "
                "trains a teacher on it first")
    given_teacher_epochs = args.teacher_epochs
    if args.teacher_epochs is None:  # digits: a teacher is trained unless given; elsewhere only when asked
        args.teacher_epochs = 30 if args.digits else 0
    if args.synthetic and args.teacher_epochs > 0:
        p.error("--teacher-epochs applies to digits and folder data; synthetic data has a random teacher")
    if args.teacher_new_head:
        if args.teacher_weights is None:
            p.error("--teacher-new-head replaces the classifier of --teacher-weights: give them")
        if args.synthetic:
            p.error("--teacher-new-head applies to digits and folder data (a teacher fine-tuned on them)")
        if args.teacher_epochs < 1:
            p.error("--teacher-new-head fine-tunes the teacher with its new classifier for --teacher-epochs epochs: "
                    "give --teacher-epochs N (N >= 1)")
    elif args.teacher_weights is not None and given_teacher_epochs:
        p.error(f"--teacher-epochs {given_teacher_epochs} with --teacher-weights: the given teacher is used as it "
                f"is and trains no epoch; add --teacher-new-head to fine-tune it with a new classifier, or leave "
                f"--teacher-epochs out")
    args.arch = args.arch or ("cnn-small" if args.digits else "resnet18")
    args.teacher_arch = args.teacher_arch or ("cnn-large" if args.digits else "resnet34")
    if args.weight_decay is None:
        args.weight_decay = 5e-4 if args.digits else 1e-4
    if args.out is None:
        args.out = os.path.join("runs", "digits" if args.digits else "synthetic" if args.synthetic
                                else os.path.basename(os.path.normpath(args.data)))
    return args


