"""Stage ``prune``: remove whole channels from the latest student, fine-tuning with the teacher.

Structured pruning makes the network genuinely smaller (fewer channels, not zeros), so it is
faster on every runtime; distillation from the teacher recovers most of the lost accuracy
(the "prune, then distill" recipe of Torch-Pruning's and NVIDIA's pipelines). ``steps`` > 1
alternates pruning and fine-tuning along a geometric MACs schedule: each cut is smaller and
the network adapts before the next one. After each cut the BatchNorm statistics are
re-estimated on training images (:mod:`compress.training.batchnorm`), so fine-tuning starts from a
working network and the step's record says what the cut itself cost.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from compress import api
from compress.benchmark.backends.timing import torch_latency
from compress.core import distributed
from compress.core.records import NetworkSpec, PruneStep
from compress.data.spec import UNLABELED
from compress.errors import StageError
from compress.nets.models import count_params_macs
from compress.nets.weights import apply_structure, save_weights, structure_of
from compress.pipeline.artifacts import Artifact
from compress.pipeline.config import PruneConfig
from compress.pipeline.context import RunContext
from compress.pipeline.stages.losses import latest_distill_loss
from compress.pipeline.stages.networks import (
    build_network,
    example_batch,
    load_network,
    network_of,
    preprocess,
    training_split,
)
from compress.training.batchnorm import recalibrate_batchnorm
from compress.training.loop import evaluate
from compress.training.spec import DistillSpec
from compress.training.teaching import LoopSettings, frozen, history_dicts

TAYLOR_BATCHES = 4  # training batches whose gradients rank channels for the taylor criterion


def prune(cfg: PruneConfig, ctx: RunContext) -> Artifact:
    """Prune the latest student to ``cfg``'s MACs target (or channel ratio), fine-tuning each step.

    Step k of ``cfg.steps`` prunes to the k-th point of a geometric schedule between the
    student's MACs and the target (``target_macs``, or MACs / ``speedup``; with
    ``pruning_ratio``, Torch-Pruning's linear ratio schedule), re-estimates the BatchNorm
    statistics on ``cfg.recalibration_images`` training images, then trains ``cfg.train.epochs``
    epochs against the teacher with ``cfg.loss`` (default: the latest distill stage's loss).

    Returns:
        Artifact with ``files["model"]`` (state_dict plus the pruned layer widths), the
        network, and params, MACs, batch-1 PyTorch CPU latency and top-1 before and after,
        their ratios, one record per step (top-1 right after the cut, after BatchNorm
        recalibration (None when off) and after fine-tuning) and the training history.

    Raises:
        StageError: the target cannot be reached within ``max_layer_ratio``, or the latest
            student is already quantized.
        RecipeError: an ``ignore`` pattern matches no module.
    """
    source = ctx.latest("student")
    if source.quantized:
        raise StageError(
            f"prune: the latest student (stage {source.stage!r}) is quantized; put prune before "
            "quantize"
        )
    network = network_of(source)
    student = load_network(ctx, source)
    teacher = frozen(load_network(ctx, ctx.artifacts[cfg.teacher]))
    prep = preprocess(ctx)
    loaders = ctx.loaders()
    loss = cfg.loss or latest_distill_loss(ctx)
    before = measure(ctx, student, loaders[1], prep)
    ctx.say(
        f"prune: before {before['params']:,} params, {before['macs']:,} MACs, "
        f"{before['latency_ms_b1']:.2f} ms, top-1 {before['top1']:.2f}%",
    )
    steps: list[PruneStep] = []
    history: list[dict] = []

    def finetune(network: torch.nn.Module, step: int) -> None:
        logs: list = []
        api.distill(
            network,
            teacher,
            loaders[0],
            DistillSpec(loss=loss, train=cfg.train, augment=cfg.augment),
            test_loader=loaders[1],
            loop=ctx.loop(f"{ctx.stage_dir.name if ctx.stage_dir else 'prune'} step {step}", prep),
            recalibrate_batchnorm=False,  # re-estimated after the cut, before fine-tuning
            history=logs,
        )
        history.extend(log | {"step": step} for log in history_dicts(logs))

    api.prune(
        student,
        example_batch(ctx),
        cfg,
        steps=cfg.steps,
        num_classes=network.num_classes,
        finetune=finetune,
        gradient_fn=taylor_gradients(ctx, loaders[0], prep),
        calibration_data=loaders[0] if cfg.recalibration_images else None,
        calibration_images=cfg.recalibration_images,
        loop=LoopSettings(prepare=prep, device=ctx.device),
        judge=plan_judge(ctx, cfg, loaders[0], prep, teacher, loss) if cfg.target.active else None,
        score=lambda network: evaluate(network, loaders[1], prep, ctx.device)["top1"],
        history=steps,
        log=ctx.say,
        latency_cache=ctx.run_dir,
        resume=(ctx.stage_dir, ctx.stage_key) if ctx.stage_dir is not None else None,
    )
    last = steps[-1]
    after = measure(ctx, student, loaders[1], prep)
    ctx.say(
        f"prune: after {after['params']:,} params, {after['macs']:,} MACs, "
        f"{after['latency_ms_b1']:.2f} ms, top-1 {after['top1']:.2f}%",
    )
    structure = structure_of(student)
    check_rebuildable(ctx, network, student, structure)
    path = save_weights(student, ctx.stage_path("model.pt"), structure=structure)
    metrics = (
        after
        | {f"{key}_before": value for key, value in before.items()}
        | {
            "source_stage": source.stage,
            "criterion": cfg.criterion,
            "target_macs": last.target_macs,
            "latency_target": latency_record(cfg, steps) if cfg.target.active else None,
            "macs_reduction": before["macs"] / after["macs"],
            "params_reduction": before["params"] / after["params"],
            "top1_delta": after["top1"] - before["top1"],
            "loss": [term.name for term in loss],
            "steps": [step.to_json() for step in steps],
            "history": history,
        }
    )
    return Artifact(
        "prune", files={"model": path}, metrics=metrics, role="student", network=network
    )


def latency_record(cfg: PruneConfig, steps: list[PruneStep]) -> dict:
    """Where and how the latency target was measured, and what the last cut reached."""
    target, last = cfg.target, steps[-1].latency or {}
    first = steps[0].latency or {}
    return {
        "backend": target.backend,
        "precision": target.precision,
        "batch_size": target.batch_size,
        "threads": target.threads,
        "goal_ms": last.get("goal_ms"),
        "base_ms": first.get("base_ms"),
        "measured_ms": last.get("measured_ms"),
        "speedup": last.get("speedup"),
    }


def plan_judge(ctx: RunContext, cfg: PruneConfig, train_loader, prep, teacher, loss):
    """How the latency planner scores a cut candidate (None with ``judge_images: 0`` or without
    labels): its BatchNorm statistics re-estimated on ``recalibration_images`` training images,
    fine-tuned ``judge_steps`` batches against the teacher, then top-1 on ``judge_images`` others.

    One pass of the training loader gives all three, apart: the re-estimation images, then the
    scored ones (labelled only; a smaller training split is shared in that proportion), then the
    fine-tuning batches. They are drawn once and every candidate is fine-tuned from the same
    random seed, so the candidates of every cut differ by their widths alone. The short
    fine-tune is NetAdapt's (Yang et al. 2018): scored right after the re-estimation, the
    CIFAR-10 ResNet-8's candidates ranked opposite to their fine-tuned accuracy."""
    judged = cfg.target.judge_images
    if not judged:
        return None
    wanted = max(cfg.recalibration_images, 1)
    sample, tune_batches = training_split(
        ctx, train_loader, prep, wanted + judged, cfg.target.judge_steps
    )
    inputs = torch.cat([x for x, _ in sample])
    labels = torch.cat([y for _, y in sample])
    recalibration = min(wanted, len(inputs) * wanted // (wanted + judged))
    batch = ctx.recipe.data.eval_batch_size
    fit_on = list(inputs[:recalibration].split(batch))
    held, held_labels = inputs[recalibration:], labels[recalibration:]
    labelled = held_labels != UNLABELED
    if not labelled.any():
        return None
    tune = DistillSpec(
        loss=loss,
        train=dataclasses.replace(cfg.train, epochs=1, warmup_epochs=0, schedule="cosine"),
        augment=cfg.augment,
    )

    def top1(network: torch.nn.Module) -> float:
        with torch.no_grad():
            recalibrate_batchnorm(network, fit_on)
        if tune_batches:
            with torch.random.fork_rng(devices=[] if ctx.device.type == "cpu" else None):
                torch.manual_seed(ctx.recipe.seed)  # every candidate sees the same augmentation
                api.distill(
                    network,
                    teacher,
                    tune_batches,
                    tune,
                    loop=LoopSettings(prepare=prep, device=ctx.device, desc="prune judge"),
                    recalibrate_batchnorm=False,
                )
        network.eval()
        with torch.no_grad():
            predicted = torch.cat([network(x).argmax(1) for x in held[labelled].split(batch)])
        return 100.0 * (predicted == held_labels[labelled]).float().mean().item()

    return top1


def measure(ctx: RunContext, model: torch.nn.Module, test_loader, prep) -> dict:
    """Params and MACs (one image), batch-1 PyTorch CPU latency (p50) and test top-1."""
    params, macs = count_params_macs(model, ctx.data.image_size, ctx.data.in_channels)
    # measured by rank 0 alone, which records it: other ranks would disturb its timing
    latency = float("nan")
    if distributed.is_main():
        latency = torch_latency(model, example_batch(ctx, size=1), time_budget_s=1.0)["p50_ms"]
    top1 = evaluate(model, test_loader, prep, ctx.device)["top1"]
    return {"params": params, "macs": macs, "latency_ms_b1": latency, "top1": top1}


def taylor_gradients(ctx: RunContext, train_loader, prep):
    """``gradient_fn`` for the taylor criterion: cross-entropy gradients of a few labelled
    batches."""

    def accumulate(model: torch.nn.Module) -> None:
        for _, (images, labels, *_) in zip(range(TAYLOR_BATCHES), train_loader, strict=False):
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            if (labels != UNLABELED).any():
                F.cross_entropy(
                    model(prep(images, train=False)), labels, ignore_index=UNLABELED
                ).backward()
        # every rank ranks channels alike
        distributed.average_gradients(p for p in model.parameters() if p.requires_grad)

    return accumulate


def check_rebuildable(
    ctx: RunContext, network: NetworkSpec, model: torch.nn.Module, structure: dict
) -> None:
    """Fail now, not at the next load, if the saved widths cannot rebuild this network.

    Torch-Pruning may also shrink layers :func:`structure_of` does not record (e.g. GroupNorm);
    such a network would save fine and never load again.
    """
    fresh = apply_structure(build_network(ctx, network), structure).state_dict()
    wrong = [
        k for k, v in model.state_dict().items() if k not in fresh or fresh[k].shape != v.shape
    ]
    if wrong:
        raise StageError(
            f"prune: {network.model} was pruned in layers whose widths cannot be stored "
            f"({', '.join(wrong[:3])}); ignore them"
        )
