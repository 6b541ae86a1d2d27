"""Bias correction: after calibration, each layer's bias takes back the mean error that its own
INT8 rounding puts on its output channels.

Why: rounding a layer's weights to INT8 and clipping its input to the calibrated range shift the
mean of each output channel, and a shifted mean is a systematic error, not noise: every later
layer sees it on every image (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction"; NNCF's ``FastBiasCorrection`` applies it by default, ONNX
Runtime's quantizer does not). Depthwise layers, with 9 weights per channel, shift the most.

What is measured is each layer's *own* error, in the INT8 network as it runs: on the same
calibration images, the layer computed in float (float weights, on the value before its input
quantizer) against the layer as INT8 computes it (rounded weights, on the quantized input).
Measuring each layer against the float *network* instead, and correcting all layers at once,
counts an early layer's error once at that layer and again at every layer after it; tried
first, it made a ResNet-20's output error 60 times worse in three rounds. Local errors add
up instead of compounding, so one pass corrects every layer; a second round measures what the
first left (the inputs moved a little) and shows it in the record. Both outputs come from the
same images, so their difference is estimated far more tightly than either mean.

Every convolution and linear layer with a bias is corrected, including layers kept in float (an
INT8 input quantizer still shifts their mean). A layer without a bias (no BatchNorm was folded
into it and it had none) is left as it is: adding one would change the saved parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from compress.quantization.fake_quant import ActQuant

DEFAULT_ROUNDS = 2


@dataclass(frozen=True)
class BiasCorrection:
    """What :func:`correct_bias` did: ``layers`` corrected, and for each round the mean absolute
    per-channel shift it corrected relative to the mean standard deviation of the layers' float
    outputs (averaged over layers): the second is far below the first when the correction has
    converged."""

    layers: int
    relative_shifts: tuple[float, ...]

    def to_json(self) -> dict:
        return {"layers": self.layers, "relative_shifts": list(self.relative_shifts)}


@torch.no_grad()
def correct_bias(
    qmodel: fx.GraphModule, batches: Sequence[torch.Tensor], *, rounds: int = DEFAULT_ROUNDS
) -> BiasCorrection:
    """Move the bias of every conv/linear layer of the calibrated INT8 ``qmodel`` (in place) by
    the per-channel mean of (its float output - its INT8 output) on ``batches``.

    Args:
        qmodel: from :func:`compress.quantization.fake_quant.prepare_quantized`, calibrated.
        batches: input batches as the network takes them (the calibration images).
        rounds: passes over ``batches``, each measuring and correcting what is left.

    Returns:
        The :class:`BiasCorrection` record; it is also kept as ``qmodel.bias_correction``.
    """
    if rounds < 1:
        raise ValueError(f"bias correction: rounds must be >= 1, got {rounds}")
    layers = _biased_layers(qmodel)
    float_biases = {name: module.bias.detach().clone() for name, module in layers.items()}
    relative = []
    for _ in range(rounds):
        errors = layer_errors(qmodel, layers, float_biases, batches)
        for name, (shift, _spread) in errors.items():
            layers[name].bias.add_(shift.to(layers[name].bias.dtype))
        relative.append(
            float(torch.stack([(s.abs().mean() / d) for s, d in errors.values()]).mean())
            if errors
            else 0.0
        )
    record = BiasCorrection(len(layers), tuple(relative))
    qmodel.bias_correction = record
    return record


def layer_errors(
    qmodel: fx.GraphModule,
    layers: dict[str, nn.Module],
    float_biases: dict[str, torch.Tensor],
    batches: Sequence[torch.Tensor],
) -> dict[str, tuple[torch.Tensor, float]]:
    """For each named layer, in one pass of ``qmodel`` (eval mode): the per-channel mean of its
    float output (float weights, its bias in ``float_biases``: the one before any correction)
    minus its INT8 output (channels: dim 1 of a convolution's output, the last dim of a linear
    layer's), and the mean standard deviation of its float output channels."""
    feeders = _input_quantizers(qmodel, layers)
    quantizers = dict(qmodel.named_modules())
    before_rounding: dict[str, torch.Tensor] = {}  # held until the last layer it feeds has run
    readers = {q: list(feeders.values()).count(q) for q in set(feeders.values())}
    unread: dict[str, int] = {}
    sums: dict[str, list] = {}

    def keep_input(name: str):
        def hook(_module, inputs, _output) -> None:
            before_rounding[name] = inputs[0]
            unread[name] = readers[name]

        return hook

    def measure(name: str):
        def hook(module, inputs, output) -> None:
            feeder = feeders.get(name)
            source = before_rounding.get(feeder) if feeder else None
            if source is not None:
                unread[feeder] -= 1
                if unread[feeder] <= 0:
                    del before_rounding[feeder]
            rounded = inputs[0]
            exact = source if source is not None and source.shape == rounded.shape else rounded
            reference = _float_forward(module, exact, float_biases[name])
            difference = _channels_last(reference - output, module)
            values = _channels_last(reference, module)
            total = sums.setdefault(name, [0.0, 0.0, 0.0, 0])
            total[0] = total[0] + difference.sum(0)
            total[1] = total[1] + values.sum(0)
            total[2] = total[2] + values.square().sum(0)
            total[3] += values.shape[0]

        return hook

    handles = [quantizers[q].register_forward_hook(keep_input(q)) for q in set(feeders.values())]
    handles += [module.register_forward_hook(measure(name)) for name, module in layers.items()]
    training = qmodel.training
    qmodel.eval()
    try:
        for batch in batches:
            qmodel(batch)
            before_rounding.clear()
    finally:
        qmodel.train(training)
        for handle in handles:
            handle.remove()
    errors = {}
    for name, (difference, total, squares, count) in sums.items():
        mean = total / count
        spread = (squares / count - mean.square()).clamp_min(0).sqrt().mean()
        errors[name] = ((difference / count).float(), max(float(spread), 1e-12))
    return errors


def _float_forward(module: nn.Module, inputs: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The layer computed in float: its float weight and ``bias``, no rounding."""
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(inputs, module.weight, bias)
    return F.linear(inputs, module.weight, bias)


def _channels_last(values: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``(samples, channels)`` in float64: a convolution's channels are dim 1."""
    values = values.detach().double()
    if isinstance(module, nn.Conv2d):
        values = values.movedim(1, -1)
    return values.reshape(-1, values.shape[-1])


def _input_quantizers(qmodel: fx.GraphModule, layers: dict[str, nn.Module]) -> dict[str, str]:
    """Layer name -> the activation quantizer whose output is its input, where one is (else the
    layer's own input is its float reference: only its weights' rounding is measured)."""
    modules = dict(qmodel.named_modules())
    feeders = {}
    for node in qmodel.graph.nodes:
        if node.op != "call_module" or node.target not in layers or not node.args:
            continue
        source = node.args[0]
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), ActQuant)
        ):
            feeders[node.target] = source.target
    return feeders


def _biased_layers(qmodel: fx.GraphModule) -> dict[str, nn.Module]:
    """The convolutions and linear layers the graph calls that have a bias, by name (those
    inside a module kept whole by tracing compute in float on float inputs: nothing to
    correct)."""
    called = {node.target for node in qmodel.graph.nodes if node.op == "call_module"}
    return {
        name: module
        for name, module in qmodel.named_modules()
        if name in called and isinstance(module, nn.Conv2d | nn.Linear) and module.bias is not None
    }
