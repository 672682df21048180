"""What a run writes for people to read: ``metrics.jsonl`` (one record per epoch), ``steps.jsonl`` (the
loss, the method's terms and the lr every ``--log-every`` steps), TensorBoard scalars (``--tensorboard``)
and ``curves.png`` at the end (matplotlib). Only the main rank writes; the per-step values are its own
batch's (under DDP each rank's loss is that of its slice)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional

from .checkpoint import dumps_strict
from .errors import MissingDependencyError

PHASES = ("teacher", "student", "baseline")


class PlainProgress:
    """Progress for a stderr that is not a terminal (a log file, a pipe): a plain line every
    ``interval`` seconds (the first after ``interval``), where tqdm would fill the file with carriage
    returns. The same calls as tqdm's: ``update``, ``set_postfix``, ``close``."""

    def __init__(self, total: int, initial: int, desc: str, unit: str, interval: float) -> None:
        self.total, self.n, self.desc, self.unit, self.interval = total, initial, desc, unit, interval
        self.postfix: dict[str, Any] = {}
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            extra = "".join(f" {k} {v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}{extra}", file=sys.stderr, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        pass


def progress(total: int, initial: int, desc: str, enabled: bool, unit: str = "step", interval: float = 30.0):
    """A progress display, or None when not ``enabled``: tqdm's bar when stderr is a terminal, else
    :class:`PlainProgress` (a plain line every ``interval`` seconds; the epoch lines on stdout say the rest)."""
    if not enabled:
        return None
    if not sys.stderr.isatty():
        return PlainProgress(total, initial, desc, unit, interval)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the train extra
        return PlainProgress(total, initial, desc, unit, interval)
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, unit=unit)


def check_tensorboard() -> None:
    """A one-line user error naming the package to install when tensorboard is missing (called before
    anything is written, so that ``--tensorboard`` without it leaves the run folder as it was)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:  # torch's module imports the tensorboard package
        raise MissingDependencyError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc


def tensorboard_writer(log_dir: str):
    """A ``torch.utils.tensorboard.SummaryWriter`` for ``log_dir`` (:func:`check_tensorboard`'s error
    when tensorboard is missing)."""
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)


class RunLogs:
    """The run's log files in ``out``, appended to when a run is resumed. Every record is strict JSON
    (a non-finite number is written as null: :func:`~.checkpoint.dumps_strict`)."""

    def __init__(self, out: str, append: bool, tensorboard: bool, quiet: bool) -> None:
        mode = "a" if append else "w"
        self.metrics = open(os.path.join(out, "metrics.jsonl"), mode)
        self.steps = open(os.path.join(out, "steps.jsonl"), mode)
        self.quiet = quiet
        self.tb = tensorboard_writer(os.path.join(out, "tensorboard")) if tensorboard else None

    def epoch(self, record: dict[str, Any]) -> None:
        """One epoch's record (metrics.jsonl, TensorBoard, and a line on stdout unless quiet)."""
        self.metrics.write(dumps_strict(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            phase, epoch = record["phase"], record["epoch"]
            for key, tag in (("top1", "top1"), ("top5", "top5"), ("loss", "epoch_loss"),
                             ("images_per_s", "images_per_s"), ("step_ms", "step_ms")):
                if record.get(key) is not None:
                    self.tb.add_scalar(f"{phase}/{tag}", record[key], epoch)
            self.tb.flush()
        if not self.quiet:
            top1 = f"{record['top1']:6.2f}%" if record["top1"] is not None else "   n/a"
            top5 = f"  top5 {record['top5']:6.2f}%" if record.get("top5") is not None else ""
            print(f"[{record['phase']:>8}] epoch {record['epoch']:3d}  loss {record['loss']:.4f}  top1 {top1}{top5}  "
                  f"{record['images_per_s']:8.0f} img/s  {record['step_ms']:7.2f} ms/step", flush=True)

    def step_records(self, records: list[dict[str, Any]]) -> None:
        """An epoch's per-step records (steps.jsonl, TensorBoard at the phase's global step)."""
        for r in records:
            self.steps.write(dumps_strict(r) + "\n")
            if self.tb is not None:
                for key, value in r.items():
                    if (key not in ("phase", "epoch", "step", "global_step") and isinstance(value, (int, float))
                            and math.isfinite(value)):  # NaN, None: absent
                        self.tb.add_scalar(f"{r['phase']}/{key}", value, r["global_step"])
        self.steps.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        """Closes the files (again: nothing)."""
        self.metrics.close()
        self.steps.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(out: str, path: Optional[str] = None) -> Optional[str]:
    """Draws ``out/curves.png`` from ``out/metrics.jsonl`` and ``out/steps.jsonl``: one row per phase,
    the loss and the method's terms per step on the left (log scale), top-1 / top-5 per epoch on the
    right. Returns the path, or None with a message on stderr when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("mlkd-train: no curves.png: matplotlib is not installed (pip install matplotlib; --no-curves "
              "skips the plot)", file=sys.stderr, flush=True)
        return None
    path = path or os.path.join(out, "curves.png")
    epochs = _read_jsonl(os.path.join(out, "metrics.jsonl"))
    steps = _read_jsonl(os.path.join(out, "steps.jsonl"))
    phases = [p for p in PHASES if any(r["phase"] == p for r in epochs + steps)]
    if not phases:
        return None
    fig = Figure(figsize=(11, 3.2 * len(phases)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(phases), 2, squeeze=False)
    for row, phase in zip(axes, phases):
        left, right = row
        records = [r for r in steps if r["phase"] == phase]
        keys = [k for k in dict.fromkeys(k for r in records for k in r)
                if k not in ("phase", "epoch", "step", "global_step", "lr")]
        plotted, positive = False, True
        for key in keys:
            points = [(r["global_step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
                      and math.isfinite(r[key])]
            if points:
                left.plot(*zip(*points), label=key, linewidth=1.2 if key == "loss" else 0.9)
                plotted, positive = True, positive and min(v for _, v in points) > 0
        left.set(title=f"{phase}: loss and terms per step", xlabel="step")
        if plotted:  # terms of very different sizes (weights up to 3e4): log scale (symlog for zeros, negatives)
            left.set_yscale("log") if positive else left.set_yscale("symlog", linthresh=1e-3)
            left.legend(fontsize=7, ncol=2)
        rec = [r for r in epochs if r["phase"] == phase]
        accuracy = False
        for key in ("top1", "top5"):
            points = [(r["epoch"], r[key]) for r in rec if r.get(key) is not None]
            if points:
                right.plot(*zip(*points), marker="o", markersize=3, label=key)
                accuracy = True
        right.set(title=f"{phase}: test accuracy per epoch", xlabel="epoch", ylabel="%")
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        if accuracy:  # none without a test set (synthetic data)
            right.legend(fontsize=7)
        right.grid(alpha=0.3)
        left.grid(alpha=0.3)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
    return path
