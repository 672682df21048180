"""The study command of benchmarks/kd_beyond_compression.py on its CI slice (--quick): the outputs'
shape, where they go (never the committed results unless named), resuming, and the report/README
rebuild. Accuracy is not asserted here (2 epochs)."""
import hashlib
import json
import os

import pytest

from benchmarks import kd_beyond_compression as study
from helpers import make_image_folder


def _committed_digest() -> str:
    """A hash of every committed result the study could write: benchmarks/results/ (its files, not the
    git-ignored runs folder) and the README's study section."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(study.COMMITTED):
        dirs[:] = sorted(d for d in dirs if d != f"{study.NAME}_runs")
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, study.COMMITTED).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    with open(os.path.join(study.ROOT, "README.md")) as f:
        readme = f.read()
    h.update(readme[readme.find(study.START):readme.find(study.END)].encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick slice as the README gives it, with no --out, run from a scratch folder: its outputs go
    to runs/kd_beyond_compression_quick/ there, and benchmarks/results/ stays byte for byte the same."""
    cwd = tmp_path_factory.mktemp("kdbc")
    before, here = _committed_digest(), os.getcwd()
    os.chdir(cwd)
    try:
        result = study.main(["--quick"])
    finally:
        os.chdir(here)
    assert _committed_digest() == before, "the quick slice rewrote committed results"
    out = cwd / "runs" / "kd_beyond_compression_quick"
    assert (out / "kd_beyond_compression.json").is_file()
    return out, result


def test_default_outputs_are_never_the_committed_results():
    args, _ = study.parse_args(["--quick"])
    assert args.out == os.path.join("runs", "kd_beyond_compression_quick") and args.readme == ""
    args, _ = study.parse_args([])
    assert args.out == os.path.join("runs", "kd_beyond_compression") and args.readme == ""
    args, _ = study.parse_args(["--out", study.COMMITTED])  # named: the whole grid rewrites the README too
    assert args.readme == os.path.join(study.ROOT, "README.md")
    args, _ = study.parse_args(["--quick", "--out", study.COMMITTED])
    assert args.readme == ""  # a slice never rewrites the README's table unless --readme names it


def test_quick_slice_runs_the_pilot_then_the_table(quick):
    out, result = quick
    pilot = [r for r in result["rows"] if r["phase"] == "pilot"]
    table = [r for r in result["rows"] if r["phase"] == "table"]
    assert sorted((r["method"], r["gap"], r["weight"]) for r in pilot) == sorted(
        [("teacher", "large", None), ("ce", "-", None), ("kd", "large", 1.0), ("kd", "large", 4.0),
         ("dml", "-", 1.0), ("dml", "-", 4.0)])
    assert {r["seed"] for r in pilot} == {1000} and {r["setting"] for r in pilot} == {"clean"}
    assert sorted((r["method"], r["setting"], r["gap"]) for r in table) == sorted(
        [("teacher", s, "large") for s in ("clean", "sym40")] + [(m, s, "-") for m in ("ce", "dml")
                                                                 for s in ("clean", "sym40")]
        + [("kd", s, "large") for s in ("clean", "sym40")])
    for r in result["rows"]:
        assert 0.0 <= r["top1_last"] <= r["top1_best"] <= 100.0 and r["seconds"] > 0
        assert r["val_top1"] is not None and r["train_samples"] == 400  # 50 per class, a fifth held out
    # the weights were chosen on the validation split, and the table's runs use them
    chosen = result["weights"]["large:kd"]["chosen"]
    assert set(result["weights"]["large:kd"]["validation_top1"]) == {"1", "4"}
    assert {r["weight"] for r in table if r["method"] == "kd"} == {chosen}
    assert result["pilot"]["n"] == 1 and result["protocol"]["data"] == "mnist5k"
    cells = result["statistics"]["cells"]
    assert set(cells) == {"large:kd:clean", "large:kd:sym40", "-:dml:clean", "-:dml:sym40"}
    assert all(c["n"] == 1 and c["p"] is None for c in cells.values())  # one seed: no interval, nothing claimed
    on_disk = json.loads((out / "kd_beyond_compression.json").read_text())
    assert on_disk["rows"] == result["rows"] and on_disk["protocol"]["student"] == "cnn-tiny"
    assert {"torch", "python", "mlkd_fast"} <= set(on_disk["versions"]) and on_disk["commit"]
    config = json.loads((out / "kd_beyond_compression_runs" / "table" / "sym40" / "large" / "kd" / f"w{chosen:g}"
                         / "seed0" / "config.json").read_text())
    # kd reads its teacher from the cache of the teacher of its setting and seed, made once for every student
    assert config["teacher_cache"].endswith("table/sym40/large/cache/seed0") and config["teacher_weights"] is None
    manifest = json.loads((out / "kd_beyond_compression_runs" / "table" / "sym40" / "large" / "cache" / "seed0"
                           / "manifest.json").read_text())
    assert manifest["epochs"] == 2 and manifest["data"]["label_noise"] == 0.4


