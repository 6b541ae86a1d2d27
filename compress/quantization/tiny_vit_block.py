"""timm's TinyViT block rewritten so that ``torch.fx`` traces it, and INT8 reaches its layers.

``TinyVitBlock`` chooses between a plain reshape and a padded window partition with an ``if`` on
its input's height and width, and its attention unpacks ``x.shape``: neither traces, so every
transformer block of a TinyViT was kept whole and float (TinyViT-5M: 18 of its 68 layers INT8).
:class:`TracedTinyVitBlock`, put over the block's own class, computes the same block with the
shape-dependent steps in functions ``torch.fx`` keeps whole (the windows cut from the padded map
and put back, as Swin's are in :mod:`compress.quantization.window_attention`; the attention
within windows from its ``qkv`` projection) around calls of the block's own layers:
``attn.norm``, ``attn.qkv``, ``attn.proj``, ``local_conv`` and ``mlp`` quantize like any other.
Same parameters, same arithmetic in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from compress.quantization import window_attention  # its fx-wrapped partition, looked up there


class TracedTinyVitBlock(nn.Module):
    """The forward of timm's ``TinyVitBlock``, put over the block's own class
    (:func:`~compress.quantization.layer_swaps.with_forward_of`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = self.attn
        window, unshifted = [self.window_size] * 2, [0, 0]  # Swin's partition, no shift
        windows = window_attention.cut_windows(x, window, unshifted)
        qkv = attention.qkv(attention.norm(windows))
        bias = attention.attention_biases[:, attention.attention_bias_idxs]
        mixed = _attend(
            qkv,
            bias,
            attention.num_heads,
            attention.key_dim,
            attention.val_dim,
            attention.scale,
            attention.fused_attn,
        )
        out = window_attention.put_back(attention.proj(mixed), x, window, unshifted)
        x = x + self.drop_path1(out)
        local = self.local_conv(x.permute(0, 3, 1, 2))
        x = local.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H * W, C)
        x = x + self.drop_path2(self.mlp(x))
        return _as_map(x, local)


@fx.wrap
def _attend(
    qkv: torch.Tensor,
    bias: torch.Tensor,
    heads: int,
    key_dim: int,
    val_dim: int,
    scale: float,
    fused: bool,
) -> torch.Tensor:
    """Multi-head attention within each window, from its ``qkv`` projection (each head's query,
    key and value side by side) and the learned position bias."""
    count, tokens, _ = qkv.shape
    q, k, v = qkv.view(count, tokens, heads, -1).split([key_dim, key_dim, val_dim], dim=3)
    q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    if fused:
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        mixed = ((q * scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1) @ v
    return mixed.transpose(1, 2).reshape(count, tokens, heads * val_dim)


@fx.wrap
def _as_map(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B, H * W, C)`` tokens as the ``(B, H, W, C)`` map of ``like``'s ``(B, C, H, W)``."""
    batch, channels, height, width = like.shape
    return tokens.view(batch, height, width, channels)
