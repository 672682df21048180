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

The code lives by concern; this module names it all, as it always has (``from . import data as D``):

- :mod:`.datasets`: digits, CIFAR-10/100, mnist5k (loaders, classes, normalisation, padding);
- :mod:`.corruption`: label noise, class imbalance, the held-out validation split;
- :mod:`.views`: epoch order and per-sample augmentation keyed by ``(seed, epoch, index)``;
- :mod:`.folder`: the image-folder pipeline (scan, decode, augment, :class:`FolderSource`);
- :mod:`.sources`: :class:`Shard`, :class:`MemorySource`, :class:`SyntheticSource`, :class:`TensorSource`.
"""
from __future__ import annotations

from .datasets import (  # noqa: F401
    load_digits_split, CIFAR_KINDS, CIFAR_CLASSES, CIFAR_MEAN_STD, CIFAR_LAYOUT, CIFAR_PAD, DIGITS_PAD, MNIST5K_PAD,
    MNIST5K_SPLIT_SEED, MNIST5K_TEST_PER_CLASS, cifar_folder, load_cifar, load_mnist5k)
from .corruption import (  # noqa: F401
    NOISE_TYPES, MNIST_PAIRS, add_label_noise, validation_positions, imbalance_indices)
from .views import (  # noqa: F401
    IMAGENET_MEAN, IMAGENET_STD, shift_augment, with_rotations, epoch_order, sample_generator,
    random_resized_crop_params, keyed_crop_params, apply_crop_params, normalize_images, augment_params, crop_flip,
    normalize_with)
from .folder import (  # noqa: F401
    IMAGE_EXTENSIONS, scan_image_folder, ImageFiles, ImageBytes, collate_bytes, decode_on_device,
    keyed_crops_on_device, augment_on_device, collate_skipping, collate_keyed, ShardSampler, folder_transforms,
    KeyBatches, FolderSource)
from .sources import (  # noqa: F401
    Shard, TensorSource, SyntheticSource, MemorySource)
