"""The command line's contract: the exit status of both entry points (``mlkd-train`` and
``python -m mlkd_fast.train``), user errors as one line (``--debug``: the traceback), ``--resume``
with a larger ``--epochs``, and teachers trained or fine-tuned on folder data."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mlkd_fast.train import main, parse_args
from mlkd_fast.train import __main__ as command
from mlkd_fast.train.errors import InputError, UserError
from mlkd_fast.train.models import build_model

from helpers import make_image_folder

TINY = ["--epochs", "1", "--teacher-epochs", "1", "--quiet"]
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "mlkd-train")
SCRIPT = _SCRIPT if os.path.isfile(_SCRIPT) else shutil.which("mlkd-train")
ENTRY_POINTS = {"console-script": [SCRIPT], "module": [sys.executable, "-m", "mlkd_fast.train"]}


def _cli(*argv, entry="console-script", timeout=300):
    if ENTRY_POINTS[entry][0] is None:
        pytest.skip("the mlkd-train console script is not installed (pip install -e .)")
    return subprocess.run([*ENTRY_POINTS[entry], *map(str, argv)], capture_output=True, text=True, timeout=timeout)


def _one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlkd-train: "), res.stderr
    assert "Traceback" not in res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- A: exit status -------------------------------------------------------------------------
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_finished_run_exits_0_from_both_entry_points(tmp_path, entry):
    res = _cli("--out", tmp_path, *TINY, entry=entry)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "student (mlkd) top-1" in res.stdout and "Traceback" not in res.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["last_epoch"] == 1
    if entry == "console-script":  # resumed unchanged: says it is finished, trains nothing, exits 0
        again = _cli("--out", tmp_path, *TINY, "--resume")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "is finished (1 epoch): nothing to train" in again.stderr
        assert len(_records(tmp_path)) == 2  # teacher and student, each one epoch, logged once


def test_a_stop_by_max_steps_exits_0(tmp_path):
    res = _cli("--out", tmp_path, *TINY, "--max-steps", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "continue with --resume" in res.stdout
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 1


def test_sigint_mid_run_saves_a_checkpoint_and_exits_0(tmp_path):
    if SCRIPT is None:
        pytest.skip("the mlkd-train console script is not installed")
    proc = subprocess.Popen([SCRIPT, "--out", str(tmp_path), "--teacher-epochs", "400", "--epochs", "1", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # the first epoch's checkpoint: training has begun
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "continue with --resume" in stdout and "Traceback" not in stderr
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["phase"] == "teacher"


def test_missing_weights_file_is_one_line_with_status_2(tmp_path):
    res = _cli("--out", tmp_path / "run", "--epochs", "1", "--quiet", "--teacher-weights", tmp_path / "missing.pt")
    _one_line_error(res, "missing.pt", "does not exist")


def test_missing_val_folder_is_one_line_with_status_2(tmp_path):
    make_image_folder(tmp_path / "data", per_class=2)
    shutil.rmtree(tmp_path / "data" / "val")
    res = _cli("--data", tmp_path / "data", "--method", "ce", "--epochs", "1", "--image-size", "16",
               "--workers", "0", "--batch-size", "2", "--out", tmp_path / "run", "--quiet", entry="module")
    _one_line_error(res, str(tmp_path / "data" / "val"), "does not exist")


def test_debug_shows_the_traceback(tmp_path):
    res = _cli("--out", tmp_path / "run", "--epochs", "1", "--quiet", "--teacher-weights", tmp_path / "missing.pt",
               "--debug")
    assert res.returncode == 2 and "Traceback (most recent call last)" in res.stderr, res.stderr
    assert "MissingInputError" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("mlkd-train: weights file ")


def _command(argv, capsys):
    """The console entry point in this process: (exit status, stderr lines)."""
    status = command.main([str(a) for a in argv])
    return status, capsys.readouterr().err.strip().splitlines()


def test_other_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    cases = []
    cases.append((["--epochs", "0"], "--epochs must be >= 1"))
    cases.append((["--method", "hinton"], "invalid choice: 'hinton'"))
    weights = tmp_path / "small.pt"
    torch.save({"model": build_model("cnn-small", 10).state_dict()}, weights)
    cases.append((["--teacher-weights", weights, "--teacher-arch", "cnn-large", "--out", tmp_path / "arch", *TINY[:2]],
                  "do not fit --arch cnn-large"))
    make_image_folder(tmp_path / "data", per_class=2)
    os.makedirs(tmp_path / "data" / "train" / "empty")
    cases.append((["--data", tmp_path / "data", "--method", "ce", "--out", tmp_path / "empty"], "holds no images"))
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda", "--out", tmp_path / "cuda"], "--device cuda but no CUDA GPU is visible"))
    for argv, fragment in cases:
        status, err = _command(argv, capsys)
        assert status == 2 and len(err) == 1 and err[0].startswith("mlkd-train: ") and fragment in err[0], (argv, err)


@pytest.mark.parametrize("workers", [0, 1])
def test_on_corrupt_fail_names_the_file_in_one_line_even_from_a_loader_worker(tmp_path, capsys, workers):
    """A worker's error reaches the main process wrapped in the worker's traceback; the one line is
    the original message, naming the file."""
    make_image_folder(tmp_path / "data", per_class=2, corrupt=1)  # 5 training files: one batch of 5
    status, err = _command(["--data", tmp_path / "data", "--method", "ce", "--arch", "resnet18", "--image-size", "16",
                            "--batch-size", "5", "--epochs", "1", "--workers", workers, "--on-corrupt", "fail",
                            "--out", tmp_path / "out", "--quiet"], capsys)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("mlkd-train: cannot decode image ") and "broken0.jpg" in err[0], err


def test_resume_with_other_settings_is_one_line_with_status_2(tmp_path, capsys):
    run = ["--method", "ce", "--teacher-epochs", "0", "--epochs", "1", "--train-per-class", "10", "--batch-size", "16",
           "--out", tmp_path, "--quiet"]
    assert command.main([str(a) for a in run] + ["--max-steps", "1"]) == 0
    capsys.readouterr()
    status, err = _command([*run, "--resume", "--seed", "1"], capsys)
    assert status == 2 and len(err) == 1 and "--seed is 0 in the checkpoint but 1 in this run" in err[0], err


def test_internal_errors_keep_their_traceback_and_a_nonzero_status(tmp_path):
    """A ValueError that is not one of the loop's user errors (here: raised inside the run) is a bug:
    the console entry point lets it through, so Python prints the traceback and exits with 1."""
    code = ("import sys, mlkd_fast.train.__main__ as m\n"
            "def broken(args):\n    raise ValueError('an internal bug')\n"
            "m.run_parsed = broken\n"
            f"sys.exit(m.main(['--out', {str(tmp_path)!r}, '--quiet']))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr, res.stderr
    assert "ValueError: an internal bug" in res.stderr


def test_python_main_raises_user_errors_as_the_builtin_types(tmp_path):
    """From Python the errors are raised (the study and scripts catch them): a missing file is a
    FileNotFoundError, a bad one a ValueError, both marked as user errors."""
    with pytest.raises(FileNotFoundError, match="missing.pt") as exc:
        main(["--out", str(tmp_path), "--epochs", "1", "--quiet", "--teacher-weights", str(tmp_path / "missing.pt")])
    assert isinstance(exc.value, UserError)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="truncated or corrupt") as exc:
        main(["--out", str(tmp_path), "--epochs", "1", "--quiet", "--teacher-weights", str(tmp_path / "bad.pt")])
    assert isinstance(exc.value, InputError)


# ---- B: --resume with a larger --epochs -----------------------------------------------------
def test_resume_with_a_larger_epochs_trains_the_student_on_and_not_the_teacher(tmp_path):
    """With --lr-steps the schedule does not depend on the run's length: a finished 2-epoch run trained
    on to 4 epochs is bit for bit the 4-epoch run (weights, optimiser, RNG continue); the teacher
    (--teacher-epochs) is not retrained."""
    common = ["--method", "kd", "--teacher-epochs", "1", "--lr-steps", "1,3", "--quiet"]
    full = main(["--out", str(tmp_path / "full"), *common, "--epochs", "4"])
    part = tmp_path / "part"
    main(["--out", str(part), *common, "--epochs", "2"])
    teacher_bytes = (part / "teacher.pt").read_bytes()
    longer = main(["--out", str(part), *common, "--epochs", "4", "--resume"])
    assert [(r["phase"], r["epoch"]) for r in _records(part)] == [("teacher", 1)] + [("student", e) for e in range(1, 5)]
    assert (part / "teacher.pt").read_bytes() == teacher_bytes
    a = torch.load(tmp_path / "full" / "student.pt", weights_only=True)["model"]
    b = torch.load(part / "student.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert longer["last_epoch"] == 4 and longer["student_top1"] == full["student_top1"]
    assert [r["lr"] for r in _records(part)][1:] == [r["lr"] for r in _records(tmp_path / "full")][1:]
    # a larger --teacher-epochs does not retrain the finished teacher either
    main(["--out", str(part), *common, "--epochs", "4", "--teacher-epochs", "3", "--resume"])
    assert (part / "teacher.pt").read_bytes() == teacher_bytes and len(_records(part)) == 5


def test_resume_with_a_larger_epochs_continues_on_the_cosine_of_the_new_length(tmp_path, capsys):
    """Cosine: the lr of every added epoch is that of a fresh run of the new length (back up from 0 at
    the old end); the baseline (--compare-baseline) is trained on too, from its own final state."""
    common = ["--method", "ce", "--teacher-epochs", "0", "--train-per-class", "10", "--batch-size", "16",
              "--compare-baseline", "--quiet"]
    main(["--out", str(tmp_path / "full"), *common, "--epochs", "4"])
    part = tmp_path / "part"
    main(["--out", str(part), *common, "--epochs", "2"])
    # each record holds the lr its epoch trained with: the 2-epoch cosine's 0.02 then 0.01 (then 0 at its end)
    assert [r["lr"] for r in _records(part)][:2] == pytest.approx([0.02, 0.01], abs=1e-12)
    summary = main(["--out", str(part), *common, "--epochs", "4", "--resume"])
    got = [(r["phase"], r["epoch"], r["lr"]) for r in _records(part)]
    assert [g[:2] for g in got] == ([("student", 1), ("student", 2), ("baseline", 1), ("baseline", 2)]
                                    + [("student", 3), ("student", 4), ("baseline", 3), ("baseline", 4)])
    fresh = {(r["phase"], r["epoch"]): r["lr"] for r in _records(tmp_path / "full")}
    for phase, epoch, lr in got[4:]:
        assert lr == pytest.approx(fresh[(phase, epoch)], rel=1e-9, abs=1e-12), (phase, epoch)
    # epoch 3 of the 4-epoch cosine, trained on from the 2-epoch run's end (lr ~0 there): back up to 0.01
    assert fresh[("student", 3)] == pytest.approx(0.02 * (1 + math.cos(math.pi * 2 / 4)) / 2)
    assert fresh[("student", 4)] == pytest.approx(0.02 * (1 + math.cos(math.pi * 3 / 4)) / 2)
    assert summary["last_epoch"] == 4 and "baseline_top1" in summary
    # fewer epochs than already trained: refused, nothing trained
    with pytest.raises(InputError, match="the student has trained 4 epoch.s. already, more than --epochs 3"):
        main(["--out", str(part), *common, "--epochs", "3", "--resume"])
    # unchanged: finished, nothing trained, the summary (with its training time) kept
    capsys.readouterr()
    before = (part / "summary.json").read_text()
    assert main(["--out", str(part), *common, "--epochs", "4", "--resume"]) == json.loads(before)
    assert "is finished (4 epochs): nothing to train" in capsys.readouterr().err
    assert (part / "summary.json").read_text() == before and len(_records(part)) == 8


def test_epochs_is_not_a_setting_that_refuses_a_resume():
    from mlkd_fast.train.run import MID_EPOCH_SETTINGS, RESUME_SETTINGS

    assert "epochs" not in RESUME_SETTINGS + MID_EPOCH_SETTINGS
    assert "teacher_epochs" not in RESUME_SETTINGS + MID_EPOCH_SETTINGS


def test_help_says_what_resume_with_another_epochs_does_to_the_lr(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "cosine: the lr jumps back up" in text and "the milestones stay" in text
    assert "Default: 30 on digits; 0 on folder data" in text and "--teacher-new-head" in text


# ---- C: teachers on folder data -------------------------------------------------------------
FOLDER = ["--arch", "resnet18", "--teacher-arch", "resnet18", "--image-size", "32", "--batch-size", "4",
          "--workers", "0", "--epochs", "1", "--quiet"]


@pytest.fixture
def folder(tmp_path):
    make_image_folder(tmp_path / "data", per_class=6)  # 2 classes, 12 training images: 3 batches of 4
    return tmp_path / "data"


def test_teacher_epochs_trains_a_teacher_on_folder_data(tmp_path, folder):
    out = tmp_path / "out"
    summary = main(["--data", str(folder), *FOLDER, "--method", "kd", "--teacher-epochs", "1", "--out", str(out)])
    assert 0.0 <= summary["teacher_top1"] <= 100.0 and 0.0 <= summary["student_top1"] <= 100.0
    assert [r["phase"] for r in _records(out)] == ["teacher", "student"]
    assert build_model("resnet18", 2, str(out / "teacher.pt")) is not None  # a 2-class teacher


@pytest.mark.parametrize("argv, message", [
    ([], "--teacher-weights is required to distil on a folder dataset, unless --teacher-epochs N"),
    (["--teacher-new-head", "--teacher-weights", "w.pt"], "give --teacher-epochs N"),
    (["--teacher-new-head", "--teacher-epochs", "1"], "--teacher-new-head replaces the classifier of --teacher-weights"),
    (["--teacher-weights", "w.pt", "--teacher-epochs", "2"], "add --teacher-new-head to fine-tune it"),
])
def test_folder_teacher_flags_are_checked(folder, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--data", str(folder), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_folder_defaults_train_no_teacher_unless_asked(folder):
    assert parse_args(["--data", str(folder), "--method", "ce"]).teacher_epochs == 0
    assert parse_args(["--data", str(folder), "--teacher-weights", "w.pt"]).teacher_epochs == 0
    assert parse_args([]).teacher_epochs == 30  # digits


def test_weights_of_another_class_count_are_refused_naming_both_counts_and_the_flag(tmp_path, folder):
    weights = tmp_path / "five.pt"
    torch.save(build_model("resnet18", 5).state_dict(), weights)
    with pytest.raises(InputError, match="classify 5 classes but the data has 2: .*--teacher-new-head"):
        main(["--data", str(folder), *FOLDER, "--teacher-weights", str(weights), "--out", str(tmp_path / "out")])


def test_teacher_new_head_fine_tunes_the_weights_with_a_new_classifier(tmp_path, folder):
    weights = tmp_path / "five.pt"
    given = build_model("resnet18", 5).state_dict()
    torch.save(given, weights)
    out = tmp_path / "out"
    run = ["--data", str(folder), *FOLDER, "--teacher-weights", str(weights), "--teacher-new-head",
           "--teacher-epochs", "1", "--out", str(out)]
    assert main([*run, "--max-steps", "0"]) == {"interrupted": True}  # stopped before the first step
    start = torch.load(out / "checkpoint.pt", weights_only=False)
    assert start["phase"] == "teacher" and (start["epoch"], start["step"]) == (0, 0)
    body = [k for k in given if not k.startswith("head.")]
    assert body and all(torch.equal(start["model"][k], given[k]) for k in body)  # the given weights
    assert start["model"]["head.weight"].shape == (2, 512)  # a new classifier for the data's 2 classes
    summary = main([*run, "--resume"])
    assert "teacher_top1" in summary and [r["phase"] for r in _records(out)] == ["teacher", "student"]
    tuned = torch.load(out / "teacher.pt", weights_only=True)["model"]
    assert any(not torch.equal(tuned[k], given[k]) for k in body if given[k].is_floating_point())
