"""Stage ``prune``: remove whole channels from the latest student, fine-tuning with the teacher.

Structured pruning makes the network genuinely smaller (fewer channels, not zeros), so it is
faster on every runtime; distillation from the teacher recovers most of the lost accuracy
(the "prune, then distill" recipe of Torch-Pruning's and NVIDIA's pipelines). ``steps`` > 1
alternates pruning and fine-tuning along a geometric MACs schedule: each cut is smaller and
the network adapts before the next one. After each cut the BatchNorm statistics are
re-estimated on training images (:mod:`compress.batchnorm`), so fine-tuning starts from a working
network and the step's record says what the cut itself cost.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
import torch.nn.functional as F

from compress import distributed
from compress.artifacts import Artifact
from compress.backends.timing import torch_latency
from compress.batchnorm import recalibrate_batchnorm
from compress.config import UNLABELED, PruneConfig
from compress.context import RunContext
from compress.errors import StageError
from compress.fileio import write_json_atomic
from compress.models import count_params_macs
from compress.pruning import ChannelPruner, step_targets
from compress.records import NetworkSpec
from compress.stages.losses import latest_distill_loss
from compress.stages.networks import (
    build_network,
    calibration_batches,
    example_batch,
    load_network,
    network_of,
    preprocess,
    training_split,
)
from compress.teaching import frozen, history_dicts, train_with_teacher
from compress.train_loop import evaluate
from compress.weights import apply_structure, save_weights, structure_of

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
    say(
        ctx,
        f"prune: before {before['params']:,} params, {before['macs']:,} MACs, "
        f"{before['latency_ms_b1']:.2f} ms, top-1 {before['top1']:.2f}%",
    )
    gradients = taylor_gradients(ctx, loaders[0], prep)
    if cfg.target.active:
        judge = plan_judge(ctx, cfg, loaders[0], prep, teacher, loss)
        pruner = latency_pruner(ctx, cfg, student, network, loaders[0], prep, gradients, judge)
        goals = pruner.step_goals(cfg.steps)
    else:
        pruner = ChannelPruner(
            student, example_batch(ctx), cfg, num_classes=network.num_classes, rounds=cfg.steps
        )
        goals = step_targets(cfg, before["macs"], cfg.steps)
    steps, history = [], []
    for k, goal in enumerate(goals, start=1):
        if cfg.target.active:
            cut = latency_cut(ctx, pruner, goal, k)
            if k == len(goals):  # its fine-tuning batches are not needed past the last cut
                pruner.judge = judge = None
            params, macs = count_params_macs(student, ctx.data.image_size, ctx.data.in_channels)
            pruned = {"macs": macs, "params": params, "latency": cut.to_json()}
        else:
            pruned = pruner.prune(goal, gradients)
        pruned_top1 = evaluate(student, loaders[1], prep, ctx.device)["top1"]
        recalibrated_top1 = None
        if cfg.recalibration_images:
            recalibrate_batchnorm(
                student, calibration_batches(ctx, loaders[0], prep, cfg.recalibration_images)
            )
            recalibrated_top1 = evaluate(student, loaders[1], prep, ctx.device)["top1"]
        recalibrated = (
            f", {recalibrated_top1:.2f}% with BatchNorm recalibrated"
            if recalibrated_top1 is not None
            else ""
        )
        say(
            ctx,
            f"prune step {k}/{cfg.steps}: {pruned['macs']:,} MACs "
            f"({before['macs'] / pruned['macs']:.2f}x fewer), top-1 {pruned_top1:.2f}%"
            f"{recalibrated} before fine-tuning",
        )
        desc = f"{ctx.stage_dir.name if ctx.stage_dir else 'prune'} step {k}"
        logs = train_with_teacher(
            student,
            teacher,
            loss,
            cfg.train,
            cfg.augment,
            prep=prep,
            loaders=loaders,
            **ctx.training(desc),
        )
        history += [log | {"step": k} for log in history_dicts(logs)]
        tuned_top1 = evaluate(student, loaders[1], prep, ctx.device)["top1"]
        steps.append(
            {
                "target_macs": None if cfg.target.active else goal,
                "latency": pruned.get("latency"),
                "macs": pruned["macs"],
                "params": pruned["params"],
                "top1_pruned": pruned_top1,
                "top1_recalibrated": recalibrated_top1,
                "top1": tuned_top1,
            }
        )
    after = measure(ctx, student, loaders[1], prep)
    say(
        ctx,
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
            "target_macs": None if cfg.target.active else goals[-1],
            "latency_target": (
                None
                if not cfg.target.active
                else {
                    "backend": pruner.backend.name,
                    "precision": pruner.precision,
                    "batch_size": cfg.target.batch_size,
                    "threads": cfg.target.threads,
                    "goal_ms": goals[-1],
                    "base_ms": pruner.base_ms,
                    "measured_ms": steps[-1]["latency"]["measured_ms"],
                    "speedup": steps[-1]["latency"]["speedup"],
                }
            ),
            "macs_reduction": before["macs"] / after["macs"],
            "params_reduction": before["params"] / after["params"],
            "top1_delta": after["top1"] - before["top1"],
            "loss": [term.name for term in loss],
            "steps": steps,
            "history": history,
        }
    )
    return Artifact(
        "prune", files={"model": path}, metrics=metrics, role="student", network=network
    )


def latency_pruner(
    ctx: RunContext, cfg: PruneConfig, student, network, train_loader, prep, gradients, judge
):
    """The :class:`LatencyPruner` for ``cfg.target``: on its backend (default: the recipe's first
    bench backend), in the precision that will be deployed (``auto``: INT8 when a quantize stage
    follows this one), its latency table kept in the run folder.

    Raises:
        StageError: a distributed run (the measurement is one process's), or a backend that
            cannot time single layers.
    """
    from compress.bench_backends import BACKENDS
    from compress.cpu_features import cpu_features
    from compress.latency_pruning import LatencyPruner
    from compress.machine import machine_info

    if distributed.active():
        raise StageError(
            "prune: a latency target is measured by one process; run this stage without torchrun "
            "(or prune to speedup/target_macs)"
        )
    target = cfg.target
    names = [spec.name for spec in ctx.recipe.stages]
    here = names.index(ctx.stage_dir.name) if ctx.stage_dir and ctx.stage_dir.name in names else 0
    later = [spec.kind for spec in ctx.recipe.stages[here + 1 :]]
    bench = next((s.config for s in ctx.recipe.stages if s.kind == "bench"), None)
    backend = target.backend or (bench.backends[0] if bench else "onnxruntime")
    if BACKENDS.get(backend).table_entry is None:
        raise StageError(
            f"prune.target.backend: {backend!r} cannot time single layers; name an ONNX Runtime "
            "backend (e.g. onnxruntime)"
        )
    precision = target.precision
    if precision == "auto":
        precision = "int8" if "quantize" in later else "fp32"
    return LatencyPruner(
        student,
        example_batch(ctx),
        cfg,
        backend=BACKENDS.get(backend),
        precision=precision,
        calibration=calibration_batches(ctx, train_loader, prep, 256),
        num_classes=network.num_classes,
        cache=ctx.run_dir,
        gradient_fn=gradients,
        cpu=f"{machine_info()['cpu']} ({cpu_features().summary()})",
        log=lambda line: say(ctx, f"prune {line}"),
        judge=judge,
    )


def latency_cut(ctx: RunContext, pruner, goal_ms: float, step: int):
    """Step ``step``'s cut toward ``goal_ms``, recorded in the stage folder; a resumed stage
    (same input key) replays the record instead of planning and measuring again, so its
    network is the one the step's fine-tuning checkpoint belongs to."""
    if ctx.stage_dir is None:
        return pruner.cut(goal_ms)
    path = ctx.stage_path(f"latency-cut-{step}.json")
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("key") == ctx.stage_key:
            return pruner.replay(record["cut"])
    cut = pruner.cut(goal_ms)
    write_json_atomic(path, {"key": ctx.stage_key, "cut": cut.to_json()})
    return cut


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
    tune = dataclasses.replace(cfg.train, epochs=1, warmup_epochs=0, schedule="cosine")

    def top1(network: torch.nn.Module) -> float:
        with torch.no_grad():
            recalibrate_batchnorm(network, fit_on)
        if tune_batches:
            with torch.random.fork_rng(devices=[] if ctx.device.type == "cpu" else None):
                torch.manual_seed(ctx.recipe.seed)  # every candidate sees the same augmentation
                train_with_teacher(
                    network,
                    teacher,
                    loss,
                    tune,
                    cfg.augment,
                    loaders=(tune_batches, None),
                    prep=prep,
                    device=ctx.device,
                    desc="prune judge",
                    show_progress=False,
                )
        network.eval()
        with torch.no_grad():
            predicted = torch.cat([network(x).argmax(1) for x in held[labelled].split(batch)])
        return 100.0 * (predicted == held_labels[labelled]).float().mean().item()

    return top1


def measure(ctx: RunContext, model: torch.nn.Module, test_loader, prep) -> dict:
    """Params and MACs (one image), batch-1 PyTorch CPU latency (p50) and test top-1."""
    params, macs = count_params_macs(model, ctx.data.image_size, ctx.data.in_channels)
    latency = float(
        "nan"
    )  # measured by rank 0 alone, which records it: other ranks would disturb its timing
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
        distributed.average_gradients(
            p for p in model.parameters() if p.requires_grad
        )  # every rank ranks channels alike

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


def say(ctx: RunContext, line: str) -> None:
    if ctx.show_progress:
        print(line, file=sys.stderr)
