"""Feature-level losses on hooked intermediate layers: FitNets hints and attention transfer.

Each term names ``pairs`` of ``{teacher: module, student: module}``; the distill stage hooks
those modules and fills ``DistillBatch.teacher_features`` / ``student_features`` with their
outputs. When the two maps differ in height/width, the student's map is resized to the
teacher's: adaptive average pooling when it is larger, bilinear interpolation when smaller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import RecipeError
from compress.training.loss_params import ATParams, FitNetParams, LayerPair
from compress.training.losses.base import DistillBatch, DistillLoss, LossOutput


def feature_pairs(
    batch: DistillBatch, pairs: tuple[LayerPair, ...]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student feature, teacher feature) per pair, as hooked into the batch; the teacher's
    detached."""
    out = []
    for pair in pairs:
        if pair.student not in batch.student_features or pair.teacher not in batch.teacher_features:
            raise RuntimeError(
                f"no hooked features for layer pair {pair} in the batch (hook the loss's "
                "student_layers/teacher_layers)"
            )
        out.append(
            (batch.student_features[pair.student], batch.teacher_features[pair.teacher].detach())
        )
    return out


def resize_like(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Resize a (N, C, H, W) student map to the teacher's H x W (avg-pool down, bilinear up)."""
    size = tuple(teacher.shape[-2:])
    if student.dim() != 4 or tuple(student.shape[-2:]) == size:
        return student
    if student.shape[-2] >= size[0] and student.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(student, size)
    return F.interpolate(student, size=size, mode="bilinear", align_corners=False)


def _check_ranks(
    pair: LayerPair, student: torch.Tensor, teacher: torch.Tensor, ranks: tuple[int, ...]
) -> None:
    if student.dim() != teacher.dim() or student.dim() not in ranks:
        expected = " or ".join(f"{r}-D" for r in ranks)
        raise RecipeError(
            f"pairs: expected {expected} features on both sides, got teacher {pair.teacher!r} "
            f"{tuple(teacher.shape)} and student {pair.student!r} {tuple(student.shape)}"
        )


def _layers(pairs: tuple[LayerPair, ...], side: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(getattr(pair, side) for pair in pairs))


def _regressor(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module:
    c_s, c_t = student.shape[1], teacher.shape[1]
    if c_s == c_t:
        return nn.Identity()
    if student.dim() == 2:
        return nn.Linear(c_s, c_t)
    return nn.Sequential(nn.Conv2d(c_s, c_t, kernel_size=1, bias=False), nn.BatchNorm2d(c_t))


class FitNet(DistillLoss):
    """Hints: regress the teacher's intermediate features from the student's through a regressor.

    Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", ICLR, arXiv:1412.6550.
    ``mean over pairs of mean((r(s) - t)^2)``, where ``r`` is a 1x1 conv + BatchNorm from the
    student's to the teacher's channels (a Linear for (N, C) features; identity when the
    channels match), applied after resizing the student map to the teacher's H x W.
    The regressors are this module's parameters: train them with the student, then discard them.

    Example:
        >>> loss = FitNet(FitNetParams(pairs=(LayerPair("layer3", "features.13"),)))
        >>> loss.setup(dry_batch)  # builds the regressors from the features' shapes
        >>> optimizer = torch.optim.SGD([*student.parameters(), *loss.parameters()], lr=0.05)
    """

    def __init__(self, params: FitNetParams):
        super().__init__()
        self.params = params
        self.teacher_layers = _layers(params.pairs, "teacher")
        self.student_layers = _layers(params.pairs, "student")
        self.regressors = nn.ModuleList()

    def setup(self, batch: DistillBatch) -> None:
        """Build one regressor per pair from the dry batch's feature shapes (on their device)."""
        regressors = []
        for pair, (student, teacher) in zip(
            self.params.pairs, feature_pairs(batch, self.params.pairs), strict=True
        ):
            _check_ranks(pair, student, teacher, (2, 4))
            regressors.append(_regressor(student, teacher).to(student.device))
        self.regressors = nn.ModuleList(regressors)

    def forward(self, batch: DistillBatch) -> LossOutput:
        if len(self.regressors) != len(self.params.pairs):
            raise RuntimeError(
                "fitnet: call setup(batch) with one dry batch before the first forward (it builds "
                "the regressors)"
            )
        pairs = feature_pairs(batch, self.params.pairs)
        losses = [
            F.mse_loss(r(resize_like(s, t)), t)
            for r, (s, t) in zip(self.regressors, pairs, strict=True)
        ]
        total = torch.stack(losses).mean()
        return LossOutput(total, {"fitnet": total.detach()})


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Q = normalize(mean_c |f|^p), flattened to (N, H*W) and L2-normalised per image."""
    return F.normalize(features.abs().pow(p).mean(1).flatten(1))


class AttentionTransfer(DistillLoss):
    """Match the student's spatial attention maps to the teacher's.

    Zagoruyko & Komodakis 2017, "Paying More Attention to Attention: Improving the Performance
    of Convolutional Neural Networks via Attention Transfer", ICLR, arXiv:1612.03928.
    ``beta / 2 * sum over pairs of mean((Q_s - Q_t)^2)`` with
    ``Q = normalize(mean_c |f|^p)`` (the official code:
    ``F.normalize(x.pow(2).mean(1).view(n, -1))``; ``|f|`` as in the paper, identical for p = 2).
    Channel counts may differ; no parameters.
    """

    def __init__(self, params: ATParams):
        super().__init__()
        self.params = params
        self.teacher_layers = _layers(params.pairs, "teacher")
        self.student_layers = _layers(params.pairs, "student")

    def setup(self, batch: DistillBatch) -> None:
        """Check that every pair gives (N, C, H, W) maps: attention needs spatial positions."""
        for pair, (student, teacher) in zip(
            self.params.pairs, feature_pairs(batch, self.params.pairs), strict=True
        ):
            _check_ranks(pair, student, teacher, (4,))

    def forward(self, batch: DistillBatch) -> LossOutput:
        p = self.params.p
        losses = [
            (attention_map(resize_like(s, t), p) - attention_map(t, p)).pow(2).mean()
            for s, t in feature_pairs(batch, self.params.pairs)
        ]
        total = self.params.beta / 2 * torch.stack(losses).sum()
        return LossOutput(total, {"at": total.detach()})
