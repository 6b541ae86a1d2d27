"""Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531).

loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

The T^2 factor keeps the soft term's gradient magnitude independent of T (section 2 of the
paper), so alpha means the same thing at every temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress.errors import RecipeError
from compress.losses import LossOutput, register_loss


@dataclass(frozen=True)
class KDParams:
    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self):
        if not self.temperature > 0:
            raise RecipeError(f"temperature: expected > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise RecipeError(f"alpha: expected 0..1, got {self.alpha}")


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) averaged over the batch, times T^2."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


@register_loss("kd", KDParams)
class HintonKD(torch.nn.Module):
    """Soft teacher targets at temperature T mixed with the hard-label cross-entropy.

    Example:
        >>> loss = HintonKD(KDParams(temperature=4, alpha=0.9))
        >>> out = loss(student_logits, teacher_logits, labels); out.total.backward()
    """

    def __init__(self, params: KDParams):
        super().__init__()
        self.params = params

    def forward(self, student_logits, teacher_logits, labels) -> LossOutput:
        soft = soft_kl(student_logits, teacher_logits.detach(), self.params.temperature)
        hard = F.cross_entropy(student_logits, labels)
        alpha = self.params.alpha
        total = alpha * soft + (1 - alpha) * hard
        return LossOutput(total, {"kd": soft.detach(), "ce": hard.detach()})
