"""Hugging Face ``transformers`` causal LMs with the fused lm_head + divergence loss (issue #34, docs/lm.md
"Hugging Face: the Trainer").

The student (and a live teacher) run their own ``forward``; a forward pre-hook on the output embeddings
(``lm_head``) takes the hidden states the head is about to multiply and hands the head an empty slice
of them instead, so the model computes no logits (a ``(batch, 0, V)`` tensor) and
:func:`mlkd_fast.linear_kd.linear_kd_loss` gets exactly what the head would have seen. Running the
model's own forward (rather than its base model alone) matters twice: under DDP the wrapper's forward
must run for its gradient hooks to reduce anything, and a model that transforms the hidden states
between its base and its head (MiniCPM's width scaling, say) is handled without knowing it. The
head's other logit options (Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
``logits_scaling``) are read from the config by :func:`head_of`.

transformers is imported inside the functions: this module imports without it, and every entry point
that needs it says ``pip install "mlkd_fast[lm]"`` when it is missing. Models load from local folders
only (:func:`load_causal_lm`): a hub id is refused before anything touches the network.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..linear_kd import LinearKDLoss, linear_kd_loss

__all__ = ["MissingDependency", "LMHead", "load_causal_lm", "load_tokenizer", "head_of", "shift_labels",
           "lm_distill_loss", "collate_lm", "DistillationTrainer", "NOT_MODEL_INPUTS"]

INSTALL = 'pip install "mlkd_fast[lm]"'
# batch keys that are the loss's, never passed to the model's forward
NOT_MODEL_INPUTS = ("labels", "shift_labels", "teacher_topk")


class MissingDependency(ImportError):
    """transformers (or accelerate, for the Trainer) is not installed: the message says what to install."""


def _transformers():
    try:
        import transformers  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise MissingDependency(f"mlkd_fast.lm needs transformers: {INSTALL}") from exc
    return transformers


# ---------------------------------------------------------------------------------------------
# loading, local folders only
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _offline():
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set for the call (restored after)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _local_folder(path: Any, what: str, kwargs: dict) -> str:
    if kwargs.get("local_files_only", True) is not True:
        raise ValueError(f"{what}: local_files_only must stay True (models load from local folders only)")
    kwargs.pop("local_files_only", None)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: path must be a folder path (str or os.PathLike), got {type(path).__name__}")
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ValueError(f"{what}: {folder!r} is not a local folder; models load from local folders only; "
                         "download it yourself and pass the folder")
    return folder


def load_causal_lm(path, *, dtype: Optional[torch.dtype] = None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)`` from a local folder
    (a hub id, or any path that is not a folder, is a ValueError: nothing is downloaded, nothing waits on
    the network). ``dtype``: the parameters' dtype (None: as saved / fp32)."""
    folder = _local_folder(path, "load_causal_lm", kwargs)
    transformers = _transformers()
    if dtype is not None:
        kwargs["dtype"] = dtype
    with _offline():
        return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs)


def load_tokenizer(path, **kwargs):
    """``AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)`` from a local folder only."""
    folder = _local_folder(path, "load_tokenizer", kwargs)
    transformers = _transformers()
    with _offline():
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# the head
# ---------------------------------------------------------------------------------------------
@dataclass
class LMHead:
    """What the loss needs of a causal LM's head. ``base``: the decoder (``model.get_decoder()``);
    ``module``: the output-embeddings Linear; ``weight`` ``(V, H)`` and ``bias`` (or None); ``softcap``:
    ``config.final_logit_softcapping`` or None; ``logit_scale``: ``config.logit_scale`` (Cohere) or
    ``1 / config.logits_scaling`` (Granite), else 1.0."""

    base: nn.Module
    module: nn.Linear
    weight: Tensor
    bias: Optional[Tensor]
    softcap: Optional[float]
    logit_scale: float

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def head_of(model: nn.Module) -> LMHead:
    """The head of a causal LM whose ``get_output_embeddings()`` is an ``nn.Linear`` (any
    ``*ForCausalLM`` of transformers; a DDP-wrapped one too)."""
    model = unwrap(model)
    name = type(model).__name__
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{name}: get_output_embeddings() must be an nn.Linear (a causal LM's lm_head), got "
                        f"{type(head).__name__}")
    base = None
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            base = get_decoder()
        except Exception:  # noqa: BLE001 - some models do not implement it
            base = None
    if base is None or base is model:
        base = getattr(model, getattr(model, "base_model_prefix", "") or "model", None)
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None):
        scale = 1.0 / float(config.logits_scaling)  # Granite divides its logits by it
    return LMHead(base=base, module=head, weight=head.weight, bias=head.bias,
                  softcap=float(softcap) if softcap else None, logit_scale=float(scale) if scale else 1.0)


