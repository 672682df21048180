"""Language-model distillation without the (tokens x vocab) logits: the fused lm_head + divergence
loss (SPEC §9, docs/lm.md). Users call :func:`linear_kd_loss` (also :mod:`mlkd_fast.functional`) or
the module :class:`LinearKDLoss`.

How it runs. The tokens are cut into chunks; for each chunk the student's logits ``h W^T (+ b)`` are
formed in fp32 (cuBLAS writes fp32 from bf16 operands on CUDA; on CPU the operands are fp32), the
teacher's likewise (or read from its dense logits, or its top-k), and one row function
(:func:`mlkd_fast.divergences.token_rows`, or a backend's kernel) turns them into the per-token
divergence, the per-token CE and d(total)/d(logits) in the same pass. That gradient is multiplied at
once into the hidden states' gradient (``dz W``) and the head's (``dz^T h``, an fp32 accumulator), and
the chunk's logits are dropped. So the forward ends holding the gradients, and the backward only
scales them by d loss / d total: no logits are recomputed, nothing waits for the host.

Bytes and flops per call, N tokens, head (V, H), fp32 math: 2 N V H flops for the student's logits,
as many for the teacher's when it is live, and 2 N V H each for dh and dW: a student's forward and
backward through its head, plus the teacher's forward. Extra memory: one chunk's logits (and the row
function's temporaries) plus the fp32 weight-gradient accumulator, O(chunk V + V H); never (N, V).

``reduction="none"`` returns per-token losses whose upstream gradient is a vector: there the forward
stores nothing and the backward runs the chunks again with the upstream gradient as the row weights.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import _checks as check
from . import divergences
from . import ops as _ops
from .divergences import DIVERGENCES

__all__ = ["linear_kd_loss", "LinearKDLoss", "DIVERGENCES", "VOCAB_POLICIES", "TOPK_TAILS", "LM_REDUCTIONS",
           "default_chunk_size"]

VOCAB_POLICIES = ("error", "shared")
TOPK_TAILS = ("bucket", "renormalize")
LM_REDUCTIONS = ("mean", "sum", "none")
LM_BACKENDS = ("auto", "torch", "triton", "native")

# The default chunk is the largest power of two whose fp32 student logits fit this many bytes
# (MLKD_FAST_LM_CHUNK_BYTES overrides): the row function holds a few such buffers at once. On CPU 256 MiB
# (512 tokens at V = 128,256): with 128-token chunks the GEMMs alone at (1024, 1024, 128256) took 20.3 s against
# 15.9 s with 1024-token ones (benchmarks/test_bench_lm.py's profile on the development CPU).
CHUNK_BYTES = {"cpu": 256 << 20, "cuda": 512 << 20}
MIN_CHUNK = 8


def default_chunk_size(tokens: int, vocab: int, device: Union[str, torch.device]) -> int:
    """The tokens per chunk when ``chunk_size`` is not given: a power of two from the memory budget
    (:data:`CHUNK_BYTES`, or ``MLKD_FAST_LM_CHUNK_BYTES``), at least 8, at most ``tokens``."""
    device = torch.device(device)
    budget = int(os.environ.get("MLKD_FAST_LM_CHUNK_BYTES", CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])))
    rows = max(MIN_CHUNK, 1 << max(0, int(math.floor(math.log2(max(1, budget // (4 * vocab)))))))
    return max(1, min(rows, tokens))


# ---------------------------------------------------------------------------------------------
# the row functions of the backends
# ---------------------------------------------------------------------------------------------
RowFunction = Callable[..., tuple[Tensor, Tensor, Optional[Tensor]]]


# The torch rows are a chain of elementwise passes over the chunk (~10 of them); on CPU, from this many
# entries a chunk on, they run as one inductor-compiled function instead (4-10x faster at 256 x 32000,
# measured on the development CPU; one compile of a few seconds per configuration; rows-times-V below it
# stay eager so that small calls never wait for a compiler). MLKD_FAST_LM_COMPILE=0 turns it off.
COMPILE_MIN_ENTRIES = 1 << 22
_COMPILED: dict[str, object] = {}


def _compile_enabled() -> bool:
    return os.environ.get("MLKD_FAST_LM_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def _torch_rows(z_s: Tensor, **kwargs) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """divergences.token_rows, inductor-compiled for large CPU chunks (see COMPILE_MIN_ENTRIES)."""
    if z_s.device.type != "cpu" or z_s.numel() < COMPILE_MIN_ENTRIES or not _compile_enabled() \
            or "failed" in _COMPILED:
        return divergences.token_rows(z_s, **kwargs)
    compiled = _COMPILED.get("rows")
    if compiled is None:
        # dynamic=None: the first chunk shape compiles static, a second one (a last, partial chunk; another
        # token count) recompiles once with the token dimension dynamic instead of once per count
        compiled = _COMPILED["rows"] = torch.compile(divergences.token_rows, dynamic=None)
    try:
        return compiled(z_s, **kwargs)
    except Exception as exc:  # no C++ compiler, an inductor limitation: the eager rows are the same math
        _COMPILED["failed"] = f"{type(exc).__name__}: {exc}"
        return divergences.token_rows(z_s, **kwargs)


def _native_rows(z_s: Tensor, **kwargs) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The compiled library's C++ rows (op ``mlkd_fast_lm_native::token_rows``, csrc/cpu/linear_kd_rows.cpp:
    rows in parallel, each swept three times in cache by AVX-512 / AVX2 / scalar code), the gradient
    written over ``z_s`` (the caller's fresh chunk), for fp32 logits with a dense teacher or none; the
    sparse top-k teacher and fp64 run the torch rows."""
    z_t = kwargs["z_t"]
    if kwargs["topk_indices"] is not None or z_s.dtype != torch.float32 or z_s.device.type != "cpu" \
            or z_s.stride(1) != 1 or (z_t is not None and z_t.dtype not in (torch.float32, torch.bfloat16, torch.float16)):
        return _torch_rows(z_s, **kwargs)
    if z_t is not None and z_t.stride(1) != 1:
        z_t = z_t.contiguous()
    kd, ce = getattr(torch.ops, _ops.LM_NAMESPACE).token_rows(
        z_s, z_t, kwargs["labels"], kwargs["kd_weight"], kwargs["ce_weight"], kwargs["divergence"],
        float(kwargs["coef"]), float(kwargs["temperature"]), float(kwargs["student_softcap"]),
        float(kwargs["teacher_softcap"]), int(kwargs["vocab"]), bool(kwargs["want_grad"]))
    return kd, ce, (z_s if kwargs["want_grad"] else None)


