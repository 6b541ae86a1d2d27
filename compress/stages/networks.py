"""Build the recipe's teacher and student networks and load the weights earlier stages saved."""

from __future__ import annotations

import torch

from compress.context import RunContext
from compress.models import build_model, load_weights


def build_network(ctx: RunContext, role: str) -> torch.nn.Module:
    """A freshly initialised teacher or student as the recipe describes it, on the run's device."""
    spec = ctx.recipe.teacher if role == "teacher" else ctx.recipe.student
    cifar_stem = spec.cifar_stem if spec.cifar_stem is not None else ctx.recipe.data.image_size <= 64
    model = build_model(spec.model, num_classes=ctx.data.num_classes, cifar_stem=cifar_stem, in_channels=ctx.data.in_channels)
    return model.to(ctx.device)


def load_network(ctx: RunContext, role: str) -> torch.nn.Module:
    """The latest trained teacher or student of this run, in eval mode."""
    model = build_network(ctx, role)
    load_weights(model, ctx.latest(role).files["model"])
    return model.to(ctx.device).eval()


def preprocess(ctx: RunContext):
    from compress.data import Preprocess

    return Preprocess(ctx.data.mean, ctx.data.std, augment=ctx.recipe.data.augment).to(ctx.device)
