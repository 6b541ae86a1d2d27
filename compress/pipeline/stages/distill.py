"""Stage ``distill``: train a student against a frozen teacher with a weighted sum of KD losses."""

from __future__ import annotations

import dataclasses

import torch

from compress import api
from compress.nets.models import count_params_macs
from compress.nets.weights import save_weights
from compress.pipeline.artifacts import Artifact
from compress.pipeline.config import DistillConfig
from compress.pipeline.context import RunContext
from compress.pipeline.stages.networks import load_network, network_spec, preprocess, start_network
from compress.training.batchnorm import lagging_batchnorm
from compress.training.loop import evaluate
from compress.training.teaching import frozen, history_dicts


def distill(cfg: DistillConfig, ctx: RunContext) -> Artifact:
    """Train the student with ``cfg.loss`` against the network of stage ``cfg.teacher``.

    The teacher runs in eval mode without gradients on exactly the batch the student sees
    (after crop/flip and mixup/cutmix/cutout), so its soft targets describe the student's
    actual input. Feature terms (fitnet, at) read hooked layers; their regressors train with
    the student and are dropped afterwards: the saved student is the plain architecture.

    The student starts from its section's pretrained ``weights`` when it names some (the head
    replaced where the class count differs), else from a fresh initialisation. A student started
    from weights, or whose BatchNorm updates slowly
    (:func:`compress.training.batchnorm.lagging_batchnorm`), ends with its BatchNorm statistics re-
    estimated on 2,048 training images: they began as another dataset's (ImageNet's), and
    torchvision's MobileNetV3 and EfficientNet update them with momentum 0.01, so after a short
    run the running statistics still describe the old data or the early weights (measured at 224
    px: a MobileNetV3-Large at 95.6% training accuracy scored 7.4% in eval mode, 94.6% once re-
    estimated).

    Returns:
        Artifact with ``files["model"]`` (student state_dict), its network, test accuracy
        before and after, the teacher's accuracy, params and MACs of both, and what the
        pretrained weights filled (``student_weights``).
    """
    teacher_artifact = ctx.artifacts[cfg.teacher]
    teacher = frozen(load_network(ctx, teacher_artifact))
    section = cfg.student or ctx.recipe.student
    network = network_spec(ctx, section)
    field = f"{ctx.stage_dir.name}.student" if cfg.student and ctx.stage_dir else "student"
    student, loaded = start_network(ctx, network, section, field)
    copied = copy_matching_weights(teacher, student) if cfg.init_from_teacher else 0
    prep = preprocess(ctx)
    cache = teacher_logits_cache(teacher, ctx, prep) if cfg.cache_teacher_logits else None
    train_loader, test_loader = indexed_loaders(ctx) if cache is not None else ctx.loaders()
    start = evaluate(student, test_loader, prep, ctx.device)
    history: list = []
    recalibrate = loaded is not None or lagging_batchnorm(student)
    api.distill(
        student,
        teacher,
        train_loader,
        cfg,
        test_loader=test_loader,
        loop=ctx.loop(ctx.stage_dir.name if ctx.stage_dir else "distill", prep),
        teacher_logits=cache,
        recalibrate_batchnorm=recalibrate,
        history=history,
    )
    # the last evaluation before the re-estimation saw these weights with the old statistics
    stale_top1 = (history[-1].test_top1 if history else start["top1"]) if recalibrate else None
    test = evaluate(student, test_loader, prep, ctx.device)
    params, macs = count_params_macs(student, ctx.data.image_size, ctx.data.in_channels)
    path = save_weights(student, ctx.stage_path("model.pt"))
    metrics = {
        "loss": [term.name for term in cfg.loss],
        "teacher_stage": cfg.teacher,
        "top1": test["top1"],
        "top1_at_start": start["top1"],
        "test_loss": test["loss"],
        "test_samples": test["samples"],
        "teacher_top1": teacher_artifact.metrics.get("top1"),
        "params": params,
        "macs": macs,
        "teacher_params": teacher_artifact.metrics.get("params"),
        "teacher_macs": teacher_artifact.metrics.get("macs"),
        "init_from_teacher_tensors": copied,
        "student_weights": loaded.to_json() if loaded is not None else None,
        "top1_before_batchnorm_recalibration": stale_top1,
        "cached_teacher_logits": cache is not None,
        "unlabeled_images": ctx.data.unlabeled,
        "history": history_dicts(history),
    }
    return Artifact(
        "distill", files={"model": path}, metrics=metrics, role="student", network=network
    )


def copy_matching_weights(source: torch.nn.Module, target: torch.nn.Module) -> int:
    """Copy every tensor whose name and shape match (born-again / thinner-copy initialisation).

    Returns:
        How many tensors were copied.
    """
    wanted = target.state_dict()
    matching = {
        k: v for k, v in source.state_dict().items() if k in wanted and wanted[k].shape == v.shape
    }
    target.load_state_dict(matching, strict=False)
    return len(matching)


@torch.no_grad()
def teacher_logits_cache(teacher, ctx: RunContext, prep) -> torch.Tensor:
    """The teacher's logits for every training image, computed once (inputs never change)."""
    from torch.utils.data import DataLoader

    cuda = ctx.device.type == "cuda"
    loader = DataLoader(
        ctx.data.train,
        batch_size=ctx.recipe.data.eval_batch_size,
        shuffle=False,
        num_workers=ctx.recipe.data.workers,
        pin_memory=cuda,
    )
    return torch.cat(
        [
            teacher(prep(images.to(ctx.device, non_blocking=cuda), train=False))
            for images, _ in loader
        ]
    )


def indexed_loaders(ctx: RunContext):
    from compress.data.containers import IndexedDataset
    from compress.data.loaders import make_loaders

    bundle = dataclasses.replace(ctx.data, train=IndexedDataset(ctx.data.train))
    return make_loaders(
        bundle, ctx.recipe.data, seed=ctx.recipe.seed, pin_memory=ctx.device.type == "cuda"
    )