@torch.compiler.assume_constant_result  # a constant of the process: torch.compile reads it without tracing
def _native_rows_available() -> bool:
    """Whether the compiled library is loaded and has the CPU row kernel (an older build has not)."""
    from . import _native  # noqa: PLC0415 - loads the library softly

    return _native.LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"{_ops.LM_NAMESPACE}::token_rows", "CPU")


def _row_function(name: str) -> RowFunction:
    if name == "triton":
        from .kernels import linear_kd as triton_rows  # noqa: PLC0415 - Triton is optional

        return triton_rows.token_rows
    if name == "native":
        return _native_rows
    return _torch_rows


def _backend_for(backend: str, device: torch.device) -> str:
    """The row backend of one call: ``"torch"`` everywhere, ``"triton"`` on CUDA (or under the
    interpreter) when it is available, ``"native"`` (the C++ rows) on CPU when the compiled library has
    them (docs/lm.md §4)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend not in LM_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, LM_BACKENDS))}; got {backend!r}")
    from .backends import backend_status  # noqa: PLC0415 - keeps this module importable alone

    if backend == "auto":
        env = os.environ.get("MLKD_FAST_BACKEND", "auto").strip().lower() or "auto"
        if env == "triton" or (env == "auto" and device.type == "cuda"):
            if backend_status("triton", device) and _triton_rows_available():
                return "triton"
        if env in ("auto", "native") and device.type == "cpu" and _native_rows_available():
            return "native"
        return "torch"
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend 'native' has no linear_kd kernel for {device.type} tensors (its C++ rows run "
                             "on CPU tensors); use backend='auto', 'triton' or 'torch'")
        status = backend_status("native", device)
        if not status:
            raise ValueError(f"backend 'native' is not available on {device}: {status.reason}")
        if not _native_rows_available():
            raise ValueError("backend 'native' is not available for linear_kd: the compiled library was built "
                             "without its row kernel (rebuild it: pip install -e .)")
    if backend == "triton":
        status = backend_status("triton", device)
        if not status:
            raise ValueError(f"backend 'triton' is not available on {device}: {status.reason}")
        if not _triton_rows_available():
            raise ValueError("backend 'triton' is not available for linear_kd: its row kernel could not be imported")
    return backend


def _triton_rows_available() -> bool:
    try:
        from .kernels import linear_kd  # noqa: F401,PLC0415
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


# ---------------------------------------------------------------------------------------------
# the chunked pass (the op's kernel, for every device)
# ---------------------------------------------------------------------------------------------
def _math_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# torch.mm(a, b, out_dtype=torch.float32) with bf16/fp16 operands (cuBLAS accumulates in fp32 and writes fp32):
# an ATen overload of recent torch releases, CUDA only; without it the operands are cast to fp32 once.
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


class _Head:
    """One side's lm_head as the GEMMs see it: logits of a chunk in the math dtype, never rounded to
    a low-precision input dtype; on CUDA from bf16/fp16 operands with fp32 output, elsewhere from
    operands cast once to the math dtype."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], scale: float, math: torch.dtype) -> None:
        self.native_out = weight.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16) \
            and math == torch.float32 and _MM_OUT_DTYPE
        self.weight = weight if self.native_out else weight.to(math)
        self.bias = None if bias is None else bias.to(math)
        self.scale, self.math = scale, math

    def logits(self, hidden: Tensor) -> Tensor:
        if self.native_out:
            z = torch.mm(hidden.to(self.weight.dtype), self.weight.t(), out_dtype=torch.float32)
        else:
            z = hidden.to(self.math) @ self.weight.t()
        if self.bias is not None:
            z += self.bias
        if self.scale != 1.0:
            z *= self.scale
        return z


