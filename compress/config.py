"""Typed, frozen configuration of a recipe: one dataclass per section and per stage.

Defaults live here and nowhere else. ``compress.recipe`` turns YAML into these objects and
rejects unknown keys and wrong types with the field's path; ``__post_init__`` checks ranges, so
a config built from Python is validated the same way as one read from YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from compress.errors import RecipeError
from compress.loss_params import LOSSES

UNLABELED = (
    -1
)  # label value of an image from the unlabeled pool (datasets, losses and the loop agree on it)

# Dataset kind -> the reader that loads it, ``(DataConfig) -> DatasetBundle`` (imported on use).
DATASET_KINDS: dict[str, str] = {
    "digits": "compress.data.digits:load_digits",
    "cifar10": "compress.data.cifar:load_cifar10",
    "cifar100": "compress.data.cifar:load_cifar100",
    "npz": "compress.data.npz:load_npz",
    "imagefolder": "compress.data.imagefolder:load_imagefolder",
}


# Field metadata of an option added after runs were recorded, whose default changes nothing: the
# recipe's serialisation leaves it out while it is at its default, so finished stages keep their
# input keys (compress.recipe.serialise).
ADDED_LATER = "added_later"


# Field metadata: the values a field may take (a tuple, a dict's keys, or a function returning
# them, called on use so that registries load lazily): checked by _check_choices, published as
# the field's enum in the recipe's JSON Schema (compress.recipe.schema).
CHOICES = "choices"


def choice(default: Any, options: Any, **metadata: Any) -> Any:
    """A field whose value (each value, for a tuple) is one of ``options``."""
    return field(default=default, metadata={CHOICES: options, **metadata})


def choices_of(f: dataclasses.Field) -> tuple | None:
    """The values field ``f`` may take, or None when it is not a choice."""
    options = f.metadata.get(CHOICES)
    if options is None:
        return None
    return tuple(options() if callable(options) else options)


def _backend_names() -> tuple[str, ...]:
    from compress.bench_backends import BACKENDS

    return tuple(BACKENDS.names())


def _format_names() -> tuple[str, ...]:
    from compress.formats import FORMATS

    return tuple(FORMATS.names())


def _weight_range_names() -> tuple[str, ...]:
    from compress.int8_kernels import WEIGHT_RANGES

    return ("auto", *WEIGHT_RANGES)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RecipeError(message)


def _check_choices(config: Any) -> None:
    """Every choice field of ``config`` holds one of its values (None passes: "not set")."""
    for f in dataclasses.fields(config):
        options = choices_of(f)
        value = getattr(config, f.name)
        if options is None or value is None:
            continue
        if isinstance(value, tuple):
            unknown = [item for item in value if item not in options]
            _check(
                not unknown,
                f"{f.name}: unknown {', '.join(map(repr, unknown))}; expected some of "
                f"{', '.join(map(str, options))}",
            )
        else:
            _check(
                value in options,
                f"{f.name}: expected one of {', '.join(map(str, options))}, got {value!r}",
            )


@dataclass(frozen=True)
class SubsetConfig:
    """Use only the first N (seeded, class-balanced shuffle) images of a split: quick runs."""

    train: int | None = None
    test: int | None = None

    def __post_init__(self):
        for name in ("train", "test"):
            value = getattr(self, name)
            _check(
                value is None or value > 0,
                f"{name}: expected a positive integer or null, got {value}",
            )


@dataclass(frozen=True)
class UnlabeledConfig:
    """Extra images without labels; only the teacher-driven loss terms apply to them."""

    path: str | None = (
        None  # a .npz with `x` (uint8 NHWC) or a folder of images (searched recursively)
    )
    limit: int | None = None  # use at most this many (a seeded random selection)

    def __post_init__(self):
        _check(
            self.limit is None or self.limit > 0,
            f"limit: expected a positive integer or null, got {self.limit}",
        )


@dataclass(frozen=True)
class DataConfig:
    kind: str = choice("digits", DATASET_KINDS)
    path: str | None = None
    image_size: int = 32
    batch_size: int = 128
    eval_batch_size: int = 256
    workers: int = 0
    augment: bool = True
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    unlabeled: UnlabeledConfig = field(default_factory=UnlabeledConfig)

    def __post_init__(self):
        _check_choices(self)
        _check(
            self.kind == "digits" or self.path is not None,
            f"path: dataset kind {self.kind!r} needs a path (or pass --data PATH)",
        )
        _check(8 <= self.image_size <= 1024, f"image_size: expected 8..1024, got {self.image_size}")
        _check(
            self.batch_size > 0, f"batch_size: expected a positive integer, got {self.batch_size}"
        )
        _check(
            self.eval_batch_size > 0,
            f"eval_batch_size: expected a positive integer, got {self.eval_batch_size}",
        )
        _check(self.workers >= 0, f"workers: expected >= 0, got {self.workers}")


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "onecycle", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every training stage (teacher, distill, later prune/QAT)."""

    epochs: int = 1
    optimizer: str = choice("sgd", OPTIMIZERS)
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = choice("cosine", SCHEDULES)
    warmup_epochs: int = 0
    label_smoothing: float = (
        0.0  # teacher only; hurts distillation (Muller et al. 2019), so off by default
    )
    # auto: bf16 autocast on CUDA GPUs that support it (not QAT), else fp32
    precision: str = choice("auto", PRECISIONS)
    channels_last: bool | None = None  # None: on for CUDA
    # torch.compile the training step (worth it on CUDA; compiling costs seconds to minutes)
    compile: bool = False

    def __post_init__(self):
        _check_choices(self)
        _check(self.epochs >= 0, f"epochs: expected >= 0, got {self.epochs}")
        _check(self.lr > 0, f"lr: expected > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"momentum: expected 0 <= momentum < 1, got {self.momentum}")
        _check(self.weight_decay >= 0, f"weight_decay: expected >= 0, got {self.weight_decay}")
        _check(
            0 <= self.warmup_epochs <= max(self.epochs, 0),
            f"warmup_epochs: expected 0..epochs ({self.epochs}), got {self.warmup_epochs}",
        )
        _check(
            0 <= self.label_smoothing < 1,
            f"label_smoothing: expected 0 <= value < 1, got {self.label_smoothing}",
        )


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher: a model name and either a finished checkpoint to load, or pretrained
    ``weights`` to start from and settings to fine-tune (or train) it."""

    model: str = "torchvision:resnet18"
    cifar_stem: bool | None = None  # None: on when data.image_size <= 64
    # the finished teacher: a state_dict of this network for the data's classes, not trained
    checkpoint: str | None = None
    # where training starts: a file, a torchvision/timm name or hf-hub:org/name (docs/models.md)
    weights: str | None = field(default=None, metadata={ADDED_LATER: True})
    # false: load the layers of `weights` that fit and record the rest (true: refuse)
    strict_weights: bool = field(default=True, metadata={ADDED_LATER: True})
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        _check(
            self.checkpoint is None or self.weights is None,
            "weights: give checkpoint (the finished teacher) or weights (a starting point to "
            "fine-tune from), not both",
        )


@dataclass(frozen=True)
class StudentConfig:
    """The student: a model name, and the pretrained ``weights`` distillation starts from."""

    model: str = "torchvision:mobilenet_v2"
    cifar_stem: bool | None = None
    weights: str | None = field(default=None, metadata={ADDED_LATER: True})
    strict_weights: bool = field(default=True, metadata={ADDED_LATER: True})


@dataclass(frozen=True)
class LossConfig:
    """One term of the distillation loss: a registered loss by name, its weight and parameters."""

    name: str = "kd"
    weight: float = 1.0
    params: Any = None  # None: the loss's default parameters

    def __post_init__(self):
        _check(self.weight >= 0, f"weight: expected >= 0, got {self.weight}")
        if self.params is None:
            object.__setattr__(self, "params", LOSSES.get(self.name).params())


@dataclass(frozen=True)
class MixConfig:
    """KD-aware batch augmentation: teacher and student see the same mixed/erased batch.

    mixup (Zhang et al. 2018) and cutmix (Yun et al. 2019) are drawn per batch with probability
    ``prob``; when both alphas are > 0 one of the two is picked at random. cutout (DeVries &
    Taylor 2017) erases one ``cutout``-pixel square per image.
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    cutout: int = 0

    def __post_init__(self):
        _check(
            self.mixup_alpha >= 0,
            f"mixup_alpha: expected >= 0 (0 disables), got {self.mixup_alpha}",
        )
        _check(
            self.cutmix_alpha >= 0,
            f"cutmix_alpha: expected >= 0 (0 disables), got {self.cutmix_alpha}",
        )
        _check(0 <= self.prob <= 1, f"prob: expected 0..1, got {self.prob}")
        _check(self.cutout >= 0, f"cutout: expected >= 0 pixels (0 disables), got {self.cutout}")


@dataclass(frozen=True)
class TeacherStageConfig:
    """The teacher stage takes its settings from the recipe's ``teacher`` section."""


@dataclass(frozen=True)
class DistillSpec:
    """How :func:`compress.distill` trains a student against a frozen teacher: a weighted sum of
    registered loss terms, the optimisation, and the batch mixing both networks see."""

    loss: tuple[LossConfig, ...] = field(default_factory=lambda: (LossConfig(),))
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: MixConfig = field(default_factory=MixConfig)

    def __post_init__(self):
        _check(len(self.loss) > 0, "loss: expected at least one loss term")


@dataclass(frozen=True)
class DistillConfig(DistillSpec):
    """The ``distill`` stage: a :class:`DistillSpec`, the stage whose network teaches, and the
    student it starts from."""

    teacher: str = (
        "teacher"  # the stage whose model teaches: "teacher" or an earlier distill stage's name
    )
    student: StudentConfig | None = None  # None: the recipe's student section
    init_from_teacher: bool = (
        False  # copy every teacher tensor whose name and shape fit the student
    )
    cache_teacher_logits: bool = (
        False  # compute the teacher once per image; needs deterministic inputs
    )


# Pruning criterion -> ``(PruneConfig) -> torch_pruning importance`` (imported on use).
PRUNING_CRITERIA: dict[str, str] = {
    "magnitude": "compress.pruning:magnitude_importance",
    "taylor": "compress.pruning:taylor_importance",
    "bn_scale": "compress.pruning:bn_scale_importance",
    "lamp": "compress.pruning:lamp_importance",
    "random": "compress.pruning:random_importance",
}


LATENCY_PRECISIONS = ("auto", "fp32", "int8")


@dataclass(frozen=True)
class LatencyTarget:
    """A pruning target in measured latency on a runtime, instead of a MACs proxy.

    Give ``latency_ms`` (the pruned network's latency) or ``latency_speedup`` (the unpruned
    network's latency over the pruned one's). Both are measured on ``backend`` (default: the
    recipe's first bench backend) at ``batch_size`` with ``threads`` threads, on the network
    exported in ``precision``: ``auto`` is INT8 when a quantize stage follows the prune stage
    (what will be deployed), else FP32. ``grid`` candidate widths per layer group make the
    per-layer latency table; ``processes`` fresh processes (interleaved) measure each exported
    candidate. ``judge_images``: each cut weighs several plans
    (:func:`compress.latency_pruning.candidate_plans`), each cut on a copy, its BatchNorm
    statistics re-estimated on the stage's ``recalibration_images``, fine-tuned ``judge_steps``
    training batches with the teacher (the stage's loss and lr, cosine to zero; NetAdapt's
    short-term fine-tune), then scored by top-1 on this many other training images (never the
    test split); 0: the importance plan alone. ``judge_steps: 0`` scores right after the
    re-estimation, which did not rank the CIFAR-10 candidates as full fine-tuning did
    (benchmarks/RESULTS.md); 50 and 100 steps did. The fine-tuning batches are drawn once and
    held in memory until the last cut (``judge_steps`` x the batch size images, as the loader
    yields them).
    """

    latency_ms: float | None = None
    latency_speedup: float | None = None
    backend: str | None = choice(None, _backend_names)
    batch_size: int = 1
    threads: int = 1
    precision: str = choice("auto", LATENCY_PRECISIONS)
    grid: int = 8
    processes: int = 5
    judge_images: int = 2048
    judge_steps: int = 100

    @property
    def active(self) -> bool:
        return self.latency_ms is not None or self.latency_speedup is not None

    def __post_init__(self):
        _check_choices(self)
        _check(
            self.latency_ms is None or self.latency_speedup is None,
            "latency_speedup: give only one of latency_ms, latency_speedup",
        )
        _check(
            self.latency_ms is None or self.latency_ms > 0,
            f"latency_ms: expected > 0 milliseconds, got {self.latency_ms}",
        )
        _check(
            self.latency_speedup is None or self.latency_speedup > 1,
            f"latency_speedup: expected a ratio > 1, got {self.latency_speedup}",
        )
        if self.backend is not None:
            from compress.bench_backends import BACKENDS

            _check(
                BACKENDS.get(self.backend).artifact == "onnx",
                f"backend: {self.backend!r} does not run exported .onnx files; a latency target "
                "is measured on an ONNX runtime (e.g. onnxruntime)",
            )
        _check(self.batch_size > 0, f"batch_size: expected > 0, got {self.batch_size}")
        _check(self.threads >= 0, f"threads: expected >= 0, got {self.threads}")
        _check(self.grid >= 2, f"grid: expected >= 2 candidate widths, got {self.grid}")
        _check(self.processes >= 1, f"processes: expected >= 1, got {self.processes}")
        _check(self.judge_images >= 0, f"judge_images: expected >= 0, got {self.judge_images}")
        _check(self.judge_steps >= 0, f"judge_steps: expected >= 0, got {self.judge_steps}")


@dataclass(frozen=True)
class PruneSpec:
    """What structured channel pruning (Torch-Pruning) removes, and how it ranks channels.

    The target is one of ``speedup`` (MACs reduction ratio), ``target_macs`` (absolute MACs of one
    image), ``pruning_ratio`` (fraction of channels removed per layer group) or ``target`` (a
    measured latency, :class:`LatencyTarget`); none given means ``speedup: 2.0``. The library's
    :func:`compress.prune` takes this alone.
    """

    criterion: str = choice("magnitude", PRUNING_CRITERIA)
    norm: int = choice(2, (1, 2))  # p of the group norm ranked by magnitude and lamp
    speedup: float | None = None
    target_macs: int | None = None
    pruning_ratio: float | None = None
    global_ranking: bool = False  # rank channels across layers instead of the same ratio per layer
    round_to: int = 8  # kept channels are a multiple of this (hardware-friendly widths)
    max_layer_ratio: float = 0.9  # no layer group loses more than this fraction of channels
    ignore: tuple[
        str, ...
    ] = ()  # module names or fnmatch patterns never pruned (the classifier never is)
    target: LatencyTarget = field(default_factory=LatencyTarget, metadata={ADDED_LATER: True})

    def __post_init__(self):
        _check_choices(self)
        given = [
            name
            for name in ("speedup", "target_macs", "pruning_ratio")
            if getattr(self, name) is not None
        ] + (["target"] if self.target.active else [])
        if len(given) > 1:
            raise RecipeError(
                f"{given[-1]}: give only one of speedup, target_macs, pruning_ratio, target (got "
                f"{', '.join(given)})"
            )
        _check(
            self.speedup is None or self.speedup > 1,
            f"speedup: expected a MACs reduction ratio > 1, got {self.speedup}",
        )
        _check(
            self.target_macs is None or self.target_macs > 0,
            f"target_macs: expected a positive integer, got {self.target_macs}",
        )
        _check(
            self.pruning_ratio is None or 0 < self.pruning_ratio < 1,
            f"pruning_ratio: expected 0 < ratio < 1, got {self.pruning_ratio}",
        )
        _check(self.round_to >= 1, f"round_to: expected >= 1, got {self.round_to}")
        _check(
            0 < self.max_layer_ratio < 1,
            f"max_layer_ratio: expected 0 < ratio < 1, got {self.max_layer_ratio}",
        )


@dataclass(frozen=True)
class PruneConfig(PruneSpec):
    """The ``prune`` stage: a :class:`PruneSpec` reached in ``steps`` prune / fine-tune rounds on
    the latest student, fine-tuned against the teacher (``train.epochs`` per step)."""

    steps: int = 1
    # training images that re-estimate BatchNorm statistics after each cut, before fine-tuning
    # (compress.batchnorm); 0: fine-tuning starts from the stale statistics
    recalibration_images: int = 2560
    loss: tuple[LossConfig, ...] | None = None  # None: the loss of the latest distill stage
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.01))
    augment: MixConfig = field(default_factory=MixConfig)
    teacher: str = "teacher"

    def __post_init__(self):
        super().__post_init__()
        _check(self.steps >= 1, f"steps: expected >= 1, got {self.steps}")
        _check(
            self.recalibration_images >= 0,
            f"recalibration_images: expected >= 0, got {self.recalibration_images}",
        )
        _check(
            self.loss is None or len(self.loss) > 0,
            "loss: expected at least one loss term, or null for the distill stage's loss",
        )


