"""The registry of distillation methods: one name per method, one ``build`` for all of them."""
from __future__ import annotations

import inspect
from typing import Callable, Optional, TypeVar

from .base import Distiller, ModelSpec

_REGISTRY: dict[str, type[Distiller]] = {}
D = TypeVar("D", bound=type[Distiller])


def register(name: str) -> Callable[[D], D]:
    """Class decorator: makes a :class:`Distiller` subclass available under ``name``."""

    def add(cls: D) -> D:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Distiller]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available())}") from None


def build(name: str, student_spec: ModelSpec, teacher_spec: Optional[ModelSpec], **overrides) -> Distiller:
    """The distiller ``name`` for a student and a teacher described by their specs; ``overrides``
    replace the method's defaults (weights, temperatures, stage names, ...). An unknown name or
    option is a ValueError listing what exists."""
    cls = method_class(name)
    params = inspect.signature(cls.__init__).parameters
    options = [p for p in params if p not in ("self", "student", "teacher")]
    unknown = sorted(set(overrides) - set(options))
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options are: {', '.join(o for o in options if o != 'kwargs')}")
    return cls(student_spec, teacher_spec, **overrides)