def linear_kd_pass(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                   teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
                   teacher_logits: Optional[Tensor], topk_indices: Optional[Tensor], topk_logprobs: Optional[Tensor],
                   topk_rest: Optional[Tensor], labels: Optional[Tensor], kd_row_weight: Tensor, ce_row_weight: Tensor, divergence: str,
                   coef: float, temperature: float, student_scale: float, teacher_scale: float,
                   student_softcap: float, teacher_softcap: float, vocab: int, topk_tail: bool, chunk_size: int,
                   rows_backend: str, grad_hidden: bool, grad_weight: bool, grad_bias: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chunked forward: (kd rows, ce rows, d total/d hidden, d total/d weight, d total/d bias).

    Inputs are 2-D (tokens flattened) and already checked. total = sum(kd_row_weight * kd) +
    sum(ce_row_weight * ce) (the reduction, the loss weights and T^2 are folded into the row weights).
    Gradients not asked for come back empty."""
    n = student_hidden.shape[0]
    math_dtype = _math_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                             topk_logprobs)
    device = student_hidden.device
    rows_fn = _row_function(rows_backend)
    want_grad = grad_hidden or grad_weight or grad_bias
    student = _Head(student_weight, student_bias, student_scale, math_dtype)
    teacher = None if teacher_hidden is None else _Head(teacher_weight, teacher_bias, teacher_scale, math_dtype)
    kd_rows = torch.empty(n, dtype=math_dtype, device=device)
    ce_rows = torch.empty(n, dtype=math_dtype, device=device)
    d_hidden = torch.empty_like(student_hidden) if grad_hidden else student_hidden.new_empty(0)
    d_weight = torch.zeros(student_weight.shape, dtype=math_dtype, device=device) if grad_weight else None
    d_bias = torch.zeros(student_weight.shape[0], dtype=math_dtype, device=device) if grad_bias else None
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        h = student_hidden[start:end]
        z_s = student.logits(h)
        z_t = None
        if teacher is not None:
            z_t = teacher.logits(teacher_hidden[start:end])
        elif teacher_logits is not None:
            z_t = teacher_logits[start:end].to(math_dtype)
            if teacher_scale != 1.0:
                z_t = z_t * teacher_scale
        kd, ce, dz = rows_fn(
            z_s, z_t=z_t,
            topk_indices=None if topk_indices is None else topk_indices[start:end],
            topk_logprobs=None if topk_logprobs is None else topk_logprobs[start:end].to(math_dtype),
            topk_rest=None if topk_rest is None else topk_rest[start:end].to(math_dtype),
            labels=None if labels is None else labels[start:end],
            kd_weight=kd_row_weight[start:end], ce_weight=ce_row_weight[start:end], divergence=divergence, coef=coef,
            temperature=temperature, student_softcap=student_softcap, teacher_softcap=teacher_softcap, vocab=vocab,
            topk_tail=topk_tail, want_grad=want_grad)
        kd_rows[start:end] = kd
        ce_rows[start:end] = ce
        del z_s, z_t
        if not want_grad:
            continue
        if student_scale != 1.0:
            dz *= student_scale
        if grad_bias:
            d_bias += dz.sum(0)
        if student.native_out:  # bf16/fp16 operands, fp32 results: the gradient rounded once, for the GEMM
            dz_op = dz.to(student.weight.dtype)
            if grad_hidden:
                d_hidden[start:end] = torch.mm(dz_op, student.weight, out_dtype=torch.float32)
            if grad_weight:
                d_weight += torch.mm(dz_op.t(), h, out_dtype=torch.float32)
        else:
            if grad_hidden:
                d_hidden[start:end] = dz @ student.weight
            if grad_weight:
                d_weight.addmm_(dz.t(), h.to(math_dtype))
    return (kd_rows, ce_rows, d_hidden,
            student_weight.new_empty(0) if d_weight is None else d_weight.to(student_weight.dtype),
            student_weight.new_empty(0) if d_bias is None else d_bias.to(student_bias.dtype))


# ---------------------------------------------------------------------------------------------
# the custom op, its fake and its autograd
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("mlkd_fast_lm::linear_kd", mutates_args=())
def _linear_kd_op(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                  teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
                  teacher_logits: Optional[Tensor], topk_indices: Optional[Tensor], topk_logprobs: Optional[Tensor],
                  topk_rest: Optional[Tensor], labels: Optional[Tensor], kd_row_weight: Tensor, ce_row_weight: Tensor, divergence: str,
                  coef: float, temperature: float, student_scale: float, teacher_scale: float, student_softcap: float,
                  teacher_softcap: float, vocab: int, topk_tail: bool, chunk_size: int, rows_backend: str,
                  grad_hidden: bool, grad_weight: bool, grad_bias: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # the GEMMs' precision is this op's contract (fp32 results), not autocast's: under autocast (CPU or
    # CUDA) the matmuls inside would run in bf16/fp16 and round the logits before the softmax
    with torch.autocast(student_hidden.device.type, enabled=False):
        kd, ce, dh, dw, db = linear_kd_pass(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
            topk_indices, topk_logprobs, topk_rest, labels, kd_row_weight, ce_row_weight, divergence, coef, temperature,
            student_scale, teacher_scale, student_softcap, teacher_softcap, vocab, topk_tail, chunk_size, rows_backend,
            grad_hidden, grad_weight, grad_bias)
    total = (kd_row_weight * kd).sum() + (ce_row_weight * ce).sum()
    return total, kd, ce, dh, dw, db


@_linear_kd_op.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
      topk_indices, topk_logprobs, topk_rest, labels, kd_row_weight, ce_row_weight, divergence, coef, temperature,
      student_scale, teacher_scale, student_softcap, teacher_softcap, vocab, topk_tail, chunk_size, rows_backend,
      grad_hidden, grad_weight, grad_bias):
    n = student_hidden.shape[0]
    math_dtype = _math_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                             topk_logprobs)
    total = student_hidden.new_empty((), dtype=math_dtype)
    rows = student_hidden.new_empty(n, dtype=math_dtype)
    return (total, rows, rows.new_empty(n),
            student_hidden.new_empty(student_hidden.shape) if grad_hidden else student_hidden.new_empty(0),
            student_weight.new_empty(student_weight.shape) if grad_weight else student_weight.new_empty(0),
            student_bias.new_empty(student_bias.shape) if grad_bias else student_weight.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)
    ctx.flags = inputs[-3:]
    ctx.save_for_backward(*output[3:])


def _backward(ctx, grad_total, _kd, _ce, _dh, _dw, _db):
    none = [None] * 27
    if grad_total is None:
        return tuple(none)
    from .ops import graph_freed_after_this_backward  # noqa: PLC0415

    in_place = graph_freed_after_this_backward(grad_total)
    for slot, stored, flag in zip((0, 1, 2), ctx.saved_tensors, ctx.flags):
        if flag:
            g = grad_total.to(stored.dtype)
            none[slot] = stored.detach().mul_(g) if in_place else stored * g
    return tuple(none)


_linear_kd_op.register_autograd(_backward, setup_context=_setup_context)


class _PerToken(torch.autograd.Function):
    """``reduction="none"``: per-token losses whose backward runs the chunks again with the upstream
    gradient as the row weights (a vector the forward could not know)."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, args: dict, kd_factor: float, ce_factor: float):
        zeros = torch.zeros(student_hidden.shape[0], dtype=args["math_dtype"], device=student_hidden.device)
        _, kd, ce, _, _, _ = torch.ops.mlkd_fast_lm.linear_kd(
            student_hidden, student_weight, student_bias, *args["teacher"], args["labels"], zeros, zeros,
            *args["scalars"], False, False, False)
        ctx.save_for_backward(student_hidden, student_weight, student_bias)
        ctx.args, ctx.factors = args, (kd_factor, ce_factor)
        mask = args["counted"]
        kd, ce = torch.where(mask, kd, torch.zeros_like(kd)), torch.where(mask, ce, torch.zeros_like(ce))
        ctx.mark_non_differentiable(kd, ce)
        return kd_factor * kd + ce_factor * ce, kd, ce

    @staticmethod
    def backward(ctx, grad_rows, _kd, _ce):
        if grad_rows is None:
            return None, None, None, None, None, None
        h, w, b = ctx.saved_tensors
        args = ctx.args
        g = torch.where(args["counted"], grad_rows.to(args["math_dtype"]), torch.zeros_like(grad_rows,
                                                                                            dtype=args["math_dtype"]))
        flags = ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]
        _, _, _, dh, dw, db = torch.ops.mlkd_fast_lm.linear_kd(
            h, w, b, *args["teacher"], args["labels"], g * ctx.factors[0], g * ctx.factors[1], *args["scalars"], *flags)
        return (dh if flags[0] else None, dw if flags[1] else None, db if flags[2] else None, None, None, None)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def _choice(value: object, name: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value  # type: ignore[return-value]


def _optional_cap(value: object, name: str) -> float:
    if value is None:
        return 0.0
    return check.real(value, name, positive=True)


def _head(weight: object, bias: object, hidden: Tensor, side: str) -> tuple[Tensor, Optional[Tensor]]:
    w = _unshard(check.float_tensor(weight, f"{side}_weight"))
    if w.ndim != 2:
        raise ValueError(f"{side}_weight must have shape (V, H), got shape {tuple(w.shape)}")
    if w.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{side}_weight has H = {w.shape[1]} but {side}_hidden has H = {hidden.shape[-1]} "
                         f"(shape {tuple(hidden.shape)})")
    if w.shape[0] == 0:
        raise ValueError(f"{side}_weight has an empty vocabulary: shape {tuple(w.shape)}")
    if bias is None:
        return w, None
    b = _unshard(check.float_tensor(bias, f"{side}_bias"))
    if b.shape != (w.shape[0],):
        raise ValueError(f"{side}_bias must have shape ({w.shape[0]},) (one per vocabulary id), got {tuple(b.shape)}")
    return w, b


