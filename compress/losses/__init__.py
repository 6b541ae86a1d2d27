"""Knowledge-distillation losses, each registered under a short name with its parameter class.

A recipe's ``distill.loss`` is one term or a list of terms, each ``{name, weight, **params}``:

    loss:
      - {name: kd, temperature: 4, alpha: 0.9}
      - {name: fitnet, weight: 100, pairs: [{teacher: layer3, student: features.13}]}

Every loss is a :class:`DistillLoss` module called on a :class:`DistillBatch` (logits, labels,
hooked intermediate features, mixup/cutmix labels, the epoch) and returns a :class:`LossOutput`.
Terms that read features declare the module names they need; the distill stage hooks those
modules and fills ``DistillBatch.*_features``. Losses with trainable parts (FitNet's regressor)
build them in :meth:`DistillLoss.setup` from one dry batch; their parameters are trained with the
student and are never part of the student's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from compress.errors import RecipeError
from compress.registry import Registry

UNLABELED = -1  # label value of an image from the unlabeled pool


@dataclass
class DistillBatch:
    """Everything a distillation loss may read for one training step.

    Attributes:
        student_logits, teacher_logits: (N, K) raw logits on the same (augmented) images.
        labels: (N,) int64; ``UNLABELED`` (-1) for images without a label.
        student_features, teacher_features: module name -> that module's output, for the
            names the loss terms declared.
        mixed_labels: with mixup/cutmix, the second image's labels; None otherwise.
        lam: weight of ``labels`` in the mixed hard-label term (1.0 without mixing).
        epoch: the current epoch, 1-based (for warm-ups such as DKD's).
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    labels: torch.Tensor
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    mixed_labels: torch.Tensor | None = None
    lam: float = 1.0
    epoch: int = 1


@dataclass(frozen=True)
class LossOutput:
    """The total to back-propagate plus each term (detached) for logging."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class DistillLoss(torch.nn.Module):
    """Base class of every registered loss.

    Class attributes say what the distill stage must provide: ``needs_teacher`` (False only for
    plain cross-entropy, so a CE-only baseline skips the teacher's forward pass).
    Instances list ``teacher_layers`` / ``student_layers``: module names to hook.
    """

    needs_teacher: bool = True

    def __init__(self):
        super().__init__()
        self.teacher_layers: tuple[str, ...] = ()
        self.student_layers: tuple[str, ...] = ()

    def setup(self, batch: DistillBatch) -> None:
        """Build trainable parts from the shapes of one dry batch; default: nothing to build."""

    def forward(self, batch: DistillBatch) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def hard_ce(logits: torch.Tensor, batch: DistillBatch) -> torch.Tensor:
    """Cross-entropy with the true labels, mixup/cutmix-aware, over labeled images only.

    ``lam * CE(labels) + (1 - lam) * CE(mixed_labels)``, averaged over the images whose
    labels are known (both labels, when mixed); 0 when the batch has no labeled image.
    """
    labeled = batch.labels != UNLABELED
    if batch.mixed_labels is not None:
        labeled &= batch.mixed_labels != UNLABELED
    if not bool(labeled.any()):
        return logits.sum() * 0.0
    loss = batch.lam * F.cross_entropy(logits[labeled], batch.labels[labeled])
    if batch.mixed_labels is not None and batch.lam < 1.0:
        loss = loss + (1.0 - batch.lam) * F.cross_entropy(logits[labeled], batch.mixed_labels[labeled])
    return loss


@dataclass(frozen=True)
class LossSpec:
    params: type
    build: Any  # params -> DistillLoss


LOSSES: Registry[LossSpec] = Registry("loss", RecipeError)


def register_loss(name: str, params: type):
    """Class decorator: register a :class:`DistillLoss` under ``name`` with its parameter dataclass."""

    def add(cls):
        LOSSES.register(name)(LossSpec(params=params, build=cls))
        return cls

    return add


def build_loss(name: str, params: Any) -> DistillLoss:
    return LOSSES.get(name).build(params)


from compress.losses import composite, dkd, features, kd, logit  # noqa: E402,F401  (registers the built-in losses)
