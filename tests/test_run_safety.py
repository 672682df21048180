"""The run-safety contract of ``mlkd-train`` and ``mlkd-cache`` (SPEC section 4, issue #33): a run
folder is never overwritten or mixed, a failing command leaves it byte for byte as it was, ``--resume``
refuses a change to the run, a non-finite loss stops the run, the logs are strict JSON and mean one
thing per field; and the friction items (one exit status for a clean stop, ordinary permissions, no
duplicate checkpoint, plain progress lines off a terminal, a warning for skipped images, an export to
the network's own library).

Runs are tiny (digits, 8 training images per class, batch 16: 5 steps an epoch, cnn-tiny networks)
and the command line is called in-process (``mlkd_fast.train.__main__.main`` returns the exit status)
except where a signal is sent.
"""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlkd_fast.methods import base as methods_base
from mlkd_fast.methods import kd as kd_method
from mlkd_fast.train import cache as C
from mlkd_fast.train.__main__ import main as train_cli

from helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train-per-class", "8", "--batch-size", "16", "--arch", "cnn-tiny", "--teacher-arch", "cnn-tiny",
        "--quiet", "--no-curves"]
STEPS = 5  # 80 training images / 16
KD = TINY + ["--method", "kd", "--teacher-epochs", "1", "--epochs", "1"]