def _unshard(x: Tensor) -> Tensor:
    """A DTensor (FSDP2's sharded lm_head weight, read outside the head module's forward) as the full
    tensor, differentiably: its gradient is reduce-scattered back to the shards by DTensor's autograd,
    averaged over the mesh (FSDP2's and DDP's convention). The gradient must be declared Partial: with
    full_tensor()'s default (Replicate) each rank would keep its own tokens' slice unreduced
    (docs/lm.md §3)."""
    full_tensor = getattr(x, "full_tensor", None)
    if full_tensor is not None and type(x).__name__ == "DTensor":
        from torch.distributed.tensor import Partial  # noqa: PLC0415 - only reached with torch.distributed

        return full_tensor(grad_placements=[Partial("avg")] * x.device_mesh.ndim)
    return x


def _flat(x: Tensor) -> Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_values(topk_indices: Optional[Tensor], vocab: int, labels: Optional[Tensor], labels_vocab: int,
                  ignore_index: int) -> None:
    """Checks that read values (one host synchronisation; skipped under torch.compile and CUDA graph
    capture): top-k ids in range and distinct per token, labels in range."""
    if torch.compiler.is_compiling():
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    problems = []
    if topk_indices is not None and topk_indices.numel():
        sorted_ids = topk_indices.sort(dim=-1).values
        problems += [topk_indices.min() < 0, topk_indices.max() >= vocab,
                     (sorted_ids[:, 1:] == sorted_ids[:, :-1]).any() if topk_indices.shape[1] > 1
                     else torch.zeros((), dtype=torch.bool, device=topk_indices.device)]
    if labels is not None and labels.numel():
        kept = labels != ignore_index
        problems += [(kept & ((labels < 0) | (labels >= labels_vocab))).any()]
    if not problems:
        return
    flags = torch.stack([p.to(torch.bool).reshape(()) for p in problems]).tolist()
    if topk_indices is not None and topk_indices.numel():
        if flags[0] or flags[1]:
            raise ValueError(f"teacher_topk indices must lie in [0, {vocab}) (the vocabulary the divergence covers); "
                             f"got min {int(topk_indices.min())}, max {int(topk_indices.max())}")
        if flags[2]:
            raise ValueError("teacher_topk indices must be distinct within each token; some token repeats an id")
        flags = flags[3:]
    if flags and flags[0]:
        bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= labels_vocab))]
        raise ValueError(f"labels must be in [0, {labels_vocab}) or ignore_index={ignore_index}; got {int(bad[0])}")


