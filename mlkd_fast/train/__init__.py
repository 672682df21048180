"""The distillation training loop (``python -m mlkd_fast.train`` / ``mlkd-train``).

- :mod:`.cli`: the command line, every flag checked.
- :mod:`.run`: one invocation: data, networks, phases, checkpoints and resume checks.
- :mod:`.loop`: training one network: the step, the epoch, evaluation, exact resume.
- :mod:`.training_data`: the data-kind table and the run's data as one object, built from it.
- :mod:`.data`: the data by concern (:mod:`.datasets`, :mod:`.corruption`, :mod:`.views`,
  :mod:`.folder`, :mod:`.sources`), every name importable from :mod:`.data` as before.
- :mod:`.config`: the typed, frozen settings of a run; :mod:`.placement`: device, precision, layout;
  :mod:`.teacher_source`: where a phase's teacher outputs come from.
- :mod:`.models`: networks that return ``(logits, pooled features)``.
- :mod:`.distributed`, :mod:`.checkpoint`: DDP plumbing and atomic checkpoints.
- :mod:`.cache` (``mlkd-cache``), :mod:`.replay` (``--teacher-cache``): the teacher cache.
- :mod:`.export`: :func:`export_student`, a trained network in its library's own layout.
The objective of a phase is a distiller of :mod:`mlkd_fast.methods`.
"""
from typing import Any

from .cli import parse_args  # noqa: E402
from .run import main  # noqa: E402

__all__ = ["main", "parse_args", "export_student"]


def __getattr__(name: str) -> Any:
    """``export_student``, imported when first asked for: importing :mod:`.export` with the package would
    make ``python -m mlkd_fast.train.export`` warn that the module was already imported (runpy)."""
    if name == "export_student":
        from .export import export_student

        globals()["export_student"] = export_student
        return export_student
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"export_student"})
