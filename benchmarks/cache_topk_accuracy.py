"""What a lossy teacher cache costs in accuracy: the student's top-1 distilled from the live teacher,
from an exact cache (all C logits and the features in fp32: the same run bit for bit) and from top-k
caches in fp16 / bf16, over seeds (docs/design.md §8, docs/cache.md).

Per seed a teacher is trained by mlkd-train (CE, --teacher-arch, --teacher-epochs on digits: its split
depends on --seed, so each seed has its own teacher; mnist5k has a fixed split and one teacher), then
each method trains the student once live and once per cache format. Writes a results JSON:

    python benchmarks/cache_topk_accuracy.py --out benchmarks/results/cache_topk_accuracy.json
    python benchmarks/cache_topk_accuracy.py --data mnist5k --seeds 3 --methods kd,dkd,mlkd --out ...

Accuracy only: a loaded machine changes nothing but the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import run_info  # noqa: E402

from mlkd_fast.train import cache as C  # noqa: E402
from mlkd_fast.train import main as train  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--data", choices=("digits", "mnist5k"), default="digits")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default="kd,mlkd", help="comma-separated (default: %(default)s)")
    p.add_argument("--formats", default="top5:fp16,top1:fp16,top5:bf16",
                   help="lossy caches, topK:dtype, comma-separated (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="student epochs (default: %(default)s)")
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--arch", default="cnn-tiny")
    p.add_argument("--teacher-arch", default="cnn-large")
    p.add_argument("--train-per-class", type=int, default=None, help="the study's harder split, e.g. 20")
    p.add_argument("--work", default=None)
    a = p.parse_args(argv)
    start = time.perf_counter()
    work = Path(a.work or tempfile.mkdtemp(prefix="cache_topk_"))
    data = ["--data", a.data] + (["--train-per-class", str(a.train_per_class)] if a.train_per_class else [])
    formats = [(int(f.split(":")[0][3:]), f.split(":")[1]) for f in a.formats.split(",")]
    results: dict = {"machine": run_info(), "settings": vars(a), "runs": [], "summary": {}}

    def save():
        results["seconds"] = round(time.perf_counter() - start, 1)
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                json.dump(results, f, indent=2)

    quiet = ["--quiet", "--no-curves"]

    def fresh(name: str) -> str:
        """A scratch folder of ``work``, emptied: mlkd-train and mlkd-cache refuse one that holds a run or a
        cache (a --work used again)."""
        shutil.rmtree(work / name, ignore_errors=True)
        return str(work / name)
    try:
        teacher = None
        for seed in range(a.seeds):
            s = ["--seed", str(seed)]
            if teacher is None or a.data == "digits":  # digits' split depends on the seed: a teacher per seed
                t_out = work / f"teacher{seed}"
                t = train(data + s + ["--method", "ce", "--arch", a.teacher_arch, "--teacher-epochs", "0",
                                      "--epochs", str(a.teacher_epochs), "--out", fresh(t_out.name), *quiet])
                teacher, teacher_top1 = str(t_out / "student.pt"), t["student_top1"]
            caches = {}
            for name, extra in [("all-fp32", [])] + [(f"top{k}-{dt}", ["--top-k", str(k), "--logits-dtype", dt,
                                                                        "--features-dtype", "fp16"])
                                                      for k, dt in formats]:
                folder = work / f"cache{seed}-{name}"
                C.main(data + s + ["--teacher-arch", a.teacher_arch, "--teacher-weights", teacher, "--epochs",
                                   str(a.epochs), "--features", "--out", fresh(folder.name), "--quiet"] + extra)
                caches[name] = folder
            for method in a.methods.split(","):
                common = data + s + ["--method", method, "--arch", a.arch, "--epochs", str(a.epochs), *quiet]
                row = {"seed": seed, "method": method, "teacher_top1": teacher_top1}
                row["live"] = train(common + ["--teacher-arch", a.teacher_arch, "--teacher-weights", teacher,
                                              "--teacher-epochs", "0", "--out", fresh(f"live{seed}-{method}")]
                                    )["student_top1"]
                for name, folder in caches.items():
                    row[name] = train(common + ["--teacher-cache", str(folder), "--out",
                                                fresh(f"c{seed}-{method}-{name}")])["student_top1"]
                results["runs"].append(row)
                save()
        for method in a.methods.split(","):
            rows = [r for r in results["runs"] if r["method"] == method]
            summary = {"live_mean": round(statistics.mean(r["live"] for r in rows), 3)}
            for name in caches:
                diffs = [r[name] - r["live"] for r in rows]
                summary[name] = {"mean": round(statistics.mean(r[name] for r in rows), 3),
                                 "diff_to_live_mean": round(statistics.mean(diffs), 3),
                                 "diff_to_live_std": round(statistics.stdev(diffs), 3) if len(diffs) > 1 else None,
                                 "diffs": [round(d, 3) for d in diffs]}
            results["summary"][method] = summary
        save()
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results["summary"], indent=1))
    return results


if __name__ == "__main__":
    main()