@dataclass
class _Prepared:
    """One call's checked, flattened inputs and the op's scalar arguments."""

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    teacher: tuple
    labels: Optional[Tensor]
    counted: Tensor
    scalars: tuple
    math_dtype: torch.dtype
    lead_shape: tuple
    kd_factor: float


def _prepare(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
             teacher_logits, teacher_topk, labels, ignore_index, divergence, beta, alpha, temperature,
             scale_by_t_squared, kd_weight, student_softcap, teacher_softcap, student_logit_scale,
             teacher_logit_scale, vocab, topk_tail, chunk_size, backend) -> _Prepared:
    hs = check.float_tensor(student_hidden, "student_hidden")
    if hs.ndim < 2:
        raise ValueError(f"student_hidden must have shape (..., H) with at least 2 dims, got shape {tuple(hs.shape)}")
    lead = tuple(hs.shape[:-1])
    n = math.prod(lead)
    if n == 0:
        raise ValueError(f"empty batch: student_hidden has shape {tuple(hs.shape)}")
    w_s, b_s = _head(student_weight, student_bias, hs, "student")
    divergence = _choice(divergence, "divergence", DIVERGENCES)
    vocab = _choice(vocab, "vocab", VOCAB_POLICIES)
    topk_tail = _choice(topk_tail, "topk_tail", TOPK_TAILS)
    temperature = check.real(temperature, "temperature", positive=True)
    kd_weight = check.real(kd_weight, "kd_weight")
    beta = check.real(beta, "beta")
    alpha = check.real(alpha, "alpha")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1) (the skew KLs' mixing weight), got {alpha}")
    if not isinstance(scale_by_t_squared, bool):
        raise TypeError(f"scale_by_t_squared must be a bool, got {type(scale_by_t_squared).__name__}")
    s_cap = _optional_cap(student_softcap, "student_softcap")
    t_cap = _optional_cap(teacher_softcap, "teacher_softcap")
    s_scale = check.real(student_logit_scale, "student_logit_scale", positive=True)
    t_scale = check.real(teacher_logit_scale, "teacher_logit_scale", positive=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")

    given = [name for name, x in (("teacher_hidden/teacher_weight", teacher_hidden if teacher_hidden is not None
                                   else teacher_weight), ("teacher_logits", teacher_logits),
                                  ("teacher_topk", teacher_topk)) if x is not None]
    if kd_weight != 0.0 and len(given) != 1:
        raise ValueError("give the teacher exactly one way: teacher_hidden with teacher_weight (live), teacher_logits "
                         f"(dense) or teacher_topk=(indices, logprobs) (sparse); got "
                         f"{', '.join(given) if given else 'none'}")
    if kd_weight == 0.0 and len(given) > 1:
        raise ValueError(f"give the teacher one way at most; got {', '.join(given)}")
    v_s = w_s.shape[0]
    teacher: tuple = (None,) * 7
    v_t = v_s
    if teacher_hidden is not None or teacher_weight is not None:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("a live teacher needs both teacher_hidden and teacher_weight")
        ht = check.float_tensor(teacher_hidden, "teacher_hidden").detach()
        if tuple(ht.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden must have the tokens of student_hidden {lead}, got shape "
                             f"{tuple(ht.shape)}")
        w_t, b_t = _head(teacher_weight, teacher_bias, ht, "teacher")
        v_t = w_t.shape[0]
        teacher = (_flat(ht), w_t.detach(), None if b_t is None else b_t.detach(), None, None, None, None)
    elif teacher_bias is not None:
        raise ValueError("teacher_bias is given without teacher_weight")
    elif teacher_logits is not None:
        zt = check.float_tensor(teacher_logits, "teacher_logits").detach()
        if tuple(zt.shape[:-1]) != lead:
            raise ValueError(f"teacher_logits must have the tokens of student_hidden {lead} and then V, got shape "
                             f"{tuple(zt.shape)}")
        v_t = zt.shape[-1]
        teacher = (None, None, None, _flat(zt), None, None, None)
    elif teacher_topk is not None:
        if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) not in (2, 3):
            raise TypeError("teacher_topk must be (indices, logprobs) or (indices, logprobs, rest_logmass)")
        idx, lp = teacher_topk[0], teacher_topk[1]
        rest = teacher_topk[2] if len(teacher_topk) == 3 else None
        if not isinstance(idx, Tensor) or idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(f"teacher_topk indices must be an integer tensor, got "
                            f"{getattr(idx, 'dtype', type(idx).__name__)}")
        lp = check.float_tensor(lp, "teacher_topk logprobs").detach()
        if tuple(idx.shape[:-1]) != lead or idx.shape != lp.shape:
            raise ValueError(f"teacher_topk indices and logprobs must both have shape {lead} + (k,); got "
                             f"{tuple(idx.shape)} and {tuple(lp.shape)}")
        if rest is not None:
            rest = check.float_tensor(rest, "teacher_topk rest_logmass").detach()
            if tuple(rest.shape) != lead:
                raise ValueError(f"teacher_topk rest_logmass must have shape {lead} (one per token), got "
                                 f"{tuple(rest.shape)}")
            rest = rest.reshape(-1)
        k = idx.shape[-1]
        if k == 0:
            raise ValueError("teacher_topk has k = 0 entries per token")
        if k > v_s:
            raise ValueError(f"teacher_topk has k = {k} entries per token, more than the vocabulary ({v_s})")
        v_t = v_s
        teacher = (None, None, None, None, _flat(idx).long(), _flat(lp), rest)
    if v_s != v_t and vocab == "error" and kd_weight != 0.0:
        raise ValueError(f"the student's vocabulary has {v_s} ids and the teacher's {v_t}: pass vocab='shared' to "
                         "distil over the first min(V_s, V_t) ids (padding ids never get probability), or give heads "
                         "of one size")
    kd_vocab = min(v_s, v_t)

    lab = None
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must have shape {lead} (one per token of student_hidden), got "
                             f"{tuple(labels.shape)}")
        lab = labels.reshape(-1).long()
    tensors = {"student_hidden": hs, "student_weight": w_s, "student_bias": b_s, "teacher_hidden": teacher[0],
               "teacher_weight": teacher[1], "teacher_bias": teacher[2], "teacher_logits": teacher[3],
               "teacher_topk": teacher[4], "teacher_topk logprobs": teacher[5], "teacher_topk rest_logmass": teacher[6],
               "labels": lab}
    check.same_device(tensors)
    _check_values(teacher[4], kd_vocab, lab, v_s, ignore_index)
    counted = torch.ones(n, dtype=torch.bool, device=hs.device) if lab is None else lab != ignore_index
    if lab is not None:
        lab = torch.where(counted, lab, torch.full_like(lab, -1))

    if chunk_size is None:
        chunk = default_chunk_size(n, max(v_s, v_t), hs.device)
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int (tokens per chunk) or None, got {chunk_size!r}")
        chunk = min(chunk_size, n)
    rows_backend = _backend_for(backend, hs.device)
    coef = beta if divergence == "jsd" else alpha
    resolved = divergences.resolve(divergence, coef)
    math_dtype = _math_dtype(hs, w_s, teacher[0], teacher[1], teacher[3], teacher[5])
    # with k = V nothing lies outside the k ids: no tail bucket (1 - sum would only be the ids' rounding)
    tail = topk_tail == "bucket" and not (teacher[4] is not None and teacher[4].shape[1] == kd_vocab)
    scalars = (resolved, float(coef), float(temperature), float(s_scale), float(t_scale), float(s_cap), float(t_cap),
               int(kd_vocab), tail, int(chunk), rows_backend)
    kd_factor = kd_weight * (temperature ** 2 if scale_by_t_squared else 1.0)
    return _Prepared(_flat(hs), w_s, b_s, teacher, lab, counted, scalars, math_dtype, lead, kd_factor)


