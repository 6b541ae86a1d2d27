"""Rebuild a network a stage recorded, from its :class:`~compress.core.records.NetworkSpec` and
weights
file alone: no recipe, run or stage code. ``compress export``, the torch bench worker and the
stages' reloads all come through here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from compress.core.records import NetworkSpec, QuantSpec, StageRecord
from compress.errors import ModelError
from compress.nets.models import build_model
from compress.nets.weights import load_weights, read_state_dict


def rebuild_network(
    spec: NetworkSpec, weights: Path, *, in_channels: int, image_size: int
) -> torch.nn.Module:
    """A stage's network from its spec and weights, on CPU."""
    model = build_model(
        spec.model,
        num_classes=spec.num_classes,
        cifar_stem=spec.cifar_stem,
        in_channels=in_channels,
        image_size=image_size,
    ).eval()
    prepare = None
    if spec.quantization is not None:
        prepare = _quantized_graph(
            spec.quantization, torch.zeros(2, in_channels, image_size, image_size)
        )
    return load_weights(model, weights, prepare=prepare).eval()


def _quantized_graph(quantization: QuantSpec, example: torch.Tensor):
    from compress.quantization.fake_quant import prepare_quantized

    def prepare(model):
        return prepare_quantized(
            model.eval(),
            target=quantization.target,
            skip=quantization.skip,
            example_inputs=example,
            weight_range=quantization.weight_range,
            integer_products=quantization.integer_products,
            product_activations=quantization.product_activations,
        )

    return prepare


@dataclass(frozen=True)
class StageNetwork:
    """A finished stage's network as ``compress export`` and the torch bench worker see it:
    its spec, the stage it came from and the input it takes."""

    stage: str
    spec: NetworkSpec
    image_size: int
    in_channels: int
    record: StageRecord


def load_stage_network(folder: str | Path) -> tuple[torch.nn.Module, StageNetwork]:
    """The network a finished stage folder holds, without its run or recipe: for ``compress
    export`` and the torch bench backend.

    Everything comes from the folder's ``stage.json`` (the network's spec, the image size in its
    resolved recipe) and its weights, loaded with ``weights_only=True``; the input channels are
    read off the first convolution's weight.

    Args:
        folder: a stage folder of a run (``exported/<run>/<stage>``) or its ``stage.json``.

    Returns:
        ``(model in eval mode on CPU, what it is)``.

    Raises:
        ModelError: the folder is not a finished stage with a network, or its files do not fit.
    """
    record = StageRecord.read(folder, expected="a finished stage holding a network")
    weights = record.network_file()
    try:
        image_size = record.image_size
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{record.folder}: its stage.json records no data.image_size") from None
    in_channels = _input_channels(weights)
    model = rebuild_network(record.network, weights, in_channels=in_channels, image_size=image_size)
    return model, StageNetwork(record.stage, record.network, image_size, in_channels, record)


def _input_channels(weights: Path) -> int:
    """Channels of the first 4-D weight in a checkpoint: the network's input channels."""
    for tensor in read_state_dict(weights).values():
        if tensor.ndim == 4:
            return int(tensor.shape[1])
    raise ModelError(f"{weights}: no convolution weight to read the input channels from")
