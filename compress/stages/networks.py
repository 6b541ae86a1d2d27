"""Build the recipe's networks and reload the ones earlier stages trained.

A stage that trains a network records its architecture (``model``, ``cifar_stem``,
``num_classes``) in its metrics, so a later stage rebuilds exactly that network from the
artifact alone, whichever recipe section it came from.
"""

from __future__ import annotations

import torch

from compress.artifacts import Artifact
from compress.config import StudentConfig, TeacherConfig
from compress.context import RunContext
from compress.models import build_model, load_weights


def architecture(ctx: RunContext, spec: TeacherConfig | StudentConfig) -> dict:
    """The arguments of ``build_model`` for a recipe section (CIFAR stem auto: image_size <= 64)."""
    cifar_stem = spec.cifar_stem if spec.cifar_stem is not None else ctx.recipe.data.image_size <= 64
    return {"model": spec.model, "cifar_stem": cifar_stem, "num_classes": ctx.data.num_classes}


def build_network(ctx: RunContext, arch: dict) -> torch.nn.Module:
    """A freshly initialised network on the run's device."""
    model = build_model(arch["model"], num_classes=arch["num_classes"], cifar_stem=arch["cifar_stem"], in_channels=ctx.data.in_channels)
    return model.to(ctx.device)


def load_network(ctx: RunContext, artifact: Artifact) -> torch.nn.Module:
    """The network an earlier stage trained, in eval mode on the run's device."""
    model = build_network(ctx, artifact.metrics)
    load_weights(model, artifact.files["model"])
    return model.to(ctx.device).eval()


def preprocess(ctx: RunContext):
    from compress.data import Preprocess

    return Preprocess(ctx.data.mean, ctx.data.std, augment=ctx.recipe.data.augment).to(ctx.device)
