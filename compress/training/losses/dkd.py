"""Zhao et al. 2022, "Decoupled Knowledge Distillation", CVPR (arXiv:2203.08679).

KD's KL splits into a target-class term and a non-target term (eq. 4 of the paper):

    KD = TCKD + (1 - p_t^T) * NCKD
    TCKD = KL(b^T || b^S),       b = [p_t, 1 - p_t]                (binary: target vs the rest)
    NCKD = KL(p-hat^T || p-hat^S), p-hat = softmax over the non-target classes

DKD weights them freely: ``loss = ce_weight * CE + w(epoch) * (alpha * TCKD + beta * NCKD)``,
both at temperature T and scaled by T^2, with the warm-up ``w = min(epoch / warmup_epochs, 1)``.
This follows the official mdistiller implementation (``mdistiller/distillers/DKD.py``): the
target logit is masked out of NCKD by subtracting 1000 from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress.data.spec import UNLABELED
from compress.training.loss_params import DKDParams
from compress.training.losses.base import DistillBatch, DistillLoss, LossOutput, hard_ce


def dkd_target(batch: DistillBatch) -> torch.Tensor:
    """The class TCKD/NCKD split on: the label, or the teacher's argmax for unlabeled images.

    With mixup/cutmix the first image's label (``batch.labels``) is used, the one weighted by
    ``lam``: the decomposition needs a single target class per image.
    """
    teacher_guess = batch.teacher_logits.detach().argmax(dim=1)
    return torch.where(batch.labels == UNLABELED, teacher_guess, batch.labels)


def _binary_log_probs(
    logits: torch.Tensor, gt_mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log [p_t, 1 - p_t] per row (N, 2), computed stably in log space."""
    log_p = F.log_softmax(logits / temperature, dim=1)
    log_target = log_p.masked_fill(~gt_mask, float("-inf")).logsumexp(dim=1)
    log_rest = log_p.masked_fill(gt_mask, float("-inf")).logsumexp(dim=1)
    return torch.stack([log_target, log_rest], dim=1)


def tckd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Target-class KD: ``T^2 * KL(b^T || b^S)``, batch mean."""
    gt_mask = F.one_hot(target, student_logits.shape[1]).bool()
    log_b_s = _binary_log_probs(student_logits, gt_mask, temperature)
    log_b_t = _binary_log_probs(teacher_logits, gt_mask, temperature)
    return F.kl_div(log_b_s, log_b_t, log_target=True, reduction="batchmean") * temperature**2


def nckd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Non-target-class KD: ``T^2 * KL(p-hat^T || p-hat^S)`` over the non-target classes, batch
    mean."""
    mask = 1000.0 * F.one_hot(target, student_logits.shape[1]).to(student_logits.dtype)
    log_s = F.log_softmax(student_logits / temperature - mask, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature - mask, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


class DecoupledKD(DistillLoss):
    """Decoupled KD: separately weighted target-class (TCKD) and non-target-class (NCKD) terms.

    Zhao, Cui, Song, Qiu & Liang 2022, "Decoupled Knowledge Distillation", CVPR,
    arXiv:2203.08679. ``ce_weight * CE + min(epoch / warmup_epochs, 1) * (alpha * TCKD +
    beta * NCKD)``; see the module docstring for the terms. The split class is the true label,
    the teacher's argmax for unlabeled images, and the first image's label under mixup/cutmix.
    """

    def __init__(self, params: DKDParams):
        super().__init__()
        self.params = params

    def warmup(self, epoch: int) -> float:
        """The KD terms' weight ramp: ``min(epoch / warmup_epochs, 1)`` (1 without warm-up)."""
        if self.params.warmup_epochs == 0:
            return 1.0
        return min(epoch / self.params.warmup_epochs, 1.0)

    def forward(self, batch: DistillBatch) -> LossOutput:
        p = self.params
        student, teacher = batch.student_logits, batch.teacher_logits.detach()
        target = dkd_target(batch)
        tc = tckd(student, teacher, target, p.temperature)
        nc = nckd(student, teacher, target, p.temperature)
        hard = hard_ce(student, batch)
        total = p.ce_weight * hard + self.warmup(batch.epoch) * (p.alpha * tc + p.beta * nc)
        return LossOutput(total, {"ce": hard.detach(), "tckd": tc.detach(), "nckd": nc.detach()})
