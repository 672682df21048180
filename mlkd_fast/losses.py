"""``nn.Module`` losses: a thin layer over the fused ops (:mod:`mlkd_fast.fused`) (docs/design.md §1.3, §2)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import _checks as check
from . import fused as MF
from . import terms

__all__ = ["KDLoss", "CorrelationLoss", "MLKDLoss", "PAPER_WEIGHTS"]


class KDLoss(nn.Module):
    """Temperature KL on logits (docs/design.md §1.1); see :func:`mlkd_fast.functional.kd_kl_div`."""

    def __init__(self, temperature: float = 4.0, reduction: str = "batchmean", backend: str = "auto") -> None:
        super().__init__()
        check.positive(temperature, "temperature")
        check.reduction(reduction)
        self.temperature = float(temperature)
        self.reduction = reduction
        self.backend = backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, row_mask: Optional[Tensor] = None) -> Tensor:
        return MF.kd_kl_div(student_logits, teacher_logits, self.temperature, self.reduction, row_mask, self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}"


class CorrelationLoss(nn.Module):
    """Batch-correlation KL (docs/design.md §1.2); see :func:`mlkd_fast.functional.correlation_kl`."""

    def __init__(
        self,
        tau: float = 0.5,
        reduction: str = "batchmean",
        keep_diagonal: bool = False,
        scale_by_tau_sq: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check.positive(tau, "tau")
        check.reduction(reduction)
        self.tau = float(tau)
        self.reduction = reduction
        self.keep_diagonal = keep_diagonal
        self.scale_by_tau_sq = scale_by_tau_sq
        self.backend = backend

    def forward(
        self,
        student_feats: Tensor,
        teacher_feats: Tensor,
        student_cols: Optional[Tensor] = None,
        teacher_cols: Optional[Tensor] = None,
        cols_start_with_rows: bool = False,
    ) -> Tensor:
        return MF.correlation_kl(
            student_feats, teacher_feats, student_cols, teacher_cols, self.tau, self.reduction,
            self.keep_diagonal, self.scale_by_tau_sq, self.backend, cols_start_with_rows,
        )

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, reduction={self.reduction!r}, keep_diagonal={self.keep_diagonal}, "
                f"scale_by_tau_sq={self.scale_by_tau_sq}, backend={self.backend!r}")


def _mlp(dims: list[int]) -> nn.Sequential:
    """Linear -> BN -> ReLU between every pair of dims, plain Linear at the end."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


# The weights of the authors' released code (docs/design.md §1.3): CE, KD, correlation, alignment, SupCon.
PAPER_WEIGHTS = {
    "cifar100": dict(w_ce=1.0, w_kd=0.0, w_corr=50.0, w_align=20.0, w_supcon=1.0),
    "imagenet": dict(w_ce=1.0, w_kd=0.0, w_corr=20.0, w_align=10.0, w_supcon=0.5),
}


