"""The teacher cache's price and payoff (docs/design.md §8, docs/cache.md).

In one run, for each pair: the student's epoch time (ms per step, images/s; training only, evaluation
excluded) with CE only, distilled from the live teacher, and distilled from a teacher cache; the
cache's creation images/s against the teacher's own forward images/s (the same views through the same
data pipeline, and the forward alone on resident batches); the cache's bytes per sample-epoch
(all C logits + features in fp32, the exact one the cached run reads; and top-5 fp16 without
features). Pairs: ResNet-34 -> ResNet-18 on an image folder (default 64 x 64 crops, 100 classes, a few
hundred images made by tests/helpers.make_image_folder) or on CIFAR-format pickles held on the device
(--data cifar100, the GPU stage), and cnn-large -> cnn-small on digits. Teachers are random (timing
only). Targets: cached distillation <= 1.05x the CE-only epoch; creation >= 0.9x the teacher's forward.

    python benchmarks/teacher_cache.py --out benchmarks/results/teacher_cache_cpu.json --page docs/cache.md  # quiet machine
    python benchmarks/teacher_cache.py --tiny --out /tmp/teacher_cache_tiny.json          # seconds: a check
    python benchmarks/teacher_cache.py --data cifar100 --per-class 40 --epochs 2 --time-limit 50 --out ...  # GPU

Timings on a shared or loaded machine are noise; the JSON records the machine (run_info).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.join(os.path.dirname(HERE), "tests"))  # helpers (after benchmarks/: its conftest)
from conftest import run_info  # noqa: E402

from mlkd_fast.train import cache as C  # noqa: E402
from mlkd_fast.train import data as D  # noqa: E402
from mlkd_fast.train import main as train  # noqa: E402
from mlkd_fast.train.models import build_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _student_epochs(out: Path) -> dict:
    """ms/step and images/s of the student phase (mean over the epochs after the first, when there are)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["phase"] == "student"]
    timed = rows[1:] if len(rows) > 1 else rows
    return {"ms_per_step": round(sum(r["step_ms"] for r in timed) / len(timed), 2),
            "images_per_s": round(sum(r["images_per_s"] for r in timed) / len(timed), 1),
            "epochs_timed": len(timed)}


def teacher_forward_rate(data_args: list[str], teacher: str, weights: str, batch: int, out: Path) -> dict:
    """The teacher's own images/s over one epoch of training views in teacher batches of ``batch``: through
    the data pipeline (what cache creation does, without storing), and the forward alone on the same
    batches held in memory."""
    from mlkd_fast.methods.taps import TappedNetwork
    from mlkd_fast.train.cache.writer import writer_setup

    args = C.parse_cache_args(data_args + ["--teacher-arch", teacher, "--teacher-weights", weights,
                                           "--batch-size", str(batch), "--out", str(out)])
    setup = writer_setup(args)  # the cache writer's own data, device and teacher
    net = setup.load_teacher(weights)
    tapped = TappedNetwork(net)
    n = setup.data.num_samples
    order = D.epoch_order(n, args.seed, 0)
    batches = [(0, order[j:j + batch]) for j in range(0, n, batch)]
    device = setup.device
    amp = (torch.autocast(device.type, dtype=setup.amp_dtype) if setup.amp_dtype is not None
           else torch.autocast(device.type, enabled=False))
    with torch.no_grad(), amp:
        for x, _, _ in setup.data.source.views(batches[:1]):  # warm-up
            tapped(x)
        _sync(device)
        t0 = time.perf_counter()
        kept, images = [], 0
        for x, index, _ in setup.data.source.views(batches):
            if x is not None:
                tapped(x).logits.float().cpu()
                kept.append(x)
                images += len(index)
        _sync(device)
        pipeline = images / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for x in kept:
            tapped(x).logits.float().cpu()
        _sync(device)
        forward = images / (time.perf_counter() - t0)
    return {"pipeline_images_per_s": round(pipeline, 1), "forward_images_per_s": round(forward, 1), "images": images}


def _bytes_per_sample_epoch(folder: Path, manifest: dict) -> float:
    total = sum(f.stat().st_size for f in folder.glob("e*.pt"))
    return round(total / (manifest["data"]["num_samples"] * manifest["epochs"]), 1)


