"""The flags ``mlkd-train`` and ``mlkd-cache`` share, their checks, and the parser that reports a
bad flag as one line: the teacher-cache writer builds its command line from these without the
trainer's (:mod:`.cli` adds the training flags and resolves them into a :class:`~.config.TrainConfig`).
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any, Optional

from .. import __version__
from .data import NOISE_TYPES
from .models import check_arch
from .training_data import DATA_KINDS, DataKind, kind_named, kinds_reading, parse_data

__all__ = ["FlagParser", "arch_flag", "DEFAULTS", "config_note", "add_version_argument", "add_data_arguments",
           "add_teacher_arguments", "add_device_arguments", "data_settings", "check_data_args", "default_teacher_arch",
           "KIND_FLAG_DEFAULTS"]


def arch_flag(name: str) -> str:
    """argparse type of --arch / --teacher-arch: the name if a network of that name can be built."""
    try:
        return check_arch(name)
    except (ValueError, ImportError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# what a flag left out means without a recipe (weight decay: by data, below)
DEFAULTS: dict[str, Any] = dict(batch_size=64, epochs=40, lr=0.02, lr_steps=None, nesterov=True)


class FlagParser(argparse.ArgumentParser):
    """Reports a bad flag as one line on stderr, ``<prog>: <what is wrong>``, and exits with status 2
    (argparse's own usage block is for ``--help``); ``mlkd-train`` and ``mlkd-cache`` both parse with it."""

    context = ""  # set while the tokens of a --config file are parsed: "--config FILE: "
    # flag -> the --config file that set it (and the command line did not): errors naming them say so
    config_sources: dict[str, str] = {}

    def error(self, message: str):
        message = config_note(message, self.config_sources)
        self.exit(2, f"{self.prog}: {self.context}{message} ({self.prog} --help lists every flag)\n")


_Parser = FlagParser  # the older name (the teacher-cache writer's import)


_FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][A-Za-z0-9-]*")


def config_note(message: str, sources: dict[str, str]) -> str:
    """``message`` with a note naming the flags in it whose value came from a ``--config`` file (not
    from the command line), so that the error is not blamed on what the user typed, and how to
    override or drop them. ``sources``: flag (``--batch-size``) -> the file."""
    found = list(dict.fromkeys(_FLAG.findall(message)))
    if "--method" in found and "--method-opt" not in found:  # an option's error is reported under --method
        found.append("--method-opt")
    named = [flag for flag in found if flag in sources]
    if not named:
        return message
    files = sorted({sources[flag] for flag in named})
    flags = " and ".join(named)
    return (f"{message} [{flags} {'comes' if len(named) == 1 else 'come'} from --config {', '.join(files)}: give "
            f"{named[0]} on the command line to override it, or --unset {named[0][2:]} to drop the file's value]")


# the flags that only some kinds of data read (synthetic's --num-classes, --steps-per-epoch), with their
# defaults there (None elsewhere: given, an error)
KIND_FLAG_DEFAULTS = {name: default for kind in DATA_KINDS for name, default in kind.own_flags}


SYNTHETIC_DEFAULTS = dict(kind_named("synthetic").own_flags)  # the help's numbers


def add_version_argument(p: argparse.ArgumentParser) -> None:
    """``--version``: prints ``<prog> <mlkd_fast.__version__>`` and exits 0 (mlkd-train and mlkd-cache)."""
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help=f"print {p.prog}'s version and exit")


