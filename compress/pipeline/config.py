"""The recipe: its sections (teacher, student, gates), each stage's settings (a library spec
plus what the stage needs from the run) and the table of stage kinds.

Defaults live here and in the library specs they extend, nowhere else.
:mod:`compress.pipeline.recipe`
turns YAML into these objects and rejects unknown keys and wrong types with the field's path;
``__post_init__`` checks ranges, so a config built from Python is validated the same way as one
read from YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compress.benchmark.spec import BenchConfig
from compress.core.fields import ADDED_LATER, check, check_choices, check_count, choice
from compress.data.spec import DataConfig, MixConfig
from compress.exporters.spec import ExportConfig
from compress.pruning.spec import PruneSpec
from compress.quantization.spec import CALIBRATIONS, QuantizeSpec
from compress.training.spec import DistillSpec, LossConfig, TrainConfig


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher: a model name and either a finished checkpoint to load, or pretrained
    ``weights`` to start from and settings to fine-tune (or train) it."""

    # the architecture (`compress list models`)
    model: str = "torchvision:resnet18"
    cifar_stem: bool | None = None  # None: on when data.image_size <= 64
    # the finished teacher: a state_dict of this network for the data's classes, not trained
    checkpoint: str | None = None
    # where training starts: a file, a torchvision/timm name or hf-hub:org/name (docs/models.md)
    weights: str | None = field(default=None, metadata={ADDED_LATER: True})
    # false: load the layers of `weights` that fit and record the rest (true: refuse)
    strict_weights: bool = field(default=True, metadata={ADDED_LATER: True})
    # how it is trained when no checkpoint is given
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check(
            self.checkpoint is None or self.weights is None,
            "weights: give checkpoint (the finished teacher) or weights (a starting point to "
            "fine-tune from), not both",
        )


@dataclass(frozen=True)
class StudentConfig:
    """The student: a model name, and the pretrained ``weights`` distillation starts from."""

    # the architecture (`compress list models`)
    model: str = "torchvision:mobilenet_v2"
    # a 3x3 stride-1 stem for small images (null: on when image_size <= 64)
    cifar_stem: bool | None = None
    # pretrained weights to start from: a file, a torchvision enum, a timm tag or hf-hub:org/name
    weights: str | None = field(default=None, metadata={ADDED_LATER: True})
    # missing or unexpected keys in the weights are an error
    strict_weights: bool = field(default=True, metadata={ADDED_LATER: True})


@dataclass(frozen=True)
class TeacherStageConfig:
    """The teacher stage takes its settings from the recipe's ``teacher`` section."""


@dataclass(frozen=True)
class DistillConfig(DistillSpec):
    """The ``distill`` stage: a :class:`DistillSpec`, the stage whose network teaches, and the
    student it starts from."""

    # the stage whose model teaches: "teacher" or an earlier distill stage's name
    teacher: str = "teacher"
    student: StudentConfig | None = None  # None: the recipe's student section
    # copy every teacher tensor whose name and shape fit the student
    init_from_teacher: bool = False
    # compute the teacher once per image; needs deterministic inputs
    cache_teacher_logits: bool = False


MAX_PRUNE_STEPS = 100  # prune / fine-tune rounds (each cut is a few percent at that count)


@dataclass(frozen=True)
class PruneConfig(PruneSpec):
    """The ``prune`` stage: a :class:`PruneSpec` reached in ``steps`` prune / fine-tune rounds on
    the latest student, fine-tuned against the teacher (``train.epochs`` per step)."""

    # prune / fine-tune rounds along a geometric schedule
    steps: int = 1
    # training images that re-estimate BatchNorm statistics after each cut, before fine-tuning
    # (compress.training.batchnorm); 0: fine-tuning starts from the stale statistics
    recalibration_images: int = 2560
    loss: tuple[LossConfig, ...] | None = None  # None: the loss of the latest distill stage
    # fine-tuning after each cut
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.01))
    # batch mixing while fine-tuning
    augment: MixConfig = field(default_factory=MixConfig)
    # the stage whose network teaches
    teacher: str = "teacher"

    def __post_init__(self):
        super().__post_init__()
        check_count(self.steps, "steps", 1, MAX_PRUNE_STEPS, "prune and fine-tune rounds")
        check(
            self.recalibration_images >= 0,
            f"recalibration_images: expected >= 0, got {self.recalibration_images}",
        )
        check(
            self.loss is None or len(self.loss) > 0,
            "loss: expected at least one loss term, or null for the distill stage's loss",
        )