def measure_pair(name: str, data_args: list[str], student: str, teacher: str, classes: int, in_channels: int,
                 method: str, epochs: int, batch: int, work: Path, deadline: float, results: dict, save,
                 rounds: int = 1) -> None:
    work.mkdir(parents=True, exist_ok=True)
    weights = work / "teacher.pt"
    torch.manual_seed(0)
    torch.save({"model": build_model(teacher, classes, in_channels=in_channels).state_dict()}, weights)
    row: dict = {"student": student, "teacher": teacher, "method": method, "epochs": epochs, "batch_size": batch,
                 "data": data_args}
    results["pairs"][name] = row
    common = data_args + ["--arch", student, "--epochs", str(epochs), "--batch-size", str(batch), "--quiet",
                          "--no-curves"]

    def step(label, fn):
        if time.perf_counter() > deadline:
            row[label] = {"skipped": "the time limit was reached"}
            return None
        t0 = time.perf_counter()
        value = fn()
        row[label] = value
        if isinstance(value, dict):
            value["wall_s"] = round(time.perf_counter() - t0, 2)
        save()
        return value

    def fresh(folder: str) -> str:
        """A scratch run folder, emptied (mlkd-train refuses a folder holding a run: a --work used again)."""
        shutil.rmtree(work / folder, ignore_errors=True)
        return str(work / folder)

    step("live", lambda: (train(common + ["--method", method, "--teacher-arch", teacher, "--teacher-weights",
                                          str(weights), "--teacher-epochs", "0", "--out", fresh("live")]),
                          _student_epochs(work / "live"))[1])
    step("teacher_forward", lambda: teacher_forward_rate(data_args, teacher, str(weights), batch, work / "fwd"))
    cache_args = data_args + ["--teacher-arch", teacher, "--teacher-weights", str(weights), "--epochs", str(epochs),
                              "--batch-size", str(batch), "--quiet"]

    def create(folder: str, extra: list[str]) -> dict:
        shutil.rmtree(work / folder, ignore_errors=True)
        m = C.main(cache_args + extra + ["--out", str(work / folder)])
        return {"images_per_s": m["status"]["images_per_s"], "seconds": m["status"]["seconds"],
                "bytes_per_sample_epoch": _bytes_per_sample_epoch(work / folder, m),
                "format": {"top_k": m["logits"]["top_k"], "logits_dtype": m["logits"]["dtype"],
                           "features": m["features"]}}

    step("cache_full_fp32", lambda: create("cache", ["--features"]))
    step("cache_top5_fp16", lambda: create("cache5", ["--top-k", "5", "--logits-dtype", "fp16"]))
    # CE and cached differ by a few percent, the size of this machine's drift between runs: they run in
    # `rounds` alternated rounds (the order swapped every round, so that drift and a warm cache fall on both),
    # and the figures are each one's median round; the target is the ratio of the two medians
    runs = {"ce": ["--method", "ce", "--teacher-epochs", "0"],
            "cached": ["--method", method, "--teacher-cache", str(work / "cache")]}
    if "images_per_s" not in row.get("cache_full_fp32", {}):
        runs.pop("cached")
    for r in range(rounds):
        for label in (("ce", "cached") if r % 2 == 0 else ("cached", "ce")):
            if label not in runs:
                continue
            if time.perf_counter() > deadline:
                row.setdefault(label, {"skipped": "the time limit was reached"})
                continue
            folder = work / f"{label}_round{r}"
            shutil.rmtree(folder, ignore_errors=True)
            t0 = time.perf_counter()
            train(common + runs[label] + ["--out", str(folder)])
            got = _student_epochs(folder)
            entry = row.setdefault(label, {"rounds_ms_per_step": [], "rounds_images_per_s": [], "wall_s": 0.0})
            entry.pop("skipped", None)
            entry["rounds_ms_per_step"].append(got["ms_per_step"])
            entry["rounds_images_per_s"].append(got["images_per_s"])
            entry.update(ms_per_step=round(statistics.median(entry["rounds_ms_per_step"]), 3),
                         images_per_s=round(statistics.median(entry["rounds_images_per_s"]), 1),
                         epochs_timed=got["epochs_timed"], rounds=len(entry["rounds_ms_per_step"]),
                         wall_s=round(entry["wall_s"] + time.perf_counter() - t0, 2))
            shutil.rmtree(folder, ignore_errors=True)
            save()
    ce, live, cached = row.get("ce", {}), row.get("live", {}), row.get("cached", {})
    if "ms_per_step" in ce:
        row["ratios"] = {k: round(v["ms_per_step"] / ce["ms_per_step"], 3) for k, v in
                         (("live_over_ce", live), ("cached_over_ce", cached)) if "ms_per_step" in v}
        paired = list(zip(ce["rounds_ms_per_step"], cached.get("rounds_ms_per_step", [])))
        if paired:  # each round's cached / CE, its median: the same comparison, robust to drift across rounds
            row["ratios"]["cached_over_ce_median_of_rounds"] = round(statistics.median(c / e for e, c in paired), 3)
        row["targets"] = {"cached_within_1.05x_ce": row["ratios"].get("cached_over_ce", math.inf) <= 1.05}
    fwd, made = row.get("teacher_forward", {}), row.get("cache_full_fp32", {})
    if "pipeline_images_per_s" in fwd and "images_per_s" in made:
        row.setdefault("ratios", {})["creation_over_teacher_pipeline"] = round(
            made["images_per_s"] / fwd["pipeline_images_per_s"], 3)
        row["ratios"]["creation_over_teacher_forward"] = round(made["images_per_s"] / fwd["forward_images_per_s"], 3)
        row.setdefault("targets", {})["creation_within_10pct_of_teacher"] = (
            row["ratios"]["creation_over_teacher_pipeline"] >= 0.9)
    save()