# ---------------------------------------------------------------------------------------------
# the API
# ---------------------------------------------------------------------------------------------
def linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    teacher_logits: Optional[Tensor] = None,
    teacher_topk: Optional[tuple[Tensor, Tensor]] = None,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t_squared: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    topk_tail: str = "bucket",
    vocab: str = "error",
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    return_parts: bool = False,
) -> Union[Tensor, tuple[Tensor, dict[str, Tensor]]]:
    """Distillation loss of a language model from its last hidden states and lm_head, never forming the
    (tokens x vocab) logits (docs/lm.md).

    Per token, with z = scale * (h W^T + b), softcapped (c tanh(z / c)) then divided by T on each side,
    p = softmax(teacher), q = softmax(student)::

        loss = kd_weight * [T^2] * reduce(D(p, q)) + ce_weight * reduce(CE(student logits, labels))

    Args:
        student_hidden: ``(..., H)`` student hidden states (fp32, bf16, fp16 or fp64; any leading dims).
        student_weight: ``(V_s, H)`` the student's lm_head weight; ``student_bias``: optional ``(V_s,)``.
        teacher_hidden, teacher_weight, teacher_bias: the teacher live: ``(..., H_t)`` hidden states of the
            same tokens and its ``(V_t, H_t)`` head. Or ``teacher_logits``: ``(..., V_t)`` dense logits. Or
            ``teacher_topk=(indices, logprobs)``: ``(..., k)`` vocabulary ids and the teacher's
            log-probabilities for them (T = 1, over its full vocabulary), as a top-k cache stores them;
            optionally a third ``(...)`` tensor, the log of the teacher's mass outside the k ids (a cache
            stores it: exact where 1 - sum(exp(logprobs)) of fp16 values is only rounding).
            Exactly one form (none when ``kd_weight=0``). The teacher is a constant: it gets no gradient.
        labels: ``(...)`` next-token ids aligned with ``student_hidden`` (already shifted: the label of
            position i is the token at i + 1); ``ignore_index`` marks tokens that do not count (neither
            in the divergence's mean nor in CE). Without labels every token counts.
        divergence: ``"forward_kl"`` KL(p || q) (default), ``"reverse_kl"`` KL(q || p), ``"jsd"`` with
            ``beta`` exactly as TRL's ``generalized_jsd_loss`` (beta KL(p||m) + (1-beta) KL(q||m),
            m = beta p + (1-beta) q; beta 0 / 1 = forward / reverse KL), ``"skew_forward_kl"`` KL(p || a p
            + (1-a) q) and ``"skew_reverse_kl"`` KL(q || a q + (1-a) p) with ``alpha`` = a (DistiLLM).
        temperature: T > 0, dividing both sides' (softcapped) logits. CE uses T = 1.
        scale_by_t_squared: multiply the divergence by T^2 (Hinton's convention, default True: at
            ``forward_kl`` the loss then equals :func:`mlkd_fast.functional.kd_kl_div` on the logits with
            ``batchmean``). TRL and Liger do not scale (set False to match them at T != 1).
        kd_weight, ce_weight: the weights of the divergence and of the hard-label CE.
        student_softcap, teacher_softcap: c of a softcap (Gemma's ``final_logit_softcapping``); None: none.
        student_logit_scale, teacher_logit_scale: multiply the logits (Cohere's ``logit_scale``).
        topk_tail: for a top-k teacher, ``"bucket"`` (default): the teacher's mass outside its k ids,
            1 - sum(exp(logprobs)), is one more bucket on both sides (the student's: its probability
            outside those ids), the student's log-probabilities exact over its whole vocabulary;
            ``"renormalize"``: both renormalised over the k ids. T != 1 re-tempers the stored
            log-probabilities over the stored buckets only (an approximation; T = 1 is exact).
        vocab: ``"error"`` (default): V_s != V_t is an error naming both sizes; ``"shared"``: the
            divergence covers the first min(V_s, V_t) ids on both sides (padding ids never receive
            probability); CE covers the student's whole vocabulary.
        reduction: ``"mean"`` over the counted tokens (default), ``"sum"``, or ``"none"`` (per token,
            shape ``(...)``, 0 at ignored tokens).
        chunk_size: tokens per chunk; None: from a memory budget (:func:`default_chunk_size`).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` (the row math as a Triton kernel) or ``"native"``
            (not yet implemented for this op: an error says so).
        return_parts: also return ``{"kd", "ce", "total", "tokens"}`` (detached, reduced as the loss).

    Returns:
        The loss (a scalar in fp32, fp64 when an input is fp64; per token for ``"none"``), and the parts
        when asked. The gradients reach ``student_hidden``, ``student_weight`` and ``student_bias``
        (those that require grad); they are computed in the forward, chunk by chunk.
    """
    reduction = _choice(reduction, "reduction", LM_REDUCTIONS)
    ce_weight = check.real(ce_weight, "ce_weight")
    if ce_weight != 0.0 and labels is None:
        raise ValueError("ce_weight != 0 needs labels")
    p = _prepare(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                 teacher_logits, teacher_topk, labels, ignore_index, divergence, beta, alpha, temperature,
                 scale_by_t_squared, kd_weight, student_softcap, teacher_softcap, student_logit_scale,
                 teacher_logit_scale, vocab, topk_tail, chunk_size, backend)
    counted = p.counted.to(p.math_dtype)
    tokens = counted.sum()
    if reduction == "none":
        args = {"teacher": p.teacher, "labels": p.labels, "scalars": p.scalars, "counted": p.counted,
                "math_dtype": p.math_dtype}
        rows, kd, ce = _PerToken.apply(p.hidden, p.weight, p.bias, args, p.kd_factor, ce_weight)
        loss = rows.reshape(p.lead_shape)
        if not return_parts:
            return loss
        with torch.no_grad():  # the parts of "none" are per-token means, for logging
            scale = 1.0 / tokens.clamp(min=1)
            parts = {"kd": kd.sum() * p.kd_factor * scale, "ce": ce.sum() * ce_weight * scale,
                     "total": rows.detach().sum() * scale, "tokens": tokens}
        return loss, parts
    per_token = counted / tokens.clamp(min=1) if reduction == "mean" else counted
    grad_on = torch.is_grad_enabled()
    flags = (grad_on and p.hidden.requires_grad, grad_on and p.weight.requires_grad,
             grad_on and p.bias is not None and p.bias.requires_grad)
    total, kd, ce, _, _, _ = torch.ops.mlkd_fast_lm.linear_kd(
        p.hidden, p.weight, p.bias, *p.teacher, p.labels, per_token * p.kd_factor, per_token * ce_weight,
        *p.scalars, *flags)
    if not return_parts:
        return total
    with torch.no_grad():
        kd_part = (per_token * kd).sum() * p.kd_factor
        ce_part = (per_token * ce).sum() * ce_weight
    return total, {"kd": kd_part, "ce": ce_part, "total": total.detach(), "tokens": tokens}


