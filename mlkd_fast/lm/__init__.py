"""Language-model distillation where its users train: Hugging Face ``transformers`` causal LMs with the
fused lm_head + divergence loss (issue #34; docs/lm.md "Hugging Face: the Trainer").

- :mod:`mlkd_fast.lm.hf`: :func:`load_causal_lm` / :func:`load_tokenizer` (local folders only),
  :func:`head_of`, :func:`shift_labels`, :func:`lm_distill_loss` (no logits computed), :func:`collate_lm`
  and :class:`DistillationTrainer` (a ``transformers.Trainer``; live or cached teachers).

Importing this package needs no transformers: it is imported when a function needs it, and its absence
is a :class:`MissingDependency` saying ``pip install "mlkd_fast[lm]"``.
"""
from .hf import (LMHead, MissingDependency, collate_lm, head_inputs, head_of, lm_distill_loss, load_causal_lm,
                 load_tokenizer, shift_labels)

__all__ = ["MissingDependency", "LMHead", "load_causal_lm", "load_tokenizer", "head_of", "head_inputs",
           "shift_labels", "lm_distill_loss", "collate_lm", "DistillationTrainer"]


def __getattr__(name: str):
    if name == "DistillationTrainer":  # a transformers.Trainer subclass: built on first access
        from . import hf  # noqa: PLC0415

        return hf.DistillationTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
