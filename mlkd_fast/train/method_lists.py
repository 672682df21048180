"""Lists of methods that the commands show, generated from the method registry's traits instead of
written by hand: the methods a teacher cache can serve (and those that need its features), and the
optional gather hooks under data parallelism (``--global-<hook>``) with the methods that have them.
A 17th method appears in them by registering itself; nothing here names one.

What a cache can serve is decided from a method's instance traits (``needs``), as
:func:`mlkd_fast.train.cache.checks.check_method` decides it for the method a run builds: here each
registered method (and preset) is built once with its defaults on a small probe network spec.
"""
from __future__ import annotations

import argparse
from functools import lru_cache
from typing import Optional

from .. import methods as M
from ..methods.base import Distiller, ModelSpec

__all__ = ["cache_refusal", "cache_served_methods", "cache_feature_methods", "gather_hooks", "gather_hook_dests",
           "add_gather_hook_arguments"]

# a network spec every method builds on: three stages of shrinking maps, pooled features, 10 classes
_PROBE = ModelSpec(num_classes=10, feature_dim=32, stages={"s1": (8, 8, 8), "s2": (16, 4, 4), "s3": (32, 2, 2)},
                   input_shape=(3, 8, 8))
_PROBE_FACTS = {"num_samples": 64}  # what a method's data_options may ask of the training data


def _names() -> list[str]:
    """Every registered method, then every preset (the order the CLI lists them in)."""
    return M.available() + list(M.presets())


@lru_cache(maxsize=None)
def _probe(name: str) -> Distiller:
    cls = M.method_class(name)
    facts = {option: _PROBE_FACTS[fact] for option, fact in cls.data_options.items() if fact in _PROBE_FACTS}
    return M.build(name, _PROBE, _PROBE, **facts)


def cache_refusal(name: str) -> Optional[str]:
    """Why a teacher cache cannot serve method ``name`` with its defaults, or None when it can (with
    ``--features`` where :func:`cache_feature_methods` lists it): no teacher to cache, stage maps,
    or a live teacher run on samples the method makes."""
    if not M.method_class(name).needs_teacher:
        return "trains without a teacher"
    needs = _probe(name).needs
    if needs.teacher_stages:
        return "reads the teacher's stage maps"
    if "teacher_fn" in needs.context:
        return "runs the teacher on samples it makes"
    return None


def cache_served_methods() -> list[str]:
    """The methods (and presets) a teacher cache serves: they read the teacher's logits and at most its
    pooled features."""
    return [name for name in _names() if cache_refusal(name) is None]


def cache_feature_methods() -> list[str]:
    """Of :func:`cache_served_methods`, those that need the cache's pooled features (``mlkd-cache --features``)."""
    return [name for name in cache_served_methods() if _probe(name).needs.feats]


def gather_hooks(optional_only: bool = True) -> dict[str, list[str]]:
    """Gather hook -> the methods (and presets) that have it; ``optional_only``: the hooks set on request
    (``--global-<hook>``), not those every multi-process run sets."""
    hooks: dict[str, list[str]] = {}
    for name in _names():
        for hook, always in M.method_class(name).gather_hooks.items():
            if not (optional_only and always):
                hooks.setdefault(hook, []).append(name)
    return dict(sorted(hooks.items()))


def gather_hook_dests() -> tuple[str, ...]:
    """The ``--global-<hook>`` flags' argparse destinations (``global_correlation``, ...)."""
    return tuple(f"global_{hook}" for hook in gather_hooks())


def add_gather_hook_arguments(group: argparse._ArgumentGroup) -> None:
    """One ``--global-<hook>`` flag per optional gather hook of the registry's methods."""
    for hook, names in gather_hooks().items():
        group.add_argument(f"--global-{hook.replace('_', '-')}", action="store_true",
                           help=f"under DDP, the {hook} term ({', '.join(names)}) spans the global batch: each "
                                f"process's part against all processes' (all-gathered with gradient)")
