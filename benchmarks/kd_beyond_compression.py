"""Knowledge distillation beyond model compression, reproduced with one command.

Every method of the distiller zoo (``mlkd_fast.methods``) and the CE-only student are trained over

- training data: clean; symmetric label noise 20, 40, 60 %; asymmetric noise 40 % (class c becomes
  c + 1 mod K); long-tailed imbalance ratios 10 and 100;
- two capacity gaps: a much larger and a slightly larger teacher than the student;
- three seeds (a seed fixes the split, the corruption, the initialisation and the batch order).

One teacher is trained per (setting, gap, seed) on the same corrupted data and shared by every method;
the teacher-free methods (``ce``, ``dml``) are trained once per (setting, seed) and compared under both
gaps. Every run is one ``mlkd-train`` invocation and records top-1 on the clean, balanced test set at
its last and at its best epoch.

The embedded default (offline, CPU): digits with 20 training images per class and the other ~1,600
images as the test set; student ``cnn-tiny`` (widths 4-8-16), teachers ``cnn-large`` (32-64-128, the
large gap) and ``cnn-small`` (8-16-32, the small gap); 60 epochs, batch 16, SGD + cosine. Real data:
``--data PATH`` (an ImageNet-style folder) with ``--arch`` / ``--gap NAME=ARCH``; any other flag is
passed to every ``mlkd-train`` run (e.g. ``--device cuda --precision bf16 --batch-size 256``).

Outputs (in ``--out``): ``kd_beyond_compression.json`` (protocol, versions, commit, one row per run),
``kd_beyond_compression.md`` (mean +- std per method and setting, wins over CE),
``kd_beyond_compression_noise.png`` and ``..._imbalance.png``, and the README section between
``<!-- kdbc:start -->`` and ``<!-- kdbc:end -->`` (``--readme``). The runs live under
``<out>/kd_beyond_compression_runs/``: a finished run is never redone, a stopped one resumes from its
checkpoint, so the command can be stopped and run again. ``--report`` only rebuilds the outputs.

Where it writes: nothing committed changes unless its path is given. ``--out`` defaults to
``runs/kd_beyond_compression/`` (``runs/kd_beyond_compression_quick/`` with ``--quick``), under the
current folder and git-ignored; the committed results (``benchmarks/results/``, and the README's
section) are rewritten only by ``--out benchmarks/results``: the whole digits grid written there
also rewrites the README's section, unless ``--readme ''``; a slice rewrites no README unless
``--readme PATH`` names it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
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

from mlkd_fast import methods as _zoo

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NAME = "kd_beyond_compression"
COMMITTED = os.path.join(HERE, "results")  # written only when --out names it
DEFAULT_OUT = os.path.join("runs", NAME)
QUICK_OUT = os.path.join("runs", f"{NAME}_quick")
START, END = "<!-- kdbc:start -->", "<!-- kdbc:end -->"

# setting -> (mlkd-train flags, x of the noise / imbalance plot)
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
# table order: the baseline, outputs and decision boundary, representations, relations between samples,
# cohorts, ours; alphabetical within a family
FAMILIES = ("none", "outputs", "representations", "relations", "cohort", "ours")
QUICK = dict(methods=[BASELINE, "kd", "dml"], settings=["clean", "sym40"], gaps=["large"], seeds=[0], epochs=2)


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
    train_per_class: Optional[int]  # digits only
    extra: tuple[str, ...]          # flags passed to every mlkd-train run
    method_options: tuple[tuple[str, str], ...] = ()  # (method, "key=value") passed as --method-opt

    def base_flags(self) -> list[str]:
        flags = ["--data", self.data, "--batch-size", str(self.batch_size), "--quiet"]
        if self.train_per_class is not None:
            flags += ["--train-per-class", str(self.train_per_class)]
        return flags + list(self.extra)


@dataclass(frozen=True)
class RunKey:
    setting: str
    gap: str      # "-" for the teacher-free methods (shared by every gap)
    method: str   # "teacher" for a gap's teacher
    seed: int

    @property
    def folder(self) -> str:
        return os.path.join(self.setting, self.gap, self.method, f"seed{self.seed}")


def default_protocol(args: argparse.Namespace, extra: Sequence[str]) -> Protocol:
    digits = args.data == "digits"
    gaps = dict(g.split("=", 1) for g in args.gap) if args.gap else (
        {"large": "cnn-large", "small": "cnn-small"} if digits else {"large": "resnet50", "small": "resnet34"})
    epochs = args.epochs or (60 if digits else 90)
    return Protocol(data=args.data, student=args.arch or ("cnn-tiny" if digits else "resnet18"), gaps=gaps,
                    epochs=epochs, teacher_epochs=args.teacher_epochs or epochs,
                    batch_size=args.batch_size or (16 if digits else 256),
                    train_per_class=(args.train_per_class or 20) if digits else None, extra=tuple(extra),
                    method_options=tuple(tuple(o.split(":", 1)) for o in args.method_opt))


def plan(protocol: Protocol, methods: Sequence[str], settings: Sequence[str], gaps: Sequence[str],
         seeds: Sequence[int]) -> list[RunKey]:
    """Every run of the slice: the teachers first, then the students (each after its teacher)."""
    keys = [RunKey(s, g, "teacher", seed) for s in settings for g in gaps for seed in seeds
            if any(m not in TEACHER_FREE for m in methods)]
    for s in settings:
        for seed in seeds:
            for m in methods:
                keys += [RunKey(s, "-", m, seed)] if m in TEACHER_FREE else [RunKey(s, g, m, seed) for g in gaps]
    return keys


def argv_of(key: RunKey, protocol: Protocol, runs_dir: str) -> list[str]:
    """The ``mlkd-train`` arguments of one run."""
    out = os.path.join(runs_dir, key.folder)
    argv = protocol.base_flags() + SETTINGS[key.setting] + ["--seed", str(key.seed), "--out", out]
    if os.path.isfile(os.path.join(out, "checkpoint.pt")):
        argv.append("--resume")  # a run stopped part-way continues where it stopped
    if key.method == "teacher":
        return argv + ["--method", BASELINE, "--arch", protocol.gaps[key.gap], "--epochs", str(protocol.teacher_epochs),
                       "--teacher-epochs", "0"]
    argv += ["--method", key.method, "--arch", protocol.student, "--epochs", str(protocol.epochs)]
    for method, option in protocol.method_options:
        if method == key.method:
            argv += ["--method-opt", option]
    if key.method in TEACHER_FREE:
        return argv + ["--teacher-epochs", "0"]
    teacher = os.path.join(runs_dir, RunKey(key.setting, key.gap, "teacher", key.seed).folder, "student.pt")
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


def _train(argv: list[str]) -> dict:
    """One mlkd-train run; what it prints goes to ``train.log`` in its folder."""
    import contextlib

    from mlkd_fast.train import main

    out = argv[argv.index("--out") + 1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train.log"), "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        return main(argv)


def _trained_by(runs_dir: str, key: RunKey) -> Optional[str]:
    path = os.path.join(runs_dir, key.folder, "study.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("commit")


def _row(key: RunKey, summary: dict, protocol: Protocol, commit: Optional[str]) -> dict:
    return {"method": key.method, "setting": key.setting, "gap": key.gap, "seed": key.seed, "commit": commit,
            "top1_last": summary["student_top1"], "top1_best": summary["best_top1"],
            "best_epoch": summary["best_epoch"],
            "epochs": protocol.teacher_epochs if key.method == "teacher" else protocol.epochs,
            "seconds": summary["seconds"], "train_samples": summary.get("train_samples"),
            "noisy_labels": summary.get("noisy_labels", 0)}


def execute(keys: list[RunKey], protocol: Protocol, runs_dir: str, jobs: int, threads: int,
            commit: str) -> tuple[list[dict], int]:
    """Runs what is not finished yet on ``jobs`` worker processes (students after their teacher);
    returns one row per key and how many runs this call trained. Each trained run records ``commit``
    (the code it ran) beside it."""
    done = {k: s for k in keys if (s := _finished(runs_dir, k)) is not None}
    todo = [k for k in keys if k not in done]
    print(f"{NAME}: {len(keys)} runs, {len(done)} already finished, {len(todo)} to train on {jobs} process(es) "
          f"x {threads} thread(s)", flush=True)
    start, trained = time.perf_counter(), 0
    waiting = [k for k in todo if k.method != "teacher"]
    ready = [k for k in todo if k.method == "teacher"]

    def teacher_done(k: RunKey) -> bool:
        return k.method in TEACHER_FREE or RunKey(k.setting, k.gap, "teacher", k.seed) in done

    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        running: dict[cf.Future, RunKey] = {}
        try:
            while ready or waiting or running:
                ready += [k for k in waiting if teacher_done(k)]
                waiting = [k for k in waiting if not teacher_done(k)]
                while ready and len(running) < 2 * jobs:
                    k = ready.pop(0)
                    running[pool.submit(_train, argv_of(k, protocol, runs_dir))] = k
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
                    print(f"[{len(done):4d}/{len(keys)}] {k.setting:>6} {k.gap:>5} {k.method:>7} seed {k.seed}: "
                          f"top-1 {summary['student_top1']:6.2f} (best {summary['best_top1']:6.2f})  "
                          f"{summary['seconds']:5.1f} s   elapsed {elapsed / 60:5.1f} min, ~{eta / 60:.1f} min left",
                          flush=True)
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_futures=True)
            raise SystemExit(f"{NAME}: stopped; run the same command again to continue (finished runs are kept)")
    return [_row(k, done[k], protocol, _trained_by(runs_dir, k)) for k in keys], trained


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                             check=True).stdout.strip()
        # what the numbers depend on: the library, the kernels and this script
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "mlkd_fast", "kernels",
                                "csrc", "setup.py", f"benchmarks/{NAME}.py"], capture_output=True, text=True,
                               cwd=ROOT).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
    import numpy
    import torch

    import mlkd_fast

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                "mlkd_fast": mlkd_fast.__version__}
    try:
        import sklearn

        versions["scikit-learn"] = sklearn.__version__
    except ImportError:
        pass
    return versions


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Per (gap, method, setting): mean and std of last-epoch top-1, and wins over CE (same setting and
    seed). The teacher-free methods appear under every gap."""
    gaps = sorted({r["gap"] for r in rows if r["gap"] != "-"}) or ["-"]
    by = {}
    for r in rows:
        for g in ([r["gap"]] if r["gap"] != "-" else gaps):
            by.setdefault((g, r["method"], r["setting"]), []).append(r)
    ce = {(r["setting"], r["seed"]): r["top1_last"] for r in rows if r["method"] == BASELINE}
    cells = {}
    for (g, m, s), rs in by.items():
        mean, std = _stats([r["top1_last"] for r in rs])
        best_mean, _ = _stats([r["top1_best"] for r in rs])
        compared = [(r["top1_last"], ce[(s, r["seed"])]) for r in rs if (s, r["seed"]) in ce]
        cells[(g, m, s)] = {"mean": mean, "std": std, "best_mean": best_mean, "n": len(rs),
                            "wins": sum(a > b for a, b in compared), "compared": len(compared)}
    return {"gaps": gaps, "cells": cells}