QUANT_MODES = ("qat", "ptq")
QUANT_TARGETS = ("onnxruntime-cpu", "tensorrt")
CALIBRATION_METHODS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class QuantizeSpec:
    """How :func:`compress.quantize` makes a network INT8: calibrated fake quantization (PTQ),
    with an optional accuracy budget.

    ``target`` fixes the activation type of the exported QDQ graph: uint8 for ONNX Runtime on CPU
    (its fast u8s8 kernels), symmetric int8 for TensorRT. Weights are always int8, symmetric,
    per output channel, with BatchNorm folded into the convolutions. ``weight_range`` chooses
    their scale (:data:`compress.int8_kernels.WEIGHT_RANGES`); ``auto`` is ``pair-limit`` for
    ONNX Runtime on CPU (the file computes the same on x86 CPUs with and without VNNI) and
    ``full`` for TensorRT. ``full`` on CPU is an opt-in for files that run only on VNNI CPUs.

    ``max_drop`` (top-1 points, None: off) is an accuracy budget: the layers quantization hurts
    most are put back in float, one at a time, until the exported file is within ``max_drop`` of
    the float network on held-out images (:mod:`compress.accuracy_budget`); at most
    ``max_float_layers`` (None: all but one).
    """

    target: str = choice("onnxruntime-cpu", QUANT_TARGETS)
    calibration: str = choice("percentile", CALIBRATION_METHODS)
    percentile: float = 99.99
    skip: tuple[str, ...] = ()  # module names or fnmatch patterns whose weights stay FP32
    weight_range: str = choice("auto", _weight_range_names)
    max_drop: float | None = field(default=None, metadata={ADDED_LATER: True})  # top-1 points
    max_float_layers: int | None = field(default=None, metadata={ADDED_LATER: True})  # None: n-1

    def __post_init__(self):
        _check_choices(self)
        _check(
            50 < self.percentile <= 100,
            f"percentile: expected 50 < p <= 100, got {self.percentile}",
        )
        _check(
            self.max_drop is None or 0 <= self.max_drop <= 100,
            f"max_drop: expected top-1 points in 0..100 or null (off), got {self.max_drop}",
        )
        _check(
            self.max_float_layers is None or self.max_float_layers > 0,
            f"max_float_layers: expected a positive integer or null, got {self.max_float_layers}",
        )