def shift_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Hugging Face's causal shift as a same-length tensor: position i is labelled with ``labels[..., i + 1]``
    and the last position with ``ignore_index`` (``ForCausalLMLoss`` pads one ignore on the right and drops
    the first). ``linear_kd_loss(hidden, w, labels=shift_labels(labels), kd_weight=0, ce_weight=1)`` is the
    model's own ``model(input_ids, labels=labels).loss``."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.dim() == 0:
        raise ValueError("labels must have a sequence dimension, got a scalar")
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


# ---------------------------------------------------------------------------------------------
# hidden states without logits
# ---------------------------------------------------------------------------------------------
def head_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
    """Runs ``model(**inputs)`` (the wrapper's forward when ``model`` is DDP-wrapped) and returns the
    hidden states its head would have multiplied, ``(..., T, H)``; the head gets an empty slice, so no
    logits are computed."""
    head = head_of(model).module
    seen: list[Tensor] = []

    def take(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("input")
        seen.append(hidden)
        empty = hidden.narrow(-2, 0, 0) if hidden.dim() >= 2 else hidden[:0]
        return (empty,) + tuple(args[1:]), kwargs

    handle = head.register_forward_pre_hook(take, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"{type(unwrap(model)).__name__}'s forward called its lm_head {len(seen)} times "
                           "(expected once, on the last hidden states)")
    return seen[0]


def _model_inputs(batch: Mapping[str, Any]) -> dict:
    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    if "input_ids" not in inputs and "inputs_embeds" not in inputs:
        raise ValueError(f"the batch has no input_ids (keys: {', '.join(map(str, batch))})")
    inputs["use_cache"] = False
    return inputs


def _teacher_topk(value: Any) -> tuple:
    if isinstance(value, Mapping):
        keys = ("indices", "logprobs", "rest_logmass")
        value = tuple(value[k] for k in keys if value.get(k) is not None)
    if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
        raise TypeError("batch['teacher_topk'] must be (indices, logprobs[, rest_logmass]) or a dict of them")
    return tuple(value)


def _labels(batch: Mapping[str, Any], ignore_index: int) -> Tensor:
    if batch.get("shift_labels") is not None:
        return batch["shift_labels"]
    if batch.get("labels") is None:
        raise ValueError("the batch needs labels (Hugging Face's, unshifted: usually input_ids with -100 at "
                         "padding) or shift_labels (already shifted)")
    return shift_labels(batch["labels"], ignore_index)


def lm_distill_loss(student: nn.Module, batch: Mapping[str, Any], loss_fn: LinearKDLoss, *,
                    teacher: Optional[nn.Module] = None, reduction: Optional[str] = None,
                    teacher_autocast: Optional[contextlib.AbstractContextManager] = None,
                    return_parts: bool = False):
    """The distillation loss of a Hugging Face causal LM on one batch, no logits computed.

    ``batch``: ``input_ids`` (and ``attention_mask``, ``position_ids``, ... passed to the models), the
    labels as Hugging Face has them (``labels``, shifted here as the model's own loss shifts them) or
    already shifted (``shift_labels``), and, for a cached teacher, ``teacher_topk=(indices, logprobs[,
    rest_logmass])`` aligned with the positions (position i: the teacher's distribution of token i + 1).
    ``teacher``: a live teacher (run under no_grad; its hidden states and head, never its logits). A
    batch with ``teacher_topk`` needs no teacher; ``loss_fn.options['kd_weight'] == 0`` needs neither.
    ``loss_fn``: a :class:`~mlkd_fast.LinearKDLoss` (its options; the softcap / logit scale of each side
    come from the configs when they set one). ``reduction`` overrides the loss's (the Trainer sums).
    Returns the loss, and ``{"kd", "ce", "total", "tokens"}`` with ``return_parts``.
    """
    if not isinstance(loss_fn, LinearKDLoss):
        raise TypeError(f"loss_fn must be a mlkd_fast.LinearKDLoss, got {type(loss_fn).__name__}")
    options = dict(loss_fn.options)
    if reduction is not None:
        options["reduction"] = reduction
    s_head = head_of(student)
    if s_head.softcap is not None:
        options["student_softcap"] = s_head.softcap
    if s_head.logit_scale != 1.0:
        options["student_logit_scale"] = s_head.logit_scale
    labels = _labels(batch, options["ignore_index"])
    inputs = _model_inputs(batch)
    teacher_kwargs: dict[str, Any] = {}
    if batch.get("teacher_topk") is not None:
        if teacher is not None:
            raise ValueError("the batch carries teacher_topk (a cached teacher) and a live teacher was given too: "
                             "pass one")
        teacher_kwargs["teacher_topk"] = _teacher_topk(batch["teacher_topk"])
    elif teacher is not None:
        t_head = head_of(teacher)
        if t_head.vocab_size != s_head.vocab_size and options["vocab"] != "shared":
            raise ValueError(f"teacher {type(unwrap(teacher)).__name__} has a {t_head.vocab_size}-id head and student "
                             f"{type(unwrap(student)).__name__} a {s_head.vocab_size}-id head: they must share the "
                             "tokenizer; if one head is only padded (same tokenizer, extra rows), pass "
                             "LinearKDLoss(vocab='shared') (the divergence over the first min ids)")
        if t_head.softcap is not None:
            options["teacher_softcap"] = t_head.softcap
        if t_head.logit_scale != 1.0:
            options["teacher_logit_scale"] = t_head.logit_scale
        with torch.no_grad(), (teacher_autocast or contextlib.nullcontext()):
            t_hidden = head_inputs(teacher, inputs)
        teacher_kwargs.update(teacher_hidden=t_hidden, teacher_weight=t_head.weight.detach(),
                              teacher_bias=None if t_head.bias is None else t_head.bias.detach())
    elif options["kd_weight"] != 0.0:
        raise ValueError("no teacher: pass teacher= (a live teacher) or a batch with teacher_topk (a cached one), "
                         "or set kd_weight=0")
    hidden = head_inputs(student, inputs)
    device_type = hidden.device.type
    # the loss's GEMMs stay in fp32 whatever autocast the caller runs under (docs/lm.md §1.1)
    with torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext():
        loss, parts = linear_kd_loss(hidden, s_head.weight, student_bias=s_head.bias, labels=labels,
                                     return_parts=True, **teacher_kwargs, **options)
    loss_fn.last = parts
    return (loss, parts) if return_parts else loss


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------
def _stack(values: Sequence[Any], key: str):
    first = values[0]
    if isinstance(first, (tuple, list)) and first and isinstance(first[0], Tensor):
        return tuple(_stack([v[i] for v in values], f"{key}[{i}]") for i in range(len(first)))
    if isinstance(first, Mapping):
        return {k: _stack([v[k] for v in values], f"{key}.{k}") for k in first}
    tensors = [v if isinstance(v, Tensor) else torch.as_tensor(v) for v in values]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"collate_lm: the examples' {key} have different shapes {sorted(shapes)}; pad them to one "
                         "length first")
    return torch.stack(tensors)


