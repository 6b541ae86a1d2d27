"""Stage ``distill``: train the student against the frozen teacher with a registered KD loss."""

from __future__ import annotations

import dataclasses

import torch

from compress.artifacts import Artifact, save_weights
from compress.config import DistillConfig
from compress.context import RunContext
from compress.losses import build_loss
from compress.models import count_params_macs
from compress.stages import STAGES
from compress.stages.networks import build_network, load_network, preprocess
from compress.train_loop import evaluate, fit


@STAGES.register("distill")
def distill(cfg: DistillConfig, ctx: RunContext) -> Artifact:
    """Train the recipe's student from scratch with ``cfg.loss`` against the teacher.

    The teacher runs in eval mode without gradients on exactly the augmented batch the student
    sees, so its soft targets describe the student's actual input.

    Returns:
        Artifact with ``files["model"]`` (student state_dict), its test accuracy before and after,
        the teacher's accuracy, params and MACs of both.
    """
    teacher = load_network(ctx, "teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_network(ctx, "student")
    loss_fn = build_loss(cfg.loss.name, cfg.loss.params).to(ctx.device)
    train_loader, test_loader = ctx.loaders()
    prep = preprocess(ctx)

    def step_loss(images, labels):
        with torch.no_grad():
            teacher_logits = teacher(images)
        student_logits = student(images)
        return loss_fn(student_logits, teacher_logits, labels).total, student_logits

    start = evaluate(student, test_loader, prep, ctx.device)
    history = fit(student, train_loader, test_loader, step_loss, cfg.train, preprocess=prep, device=ctx.device, desc="distill", show_progress=ctx.show_progress)
    test = evaluate(student, test_loader, prep, ctx.device)
    params, macs = count_params_macs(student, ctx.data.image_size, ctx.data.in_channels)
    path = save_weights(student, ctx.stage_path("model.pt"))
    teacher_metrics = ctx.latest("teacher").metrics
    metrics = {
        "model": ctx.recipe.student.model, "loss": cfg.loss.name,
        "top1": test["top1"], "top1_at_start": start["top1"], "test_loss": test["loss"], "test_samples": test["samples"],
        "teacher_top1": teacher_metrics.get("top1"), "params": params, "macs": macs,
        "teacher_params": teacher_metrics.get("params"), "teacher_macs": teacher_metrics.get("macs"),
        "history": [dataclasses.asdict(h) for h in history],
    }
    return Artifact("distill", files={"model": path}, metrics=metrics, role="student")
