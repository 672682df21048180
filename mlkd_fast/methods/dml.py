"""DML (Zhang et al., Deep Mutual Learning, CVPR 2018): a cohort of students learning from each
other, no teacher."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from .. import _checks as check
from ..fused import kd_kl_div
from ..terms import cross_entropy
from .base import Distiller, ModelSpec, Needs, Outputs
from .registry import register
from .taps import split_outputs

__all__ = ["dml_loss", "DML"]


def dml_loss(logits_list: Sequence[Tensor], temperature: float = 1.0, *, detach_peers: bool = True,
             backend: str = "auto") -> list[Tensor]:
    """Deep Mutual Learning: for each of K >= 2 students, the mean KL from its peers' predictions.

    Returns a list whose k-th entry is ``1 / (K - 1) * sum_{l != k} T^2 KL(p_l || p_k)``
    (batchmean, on the fused kernels), the term student k adds to its own cross-entropy. The paper
    has no temperature (``T = 1``, the default); with ``T != 1`` the usual ``T^2`` factor applies.

    Peers are detached by default (``detach_peers=True``): term k trains student k only, as in the
    authors' code (each network's optimiser steps on its own variables) and the paper's alternating
    updates. With ``detach_peers=False`` the peers' logits receive gradients too, so summing the
    terms couples the students in one backward. The authors' TensorFlow code sums the K - 1 KL terms
    rather than averaging them (the same for the usual K = 2).

    The KL here is exact. The authors' code computes it from probabilities with the log capped,
    ``sum p_l (log(p_l + 1e-8) - log(p_k + 1e-8))``: a class the student gives probability below
    1e-8 costs at most ``-log 1e-8 = 18.4`` nats per row there, where the exact KL keeps growing
    (docs/design.md, "Where the zoo differs from the reference code on purpose").
    """
    if isinstance(logits_list, Tensor) or not isinstance(logits_list, Sequence):
        raise TypeError(f"logits_list must be a list of K >= 2 logit tensors, got {type(logits_list).__name__}")
    if len(logits_list) < 2:
        raise ValueError(f"logits_list must hold K >= 2 students' logits, got {len(logits_list)}")
    logits = [check.float_tensor(z, f"logits_list[{k}]") for k, z in enumerate(logits_list)]
    for k, z in enumerate(logits):
        check.ndim(z, f"logits_list[{k}]", 2, "(N, C)")
        if k > 0:
            if z.shape != logits[0].shape:
                raise ValueError(f"logits_list[{k}] has shape {tuple(z.shape)} but logits_list[0] has "
                                 f"{tuple(logits[0].shape)}; every student must see the same batch and classes")
            check.batch(logits[0], z, "logits_list[0]", f"logits_list[{k}]")
    if logits[0].shape[0] == 0:
        raise ValueError(f"empty batch: logits_list[0] has shape {tuple(logits[0].shape)}")
    temperature = check.real(temperature, "temperature", positive=True)
    out_dtype = check.out_dtype(*logits)
    peers = [z.detach() for z in logits] if detach_peers else logits
    terms = []
    for k, z in enumerate(logits):
        kls = [kd_kl_div(z, peers[l], temperature, reduction="batchmean", backend=backend)
               for l in range(len(logits)) if l != k]
        terms.append((sum(kls) / len(kls)).to(out_dtype))
    return terms


@register("dml")
class DML(Distiller):
    """A cohort of K >= 2 students trained together, each with CE plus the mean KL from the others'
    (detached) predictions to its own, T 1, weight 1. No teacher. The other K - 1 members are the
    distiller's ``peers`` (:meth:`attach_peers`; :class:`~mlkd_fast.methods.Distillation` takes them as
    ``peers=[...]`` and the loop builds them from the student's architecture): ``forward`` then takes
    the first member's outputs and the batch's ``inputs``. Without peers it takes the list of the
    whole cohort's outputs as ``student``. It returns the sum of the members' losses (each member's
    gradient is exactly that of its own loss); ``.last`` holds ``ce<k>`` and ``dml<k>``."""

    source = "Zhang et al., CVPR 2018"
    family = "cohort"
    needs_teacher = False
    functions = (dml_loss,)
    main_weight = "w_dml"

    def __init__(self, student: ModelSpec, teacher: Optional[ModelSpec] = None, w_ce: float = 1.0,
                 w_dml: float = 1.0, temperature: float = 1.0, cohort: int = 2) -> None:
        super().__init__(student, None, w_ce)
        if isinstance(cohort, bool) or not isinstance(cohort, int) or cohort < 2:
            raise ValueError(f"method 'dml' needs a cohort of at least 2 students, got {cohort!r}")
        self.w_dml, self.temperature, self.cohort = float(w_dml), float(temperature), cohort
        self.peers = nn.ModuleList()

    @property
    def needs(self) -> Needs:
        return Needs(context=("inputs",) if len(self.peers) else (), peers=self.cohort - 1)

    def attach_peers(self, peers: Sequence[nn.Module]) -> None:
        peers = list(peers)
        if len(peers) != self.cohort - 1 or not all(isinstance(p, nn.Module) for p in peers):
            raise ValueError(f"method 'dml' with a cohort of {self.cohort} needs {self.cohort - 1} peer network(s) "
                             f"beside the student, got {len(peers)}")
        self.peers = nn.ModuleList(peers)

    def forward(self, student, teacher=None, target: Optional[Tensor] = None, inputs: Optional[Tensor] = None,
                **context) -> Tensor:
        if isinstance(student, Outputs) and len(self.peers) == self.cohort - 1 and inputs is not None:
            student = [student] + [Outputs(*split_outputs(peer(inputs))) for peer in self.peers]
        if isinstance(student, Outputs) or len(student) != self.cohort:
            raise ValueError(f"method 'dml' takes its {self.cohort} students' outputs: attach {self.cohort - 1} "
                             f"peer(s) (Distillation(..., peers=[...])) and pass the batch's inputs, or pass the "
                             f"list of the cohort's Outputs")
        kl_terms = dml_loss([o.logits for o in student], self.temperature)
        terms: dict[str, Tensor] = {}
        for k, (out, kl) in enumerate(zip(student, kl_terms)):
            if self.w_ce > 0:
                terms[f"ce{k}"] = self.w_ce * cross_entropy(out.logits, target)
            terms[f"dml{k}"] = self.w_dml * kl
        return self._total(terms)