def folder_hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256 of its bytes)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def strict_lines(path: Path) -> list[dict]:
    """A .jsonl file parsed strictly: NaN / Infinity (not JSON) fail the test."""
    def refuse(token):
        raise AssertionError(f"{path.name} holds {token}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished kd run (teacher 1 epoch, student 1 epoch), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_cli(KD + ["--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ---- 1. an existing run (or cache) is refused; --overwrite moves it aside -----------------------------
def test_an_existing_run_is_refused_naming_it_and_the_flags_that_proceed(run_copy, capsys):
    before = folder_hashes(run_copy)
    capsys.readouterr()
    assert train_cli(KD + ["--out", str(run_copy)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"mlkd-train: --out '{run_copy}' holds a run (")
    assert "--resume" in line and "--overwrite" in line and f"{run_copy}.old-" in line
    assert folder_hashes(run_copy) == before


def test_two_plain_runs_sharing_the_default_out_do_not_mix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    plain = TINY + ["--method", "ce", "--teacher-epochs", "0", "--epochs", "1"]
    assert train_cli(plain) == 0
    before = folder_hashes(tmp_path / "runs" / "digits")
    capsys.readouterr()
    assert train_cli(TINY + ["--method", "kd", "--teacher-epochs", "1", "--epochs", "1"]) == 2
    assert "runs/digits' holds a run" in one_error_line(capsys.readouterr().err)
    assert folder_hashes(tmp_path / "runs" / "digits") == before


def test_overwrite_moves_the_old_run_aside_and_says_where(run_copy, capsys):
    before = folder_hashes(run_copy)
    capsys.readouterr()
    assert train_cli(KD + ["--out", str(run_copy), "--overwrite", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    aside = [p for p in run_copy.parent.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and f"moved the previous contents of {run_copy} to {aside[0]}" in err
    assert folder_hashes(aside[0]) == before  # nothing of the old run is lost or mixed
    assert json.loads((run_copy / "config.json").read_text())["seed"] == 1
    assert len(strict_lines(run_copy / "metrics.jsonl")) == 2  # the new run's teacher and student epochs only


def test_a_failing_overwrite_moves_nothing(run_copy, capsys):
    before = folder_hashes(run_copy)
    assert train_cli(KD + ["--out", str(run_copy), "--overwrite", "--teacher-epochs", "0",
                           "--teacher-weights", str(run_copy / "missing.pt")]) == 2
    assert folder_hashes(run_copy) == before
    assert not [p for p in run_copy.parent.iterdir() if ".old-" in p.name]


@pytest.mark.parametrize("where", ["file", "under_a_file", "proc"])
def test_out_that_is_a_file_or_cannot_be_written_is_one_line_in_both_commands(tmp_path, capsys, where, finished):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    if where == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    out = {"file": afile, "under_a_file": afile / "run", "proc": Path("/proc/mlkd-no-such/run")}[where]
    capsys.readouterr()
    assert train_cli(KD + ["--out", str(out)]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"mlkd-train: --out '{out}' ")
    cache = ["--teacher-arch", "cnn-tiny", "--teacher-weights", str(finished / "teacher.pt"), "--train-per-class",
             "8", "--epochs", "1", "--quiet", "--out", str(out)]
    assert C.cli(cache) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"mlkd-cache: --out '{out}' ")
    assert afile.read_text() == "keep me"


def test_an_existing_cache_is_refused_resumed_or_moved_aside(tmp_path, finished, capsys):
    out = tmp_path / "cache"
    cache = ["--teacher-arch", "cnn-tiny", "--teacher-weights", str(finished / "teacher.pt"), "--train-per-class",
             "8", "--epochs", "1", "--batch-size", "16", "--shard-size", "16", "--quiet", "--out", str(out)]
    assert C.cli(cache + ["--max-shards", "2"]) == 0
    before = folder_hashes(out)
    capsys.readouterr()
    assert C.cli(cache) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"mlkd-cache: --out '{out}' holds a teacher cache (manifest.json)")
    assert "--resume" in line and "--overwrite" in line
    assert folder_hashes(out) == before
    assert C.cli(cache + ["--resume"]) == 0  # keeps the 2 shards, writes the other 3
    assert set(before) <= set(folder_hashes(out)) and len(list(out.glob("e0000-*.pt"))) == STEPS
    assert C.cli(cache + ["--overwrite"]) == 0
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("cache.old-")]) == 1
    capsys.readouterr()
    assert C.cli(cache[:-1] + [str(finished), "--resume"]) == 2  # a training run is not a cache
    assert "holds a training run" in one_error_line(capsys.readouterr().err)


# ---- 2. a failing command leaves the folder byte-identical -------------------------------------------
def test_failing_commands_on_an_existing_run_leave_it_byte_identical(run_copy, monkeypatch, capsys):
    before = folder_hashes(run_copy)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the package missing: ImportError
    assert train_cli(KD + ["--out", str(run_copy), "--resume", "--epochs", "2", "--tensorboard"]) == 2
    assert "pip install tensorboard" in one_error_line(capsys.readouterr().err)
    assert folder_hashes(run_copy) == before
    monkeypatch.undo()
    # the teacher's weights cannot be read
    assert train_cli(KD + ["--out", str(run_copy), "--resume", "--epochs", "2", "--teacher-weights",
                           str(run_copy / "nothing.pt"), "--teacher-epochs", "0"]) == 2
    assert "nothing.pt" in one_error_line(capsys.readouterr().err)
    assert folder_hashes(run_copy) == before


# ---- 3, 4. --resume refuses a change to the run ----------------------------------------------------------
@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Path, Path]:
    """A kd run stopped mid-epoch (student epoch 1 step 2) from given teacher weights, and a second
    teacher file of the same architecture with other weights."""
    root = tmp_path_factory.mktemp("stopped")
    assert train_cli(TINY + ["--method", "ce", "--teacher-epochs", "0", "--epochs", "1", "--out",
                             str(root / "t")]) == 0
    state = torch.load(root / "t" / "student.pt", weights_only=True)
    torch.save(state, root / "t1.pt")
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, root / "t2.pt")
    out = root / "run"
    assert train_cli(TINY + ["--method", "kd", "--teacher-weights", str(root / "t1.pt"), "--epochs", "2",
                             "--max-steps", "2", "--out", str(out)]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2
    return root, out


@pytest.mark.parametrize("flag,value,named", [
    ("--lr", "0.5", "--lr is 0.02 in the checkpoint but 0.5 in this run"),
    ("--weight-decay", "0.1", "--weight-decay is 0.0005 in the checkpoint but 0.1 in this run"),
    ("--lr-steps", "1", "--lr-steps is cosine in the checkpoint but [1] in this run"),
    ("--batch-size", "8", "--batch-size is 16 in the checkpoint but 8 in this run"),
    ("--no-nesterov", None, "--nesterov is True in the checkpoint but False in this run"),
    ("--precision", "bf16", "precision (--precision, as resolved on the device) is 'fp32' in the checkpoint but "
                            "'bf16' in this run"),
    ("--teacher-weights", "t2.pt", "teacher's weights (sha256 of --teacher-weights"),
])
def test_resume_refuses_a_change_naming_the_setting_and_both_values(stopped, flag, value, named, tmp_path, capsys):
    root, stopped_run = stopped
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    before = folder_hashes(out)
    argv = TINY + ["--method", "kd", "--teacher-weights", str(root / "t1.pt"), "--epochs", "2", "--out", str(out),
                   "--resume"]
    if flag == "--teacher-weights":
        argv[argv.index(str(root / "t1.pt"))] = str(root / value)
    else:
        argv += [flag] + ([value] if value is not None else [])
    capsys.readouterr()
    assert train_cli(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"mlkd-train: --resume: '{out / 'checkpoint.pt'}' was written with other settings: ")
    assert named in line
    if flag == "--teacher-weights":  # both hashes, shortened
        sha = [hashlib.sha256((root / n).read_bytes()).hexdigest()[:12] for n in ("t1.pt", "t2.pt")]
        assert f"is '{sha[0]}' in the checkpoint but '{sha[1]}' in this run" in line
    assert folder_hashes(out) == before


def test_resume_refuses_other_data_and_accepts_what_it_documents_as_changeable(tmp_path, capsys):
    for name in ("a", "b"):
        make_image_folder(tmp_path / name, per_class=4)
    folder = ["--arch", "cnn-tiny", "--method", "ce", "--teacher-epochs", "0", "--image-size", "16", "--batch-size",
              "4", "--workers", "0", "--quiet", "--no-curves", "--epochs", "2"]
    out = tmp_path / "run"
    assert train_cli(folder + ["--data", str(tmp_path / "a"), "--out", str(out), "--max-steps", "1"]) == 0
    before = folder_hashes(out)
    capsys.readouterr()
    # folder data are told apart by their file list (paths under train/ and labels), as the teacher cache's
    # manifest does: a folder with another file list is refused
    (tmp_path / "b" / "train" / "a" / "0.png").rename(tmp_path / "b" / "train" / "a" / "extra.png")
    assert train_cli(folder + ["--data", str(tmp_path / "b"), "--out", str(out), "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "training data (--data and its corruption flags; sha256" in line and "in the checkpoint but" in line
    assert train_cli(folder + ["--data", str(tmp_path / "a"), "--out", str(out), "--resume", "--image-size",
                               "20"]) == 2
    assert "--image-size is 16 in the checkpoint but 20 in this run" in one_error_line(capsys.readouterr().err)
    assert folder_hashes(out) == before
    # changeable: the data's path (same files), --epochs, the logging flags, --workers
    moved = tmp_path / "a-moved"
    shutil.copytree(tmp_path / "a", moved)
    assert train_cli(folder + ["--data", str(moved), "--out", str(out), "--resume", "--epochs", "3",
                               "--log-every", "1", "--workers", "1"]) == 0
    config = json.loads((out / "config.json").read_text())  # what actually ran
    assert (config["epochs"], config["log_every"], config["data"], config["workers"]) == (3, 1, str(moved), 1)


# ---- 5. a non-finite loss stops the run ---------------------------------------------------------------
def _poison(monkeypatch, term: str, at_call: int) -> None:
    """Makes ``term`` NaN in the ``at_call``-th training call of a distiller that has that term: in the sum
    of its terms (``Distiller._total``) or, for kd, whose CE and KD are one op, in that op's result."""
    plain = methods_base.Distiller._total
    calls = {"n": 0}

    def now() -> bool:
        calls["n"] += 1
        return calls["n"] == at_call

    def total(self, terms):
        if term in terms and self.training and now():
            terms = {**terms, term: terms[term] * float("nan")}
        return plain(self, terms)

    monkeypatch.setattr(methods_base.Distiller, "_total", total)
    if term == "kd":
        one_op = kd_method.kd_ce_loss

        def kd_ce_loss(*args, **kwargs):
            loss, kd, ce = one_op(*args, **kwargs)
            if torch.is_grad_enabled() and now():
                return loss * float("nan"), kd * float("nan"), ce
            return loss, kd, ce

        monkeypatch.setattr(kd_method, "kd_ce_loss", kd_ce_loss)


def test_a_nonfinite_loss_stops_naming_the_step_and_term_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _poison(monkeypatch, "kd", STEPS + 4)  # student epoch 2, step 3 (0-based)
    capsys.readouterr()
    assert train_cli(KD[:-2] + ["--epochs", "3", "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("mlkd-train: non-finite loss at student epoch 2 step 3 (loss nan; term kd is nan)")
    assert f"the last checkpoint, {out / 'checkpoint.pt'}, is kept" in line
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (ckpt["phase"], ckpt["epoch"], ckpt["step"]) == ("student", 1, 0)  # after student epoch 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    records = strict_lines(out / "metrics.jsonl")
    assert [(r["phase"], r["epoch"]) for r in records] == [("teacher", 1), ("student", 1)]
    strict_lines(out / "steps.jsonl")
    assert not (out / "summary.json").exists()


def test_the_deferred_check_of_cuda_and_ddp_finds_the_same_step_before_anything_is_saved(
        tmp_path, monkeypatch, capsys):
    """On CUDA and under DDP the step does not sync: the first non-finite step is kept on the device and
    read at the end of the epoch. The poisoned update has run by then (the weights are NaN): nothing of
    that epoch is logged or saved, and the message names the same step and term."""
    from mlkd_fast.train import loop

    monkeypatch.setattr(loop, "checks_each_step", lambda ctx: False)
    out = tmp_path / "run"
    _poison(monkeypatch, "kd", STEPS + 4)
    capsys.readouterr()
    assert train_cli(KD[:-2] + ["--epochs", "3", "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("mlkd-train: non-finite loss at student epoch 2 step 3 (loss nan; term kd is nan)")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (ckpt["phase"], ckpt["epoch"], ckpt["step"]) == ("student", 1, 0)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [(r["phase"], r["epoch"]) for r in strict_lines(out / "metrics.jsonl")] == [("teacher", 1), ("student", 1)]


def test_a_huge_lr_stops_with_status_1_and_strict_logs(tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert train_cli(TINY + ["--method", "ce", "--teacher-epochs", "0", "--epochs", "2", "--lr", "1e9", "--out",
                             str(out), "--log-every", "1"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("mlkd-train: non-finite ") and "student epoch 1" in line
    for name in ("metrics.jsonl", "steps.jsonl", "config.json"):
        text = (out / name).read_text()
        assert "NaN" not in text and "Infinity" not in text
    strict_lines(out / "steps.jsonl")


def test_on_nonfinite_skip_skips_the_step_and_counts_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison(monkeypatch, "kd", 3)
    assert train_cli(KD + ["--out", str(out), "--on-nonfinite", "skip", "--log-every", "1"]) == 0
    student = [r for r in strict_lines(out / "metrics.jsonl") if r["phase"] == "student"]
    assert student[0]["skipped_steps"] == 1 and math.isfinite(student[0]["loss"])
    steps = [r for r in strict_lines(out / "steps.jsonl") if r["phase"] == "student"]
    assert [r["step"] for r in steps] == [0, 1, 3, 4]  # step 2 skipped: no update, no record
    weights = torch.load(out / "student.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


# ---- 6. metrics.jsonl: one meaning per field -----------------------------------------------------------
def test_metrics_hold_the_lr_each_epoch_trained_with_and_epoch_means_of_every_term(tmp_path, finished):
    out = tmp_path / "run"
    assert train_cli(TINY + ["--method", "kd", "--teacher-weights", str(finished / "teacher.pt"), "--epochs", "2",
                             "--out", str(out), "--log-every", "1"]) == 0
    metrics = [r for r in strict_lines(out / "metrics.jsonl") if r["phase"] == "student"]
    steps = [r for r in strict_lines(out / "steps.jsonl") if r["phase"] == "student"]
    for record in metrics:
        mine = [s for s in steps if s["epoch"] == record["epoch"]]
        assert len(mine) == STEPS and {s["lr"] for s in mine} == {record["lr"]}
        for key in ("loss", "ce", "kd", "total"):  # equal batches: the mean of the steps
            assert record[key] == pytest.approx(sum(s[key] for s in mine) / STEPS, abs=2e-5), key
    assert metrics[0]["lr"] == 0.02 and metrics[1]["lr"] == pytest.approx(0.01)  # cosine over 2 epochs


def test_a_mid_epoch_resume_logs_the_means_of_the_whole_epoch(tmp_path, finished):
    argv = TINY + ["--method", "kd", "--teacher-weights", str(finished / "teacher.pt"), "--epochs", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_cli(argv + ["--out", str(full)]) == 0
    # student epoch 1: 5 steps, then 2 steps of epoch 2
    assert train_cli(argv + ["--out", str(part), "--max-steps", str(STEPS + 2)]) == 0
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 2
    assert train_cli(argv + ["--out", str(part), "--resume"]) == 0
    a = [r for r in strict_lines(full / "metrics.jsonl") if r["phase"] == "student"]
    b = [r for r in strict_lines(part / "metrics.jsonl") if r["phase"] == "student"]
    assert [r["epoch"] for r in b] == [1, 2]
    for key in ("loss", "ce", "kd", "lr"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=1e-5), key


# ---- friction ----------------------------------------------------------------------------------------
def _wait_for(condition, proc, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_sigint_is_a_clean_stop_with_status_0_in_both_commands(tmp_path, finished):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mlkd_fast.train", *TINY, "--method", "ce", "--teacher-epochs",
                             "0", "--epochs", "100000", "--out", str(out)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "checkpoint.pt").exists(), proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "continue with --resume" in stdout and torch.load(out / "checkpoint.pt", weights_only=False)["step"] >= 0
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "mlkd_fast.cache", "--teacher-arch", "cnn-tiny",
                             "--teacher-weights", str(finished / "teacher.pt"), "--train-per-class", "8",
                             "--epochs", "2000", "--batch-size", "16", "--shard-size", "16", "--out", str(cache)],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (cache / "e0000-s00000.pt").exists(), proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped;" in stdout and "--resume continues it" in stdout
    assert "\r" not in stderr  # not a terminal: no progress bar


def test_run_files_have_ordinary_permissions_and_no_duplicate_checkpoint(finished):
    mask = os.umask(0o022)
    os.umask(mask)
    for path in finished.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
    assert not (finished / "student_state.pt").exists()  # the final state is checkpoint.pt's
    state = torch.load(finished / "checkpoint.pt", weights_only=False)
    assert (state["phase"], state["epoch"], state["step"]) == ("student", 1, 0)


def test_a_finished_phase_trains_on_from_its_single_final_state(tmp_path):
    out = tmp_path / "run"
    argv = TINY + ["--method", "ce", "--teacher-epochs", "0", "--compare-baseline", "--out", str(out)]
    assert train_cli(argv + ["--epochs", "1"]) == 0
    student = torch.load(out / "student_state.pt", weights_only=False)  # kept when the baseline followed
    baseline = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (student["phase"], baseline["phase"]) == ("student", "baseline")
    assert not (out / "baseline_state.pt").exists()
    assert train_cli(argv + ["--epochs", "2", "--resume"]) == 0  # both trained on, from their final states
    epochs = [(r["phase"], r["epoch"]) for r in strict_lines(out / "metrics.jsonl")]
    assert epochs == [("student", 1), ("baseline", 1), ("student", 2), ("baseline", 2)]
    assert json.loads((out / "summary.json").read_text())["last_epoch"] == 2


def test_progress_off_a_terminal_writes_no_carriage_returns(tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert train_cli([a for a in TINY if a != "--quiet"] + ["--method", "ce", "--teacher-epochs", "0", "--epochs",
                                                              "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    assert "[ student] epoch   1" in captured.out


def test_skipped_undecodable_images_give_one_warning_line(tmp_path, capsys):
    make_image_folder(tmp_path / "data", per_class=4, corrupt=2)
    capsys.readouterr()
    assert train_cli(["--data", str(tmp_path / "data"), "--arch", "cnn-tiny", "--method", "ce", "--teacher-epochs",
                      "0", "--image-size", "16", "--batch-size", "4", "--workers", "0", "--epochs", "2", "--quiet",
                      "--no-curves", "--out", str(tmp_path / "run")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["mlkd-train: warning: 2 undecodable image(s) skipped in student epoch 1 (counted in "
                        "corrupt_images; --on-corrupt fail stops at the first, naming it)"]


def test_export_writes_the_student_in_torchvision_layout_with_its_transform(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from mlkd_fast.train import export_student
    from mlkd_fast.train.models import build_model

    make_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=2)
    out = tmp_path / "run"
    assert train_cli(["--data", str(tmp_path / "data"), "--arch", "resnet18", "--method", "ce", "--teacher-epochs",
                      "0", "--image-size", "32", "--batch-size", "3", "--workers", "0", "--epochs", "1", "--quiet",
                      "--no-curves", "--out", str(out)]) == 0
    meta = export_student(str(out), str(tmp_path / "r18.pt"))
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(tmp_path / "r18.pt", weights_only=True))  # strict: torchvision's keys
    ours = build_model("resnet18", 3)
    ours.load_state_dict(torch.load(out / "student.pt", weights_only=True)["model"])
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), ours.eval()(x)[0])
    written = json.loads((tmp_path / "r18.json").read_text())
    assert written == meta and written["library"] == "torchvision" and written["num_classes"] == 3
    t = written["transform"]
    assert (t["resize"], t["center_crop"], t["mean"], t["std"]) == (37, 32, [0.485, 0.456, 0.406],
                                                                     [0.229, 0.224, 0.225])


def test_export_of_a_digits_student_loads_into_the_library_network(finished, tmp_path):
    from mlkd_fast.train.export import main as export_cli
    from mlkd_fast.train.models import build_model

    assert export_cli([str(finished), str(tmp_path / "s.pt")]) == 0
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["library"] == "mlkd_fast" and meta["transform"]["input_size"] == [1, 8, 8]
    build_model("cnn-tiny", 10, in_channels=1).load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert export_cli([str(tmp_path / "nowhere"), str(tmp_path / "x.pt")]) == 2


def test_python_m_export_prints_no_runpy_warning(finished, tmp_path):
    """``python -m mlkd_fast.train.export``: the package does not import the module first (runpy's
    "found in sys.modules after import of package" RuntimeWarning), and ``from mlkd_fast.train import
    export_student`` still works."""
    done = subprocess.run([sys.executable, "-W", "default", "-m", "mlkd_fast.train.export", str(finished),
                           str(tmp_path / "s.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" not in done.stderr and "sys.modules" not in done.stderr, done.stderr
    assert (tmp_path / "s.pt").is_file()
    from mlkd_fast.train import export_student
    from mlkd_fast.train.export import export_student as direct

    assert export_student is direct
