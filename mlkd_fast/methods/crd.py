"""CRD (Tian et al., Contrastive Representation Distillation, ICLR 2020): contrastive learning of the
teacher's representation, against a memory bank of the dataset or within the batch."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks as check
from ..ops import math_dtype
from ._common import Embed, PooledFeatures
from .base import ModelSpec, Needs
from .registry import register

__all__ = ["CRDMemory", "crd_sample_indices", "crd_loss", "crd_inbatch_loss", "CRD"]

_NCE_EPS = 1e-7  # RepDistiller's ContrastLoss epsilon


def _check_index_range(index: Tensor, num_data: int, name: str = "index") -> None:
    """Refuses dataset indices outside ``[0, num_data)`` with a ValueError naming both (an
    ``index_select`` would fail with a bare IndexError on CPU, a device-side assert on CUDA). One
    read of the batch's min and max; skipped while ``torch.compile`` traces (no data-dependent branch)."""
    if index.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = torch.aminmax(index)
    low, high = int(low), int(high)
    if low < 0 or high >= num_data:
        bad = high if high >= num_data else low
        raise ValueError(f"{name} holds the dataset index {bad}, outside the memory bank's num_data = {num_data} "
                         f"entries (0..{num_data - 1}): pass each sample's index in the training set, and "
                         f"num_data = the training set's size")



class CRDMemory(nn.Module):
    """CRD's memory bank: one L2-normalised embedding per training sample for each network.

    Buffers (in ``state_dict``, moved by ``.to``): ``memory_s`` and ``memory_t`` of shape
    ``(num_data, dim)``, initialised uniformly in ``[-1/sqrt(dim/3), 1/sqrt(dim/3)]`` as RepDistiller
    does; ``z_s`` and ``z_t``, the NCE normalisation constants, -1 until :func:`crd_loss` sets them
    from its first batch (``mean(exp(score / tau)) * num_data``, RepDistiller's rule) and fixed after.
    ``momentum`` (0.5, RepDistiller's ``nce_m``) is the weight of the old entry in :meth:`update`.
    The bank knows nothing of processes: under data parallelism the CRD distiller writes the global
    batch into every process's bank, which keeps them equal.
    """

    def __init__(self, num_data: int, dim: int = 128, momentum: float = 0.5,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        for value, name in ((num_data, "num_data"), (dim, "dim")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        momentum = check.real(momentum, "momentum")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_data, self.dim, self.momentum = num_data, dim, momentum
        bound = 1.0 / math.sqrt(dim / 3.0)
        for name in ("memory_s", "memory_t"):
            bank = torch.rand(num_data, dim, generator=generator) * (2 * bound) - bound
            self.register_buffer(name, bank)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))

    def _check(self, indices: Tensor, emb: Tensor, name: str) -> None:
        check.float_tensor(emb, name)
        check.ndim(emb, name, 2, f"(B, {self.dim})")
        if emb.shape[1] != self.dim:
            raise ValueError(f"{name} must have the bank's width {self.dim}, got {emb.shape[1]}")
        if emb.shape[0] != indices.shape[0]:
            raise ValueError(f"{name} has {emb.shape[0]} rows but indices has {indices.shape[0]}")
        if emb.device != self.memory_s.device:
            raise ValueError(f"{name} is on {emb.device} but the memory bank is on {self.memory_s.device}")

    @torch.no_grad()
    def update(self, indices: Tensor, emb_s: Tensor, emb_t: Tensor, *, check_range: bool = True) -> None:
        """``bank[i] = normalize(momentum * bank[i] + (1 - momentum) * emb)`` for both banks at the
        batch's dataset ``indices`` (``(B,)`` integers in ``[0, num_data)``, else a ValueError naming
        the index). The embeddings are L2-normalised first, as the CRD heads output them (a no-op for
        normalised ones). Duplicate indices: one of the rows wins. ``check_range=False`` skips the
        range check (a host read) for indices already checked, as :func:`crd_loss` does."""
        if not isinstance(indices, Tensor) or indices.ndim != 1:
            got = getattr(indices, "shape", type(indices))
            raise ValueError(f"indices must be a (B,) tensor of dataset indices, got {got}")
        indices = check.labels(indices, indices.shape[0], "indices")
        if check_range:
            _check_index_range(indices, self.num_data, "indices")
        for bank, emb, name in ((self.memory_s, emb_s, "emb_s"), (self.memory_t, emb_t, "emb_t")):
            self._check(indices, emb, name)
            emb = F.normalize(emb.detach().to(bank.dtype), p=2.0, dim=1)
            mixed = bank.index_select(0, indices) * self.momentum + emb * (1.0 - self.momentum)
            bank.index_copy_(0, indices, F.normalize(mixed, p=2.0, dim=1))

    def extra_repr(self) -> str:
        return f"num_data={self.num_data}, dim={self.dim}, momentum={self.momentum}"


