"""Data for the training loop: the embedded digits default, an ImageNet-style folder, synthetic
ImageNet-shaped batches, and the label-noise / class-imbalance options of the robustness study.

Every source yields ``(images, labels)`` already on the training device, images as float in the
layout the model wants, and knows how many steps one epoch has on each process. Epoch order is a
function of ``(seed, epoch)`` only, so that ``--resume`` continues an epoch exactly and every DDP
rank agrees on it; each rank takes its own slice of every global batch.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from .errors import CorruptImageError, InputError, MissingDependencyError, MissingInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


# --------------------------------------------------------------------------------------------
# Digits (scikit-learn, no network) and the robustness-study options
# --------------------------------------------------------------------------------------------
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


NOISE_TYPES = ("symmetric", "asymmetric")


def add_label_noise(labels: Tensor, fraction: float, num_classes: int, seed: int,
                    kind: str = "symmetric") -> tuple[Tensor, Tensor]:
    """Label noise fixed by ``seed``. Returns ``(noisy_labels, flipped_mask)``.

    - ``symmetric``: exactly ``round(fraction * n)`` labels, drawn from the whole set, are replaced by a
      uniformly drawn *different* class;
    - ``asymmetric``: in each class, exactly ``round(fraction * n_c)`` labels are replaced by one fixed
      other class, ``(c + 1) mod K`` (a systematic confusion, the harder kind: the wrong class is
      learnable)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"label noise must be in [0, 1), got {fraction}")
    if kind not in NOISE_TYPES:
        raise ValueError(f"noise type must be one of {NOISE_TYPES}, got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    n = labels.numel()
    flipped = torch.zeros(n, dtype=torch.bool)
    if kind == "symmetric":
        flipped[torch.randperm(n, generator=gen)[: int(round(fraction * n))]] = True
        shift = torch.randint(1, num_classes, (n,), generator=gen)  # never 0: the class always changes
    else:
        for c in labels.unique().tolist():
            idx = (labels == c).nonzero().squeeze(1)
            flipped[idx[torch.randperm(len(idx), generator=gen)[: int(round(fraction * len(idx)))]]] = True
        shift = torch.ones(n, dtype=torch.long)
    noisy = torch.where(flipped, (labels + shift) % num_classes, labels)
    return noisy, flipped


def imbalance_indices(labels: Tensor, ratio: float, seed: int) -> Tensor:
    """Long-tailed subsampling: class ``k`` (of K, in label order) keeps
    ``n_max * ratio ** (-k / (K - 1))`` of its samples (at least 1), so the largest class holds
    ``ratio`` times the smallest. Returns the kept indices, sorted."""
    if not ratio >= 1.0:
        raise ValueError(f"imbalance ratio must be >= 1, got {ratio}")
    classes = labels.unique(sorted=True)
    gen = torch.Generator().manual_seed(seed)
    n_max = max(int((labels == c).sum()) for c in classes)
    keep = []
    for k, c in enumerate(classes.tolist()):
        idx = (labels == c).nonzero().squeeze(1)
        quota = n_max * ratio ** (-k / max(len(classes) - 1, 1))
        count = min(len(idx), max(1, int(round(quota))))
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:count]])
    return torch.cat(keep).sort().values


def shift_augment(x: Tensor, gen: torch.Generator, max_shift: int = 1) -> Tensor:
    """Random translation by up to ``max_shift`` pixels (zero padded), one shift per image."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    h, w = x.shape[-2:]
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :].expand(n, h, w)
    batch = torch.arange(n)[:, None, None].expand(n, h, w)
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)


def with_rotations(x: Tensor, views: int) -> Tensor:
    """View-major batch ``[x; rot90(x); rot180(x); rot270(x)]`` (first ``views`` of them)."""
    if views == 1:
        return x
    return torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(views)])


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The sample order of one epoch: a function of (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
@dataclass
class Shard:
    """This process's place in the run: global batch = batch_size * world."""

    batch_size: int
    rank: int = 0
    world: int = 1

    def steps(self, n: int) -> int:
        """Full global batches per epoch (the partial last one is dropped so that ranks agree)."""
        return n // (self.batch_size * self.world)

    def indices(self, order: Tensor, step: int) -> Tensor:
        start = (step * self.world + self.rank) * self.batch_size
        return order[start:start + self.batch_size]


