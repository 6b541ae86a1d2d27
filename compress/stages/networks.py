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

ARCHITECTURE_KEYS = ("model", "cifar_stem", "num_classes")  # what build_network needs


def architecture_of(artifact: Artifact) -> dict:
    """The architecture a model stage recorded: a later stage that reshapes the same network
    (prune, quantize) records it again so its own artifact rebuilds on its own."""
    return {key: artifact.metrics[key] for key in ARCHITECTURE_KEYS}


def architecture(ctx: RunContext, spec: TeacherConfig | StudentConfig) -> dict:
    """The arguments of ``build_model`` for a recipe section (CIFAR stem auto: image_size <= 64)."""
    cifar_stem = spec.cifar_stem if spec.cifar_stem is not None else ctx.recipe.data.image_size <= 64
    return {"model": spec.model, "cifar_stem": cifar_stem, "num_classes": ctx.data.num_classes}


def build_network(ctx: RunContext, arch: dict) -> torch.nn.Module:
    """A freshly initialised network on the run's device."""
    model = build_model(arch["model"], num_classes=arch["num_classes"], cifar_stem=arch["cifar_stem"], in_channels=ctx.data.in_channels)
    return model.to(ctx.device)


def load_network(ctx: RunContext, artifact: Artifact) -> torch.nn.Module:
    """The network an earlier stage trained, in eval mode on the run's device.

    A pruned network is resized from the widths stored in its file; a quantized one is rebuilt
    as the same fake-quantized graph (BatchNorm folded, quantizers placed) before its weights and
    quantization scales are loaded.
    """
    model = build_network(ctx, artifact.metrics).eval()
    settings = artifact.metrics.get("quantization")
    prepare = None
    if settings:
        from compress.quantization import prepare_quantized

        def prepare(model):
            return prepare_quantized(model.eval(), target=settings["target"], skip=tuple(settings["skip"]), example_inputs=example_batch(ctx))

    model = load_weights(model, artifact.files["model"], prepare=prepare)
    return model.to(ctx.device).eval()


def example_batch(ctx: RunContext, size: int = 2) -> torch.Tensor:
    """Zeros shaped like the run's input, for tracing (batch 2: tracers specialise a batch of 1)."""
    data = ctx.data
    return torch.zeros(size, data.in_channels, data.image_size, data.image_size, device=ctx.device)


def preprocess(ctx: RunContext):
    from compress.data import Preprocess

    return Preprocess(ctx.data.mean, ctx.data.std, augment=ctx.recipe.data.augment).to(ctx.device)
