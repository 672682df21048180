"""``python -m mlkd_fast.train`` / ``mlkd-train``: distil a student from a teacher.

With no arguments: the embedded default. A small CNN teacher is trained on scikit-learn's digits
(no network needed), then a smaller student is distilled from it with ``MLKDLoss``, on CPU, in well
under two minutes. Prints progress and writes ``<out>/summary.json`` (``teacher_top1``,
``student_top1``; ``baseline_top1`` with ``--compare-baseline``), ``<out>/metrics.jsonl`` and
``<out>/config.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import torch

from .data import load_digits_split, shift_augment
from .loop import LOSSES, build_loss, evaluate, train_epoch
from .models import digits_student, digits_teacher


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mlkd-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/digits", help="output folder (default: %(default)s)")
    p.add_argument("--loss", choices=LOSSES, default="mlkd",
                   help="student objective: mlkd (CE + KD + correlation), kd (CE + KD), ce (no teacher), "
                        "paper (the authors' CIFAR-100 weights and heads) (default: %(default)s)")
    p.add_argument("--teacher-epochs", type=int, default=30, help="default: %(default)s")
    p.add_argument("--epochs", type=int, default=40, help="student epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=0.02, help="SGD learning rate, cosine schedule (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (default: %(default)s)")
    p.add_argument("--backend", default="auto", help="loss backend: auto, torch, triton, native (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--compare-baseline", action="store_true",
                   help="also train the same student with cross-entropy only and report baseline_top1")
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    args = p.parse_args(argv)
    for name in ("teacher_epochs", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.lr > 0:
        p.error("--lr must be > 0")
    return args


def write_json_atomic(path: str, obj: dict) -> None:
    """Temp file in the same folder, then rename: a reader never sees a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def fit(name: str, model, x, y, x_test, y_test, args, epochs: int, log, loss_fn=None, teacher=None) -> float:
    """Trains ``model`` (SGD + cosine lr) and returns its final test top-1."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    params = list(model.parameters()) + (list(loss_fn.parameters()) if loss_fn is not None else [])
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    top1 = 0.0
    for epoch in range(1, epochs + 1):
        stats = train_epoch(model, x, y, opt, args.batch_size, gen, loss_fn, teacher, shift_augment)
        sched.step()
        top1 = evaluate(model, x_test, y_test)
        record = {"model": name, "epoch": epoch, "loss": round(stats["loss"], 5), "test_top1": round(top1, 3),
                  "images_per_s": round(stats["images_per_s"], 1)}
        if loss_fn is not None:
            record.update({k: round(float(v), 5) for k, v in loss_fn.last.items()})
        log(record)
    return top1


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "config.json"), vars(args))
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    metrics = open(metrics_path, "w")

    def log(record: dict) -> None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if not args.quiet:
            print(f"[{record['model']:>8}] epoch {record['epoch']:3d}  loss {record['loss']:.4f}  "
                  f"top1 {record['test_top1']:6.2f}%  {record['images_per_s']:8.0f} img/s", flush=True)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    x, y, x_test, y_test = load_digits_split(seed=args.seed)

    torch.manual_seed(args.seed)
    teacher = digits_teacher()
    teacher_top1 = fit("teacher", teacher, x, y, x_test, y_test, args, args.teacher_epochs, log)
    teacher.eval()

    torch.manual_seed(args.seed + 100)
    student = digits_student()
    loss_fn = build_loss(args.loss, student.feature_dim, teacher.feature_dim, args.temperature, args.backend)
    student_top1 = fit("student", student, x, y, x_test, y_test, args, args.epochs, log,
                       loss_fn, teacher if loss_fn is not None else None)

    summary = {"teacher_top1": teacher_top1, "student_top1": student_top1, "loss": args.loss}
    if args.compare_baseline:
        torch.manual_seed(args.seed + 100)  # the same initial student weights
        baseline = digits_student()
        summary["baseline_top1"] = fit("baseline", baseline, x, y, x_test, y_test, args, args.epochs, log)
    metrics.close()
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(os.path.join(args.out, "summary.json"), summary)
    line = f"teacher top-1 {teacher_top1:.2f}%  student ({args.loss}) top-1 {student_top1:.2f}%"
    if "baseline_top1" in summary:
        line += f"  CE-only baseline top-1 {summary['baseline_top1']:.2f}%"
    print(line + f"  ({summary['seconds']} s) -> {os.path.join(args.out, 'summary.json')}")
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
