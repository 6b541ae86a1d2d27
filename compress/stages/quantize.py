"""Stage ``quantize``: INT8 student by calibration (PTQ), then optional fine-tuning against the
teacher (QAT)."""

from __future__ import annotations

import dataclasses

import torch

from compress.artifacts import Artifact
from compress.config import QuantizeConfig
from compress.context import RunContext
from compress.errors import StageError
from compress.models import count_params_macs
from compress.quantization import calibrate, prepare_quantized
from compress.stages.losses import latest_distill_loss
from compress.stages.networks import (
    calibration_batches,
    example_batch,
    load_network,
    network_of,
    preprocess,
)
from compress.teaching import frozen, history_dicts, train_with_teacher
from compress.train_loop import evaluate
from compress.weights import save_weights


def quantize(cfg: QuantizeConfig, ctx: RunContext) -> Artifact:
    """Quantize the latest student to INT8 and, in ``qat`` mode, fine-tune it against the teacher.

    The float student is folded and fake-quantized for ``cfg.target``
    (:func:`compress.quantization.prepare_quantized`), its activation ranges are calibrated on
    ``cfg.calibration_images`` training images without augmentation, and its PTQ accuracy is
    measured. QAT then trains it with ``cfg.loss`` (default: the logit terms of the latest
    distill stage) against the frozen teacher, activation ranges fixed. The saved checkpoint
    holds every quantizer scale, and the pruned structure of a pruned source, so
    :func:`compress.stages.networks.load_network` rebuilds the same graph.

    Returns:
        Artifact with ``files["model"]``, its network (the source's, with the
        :class:`~compress.records.QuantSpec` it is rebuilt with), the ``quantization`` settings
        (with the resolved ``weight_range``),
        ``fp32_top1``, ``ptq_top1``, ``top1``, ``top1_delta`` (vs FP32), ``agreement_with_fp32``
        (top-1 agreement on the test split), params, MACs and the training history.
    """
    source = float_student(ctx)
    student = load_network(ctx, source)
    teacher = frozen(load_network(ctx, ctx.artifacts[cfg.teacher]))
    prep = preprocess(ctx)
    train_loader, test_loader = ctx.loaders()
    fp32 = evaluate(student, test_loader, prep, ctx.device)
    qmodel = prepare_quantized(
        student,
        target=cfg.target,
        skip=cfg.skip,
        example_inputs=example_batch(ctx),
        weight_range=cfg.weight_range,
    )
    calibrate(
        qmodel,
        calibration_batches(ctx, train_loader, prep, cfg.calibration_images),
        method=cfg.calibration,
        percentile=cfg.percentile,
    )
    ptq = evaluate(qmodel, test_loader, prep, ctx.device)
    history = []
    if cfg.mode == "qat" and cfg.train.epochs > 0:
        loss = cfg.loss or latest_distill_loss(ctx, logits_only=True)
        desc = ctx.stage_dir.name if ctx.stage_dir else "quantize"
        history = train_with_teacher(
            qmodel,
            teacher,
            loss,
            cfg.train,
            cfg.augment,
            prep=prep,
            loaders=(train_loader, test_loader),
            **ctx.training(desc),
        )
    qmodel.eval()
    test = evaluate(qmodel, test_loader, prep, ctx.device) if history else ptq
    params, macs = count_params_macs(student, ctx.data.image_size, ctx.data.in_channels)
    path = save_weights(qmodel, ctx.stage_path("model.pt"), structure=pruned_structure(source))
    network = dataclasses.replace(network_of(source), quantization=qmodel.quant_spec)
    metrics = {
        "quantization": {
            "mode": cfg.mode,
            "target": cfg.target,
            "skip": list(cfg.skip),
            "weight_range": qmodel.weight_range,
            "calibration": cfg.calibration,
            "percentile": cfg.percentile,
            "calibration_images": cfg.calibration_images,
        },
        "source_stage": source.stage,
        "fp32_top1": fp32["top1"],
        "ptq_top1": ptq["top1"],
        "top1": test["top1"],
        "top1_delta": test["top1"] - fp32["top1"],
        "agreement_with_fp32": top1_agreement(qmodel, student, test_loader, prep, ctx.device),
        "test_loss": test["loss"],
        "test_samples": test["samples"],
        "params": params,
        "macs": macs,
        "history": history_dicts(history),
    }
    return Artifact(
        "quantize", files={"model": path}, metrics=metrics, role="student", network=network
    )


def float_student(ctx: RunContext) -> Artifact:
    """The latest student that is not quantized yet (a second quantize stage re-quantizes the float
    one)."""
    for artifact in reversed(ctx.artifacts.values()):
        if artifact.role == "student" and "model" in artifact.files and not artifact.quantized:
            return artifact
    raise StageError("quantize needs a float student from an earlier distill or prune stage")


@torch.no_grad()
def top1_agreement(
    model: torch.nn.Module, reference: torch.nn.Module, loader, prep, device
) -> float:
    """Fraction of test images on which both networks predict the same class."""
    model.eval()
    reference.eval()
    same = total = 0
    for images, *_ in loader:
        inputs = prep(images.to(device), train=False)
        same += int((model(inputs).argmax(1) == reference(inputs).argmax(1)).sum())
        total += len(images)
    return same / max(total, 1)


def pruned_structure(artifact: Artifact) -> dict | None:
    """The layer widths stored beside the source's weights, if it was pruned."""
    from compress.weights import read_checkpoint

    checkpoint = read_checkpoint(artifact.files["model"])
    return checkpoint.get("structure") if isinstance(checkpoint, dict) else None