def test_quick_slice_writes_the_tables_and_the_noise_plot(quick):
    out, _ = quick
    table = (out / "kd_beyond_compression.md").read_text()
    assert "| method | clean | sym40 |" in table and "After Holm's correction" in table
    for label in ("teacher (top-1)", "ce (top-1)", "teacher − CE", "kd", "dml"):
        assert f"\n| {label} | " in table
    assert "Weights chosen on the validation split" in table
    assert (out / "kd_beyond_compression_noise.png").stat().st_size > 1000
    assert not (out / "kd_beyond_compression_imbalance.png").exists()  # no imbalance setting in the slice


def test_a_second_invocation_redoes_only_unfinished_runs(quick, capsys):
    out, result = quick
    chosen = result["weights"]["-:dml"]["chosen"]
    (out / "kd_beyond_compression_runs" / "table" / "clean" / "-" / "dml" / f"w{chosen:g}" / "seed0"
     / "summary.json").unlink()
    again = study.main(["--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "(pilot): 7 runs, 7 already finished, 0 to train" in printed
    assert "(table): 10 runs, 9 already finished, 1 to train" in printed
    same = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert same(again["rows"]) == same(result["rows"])  # the retrained run gives the same numbers
    assert [c["runs_trained"] for c in again["invocations"]] == [17, 1]


def test_report_rebuilds_the_readme_section_from_the_json(quick, tmp_path):
    out, _ = quick
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{study.START}\nSTALE TABLE\n{study.END}\nrest\n")
    study.main(["--quick", "--out", str(out), "--report", "--readme", str(readme)])
    text = readme.read_text()
    assert "STALE TABLE" not in text and "| kd | " in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "kd_beyond_compression_noise.png" in text and "After Holm's correction" in text


def test_weight_grids_include_the_principled_rescaling():
    args, extra = study.parse_args([])
    protocol = study.default_protocol(args, extra)
    assert study.weight_grid("kd", protocol) == [0.0625, 0.25, 1.0, 4.0]
    sp = study.weight_grid("sp", protocol)  # batch 32 against RepDistiller's 64: x 0.5
    assert sp == [188.0, 750.0, 1500.0, 3000.0, 12000.0]
    assert study.weight_grid("bss", protocol) == [] and study.weight_grid("fsp", protocol) == []
    assert study.study_options("at") == ["min_size=4"] and study.study_options("kd") == []


def test_bad_slices_are_refused_before_anything_trains(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--methods", "kd", "nope", "--out", str(tmp_path)])
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown gap"):
        study.main(["--gaps", "huge", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        study.main(["--quick", "--out", str(tmp_path), "--label-smoothing", "0.1"])  # not an mlkd-train flag
    assert not (tmp_path / "kd_beyond_compression_runs").exists()


def test_folder_data_with_the_loops_flags_passed_through(tmp_path):
    """--data PATH: the teachers and students train on an ImageNet-style folder, with mlkd-train flags
    the study does not know (--image-size, --workers) given to every run."""
    make_image_folder(tmp_path / "data", per_class=10)
    out = tmp_path / "out"
    result = study.main(["--data", str(tmp_path / "data"), "--methods", "kd", "--settings", "sym40", "--seeds", "0",
                         "--calibration-seeds", "1000", "--grid", "1", "--gap", "large=resnet18", "--arch", "resnet18",
                         "--epochs", "1", "--batch-size", "4", "--image-size", "16", "--workers", "0", "--out",
                         str(out)])
    table = [r for r in result["rows"] if r["phase"] == "table"]
    assert sorted(r["method"] for r in table) == ["ce", "kd", "teacher"]
    assert {r["train_samples"] for r in table} == {16} and {r["noisy_labels"] for r in table} == {8}
    config = json.loads((out / "kd_beyond_compression_runs" / "table" / "sym40" / "large" / "kd" / "w1" / "seed0"
                         / "config.json").read_text())
    assert config["image_size"] == 16 and config["workers"] == 0 and config["data"] == str(tmp_path / "data")
    assert result["protocol"]["extra"] == ["--image-size", "16", "--workers", "0"]
    assert config["val_fraction"] == 0.2


def test_claims_come_from_the_corrected_statistics_only():
    def cell(mean, survives, p_bh):
        return {"mean": mean, "survives": survives, "p_bh": p_bh}

    result = {"statistics": {
        "cells": {"large:kd:clean": cell(1.0, False, 0.2), "large:kd:sym40": cell(3.0, True, 0.01),
                  "large:at:sym40": cell(-5.0, True, 0.001), "-:dml:lt10": cell(0.5, False, 0.04),
                  "large:kd:lt10": cell(2.0, False, 0.06)},
        "teacher_minus_ce": {"large:sym40": {"ci_low": 2.0}, "large:lt10": {"ci_low": -1.0}}}}
    text = study.claims(result)
    assert "better than CE — kd (large gap): sym40; worse than CE — at (large gap): sym40" in text
    assert "4 of the 5 cells have a mean above CE; 1 of them survive" in text and "(2 survive Benjamini" in text
    assert "no method is significantly better than CE at: lt10" in text
    assert "not clearly above the CE student" in text and "large gap, lt10" in text and "large gap, sym40" not in text
    assert "not available offline" in text


def test_the_whole_default_protocol_after_its_runs_with_every_method(tmp_path, monkeypatch):
    """Everything the default command does once its runs have trained (weights, seeds, the table's plan,
    statistics, tables, plots, README), for every method, on made-up results: no training. A bug there
    would otherwise show only after the pilot's half hour."""
    import random

    def fake_execute(keys, protocol, runs_dir, jobs, threads, commit, label):
        rows = []
        for k in keys:
            if k.method == "cache":
                continue
            rng = random.Random(f"{k}")
            top1 = 60 + rng.gauss(0, 1) + (4 if k.method == "kd" else 0) + (30 if k.method == "teacher" else 0)
            summary = {"student_top1": top1, "best_top1": top1, "best_epoch": 30, "val_top1": top1 + rng.gauss(0, 1),
                       "seconds": 1.0}
            rows.append(study._row(k, summary, protocol, commit))
        return rows, len(keys)

    monkeypatch.setattr(study, "execute", fake_execute)
    readme = tmp_path / "README.md"
    readme.write_text(f"{study.START}\n{study.END}\n")
    result = study.main(["--out", str(tmp_path / "out"), "--readme", str(readme)])
    chosen = {v["method"]: v for v in result["weights"].values()}
    assert chosen["cc"]["reference"] == study.reference_weight("cc", study.default_protocol(*study.parse_args([])))
    assert all(v["reference"] is not None and v["chosen"] in map(float, v["validation_top1"]) for v in chosen.values())
    assert len(result["protocol"]["seeds"]) == 5 and result["pilot"]["needed"] >= 5
    methods = {r["method"] for r in result["rows"] if r["phase"] == "table"}
    assert methods == set(result["methods"]) | {"teacher"}
    text = readme.read_text()
    assert "kd (large gap)" in text and "| cc |" in text and "the power estimate asks for" in text
