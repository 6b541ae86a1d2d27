"""How compress has Torch-Pruning cut a group, where its own way breaks a network or misses a
target: the pruner's ``round_to`` for grouped convolutions, the tensors a convolution holds per
output channel besides its weight and bias, and weight-standardised convolutions traced as the
plain convolutions they are. :class:`compress.pruning.channels.ChannelPruner` builds and steps
the pruner through these."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch_pruning as tp
from torch import nn

from compress.nets.weights import per_output_channel_tensors
from compress.quantization.standardised_weights import standardised


class GroupedRoundingPruner(tp.pruner.BasePruner):
    """Torch-Pruning's pruner, with ``round_to`` right for grouped convolutions (RegNet,
    ResNeXt).

    Torch-Pruning picks the channels of a grouped layer per group (each group loses the same
    ones) but rounds that per-group count as if it were the whole layer's: with ``round_to=8`` a
    32-channel convolution in 2 groups of 16 lost 8 channels per group, half of it, where one was
    wanted, and torchvision's RegNetX-400MF asked for 1.5x fewer MACs got 2.27x in one step.
    Here a group keeps a multiple of ``round_to / gcd(round_to, groups)`` channels, so the
    layer's width stays a multiple of ``round_to``; where that step is over an eighth of a group
    (9 groups of 48 in RegNetX-3.2GF: 1.41x went to 1.81x in one step), the group is not rounded
    at all, as the target matters more than a width the grouped kernels gain little from.
    """

    _channel_groups = 1  # of the group whose count is being rounded

    def _is_atten_group(self, group):
        # asked of each group right before its count is rounded (and elsewhere: harmless)
        self._channel_groups = self._get_channel_groups(group)
        return super()._is_atten_group(group)

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        groups = self._channel_groups
        if groups <= 1 or current_channels % groups:
            return super()._round_to(n_pruned, current_channels, round_to)
        width = current_channels // groups  # n_pruned counts the channels of one group
        step = round_to // math.gcd(round_to, groups)
        if step > width // 8:
            step = 1
        kept = width - n_pruned
        return max(width - max(kept - kept % step, step), 0)


@contextmanager
def traced_as_plain_convolutions(model: nn.Module) -> Iterator[None]:
    """While Torch-Pruning traces the network, each weight-standardised convolution runs as the
    plain ``nn.Conv2d`` it is (same module, same parameters).

    Its forward computes the weight from the parameter (reshape, ``batch_norm``, reshape back),
    and Torch-Pruning traced that path as channels flowing into the layer: the reshape of the
    weight looked like a channel regroup, and every standardised layer kept its width (an
    NF-ResNet pruned only the layers next to its classifier). Per output channel the
    standardisation mixes nothing, so the channels are those of a plain convolution.
    """
    layers = [module for module in model.modules() if standardised(module)]
    for layer in layers:
        layer.forward = nn.Conv2d.forward.__get__(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


# Torch-Pruning's handlers that cut a convolution's output channels (a depthwise convolution's
# inputs are its outputs)
_CUTS_OUTPUTS = (
    tp.pruner.function.prune_conv_out_channels,
    tp.pruner.function.prune_depthwise_conv_out_channels,
    tp.pruner.function.prune_depthwise_conv_in_channels,
)


def prune_group(group: tp.dependency.Group) -> None:
    """Cut one Torch-Pruning group, and with a convolution's output channels every other tensor
    it holds one entry per output channel: Torch-Pruning's convolution pruner cuts ``weight`` and
    ``bias`` only, and would leave timm's ``ScaledStdConv2d.gain`` (NF-ResNet, NFNet) at the old
    width, so the next forward breaks. A convolution subclass keeps Torch-Pruning's own pruner
    (and so counts in every importance criterion, which know only that one)."""
    held = {}
    for dep, idxs in group:
        conv = dep.target.module
        if dep.handler in _CUTS_OUTPUTS and not conv.transposed and conv not in held:
            if names := per_output_channel_tensors(conv):
                keep = sorted(set(range(conv.out_channels)) - set(idxs))
                held[conv] = (names, conv.out_channels, keep)
    group.prune()
    for conv, (names, width, keep) in held.items():
        for name in names:
            tensor = getattr(conv, name)
            if len(tensor) != width or conv.out_channels != len(keep):
                continue  # not cut by this group after all
            kept = tensor.detach()[keep].clone()
            if isinstance(tensor, nn.Parameter):
                setattr(conv, name, nn.Parameter(kept, requires_grad=tensor.requires_grad))
            else:
                setattr(conv, name, kept)  # a registered buffer stays registered
