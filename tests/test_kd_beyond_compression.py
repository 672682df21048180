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


def test_quick_slice_trains_each_teacher_once_and_every_method_per_setting(quick):
    out, result = quick
    rows = result["rows"]
    keys = sorted((r["method"], r["setting"], r["gap"]) for r in rows)
    assert keys == sorted([("teacher", s, "large") for s in ("clean", "sym40")]
                          + [(m, s, "-") for m in ("ce", "dml") for s in ("clean", "sym40")]
                          + [("kd", s, "large") for s in ("clean", "sym40")])
    for r in rows:
        assert 0.0 <= r["top1_last"] <= r["top1_best"] <= 100.0
        assert r["seed"] == 0 and r["seconds"] > 0 and r["epochs"] == 2 and r["train_samples"] == 200
    assert {r["noisy_labels"] for r in rows if r["setting"] == "sym40"} == {80}
    on_disk = json.loads((out / "kd_beyond_compression.json").read_text())
    assert on_disk["rows"] == rows and on_disk["protocol"]["student"] == "cnn-tiny"
    assert {"torch", "python", "mlkd_fast"} <= set(on_disk["versions"]) and on_disk["commit"]
    assert all(r["commit"] == on_disk["commit"] for r in rows) and on_disk["run_commits"] == [on_disk["commit"]]
    # the teacher the students learnt from is the one of their setting and seed
    config = (out / "kd_beyond_compression_runs" / "sym40" / "large" / "kd" / "seed0" / "config.json").read_text()
    assert json.loads(config)["teacher_weights"].endswith("sym40/large/teacher/seed0/student.pt")


def test_quick_slice_writes_the_table_and_the_noise_plot(quick):
    out, _ = quick
    table = (out / "kd_beyond_compression.md").read_text()
    assert "| method | clean | sym40 | settings above CE |" in table
    for method in ("teacher", "ce", "kd", "dml"):
        assert f"\n| {method} | " in table
    assert (out / "kd_beyond_compression_noise.png").stat().st_size > 1000
    assert not (out / "kd_beyond_compression_imbalance.png").exists()  # no imbalance setting in the slice


def test_a_second_invocation_redoes_only_unfinished_runs(quick, capsys):
    out, result = quick
    (out / "kd_beyond_compression_runs" / "clean" / "-" / "dml" / "seed0" / "summary.json").unlink()
    again = study.main(["--quick", "--out", str(out)])
    assert "8 runs, 7 already finished, 1 to train" in capsys.readouterr().out
    same = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert same(again["rows"]) == same(result["rows"])  # the retrained run gives the same numbers
    assert [c["runs_trained"] for c in again["invocations"]] == [8, 1]
    assert "wall time " in (out / "kd_beyond_compression.md").read_text()


def test_report_rebuilds_the_readme_section_from_the_json(quick, tmp_path):
    out, _ = quick
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{study.START}\nSTALE TABLE\n{study.END}\nrest\n")
    study.main(["--quick", "--out", str(out), "--report", "--readme", str(readme)])
    text = readme.read_text()
    assert "STALE TABLE" not in text and "| kd | " in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "kd_beyond_compression_noise.png" in text


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
    make_image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "out"
    result = study.main(["--data", str(tmp_path / "data"), "--methods", "kd", "--settings", "sym40", "--seeds", "0",
                         "--gap", "large=resnet18", "--arch", "resnet18", "--epochs", "1", "--batch-size", "4",
                         "--image-size", "16", "--workers", "0", "--out", str(out)])
    assert sorted(r["method"] for r in result["rows"]) == ["ce", "kd", "teacher"]
    assert {r["train_samples"] for r in result["rows"]} == {16} and {r["noisy_labels"] for r in result["rows"]} == {6}
    config = json.loads((out / "kd_beyond_compression_runs" / "sym40" / "large" / "kd" / "seed0" / "config.json")
                        .read_text())
    assert config["image_size"] == 16 and config["workers"] == 0 and config["data"] == str(tmp_path / "data")
    assert result["protocol"]["extra"] == ["--image-size", "16", "--workers", "0"]
