"""timm's EfficientViT (MIT) linear attention rewritten so that ``torch.fx`` traces it, and INT8
reaches its projections.

``LiteMLA`` turns its input into queries, keys and values with convolutions (a 1x1 projection,
then a depthwise and a grouped convolution per scale for the multi-scale tokens), mixes them with
ReLU linear attention and projects the result with another 1x1 convolution. Its forward asks
for the device type of a tensor (to turn autocast off around the attention), which ``torch.fx``
cannot trace (timm marks the module not traceable): each was kept whole and float, and
EfficientViT-B0 had 36 of its 52 layers INT8. :class:`TracedLiteMLA` computes the same attention
with the head split and the attention products in functions ``torch.fx`` keeps whole, around
calls of the module's own convolutions and kernel function, which quantize like any other.
Same parameters, same arithmetic in the same order (the attention products in float32, autocast
off, as timm computes them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn


class TracedLiteMLA(nn.Module):
    """The forward of timm's ``LiteMLA``, put over the module's own class
    (:func:`~compress.quantization.layer_swaps.with_forward_of`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        scales = torch.cat([qkv] + [aggregate(qkv) for aggregate in self.aggreg], dim=1)
        heads = _heads(scales, self.dim)
        query, key = self.kernel_func(heads[0]), self.kernel_func(heads[1])
        return self.proj(_linear_attention(query, key, heads[2], x, self.eps))


@fx.wrap
def _heads(scales: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values ``(B, heads, H * W, dim)`` from the multi-scale ``(B, C, H, W)``."""
    batch, _, height, width = scales.shape
    tokens = scales.reshape(batch, -1, 3 * dim, height * width).transpose(-1, -2)
    return tokens.chunk(3, dim=-1)


@fx.wrap
def _linear_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, like: torch.Tensor, eps: float
) -> torch.Tensor:
    """ReLU linear attention (the values padded with a column of ones give each query's
    normaliser), in float32, as the ``(B, heads * dim, H, W)`` map of ``like``."""
    batch, _, height, width = like.shape
    value = F.pad(value, (0, 1), mode="constant", value=1.0)
    dtype = value.dtype
    with torch.autocast(device_type=value.device.type, enabled=False):
        query, key, value = query.float(), key.float(), value.float()
        out = query @ (key.transpose(-1, -2) @ value)
        out = (out[..., :-1] / (out[..., -1:] + eps)).to(dtype)
    return out.transpose(-1, -2).reshape(batch, -1, height, width)
