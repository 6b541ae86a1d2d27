"""Build the recipe's networks and reload the ones earlier stages trained.

A stage that trains a network records its architecture (``model``, ``cifar_stem``,
``num_classes``) in its metrics, so a later stage rebuilds exactly that network from the
artifact alone, whichever recipe section it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.artifacts import STAGE_RECORD, Artifact
from compress.config import StudentConfig, TeacherConfig
from compress.context import RunContext
from compress.errors import ModelError
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
    model = rebuild_network(artifact.metrics, artifact.files["model"], in_channels=ctx.data.in_channels, image_size=ctx.data.image_size)
    return model.to(ctx.device).eval()


def rebuild_network(metrics: dict, weights: Path, *, in_channels: int, image_size: int) -> torch.nn.Module:
    """A stage's network from its recorded metrics (architecture, quantization) and weights, on CPU."""
    model = build_model(metrics["model"], num_classes=metrics["num_classes"], cifar_stem=metrics["cifar_stem"], in_channels=in_channels).eval()
    settings = metrics.get("quantization")
    prepare = None
    if settings:
        from compress.quantization import prepare_quantized

        example = torch.zeros(2, in_channels, image_size, image_size)

        def prepare(model):
            # stages quantized before weight ranges existed used the full range
            weight_range = settings.get("weight_range", "full")
            return prepare_quantized(model.eval(), target=settings["target"], skip=tuple(settings["skip"]), example_inputs=example, weight_range=weight_range)

    return load_weights(model, weights, prepare=prepare).eval()


def load_stage_network(folder: str | Path) -> tuple[torch.nn.Module, dict]:
    """The network a finished stage folder holds, without its run or recipe: for ``compress
    export`` and the torch bench backend.

    Everything comes from the folder's ``stage.json`` (architecture and quantization in its
    metrics, the image size in its resolved recipe) and its weights, loaded with
    ``weights_only=True``; the input channels are read off the first convolution's weight.

    Args:
        folder: a stage folder of a run (``exported/<run>/<stage>``) or its ``stage.json``.

    Returns:
        ``(model in eval mode on CPU, info)`` with info ``{"stage", "model", "cifar_stem",
        "num_classes", "image_size", "in_channels", "quantization"}``.

    Raises:
        ModelError: the folder is not a finished stage with a network, or its files do not fit.
    """
    folder = Path(folder)
    record_path = folder if folder.name == STAGE_RECORD else folder / STAGE_RECORD
    try:
        record = json.loads(record_path.read_text())
        metrics, recipe = record["metrics"], record["recipe"]
        weights = record_path.parent.parent / record["files"]["model"]["path"]
        image_size = int(recipe["data"]["image_size"])
        arch = {key: metrics[key] for key in ARCHITECTURE_KEYS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = "no such file" if isinstance(exc, OSError) else f"no {exc} recorded" if isinstance(exc, KeyError) else "not a stage record"
        raise ModelError(f"{record_path}: not a finished stage holding a network ({reason})") from None
    in_channels = _input_channels(weights)
    model = rebuild_network(metrics, weights, in_channels=in_channels, image_size=image_size)
    info = arch | {"stage": record.get("stage"), "image_size": image_size, "in_channels": in_channels, "quantization": metrics.get("quantization")}
    return model, info


def _input_channels(weights: Path) -> int:
    """Channels of the first 4-D weight in a checkpoint: the network's input channels."""
    from compress.models import read_state_dict

    for tensor in read_state_dict(weights).values():
        if tensor.ndim == 4:
            return int(tensor.shape[1])
    raise ModelError(f"{weights}: no convolution weight to read the input channels from")


def example_batch(ctx: RunContext, size: int = 2) -> torch.Tensor:
    """Zeros shaped like the run's input, for tracing (batch 2: tracers specialise a batch of 1)."""
    data = ctx.data
    return torch.zeros(size, data.in_channels, data.image_size, data.image_size, device=ctx.device)


def preprocess(ctx: RunContext):
    from compress.data import Preprocess

    return Preprocess(ctx.data.mean, ctx.data.std, augment=ctx.recipe.data.augment).to(ctx.device)
