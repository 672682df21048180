"""The registry of distillation methods: one name per method, one ``build`` for all of them, and
named presets (``paper``: MLKD with its authors' recipe)."""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional, TypeVar

from .base import Distiller, ModelSpec

_REGISTRY: dict[str, type[Distiller]] = {}
_PRESETS: dict[str, tuple[str, dict[str, Any], str]] = {}  # name -> (method, options, what it is)
D = TypeVar("D", bound=type[Distiller])


def register(name: str) -> Callable[[D], D]:
    """Class decorator: makes a :class:`Distiller` subclass available under ``name``."""

    def add(cls: D) -> D:
        if name in _REGISTRY or name in _PRESETS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def register_preset(name: str, method: str, description: str, **options: Any) -> None:
    """``name`` builds ``method`` with ``options`` as its defaults (the user's options override them)."""
    if name in _REGISTRY or name in _PRESETS:
        raise ValueError(f"method {name!r} is registered twice")
    _PRESETS[name] = (method, dict(options), description)


def available() -> list[str]:
    """The registered method names, sorted (presets not included: see :func:`presets`)."""
    return sorted(_REGISTRY)


def presets() -> dict[str, str]:
    """Preset name -> what it builds."""
    return {name: description for name, (_, _, description) in sorted(_PRESETS.items())}


def baseline() -> str:
    """The name of the plain-training method every distiller is compared with."""
    return next(n for n in available() if _REGISTRY[n].is_baseline)


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """A method or preset name -> (registered method, the preset's options)."""
    if name in _PRESETS:
        method, options, _ = _PRESETS[name]
        return method, dict(options)
    method_class(name)
    return name, {}


def method_class(name: str) -> type[Distiller]:
    """The class of a method (a preset gives its method's class)."""
    if name in _PRESETS:
        name = _PRESETS[name][0]
    try:
        return _REGISTRY[name]
    except KeyError:
        names = available() + sorted(_PRESETS)
        raise ValueError(f"unknown method {name!r}; available: {', '.join(names)}") from None


def build(name: str, student_spec: ModelSpec, teacher_spec: Optional[ModelSpec], **overrides: Any) -> Distiller:
    """The distiller ``name`` (a method or a preset) for a student and a teacher described by their
    specs; ``overrides`` replace the method's defaults (weights, temperatures, stage names, ...). An
    unknown name or option is a ValueError listing what exists."""
    method, options = resolve(name)
    cls = _REGISTRY[method]
    options.update(overrides)
    known = cls.options()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    unknown = sorted(set(options) - set(known))
    if unknown and not takes_any:
        raise ValueError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options are: {', '.join(known)}")
    check_option_values(name, options)
    return cls(student_spec, teacher_spec if cls.needs_teacher else None, **options)


def _is_temperature(option: str) -> bool:
    """The zoo's names of softmax temperatures: ``temperature``, ``tau`` and ``<x>_temperature`` / ``<x>_tau``."""
    return option in ("temperature", "tau") or option.endswith(("_temperature", "_tau"))


def check_option_values(name: str, options: dict[str, Any]) -> None:
    """What every method's options must be, checked when it is built (not at its first step): a
    number is finite, a temperature (:func:`_is_temperature`) is also > 0. A ValueError names the
    method, the option and the value."""
    for option, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or (_is_temperature(option) and value <= 0):
            need = "a finite number > 0" if _is_temperature(option) else "a finite number"
            raise ValueError(f"option {option!r} of method {name!r} must be {need}, got {value!r}")
