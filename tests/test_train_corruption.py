"""The training-data options of the robustness study: label noise (symmetric, asymmetric), long-tailed
imbalance, small digits training sets, on digits and on folder data; runs without a teacher."""
import json
import re

import pytest
import torch

from mlkd_fast.train import data as D
from mlkd_fast.train import main
from mlkd_fast.train.cli import parse_args

from helpers import make_image_folder


def test_asymmetric_noise_flips_the_same_fraction_of_every_class_to_the_next_class():
    y = torch.arange(10).repeat_interleave(torch.arange(20, 30))  # classes of 20..29 samples
    noisy, flipped = D.add_label_noise(y, 0.4, 10, seed=3, kind="asymmetric")
    for c in range(10):
        in_class = y == c
        assert int(flipped[in_class].sum()) == round(0.4 * int(in_class.sum()))
    assert torch.equal(noisy[flipped], (y[flipped] + 1) % 10)
    assert torch.equal(noisy[~flipped], y[~flipped])
    again, _ = D.add_label_noise(y, 0.4, 10, seed=3, kind="asymmetric")
    other, _ = D.add_label_noise(y, 0.4, 10, seed=4, kind="asymmetric")
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)


def test_label_noise_refuses_an_unknown_kind_and_a_bad_fraction():
    y = torch.arange(10)
    with pytest.raises(ValueError, match="noise type must be one of"):
        D.add_label_noise(y, 0.2, 10, seed=0, kind="pairwise")
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        D.add_label_noise(y, 1.0, 10, seed=0)


def test_digits_with_a_few_training_images_per_class_holds_out_all_others():
    x, y, xt, yt = D.load_digits_split(seed=1, train_per_class=20)
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 20))
    assert len(y) + len(yt) == 1797 and len(yt) == 1597
    # no test image is also a training image
    train_rows = {tuple(r.tolist()) for r in x.flatten(1)}
    assert sum(tuple(r.tolist()) in train_rows for r in xt.flatten(1)) < 10  # digits holds a few duplicates
    x2, y2, _, _ = D.load_digits_split(seed=1, train_per_class=20)
    x3, _, _, _ = D.load_digits_split(seed=2, train_per_class=20)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    with pytest.raises(ValueError, match="train_per_class must be in"):
        D.load_digits_split(train_per_class=175)


@pytest.mark.parametrize("argv, message", [
    (["--data", "synthetic", "--label-noise", "0.2"], "apply to digits, mnist5k, CIFAR or folder data, not synthetic"),
    (["--data", "synthetic", "--train-per-class", "10"], "--train-per-class applies to the digits and mnist5k data"),
    (["--train-per-class", "0"], r"--train-per-class must be in \[1, 150\]"),
    (["--teacher-epochs", "0", "--method", "kd"], "--teacher-epochs 0 trains no teacher, but --method kd distils"),
    (["--teacher-epochs", "-1"], "--teacher-epochs must be >= 0"),
    (["--noise-type", "pairwise"], "invalid choice"),
])
def test_cli_refuses_inconsistent_data_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_ce_without_a_teacher_trains_only_the_student(tmp_path):
    summary = main(["--method", "ce", "--teacher-epochs", "0", "--epochs", "1", "--train-per-class", "10",
                    "--batch-size", "16", "--label-noise", "0.4", "--noise-type", "asymmetric", "--out", str(tmp_path),
                    "--quiet"])
    assert "teacher_top1" not in summary and not (tmp_path / "teacher.pt").exists()
    assert summary["train_samples"] == 100 and summary["test_samples"] == 1697
    assert summary["noisy_labels"] == 40  # 4 of each class's 10
    assert json.loads((tmp_path / "config.json").read_text())["noise_type"] == "asymmetric"


def test_resume_refuses_another_noise_type(tmp_path):
    run = ["--method", "ce", "--teacher-epochs", "0", "--epochs", "2", "--train-per-class", "10",
           "--batch-size", "16", "--label-noise", "0.4", "--out", str(tmp_path), "--quiet"]
    main([*run, "--max-steps", "3"])
    with pytest.raises(ValueError, match="--noise-type is 'symmetric' in the checkpoint but 'asymmetric'"):
        main([*run, "--resume", "--noise-type", "asymmetric"])


def test_folder_data_takes_label_noise_and_imbalance(tmp_path):
    make_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=8)
    summary = main(["--data", str(tmp_path / "data"), "--method", "ce", "--arch", "resnet18", "--image-size", "16",
                    "--batch-size", "4", "--epochs", "1", "--workers", "0", "--imbalance", "4",
                    "--label-noise", "0.5", "--out", str(tmp_path / "out"), "--quiet"])
    # classes keep 8, 8 * 4^-0.5 = 4 and 2 images; half of the 14 labels are flipped; val stays whole
    assert summary["train_samples"] == 14 and summary["noisy_labels"] == 7 and summary["val_samples"] == 24


def test_a_validation_split_is_held_out_of_the_noisy_training_data(tmp_path):
    """--val-fraction: a fraction of each observed class leaves the training set, fixed by the seed,
    noisy where the training data is, evaluated every epoch (val_top1)."""
    from mlkd_fast.train import data as D

    labels = torch.arange(10).repeat(20)
    held = D.validation_positions(labels, 0.2, seed=3)
    assert len(held) == 40 and torch.equal(torch.bincount(labels[held]), torch.full((10,), 4))
    assert torch.equal(held, D.validation_positions(labels, 0.2, seed=3))
    assert not torch.equal(held, D.validation_positions(labels, 0.2, seed=4))
    summary = main(["--out", str(tmp_path), "--train-per-class", "20", "--val-fraction", "0.2", "--label-noise", "0.4",
                    "--teacher-epochs", "0", "--method", "ce", "--epochs", "2", "--batch-size", "16", "--quiet"])
    # a fifth of each observed (noisy) class, rounded per class
    assert summary["train_samples"] + summary["val_samples_held_out"] == 200
    assert 36 <= summary["val_samples_held_out"] <= 44
    assert 0.0 <= summary["val_top1"] <= 100.0
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all("val_top1" in r for r in records)


def test_eval_every_evaluates_every_n_epochs_and_after_the_last(tmp_path):
    """--eval-every 2 over 5 epochs: test and validation top-1 after epochs 2, 4 and 5 only; the summary's
    top-1 is the last epoch's, the same as a run evaluating every epoch (evaluation changes no weights)."""
    common = ["--train-per-class", "20", "--val-fraction", "0.2", "--teacher-epochs", "0", "--method", "ce",
              "--epochs", "5", "--batch-size", "16", "--quiet", "--no-curves"]
    sparse = main(common + ["--eval-every", "2", "--out", str(tmp_path / "sparse")])
    every = main(common + ["--out", str(tmp_path / "every")])
    records = [json.loads(line) for line in open(tmp_path / "sparse" / "metrics.jsonl")]
    assert [r["epoch"] for r in records if r["top1"] is not None] == [2, 4, 5]
    assert [r["epoch"] for r in records if "val_top1" in r] == [2, 4, 5]
    assert sparse["student_top1"] == every["student_top1"] and sparse["val_top1"] == every["val_top1"]
    assert sparse["best_epoch"] in (2, 4, 5)
    with pytest.raises(SystemExit):
        parse_args(["--eval-every", "0"])
