"""How a network is trained: the optimisation (:class:`TrainConfig`), one loss term
(:class:`LossConfig`) and :func:`compress.distill`'s spec (:class:`DistillSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compress.core.fields import check, check_choices, check_count, choice
from compress.data.spec import MixConfig
from compress.training.loss_params import LOSSES

OPTIMIZERS = ("sgd", "adamw")


SCHEDULES = ("cosine", "step", "onecycle", "constant")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


MAX_EPOCHS = 10_000  # ImageNet schedules run 90-600; 10^4 is a typo, not a schedule


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every training stage (teacher, distill, later prune/QAT)."""

    # passes over the training split (0: no training)
    epochs: int = 1
    # the optimiser
    optimizer: str = choice("sgd", OPTIMIZERS)
    # the peak learning rate
    lr: float = 0.05
    # SGD momentum
    momentum: float = 0.9
    # Nesterov momentum (SGD)
    nesterov: bool = False
    # L2 weight decay (decoupled for adamw)
    weight_decay: float = 5e-4
    # the learning-rate schedule, stepped every batch
    schedule: str = choice("cosine", SCHEDULES)
    # epochs of linear warm-up before the schedule
    warmup_epochs: int = 0
    # teacher only; hurts distillation (Muller et al. 2019), so off by default
    label_smoothing: float = 0.0
    # auto: bf16 autocast on CUDA GPUs that support it (not QAT), else fp32
    precision: str = choice("auto", PRECISIONS)
    channels_last: bool | None = None  # None: on for CUDA
    # torch.compile the training step (worth it on CUDA; compiling costs seconds to minutes)
    compile: bool = False

    def __post_init__(self):
        check_choices(self)
        check_count(self.epochs, "epochs", 0, MAX_EPOCHS, "passes over the training split")
        check(self.lr > 0, f"lr: expected > 0, got {self.lr}")
        check(0 <= self.momentum < 1, f"momentum: expected 0 <= momentum < 1, got {self.momentum}")
        check(self.weight_decay >= 0, f"weight_decay: expected >= 0, got {self.weight_decay}")
        check(
            0 <= self.warmup_epochs <= max(self.epochs, 0),
            f"warmup_epochs: expected 0..epochs ({self.epochs}), got {self.warmup_epochs}",
        )
        check(
            0 <= self.label_smoothing < 1,
            f"label_smoothing: expected 0 <= value < 1, got {self.label_smoothing}",
        )


@dataclass(frozen=True)
class LossConfig:
    """One term of the distillation loss: a registered loss by name, its weight and parameters."""

    name: str = "kd"
    weight: float = 1.0
    params: Any = None  # None: the loss's default parameters

    def __post_init__(self):
        check(self.weight >= 0, f"weight: expected >= 0, got {self.weight}")
        if self.params is None:
            object.__setattr__(self, "params", LOSSES.get(self.name).params())


@dataclass(frozen=True)
class DistillSpec:
    """How :func:`compress.distill` trains a student against a frozen teacher: a weighted sum of
    registered loss terms, the optimisation, and the batch mixing both networks see."""

    # the loss terms, summed with their weights
    loss: tuple[LossConfig, ...] = field(default_factory=lambda: (LossConfig(),))
    # the optimisation
    train: TrainConfig = field(default_factory=TrainConfig)
    # the batch mixing both networks see
    augment: MixConfig = field(default_factory=MixConfig)

    def __post_init__(self):
        check(len(self.loss) > 0, "loss: expected at least one loss term")
