"""Swapping layers for what they compute, before quantization: the pre-passes that turn a layer
INT8 cannot reach into plain ones (weight-standardised convolutions, ``nn.MultiheadAttention``) and
the pass that gives each float layer its weight-quantized twin all copy a layer's geometry or a
network's modules the same way, declared here once."""

from __future__ import annotations

import copy
import functools
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


def with_forward_of(
    model: nn.Module, wanted: Callable[[nn.Module], bool], mixin: type[nn.Module]
) -> nn.Module:
    """``model`` itself when no module is ``wanted``, else a copy in which each wanted module
    computes with ``mixin``'s ``forward``: its class becomes ``mixin`` over its own, so it keeps
    its name, children, parameters, state-dict keys and methods. A module wrapped instead would
    put a level in every name below it, and a user's ``quantize.skip`` of
    ``stages.2.1.transformer`` would match nothing."""
    return with_swapped(
        model,
        lambda module: wanted(module) and not isinstance(module, mixin),
        functools.partial(_reclassed, mixin=mixin),
    )


def _reclassed(module: nn.Module, mixin: type[nn.Module]) -> nn.Module:
    module.__class__ = _mixed(mixin, type(module))
    return module


@functools.cache
def _mixed(mixin: type[nn.Module], base: type[nn.Module]) -> type[nn.Module]:
    """``mixin`` over ``base``, made once per pair (``mixin``'s forward comes first)."""
    return type(mixin.__name__, (mixin, base), {"__module__": mixin.__module__})


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


def linear_like(linear: nn.Linear, kind: type[nn.Linear] = nn.Linear) -> nn.Linear:
    """A fresh ``kind`` linear layer with ``linear``'s widths, bias or not, device and dtype."""
    return kind(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
