"""What a run writes for people to read (top-5, steps.jsonl, TensorBoard, curves.png), and how it is
configured: --recipe presets under explicit flags, --config FILE replaying a run."""
import json
import sys

import pytest
import torch
from torch import nn

from mlkd_fast.train import __main__ as command
from mlkd_fast.train import logs, loop, main, parse_args
from mlkd_fast.train.errors import MissingDependencyError

from helpers import make_cifar_pickles

TINY = ["--teacher-epochs", "1", "--epochs", "1", "--train-per-class", "10", "--batch-size", "16", "--quiet"]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ---- top-5 --------------------------------------------------------------------------------------
class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x.long().squeeze(1)], None


def test_evaluate_reports_top1_and_top5_and_no_top5_for_five_classes_or_fewer():
    ctx = loop.RunContext(torch.device("cpu"), loop.DistInfo(), None, "", print, loop.StopFlag())
    logits = torch.arange(10.0).repeat(4, 1)  # class 9 first, then 8, 7, 6, 5, ...
    y = torch.tensor([9, 5, 4, 0])            # top-1 hit, top-5 hit, miss, miss
    idx = torch.arange(4.0)[:, None]
    top1, top5 = loop.evaluate(_Fixed(logits), [(idx[:2], y[:2]), (idx[2:], y[2:])], ctx)
    assert top1 == 25.0 and top5 == 50.0
    top1, top5 = loop.evaluate(_Fixed(logits[:, :5]), [(idx, torch.tensor([4, 0, 1, 2]))], ctx)
    assert top1 == 25.0 and top5 != top5  # NaN: 100 by definition, reported as n/a (None)


def test_evaluate_reports_the_class_balanced_top1_the_mean_of_per_class_recalls():
    """Hand computation: class 0 has 3 samples (2 right), class 1 has 1 (right), class 2 has 2 (none right),
    class 3 none: balanced = (2/3 + 1 + 0) / 3 = 55.56 %, the plain top-1 3/6 = 50 %."""
    ctx = loop.RunContext(torch.device("cpu"), loop.DistInfo(), None, "", print, loop.StopFlag())
    predicted = torch.tensor([0, 0, 3, 1, 0, 1])  # the class each sample's logits put first
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    logits = nn.functional.one_hot(predicted, 4).float()
    idx = torch.arange(6.0)[:, None]
    accuracy = loop.evaluate(_Fixed(logits), [(idx[:4], y[:4]), (idx[4:], y[4:])], ctx)
    top1, top5 = accuracy  # still a pair
    assert top1 == 50.0 and abs(accuracy.balanced_top1 - 100 * (2 / 3 + 1 + 0) / 3) < 1e-9
    assert loop.evaluate(_Fixed(logits), [], ctx).balanced_top1 != loop.evaluate(_Fixed(logits), [], ctx).balanced_top1


def test_the_balanced_top1_is_logged_beside_top1_and_val_top1(tmp_path):
    summary = main(["--method", "ce", "--teacher-epochs", "0", "--epochs", "2", "--train-per-class", "30",
                    "--imbalance", "5", "--val-fraction", "0.3", "--batch-size", "16", "--quiet", "--no-curves",
                    "--out", str(tmp_path)])
    records = _records(tmp_path / "metrics.jsonl")
    assert all(0 <= r["balanced_top1"] <= 100 and 0 <= r["val_balanced_top1"] <= 100 for r in records)
    assert summary["balanced_top1"] == records[-1]["balanced_top1"] or \
        abs(summary["balanced_top1"] - records[-1]["balanced_top1"]) < 1e-3
    assert abs(summary["val_balanced_top1"] - records[-1]["val_balanced_top1"]) < 1e-3
    assert json.loads((tmp_path / "summary.json").read_text())["val_balanced_top1"] == summary["val_balanced_top1"]


# ---- metrics, steps, TensorBoard, curves ---------------------------------------------------------------
def test_a_run_logs_top5_per_epoch_terms_per_step_tensorboard_and_curves(tmp_path):
    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package")
    out = tmp_path / "run"
    summary = main(["--method", "kd", "--out", str(out), "--log-every", "2", "--tensorboard", *TINY])
    assert summary["student_top5"] >= summary["student_top1"] and summary["teacher_top5"] is not None
    epochs = _records(out / "metrics.jsonl")
    assert [r["phase"] for r in epochs] == ["teacher", "student"] and all(r["top5"] is not None for r in epochs)
    steps = _records(out / "steps.jsonl")
    student = [r for r in steps if r["phase"] == "student"]
    assert [r["global_step"] for r in student] == [1, 3, 5]  # 100 images, 6 steps of 16: every 2nd
    assert {"loss", "ce", "kd", "lr"} <= set(student[0]) and all(r["loss"] > 0 for r in student)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"student/loss", "student/kd", "student/ce", "student/lr", "student/top1", "student/top5",
            "student/images_per_s", "teacher/loss", "teacher/top1"} <= tags
    assert [e.step for e in events.Scalars("student/loss")] == [1, 3, 5]
    assert events.Scalars("student/top1")[0].value == pytest.approx(summary["student_top1"], abs=1e-3)


def test_tensorboard_missing_is_a_one_line_error_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(MissingDependencyError, match="pip install tensorboard"):
        logs.tensorboard_writer(str(tmp_path))
    status = command.main(["--out", str(tmp_path / "run"), "--tensorboard", *TINY])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err == "mlkd-train: --tensorboard needs the tensorboard package: pip install tensorboard"
    assert not (tmp_path / "run" / "teacher.pt").exists()


