"""Train a student against a frozen teacher: the step shared by distill, prune and quantize.

The three stages differ in what student they start from (a fresh network, a pruned one, a
fake-quantized graph), not in how the teacher guides it, so the teacher forward, the feature
hooks, the batch mixing and the loss set-up live here once and the shared training loop
(:func:`compress.training.loop.fit`) runs the optimisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.data.augment import BatchMix
from compress.data.spec import MixConfig
from compress.training.hooks import FeatureHooks
from compress.training.loop import EpochLog, fit
from compress.training.losses.base import DistillBatch
from compress.training.losses.composite import build_distill_loss
from compress.training.spec import LossConfig, TrainConfig


@dataclass(frozen=True)
class LoopSettings:
    """How a library verb's training loop reads its batches and reports, beyond the data itself.

    From Python the defaults fit: batches arrive as the network takes them and training runs
    quietly where the network is. The recipe's stages pass their own: the on-device augmentation
    and normalisation of uint8 batches, a progress bar, and an epoch checkpoint that a killed run
    resumes from (:func:`compress.training.loop.fit`).
    """

    prepare: Callable[..., torch.Tensor] | None = None  # prepare(images, train=bool); None: as is
    device: torch.device | None = None  # None: where the network's parameters are
    show_progress: bool = False
    desc: str = "train"
    checkpoint: Path | None = None
    checkpoint_key: str = ""

    def inputs(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        """A raw batch as the network takes it."""
        return images if self.prepare is None else self.prepare(images, train=train)


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """The teacher: eval mode (fixed BatchNorm statistics, no dropout), no gradients."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def train_with_teacher(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    loss: tuple[LossConfig, ...],
    train: TrainConfig,
    augment: MixConfig,
    *,
    loaders,
    prep,
    device: torch.device,
    desc: str,
    show_progress: bool = True,
    checkpoint: Path | None = None,
    checkpoint_key: str = "",
    cache: torch.Tensor | None = None,
) -> list[EpochLog]:
    """Fit ``student`` in place with the weighted loss terms ``loss`` against ``teacher``.

    The teacher runs without gradients on exactly the batch the student sees (after crop/flip
    and mixup/cutmix/cutout), so its soft targets describe the student's actual input. Feature
    terms (fitnet, at) read hooked layers; their regressors train with the student and are
    dropped afterwards.

    Args:
        loaders: ``(train, test)``; the train loader yields ``(images, labels[, indices])``,
            indices only with ``cache`` (the teacher's logits per training image); test may be
            None (no evaluation).
        prep: ``prep(images, train=...)``, the augmentation and normalisation of a raw batch.
        checkpoint, checkpoint_key: the epoch checkpoint (see :func:`compress.training.loop.fit`).

    Returns:
        One log entry per epoch.
    """
    train_loader, test_loader = loaders
    loss_fn = build_distill_loss(loss).to(device)
    mix = BatchMix(augment)
    with ExitStack() as stack:
        teacher_features = stack.enter_context(FeatureHooks(teacher, loss_fn.teacher_layers))
        student_features = stack.enter_context(FeatureHooks(student, loss_fn.student_layers))

        def forward(images, labels, epoch, indices=None) -> DistillBatch:
            mixed = mix(images, labels)
            with torch.no_grad():
                if cache is not None and indices is not None:
                    teacher_logits = cache[indices]
                else:
                    teacher_logits = teacher(mixed.images) if loss_fn.needs_teacher else None
            student_logits = student(mixed.images)
            return DistillBatch(
                student_logits,
                teacher_logits,
                mixed.labels,
                dict(student_features.outputs),
                dict(teacher_features.outputs),
                mixed.mixed_labels,
                mixed.lam,
                epoch,
            )

        def step_loss(images, labels, epoch, indices=None):
            batch = forward(images, labels, epoch, indices)
            out = loss_fn(batch)
            return out.total, batch.student_logits, out.terms

        student.eval()  # the dry batch must not move BatchNorm statistics
        setup_loss(loss_fn, forward, train_loader, prep, device)
        loss_fn.to(device)
        return fit(
            student,
            train_loader,
            test_loader,
            step_loss,
            train,
            preprocess=prep,
            device=device,
            desc=desc,
            extra_params=tuple(loss_fn.parameters()),
            show_progress=show_progress,
            checkpoint=checkpoint,
            checkpoint_key=checkpoint_key,
        )


@torch.no_grad()
def setup_loss(loss_fn, forward, train_loader, prep, device) -> None:
    """Let losses with trainable parts (FitNet regressors) size them from one real batch."""
    images, labels, *_ = next(iter(train_loader))
    batch = forward(prep(images.to(device), train=False), labels.to(device), 1)
    loss_fn.setup(batch)


def history_dicts(history: list[EpochLog]) -> list[dict]:
    return [dataclasses.asdict(h) for h in history]