def markdown(result: dict) -> str:
    p, rows = result["protocol"], result["rows"]
    summ = summarize(rows)
    cells = summ["cells"]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    methods = [m for m in ["teacher"] + result["methods"] if any(r["method"] == m for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Top-1 (%) on the clean, balanced test set at the last epoch, mean ± std over {len(seeds)} seed(s); "
             f"`(w/n)`: runs above the CE-only student of the same setting and seed. **Bold**: mean above CE-only; "
             f"`≤CE`: this method does not beat CE-only on average there. Student `{p['student']}`, "
             f"{p['epochs']} epochs, batch {p['batch_size']}, data `{p['data']}`"
             + (f" ({p['train_per_class']} training images per class, the rest is the test set)"
                if p.get("train_per_class") else "")
             + f"; runs trained at commit(s) {', '.join(f'`{c}`' for c in result['run_commits'])}; "
             f"`{result['command']}`.", ""]
    for g in summ["gaps"]:
        teacher = p["gaps"].get(g, "none")
        lines += [f"**Gap `{g}`: teacher `{teacher}`**", "",
                  "| method | " + " | ".join(settings) + " | settings above CE |",
                  "|---|" + "---|" * (len(settings) + 1)]
        for m in methods:
            row, above = [], 0
            for s in settings:
                c = cells.get((g, m, s))
                ce = cells.get((g, BASELINE, s))
                if c is None:
                    row.append("")
                    continue
                text = f"{c['mean']:.2f} ± {c['std']:.2f}"
                if m not in (BASELINE, "teacher") and ce is not None:
                    better = c["mean"] > ce["mean"]
                    above += better
                    text = (f"**{text}**" if better else text + " ≤CE") + f" ({c['wins']}/{c['compared']})"
                row.append(text)
            tail = f"{above}/{len(settings)}" if m not in (BASELINE, "teacher") else ""
            lines.append(f"| {m} | " + " | ".join(row) + f" | {tail} |")
        lines.append("")
    total = sum(r["seconds"] for r in rows)
    calls = result.get("invocations") or [{"runs_trained": len(rows), "wall_seconds": result["wall_seconds"]}]
    walls = ", ".join(f"{c['wall_seconds'] / 60:.1f} min for {c['runs_trained']} runs" for c in calls)
    lines.append(f"{len(rows)} runs, {total / 60:.1f} min of training in all; wall time {walls} on "
                 f"{result['machine']} ({result['jobs']} process(es) at once).")
    return "\n".join(lines) + "\n"


def plots(result: dict, out_dir: str) -> list[str]:
    """Top-1 vs symmetric noise rate and vs imbalance ratio, a line per method, error bars = std;
    one panel per gap. Returns the files written (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{NAME}: matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    summ = summarize(result["rows"])
    cells = summ["cells"]
    methods = [m for m in ["teacher"] + result["methods"] if any(r["method"] == m for r in result["rows"])]
    written = []
    for axis_name, axis, xlabel, logx in (("noise", NOISE_AXIS, "symmetric label noise (%)", False),
                                          ("imbalance", IMBALANCE_AXIS, "imbalance ratio (largest / smallest)",
                                           True)):
        fig, axes = plt.subplots(1, len(summ["gaps"]), figsize=(6.5 * len(summ["gaps"]), 4.8), squeeze=False)
        colors = plt.get_cmap("tab20")
        for ax, g in zip(axes[0], summ["gaps"]):
            for i, m in enumerate(methods):
                pts = [(x, cells[(g, m, s)]) for s, x in axis.items() if (g, m, s) in cells]
                if len(pts) < 2:
                    continue
                style = dict(color="black", linestyle="--", linewidth=2) if m == BASELINE else \
                    dict(color="grey", linestyle=":", linewidth=2) if m == "teacher" else dict(color=colors(i % 20))
                ax.errorbar([x for x, _ in pts], [c["mean"] for _, c in pts], yerr=[c["std"] for _, c in pts],
                            label=m, marker="o", markersize=3, capsize=2, **style)
            ax.set_title(f"gap {g}: teacher {result['protocol']['gaps'].get(g, 'none')}, "
                         f"student {result['protocol']['student']}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("top-1 (%), clean test set")
            if logx:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        if axes[0][0].lines:
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
            f"{table}{links}\n{END}")
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: body, text, flags=re.S)
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, readme)


def write_outputs(result: dict, out_dir: str, readme: Optional[str]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for path, text in ((os.path.join(out_dir, f"{NAME}.json"), json.dumps(result, indent=1) + "\n"),
                       (os.path.join(out_dir, f"{NAME}.md"), markdown(result))):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    written = plots(result, out_dir)
    if readme:
        update_readme(readme, markdown(result), written, result)
    print(markdown(result))
    print(f"{NAME}: wrote {out_dir}/{NAME}.json, .md" + "".join(f", {os.path.basename(p)}" for p in written)
          + (f" and the section of {readme}" if readme else ""))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    from mlkd_fast.methods import available

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other flag goes to every mlkd-train run (python -m mlkd_fast.train "
                                       "--help lists them).")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS), help="default: all")
    p.add_argument("--gaps", nargs="+", default=None, help="default: every gap of the protocol")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2")
    p.add_argument("--quick", action="store_true",
                   help="a CI-sized slice: ce, kd, dml on clean and sym40, large gap, seed 0, 2 epochs")
    p.add_argument("--data", default="digits", help="'digits' (embedded default) or an ImageNet-style folder")
    p.add_argument("--arch", default=None, help="student (default: cnn-tiny on digits, resnet18 otherwise)")
    p.add_argument("--gap", action="append", default=[], metavar="NAME=ARCH",
                   help="a teacher per gap (repeatable); default large=cnn-large small=cnn-small on digits, "
                        "large=resnet50 small=resnet34 otherwise")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: 60 on digits, 90 otherwise)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="default: --epochs")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 on digits, 256 otherwise")
    p.add_argument("--train-per-class", type=int, default=None, help="digits: default 20")
    p.add_argument("--method-opt", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="an option of one method's runs (repeatable), e.g. at:w_at=10; default: every method "
                        "with its reference defaults")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained at once, each in its own process (default: one per CPU core on digits, "
                        "1 otherwise)")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: {DEFAULT_OUT}, {QUICK_OUT} with --quick); the committed results "
                        f"change only when it is given: --out benchmarks/results")
    p.add_argument("--readme", default=None,
                   help="README whose kdbc section is rewritten (default: the repository's README for the whole "
                        "digits grid written to --out benchmarks/results, none for a slice or elsewhere; '' for "
                        "none)")
    p.add_argument("--report", action="store_true", help="only rebuild the table, plots and README from the JSON")
    args, extra = p.parse_known_args(argv)
    if args.out is None:  # never the committed benchmarks/results unless named
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    registered = available()
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
    args.seeds = args.seeds if args.seeds is not None else [0, 1, 2]
    for o in args.method_opt:
        method, _, option = o.partition(":")
        if method not in registered or "=" not in option:
            p.error(f"--method-opt {o!r}: expected METHOD:KEY=VALUE with METHOD one of {', '.join(registered)}")
    for g in args.gap:
        if "=" not in g:
            p.error(f"--gap {g!r}: expected NAME=ARCH")
    for name in ("epochs", "teacher_epochs", "batch_size", "train_per_class", "jobs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.readme is None:
        sliced = argv_given(argv, ("--methods", "--settings", "--gaps", "--seeds", "--quick", "--report"))
        full = not sliced and args.data == "digits"
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
    keys = plan(protocol, args.methods, args.settings, gaps, args.seeds)
    json_path = os.path.join(args.out, f"{NAME}.json")
    if args.report:
        with open(json_path) as f:
            result = json.load(f)
        write_outputs(result, args.out, args.readme or None)
        return result

    # every run's flags are checked before the first one trains (a typo fails now, not in an hour)
    from mlkd_fast.train.cli import parse_args as train_args

    for k in {(k.method == "teacher", k.method in TEACHER_FREE): k for k in keys}.values():
        train_args(argv_of(k, protocol, runs_dir))
    cores = os.cpu_count() or 1
    jobs = args.jobs or (cores if args.data == "digits" else 1)
    threads = max(1, cores // jobs)
    start = time.perf_counter()
    commit = _commit()  # the code the runs of this invocation train with
    rows, trained = execute(keys, protocol, runs_dir, jobs, threads, commit)
    invocation = {"commit": commit, "runs_trained": trained, "wall_seconds": round(time.perf_counter() - start, 1),
                  "jobs": jobs}
    invocations = []  # the earlier invocations that trained runs of this table, when it is the same grid
    if os.path.isfile(json_path):
        with open(json_path) as f:
            previous = json.load(f)
        if {(r["method"], r["setting"], r["gap"], r["seed"]) for r in previous.get("rows", [])} <= {
                (r["method"], r["setting"], r["gap"], r["seed"]) for r in rows}:
            invocations = previous.get("invocations", [])
    command = " ".join([f"python benchmarks/{NAME}.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"protocol": {**protocol.__dict__, "extra": list(protocol.extra),
                           "settings": {s: SETTINGS[s] for s in args.settings}, "seeds": args.seeds},
              "methods": args.methods, "command": command, "commit": commit,
              "run_commits": sorted({r["commit"] or "unknown" for r in rows}), "versions": _versions(),
              "machine": f"{platform.machine()}, {cores} CPU core(s)", "jobs": jobs, "threads_per_job": threads,
              "wall_seconds": invocation["wall_seconds"], "invocations": invocations + [invocation], "rows": rows}
    write_outputs(result, args.out, args.readme or None)
    return result


if __name__ == "__main__":
    main()
