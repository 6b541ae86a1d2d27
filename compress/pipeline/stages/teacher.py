"""Stage ``teacher``: load the recipe's teacher checkpoint, or train the teacher with
cross-entropy, from scratch or from its pretrained weights (fine-tuning)."""

from __future__ import annotations

import dataclasses

from compress import api
from compress.errors import ModelError
from compress.nets.models import classifier_key, count_params_macs
from compress.nets.weights import load_weights, read_state_dict, save_weights
from compress.pipeline.artifacts import Artifact
from compress.pipeline.config import TeacherStageConfig
from compress.pipeline.context import RunContext
from compress.pipeline.stages.networks import network_spec, preprocess, start_network
from compress.training.loop import evaluate
from compress.training.loss_params import CEParams
from compress.training.spec import DistillSpec, LossConfig


def teacher(cfg: TeacherStageConfig, ctx: RunContext) -> Artifact:
    """Produce the teacher every later stage learns from.

    With ``teacher.checkpoint`` the weights are loaded (``weights_only=True``) and only
    evaluated; otherwise the teacher is trained with ``teacher.train``: from its pretrained
    ``teacher.weights`` (fine-tuning; ``epochs: 0`` keeps them as they are, when their classes
    are the data's) or from scratch.

    Returns:
        Artifact with ``files["model"]`` (state_dict) and test accuracy, params, MACs, history,
        and what the pretrained weights filled (``weights``).

    Raises:
        ModelError: the weights replace the head (another class count) and ``train.epochs`` is
            0, so the teacher would answer at random.
    """
    spec = ctx.recipe.teacher
    network = network_spec(ctx, spec)
    model, loaded = start_network(ctx, network, spec, "teacher")
    if loaded is not None and loaded.head_replaced and spec.train.epochs < 1:
        raise ModelError(
            f"teacher.weights: {spec.weights} have {loaded.source_classes} classes and the data "
            f"{network.num_classes}, so the teacher gets a new head that must be trained; set "
            "teacher.train.epochs >= 1 (fine-tuning)"
        )
    train_loader, test_loader = ctx.loaders()
    prep = preprocess(ctx)
    history = []
    if spec.checkpoint is not None:
        check_classes(spec.checkpoint, model, ctx)
        load_weights(model, spec.checkpoint)
        model.to(ctx.device)
    elif spec.train.epochs >= 1:
        history = []
        ce = LossConfig("ce", params=CEParams(label_smoothing=spec.train.label_smoothing))
        api.distill(
            model,
            None,
            train_loader,
            DistillSpec(loss=(ce,), train=spec.train),
            test_loader=test_loader,
            loop=ctx.loop("teacher", prep),
            history=history,
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
        "source": _source(spec),
        "weights": loaded.to_json() if loaded is not None else None,
        "history": [dataclasses.asdict(h) for h in history],
    }
    return Artifact(
        "teacher", files={"model": path}, metrics=metrics, role="teacher", network=network
    )


def _source(spec) -> str:
    if spec.checkpoint is not None:
        return "checkpoint"
    if spec.weights is None:
        return "trained"
    return "fine-tuned" if spec.train.epochs >= 1 else "pretrained"


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
