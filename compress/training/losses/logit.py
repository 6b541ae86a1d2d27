"""Logit-level losses: plain cross-entropy, logit regression (MSE) and the MSE/KD hybrid."""

from __future__ import annotations

import torch.nn.functional as F

from compress.training.loss_params import CEParams, HybridParams, LogitMSEParams
from compress.training.losses.base import DistillBatch, DistillLoss, LossOutput, hard_ce
from compress.training.losses.kd import soft_kl


class CrossEntropy(DistillLoss):
    """Hard-label cross-entropy alone: the no-teacher baseline, or a term next to a teacher loss.

    ``CE(s, y)`` over labeled images (mixup/cutmix-aware, see :func:`hard_ce`). Alone, it makes
    the distill stage skip the teacher's forward pass (``needs_teacher`` is False).
    """

    needs_teacher = False

    def __init__(self, params: CEParams | None = None):
        super().__init__()
        self.params = params or CEParams()

    def forward(self, batch: DistillBatch) -> LossOutput:
        hard = hard_ce(batch.student_logits, batch, self.params.label_smoothing)
        return LossOutput(hard, {"ce": hard.detach()})


class LogitMSE(DistillLoss):
    """Regress the teacher's raw logits.

    Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?", NeurIPS, arXiv:1312.6184.
    ``mean((s - t)^2)`` over every element of the (N, K) logits.
    """

    def __init__(self, params: LogitMSEParams | None = None):
        super().__init__()
        self.params = params or LogitMSEParams()

    def forward(self, batch: DistillBatch) -> LossOutput:
        mse = F.mse_loss(batch.student_logits, batch.teacher_logits.detach())
        return LossOutput(mse, {"logit_mse": mse.detach()})


class Hybrid(DistillLoss):
    """Logit MSE blended with the temperature-scaled soft KL; no hard-label term.

    Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT into Simple Neural Networks",
    arXiv:1903.12136 (logit MSE), blended with Hinton et al.'s KD as our issue defines it:
    ``(1 - alpha) * mean((s - t)^2) + alpha * T^2 KL(softmax(t/T) || softmax(s/T))``.
    Add a ``ce`` term in the recipe for the hard labels.
    """

    def __init__(self, params: HybridParams):
        super().__init__()
        self.params = params

    def forward(self, batch: DistillBatch) -> LossOutput:
        teacher = batch.teacher_logits.detach()
        mse = F.mse_loss(batch.student_logits, teacher)
        kd = soft_kl(batch.student_logits, teacher, self.params.temperature)
        total = (1 - self.params.alpha) * mse + self.params.alpha * kd
        return LossOutput(total, {"mse": mse.detach(), "kd": kd.detach()})
