"""timm's MobileViT blocks (V1 and V2) rewritten so that ``torch.fx`` traces them, and INT8 reaches
their transformers.

A MobileViT block unfolds its feature map into patches, runs a small transformer over them and
folds them back; the unfolding rounds the map up to whole patches with ``math.ceil`` and an ``if``
on its height and width, which ``torch.fx`` cannot trace (timm marks both blocks not traceable).
So each block was kept whole and float: MobileViT-XXS had 24 of its 72 layers INT8,
MobileViTV2-050 20 of 65, all outside the blocks. :class:`TracedMobileVitBlock` and
:class:`TracedMobileVitV2Block` compute the same blocks with the unfolding and folding in
functions ``torch.fx`` keeps whole, around calls of the block's own layers (convolutions,
attention and MLP projections, norms), which quantize like any other. Same parameters, same
arithmetic in the same order; a map that is not whole patches is resized as timm resizes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn


class TracedMobileVitBlock(nn.Module):
    """The forward of timm's ``MobileVitBlock`` (V1: attention over tokens ``(B * P, N, C)``), put
    over the block's own class (:func:`~compress.quantization.layer_swaps.with_forward_of`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        tokens = self.norm(self.transformer(_tokens(x, self.patch_size)))
        x = self.conv_proj(_map_from_tokens(tokens, x, self.patch_size))
        if self.conv_fusion is not None:
            x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
        return x


class TracedMobileVitV2Block(nn.Module):
    """The forward of timm's ``MobileVitV2Block`` (linear attention over patches
    ``(B, C, P, N)``), put over the block's own class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _whole_patches(x, self.patch_size)
        x = self.conv_1x1(self.conv_kxk(x))
        patches = self.norm(self.transformer(_patches(x, self.patch_size)))
        return self.conv_proj(_map_from_patches(patches, x, self.patch_size))


def _patch_grid(height: int, width: int, patch: tuple[int, int]) -> tuple[int, int]:
    """How many patches tile a map of ``height`` x ``width``, rounded up."""
    return math.ceil(height / patch[0]), math.ceil(width / patch[1])


def _resized_up(x: torch.Tensor, patch: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """``x`` resized (bilinear) up to whole patches; itself when it is whole patches already."""
    height, width = x.shape[-2:]
    rows, columns = _patch_grid(height, width, patch)
    size = (rows * patch[0], columns * patch[1])
    if size == (height, width):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


@fx.wrap
def _tokens(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B * P, N, C)``: token ``n`` of sequence ``p`` is pixel ``p`` of patch
    ``n``, the map first resized (bilinear) up to whole patches."""
    x = _resized_up(x, patch, align_corners=False)
    batch, channels, height, width = x.shape
    rows, columns = height // patch[0], width // patch[1]
    x = x.reshape(batch * channels * rows, patch[0], columns, patch[1]).transpose(1, 2)
    x = x.reshape(batch, channels, rows * columns, patch[0] * patch[1]).transpose(1, 3)
    return x.reshape(batch * patch[0] * patch[1], rows * columns, -1)


@fx.wrap
def _map_from_tokens(
    tokens: torch.Tensor, like: torch.Tensor, patch: tuple[int, int]
) -> torch.Tensor:
    """:func:`_tokens` undone: the ``(B, C, H, W)`` map of ``like``, resized back."""
    batch, channels, height, width = like.shape
    rows, columns = _patch_grid(height, width, patch)
    x = tokens.contiguous().view(batch, patch[0] * patch[1], rows * columns, -1)
    x = x.transpose(1, 3).reshape(batch * channels * rows, columns, patch[0], patch[1])
    x = x.transpose(1, 2).reshape(batch, channels, rows * patch[0], columns * patch[1])
    if (rows * patch[0], columns * patch[1]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x


@fx.wrap
def _whole_patches(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """V2 resizes its input (corners aligned) up to whole patches, and keeps that size."""
    return _resized_up(x, patch, align_corners=True)


@fx.wrap
def _patches(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, P, N)``: pixel ``p`` of patch ``n``."""
    batch, channels, height, width = x.shape
    rows, columns = height // patch[0], width // patch[1]
    x = x.reshape(batch, channels, rows, patch[0], columns, patch[1]).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(batch, channels, -1, rows * columns)


@fx.wrap
def _map_from_patches(
    patches: torch.Tensor, like: torch.Tensor, patch: tuple[int, int]
) -> torch.Tensor:
    """:func:`_patches` undone: the ``(B, C, H, W)`` map of ``like``."""
    batch, channels, height, width = like.shape
    rows, columns = height // patch[0], width // patch[1]
    x = patches.reshape(batch, channels, patch[0], patch[1], rows, columns)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(batch, channels, height, width)
