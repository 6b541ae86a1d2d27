"""Swapping layers for what they compute, before quantization: the pre-passes that turn a layer
INT8 cannot reach into plain ones (weight-standardised convolutions, ``nn.MultiheadAttention``) and
the pass that gives each float layer its weight-quantized twin all copy a layer's geometry or a
network's modules the same way, declared here once."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn


def with_swapped(
    model: nn.Module, wanted: Callable[[nn.Module], bool], swap: Callable[[nn.Module], nn.Module]
) -> nn.Module:
    """``model`` itself when no module is ``wanted``, else a copy in which each wanted module is
    ``swap(module)``: the caller's network is not modified (it may go on training or export)."""
    if not any(wanted(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if wanted(module):
            model.set_submodule(name, swap(module))
    return model


def conv_like(conv: nn.Conv2d, kind: type[nn.Conv2d] = nn.Conv2d) -> nn.Conv2d:
    """A fresh ``kind`` convolution with ``conv``'s geometry, bias or not, device and dtype."""
    return kind(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