@dataclass(frozen=True)
class QuantizeConfig(QuantizeSpec):
    """The ``quantize`` stage: a :class:`QuantizeSpec` applied to the latest student, calibrated
    on ``calibration_images`` training images, then in ``qat`` mode fine-tuned against the
    teacher. With ``max_drop``, ``holdout_images`` training images are set aside for the budget
    (calibration and QAT never see them; the test split is never used)."""

    mode: str = choice("qat", QUANT_MODES)
    calibration_images: int = 512
    loss: tuple[LossConfig, ...] | None = (
        None  # None: the logit terms of the latest distill stage's loss
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.001, weight_decay=0.0))
    augment: MixConfig = field(default_factory=MixConfig)
    teacher: str = "teacher"
    holdout_images: int = field(default=2000, metadata={ADDED_LATER: True})  # with max_drop only

    def __post_init__(self):
        super().__post_init__()
        _check(
            self.calibration_images > 0,
            f"calibration_images: expected > 0, got {self.calibration_images}",
        )
        _check(
            self.loss is None or len(self.loss) > 0,
            "loss: expected at least one loss term, or null for the distill stage's loss",
        )
        _check(
            self.holdout_images > 0,
            f"holdout_images: expected a positive integer, got {self.holdout_images}",
        )


EXPORTERS = ("dynamo", "torchscript")