def crd_sample_indices(index: Tensor, num_data: int, k: int = 16384, generator: Optional[torch.Generator] = None, *,
                       target: Optional[Tensor] = None, data_labels: Optional[Tensor] = None) -> Tensor:
    """Contrast indices for :func:`crd_loss`: ``(B, k + 1)`` longs, column 0 the positive (``index``,
    the samples' own dataset indices), columns 1.. ``k`` negatives drawn uniformly with replacement.

    Without labels the negatives are uniform over the whole dataset (RepDistiller's in-memory
    sampler). With ``target`` (``(B,)`` labels of the batch) and ``data_labels`` (``(num_data,)``
    labels of the dataset) they are uniform over the samples of the other classes, like
    RepDistiller's CIFAR-100 "exact" mode (which draws without replacement when it can; with
    ``k = 16384`` of ~49500 candidates the difference is small). ``generator`` lives on the device of
    ``index`` and makes the draw reproducible.
    """
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
        raise ValueError(f"num_data must be a positive int, got {num_data!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(index, Tensor) or index.ndim != 1:
        raise ValueError(f"index must be a (B,) tensor of dataset indices, got {getattr(index, 'shape', type(index))}")
    index = check.labels(index, index.shape[0], "index")
    _check_index_range(index, num_data)
    b, device = index.shape[0], index.device
    if (target is None) != (data_labels is None):
        raise ValueError("target and data_labels must be given together (class-aware negatives) or not at all")
    if target is None:
        negatives = torch.randint(0, num_data, (b, k), generator=generator, device=device)
    else:
        target = check.labels(target, b, "target")
        data_labels = check.labels(data_labels, num_data, "data_labels")
        order = torch.argsort(data_labels, stable=True)
        num_classes = int(torch.maximum(data_labels.max(), target.max())) + 1
        counts = torch.bincount(data_labels, minlength=num_classes)
        starts = torch.cumsum(counts, 0) - counts
        own_start, own_count = starts[target][:, None], counts[target][:, None]
        if bool((own_count >= num_data).any()):
            raise ValueError("data_labels has no sample outside some batch sample's class: no negatives to draw")
        # Uniform position among the other classes' samples: skip over the own class's block of the
        # label-sorted order.
        u = torch.rand((b, k), generator=generator, device=device, dtype=torch.float64)
        pos = (u * (num_data - own_count)).long().clamp_max(num_data - own_count - 1).clamp_min(0)
        pos = torch.where(pos >= own_start, pos + own_count, pos)
        negatives = order[pos]
    return torch.cat((index[:, None], negatives), dim=1)


def _nce_loss(scores: Tensor, num_data: int) -> Tensor:
    """RepDistiller's ContrastLoss (the CRD paper's eq. 18): column 0 the positive, the others the
    ``m`` noise samples of probability ``Pn = 1 / num_data``;
    ``-(sum log(P_pos / (P_pos + m Pn + eps)) + sum log(m Pn / (P_neg + m Pn + eps))) / B``."""
    b, m = scores.shape[0], scores.shape[1] - 1
    noise = m / num_data
    log_d1 = torch.log(scores[:, 0] / (scores[:, 0] + noise + _NCE_EPS))
    log_d0 = torch.log(noise / (scores[:, 1:] + noise + _NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / b


def crd_loss(emb_s: Tensor, emb_t: Tensor, index: Tensor, memory: CRDMemory, contrast_idx: Optional[Tensor] = None, *,
             tau: float = 0.07, k: int = 16384, generator: Optional[torch.Generator] = None,
             update: bool = True) -> Tensor:
    """CRD's symmetric NCE loss against the memory bank (RepDistiller's ``CRDLoss``, after the heads).

    ``emb_s`` / ``emb_t``: ``(B, dim)`` embeddings of the two heads (RepDistiller: Linear to 128,
    L2 norm; both trainable); they are L2-normalised here again, which changes neither a normalised
    value nor the gradient reaching the head. For each sample, the teacher embedding is scored
    against the student bank's entries ``contrast_idx`` (column 0 its own, then the negatives) and
    the student embedding against the teacher bank's: ``P = exp(e . m / tau) / Z``, with ``Z`` set
    once from the first batch (see :class:`CRDMemory`). The loss is the sum of the two NCE terms
    (:func:`_nce_loss`); the banks enter as constants. Then, if ``update``, the banks take the
    batch's embeddings (:meth:`CRDMemory.update`) after the scores are computed, as in RepDistiller.

    Defaults: ``tau = 0.07``, ``k = 16384`` negatives (RepDistiller's ``nce_t``, ``nce_k``); the loss
    weight 0.8 is the caller's. Without ``contrast_idx`` the indices come from
    :func:`crd_sample_indices` with ``generator`` (uniform negatives). ``index``: ``(B,)`` dataset
    indices of the batch.
    """
    if not isinstance(memory, CRDMemory):
        raise TypeError(f"memory must be a CRDMemory, got {type(memory).__name__}")
    s, t = check.embeddings(emb_s, emb_t, "emb_s", "emb_t")
    index = check.labels(index, s.shape[0], "index")
    memory._check(index, s, "emb_s")
    memory._check(index, t, "emb_t")
    tau = check.real(tau, "tau", positive=True)
    if contrast_idx is None:  # the sampler checks that index is in [0, num_data)
        contrast_idx = crd_sample_indices(index, memory.num_data, k, generator)
    elif (not isinstance(contrast_idx, Tensor) or contrast_idx.ndim != 2 or contrast_idx.shape[0] != s.shape[0]
          or contrast_idx.shape[1] < 2 or contrast_idx.is_floating_point()):
        got = tuple(contrast_idx.shape) if isinstance(contrast_idx, Tensor) else type(contrast_idx).__name__
        raise ValueError(f"contrast_idx must be a (B, 1 + K) integer tensor with B = {s.shape[0]}, K >= 1, got {got}")
    else:
        _check_index_range(index, memory.num_data)
        _check_index_range(contrast_idx, memory.num_data, "contrast_idx")
    contrast_idx = contrast_idx.long()
    dtype = math_dtype(s, t)
    e_s = F.normalize(s.to(dtype), p=2.0, dim=1)
    e_t = F.normalize(t.to(dtype), p=2.0, dim=1)
    b, cols = contrast_idx.shape

    def exp_scores(bank: Tensor, anchor: Tensor) -> Tensor:
        rows = bank.index_select(0, contrast_idx.reshape(-1)).to(dtype).reshape(b, cols, -1)
        return torch.exp(torch.bmm(rows, anchor[:, :, None]).squeeze(2) / tau)

    out_t = exp_scores(memory.memory_s, e_t)  # teacher anchor against the student bank
    out_s = exp_scores(memory.memory_t, e_s)  # student anchor against the teacher bank
    with torch.no_grad():
        # Set once, on the device and without a host read: -1 means "not set yet".
        for z, out in ((memory.z_s, out_s), (memory.z_t, out_t)):
            z.copy_(torch.where(z < 0, out.mean().to(z.dtype) * memory.num_data, z))
    # copies: the graph must not hold the buffers that a later call writes in place
    z_s, z_t = memory.z_s.to(dtype).clone(), memory.z_t.to(dtype).clone()
    loss = _nce_loss(out_s / z_s, memory.num_data) + _nce_loss(out_t / z_t, memory.num_data)
    if update:
        memory.update(index, e_s, e_t, check_range=False)
    return loss.to(check.out_dtype(s, t))


def crd_inbatch_loss(emb_s: Tensor, emb_t: Tensor, tau: float = 0.07) -> Tensor:
    """CRD without a memory bank: symmetric InfoNCE over the batch.

    With ``S = normalize(emb_s) normalize(emb_t)^T / tau`` (``(B, B)``), the loss is the mean of the
    cross-entropies of the rows (student anchors, the teacher's own sample positive, the other
    samples negatives) and of the columns (teacher anchors), each a mean over the batch.
    ``emb_s`` / ``emb_t``: ``(B, D)``, same D. ``tau = 0.07`` as CRD. A batch of one sample gives
    exactly 0 (there are no negatives).
    """
    s, t = check.embeddings(emb_s, emb_t, "emb_s", "emb_t")
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"emb_s and emb_t must have the same width to be compared: {s.shape[1]} vs {t.shape[1]}")
    tau = check.real(tau, "tau", positive=True)
    dtype = math_dtype(s, t)
    b = s.shape[0]
    if b == 1:
        return check.zero_loss((s, t), dtype).to(check.out_dtype(s, t))
    logits = F.normalize(s.to(dtype), p=2.0, dim=1) @ F.normalize(t.to(dtype), p=2.0, dim=1).T / tau
    labels = torch.arange(b, device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss.to(check.out_dtype(s, t))


@register("crd")
class CRD(PooledFeatures):
    """128-d heads, tau 0.07, weight 0.8. ``negatives="bank"`` (default) draws K = 16384 negatives per
    sample from a memory bank of the dataset's size (momentum 0.5): it needs ``num_data`` (the
    training set's size; the loop passes it) and every batch's dataset ``index``.
    ``negatives="batch"`` contrasts within the batch (symmetric InfoNCE), with no bank and no
    indices. Under DDP every process scores its own samples against its bank and then writes the
    global batch's embeddings into it (the ``bank`` gather hook, set by the loop in every
    multi-process run), so the banks of all processes stay identical."""

    source = "Tian et al., ICLR 2020; RepDistiller (-b 0.8, nce_k 16384, nce_t 0.07, nce_m 0.5)"
    family = "relations"
    gather_hooks = {"bank": True}
    data_options = {"num_data": "num_samples"}
    functions = (CRDMemory, crd_sample_indices, crd_loss, crd_inbatch_loss)
    main_weight = "w_crd"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_crd: float = 0.8,
                 embed_dim: int = 128, tau: float = 0.07, negatives: str = "bank", num_data: Optional[int] = None,
                 num_negatives: int = 16384, momentum: float = 0.5) -> None:
        super().__init__(student, teacher, w_ce)
        if negatives not in ("bank", "batch"):
            raise ValueError(f"method 'crd': negatives must be 'bank' or 'batch', got {negatives!r}")
        self.w_crd, self.tau, self.negatives = float(w_crd), float(tau), negatives
        self.embed_s = Embed(student.feature_dim, embed_dim)
        self.embed_t = Embed(teacher.feature_dim, embed_dim)
        self.memory: Optional[CRDMemory] = None
        # under data parallelism: maps this process's (B, ...) rows to the global batch's
        self.gather: Optional[Callable[[Tensor], Tensor]] = None
        if negatives == "bank":
            if num_data is None:
                raise ValueError("method 'crd' keeps a memory bank of every training sample: it needs num_data "
                                 "(the training set's size), and each batch's dataset indices (index=...) when it "
                                 "runs; data without sample indices (synthetic) needs negatives='batch'")
            # RepDistiller's 16384 negatives presume a large dataset; no more than the other samples here
            self.num_negatives = min(int(num_negatives), int(num_data) - 1)
            self.memory = CRDMemory(int(num_data), embed_dim, momentum=momentum)

    @property
    def needs(self) -> Needs:
        return Needs(feats=True, context=("index",) if self.negatives == "bank" else ())

    def _set_gather(self, hook: str, gather: Optional[Callable[[Tensor], Tensor]]) -> None:
        self.gather = gather

    def loss_terms(self, student, teacher, target, index=None, **context):
        e_s, e_t = self.embed_s(student.feats), self.embed_t(teacher.feats.detach())
        if self.memory is None:
            return {"crd": self.w_crd * crd_inbatch_loss(e_s, e_t, self.tau)}
        # negatives drawn from the global RNG, whose state the loop's checkpoints keep (exact resume)
        loss = crd_loss(e_s, e_t, index, self.memory, tau=self.tau, k=self.num_negatives, update=False)
        m_s, m_t = e_s.detach(), e_t.detach()
        if self.gather is not None:  # every process writes the whole global batch: the banks stay equal
            index, m_s, m_t = self.gather(index), self.gather(m_s), self.gather(m_t)
        self.memory.update(index, m_s, m_t, check_range=False)  # crd_loss checked this process's indices
        return {"crd": self.w_crd * loss}
