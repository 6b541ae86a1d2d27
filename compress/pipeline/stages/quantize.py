"""Stage ``quantize``: INT8 student by calibration (PTQ), then optional fine-tuning against the
teacher (QAT)."""

from __future__ import annotations

import copy
import dataclasses

import torch

from compress import api
from compress.data.loaders import make_loaders, split_holdout
from compress.errors import StageError
from compress.nets.models import count_params_macs
from compress.nets.weights import save_weights
from compress.pipeline.artifacts import Artifact
from compress.pipeline.config import SELF_TEACHER, QuantizeConfig
from compress.pipeline.context import RunContext
from compress.pipeline.stages.losses import latest_distill_loss
from compress.pipeline.stages.networks import (
    calibration_batches,
    load_network,
    network_of,
    preprocess,
)
from compress.quantization.budget import AccuracyBudget
from compress.quantization.fake_quant import clone
from compress.training.loop import evaluate_predictions
from compress.training.spec import DistillSpec
from compress.training.teaching import frozen, history_dicts


def quantize(cfg: QuantizeConfig, ctx: RunContext) -> Artifact:
    """Quantize the latest student to INT8 and, in ``qat`` mode, fine-tune it against the teacher.

    The float student is folded and fake-quantized for ``cfg.target``
    (:func:`compress.quantization.fake_quant.prepare_quantized`), its activation ranges are
    calibrated on
    ``cfg.calibration_images`` training images without augmentation, and its PTQ accuracy is
    measured. QAT then trains it with ``cfg.loss`` (default: the logit terms of the latest
    distill stage) against the frozen teacher, activation ranges fixed. The saved checkpoint
    holds every quantizer scale, and the pruned structure of a pruned source, so
    :func:`compress.pipeline.stages.networks.load_network` rebuilds the same graph.

    With ``cfg.max_drop``, ``cfg.holdout_images`` training images are set aside before any of
    this (calibration and QAT never see them), and after QAT the layers quantization hurts most
    go back to float until the exported file is within ``max_drop`` top-1 points of the float
    student on them (:func:`compress.quantization.budget.keep_float`; without QAT each candidate is
    calibrated again, after QAT its ranges are kept); the float layers join the network's skip
    list, so the export stage writes the same file.

    Returns:
        Artifact with ``files["model"]``, its network (the source's, with the
        :class:`~compress.core.records.QuantSpec` it is rebuilt with), the ``quantization`` settings
        (with the resolved ``weight_range``),
        ``fp32_top1``, ``ptq_top1``, ``top1``, ``top1_delta`` (vs FP32), ``agreement_with_fp32``
        (top-1 agreement on the test split), params, MACs and the training history; with
        ``max_drop``, ``quantization`` also holds the budget's settings and ``float_layers``, and
        ``accuracy_budget`` the search (held-out accuracies, ranking, every step).

    Raises:
        BudgetNotMet: no file within ``max_float_layers`` float layers meets ``max_drop``.
    """
    source = float_student(ctx)
    student = load_network(ctx, source)
    # self: a frozen copy (freezing the student itself would freeze the network QAT trains)
    teacher = frozen(
        copy.deepcopy(student)
        if cfg.teacher == SELF_TEACHER
        else load_network(ctx, ctx.artifacts[cfg.teacher])
    )
    prep = preprocess(ctx)
    train_loader, test_loader, holdout = split_loaders(ctx, cfg, prep)
    fp32, student_predictions = evaluate_predictions(student, test_loader, prep, ctx.device)

    batches = calibration_batches(ctx, train_loader, prep, cfg.calibration_images)
    candidates = api.calibration_candidates(student, batches, cfg, holdout or None, ctx.say)
    results = [measure(c.network, student_predictions, ctx, test_loader, prep) for c in candidates]
    records = [
        candidate_record(f"ptq-{c.name}", c.to_json(), result)
        for c, result in zip(candidates, results, strict=True)
    ]
    qmodel = candidates[0].network.eval()  # the best on the held-out images
    ptq = test = results[0]
    history: list = []
    shipped = f"ptq-{candidates[0].name}"
    if wants_qat(cfg, candidates[0].holdout_top1, student, holdout):
        best_ptq = clone(qmodel)
        loss = cfg.loss or latest_distill_loss(ctx, logits_only=True)
        api.distill(
            qmodel,
            teacher,
            train_loader,
            DistillSpec(loss=loss, train=cfg.train, augment=cfg.augment),
            test_loader=test_loader,
            loop=ctx.loop(ctx.stage_dir.name if ctx.stage_dir else "quantize", prep),
            recalibrate_batchnorm=False,  # folded into the convolutions
            history=history,
        )
        qmodel.eval()
        scores = api.holdout_scores(qmodel, student, holdout) if holdout else (None, None, None)
        qat_holdout = api.CalibrationCandidate("qat", qmodel, *scores)
        qat = measure(qmodel, student_predictions, ctx, test_loader, prep)
        records.append(candidate_record("qat", qat_holdout.to_json(), qat))
        if qat_holdout.holdout_top1 is not None and qat_holdout.rank <= candidates[0].rank:
            # QAT did not beat the best PTQ network (top-1, then agreement with the float
            # student): the PTQ network is the smaller change, so it ships
            qmodel, history = best_ptq, []
        else:
            shipped, test = "qat", qat
    budget = None
    if cfg.max_drop is not None:
        qmodel = api.keep_float(
            qmodel,
            student,
            holdout,
            max_drop=cfg.max_drop,
            max_float_layers=cfg.max_float_layers,
            calibration_data=None if history else batches,  # after QAT its ranges are kept
            calibration=candidates[0].method,
            percentile=cfg.percentile,
            bias_correction=candidates[0].bias_corrected,
        )
        budget = qmodel.accuracy_budget
        if budget.float_layers:
            test = measure(qmodel, student_predictions, ctx, test_loader, prep)
    speed = None
    if cfg.float_where_slower:
        qmodel = api.float_where_slower(
            qmodel, student, batches[0], batch_size=cfg.speed_batch_size
        )
        speed = qmodel.float_where_slower
        ctx.say(
            f"float where slower: {len(speed.float_layers)} of {len(speed.layers)} convolutions "
            "faster in float alone"
            + (
                f"; whole network {speed.ratio:.2f}x the all-INT8 latency at batch "
                f"{speed.batch_size}: {'kept' if speed.kept else 'not kept'}"
                if speed.ratio is not None
                else ""
            )
        )
        if speed.kept:
            test = measure(qmodel, student_predictions, ctx, test_loader, prep)
    params, macs = count_params_macs(student, ctx.data.image_size, ctx.data.in_channels)
    path = save_weights(qmodel, ctx.stage_path("model.pt"), structure=pruned_structure(source))
    network = dataclasses.replace(network_of(source), quantization=qmodel.quant_spec)
    metrics = {
        "quantization": {
            "mode": cfg.mode,
            "target": cfg.target,
            "skip": list(cfg.skip),
            "weight_range": qmodel.weight_range,
            "integer_products": qmodel.quant_spec.integer_products,
            "product_activations": list(qmodel.quant_spec.product_activations),
            "untraced_float": list(qmodel.untraced),  # modules torch.fx kept whole: float
            "calibration": candidates[0].method,
            "bias_correction": candidates[0].bias_corrected,
            "percentile": cfg.percentile,
            "calibration_images": cfg.calibration_images,
            "float_where_slower": cfg.float_where_slower,
            "float_layers_for_speed": list(speed.float_layers if speed and speed.kept else ()),
        }
        | _budget_settings(cfg, budget),
        "source_stage": source.stage,
        "fp32_top1": fp32["top1"],
        "ptq_top1": ptq["top1"],
        "top1": test["top1"],
        "top1_delta": test["top1"] - fp32["top1"],
        "agreement_with_fp32": test["agreement"],
        "test_loss": test["loss"],
        "test_samples": test["samples"],
        "params": params,
        "macs": macs,
        "history": history_dicts(history),
        "candidates": records,
        "shipped": shipped,
    }
    if budget is not None:
        metrics["accuracy_budget"] = budget.to_json()
    if speed is not None:
        metrics["float_where_slower"] = speed.to_json()
    correction = getattr(candidates[0].network, "bias_correction", None)
    if correction is not None:
        metrics["bias_correction"] = correction.to_json()
    return Artifact(
        "quantize", files={"model": path}, metrics=metrics, role="student", network=network
    )


