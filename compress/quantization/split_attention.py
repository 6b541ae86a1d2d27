"""``nn.MultiheadAttention`` rewritten with its projections as ``nn.Linear`` layers, so that INT8
quantization reaches them.

``nn.MultiheadAttention`` (torchvision's ViT) keeps its input projection as a bare
``in_proj_weight`` parameter and reads ``out_proj.weight`` inside
``F.multi_head_attention_forward``: neither is a layer call a graph pass can swap for a quantized
one, so only the MLPs (two thirds of a ViT block's linear work) would run in INT8.
:class:`SplitAttention` computes the same self-attention (same parameters,
``scaled_dot_product_attention``) from two ``nn.Linear`` calls. Only the self-attention form vision
models use is rewritten; anything else (separate key/value sizes, ``bias_k``, ``add_zero_attn``) is
left as it is, its projections float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.quantization.layer_swaps import with_swapped


class SplitAttention(nn.Module):
    """Self-attention with ``in_proj`` and ``out_proj`` as ``nn.Linear`` (parameters shared with
    the ``nn.MultiheadAttention`` it replaces). Called as that module is: ``(x, x, x)``, returns
    ``(output, None)``; masks and attention weights are refused (vision encoders use neither).
    """

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        width = attention.embed_dim
        self.num_heads = attention.num_heads
        self.batch_first = attention.batch_first
        self.dropout = attention.dropout
        self.in_proj = nn.Linear(width, 3 * width, bias=attention.in_proj_bias is not None)
        self.in_proj.weight = attention.in_proj_weight
        self.in_proj.bias = attention.in_proj_bias
        self.out_proj = nn.Linear(width, width, bias=attention.out_proj.bias is not None)
        self.out_proj.weight = attention.out_proj.weight
        self.out_proj.bias = attention.out_proj.bias

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query:
            raise ValueError("SplitAttention computes self-attention: query, key and value differ")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError("SplitAttention takes no attention mask")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, tokens, width = x.shape[0], x.shape[1], self.out_proj.in_features
        heads = self.num_heads
        qkv = self.in_proj(x).reshape(batch, tokens, 3, heads, width // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.dropout if self.training else 0.0
        mixed = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = self.out_proj(mixed.transpose(1, 2).reshape(batch, tokens, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


def splittable(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` :class:`SplitAttention` computes exactly."""
    return (
        isinstance(module, nn.MultiheadAttention)
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
    )


def with_split_attention(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no splittable attention, else a copy whose
    ``nn.MultiheadAttention`` modules are :class:`SplitAttention` (``model`` is not modified)."""
    return with_swapped(model, splittable, SplitAttention)
