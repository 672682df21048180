"""The main job end to end: the digits distillation, its outputs and its argument checks."""
import json
import subprocess
import sys

import pytest
import torch

from mlkd_fast.train import main, parse_args
from mlkd_fast.train.data import load_digits_split, shift_augment


@pytest.mark.slow
def test_digits_distillation_beats_or_matches_ce_only(tmp_path):
    summary = main(["--out", str(tmp_path), "--teacher-epochs", "10", "--epochs", "15", "--compare-baseline", "--quiet"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["teacher_top1"] == summary["teacher_top1"] and on_disk["student_top1"] == summary["student_top1"]
    assert summary["teacher_top1"] > 95.0
    assert summary["student_top1"] >= summary["baseline_top1"], summary
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 10 + 15 + 15
    assert {"ce", "kd", "corr"} <= set(json.loads(lines[10]))
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 15


def test_cli_runs_as_a_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mlkd_fast.train", "--out", str(tmp_path), "--teacher-epochs", "1",
                          "--epochs", "1", "--loss", "kd"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "student (kd) top-1" in out.stdout
    assert set(json.loads((tmp_path / "summary.json").read_text())) >= {"teacher_top1", "student_top1"}


@pytest.mark.parametrize("loss", ["ce", "paper"])
def test_other_losses_train(tmp_path, loss):
    summary = main(["--out", str(tmp_path), "--teacher-epochs", "1", "--epochs", "1", "--loss", loss, "--quiet"])
    assert 0.0 <= summary["student_top1"] <= 100.0


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--lr", "-1"], ["--loss", "hinton"], ["--batch-size", "0"],
                                  ["--method-opt", "x"], ["--method", "at", "--global-correlation"]])
def test_bad_arguments_exit_with_a_message(argv):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


def test_digits_split_is_stratified_and_fixed():
    x, y, xt, yt = load_digits_split(seed=0)
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797
    assert set(yt.tolist()) == set(range(10))
    x2, _, _, _ = load_digits_split(seed=0)
    assert torch.equal(x, x2)


def test_shift_augment_translates_without_changing_mass_of_centered_images():
    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 3:5, 3:5] = 1.0
    out = shift_augment(img.repeat(16, 1, 1, 1), torch.Generator().manual_seed(0))
    assert out.shape == (16, 1, 8, 8)
    assert torch.allclose(out.sum(dim=(1, 2, 3)), torch.full((16,), 4.0))
