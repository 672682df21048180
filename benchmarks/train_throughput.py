"""End-to-end distillation step: ResNet-34 -> ResNet-18 on synthetic ImageNet-shaped batches (docs/design.md §5).

Times the same work two ways on one device:
  fp32 eager : fp32 teacher and student, NCHW, the loss on the eager reference (backend="torch");
  fast       : bf16 teacher weights, bf16 autocast student, channels_last, fused loss (backend="auto"),
               optionally torch.compile (--compile).
Each records images/s, ms per step, peak memory, and the step's composition: the teacher's forward
(under no_grad), the student's forward + backward (with a CE loss on its logits) and the MLKD loss's
forward + backward at the step's shapes (random inputs of those shapes), each timed alone, and their
shares of the step (``shares``; ``other`` is what the three leave: the optimiser step, the input
normalisation, the distiller's glue). Run: ``python benchmarks/train_throughput.py --out result.json``
(``--tiny`` for a seconds-long CPU check); ``python -m benchmarks.report ... --train result.json``
puts the composition beside the benchmark table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import run_info  # noqa: E402

from mlkd_fast import methods as M  # noqa: E402
from mlkd_fast.train.data import normalize_images  # noqa: E402
from mlkd_fast.train.models import build_model  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, steps: int) -> float:
    """Median ms of ``fn`` over ``steps`` calls (after 2 warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(fast: bool, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    classes = args.num_classes
    teacher = build_model(args.teacher_arch, classes).to(device).eval().requires_grad_(False)
    student = build_model(args.arch, classes).to(device)
    amp = torch.bfloat16 if fast else None
    channels_last = fast and device.type == "cuda"
    if fast and device.type == "cuda":
        teacher = teacher.to(torch.bfloat16)
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
    t_run = torch.compile(teacher) if fast and args.compile else teacher
    s_run = torch.compile(student) if fast and args.compile else student
    distill = M.Distillation(s_run, t_run, "mlkd",
                             input_shape=(3, args.image_size, args.image_size),
                             backend="auto" if fast else "torch").to(device)
    loss_fn = distill.distiller.loss
    opt = torch.optim.SGD(distill.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator(device=device).manual_seed(0)
    raw = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), generator=gen,
                        device=device, dtype=torch.uint8)
    y = torch.randint(0, classes, (args.batch_size,), generator=gen, device=device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else (lambda: torch.autocast(device.type, enabled=False))

    def step():
        x = normalize_images(raw, channels_last)
        with autocast():
            loss = distill(x, y)  # the frozen teacher under no_grad, the student, the loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms = _time(step, device, args.steps)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None

    # the loss alone at this step's shapes and dtypes
    dtype = torch.bfloat16 if fast else torch.float32
    s_logits = torch.randn(args.batch_size, classes, device=device, dtype=dtype, requires_grad=True)
    t_logits = torch.randn(args.batch_size, classes, device=device, dtype=dtype)
    s_feats = torch.randn(args.batch_size, student.feature_dim, device=device, dtype=dtype, requires_grad=True)
    t_feats = torch.randn(args.batch_size, teacher.feature_dim, device=device, dtype=dtype)

    def loss_only():
        loss = loss_fn(s_logits, t_logits, s_feats, t_feats, y)
        torch.autograd.grad(loss, [s_logits, s_feats])

    loss_ms = _time(loss_only, device, args.steps)

    # the networks alone: the teacher's forward, the student's forward + backward (CE on its logits)
    def teacher_only():
        with torch.no_grad(), autocast():
            t_run(normalize_images(raw, channels_last))

    def student_only():
        x = normalize_images(raw, channels_last)
        with autocast():
            out = s_run(x)
            logits = out[0] if isinstance(out, tuple) else out
            loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    teacher_ms = _time(teacher_only, device, args.steps)
    student_ms = _time(student_only, device, args.steps)
    parts = {"teacher_forward": teacher_ms, "student_fwd_bwd": student_ms, "loss_fwd_bwd": loss_ms}
    shares = {k: v / step_ms for k, v in parts.items()}
    shares["other"] = 1.0 - sum(shares.values())
    return {"images_per_s": args.batch_size / step_ms * 1e3, "step_ms": step_ms, "loss_ms": loss_ms,
            "loss_share": loss_ms / step_ms, "teacher_ms": teacher_ms, "student_ms": student_ms,
            "shares": shares, "peak_mib": peak, "amp": str(amp), "channels_last": channels_last,
            "compiled": bool(fast and args.compile), "loss_backend": "auto" if fast else "torch"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--teacher-arch", default="resnet34")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="batch 4, 32 px, 3 steps (a CPU smoke run)")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch_size, args.image_size, args.steps, args.num_classes = 4, 32, 3, 10
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    eager = measure(False, args, device)
    fast = measure(True, args, device)
    result = {**run_info(), "arch": args.arch, "teacher_arch": args.teacher_arch, "batch_size": args.batch_size,
              "image_size": args.image_size, "num_classes": args.num_classes, "steps": args.steps,
              "fp32_eager": eager, "fast": fast, "speedup": fast["images_per_s"] / eager["images_per_s"],
              "command": "python benchmarks/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    for name in ("fp32_eager", "fast"):
        sh = result[name]["shares"]
        print(f"{name}: step {result[name]['step_ms']:.1f} ms = teacher {100 * sh['teacher_forward']:.1f}% + student "
              f"{100 * sh['student_fwd_bwd']:.1f}% + loss {100 * sh['loss_fwd_bwd']:.2f}% + other {100 * sh['other']:.1f}%")
    return result


if __name__ == "__main__":
    main()