def collate_lm(features: Sequence[Any]) -> dict:
    """Stacks examples into a batch: dicts (``input_ids``, ``attention_mask``, ``labels``, ``shift_labels``,
    ``teacher_topk`` as a tuple or dict of tensors) or ``(input_ids, labels[, teacher_topk])`` tuples.
    All examples of one length (a fixed-length corpus or a cache); pad beforehand otherwise."""
    if not features:
        raise ValueError("collate_lm: no examples")
    rows = []
    for f in features:
        if isinstance(f, Mapping):
            rows.append(f)
        elif isinstance(f, (tuple, list)) and len(f) in (2, 3):
            rows.append(dict(zip(("input_ids", "labels", "teacher_topk"), f)))
        else:
            raise TypeError("collate_lm: an example must be a dict or (input_ids, labels[, teacher_topk]), got "
                            f"{type(f).__name__}")
    return {k: _stack([r[k] for r in rows], k) for k in rows[0] if rows[0][k] is not None}


# ---------------------------------------------------------------------------------------------
# the Trainer
# ---------------------------------------------------------------------------------------------
_TRAINER_CLASS = None


def _build_trainer_class():
    transformers = _transformers()
    try:
        import accelerate  # noqa: F401,PLC0415 - the Trainer needs it
    except ImportError as exc:
        raise MissingDependency(f"DistillationTrainer needs accelerate (transformers' Trainer): {INSTALL}") from exc

    class DistillationTrainer(transformers.Trainer):
        """``transformers.Trainer`` whose loss is :func:`lm_distill_loss`: the student's hidden states and
        head, a live teacher's (``teacher_model``) or a cached one's (batches with ``teacher_topk``), no
        logits. ``loss``: a :class:`~mlkd_fast.LinearKDLoss` (default ``LinearKDLoss()``: forward KL).

        Gradient accumulation and DDP: the loss of a micro-batch is its sum over counted tokens divided
        by the counted tokens of the whole accumulated batch (``num_items_in_batch``, counted here on the
        shifted labels, over all processes when ``average_tokens_across_devices``), times the number of
        processes (DDP averages): the update is the one of the whole batch's mean, whatever the split.
        The logs gain ``kd`` and ``ce``: their per-counted-token means since the last log (weighted, so
        they add up to the loss). bf16 (``bf16=True``) runs the models' forwards under autocast; the
        loss's GEMMs stay fp32. The teacher is moved to the student's device, put in eval mode and frozen;
        it is not saved in checkpoints (resume needs the same teacher)."""

        loss_is_scaled_for_ga = True

        def __init__(self, *args, teacher_model: Optional[nn.Module] = None, loss: Optional[LinearKDLoss] = None,
                     **kwargs):
            if kwargs.get("data_collator") is None:
                kwargs["data_collator"] = collate_lm
            super().__init__(*args, **kwargs)
            self.kd_loss = LinearKDLoss() if loss is None else loss
            if not isinstance(self.kd_loss, LinearKDLoss):
                raise TypeError(f"loss must be a mlkd_fast.LinearKDLoss, got {type(self.kd_loss).__name__}")
            self.teacher_model = teacher_model
            if teacher_model is not None:
                teacher_model.to(self.args.device).eval().requires_grad_(False)
            self.model_accepts_loss_kwargs = True  # num_items_in_batch always reaches compute_loss
            self._parts = None

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = list(dict.fromkeys(list(self._signature_columns) + list(NOT_MODEL_INPUTS)))

        def get_batch_samples(self, epoch_iterator, num_batches, device=None):
            batches = []
            for _ in range(num_batches):
                try:
                    batches.append(next(epoch_iterator))
                except StopIteration:
                    break
            if not batches:
                return batches, None
            ignore = self.kd_loss.options["ignore_index"]
            count = sum(_labels(b, ignore).ne(ignore).sum() for b in batches)
            count = count.to(device if device is not None else self.args.device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count.reshape(1)).sum()
            return batches, count

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            training = model.training and num_items_in_batch is not None
            loss, parts = lm_distill_loss(model, inputs, self.kd_loss, teacher=self.teacher_model,
                                          reduction="sum" if training else None,
                                          teacher_autocast=self.accelerator.autocast(), return_parts=True)
            if training:
                scale = 1.0
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    scale = float(self.args.world_size)  # DDP averages the ranks' gradients
                loss = loss * scale / num_items_in_batch
                self.loss_is_scaled_for_ga = True
            else:
                self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the GA steps
            if model.training:
                tokens = parts["tokens"]
                kd, ce = (parts["kd"], parts["ce"]) if training else (parts["kd"] * tokens, parts["ce"] * tokens)
                new = torch.stack([kd, ce, tokens]).detach().double()
                self._parts = new if self._parts is None else self._parts + new
            return (loss, {}) if return_outputs else loss

        def log(self, logs, start_time=None):
            if "loss" in logs and self._parts is not None:
                parts = self._parts
                if self.args.world_size > 1:
                    parts = self.accelerator.reduce(parts.to(self.args.device), reduction="sum")
                kd, ce, tokens = parts.tolist()
                logs["kd"] = round(kd / max(tokens, 1.0), 6)
                logs["ce"] = round(ce / max(tokens, 1.0), 6)
                self._parts = None
            return super().log(logs, start_time) if start_time is not None else super().log(logs)

    DistillationTrainer.__module__ = __name__
    return DistillationTrainer


def __getattr__(name: str):
    """``DistillationTrainer`` subclasses ``transformers.Trainer``: it is built on first access."""
    global _TRAINER_CLASS
    if name == "DistillationTrainer":
        if _TRAINER_CLASS is None:
            _TRAINER_CLASS = _build_trainer_class()
        return _TRAINER_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
