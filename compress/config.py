"""Typed, frozen configuration of a recipe: one dataclass per section and per stage.

Defaults live here and nowhere else. ``compress.recipe`` turns YAML into these objects and
rejects unknown keys and wrong types with the field's path; ``__post_init__`` checks ranges, so
a config built from Python is validated the same way as one read from YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compress.errors import RecipeError

DATASET_KINDS = ("digits", "cifar10", "cifar100", "npz", "imagefolder")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RecipeError(message)


@dataclass(frozen=True)
class SubsetConfig:
    """Use only the first N (seeded, class-balanced shuffle) images of a split: quick runs."""

    train: int | None = None
    test: int | None = None

    def __post_init__(self):
        for name in ("train", "test"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"{name}: expected a positive integer or null, got {value}")


@dataclass(frozen=True)
class DataConfig:
    kind: str = "digits"
    path: str | None = None
    image_size: int = 32
    batch_size: int = 128
    eval_batch_size: int = 256
    workers: int = 0
    augment: bool = True
    subset: SubsetConfig = field(default_factory=SubsetConfig)

    def __post_init__(self):
        _check(self.kind in DATASET_KINDS, f"kind: expected one of {', '.join(DATASET_KINDS)}, got {self.kind!r}")
        _check(self.kind == "digits" or self.path is not None, f"path: dataset kind {self.kind!r} needs a path (or pass --data PATH)")
        _check(8 <= self.image_size <= 1024, f"image_size: expected 8..1024, got {self.image_size}")
        _check(self.batch_size > 0, f"batch_size: expected a positive integer, got {self.batch_size}")
        _check(self.eval_batch_size > 0, f"eval_batch_size: expected a positive integer, got {self.eval_batch_size}")
        _check(self.workers >= 0, f"workers: expected >= 0, got {self.workers}")


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every training stage (teacher, distill, later prune/QAT)."""

    epochs: int = 1
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: int = 0

    def __post_init__(self):
        _check(self.epochs >= 0, f"epochs: expected >= 0, got {self.epochs}")
        _check(self.optimizer in OPTIMIZERS, f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _check(self.schedule in SCHEDULES, f"schedule: expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _check(self.lr > 0, f"lr: expected > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"momentum: expected 0 <= momentum < 1, got {self.momentum}")
        _check(self.weight_decay >= 0, f"weight_decay: expected >= 0, got {self.weight_decay}")
        _check(0 <= self.warmup_epochs <= max(self.epochs, 0), f"warmup_epochs: expected 0..epochs ({self.epochs}), got {self.warmup_epochs}")


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher: a model name and either a checkpoint to load or settings to train it."""

    model: str = "torchvision:resnet18"
    cifar_stem: bool | None = None  # None: on when data.image_size <= 64
    checkpoint: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class StudentConfig:
    model: str = "torchvision:mobilenet_v2"
    cifar_stem: bool | None = None


@dataclass(frozen=True)
class LossConfig:
    """A registered KD loss by name plus its own parameters (validated by the loss's dataclass)."""

    name: str = "kd"
    params: Any = None  # None: the loss's default parameters

    def __post_init__(self):
        if self.params is None:
            from compress.losses import LOSSES

            object.__setattr__(self, "params", LOSSES.get(self.name).params())


@dataclass(frozen=True)
class TeacherStageConfig:
    """The teacher stage takes its settings from the recipe's ``teacher`` section."""


@dataclass(frozen=True)
class DistillConfig:
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


EXPORTERS = ("dynamo", "torchscript")


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export of teacher and student, proven against PyTorch on real test images."""

    opset: int = 18
    exporter: str = "dynamo"
    tolerance: float = 1e-3
    min_agreement: float = 0.99
    check_samples: int = 256

    def __post_init__(self):
        _check(7 <= self.opset <= 23, f"opset: expected 7..23, got {self.opset}")
        _check(self.exporter in EXPORTERS, f"exporter: expected one of {', '.join(EXPORTERS)}, got {self.exporter!r}")
        _check(self.tolerance > 0, f"tolerance: expected > 0, got {self.tolerance}")
        _check(0 <= self.min_agreement <= 1, f"min_agreement: expected 0..1, got {self.min_agreement}")
        _check(self.check_samples > 0, f"check_samples: expected > 0, got {self.check_samples}")


BENCH_BACKENDS = ("onnxruntime",)


@dataclass(frozen=True)
class BenchConfig:
    """Latency/throughput/memory/accuracy measurement of exported models."""

    backend: str = "onnxruntime"
    batch_size: int = 64  # the throughput batch; batch 1 is always measured too
    warmup: int = 10
    iterations: int = 100
    time_budget_s: float | None = 10.0  # per measurement; stops early when spent
    threads: int = 0  # 0: the backend's default
    eval_samples: int | None = None  # None: the whole test split

    def __post_init__(self):
        _check(self.backend in BENCH_BACKENDS, f"backend: expected one of {', '.join(BENCH_BACKENDS)}, got {self.backend!r}")
        _check(self.batch_size > 0, f"batch_size: expected > 0, got {self.batch_size}")
        _check(self.warmup >= 0, f"warmup: expected >= 0, got {self.warmup}")
        _check(self.iterations > 0, f"iterations: expected > 0, got {self.iterations}")
        _check(self.time_budget_s is None or self.time_budget_s > 0, f"time_budget_s: expected > 0 or null, got {self.time_budget_s}")
        _check(self.threads >= 0, f"threads: expected >= 0, got {self.threads}")
        _check(self.eval_samples is None or self.eval_samples > 0, f"eval_samples: expected > 0 or null, got {self.eval_samples}")


@dataclass(frozen=True)
class StageSpec:
    """One entry of the recipe's ordered ``stages`` list."""

    name: str
    config: Any


@dataclass(frozen=True)
class Recipe:
    name: str
    seed: int = 0
    device: str = "auto"
    out: str = "exported"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    stages: tuple[StageSpec, ...] = ()


# Stage name -> its config class. The recipe loader reads this table; the functions that run the
# stages are registered in ``compress.stages`` (kept apart so that validating a recipe does not
# import the training code).
STAGE_CONFIGS: dict[str, type] = {
    "teacher": TeacherStageConfig,
    "distill": DistillConfig,
    "export": ExportConfig,
    "bench": BenchConfig,
}

# What each stage needs to find earlier in the list, and what it provides to later stages.
STAGE_NEEDS: dict[str, tuple[str, ...]] = {
    "teacher": (),
    "distill": ("teacher",),
    "export": ("teacher",),
    "bench": ("export",),
}
