"""The library: distill, prune, quantize, export and bench any ``nn.Module`` with your own data,
no recipe, run folder or stage involved.

    import compress
    student = compress.distill(student, teacher, train_loader,
                               losses=[compress.loss("kd", temperature=4)], epochs=30)
    student = compress.prune(student, example_inputs, compress.PruneSpec(speedup=2.0),
                             finetune=lambda m, step: ...)
    qmodel = compress.quantize(student, calibration_batches)
    qmodel = compress.distill(qmodel, student, train_loader,
                              epochs=2, lr=1e-3)    # QAT: the INT8 graph distilled from its
                                                    # float self (or from the teacher)
    qmodel = compress.keep_float(qmodel, student, holdout_loader,
                                 max_drop=0.5)      # float layers until within 0.5 points
    record = compress.export(qmodel, "student.onnx",
                             check_inputs=images)   # verified, INT8 portability proven
    result = compress.bench({"teacher": "teacher.onnx", "student": "student.onnx"},
                            data=(uint8_images, labels))

Loaders yield ``(images, labels)`` batches of float tensors exactly as the network takes them
(already normalised); the recipe's stages call the same functions underneath with their own
uint8 loaders and on-device augmentation. Every function works in place where it can and
returns the network, so calls chain.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from compress.benchmark.spec import BenchConfig
from compress.core.records import PruneStep, QuantSpec
from compress.data.spec import MixConfig
from compress.errors import StageError
from compress.exporters.spec import ExportConfig
from compress.nets.modes import evaluating
from compress.pruning.spec import PruneSpec
from compress.quantization.spec import QuantizeSpec
from compress.training.loop import EpochLog
from compress.training.losses import LOSSES
from compress.training.spec import DistillSpec, LossConfig
from compress.training.teaching import LoopSettings

if TYPE_CHECKING:
    from compress.benchmark.rows import BenchResult


def loss(name: str = "kd", *, weight: float = 1.0, **params: Any) -> LossConfig:
    """One distillation loss term by name (``compress list losses``) with its parameters,
    e.g. ``loss("kd", temperature=4, alpha=0.9)`` or ``loss("ce", weight=0.5)``."""
    return LossConfig(name=name, weight=weight, params=LOSSES.get(name).params(**params))


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    train_loader: Iterable,
    spec: DistillSpec | None = None,
    *,
    test_loader: Iterable | None = None,
    loop: LoopSettings | None = None,
    teacher_logits: torch.Tensor | None = None,
    recalibrate_batchnorm: bool | None = None,
    history: list[EpochLog] | None = None,
    losses: Iterable[LossConfig] | None = None,
    epochs: int | None = None,
    augment: MixConfig | None = None,
    **train: Any,
) -> nn.Module:
    """Train ``student`` in place against the frozen ``teacher`` and return it.

    With ``teacher=None`` and ``losses=[loss("ce")]`` this is plain supervised training (how
    a teacher is trained); every other loss needs the teacher.

    Args:
        spec: the loss terms, optimisation and batch mixing (the recipe's ``distill`` section
            is one); default Hinton KD (T=4, alpha=0.9), one epoch of SGD.
        test_loader: evaluated after every epoch (top-1 in ``history``), if given.
        loop: how batches are prepared, where training runs, progress and the epoch
            checkpoint (:class:`~compress.training.teaching.LoopSettings`); default: batches as
            given, on the student's device, quietly.
        teacher_logits: the teacher's logits for every training image, when the loader also
            yields each batch's indices: the teacher is not run.
        recalibrate_batchnorm: re-estimate the BatchNorm statistics on the first 2,048
            training images after training (:mod:`compress.training.batchnorm`); None: when they
            update slowly (momentum below 0.1: torchvision's MobileNetV3, EfficientNet), so after a
            short run they would still describe the early weights. Pass True for a student
            that started from another dataset's weights.
        history: a list to append one :class:`~compress.training.loop.EpochLog` per epoch to.
        losses: override ``spec``'s loss terms (:func:`loss`).
        epochs: override ``spec.train.epochs``.
        augment: override ``spec``'s batch mixing.
        **train: override any :class:`~compress.training.spec.TrainConfig` field of ``spec``
            (``lr``, ``optimizer``, ``schedule``, ``weight_decay``, ...).
    """
    from compress.training.batchnorm import RECALIBRATION_IMAGES, lagging_batchnorm
    from compress.training.batchnorm import recalibrate_batchnorm as recalibrate
    from compress.training.teaching import frozen, train_with_teacher

    spec = _distill_spec(spec, losses, epochs, augment, train)
    loop = loop or LoopSettings()
    device = loop.device if loop.device is not None else _device_of(student)
    if teacher is None:
        needing = [term.name for term in spec.loss if term.name != "ce"]
        if needing:
            raise ValueError(
                f"distill: the loss terms {', '.join(needing)} need a teacher; pass one, or train "
                "with losses=[loss('ce')]"
            )
        teacher = nn.Identity()  # never called: cross-entropy alone skips the teacher's forward
    logs = train_with_teacher(
        student.to(device),
        frozen(teacher.to(device)),
        spec.loss,
        spec.train,
        spec.augment,
        loaders=(train_loader, test_loader),
        prep=loop.inputs,
        device=device,
        desc=loop.desc,
        show_progress=loop.show_progress,
        checkpoint=loop.checkpoint,
        checkpoint_key=loop.checkpoint_key,
        cache=teacher_logits,
    )
    if history is not None:
        history.extend(logs)
    if recalibrate_batchnorm is None:
        recalibrate_batchnorm = lagging_batchnorm(student)
    if recalibrate_batchnorm:
        recalibrate(student, _inputs_of(train_loader, device, RECALIBRATION_IMAGES, loop))
    return student


def _distill_spec(spec, losses, epochs, augment, train) -> DistillSpec:
    """``spec`` (default :class:`DistillSpec`) with the keyword overrides of :func:`distill`."""
    spec = spec or DistillSpec()
    overrides = train | ({"epochs": epochs} if epochs is not None else {})
    return dataclasses.replace(
        spec,
        loss=tuple(losses) if losses is not None else spec.loss,
        augment=augment or spec.augment,
        train=dataclasses.replace(spec.train, **overrides),
    )


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor,
    spec: PruneSpec | None = None,
    *,
    steps: int = 1,
    num_classes: int | None = None,
    finetune: Callable[[nn.Module, int], None] | None = None,
    gradient_fn: Callable[[nn.Module], None] | None = None,
    calibration_data: Iterable | None = None,
    calibration_images: int | None = None,
    loop: LoopSettings | None = None,
    judge: Callable[[nn.Module], float] | None = None,
    score: Callable[[nn.Module], float] | None = None,
    history: list[PruneStep] | None = None,
    log: Callable[[str], None] | None = None,
    latency_cache: Path | None = None,
    resume: tuple[Path, str] | None = None,
) -> nn.Module:
    """Prune ``model``'s channels in place (Torch-Pruning) to ``spec``'s target and return it.

    With ``steps`` > 1 the MACs go down geometrically, and ``finetune(model, step)`` runs after
    each step (e.g. a call of :func:`distill`); build optimisers inside it, as the pruned
    parameters are new tensors. The classifier (every layer with ``num_classes`` outputs,
    default: read off ``model(example_inputs)``) is never pruned.

    Args:
        spec: criterion, target (``speedup``, ``target_macs``, ``pruning_ratio``, or a measured
            latency: ``target=LatencyTarget(latency_speedup=2.0)``, on ONNX Runtime in FP32
            unless its ``backend`` and ``precision`` say otherwise), widths' ``round_to``,
            ``max_layer_ratio``, ``ignore`` patterns; default: 2x fewer MACs by magnitude.
        gradient_fn: runs ``loss.backward()`` on real batches, for the ``taylor`` criterion.
        calibration_data: input batches (or ``(inputs, labels)`` batches) that re-estimate the
            BatchNorm statistics after each cut, before ``finetune``
            (:func:`compress.training.batchnorm.recalibrate_batchnorm`); a few thousand images, read
            again at every step (a shuffling loader gives fresh ones). Without it a cut leaves
            stale statistics and the network near chance until fine-tuned.
        calibration_images: read only the first this many images of ``calibration_data``.
        loop: prepares ``calibration_data``'s batches (the ``prepare`` of a
            :class:`~compress.training.teaching.LoopSettings`, without augmentation); default:
            as they come.
        judge: for a latency target, scores a cut copy of the network (higher is better, e.g.
            top-1 on held-out images after
            :func:`compress.training.batchnorm.recalibrate_batchnorm` and
            a few fine-tuning steps, as the prune stage's judge does);
            each cut then takes the best of :func:`compress.pruning.latency.candidate_plans`.
            None: the importance plan.
        score: top-1 of the network (e.g. on a test split): recorded after each cut, after the
            re-estimation and after fine-tuning in ``history``.
        history: a list to append one :class:`~compress.core.records.PruneStep` per step to.
        log: called with one line per step (and per latency measurement).
        latency_cache: the folder a latency target keeps its per-layer latency table in (None:
            a temporary one), so a later call on the same network and machine measures nothing
            again.
        resume: ``(folder, key)``: each latency cut is recorded there, and a call with the same
            key replays the recorded cut instead of planning and measuring again, so a resumed
            run gets the network its fine-tuning checkpoints belong to.

    Raises:
        StageError: the target cannot be reached within ``max_layer_ratio`` (or, for a latency,
            is not met by measurement), or Torch-Pruning fails on the network (one line, naming
            the layer where the cut network breaks); the network is left as it was before the
            failing step. Channels Torch-Pruning cannot follow (a channel shuffle, a split at
            sizes the forward holds, weights used outside their layer) keep their width instead
            (:func:`compress.pruning.channel_flow.frozen_layers`).
    """
    from compress.nets.models import count_params_macs
    from compress.pruning.channels import ChannelPruner, step_targets
    from compress.training.batchnorm import recalibrate_batchnorm

    spec = spec or PruneSpec()
    device = _device_of(model)
    say = log or (lambda line: None)

    def calibration(limit: int | None = None) -> list[torch.Tensor]:
        """One read of ``calibration_data``: at most ``calibration_images`` and ``limit``."""
        caps = [n for n in (limit, calibration_images) if n]
        return _inputs_of(calibration_data, device, min(caps) if caps else None, loop)

    if num_classes is None:
        with torch.no_grad():
            num_classes = int(model.eval()(example_inputs).shape[-1])
    _, channels, size, _ = example_inputs.shape
    _, macs_before = count_params_macs(model, size, channels)
    if spec.target.active:
        sample = None if calibration_data is None else calibration(LATENCY_CALIBRATION_IMAGES)
        pruner = _latency_pruner(
            model, example_inputs, spec, num_classes, sample, gradient_fn, judge, latency_cache, say
        )
        goals = pruner.step_goals(steps)
    else:
        pruner = ChannelPruner(model, example_inputs, spec, num_classes=num_classes, rounds=steps)
        goals = step_targets(spec, macs_before, steps)
    for step, goal in enumerate(goals, start=1):
        latency = None
        if spec.target.active:
            cut = (
                pruner.cut(goal)
                if resume is None
                else pruner.recorded_cut(goal, resume[0] / f"latency-cut-{step}.json", resume[1])
            )
            latency = cut.to_json()
            if step == len(goals):
                pruner.judge = None  # what it holds (fine-tuning batches) is not needed any more
        else:
            pruner.prune(goal, gradient_fn)
        params, macs = count_params_macs(model, size, channels)
        top1_pruned = score(model) if score else None
        top1_recalibrated = None
        if calibration_data is not None:
            recalibrate_batchnorm(model, calibration())
            top1_recalibrated = score(model) if score else None
        say(_step_line(step, len(goals), macs_before, macs, top1_pruned, top1_recalibrated))
        if finetune is not None:
            finetune(model, step)
        top1 = top1_pruned if top1_recalibrated is None else top1_recalibrated
        if score is not None and finetune is not None:
            top1 = score(model)
        record = PruneStep(
            target_macs=None if spec.target.active else goal,
            macs=macs,
            params=params,
            top1_pruned=top1_pruned,
            top1_recalibrated=top1_recalibrated,
            top1=top1,
            latency=latency,
        )
        if history is not None:
            history.append(record)
    return model


LATENCY_CALIBRATION_IMAGES = 256  # an INT8 candidate's scales do not change its latency


def _step_line(step, steps, macs_before, macs, top1_pruned, top1_recalibrated) -> str:
    line = f"prune step {step}/{steps}: {macs:,} MACs ({macs_before / macs:.2f}x fewer)"
    if top1_pruned is not None:
        line += f", top-1 {top1_pruned:.2f}%"
        if top1_recalibrated is not None:
            line += f", {top1_recalibrated:.2f}% with BatchNorm recalibrated"
        line += " before fine-tuning"
    return line


def quantize(
    model: nn.Module,
    calibration_data: Iterable,
    spec: QuantizeSpec | None = None,
    *,
    holdout: Iterable | None = None,
    **overrides: Any,
) -> nn.Module:
    """The INT8 fake-quantized copy of ``model`` (BatchNorm folded), calibrated and ready to
    export, or to fine-tune with :func:`distill` (quantization-aware training).

    Args:
        calibration_data: batches of inputs, or ``(inputs, labels)`` batches; a few thousand
            images are enough.
        spec: how (the recipe's ``quantize`` section is one): ``target`` ``onnxruntime-cpu``
            (uint8 activations) or ``tensorrt`` (int8, zero point 0); ``skip``, module names
            or patterns kept in float; ``weight_range`` ``auto`` (portable across CPUs with and
            without VNNI on ``onnxruntime-cpu``) or a name of ``compress list weight-ranges``;
            ``calibration`` ``minmax``, ``percentile``, ``mse`` or ``auto`` (each, the best
            top-1 on ``holdout`` kept: :func:`calibration_candidates`); and an accuracy budget,
            ``max_drop`` top-1 points: after calibration, :func:`keep_float` puts the most
            sensitive layers back in float until the exported file is within it on
            ``holdout`` (to apply it after QAT instead, call :func:`keep_float` then).
        holdout: ``(inputs, labels)`` batches the calibration method and the budget are
            judged on (needed with ``calibration: auto`` and ``max_drop``): images kept out of
            ``calibration_data`` and of training, not the test set.
        **overrides: any :class:`~compress.quantization.spec.QuantizeSpec` field, e.g.
            ``skip=("fc",)``.

    Returns:
        A ``torch.fx.GraphModule`` whose ``quant_spec`` says how it was quantized,
        ``calibration_method`` which method set its ranges and ``calibration_candidates`` the
        methods tried with their held-out top-1 (with ``max_drop``, also its
        ``accuracy_budget`` record).
    """
    spec = dataclasses.replace(spec or QuantizeSpec(), **overrides)
    batches = _inputs_of(calibration_data, _device_of(model))
    if not batches:
        raise ValueError("quantize: calibration_data holds no batch")
    if spec.max_drop is not None and holdout is None:
        raise ValueError("quantize: max_drop needs holdout, the (inputs, labels) to measure it on")
    if spec.calibration == "auto" and holdout is None:
        raise ValueError(
            "quantize: calibration auto keeps the method with the best top-1 on holdout; pass "
            "holdout=(inputs, labels) batches, or name a method"
        )
    candidates = calibration_candidates(model, batches, spec, holdout)
    qmodel = candidates[0].network.eval()
    qmodel.calibration_candidates = [c.to_json() for c in candidates]
    if spec.max_drop is not None:
        qmodel = _within_budget(qmodel, model, batches, holdout, spec, candidates[0])
    if spec.float_where_slower:
        qmodel = float_where_slower(qmodel, model, batches[0], batch_size=spec.speed_batch_size)
    return qmodel


def _within_budget(
    qmodel, model, batches, holdout, spec: QuantizeSpec, best: CalibrationCandidate
) -> nn.Module:
    """:func:`keep_float` after PTQ: each candidate calibrated again as ``best`` was."""
    return keep_float(
        qmodel,
        model,
        holdout,
        max_drop=spec.max_drop,
        max_float_layers=spec.max_float_layers,
        calibration_data=batches,
        calibration=best.method,
        percentile=spec.percentile,
        bias_correction=best.bias_corrected,
    )


@dataclasses.dataclass
class CalibrationCandidate:
    """One INT8 network to choose from (a PTQ method of :func:`calibration_candidates`, or
    QAT): its method, and on the held-out images its top-1, agreement with the float network and
    KL divergence from it (None without them)."""

    method: str
    network: nn.Module
    holdout_top1: float | None
    holdout_agreement: float | None = None
    holdout_kl: float | None = None
    bias_corrected: bool = False  # PTQ with :mod:`compress.quantization.bias_correction`

    @property
    def name(self) -> str:
        """The method, ``+bias`` when its biases were corrected (``percentile+bias``)."""
        return f"{self.method}+bias" if self.bias_corrected else self.method

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "bias_corrected": self.bias_corrected,
            "holdout_top1": self.holdout_top1,
            "holdout_agreement": self.holdout_agreement,
            "holdout_kl": self.holdout_kl,
        }

    def summary(self) -> str:
        """One line: ``mse+bias: held-out top-1 97.00%, agreement 99.67%, KL 0.0017``."""
        if self.holdout_top1 is None:
            return f"{self.name}: no held-out images"
        return (
            f"{self.name}: held-out top-1 {self.holdout_top1:.2f}%, agreement "
            f"{100 * self.holdout_agreement:.2f}%, KL {self.holdout_kl:.4f}"
        )

    @property
    def rank(self) -> tuple[float, ...]:
        """What decides between candidates, higher first: see :func:`holdout_rank`."""
        return holdout_rank(self.holdout_top1, self.holdout_agreement, self.holdout_kl)


def holdout_rank(
    top1: float | None, agreement: float | None, kl: float | None = None
) -> tuple[float, ...]:
    """Held-out top-1 first; on a tie, agreement with the float network on the same images,
    then the smaller mean KL divergence of the float network's class probabilities from it.

    Why the later keys: a few hundred held-out images often leave candidates at the same top-1
    (one image is 0.3 points), while agreement counts every flipped prediction, right or wrong,
    and the KL divergence measures how far every output moved, so it almost never ties; staying
    with the float network is what INT8 is for (measured: MobileNetV3 at 224 px, PTQ and QAT
    both 96.67% and 99.33% agreement on 300 held-out images; on the test split PTQ 98.99%
    agreement, QAT 100%).
    """
    return (top1 or 0.0, agreement or 0.0, -(kl if kl is not None else float("inf")))


def calibration_candidates(
    model: nn.Module,
    batches: list[torch.Tensor],
    spec: QuantizeSpec,
    holdout: Iterable | None,
    log: Callable[[str], None] | None = None,
) -> list[CalibrationCandidate]:
    """The PTQ networks of ``model`` to choose from, best first: one per method of
    ``compress.quantization.spec.CALIBRATION_METHODS`` with ``calibration: auto``, else the one
    ``spec`` names; each also with its biases corrected
    (:mod:`compress.quantization.bias_correction`) when ``spec.bias_correction`` is None and
    ``holdout`` is given, or only that way when it is true. Ranked by :func:`holdout_rank` on
    ``holdout``; ties go to the earlier method, and uncorrected before corrected (the smaller
    change). ``log`` gets one line per candidate (at 224 px each takes tens of seconds)."""
    from compress.quantization.bias_correction import correct_bias
    from compress.quantization.fake_quant import calibrate, clone, prepare_quantized
    from compress.quantization.spec import CALIBRATION_METHODS

    held = list(holdout) if holdout is not None else None
    methods = CALIBRATION_METHODS if spec.calibration == "auto" else (spec.calibration,)
    corrections = bias_corrections(spec.bias_correction, held is not None)
    reference_logits = _held_out_logits(model, held) if held else None
    candidates = []
    for method in methods:
        calibrated = prepare_quantized(
            model.eval(),
            target=spec.target,
            skip=spec.skip,
            example_inputs=batches[0],
            weight_range=spec.weight_range,
            integer_products=spec.integer_products,
        )
        calibrate(calibrated, batches, method=method, percentile=spec.percentile)
        calibrated.calibration_method = method
        for corrected in corrections:
            qmodel = clone(calibrated) if corrected and False in corrections else calibrated
            if corrected:
                correct_bias(qmodel, batches)
            scores = _scores_against(qmodel, held, reference_logits) if held else (None, None, None)
            candidates.append(CalibrationCandidate(method, qmodel, *scores, corrected))
            if log is not None:
                log(f"PTQ {candidates[-1].summary()}")
    return sorted(
        candidates,
        key=lambda c: (tuple(-k for k in c.rank), methods.index(c.method), c.bias_corrected),
    )


def bias_corrections(setting: bool | None, held_out: bool) -> tuple[bool, ...]:
    """The PTQ candidates to build for ``spec.bias_correction``: without (False), with (True),
    or both where held-out images can decide between them."""
    if setting is None:
        return (False, True) if held_out else (False,)
    return (setting,)


def holdout_top1(network: nn.Module, holdout: Iterable) -> float:
    """Top-1 (%) of ``network`` on ``(inputs, labels)`` batches already prepared as it takes
    them (held-out images: what PTQ and QAT candidates are judged on)."""
    from compress.training.loop import evaluate

    return evaluate(network, holdout, LoopSettings().inputs, _device_of(network))["top1"]


@torch.no_grad()
def holdout_scores(
    network: nn.Module, reference: nn.Module, holdout: Iterable
) -> tuple[float, float, float]:
    """What :func:`holdout_rank` ranks, in one pass over the held-out ``(inputs, labels)``
    batches: ``network``'s top-1 (%), the fraction of images on which it and ``reference`` (the
    float network it was quantized from) predict the same class, and the mean KL divergence of
    ``reference``'s class probabilities from ``network``'s."""
    held = list(holdout)
    return _scores_against(network, held, _held_out_logits(reference, held))


@torch.no_grad()
def _held_out_logits(reference: nn.Module, held: list) -> list[torch.Tensor]:
    """``reference``'s logits on each held-out batch: computed once for all candidates."""
    with evaluating(reference):
        return [reference(inputs).float() for inputs, _ in held]


@torch.no_grad()
def _scores_against(
    network: nn.Module, held: list, reference_logits: list[torch.Tensor]
) -> tuple[float, float, float]:
    correct = same = total = 0
    divergence = 0.0
    with evaluating(network):
        for (inputs, labels), theirs in zip(held, reference_logits, strict=True):
            ours = network(inputs).float()
            correct += int((ours.argmax(1) == labels.to(ours.device)).sum())
            same += int((ours.argmax(1) == theirs.argmax(1)).sum())
            divergence += float(
                torch.nn.functional.kl_div(
                    ours.log_softmax(1), theirs.log_softmax(1), log_target=True, reduction="sum"
                )
            )
            total += len(inputs)
    total = max(total, 1)
    return 100.0 * correct / total, same / total, divergence / total


def keep_float(
    qmodel: nn.Module,
    model: nn.Module,
    holdout: Iterable,
    *,
    max_drop: float,
    max_float_layers: int | None = None,
    calibration_data: Iterable | None = None,
    calibration: str | None = None,
    percentile: float = 99.99,
    bias_correction: bool = False,
) -> nn.Module:
    """Meet an accuracy budget: the layers of the INT8 ``qmodel`` that quantization hurts most
    go back to float, one at a time, until its exported ONNX file (run in ONNX Runtime, float
    layers really in float) is within ``max_drop`` top-1 points of the float ``model`` on
    ``holdout``; see :mod:`compress.quantization.budget` for the ranking and the search.

    Args:
        qmodel: from :func:`quantize` of ``model``, calibrated, perhaps fine-tuned (QAT).
        model: the float network.
        holdout: ``(inputs, labels)`` batches that calibration and training did not see (a
            slice of the training data, never the test set).
        max_drop: top-1 points (0.5 = half a point).
        max_float_layers: give up after this many float layers; None: all but one.
        calibration_data: after PTQ, the calibration batches: each network with more layers in
            float is calibrated again (``calibration``, ``percentile``), so the result is the
            PTQ network with those layers in ``skip``. None (after QAT): the ranges QAT trained
            with are kept.
        calibration: the method; None: the one ``qmodel`` was calibrated with.
        bias_correction: after calibrating again, correct the biases again
            (:func:`compress.quantization.bias_correction.correct_bias`), as ``qmodel``'s were.

    Returns:
        The network to export: ``qmodel`` when it is within the budget already, else a new one
        with the chosen layers in float; its ``accuracy_budget`` attribute is the
        :class:`~compress.quantization.budget.AccuracyBudget` record (``.float_layers``, ``.steps``,
        ``.ranking``).

    Raises:
        BudgetNotMet: the budget cannot be met within ``max_float_layers`` float layers (its
            ``budget`` attribute holds the search).
    """
    from compress.exporters.network import run_exported
    from compress.quantization.bias_correction import correct_bias
    from compress.quantization.budget import keep_float as search
    from compress.quantization.fake_quant import calibrate

    if max_drop < 0:
        raise ValueError(f"keep_float: max_drop must be >= 0 top-1 points, got {max_drop}")
    recalibrate = None
    method = calibration or getattr(qmodel, "calibration_method", "percentile")
    if calibration_data is not None:
        batches = _inputs_of(calibration_data, _device_of(model))

        def recalibrate(network: nn.Module) -> None:
            calibrate(network, batches, method=method, percentile=percentile)
            if bias_correction:
                correct_bias(network, batches)

    network, record = search(
        qmodel,
        model,
        list(holdout),
        max_drop=max_drop,
        max_float_layers=max_float_layers,
        run_file=run_exported,
        recalibrate=recalibrate,
    )
    network.accuracy_budget = record
    return network


def float_where_slower(
    qmodel: nn.Module,
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    backend: str = "onnxruntime",
    batch_size: int = 1,
    threads: int = 1,
    processes: int = 3,
) -> nn.Module:
    """Leave in float the layers of the INT8 ``qmodel`` that run slower in INT8 on ``backend``.

    Each INT8 convolution and linear layer is timed alone as an integer kernel and in float
    between INT8 layers (a convolution's transitions included; a linear layer's output is float
    either way); the layers faster in float are put back in float together, the
    whole network is exported both ways and measured in ``processes`` interleaved fresh
    processes, and the mixed network is returned only if it is measured faster (rules and
    thresholds: :mod:`compress.quantization.speed`). Float layers keep ``qmodel``'s weights and
    activation ranges (nothing is calibrated again), so accuracy can only move toward the
    float network.

    Args:
        qmodel: from :func:`quantize` of ``model`` (calibrated, perhaps fine-tuned).
        model: the float network.
        example_inputs: a batch shaped like the real input.
        backend: a bench backend that times single layers (``compress list backends``).
        batch_size: the batch the latency is judged at.
        threads: the runtime's threads.
        processes: fresh processes per network for the whole-network measurement.

    Returns:
        ``qmodel`` or the mixed network; either way its ``float_where_slower`` attribute is the
        :class:`~compress.quantization.speed.FloatWhereSlower` record.
    """
    from compress.benchmark.backend_table import BACKENDS
    from compress.pruning.latency import interleaved_p50
    from compress.pruning.latency_table import FLOAT_IN_INT8, layer_sites, measure_tables
    from compress.quantization.fake_quant import quantized_layers, with_float_layers
    from compress.quantization.speed import FloatWhereSlower, LayerSpeed, faster_in_float

    runtime = BACKENDS.get(backend)
    inputs = example_inputs[:1].cpu()
    integer = set(quantized_layers(qmodel))
    sites = [
        site
        for site in layer_sites(model.eval(), inputs.to(_device_of(model)))
        if site.name in integer  # convolutions and linear layers (a transformer's too)
    ]
    cells = {site.name: {(site.in_channels, site.out_channels)} for site in sites}
    int8, floated = measure_tables(
        sites,
        cells,
        runtime,
        batch_size=batch_size,
        threads=threads,
        precisions=("int8", FLOAT_IN_INT8),
    )
    layers = [
        LayerSpeed(
            site.name,
            int8.cells[(site.name, site.in_channels, site.out_channels)],
            floated.cells[(site.name, site.in_channels, site.out_channels)],
        )
        for site in sites
    ]
    record = FloatWhereSlower(backend, batch_size, threads, tuple(layers), faster_in_float(layers))
    result = qmodel
    if record.float_layers:
        mixed = with_float_layers(
            qmodel,
            model,
            [*qmodel.quant_spec.skip, *record.float_layers],
            example_inputs=example_inputs,
        )
        with tempfile.TemporaryDirectory(prefix="compress-float-where-slower-") as folder:
            paths = [
                _export_for_timing(network, Path(folder) / f"{name}.onnx", inputs)
                for name, network in (("int8", qmodel), ("mixed", mixed))
            ]
            int8_ms, mixed_ms = interleaved_p50(runtime, paths, batch_size, threads, processes)
        record = dataclasses.replace(record, int8_ms=tuple(int8_ms), mixed_ms=tuple(mixed_ms))
        record = dataclasses.replace(record, kept=record.pays)
        if record.kept:
            result = mixed
    result.float_where_slower = record
    return result


def _export_for_timing(network: nn.Module, path: Path, inputs: torch.Tensor) -> Path:
    """``network`` as its deployed ONNX file (QDQ for a quantized one), checked on one input."""
    from compress.exporters.network import export_network
    from compress.quantization.fake_quant import clone

    export_network(
        clone(network).cpu().eval(),
        path,
        ExportConfig(),
        inputs.numpy(),
        {},
        getattr(network, "quant_spec", None),
        image_size=inputs.shape[-1],
        in_channels=inputs.shape[1],
        warn=False,
    )
    return path


def export(
    model: nn.Module,
    path: str | Path,
    spec: ExportConfig | None = None,
    *,
    check_inputs: torch.Tensor | np.ndarray,
    metadata: Mapping[str, str] | None = None,
    **overrides: Any,
) -> dict:
    """Write ``model`` as one ONNX file and prove it: ONNX Runtime must reproduce the PyTorch
    outputs on ``check_inputs`` within the tolerance of its precision, and an INT8 model (from
    :func:`quantize`) must be a QDQ graph whose weights compute the same on every CPU.
    Multi-branch blocks (timm's RepVGG, MobileOne, FastViT, RepViT) are written folded, one
    convolution each, as they are deployed (``model`` itself is not changed).

    Args:
        spec: the recipe's ``export`` section type (:class:`~compress.exporters.spec.ExportConfig`).
        check_inputs: a batch shaped like the real input (normalised as the model takes it).
        metadata: extra ``metadata_props`` strings.
        **overrides: any :class:`~compress.exporters.spec.ExportConfig` field (``opset``,
            ``exporter``, ``batch``, ``tolerance``, ``int8_tolerance``, ``simplify``, ...).

    Returns:
        The verification record (max |diff|, top-1 agreement, and for INT8 the graph check and
        the portability verdict).

    Raises:
        ExportError: the export failed or the file does not reproduce the model.
    """
    from compress.exporters.network import export_network

    images = (
        check_inputs.detach().cpu().numpy()
        if isinstance(check_inputs, torch.Tensor)
        else np.asarray(check_inputs)
    )
    images = images.astype(np.float32)
    quantization: QuantSpec | None = getattr(model, "quant_spec", None)
    return export_network(
        model.cpu().eval(),
        Path(path),
        dataclasses.replace(spec or ExportConfig(), **overrides),
        images,
        dict(metadata or {}),
        quantization,
        image_size=images.shape[-1],
        in_channels=images.shape[1],
    )


def bench(
    models: Mapping[str, str | Path],
    spec: BenchConfig | None = None,
    *,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    reference: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    **overrides: Any,
) -> BenchResult:
    """Measure exported files side by side: latency per batch size, memory, size and, with
    ``data``, top-1 and agreement between the models; ratios against ``reference`` (default: the
    first model).

    Args:
        models: name -> ``.onnx`` file (or TensorRT engine, or a run's stage folder).
        data: ``(uint8 NCHW images, labels)``; normalised with the files' metadata (written by
            :func:`export` when given ``metadata``) or ``mean``/``std``.
        spec: the recipe's ``bench`` section type (:class:`~compress.benchmark.spec.BenchConfig`).
        **overrides: any :class:`~compress.benchmark.spec.BenchConfig` field (``backends``,
            ``batch_size``, ``threads``, ``iterations``, ...).

    Returns:
        A typed result: ``result.rows`` (one :class:`~compress.benchmark.rows.BenchRow` per
        model, e.g. ``row.top1``, ``row.p50_ms(1)``), ``result.ratios[name]`` against the
        reference; ``result.to_json()`` is the ``bench.json`` that ``compress check`` gates,
        :func:`compress.benchmark.table.bench_table_markdown` the table.
    """
    from compress.benchmark.compare import bench_models

    paths = {name: Path(path) for name, path in models.items()}
    return bench_models(
        paths,
        dataclasses.replace(spec or BenchConfig(), **overrides),
        data,
        reference=reference or next(iter(paths)),
        mean=mean,
        std=std,
    )


def _latency_pruner(
    model, example_inputs, spec, num_classes, calibration, gradient_fn, judge, cache, log
):
    """The :class:`~compress.pruning.latency.LatencyPruner` for ``spec.target``: measured on its
    ``backend`` (None: onnxruntime) in its ``precision`` (``auto``: FP32; a recipe resolves it
    from the stages that follow, :func:`compress.pipeline.recipe.defaults.resolve_latency_targets`).

    Raises:
        StageError: under torchrun (the measurement is one process's).
    """
    from compress.benchmark.backend_table import BACKENDS, DEFAULT_LATENCY_BACKEND
    from compress.core import distributed
    from compress.core.cpu_features import cpu_features
    from compress.core.machine import machine_info
    from compress.pruning.latency import LatencyPruner

    if distributed.active():
        raise StageError(
            "prune: a latency target is measured by one process; run this stage without torchrun "
            "(or prune to speedup/target_macs)"
        )
    target = spec.target  # its backend can time single layers (checked by LatencyTarget)
    backend = BACKENDS.get(target.backend or DEFAULT_LATENCY_BACKEND)
    return LatencyPruner(
        model,
        example_inputs,
        spec,
        backend=backend,
        precision="int8" if target.precision == "int8" else "fp32",
        calibration=calibration,
        num_classes=num_classes,
        cache=cache,
        gradient_fn=gradient_fn,
        cpu=f"{machine_info()['cpu']} ({cpu_features().summary()})",
        log=lambda line: log(f"prune {line}"),
        judge=judge,
    )


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _inputs_of(
    data: Iterable,
    device: torch.device,
    images: int | None = None,
    loop: LoopSettings | None = None,
) -> list[torch.Tensor]:
    """The input batches of ``data`` (batches, or ``(inputs, labels, ...)`` batches) on
    ``device``, prepared for evaluation by ``loop``; with ``images``, only the first that many."""
    batches, seen = [], 0
    for batch in data:
        if images is not None and seen >= images:
            break
        inputs = batch[0] if isinstance(batch, list | tuple) else batch
        inputs = inputs[: None if images is None else images - seen].to(device)
        batches.append(loop.inputs(inputs) if loop is not None else inputs)
        seen += len(batches[-1])
    return batches


__all__ = ["bench", "distill", "export", "keep_float", "loss", "prune", "quantize"]
