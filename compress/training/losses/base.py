"""What every distillation loss is: a module called on a :class:`DistillBatch` that returns a
:class:`LossOutput`, and the hard-label cross-entropy most of them add."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from compress.data.spec import UNLABELED


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


def hard_ce(
    logits: torch.Tensor, batch: DistillBatch, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy with the true labels, mixup/cutmix-aware, over labeled images only.

    ``lam * CE(labels) + (1 - lam) * CE(mixed_labels)``, averaged over the images whose
    labels are known (both labels, when mixed); 0 when the batch has no labeled image.
    """
    labeled = batch.labels != UNLABELED
    if batch.mixed_labels is not None:
        labeled &= batch.mixed_labels != UNLABELED
    if not bool(labeled.any()):
        return logits.sum() * 0.0
    loss = batch.lam * F.cross_entropy(
        logits[labeled], batch.labels[labeled], label_smoothing=label_smoothing
    )
    if batch.mixed_labels is not None and batch.lam < 1.0:
        loss = loss + (1.0 - batch.lam) * F.cross_entropy(
            logits[labeled], batch.mixed_labels[labeled], label_smoothing=label_smoothing
        )
    return loss