QUANT_MODES = ("qat", "ptq")
# the quantize stage's teacher value naming the float student it quantizes (QAT then distils the
# INT8 network from its own float version, as quantization-aware distillation does)
SELF_TEACHER = "self"


@dataclass(frozen=True)
class QuantizeConfig(QuantizeSpec):
    """The ``quantize`` stage: a :class:`QuantizeSpec` applied to the latest student, calibrated
    on ``calibration_images`` training images, then in ``qat`` mode (or when PTQ misses
    ``max_drop``) fine-tuned against ``teacher`` (by default its own float version). With
    ``calibration: auto`` (the default) or ``max_drop``, ``holdout_images`` training images are
    set aside (calibration and QAT never see them; the test split is never used): the best PTQ
    method and whether QAT beats it are decided on them (top-1; on a tie, agreement with the
    float student, then the KL divergence from it), and the budget is measured on them.
    Every candidate is recorded (``candidates``) with the one shipped."""

    # how activation ranges are set: auto tries each method and keeps the best on the held-out
    # images, where QAT must then beat it to be shipped
    calibration: str = choice("auto", CALIBRATIONS)
    # qat: calibrate, then fine-tune against `teacher`; ptq: calibrate only (and fine-tune only
    # when the best PTQ network misses max_drop on the held-out images)
    mode: str = choice("qat", QUANT_MODES)
    # training images the activation ranges are calibrated on
    calibration_images: int = 512
    # None: the logit terms of the latest distill stage's loss
    loss: tuple[LossConfig, ...] | None = None
    # QAT's fine-tuning: AdamW at a small rate (SGD moves the BatchNorm-folded weights of
    # channels with large BatchNorm gains by gain^2 times the rate: MobileNets collapsed)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(optimizer="adamw", lr=3e-5, weight_decay=0.0)
    )
    # batch mixing during QAT
    augment: MixConfig = field(default_factory=MixConfig)
    # who teaches during QAT: self (the float student being quantized: the INT8 network learns
    # to compute what its float version computes) or an earlier stage's name
    teacher: str = SELF_TEACHER
    # training images set aside to decide on (calibration auto, max_drop); null: a fifth of the
    # labeled training images, at most 2,000
    holdout_images: int | None = field(default=None, metadata={ADDED_LATER: True})

    def __post_init__(self):
        super().__post_init__()
        check(
            self.calibration_images > 0,
            f"calibration_images: expected > 0, got {self.calibration_images}",
        )
        check(
            self.loss is None or len(self.loss) > 0,
            "loss: expected at least one loss term, or null for the distill stage's loss",
        )
        check(
            self.holdout_images is None or self.holdout_images > 0,
            f"holdout_images: expected a positive integer or null, got {self.holdout_images}",
        )


GATE_LATENCY_MODES = ("auto", "relative", "absolute")