def add_data_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "data" group of flags, shared by ``mlkd-train`` and ``mlkd-cache`` (checked by
    :func:`check_data_args`): what the training set is and how its views are drawn."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits",
                   help="; ".join(f"'{kind.written}' ({kind.about})" for kind in DATA_KINDS)
                   + " (default: %(default)s)")
    g.add_argument("--image-size", type=int, default=224, help="crop size for folder/synthetic data (default: %(default)s)")
    g.add_argument("--num-classes", type=int, default=None,
                   help=f"classes of synthetic data (default: {SYNTHETIC_DEFAULTS['num_classes']}); an error with "
                        f"other data, whose classes are its own")
    g.add_argument("--steps-per-epoch", type=int, default=None,
                   help=f"steps of a synthetic epoch (default: {SYNTHETIC_DEFAULTS['steps_per_epoch']}); an error "
                        f"with other data, whose epoch is one pass over its training images")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loading processes per GPU for folder data (default: %(default)s)")
    g.add_argument("--decode", choices=("workers", "device"), default="workers",
                   help="folder data: decode + augment with PIL in the loader workers, or read bytes in the "
                        "workers and decode (nvJPEG on CUDA) + augment on the training device (default: %(default)s)")
    g.add_argument("--on-corrupt", choices=("skip", "fail"), default="skip",
                   help="an undecodable image: skip and count it, or fail naming the file (default: %(default)s)")
    g.add_argument("--rotations", type=int, choices=(1, 4), default=1,
                   help="views per image: 4 adds the 90/180/270 rotations (the authors' recipe: CE on the "
                        "plain views, rectangular correlation rotated x plain) (default: %(default)s)")
    g.add_argument("--label-noise", type=float, default=0.0,
                   help="fraction of training labels replaced by another class, fixed by --seed")
    g.add_argument("--noise-type", choices=NOISE_TYPES, default="symmetric",
                   help="symmetric: a noisy label is a uniformly drawn other class; asymmetric: class c becomes "
                        "class (c + 1) mod K, the same fraction in every class; mnist-pairs: the standard MNIST "
                        "class-pair noise, the fraction of classes 2, 3, 5, 6, 7 becoming 7, 8, 6, 5, 1 (2->7, "
                        "3->8, 5<->6, 7->1), the other classes clean (10-class data only) (default: %(default)s)")
    g.add_argument("--imbalance", type=float, default=1.0,
                   help="long-tailed training set: largest / smallest class size ratio, class k keeping "
                        "ratio^(-k/(K-1)) of the largest class's size (1 = off)")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of each class of the (corrupted) training data as a validation "
                        "split, evaluated with the test set (val_top1 and val_balanced_top1, the mean of the per-class "
                        "top-1, in metrics.jsonl and summary.json): for choosing "
                        "weights without the test set; fixed by --seed (default: 0, none)")
    g.add_argument("--train-per-class", type=int, default=None,
                   help="digits: this many training images per class, every other image in the test set "
                        "(default: a stratified 75/25 split); mnist5k: the first N of each class's 400 training "
                        "images (nested subsets), the test set staying its fixed 1,000 images")
    g.add_argument("--subset-seed", type=int, default=None, metavar="S",
                   help="mnist5k with --train-per-class N: draw the N images of each class at random from its 400, "
                        "seeded by S (the same S, the same images; for one S, N = 50 is part of N = 100), instead "
                        "of the first N (default: the first N). digits already draws its N with --seed")

    return g


def add_teacher_arguments(g: argparse._ArgumentGroup, weights_help: Optional[str] = None) -> None:
    """``--teacher-arch`` and ``--teacher-weights`` (mlkd-train and mlkd-cache)."""
    g.add_argument("--teacher-arch", type=arch_flag, default=None,
                   help="teacher, any --arch name (default: cnn-large on digits and mnist5k, resnet32x4 on CIFAR, "
                        "else resnet34)")
    g.add_argument("--teacher-weights", default=None,
                   help=weights_help or "teacher state dict (torchvision or mlkd-train .pt), used as it is; its "
                        "classifier must have the data's classes (else --teacher-new-head). Without it the teacher is "
                        "trained first (--teacher-epochs)")


def add_device_arguments(g: argparse._ArgumentGroup) -> None:
    """``--device``, ``--precision``, ``--channels-last``, ``--compile`` (mlkd-train and mlkd-cache)."""
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: %(default)s")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 autocast for student and teacher (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="NHWC activations (auto: on for CUDA image models)")
    g.add_argument("--compile", action="store_true", help="torch.compile the student and the teacher")


