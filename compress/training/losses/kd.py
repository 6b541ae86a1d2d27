"""Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531).

    soft = T^2 * KL(softmax(t/T) || softmax(s/T))        (batch mean)
    loss = alpha * soft + (1 - alpha) * CE(s, y)          (beta unset)
    loss = (alpha * soft + beta * CE(s, y)) / (alpha + beta)   (beta set)

The T^2 factor keeps the soft term's gradient magnitude independent of T (section 2 of the
paper), so alpha means the same thing at every temperature. The soft term applies to every
image, labeled or not; the cross-entropy only to labeled ones (see :func:`hard_ce`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress.training.loss_params import KDParams
from compress.training.losses.base import DistillBatch, DistillLoss, LossOutput, hard_ce


def soft_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    The caller detaches the teacher's logits when the teacher must not learn.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


class HintonKD(DistillLoss):
    """Soft teacher targets at temperature T mixed with the hard-label cross-entropy.

    Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network",
    arXiv:1503.02531. ``alpha * T^2 KL(p_t^T || p_s^T) + (1 - alpha) * CE`` or, with ``beta``,
    ``(alpha * T^2 KL + beta * CE) / (alpha + beta)``.

    Example:
        >>> loss = HintonKD(KDParams(temperature=4, alpha=0.9))
        >>> out = loss(DistillBatch(student_logits, teacher_logits, labels))
        >>> out.total.backward()
    """

    def __init__(self, params: KDParams):
        super().__init__()
        self.params = params

    def forward(self, batch: DistillBatch) -> LossOutput:
        p = self.params
        soft = soft_kl(batch.student_logits, batch.teacher_logits.detach(), p.temperature)
        hard = hard_ce(batch.student_logits, batch)
        if p.beta is None:
            total = p.alpha * soft + (1 - p.alpha) * hard
        else:
            total = (p.alpha * soft + p.beta * hard) / (p.alpha + p.beta)
        return LossOutput(total, {"kd": soft.detach(), "ce": hard.detach()})