@dataclass(frozen=True)
class GatesConfig:
    """Regression gates: after the run, its bench result is compared with ``baseline``.

    ``max_latency_increase`` and ``max_size_increase`` are fractions (0.10 = 10%). ``latency``:
    ``relative`` compares each model's batch-1 latency as a ratio to the run's reference model
    (the teacher), ``absolute`` in milliseconds, ``auto`` relative when both results have it.
    """

    # a bench.json, its bench/ folder or a run folder; null: no comparison
    baseline: str | None = None
    max_accuracy_drop: float = 0.5  # top-1 points
    # the largest latency increase against the baseline (0.10: 10%)
    max_latency_increase: float = 0.10
    # the largest file size increase against the baseline
    max_size_increase: float = 0.05
    # how latency is compared (auto: relative to the teacher when measured together)
    latency: str = choice("auto", GATE_LATENCY_MODES)
    # floor on the INT8 student's top-1 agreement with its float version
    min_int8_agreement: float | None = None
    # a gate the baseline cannot evaluate (metric absent or 0) is SKIPPED;
    # it fails unless this is set
    allow_missing: bool = False

    @property
    def active(self) -> bool:
        """Whether a finished run is gated at all (a baseline to compare with, or a floor)."""
        return self.baseline is not None or self.min_int8_agreement is not None

    def __post_init__(self):
        check_choices(self)
        check(
            self.min_int8_agreement is None or 0 <= self.min_int8_agreement <= 1,
            f"min_int8_agreement: expected 0..1 or null, got {self.min_int8_agreement}",
        )
        for name in ("max_accuracy_drop", "max_latency_increase", "max_size_increase"):
            check(getattr(self, name) >= 0, f"{name}: expected >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class StageSpec:
    """One entry of the recipe's ordered ``stages`` list.

    ``kind`` picks the stage function; ``name`` (the kind unless the entry sets ``name:``) names
    its output folder and lets later stages refer to it (e.g. a second ``distill`` that learns
    from the first one's student).
    """

    name: str
    config: Any
    kind: str = ""

    def __post_init__(self):
        if not self.kind:
            object.__setattr__(self, "kind", self.name)


@dataclass(frozen=True)
class Recipe:
    # names the run and its folder, <out>/<name>/
    name: str
    # seeds every stage (stage i runs from seed + i)
    seed: int = 0
    # auto (CUDA when present, else CPU), cpu, cuda or cuda:N
    device: str = "auto"
    # the folder run folders are made in
    out: str = "exported"
    # what the run reads
    data: DataConfig = field(default_factory=DataConfig)
    # the teacher: trained, fine-tuned or loaded
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # the student every distill stage starts from
    student: StudentConfig = field(default_factory=StudentConfig)
    # the CI gates `compress check` applies
    gates: GatesConfig = field(default_factory=GatesConfig)
    stages: tuple[StageSpec, ...] = ()


@dataclass(frozen=True)
class StageKind:
    """One kind of stage, declared once: everything the recipe loader, the pipeline and the CLI
    need to know about it. Adding a stage is one entry in :data:`STAGE_KINDS` plus its module.

    Attributes:
        name: what a recipe's ``stages:`` list calls it.
        config: its config class (the recipe section's fields and defaults).
        run: ``"module:function"`` that runs it, ``function(config, ctx) -> Artifact``; imported
            only when the stage runs, so validating a recipe imports no training code.
        needs: stage kinds that must come earlier in the list.
        network: its artifact is a network later stages learn from or reshape.
        teaches: it trains a student against a teacher with a list of loss terms.
        rank0_only: it trains nothing: in a distributed run only rank 0 runs it.
    """

    name: str
    config: type
    run: str
    needs: tuple[str, ...] = ()
    network: bool = False
    teaches: bool = False
    rank0_only: bool = False


STAGE_KINDS: dict[str, StageKind] = {
    kind.name: kind
    for kind in (
        StageKind(
            "teacher", TeacherStageConfig, "compress.pipeline.stages.teacher:teacher", network=True
        ),
        StageKind(
            "distill",
            DistillConfig,
            "compress.pipeline.stages.distill:distill",
            needs=("teacher",),
            network=True,
            teaches=True,
        ),
        StageKind(
            "prune",
            PruneConfig,
            "compress.pipeline.stages.prune:prune",
            needs=("teacher", "distill"),
            network=True,
            teaches=True,
        ),
        StageKind(
            "quantize",
            QuantizeConfig,
            "compress.pipeline.stages.quantize:quantize",
            needs=("teacher", "distill"),
            network=True,
            teaches=True,
        ),
        StageKind(
            "export",
            ExportConfig,
            "compress.pipeline.stages.export:export",
            needs=("teacher",),
            rank0_only=True,
        ),
        StageKind(
            "bench",
            BenchConfig,
            "compress.pipeline.stages.bench:bench",
            needs=("export",),
            rank0_only=True,
        ),
    )
}