def wants_qat(cfg: QuantizeConfig, best_ptq: float | None, student, holdout) -> bool:
    """QAT runs when the recipe asks for it (``mode: qat``), or when the best PTQ network misses
    ``max_drop`` on the held-out images: fine-tuning may recover what calibration lost before
    the budget puts layers back in float."""
    if cfg.train.epochs == 0:
        return False
    if cfg.mode == "qat":
        return True
    if cfg.max_drop is None or best_ptq is None:
        return False
    return api.holdout_top1(student, holdout) - best_ptq > cfg.max_drop


def measure(network, student_predictions: torch.Tensor, ctx: RunContext, test_loader, prep) -> dict:
    """``network``'s test top-1, loss and samples, and its top-1 agreement with the float
    student's ``student_predictions`` on the test split (:func:`evaluate_predictions`, in the
    loader's order): what it would deliver if shipped, in one pass over the test split."""
    test, predictions = evaluate_predictions(network, test_loader, prep, ctx.device)
    same = (predictions == student_predictions).float()
    return test | {"agreement": same.mean().item() if len(same) else 0.0}


def candidate_record(name: str, holdout: dict, result: dict) -> dict:
    """One network the stage could ship: what it scored on the held-out images (what decides:
    :func:`compress.api.holdout_rank`; None when nothing was held out) and what :func:`measure`
    found on the test split."""
    return {
        "name": name,
        "holdout_top1": holdout["holdout_top1"],
        "holdout_agreement": holdout["holdout_agreement"],
        "holdout_kl": holdout["holdout_kl"],
        "test_top1": result["top1"],
        "agreement_with_fp32": result["agreement"],
    }