@dataclass
class TensorSource:
    """In-memory images (digits): shuffled per epoch, shifted by ``augment`` with a per-(epoch, rank)
    generator whose draws are replayed when an epoch is resumed in the middle."""

    x: Tensor
    y: Tensor
    shard: Shard
    seed: int
    device: torch.device
    augment: Optional[Callable[[Tensor, torch.Generator], Tensor]] = shift_augment
    corrupt: int = 0

    def steps_per_epoch(self) -> int:
        return self.shard.steps(len(self.x))

    def epoch(self, epoch: int, start_step: int = 0, with_index: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """``(images, labels)`` batches of this rank, from ``start_step``; with ``with_index`` also the
        samples' indices in the training set (methods with a per-sample memory, e.g. CRD)."""
        order = epoch_order(len(self.x), self.seed, epoch)
        gen = torch.Generator().manual_seed(self.seed * 7919 + epoch * 131 + self.shard.rank)
        for step in range(self.steps_per_epoch()):
            idx = self.shard.indices(order, step)
            xb = self.x[idx]
            if self.augment is not None:
                xb = self.augment(xb, gen)  # drawn even for skipped steps: the stream stays aligned
            if step < start_step:
                continue
            batch = (xb.to(self.device, non_blocking=True), self.y[idx].to(self.device, non_blocking=True))
            yield (*batch, idx.to(self.device, non_blocking=True)) if with_index else batch


@dataclass
class SyntheticSource:
    """ImageNet-shaped random batches generated once on the device (throughput runs)."""

    shard: Shard
    device: torch.device
    image_size: int = 224
    num_classes: int = 1000
    steps: int = 100
    pool: int = 4
    channels_last: bool = False
    corrupt: int = 0
    _batches: list = field(default_factory=list, repr=False)

    def steps_per_epoch(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        if not self._batches:
            gen = torch.Generator(device=self.device).manual_seed(1234 + self.shard.rank)
            for _ in range(self.pool):
                x = torch.randint(0, 256, (self.shard.batch_size, 3, self.image_size, self.image_size),
                                  generator=gen, device=self.device, dtype=torch.uint8)
                y = torch.randint(0, self.num_classes, (self.shard.batch_size,), generator=gen, device=self.device)
                self._batches.append((x, y))
        for step in range(start_step, self.steps):
            x, y = self._batches[step % self.pool]
            yield normalize_images(x, self.channels_last), y


def normalize_images(x: Tensor, channels_last: bool) -> Tensor:
    """uint8 (n, 3, h, w) -> float normalised with the ImageNet statistics, on x's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    out = (x.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


# --------------------------------------------------------------------------------------------
# ImageNet-style folders: root/train/<class>/*.jpg, root/val/<class>/*.jpg
# --------------------------------------------------------------------------------------------
def scan_image_folder(split_dir: str, classes: Optional[Sequence[str]] = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and ``(path, label)`` samples of one split, with clear errors for a missing
    folder, no class folders, or an empty class folder."""
    if not os.path.isdir(split_dir):
        raise MissingInputError(f"data folder {split_dir!r} does not exist (expected <data>/train and <data>/val "
                                "with one sub-folder per class)")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not found:
        raise InputError(f"{split_dir!r} holds no class folders")
    classes = list(classes) if classes is not None else found
    missing = sorted(set(found) - set(classes))
    if missing:
        raise InputError(f"{split_dir!r} has class folders not in the training split: {missing[:5]}")
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        files = sorted(os.path.join(root, f) for root, _, fs in os.walk(folder) for f in fs
                       if f.endswith(IMAGE_EXTENSIONS)) if os.path.isdir(folder) else []
        if not files and name in found:
            raise InputError(f"class folder {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS[:5])}...)")
        samples += [(f, label) for f in files]
    return classes, samples


class ImageFiles(torch.utils.data.Dataset):
    """Decoded, augmented uint8 images of a folder split (PIL on the CPU workers).

    Items are ``(image, label, index)``. A file that fails to decode gives ``None`` (counted and
    dropped by :func:`collate_skipping`) or, with ``on_corrupt="fail"``, an error that names it.
    """

    def __init__(self, samples: list[tuple[str, int]], transform, on_corrupt: str = "skip") -> None:
        self.samples, self.transform, self.on_corrupt = samples, transform, on_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as exc:  # PIL raises several types for damaged files
            if self.on_corrupt == "fail":
                raise CorruptImageError(f"cannot decode image {path!r}: {exc}") from exc
            return None
        return self.transform(img), label, i


class ImageBytes(torch.utils.data.Dataset):
    """Raw file bytes of a folder split, for decoding on the training device (``--decode device``):
    the workers only read files, so few CPU cores can feed a GPU (nvJPEG decodes the JPEGs)."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision.io import read_file

        path, label = self.samples[i]
        return read_file(path), label, path, i


def collate_bytes(batch):
    """``(file bytes, labels, paths, indices)`` of a batch."""
    return ([b[0] for b in batch], torch.tensor([b[1] for b in batch]), [b[2] for b in batch],
            torch.tensor([b[3] for b in batch]))


def _is_jpeg(data: Tensor) -> bool:
    return data.numel() > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8  # the JPEG SOI marker


def _decode_one(data: Tensor, device: torch.device) -> Tensor:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    if device.type == "cuda" and _is_jpeg(data):
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return decode_image(data, mode=ImageReadMode.RGB).to(device, non_blocking=True)


def decode_on_device(datas: list[Tensor], paths: list[str], device: torch.device,
                     on_corrupt: str = "skip") -> list[Optional[Tensor]]:
    """Decodes file bytes to (3, h, w) uint8 images on ``device`` (JPEGs batched through nvJPEG on
    CUDA); an undecodable file gives ``None``, or with ``on_corrupt="fail"`` an error naming it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda" and all(_is_jpeg(d) for d in datas):
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass  # one bad file fails the batch: find it below, one by one
    images: list[Optional[Tensor]] = []
    for data, path in zip(datas, paths):
        try:
            images.append(_decode_one(data, device))
        except RuntimeError as exc:
            if on_corrupt == "fail":
                raise CorruptImageError(f"cannot decode image {path!r}: {exc}") from exc
            images.append(None)
    return images


def augment_on_device(images: list[Tensor], train: bool, size: int) -> Tensor:
    """RandomResizedCrop + horizontal flip (train) or resize + centre crop (eval), image by image on
    the images' device; returns a (n, 3, size, size) uint8 batch."""
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as TF

    out = []
    for img in images:
        if train:
            top, left, h, w = RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
            if bool(torch.rand(()) < 0.5):
                img = img.flip(-1)
        else:
            img = TF.center_crop(TF.resize(img, [int(math.ceil(size * 256 / 224))], antialias=True), [size, size])
        out.append(img)
    return torch.stack(out)


def collate_skipping(batch):
    """Stacks the decodable samples of a batch; returns ``(images, labels, n_corrupt, indices)``."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, None, len(batch), None
    return (torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good]), len(batch) - len(good),
            torch.tensor([b[2] for b in good]))


class ShardSampler(torch.utils.data.Sampler):
    """This rank's indices of one epoch in global-batch order, from ``start_step`` on."""

    def __init__(self, n: int, shard: Shard, seed: int) -> None:
        self.n, self.shard, self.seed = n, shard, seed
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch)
        for step in range(self.start_step, self.shard.steps(self.n)):
            yield from self.shard.indices(order, step).tolist()

    def __len__(self) -> int:
        return (self.shard.steps(self.n) - self.start_step) * self.shard.batch_size


def folder_transforms(train: bool, image_size: int):
    from torchvision.transforms import v2

    if train:
        return v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(image_size, antialias=True),
                           v2.RandomHorizontalFlip()])
    return v2.Compose([v2.PILToTensor(), v2.Resize(int(math.ceil(image_size * 256 / 224)), antialias=True),
                       v2.CenterCrop(image_size)])


