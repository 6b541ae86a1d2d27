"""Stage ``teacher``: load the recipe's teacher checkpoint, or train the teacher with
cross-entropy."""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from compress.artifacts import Artifact
from compress.config import UNLABELED, TeacherStageConfig
from compress.context import RunContext
from compress.errors import ModelError
from compress.models import classifier_key, count_params_macs
from compress.stages.networks import build_network, network_spec, preprocess
from compress.train_loop import evaluate, fit
from compress.weights import load_weights, read_state_dict, save_weights


def teacher(cfg: TeacherStageConfig, ctx: RunContext) -> Artifact:
    """Produce the teacher every later stage learns from.

    With ``teacher.checkpoint`` the weights are loaded (``weights_only=True``) and only
    evaluated; otherwise the teacher is trained from scratch with ``teacher.train``.

    Returns:
        Artifact with ``files["model"]`` (state_dict) and test accuracy, params, MACs, history.
    """
    spec = ctx.recipe.teacher
    network = network_spec(ctx, spec)
    model = build_network(ctx, network)
    train_loader, test_loader = ctx.loaders()
    prep = preprocess(ctx)
    history = []
    if spec.checkpoint is not None:
        check_classes(spec.checkpoint, model, ctx)
        load_weights(model, spec.checkpoint)
        model.to(ctx.device)
    else:

        def step_loss(images, labels, epoch):
            logits = model(images)
            return F.cross_entropy(
                logits, labels, ignore_index=UNLABELED, label_smoothing=spec.train.label_smoothing
            ), logits

        history = fit(
            model,
            train_loader,
            test_loader,
            step_loss,
            spec.train,
            preprocess=prep,
            **ctx.training("teacher"),
        )
    test = evaluate(model, test_loader, prep, ctx.device)
    params, macs = count_params_macs(model, ctx.data.image_size, ctx.data.in_channels)
    path = save_weights(model, ctx.stage_path("model.pt"))
    metrics = {
        "top1": test["top1"],
        "test_loss": test["loss"],
        "test_samples": test["samples"],
        "params": params,
        "macs": macs,
        "source": "checkpoint" if spec.checkpoint else "trained",
        "history": [dataclasses.asdict(h) for h in history],
    }
    return Artifact(
        "teacher", files={"model": path}, metrics=metrics, role="teacher", network=network
    )


def check_classes(path: str, model, ctx: RunContext) -> None:
    """A checkpoint trained on another label set is the likeliest wrong teacher: say so plainly
    instead of listing the classifier's size mismatches."""
    key = classifier_key(model)
    weight = read_state_dict(path).get(key) if key else None
    classes = ctx.data.num_classes
    if weight is not None and weight.ndim >= 1 and weight.shape[0] != classes:
        data = ctx.recipe.data
        where = f"{data.kind} at {data.path}" if data.path else data.kind
        raise ModelError(
            f"teacher checkpoint {path} has {weight.shape[0]} classes, the data has {classes} "
            f"({where}); the teacher must be trained on the data's classes"
        )