def data_settings(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The checks of the data flags (:func:`add_data_arguments`) and what they derive, as fields of
    the config: ``data_kind``, ``data_path``, ``digits``, ``synthetic`` and the values of the flags
    only some kinds read (synthetic's ``num_classes``, ``steps_per_epoch``: their defaults there).
    Errors through ``p.error`` (one line, exit status 2)."""
    kind, path = parse_data(args.data)
    if kind.spelling == "word:PATH" and not path:
        p.error(f"--data {args.data}: give the folder, --data {kind.name}:PATH")
    for name in ("image_size", "num_classes", "steps_per_epoch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    if not 0.0 <= args.val_fraction < 1.0:
        p.error("--val-fraction must be in [0, 1)")
    if getattr(args, "eval_every", 1) < 1:  # the training parser's (the cache's shares these checks)
        p.error(f"--eval-every must be >= 1, got {args.eval_every}")
    if not 0.0 <= args.label_noise < 1.0:
        p.error("--label-noise must be in [0, 1)")
    if not args.imbalance >= 1.0:
        p.error("--imbalance must be >= 1 (largest / smallest class)")
    derived: dict[str, Any] = dict(data_kind=kind.name, data_path=path,
                                   # recorded in config.json for older scripts; nothing here reads them
                                   digits=kind.name == "digits", synthetic=kind.name == "synthetic")
    derived.update(_kind_flags(p, args, kind))
    _check_samples_flags(p, args, kind)
    wrong = kind.check(path) if kind.check is not None else None
    if wrong:
        p.error(wrong)
    return derived


def _kind_flags(p: argparse.ArgumentParser, args: argparse.Namespace, kind: DataKind) -> dict[str, Any]:
    """The flags only some kinds of data read (synthetic's ``--num-classes``): their default where the
    kind reads them; given to another kind, an error, so that a flag is never silently ignored."""
    own = dict(kind.own_flags)
    values: dict[str, Any] = {}
    for name in KIND_FLAG_DEFAULTS:
        flag = "--" + name.replace("_", "-")
        if name in own and getattr(args, name) is None:
            values[name] = own[name]
        elif name not in own and getattr(args, name) is not None:
            p.error(f"{flag} applies to --data {' or '.join(kinds_reading(name))} only; with --data {args.data} "
                    + ("the classes are the data's own" if name == "num_classes"
                       else "an epoch is one pass over the training images") + f": leave {flag} out")
    return values


def _check_samples_flags(p: argparse.ArgumentParser, args: argparse.Namespace, kind: DataKind) -> None:
    """The flags that change which training samples there are (corruption, the held-out split, a
    subset per class): refused where the kind has no samples or no such subset."""
    if (args.label_noise > 0 or args.imbalance > 1) and not kind.has_samples:
        p.error("--label-noise and --imbalance apply to digits, mnist5k, CIFAR or folder data, not synthetic")
    if args.val_fraction > 0 and not kind.has_samples:
        p.error("--val-fraction holds out training samples: synthetic data has none")
    if args.train_per_class is not None:
        if kind.train_per_class is None:
            taking = " and ".join(k.name for k in DATA_KINDS if k.train_per_class is not None)
            p.error(f"--train-per-class applies to the {taking} data")
        largest, why = kind.train_per_class
        if not 1 <= args.train_per_class <= largest:
            p.error(f"--train-per-class must be in [1, {largest}] {why}")
    subset_seed = getattr(args, "subset_seed", None)
    if subset_seed is not None:
        drawing = " and ".join(k.name for k in DATA_KINDS if k.draws_subset)
        if not kind.draws_subset:
            p.error(f"--subset-seed applies to {drawing} data"
                    + (" (digits draws its --train-per-class images with --seed)" if kind.name == "digits" else ""))
        if args.train_per_class is None:
            p.error(f"--subset-seed draws the --train-per-class images of each class: give --train-per-class N "
                    f"(without it every training image of {kind.name} is used)")
        if subset_seed < 0:
            p.error(f"--subset-seed must be >= 0, got {subset_seed}")


def check_data_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """:func:`data_settings` set on ``args`` itself: ``mlkd-cache``'s way, whose writer still reads
    its namespace (``mlkd-train`` builds a :class:`~.config.TrainConfig` instead)."""
    for name, value in data_settings(p, args).items():
        setattr(args, name, value)


def default_teacher_arch(data_kind: str) -> str:
    """The teacher of a run that names none, by the name of its data kind: cnn-large on digits and mnist5k,
    resnet32x4 on CIFAR, else resnet34 (:attr:`~.training_data.DataKind.teacher_arch`)."""
    return kind_named(data_kind).teacher_arch