def imagenet_projection() -> dict:
    """The storage of a cache of ImageNet-1k (1.28M images, 100 epochs, 1000 classes, ResNet features of
    2048 (ResNet-50) / 512 (ResNet-18/34)) from the per-sample layout (docs/design.md §8)."""
    n, epochs = 1_281_167, 100
    fixed = 4 + 1 + 5 * 4  # index int32, valid, (top, left, h, w, flipped) int32
    formats = {"all 1000 logits fp32": fixed + 1000 * 4, "all 1000 logits fp16": fixed + 1000 * 2,
               "top-5 fp16": fixed + 5 * (2 + 4) + 4, "top-10 fp16": fixed + 10 * (2 + 4) + 4,
               "top-5 fp16 + 512-d features fp16": fixed + 5 * (2 + 4) + 4 + 512 * 2,
               "top-5 fp16 + 2048-d features fp16": fixed + 5 * (2 + 4) + 4 + 2048 * 2}
    return {k: {"bytes_per_sample_epoch": v, "total_gb": round(v * n * epochs / 1e9, 1)} for k, v in formats.items()}


README_START, README_END = "<!-- cache:start -->", "<!-- cache:end -->"


def summary_markdown(results: dict, source: str) -> str:
    """The README's figures of one run: per pair the three epochs' ms/step and their ratio to CE, the
    creation's images/s against the teacher's, and the cache's bytes per sample-epoch."""
    m = results["machine"]
    lines = [f"Measured on **{m.get('device', '?')}** ({m.get('threads', '?')} threads), torch {m.get('torch', '?')}, "
             f"commit {m.get('commit', '?')} (`{source}`, {results.get('seconds', '?')} s).", "",
             "| pair | CE ms/step | live teacher | cached | teacher img/s (pipeline / forward alone) | creation img/s "
             "| bytes / sample-epoch (all C fp32 + feats; top-5 fp16) |", "|---|---|---|---|---|---|---|"]

    def step(row: dict, key: str) -> str:
        v, ce = row.get(key, {}), row.get("ce", {})
        if "ms_per_step" not in v:
            return "—"
        ratio = "" if key == "ce" or "ms_per_step" not in ce else f" ({v['ms_per_step'] / ce['ms_per_step']:.2f}x)"
        rounds = v.get("rounds_ms_per_step", [])
        spread = f"; median of {len(rounds)} rounds, {min(rounds):g}-{max(rounds):g}" if len(rounds) > 1 else ""
        return f"{v['ms_per_step']:g}{ratio}{spread}"

    for name, row in results["pairs"].items():
        fwd, full, top5 = row.get("teacher_forward", {}), row.get("cache_full_fp32", {}), row.get("cache_top5_fp16", {})
        made = full.get("images_per_s")
        creation = "—" if made is None else (
            f"{made:g} ({made / fwd['pipeline_images_per_s']:.2f}x)" if "pipeline_images_per_s" in fwd else f"{made:g}")
        teacher = (f"{fwd['pipeline_images_per_s']:g} / {fwd['forward_images_per_s']:g}"
                   if "pipeline_images_per_s" in fwd else "—")
        size = f"{full.get('bytes_per_sample_epoch', '—')}; {top5.get('bytes_per_sample_epoch', '—')}"
        lines.append(f"| {name}, {row['method']}, batch {row['batch_size']}, {row['epochs'] - 1} epoch(s) timed | "
                     f"{step(row, 'ce')} | {step(row, 'live')} | {step(row, 'cached')} | {teacher} | {creation} "
                     f"| {size} |")
    lines += ["", "Targets: cached <= 1.05x CE; creation >= 0.9x the teacher through the same pipeline. "
              "Teachers are random (timing only); ms/step: the mean over the timed epochs' steps, for CE and cached "
              "the median of the rounds that alternate them (all rounds in the JSON); cached / CE is the ratio of "
              "the medians."]
    return "\n".join(lines) + "\n"


