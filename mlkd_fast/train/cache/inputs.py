"""What a teacher cache is made of and checked against: the training data (:class:`CacheData`) and,
for the writer, the device and teacher (:class:`WriterSetup`).

These are plain values: the writer receives them from :mod:`._trainer_glue` (its one way into the
trainer) and the reader builds :class:`CacheData` from the run that opens a cache; neither imports the
trainer: both read the trainer's :class:`~.training_data.TrainingData` by its attributes.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .. import data as D
from .format import tensor_bytes

#: the flags that change which samples and labels the training set holds (recorded in the manifest; a
#: manifest written before one of them was recorded reads as None there, its default)
CORRUPTION_SETTINGS = ("label_noise", "noise_type", "imbalance", "train_per_class", "subset_seed", "val_fraction")


@dataclass(frozen=True)
class CacheData:
    """The training set a cache is of: its kind and root as the manifest names them, the source that
    draws its views (``views``, ``augmentation``; a :class:`~.data.MemorySource` or
    :class:`~.data.FolderSource`), its size, classes and input shape, the settings that corrupted it,
    and the evaluation batches (the teacher's accuracy goes into a new manifest)."""

    kind: str
    root: Optional[str]
    source: Any
    num_samples: int
    num_classes: int
    input_shape: tuple[int, ...]
    corruption: Mapping[str, Any]
    eval_batches: Optional[Callable[[], Any]] = None

    @classmethod
    def of(cls, training: Any, settings: Any) -> "CacheData":
        """The cache's view of the trainer's training data (a :class:`~.training_data.TrainingData`:
        ``kind.name``, ``root``, ``train``, ``train_size``, ``num_classes``, ``input_shape``,
        ``eval_batches``) and of the settings that corrupted it (the parsed flags, read by name)."""
        return cls(training.kind.name, training.root, training.train, training.train_size, training.num_classes,
                   tuple(training.input_shape),
                   {k: getattr(settings, k, 0.0 if k == "val_fraction" else None) for k in CORRUPTION_SETTINGS},
                   training.eval_batches)

    @classmethod
    def of_run(cls, run: Any) -> "CacheData":
        """The training data of ``mlkd-train``'s run object (its ``data`` and ``args``; nothing of the
        trainer is imported)."""
        return cls.of(run.data, run.args)

    def augmentation(self) -> dict[str, Any]:
        """What draws the training views (the source's own description)."""
        return self.source.augmentation()

    def identity(self) -> dict[str, Any]:
        """The manifest's ``data`` entry: kind, root, a hash of the training tensors (in-memory sets:
        images and labels after --imbalance / --label-noise) or of the file list (folders: paths relative
        to train/ and labels), size, classes, input shape and the settings that made it."""
        h = hashlib.sha256()
        source = self.source
        if isinstance(source, D.MemorySource):
            h.update(str(tuple(source.x.shape)).encode() + str(source.x.dtype).encode())
            h.update(tensor_bytes(source.x))
            h.update(tensor_bytes(source.y.to(torch.int64)))
            hashed = "training tensors (images and labels)"
        else:
            train_root = os.path.join(self.root or "", "train")
            for path, label in source.samples:
                h.update(f"{os.path.relpath(path, train_root)}\t{label}\n".encode())
            hashed = "file list (paths relative to train/, labels)"
        c = self.corruption
        return {"kind": self.kind, "root": self.root, "sha256": h.hexdigest(), "hashed": hashed,
                "num_samples": self.num_samples, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "label_noise": c["label_noise"],
                "noise_type": c["noise_type"] if c["label_noise"] > 0 else None, "imbalance": c["imbalance"],
                "train_per_class": c["train_per_class"], "subset_seed": c["subset_seed"],
                "val_fraction": c["val_fraction"]}


@dataclass
class WriterSetup:
    """Where and how the writer runs the teacher: the device, the process group (``rank``, ``world``,
    ``main``, ``enabled``), the autocast dtype (None: fp32), the teacher loader (architecture and
    weights from the flags, frozen on the device) and the accuracy of a teacher on the evaluation
    batches (``(top1, top5)`` in %, top5 NaN with 5 classes or fewer)."""

    data: CacheData
    device: torch.device
    dist: Any
    amp_dtype: Optional[torch.dtype]
    load_teacher: Callable[[str], nn.Module]
    teacher_accuracy: Optional[Callable[[nn.Module], tuple[float, float]]]  # None: no evaluation data