@dataclass(frozen=True)
class ExportConfig:
    """Export of teacher and student, each file proven against PyTorch on real test images.

    ``formats``: ONNX always (every other format is built from it), plus ``onnx-fp16`` (FP16
    weights and I/O for GPU runtimes) and ``tensorrt`` (an engine, when TensorRT and a GPU are
    present; otherwise a warning and the run goes on). ``batch``: null keeps a dynamic batch
    axis; a number fixes it (some runtimes and accelerators want static shapes).
    """

    formats: tuple[str, ...] = choice(("onnx",), _format_names)
    opset: int = 18
    exporter: str = choice("dynamo", EXPORTERS)
    batch: int | None = None
    tolerance: float = 1e-3
    min_agreement: float = 0.99
    int8_tolerance: float = (
        0.2  # quantized student vs its fake-quantized model: max |diff| / max |logit|
    )
    int8_min_agreement: float = 0.95
    fp16_tolerance: float = (
        0.02  # FP16 file vs the FP32 model: max |diff| / max |logit| (measured: exporters/fp16.py)
    )
    fp16_min_agreement: float = 0.98
    check_samples: int = 256
    simplify: bool = (
        False  # onnxslim graph simplification, verified against PyTorch like any export
    )
    engine_fp16: bool = True  # TensorRT may pick FP16 kernels for float layers
    engine_batch: tuple[int, int, int] = (
        1,
        32,
        64,
    )  # TensorRT optimisation profile: min, opt, max batch
    engine_workspace_mib: int = 2048

    def __post_init__(self):
        _check_choices(self)

        _check(7 <= self.opset <= 23, f"opset: expected 7..23, got {self.opset}")
        _check(
            "onnx" in self.formats,
            "formats: must include onnx (every other format is built from the ONNX file)",
        )
        _check(
            len(set(self.formats)) == len(self.formats),
            f"formats: listed twice in {list(self.formats)}",
        )
        _check(
            self.batch is None or self.batch > 0,
            f"batch: expected a positive integer or null (dynamic), got {self.batch}",
        )
        for name in ("tolerance", "int8_tolerance", "fp16_tolerance"):
            _check(getattr(self, name) > 0, f"{name}: expected > 0, got {getattr(self, name)}")
        for name in ("min_agreement", "int8_min_agreement", "fp16_min_agreement"):
            _check(
                0 <= getattr(self, name) <= 1, f"{name}: expected 0..1, got {getattr(self, name)}"
            )
        _check(self.check_samples > 0, f"check_samples: expected > 0, got {self.check_samples}")
        _check(
            len(self.engine_batch) == 3
            and 1 <= self.engine_batch[0] <= self.engine_batch[1] <= self.engine_batch[2],
            "engine_batch: expected [min, opt, max] with 1 <= min <= opt <= max, got "
            f"{list(self.engine_batch)}",
        )
        _check(
            self.engine_workspace_mib > 0,
            f"engine_workspace_mib: expected > 0, got {self.engine_workspace_mib}",
        )