def test_no_matplotlib_means_a_message_and_no_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    summary = main(["--out", str(tmp_path), "--method", "ce", "--teacher-epochs", "0", *TINY[2:]])
    assert summary["student_top1"] is not None and not (tmp_path / "curves.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


# ---- --config -----------------------------------------------------------------------------------
def test_config_round_trip_repeats_the_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    first = main(["--out", str(a), "--method", "dkd", "--method-opt", "beta=2", "--seed", "3", "--lr", "0.05",
                  "--lr-steps", "1", "--no-nesterov", "--label-noise", "0.1", *TINY])
    second = main(["--config", str(a / "config.json"), "--out", str(b)])
    assert second["student_top1"] == first["student_top1"] and second["teacher_top1"] == first["teacher_top1"]
    for name in ("teacher.pt", "student.pt"):
        wa, wb = _weights(a / name), _weights(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert {k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k)} == {"out", "config"}
    # the command line overrides the file; the file never sets --out or --resume
    args = parse_args(["--config", str(a / "config.json"), "--epochs", "3", "--method-opt", "beta=4"])
    assert args.epochs == 3 and args.method_options == {"beta": 4} and args.lr == 0.05 and args.nesterov is False
    assert args.out == "runs/digits" and not args.resume


def test_yaml_config_with_flags_on_top_and_bad_keys(tmp_path, capsys):
    pytest.importorskip("yaml", reason="YAML configs need pyyaml")
    path = tmp_path / "kd.yaml"
    path.write_text("method: kd\nbatch-size: 32\nlr_steps: [2, 4]\nnesterov: false\nmethod_opt: [temperature=2]\n"
                    "compare_baseline: true\n")
    args = parse_args(["--config", str(path), "--batch-size", "8"])
    assert (args.method, args.batch_size, args.lr_steps, args.nesterov) == ("kd", 8, [2, 4], False)
    assert args.method_options == {"temperature": 2} and args.compare_baseline
    path.write_text("method: kd\nbatch_sise: 32\n")
    with pytest.raises(SystemExit) as exc:
        parse_args(["--config", str(path)])
    assert exc.value.code == 2 and "unknown setting 'batch_sise'" in capsys.readouterr().err
    path.write_text("lr: fast\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    assert f"--config {path}: argument --lr: invalid float value: 'fast'" in capsys.readouterr().err


def test_config_file_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "none.json")])
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "bad.json")])
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "x.yaml").write_text("epochs: 2\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "x.yaml")])
    assert "pip install pyyaml" in capsys.readouterr().err


# ---- --recipe -----------------------------------------------------------------------------------
def test_recipes_fill_what_was_not_given_and_explicit_flags_win(tmp_path):
    cifar = ["--data", f"cifar100:{tmp_path}", "--recipe", "cifar", "--teacher-epochs", "1"]
    args = parse_args(cifar)
    assert (args.batch_size, args.epochs, args.lr, args.lr_steps, args.weight_decay, args.nesterov) == \
        (64, 240, 0.05, [150, 180, 210], 5e-4, False)
    for small in ("MobileNetV2", "ShuffleV1", "ShuffleV2", "mobilenet_v2"):  # RepDistiller's lr for these students
        assert parse_args(cifar + ["--arch", small]).lr == 0.01
    assert parse_args(cifar + ["--arch", "resnet8x4"]).lr == 0.05
    args = parse_args(cifar + ["--epochs", "3", "--lr", "0.1", "--nesterov", "--lr-steps", "cosine", "--batch-size", "8",
                               "--weight-decay", "0"])
    assert (args.batch_size, args.epochs, args.lr, args.lr_steps, args.weight_decay, args.nesterov) == \
        (8, 3, 0.1, None, 0.0, True)
    args = parse_args(["--data", "synthetic", "--recipe", "imagenet"])
    assert (args.batch_size, args.epochs, args.lr, args.lr_steps, args.weight_decay, args.nesterov) == \
        (256, 100, 0.1, [30, 60, 90], 1e-4, False)
    assert parse_args(["--data", "synthetic", "--recipe", "imagenet", "--batch-size", "512"]).lr == 0.2  # x batch/256
    plain = parse_args([])
    assert (plain.batch_size, plain.epochs, plain.lr, plain.lr_steps, plain.nesterov) == (64, 40, 0.02, None, True)
    for wrong in (["--recipe", "cifar"], ["--data", f"cifar10:{tmp_path}", "--recipe", "imagenet"]):
        with pytest.raises(SystemExit):
            parse_args(wrong)


def test_cifar_recipe_builds_repdistillers_optimiser_and_replays_from_config(tmp_path):
    make_cifar_pickles(tmp_path / "data", "cifar10", train_per_class=4, test_per_class=1)
    out = tmp_path / "run"
    argv = ["--data", f"cifar10:{tmp_path / 'data'}", "--recipe", "cifar", "--arch", "cnn-tiny", "--teacher-arch",
            "cnn-tiny", "--teacher-epochs", "1", "--epochs", "1", "--batch-size", "16", "--quiet", "--no-curves"]
    main(argv + ["--out", str(out)])
    state = torch.load(out / "checkpoint.pt", weights_only=False)  # the student's final state
    group = state["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"], group["initial_lr"]) == (0.9, False, 5e-4, 0.05)
    assert sorted(state["scheduler"]["milestones"]) == [150, 180, 210]
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "cifar" and config["epochs"] == 1 and config["lr_steps"] == [150, 180, 210]
    replay = parse_args(["--config", str(out / "config.json")])
    assert (replay.epochs, replay.batch_size, replay.lr, replay.nesterov) == (1, 16, 0.05, False)