def split_loaders(ctx: RunContext, cfg: QuantizeConfig, prep) -> tuple:
    """``(train_loader, test_loader, holdout)``: with ``max_drop`` or ``calibration: auto``,
    ``cfg.holdout_images``
    training images (seeded, class-balanced) are set aside as ``(inputs, labels)`` batches,
    preprocessed without augmentation, and the train loader (calibration, QAT) no longer holds
    them; without it, the run's loaders and no holdout."""
    if cfg.max_drop is None and cfg.calibration != "auto":
        return (*ctx.loaders(), [])
    bundle, (images, labels) = split_holdout(ctx.data, cfg.holdout_images, ctx.recipe.seed)
    train_loader, test_loader = make_loaders(
        bundle, ctx.recipe.data, seed=ctx.recipe.seed, pin_memory=ctx.device.type == "cuda"
    )
    chunk = ctx.recipe.data.eval_batch_size
    holdout = [
        (prep(images[i : i + chunk].to(ctx.device), train=False), labels[i : i + chunk])
        for i in range(0, len(images), chunk)
    ]
    return train_loader, test_loader, holdout


def _budget_settings(cfg: QuantizeConfig, budget: AccuracyBudget | None) -> dict:
    """The accuracy budget's entries of the ``quantization`` record (none when it is off)."""
    if budget is None:
        return {}
    return {
        "max_drop": cfg.max_drop,
        "holdout_images": budget.holdout_images,
        "max_float_layers": cfg.max_float_layers,
        "float_layers": list(budget.float_layers),
    }


def float_student(ctx: RunContext) -> Artifact:
    """The latest student that is not quantized yet (a second quantize stage re-quantizes the float
    one)."""
    for artifact in reversed(ctx.artifacts.values()):
        if artifact.role == "student" and "model" in artifact.files and not artifact.quantized:
            return artifact
    raise StageError("quantize needs a float student from an earlier distill or prune stage")


def pruned_structure(artifact: Artifact) -> dict | None:
    """The layer widths stored beside the source's weights, if it was pruned."""
    from compress.nets.weights import read_checkpoint

    checkpoint = read_checkpoint(artifact.files["model"])
    return checkpoint.get("structure") if isinstance(checkpoint, dict) else None