@dataclass(frozen=True)
class BenchConfig:
    """Latency/throughput/memory/accuracy measurement of exported models.

    ``backends``: where to measure (``compress list backends``); the first one's rows are the
    headline, gated and reported; each further one adds rows with their own ratios.

    ``processes``: fresh processes per model, interleaved between the models of a backend
    (:mod:`compress.benchmark.latency`): one process's latency can sit in one of two modes 1.6x
    apart, so the headline is the median of the processes' medians. Five by default: odd, so
    the median is one process's own number, and two slow processes out of five cannot move it;
    each extra process costs a start-up (0.3-0.5 s for ONNX Runtime on CPU, 2 s for PyTorch)
    and its warm-up, while ``time_budget_s`` is split among the processes, not multiplied.
    pyperf runs 20, which would make a recipe's bench stage several times longer.
    """

    backends: tuple[str, ...] = choice(("onnxruntime",), _backend_names)
    batch_size: int = 64  # the throughput batch; batch 1 is always measured too
    warmup: int = 10  # untimed runs per batch size, in every process
    iterations: int = 100  # timed runs per batch size at most, in every process
    time_budget_s: float | None = 10.0  # per measurement, split among the processes
    threads: int = 0  # 0: the backend's default
    eval_samples: int | None = None  # None: the whole test split
    processes: int = 5  # fresh processes per model, interleaved; 1: the old single process

    def __post_init__(self):
        _check_choices(self)

        _check(bool(self.backends), "backends: expected at least one backend")
        _check(
            len(set(self.backends)) == len(self.backends),
            f"backends: listed twice in {list(self.backends)}",
        )
        _check(self.batch_size > 0, f"batch_size: expected > 0, got {self.batch_size}")
        _check(self.warmup >= 0, f"warmup: expected >= 0, got {self.warmup}")
        _check(self.iterations > 0, f"iterations: expected > 0, got {self.iterations}")
        _check(
            self.time_budget_s is None or self.time_budget_s > 0,
            f"time_budget_s: expected > 0 or null, got {self.time_budget_s}",
        )
        _check(self.threads >= 0, f"threads: expected >= 0, got {self.threads}")
        _check(self.processes > 0, f"processes: expected > 0, got {self.processes}")
        _check(
            self.eval_samples is None or self.eval_samples > 0,
            f"eval_samples: expected > 0 or null, got {self.eval_samples}",
        )