def update_readme(readme: str, body: str) -> None:
    """Replace the README's generated teacher-cache section (atomically)."""
    with open(readme) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} section to replace")
    block = (f"{README_START}\n<!-- generated by python benchmarks/teacher_cache.py; do not edit by hand -->\n"
             f"{body}{README_END}")
    a, b = text.index(README_START), text.index(README_END) + len(README_END)
    tmp = f"{readme}.tmp"
    with open(tmp, "w") as f:
        f.write(text[:a] + block + text[b:])
    os.replace(tmp, readme)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="results JSON (written after every measurement)")
    p.add_argument("--data", choices=("folder", "cifar100"), default="folder")
    p.add_argument("--image-size", type=int, default=64, help="folder crops (default: %(default)s)")
    p.add_argument("--classes", type=int, default=100, help="folder classes (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=8, help="training images per class (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs of each run; all but the first are timed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--rounds", type=int, default=5,
                   help="CE and cached runs timed alternately this many times each, their medians compared "
                        "(default: %(default)s)")
    p.add_argument("--method", default="kd", help="the distillation method timed (default: %(default)s)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--teacher-arch", default="resnet34")
    p.add_argument("--no-digits", action="store_true", help="skip the digits pair")
    p.add_argument("--no-folder", action="store_true", help="skip the folder (or --data cifar100) pair")
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long check of the script (cnn-small -> cnn-tiny, 16 px, 2 classes)")
    p.add_argument("--time-limit", type=float, default=None, help="stop measuring after this many seconds")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--page", "--readme", dest="readme", metavar="PAGE", default=None,
                   help="also rewrite this page's teacher-cache figures from the results (docs/cache.md)")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="measure nothing: rebuild the --page section from this results file")
    a = p.parse_args(argv)
    if a.report:
        if not a.readme:
            p.error("--report needs --page")
        with open(a.report) as f:
            results = json.load(f)
        update_readme(a.readme, summary_markdown(results, os.path.relpath(a.report, os.path.dirname(a.readme) or ".")))
        return results
    if a.tiny:
        a.image_size, a.classes, a.per_class, a.epochs, a.batch_size, a.workers = 16, 2, 8, 2, 4, 0
        a.arch, a.teacher_arch, a.rounds = "cnn-tiny", "cnn-small", 2
    start = time.perf_counter()
    deadline = start + (a.time_limit if a.time_limit else math.inf)
    work = Path(a.work or tempfile.mkdtemp(prefix="teacher_cache_"))
    results: dict = {"machine": run_info(), "settings": vars(a), "pairs": {}, "note": "tiny, noisy" if a.tiny else
                     "timings on a loaded machine are noise"}

    def save():
        results["seconds"] = round(time.perf_counter() - start, 1)
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            tmp = f"{a.out}.tmp"
            with open(tmp, "w") as f:
                json.dump(results, f, indent=2)
            os.replace(tmp, a.out)  # a killed run leaves the last complete file

    try:
        from helpers import make_cifar_pickles, make_image_folder

        if not a.no_folder and a.data == "folder":
            make_image_folder(work / "images", classes=tuple(f"c{i:03d}" for i in range(a.classes)),
                              per_class=a.per_class)
            data_args = ["--data", str(work / "images"), "--image-size", str(a.image_size), "--workers", str(a.workers)]
            classes, name = a.classes, f"{a.teacher_arch}->{a.arch} folder {a.image_size}px {a.classes} classes"
        elif not a.no_folder:
            make_cifar_pickles(work / "cifar", kind="cifar100", train_per_class=a.per_class, test_per_class=1)
            data_args, classes = ["--data", f"cifar100:{work / 'cifar'}"], 100
            name = f"{a.teacher_arch}->{a.arch} cifar100-format 32px in device memory"
        if not a.no_folder:
            measure_pair(name, data_args, a.arch, a.teacher_arch, classes, 3, a.method, a.epochs, a.batch_size,
                         work / "pair", deadline, results, save, a.rounds)
        if not a.no_digits:
            measure_pair("cnn-large->cnn-small digits", ["--data", "digits"], "cnn-small", "cnn-large", 10, 1,
                         a.method, a.epochs, 64, work / "digits", deadline, results, save, a.rounds)
        results["imagenet_projection"] = imagenet_projection()
        save()
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if a.readme and a.out:
        update_readme(a.readme, summary_markdown(results, os.path.relpath(a.out, os.path.dirname(a.readme) or ".")))
    print(json.dumps({k: v.get("ratios") for k, v in results["pairs"].items()}, indent=1))
    return results


if __name__ == "__main__":
    main()