@dataclass
class FolderSource:
    """An ImageNet-style split read by DataLoader workers (decode + crop on the CPU), normalised on
    the device. ``corrupt`` counts the undecodable files skipped so far."""

    samples: list[tuple[str, int]]
    shard: Shard
    seed: int
    device: torch.device
    train: bool
    image_size: int = 224
    workers: int = 4
    channels_last: bool = False
    on_corrupt: str = "skip"
    decode: str = "workers"   # "workers": PIL in the loader processes; "device": bytes decoded on the device
    corrupt: int = 0

    def __post_init__(self) -> None:
        if self.decode == "device":
            self.dataset = ImageBytes(self.samples)
        else:
            self.dataset = ImageFiles(self.samples, folder_transforms(self.train, self.image_size), self.on_corrupt)
        self.sampler = ShardSampler(len(self.samples), self.shard, self.seed) if self.train else None
        self._loader = None

    def steps_per_epoch(self) -> int:
        if self.train:
            return self.shard.steps(len(self.samples))
        return math.ceil(len(self.samples) / self.shard.batch_size)

    def _make_loader(self):
        collate = collate_bytes if self.decode == "device" else collate_skipping
        kwargs = dict(batch_size=self.shard.batch_size, num_workers=self.workers, collate_fn=collate,
                      pin_memory=self.device.type == "cuda" and self.decode != "device")
        if self.workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=4)
        if self.train:
            return torch.utils.data.DataLoader(self.dataset, sampler=self.sampler, drop_last=True, **kwargs)
        # evaluation: this rank's contiguous share of the split, no padding (metrics are summed)
        per_rank = math.ceil(len(self.dataset) / self.shard.world)
        subset = torch.utils.data.Subset(self.dataset, range(self.shard.rank * per_rank,
                                                             min(len(self.dataset), (self.shard.rank + 1) * per_rank)))
        return torch.utils.data.DataLoader(subset, shuffle=False, **kwargs)

    def epoch(self, epoch: int, start_step: int = 0, with_index: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """``(images, labels)`` batches on the device; with ``with_index`` also the samples' indices in
        the split (methods with a per-sample memory, e.g. CRD). Undecodable files are left out."""
        if self.train:
            self.sampler.set_epoch(epoch, start_step)
            if start_step:  # persistent workers hold the old sampler position: start afresh
                self._loader = None
        if self._loader is None:
            self._loader = self._make_loader()
        for batch in self._loader:
            if self.decode == "device":
                datas, labels, paths, index = batch
                decoded = decode_on_device(datas, paths, self.device, self.on_corrupt)
                good = [i for i, img in enumerate(decoded) if img is not None]
                self.corrupt += len(decoded) - len(good)
                if not good:
                    continue
                images = augment_on_device([decoded[i] for i in good], self.train, self.image_size)
                x, labels, index = normalize_images(images, self.channels_last), labels[good], index[good]
            else:
                images, labels, corrupt, index = batch
                self.corrupt += corrupt
                if images is None:
                    continue
                x = normalize_images(images.to(self.device, non_blocking=True), self.channels_last)
            y = labels.to(self.device, non_blocking=True)
            yield (x, y, index.to(self.device, non_blocking=True)) if with_index else (x, y)