GATE_LATENCY_MODES = ("auto", "relative", "absolute")


@dataclass(frozen=True)
class GatesConfig:
    """Regression gates: after the run, its bench result is compared with ``baseline``.

    ``max_latency_increase`` and ``max_size_increase`` are fractions (0.10 = 10%). ``latency``:
    ``relative`` compares each model's batch-1 latency as a ratio to the run's reference model
    (the teacher), ``absolute`` in milliseconds, ``auto`` relative when both results have it.
    """

    baseline: str | None = (
        None  # a bench.json, its bench/ folder or a run folder; null: no comparison
    )
    max_accuracy_drop: float = 0.5  # top-1 points
    max_latency_increase: float = 0.10
    max_size_increase: float = 0.05
    latency: str = choice("auto", GATE_LATENCY_MODES)
    min_int8_agreement: float | None = (
        None  # floor on the INT8 student's top-1 agreement with its float version
    )
    # a gate the baseline cannot evaluate (metric absent or 0) is SKIPPED;
    # it fails unless this is set
    allow_missing: bool = False

    @property
    def active(self) -> bool:
        """Whether a finished run is gated at all (a baseline to compare with, or a floor)."""
        return self.baseline is not None or self.min_int8_agreement is not None

    def __post_init__(self):
        _check_choices(self)
        _check(
            self.min_int8_agreement is None or 0 <= self.min_int8_agreement <= 1,
            f"min_int8_agreement: expected 0..1 or null, got {self.min_int8_agreement}",
        )
        for name in ("max_accuracy_drop", "max_latency_increase", "max_size_increase"):
            _check(getattr(self, name) >= 0, f"{name}: expected >= 0, got {getattr(self, name)}")


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
    name: str
    seed: int = 0
    device: str = "auto"
    out: str = "exported"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
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
        StageKind("teacher", TeacherStageConfig, "compress.stages.teacher:teacher", network=True),
        StageKind(
            "distill",
            DistillConfig,
            "compress.stages.distill:distill",
            needs=("teacher",),
            network=True,
            teaches=True,
        ),
        StageKind(
            "prune",
            PruneConfig,
            "compress.stages.prune:prune",
            needs=("teacher", "distill"),
            network=True,
            teaches=True,
        ),
        StageKind(
            "quantize",
            QuantizeConfig,
            "compress.stages.quantize:quantize",
            needs=("teacher", "distill"),
            network=True,
            teaches=True,
        ),
        StageKind(
            "export",
            ExportConfig,
            "compress.stages.export:export",
            needs=("teacher",),
            rank0_only=True,
        ),
        StageKind(
            "bench", BenchConfig, "compress.stages.bench:bench", needs=("export",), rank0_only=True
        ),
    )
}
