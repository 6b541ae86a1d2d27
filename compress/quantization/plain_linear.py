"""timm's ``Linear`` (the classifier of its MobileNetV3, LCNet and GhostNet) as the
``nn.Linear`` it computes.

timm's ``Linear`` subclasses ``nn.Linear`` only to cast its weight under TorchScript and AMP;
in eager mode its forward is ``F.linear(x, weight, bias)``. ``torch.fx`` keeps a module whole
only when its class comes from ``torch.nn``, so it traces this one into a bare ``linear`` call
on two ``get_attr`` nodes, which the quantizer does not see as a layer: those classifiers stayed
float, a float Gemm between a DequantizeLinear and the logits. Held by a plain ``nn.Linear``
(the same parameters under the same names) the layer is quantized like any other.
"""

from __future__ import annotations

from torch import nn

from compress.quantization.layer_swaps import linear_like, with_swapped

# by qualified class name: timm is optional. Only subclasses whose eager forward is
# nn.Linear's belong here (not, say, a weight-normalised or LoRA linear).
PLAIN_LINEARS = ("timm.layers.linear.Linear",)


def plain_subclass(module: nn.Module) -> bool:
    kind = type(module)
    return (
        isinstance(module, nn.Linear) and f"{kind.__module__}.{kind.__qualname__}" in PLAIN_LINEARS
    )


def with_plain_linears(model: nn.Module) -> nn.Module:
    """``model`` itself when it has none of :data:`PLAIN_LINEARS`, else a copy in which each is
    an ``nn.Linear`` (``model`` is not modified)."""
    return with_swapped(model, plain_subclass, plain_linear)


def plain_linear(linear: nn.Linear) -> nn.Linear:
    """The ``nn.Linear`` holding ``linear``'s parameters (``with_swapped`` works on a copy)."""
    plain = linear_like(linear)
    plain.weight, plain.bias = linear.weight, linear.bias
    return plain