class LinearKDLoss(nn.Module):
    """:func:`linear_kd_loss` as a module: the options at construction, the tensors at call.

    ``loss = LinearKDLoss(divergence="jsd", temperature=2.0)(h_s, lm_head_s.weight, teacher_hidden=h_t,
    teacher_weight=lm_head_t.weight, labels=labels)``; ``.last`` then holds the detached parts
    ``{"kd", "ce", "total", "tokens"}`` (tensors: reading them is the only host synchronisation)."""

    def __init__(self, *, ignore_index: int = -100, divergence: str = "forward_kl", beta: float = 0.5,
                 alpha: float = 0.1, temperature: float = 1.0, scale_by_t_squared: bool = True,
                 kd_weight: float = 1.0, ce_weight: float = 0.0, student_softcap: Optional[float] = None,
                 teacher_softcap: Optional[float] = None, student_logit_scale: float = 1.0,
                 teacher_logit_scale: float = 1.0, topk_tail: str = "bucket", vocab: str = "error",
                 reduction: str = "mean", chunk_size: Optional[int] = None, backend: str = "auto") -> None:
        super().__init__()
        self.options = dict(ignore_index=ignore_index, divergence=_choice(divergence, "divergence", DIVERGENCES),
                            beta=beta, alpha=alpha, temperature=check.real(temperature, "temperature", positive=True),
                            scale_by_t_squared=scale_by_t_squared, kd_weight=check.real(kd_weight, "kd_weight"),
                            ce_weight=check.real(ce_weight, "ce_weight"), student_softcap=student_softcap,
                            teacher_softcap=teacher_softcap, student_logit_scale=student_logit_scale,
                            teacher_logit_scale=teacher_logit_scale, topk_tail=_choice(topk_tail, "topk_tail", TOPK_TAILS),
                            vocab=_choice(vocab, "vocab", VOCAB_POLICIES),
                            reduction=_choice(reduction, "reduction", LM_REDUCTIONS), chunk_size=chunk_size,
                            backend=_choice(backend, "backend", LM_BACKENDS))
        self.last: dict[str, Tensor] = {}

    def forward(self, student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor] = None, *,
                teacher_hidden: Optional[Tensor] = None, teacher_weight: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None, teacher_logits: Optional[Tensor] = None,
                teacher_topk: Optional[tuple[Tensor, Tensor]] = None, labels: Optional[Tensor] = None) -> Tensor:
        loss, self.last = linear_kd_loss(
            student_hidden, student_weight, student_bias=student_bias, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, teacher_bias=teacher_bias, teacher_logits=teacher_logits,
            teacher_topk=teacher_topk, labels=labels, return_parts=True, **self.options)
        return loss

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k in ("divergence", "temperature",
                                                                                 "kd_weight", "ce_weight", "reduction"))
