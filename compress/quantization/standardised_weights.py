"""Weight-standardised convolutions (timm's ``StdConv2d`` and ``ScaledStdConv2d``: NF-ResNet,
NFNet, BiT) as the plain convolutions they compute at inference.

Such a layer standardises its weight in every forward (zero mean, unit variance per output
channel; ``ScaledStdConv2d`` then scales it by a learned per-channel ``gain``), so its graph
computes the weight from the parameter: quantized as it is, the INT8 weight would be the raw
parameter and the export would keep the standardisation in float, and ONNX Runtime fuses no
``QLinearConv`` (timm's NF-ResNet-26: "29 convolutions stay FP32"). Computed once and held by a
plain ``nn.Conv2d``, the weight is a constant to quantize like any other, as BatchNorm is folded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.quantization.layer_swaps import conv_like, with_swapped

# by class name: timm is optional. The "Same" variants pad by their input's size in every
# forward, which a plain convolution cannot: they are left as they are.
STANDARDISED = ("StdConv2d", "ScaledStdConv2d")


def standardised(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and type(module).__name__ in STANDARDISED


def with_plain_convolutions(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no weight-standardised convolution, else a copy in which each
    is the plain convolution it computes (``model`` is not modified)."""
    return with_swapped(model, standardised, plain_convolution)


@torch.no_grad()
def plain_convolution(conv: nn.Conv2d) -> nn.Conv2d:
    """The ``nn.Conv2d`` with ``conv``'s standardised weight, its bias and its geometry."""
    plain = conv_like(conv)
    plain.weight.copy_(standardised_weight(conv))
    if conv.bias is not None:
        plain.bias.copy_(conv.bias)
    return plain


def standardised_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weight ``conv``'s forward convolves with: per output channel, the parameter minus its
    mean over its inputs, divided by sqrt(variance + eps), times ``gain * scale`` for
    ``ScaledStdConv2d`` (timm 1.0's ``std_conv.py``, which computes it with ``F.batch_norm``)."""
    gain = getattr(conv, "gain", None)
    affine = (gain * conv.scale).view(-1) if gain is not None else None
    flat = conv.weight.reshape(1, conv.out_channels, -1)
    normed = F.batch_norm(
        flat, None, None, weight=affine, training=True, momentum=0.0, eps=conv.eps
    )
    return normed.reshape_as(conv.weight)
