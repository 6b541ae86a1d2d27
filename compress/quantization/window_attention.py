"""torchvision's Swin attention rewritten with its projections called as layers, so that INT8
quantization reaches them.

torchvision's ``ShiftedWindowAttention`` (and V2) hands ``qkv.weight`` and ``proj.weight`` to
``shifted_window_attention``, a function ``torch.fx`` keeps whole (``torch.fx.wrap``: its padding
and shifts depend on the input's shape): the projections, a third of a Swin block's linear work
(4C^2 of 12C^2 per token), are never layer calls a graph pass can swap for quantized ones, and
stayed float. :class:`WindowAttention` computes the same attention in three steps ``torch.fx``
keeps whole (windows cut from the shifted, padded map; attention within each window; the
windows put back) around calls of ``qkv`` and ``proj``, which then quantize like any
``nn.Linear``. Same parameters, same arithmetic in the same order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from compress.core.compat import torchvision
from compress.quantization.layer_swaps import with_forward_of

MASKED = -100.0  # what torchvision adds to a score between two regions a shift brought together


class WindowAttention(nn.Module):
    """The forward of torchvision's shifted-window attention with ``qkv`` and ``proj`` called as
    layers, put over the attention's own class
    (:func:`~compress.quantization.layer_swaps.with_forward_of`: same names, parameters and
    methods). Swin V2 ignores the key's part of the ``qkv`` bias (torchvision zeroes it on every
    call); :func:`with_window_attention` zeroes it once, so the layer's output is what the
    attention reads. QAT may then train it (a key bias is a valid attention, just not V2's own):
    the exported file is proven against what the network computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window, shift = list(self.window_size), list(self.shift_size)
        windows = cut_windows(x, window, shift)
        mixed = _attend(
            self.qkv(windows),
            self.get_relative_position_bias(),
            x,
            window,
            shift,
            self.num_heads,
            self.logit_scale if _is_v2(self) else None,
            self.attention_dropout,
            self.training,
        )
        out = F.dropout(self.proj(mixed), p=self.dropout, training=self.training)
        return put_back(out, x, window, shift)


def _is_v2(attention: nn.Module) -> bool:
    """Swin V2's attention: cosine similarity, scaled by a learned logit scale."""
    return hasattr(attention, "logit_scale")


def _geometry(x: torch.Tensor, window: list[int], shift: list[int]):
    """The padded map's height and width and the shift applied to it (none along an axis that
    one window covers), for a ``(B, H, W, C)`` map ``x``."""
    height, width = x.shape[1], x.shape[2]
    padded = [
        height + (window[0] - height % window[0]) % window[0],
        width + (window[1] - width % window[1]) % window[1],
    ]
    return padded, [0 if window[i] >= padded[i] else shift[i] for i in (0, 1)]


@fx.wrap
def cut_windows(x: torch.Tensor, window: list[int], shift: list[int]) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * windows, window area, C)``: padded to whole windows, rolled by
    the shift, cut into windows."""
    batch, height, width, channels = x.shape
    (rows, cols), shift = _geometry(x, window, shift)
    x = F.pad(x, (0, 0, 0, cols - width, 0, rows - height))
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(batch, rows // window[0], window[0], cols // window[1], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], channels)


@fx.wrap
def _attend(
    qkv: torch.Tensor,
    position_bias: torch.Tensor,
    x: torch.Tensor,
    window: list[int],
    shift: list[int],
    heads: int,
    logit_scale: torch.Tensor | None,
    dropout: float,
    training: bool,
) -> torch.Tensor:
    """Multi-head attention within each window, from its ``qkv`` projection; windows that a shift
    brought together from distant regions of the map do not attend across them."""
    count, area, three_channels = qkv.shape
    channels = three_channels // 3
    q, k, v = qkv.reshape(count, area, 3, heads, channels // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if logit_scale is not None:
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        scores = (q * (channels // heads) ** -0.5) @ k.transpose(-2, -1)
    scores = scores + position_bias
    padded, shift = _geometry(x, window, shift)
    if sum(shift) > 0:
        mask = _shift_mask(padded, window, shift, scores)
        scores = scores.view(-1, mask.shape[0], heads, area, area) + mask[None, :, None]
        scores = scores.view(-1, heads, area, area)
    weights = F.dropout(F.softmax(scores, dim=-1), p=dropout, training=training)
    return (weights @ v).transpose(1, 2).reshape(count, area, channels)


def _shift_mask(padded: list[int], window: list[int], shift: list[int], like: torch.Tensor):
    """``(windows, area, area)``: :data:`MASKED` between two positions of a window that come
    from different regions of the rolled map (each axis has three: the part no window wraps,
    the last window's part before the shift, the part rolled in from the other side), else 0."""
    regions = []
    for size, win, move in zip(padded, window, shift, strict=True):
        edges = torch.tensor([size - win, size - move], device=like.device)
        regions.append(torch.bucketize(torch.arange(size, device=like.device), edges, right=True))
    label = regions[0][:, None] * 3 + regions[1][None, :]  # one number per region of the map
    label = label.view(padded[0] // window[0], window[0], padded[1] // window[1], window[1])
    label = label.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    apart = label[:, None, :] != label[:, :, None]
    return torch.zeros(apart.shape, dtype=like.dtype, device=like.device).masked_fill(apart, MASKED)


@fx.wrap
def put_back(out: torch.Tensor, x: torch.Tensor, window: list[int], shift: list[int]):
    """The inverse of :func:`cut_windows`: windows to the ``(B, H, W, C)`` map ``x`` was."""
    batch, height, width, channels = x.shape
    (rows, cols), shift = _geometry(x, window, shift)
    out = out.view(batch, rows // window[0], cols // window[1], window[0], window[1], channels)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, rows, cols, channels)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :height, :width, :].contiguous()


def is_window_attention(module: nn.Module) -> bool:
    """torchvision's Swin attention (V1 or V2), which :class:`WindowAttention` computes."""
    return isinstance(module, torchvision.models.swin_transformer.ShiftedWindowAttention)


def with_window_attention(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no torchvision Swin attention, else a copy in which each
    computes with :class:`WindowAttention`'s forward (``model`` is not modified)."""
    rewritten = with_forward_of(model, is_window_attention, WindowAttention)
    if rewritten is not model:
        for attention in rewritten.modules():
            if isinstance(attention, WindowAttention) and _is_v2(attention):
                _zero_key_bias(attention.qkv)
    return rewritten


def _zero_key_bias(qkv: nn.Linear) -> None:
    if qkv.bias is not None:
        width = qkv.bias.numel() // 3
        with torch.no_grad():
            qkv.bias[width : 2 * width] = 0
