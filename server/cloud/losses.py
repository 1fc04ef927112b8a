"""The CEMA cloud losses: the teacher's weighted entropy and the student's distillation loss.

Every per-sample weight is `exp(-(E - E_max))` with the entropy `E` detached: samples the
model is confident about count more, which is what keeps entropy minimisation from
reinforcing its own mistakes on uncertain samples (Chen et al., ICLR 2024; EATA before it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy (nats) of softmax(logits); shape (N,)."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def confidence_weights(ent: Tensor, e_max: float) -> Tensor:
    """`exp(-(E - E_max))`, detached: no gradient flows through the weighting."""
    return torch.exp(e_max - ent.detach())


def teacher_entropy_loss(logits: Tensor, e_max: float) -> tuple[Tensor, int]:
    """Weighted entropy over the samples with `E < E_max` (the others count zero); and how many those are.

    Averaged over the whole batch, so a batch with few reliable samples moves the teacher less.
    """
    ent = entropy(logits)
    kept = ent.detach() < e_max
    loss = (confidence_weights(ent, e_max) * kept * ent).mean()
    return loss, int(kept.sum())


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    e_max: float,
    temperature: float,
    entropy_weight: float,
    kl_weight: float,
    ce_weight: float,
) -> tuple[Tensor, dict[str, float]]:
    """`entropy_weight·H_w(s) + kl_weight·T²·KL_w(t‖s at T) + ce_weight·CE_w(s, argmax t)`; s student, t teacher.

    The entropy term is weighted by the student's own confidence; the KL and CE terms by the
    teacher's, so unreliable teacher predictions are distilled less. Returns the loss and its
    three parts (unweighted by the loss weights) for logging.
    """
    teacher_logits = teacher_logits.detach()
    ent = entropy(student_logits)
    ent_term = (confidence_weights(ent, e_max) * ent).mean()
    teacher_w = confidence_weights(entropy(teacher_logits), e_max)
    kl = (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            reduction="none",
            log_target=True,
        ).sum(dim=-1)
        * temperature**2
    )
    kl_term = (teacher_w * kl).mean()
    ce = F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1), reduction="none")
    ce_term = (teacher_w * ce).mean()
    loss = entropy_weight * ent_term + kl_weight * kl_term + ce_weight * ce_term
    parts = {
        name: float(v.detach())
        for name, v in (("entropy", ent_term), ("kl", kl_term), ("ce", ce_term), ("kl_unweighted", kl.mean()))
    }
    return loss, parts
