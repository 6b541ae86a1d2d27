"""Build the recipe's networks and reload the ones earlier stages trained.

A stage that holds a network records its :class:`~compress.core.records.NetworkSpec` (architecture,
stem, classes, quantization), so a later stage rebuilds exactly that network from the artifact
alone, whichever recipe section it came from.
"""

from __future__ import annotations

import torch

from compress.core.records import NetworkSpec
from compress.errors import ModelError
from compress.nets.models import build_model
from compress.nets.pretrained import WeightsLoaded, build_pretrained
from compress.nets.rebuild import rebuild_network
from compress.pipeline.artifacts import Artifact
from compress.pipeline.config import StudentConfig, TeacherConfig
from compress.pipeline.context import RunContext


def network_spec(ctx: RunContext, spec: TeacherConfig | StudentConfig) -> NetworkSpec:
    """The network a recipe section describes (CIFAR stem auto: image_size <= 64)."""
    cifar_stem = (
        spec.cifar_stem if spec.cifar_stem is not None else ctx.recipe.data.image_size <= 64
    )
    return NetworkSpec(model=spec.model, num_classes=ctx.data.num_classes, cifar_stem=cifar_stem)


def network_of(artifact: Artifact) -> NetworkSpec:
    """The network an earlier stage holds (it recorded one: a later stage reshapes it)."""
    if artifact.network is None:
        raise ModelError(f"stage {artifact.stage!r} holds no network")
    return artifact.network


def build_network(ctx: RunContext, spec: NetworkSpec) -> torch.nn.Module:
    """A freshly initialised float network on the run's device."""
    model = build_model(
        spec.model,
        num_classes=spec.num_classes,
        cifar_stem=spec.cifar_stem,
        in_channels=ctx.data.in_channels,
        image_size=ctx.data.image_size,
    )
    return model.to(ctx.device)


def start_network(
    ctx: RunContext, spec: NetworkSpec, section: TeacherConfig | StudentConfig, field: str
) -> tuple[torch.nn.Module, WeightsLoaded | None]:
    """The network a recipe section starts training from, on the run's device: its pretrained
    ``weights`` when it names some (``field`` prefixes their errors), else fresh."""
    if section.weights is None:
        return build_network(ctx, spec), None
    try:
        model, loaded = build_pretrained(
            spec.model,
            spec.num_classes,
            section.weights,
            cifar_stem=spec.cifar_stem,
            in_channels=ctx.data.in_channels,
            image_size=ctx.data.image_size,
            strict=section.strict_weights,
        )
    except ModelError as exc:
        raise ModelError(f"{field}.weights: {exc}") from None
    return model.to(ctx.device), loaded


def load_network(ctx: RunContext, artifact: Artifact) -> torch.nn.Module:
    """The network an earlier stage trained, in eval mode on the run's device.

    A pruned network is resized from the widths stored in its file; a quantized one is rebuilt
    as the same fake-quantized graph (BatchNorm folded, quantizers placed) before its weights and
    quantization scales are loaded.
    """
    model = rebuild_network(
        network_of(artifact),
        artifact.files["model"],
        in_channels=ctx.data.in_channels,
        image_size=ctx.data.image_size,
    )
    return model.to(ctx.device).eval()


def example_batch(ctx: RunContext, size: int = 2) -> torch.Tensor:
    """Zeros shaped like the run's input, for tracing (batch 2: tracers specialise a batch of 1)."""
    data = ctx.data
    return torch.zeros(size, data.in_channels, data.image_size, data.image_size, device=ctx.device)


def preprocess(ctx: RunContext):
    from compress.data.augment import Preprocess

    return Preprocess(ctx.data.mean, ctx.data.std, augment=ctx.recipe.data.augment).to(ctx.device)


def calibration_batches(ctx: RunContext, loader, prep, images: int) -> list[torch.Tensor]:
    """The first ``images`` training images, preprocessed without augmentation, on the run's
    device: what INT8 calibration and BatchNorm recalibration observe."""
    return [inputs for inputs, _ in training_sample(ctx, loader, prep, images)]


def training_sample(
    ctx: RunContext, loader, prep, images: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``images`` training images of one pass of ``loader`` with their labels, as
    ``(inputs, labels)`` batches: preprocessed without augmentation, on the run's device."""
    return training_split(ctx, loader, prep, images, 0)[0]


def training_split(
    ctx: RunContext, loader, prep, images: int, batches: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """One pass of ``loader``, split: its first ``images`` images as :func:`training_sample`
    gives them, then up to ``batches`` whole batches that follow, raw ``(images, labels)`` as
    the loader yields them (on the CPU; training augments them), disjoint from the first."""
    sample, raw, seen = [], [], 0
    for batch, labels, *_ in loader:
        if seen < images:
            head, head_labels = batch[: images - seen], labels[: images - seen]
            sample.append((prep(head.to(ctx.device), train=False), head_labels.to(ctx.device)))
            seen += len(head)
        elif len(raw) < batches:
            raw.append((batch, labels))
        if seen >= images and len(raw) >= batches:
            break
    return sample, raw