class MLKDLoss(nn.Module):
    """The Multi-level KD objective (docs/design.md §1.3) as one drop-in loss.

    ``total = w_ce CE(s, y) + w_kd KL_T(s, t) + w_corr Corr_tau(f_s, f_t)
    + w_align (2 - 2 cos(h(f_s), f_t)) + w_supcon SupCon([g_s(f_s); g_t(f_t)], y)``

    The projection heads (``align_head`` = h, ``supcon_student`` / ``supcon_teacher`` = g_s / g_t,
    ``corr_head``) are parameters of this module: add ``loss_fn.parameters()`` to the optimiser.

    Args:
        student_dim, teacher_dim: feature widths Ds, Dt; needed only by the heads (alignment,
            SupCon, ``corr_head``). When given, every call checks the features' widths against them.
        temperature: KD temperature T. tau: correlation temperature.
        w_ce, w_kd, w_corr, w_align, w_supcon: term weights; a term of weight 0 is skipped and its
            inputs may be None.
        views: views per image in the batch. With ``views > 1`` the batch is view-major: rows
            ``[0, B)`` are the plain views and rows ``[B, views * B)`` the augmented ones (e.g. the
            90/180/270 degree rotations). CE then uses the plain views only and the correlation is
            rectangular: rows = augmented views, columns = plain views. ``target`` has B labels.
        corr_head: pass the student features through an MLP Ds -> Ds -> Ds before the correlation.
        keep_diagonal, scale_by_tau_sq: correlation options (square mode), see
            :func:`mlkd_fast.functional.correlation_kl`.
        supcon_dim, supcon_temperature: SupCon embedding width and temperature.
        backend: backend of the fused terms (KD and correlation).
        correlation_gather: makes the correlation span a batch larger than this process's, e.g.
            the global batch under DDP with a differentiable all-gather
            (:func:`mlkd_fast.train.distributed.gather_with_grad`). It maps this process's student
            or teacher features (M, D) to the whole batch's (N, D) **with this process's rows
            first**. Only the columns are gathered: each process computes its own M rows against
            all N columns (1/world of the global matrix), so the ``corr`` term is the mean over its
            rows; its mean over the processes is the global-batch loss, and DDP's gradient
            averaging gives the global-batch gradient.
        supcon_gather: the same for SupCon (e.g. the same ``gather_with_grad``): this process's
            stacked embeddings ``[g_s(f_s); g_t(f_t)]`` are the anchors, contrasted with every
            process's (the callable also maps the labels, (2M,) -> (2N,), this process's first).
            Each anchor has a positive (the other network's embedding of its image), so every
            process's ``supcon`` term is the mean over its 2M anchors and, with equal shards, their
            mean over the processes is the global-batch loss. Without it the anchors' positives and
            negatives are this process's batch only.

    ``ce`` is computed in the logits' dtype when that is fp64, in fp32 otherwise.

    After each call, ``loss_fn.last`` holds the detached, unweighted components
    (``{"ce": ..., "kd": ..., "corr": ..., "align": ..., "supcon": ..., "total": ...}``) for logging.
    """

    def __init__(
        self,
        student_dim: Optional[int] = None,
        teacher_dim: Optional[int] = None,
        temperature: float = 4.0,
        tau: float = 0.5,
        w_ce: float = 1.0,
        w_kd: float = 1.0,
        w_corr: float = 1.0,
        w_align: float = 0.0,
        w_supcon: float = 0.0,
        views: int = 1,
        corr_head: bool = False,
        keep_diagonal: bool = False,
        scale_by_tau_sq: bool = False,
        supcon_dim: int = 128,
        supcon_temperature: float = 0.07,
        backend: str = "auto",
        correlation_gather: Optional[Callable[[Tensor], Tensor]] = None,
        supcon_gather: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        super().__init__()
        self.correlation_gather = correlation_gather
        self.supcon_gather = supcon_gather
        self.temperature = check.positive(temperature, "temperature")
        self.tau = check.positive(tau, "tau")
        self.supcon_temperature = check.positive(supcon_temperature, "supcon_temperature")
        self.weights = {"ce": float(w_ce), "kd": float(w_kd), "corr": float(w_corr),
                        "align": float(w_align), "supcon": float(w_supcon)}
        for name, w in self.weights.items():
            if not w >= 0:
                raise ValueError(f"w_{name} must be >= 0, got {w}")
        if not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be a positive int, got {views!r}")
        self.views = views
        self.keep_diagonal = keep_diagonal
        self.scale_by_tau_sq = scale_by_tau_sq
        self.backend = backend

        for name, dim in (("student_dim", student_dim), ("teacher_dim", teacher_dim), ("supcon_dim", supcon_dim)):
            if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
                raise ValueError(f"{name} must be a positive int (a feature width), got {dim!r}")
        needs_dims = [n for n, on in (("w_align", w_align > 0), ("w_supcon", w_supcon > 0), ("corr_head", corr_head)) if on]
        if needs_dims and (student_dim is None or teacher_dim is None):
            raise ValueError(f"student_dim and teacher_dim are required for {', '.join(needs_dims)} (their heads)")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.align_head = _mlp([student_dim, 16 * teacher_dim, teacher_dim]) if w_align > 0 else None
        self.supcon_student = nn.Linear(student_dim, supcon_dim) if w_supcon > 0 else None
        self.supcon_teacher = nn.Linear(teacher_dim, supcon_dim) if w_supcon > 0 else None
        self.corr_head = _mlp([student_dim, student_dim, student_dim]) if corr_head else None
        self.last: dict[str, Tensor] = {}

    @classmethod
    def paper(cls, dataset: str, student_dim: int, teacher_dim: int, **overrides) -> "MLKDLoss":
        """The authors' released recipe: 4 rotation views, rectangular correlation with a student
        MLP head (no diagonal mask, no tau^2), alignment and SupCon heads, their weights for
        ``"cifar100"`` or ``"imagenet"``. Keyword ``overrides`` replace any constructor argument."""
        if dataset not in PAPER_WEIGHTS:
            raise ValueError(f"dataset must be one of {', '.join(map(repr, PAPER_WEIGHTS))}; got {dataset!r}")
        kwargs = dict(PAPER_WEIGHTS[dataset], temperature=4.0, tau=0.5, views=4, corr_head=True)
        kwargs.update(overrides)
        return cls(student_dim=student_dim, teacher_dim=teacher_dim, **kwargs)

    def _plain(self, x: Tensor, name: str) -> Tensor:
        """The plain (first-view) rows of a view-major batch."""
        if x.shape[0] % self.views:
            raise ValueError(f"{name} has {x.shape[0]} rows, not a multiple of views={self.views}")
        return x[: x.shape[0] // self.views]

    def forward(
        self,
        student_logits: Optional[Tensor] = None,
        teacher_logits: Optional[Tensor] = None,
        student_feats: Optional[Tensor] = None,
        teacher_feats: Optional[Tensor] = None,
        target: Optional[Tensor] = None,
    ) -> Tensor:
        w = self.weights
        required = {
            "student_logits": w["ce"] > 0 or w["kd"] > 0,
            "teacher_logits": w["kd"] > 0,
            "student_feats": w["corr"] > 0 or w["align"] > 0 or w["supcon"] > 0,
            "teacher_feats": w["corr"] > 0 or w["align"] > 0 or w["supcon"] > 0,
            "target": w["ce"] > 0 or w["supcon"] > 0,
        }
        given = {"student_logits": student_logits, "teacher_logits": teacher_logits,
                 "student_feats": student_feats, "teacher_feats": teacher_feats, "target": target}
        for name, needed in required.items():
            if needed and given[name] is None:
                raise ValueError(f"{name} is required by the nonzero weights {self._weights_str()}")
        self._check_shapes(given)

        parts: dict[str, Tensor] = {}
        weighted: dict[str, Tensor] = {}
        if w["ce"] > 0:
            parts["ce"] = terms.cross_entropy(self._plain(student_logits, "student_logits"), target)
        if w["kd"] > 0:
            # weighted inside: the fused backends fold w_kd into their stored gradient
            weighted["kd"] = MF.kd_kl_div(student_logits, teacher_logits.detach(), self.temperature,
                                          "batchmean", backend=self.backend, weight=w["kd"])
        if w["corr"] > 0:
            parts["corr"] = self._correlation(student_feats, teacher_feats)
        if w["align"] > 0:
            parts["align"] = terms.feature_alignment(self.align_head(student_feats), teacher_feats.detach())
        if w["supcon"] > 0:
            emb = torch.cat([self.supcon_student(student_feats), self.supcon_teacher(teacher_feats.detach())])
            labels = target.repeat(2 * self.views)
            gather = self.supcon_gather
            if gather is None:
                parts["supcon"] = terms.supcon_loss(emb, labels, self.supcon_temperature)
            else:
                parts["supcon"] = terms.supcon_loss(emb, labels, self.supcon_temperature,
                                                        gather(emb), gather(labels))

        if not parts and not weighted:
            raise ValueError("every weight is 0: MLKDLoss has nothing to compute")
        total = sum(w[k] * v for k, v in parts.items()) + sum(weighted.values())
        self.last = {k: v.detach() for k, v in parts.items()}
        self.last.update({k: v.detach() / w[k] for k, v in weighted.items()})
        self.last["total"] = total.detach()
        return total

    def _check_shapes(self, given: dict[str, Optional[Tensor]]) -> None:
        """The declared feature widths, and one batch for all inputs: every logits and features tensor
        has the same rows (``views`` x the images), ``target`` one label per image. The terms would
        otherwise run on mismatched batches without a word (a correlation takes any width)."""
        for name, dim_name, dim in (("student_feats", "student_dim", self.student_dim),
                                    ("teacher_feats", "teacher_dim", self.teacher_dim)):
            x = given[name]
            if dim is not None and isinstance(x, Tensor) and x.ndim == 2 and x.shape[1] != dim:
                raise ValueError(f"{name} has {x.shape[1]} features per row but {dim_name}={dim}")
        rows = {n: x.shape[0] for n, x in given.items() if n != "target" and isinstance(x, Tensor) and x.ndim >= 1}
        if rows:
            first, count = next(iter(rows.items()))
            for name, n in rows.items():
                if n != count:
                    raise ValueError(f"{name} has {n} rows but {first} has {count}: the logits and features "
                                     f"must come from one batch")
            target = given["target"]
            if isinstance(target, Tensor) and target.ndim >= 1 and target.shape[0] * self.views != count:
                per = "row" if self.views == 1 else f"image, and {first} holds views={self.views} rows per image"
                raise ValueError(f"target has {target.shape[0]} labels but {first} has {count} rows: one label per {per}")

    def _correlation(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        f_s = self.corr_head(student_feats) if self.corr_head is not None else student_feats
        f_t = teacher_feats.detach()
        options = dict(tau=self.tau, scale_by_tau_sq=self.scale_by_tau_sq, backend=self.backend)
        gather = self.correlation_gather
        if self.views == 1:
            if gather is None:
                return MF.correlation_kl(f_s, f_t, keep_diagonal=self.keep_diagonal, **options)
            # this process's rows against the whole batch, which starts with them: row i leaves out column i
            return MF.correlation_kl(f_s, f_t, gather(f_s), gather(f_t), keep_diagonal=self.keep_diagonal,
                                     cols_start_with_rows=True, **options)
        plain = self._plain(f_s, "student_feats").shape[0]
        cols_s, cols_t = f_s[:plain], f_t[:plain]
        if gather is not None:
            cols_s, cols_t = gather(cols_s), gather(cols_t)
        return MF.correlation_kl(f_s[plain:], f_t[plain:], cols_s, cols_t, **options)

    def _weights_str(self) -> str:
        return ", ".join(f"w_{k}={v:g}" for k, v in self.weights.items() if v > 0)

    def extra_repr(self) -> str:
        return (f"{self._weights_str()}, temperature={self.temperature}, tau={self.tau}, "
                f"views={self.views}, backend={self.backend!r}")


def mlkd_loss(student_logits: Tensor, teacher_logits: Tensor, student_feats: Tensor, teacher_feats: Tensor,
              target: Tensor, temperature: float = 4.0, tau: float = 0.5, w_ce: float = 1.0, w_kd: float = 1.0,
              w_corr: float = 1.0, keep_diagonal: bool = False, scale_by_tau_sq: bool = False,
              backend: str = "auto") -> Tensor:
    """The MLKD objective without trainable heads as a function:
    ``w_ce CE(s, y) + w_kd KL_T(s, t) + w_corr Corr_tau(f_s, f_t)`` on one view per image, exactly
    what :class:`MLKDLoss` computes with the same arguments (the alignment and SupCon terms and the
    rotation views need its heads: use the module)."""
    loss_fn = MLKDLoss(temperature=temperature, tau=tau, w_ce=w_ce, w_kd=w_kd, w_corr=w_corr,
                       keep_diagonal=keep_diagonal, scale_by_tau_sq=scale_by_tau_sq, backend=backend)
    return loss_fn(student_logits, teacher_logits, student_feats, teacher_feats, target)
