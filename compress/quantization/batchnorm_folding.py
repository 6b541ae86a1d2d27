"""BatchNorm computed by a function, folded into the convolution before it.

``torch.fx``'s ``fuse`` folds a ``Conv2d`` into the ``nn.BatchNorm2d`` *module* that follows it.
timm's ``BatchNormAct2d`` (its ``ConvNormAct`` and most of its CNNs: EfficientNet, MobileNetV3,
RegNet, RepVGG, CSPNet, MobileViT) is a ``BatchNorm2d`` subclass whose forward calls
``F.batch_norm`` itself, so the tracer traces into it and the graph holds a ``batch_norm``
*call*, which ``fuse`` does not match: those convolutions were quantized before their
BatchNorm. The exported file then ran each as an integer kernel whose output was quantized,
dequantized, normalised in float and quantized again (TinyNet, MobileNetV3: every convolution;
ONNX Runtime cannot fold a BatchNorm into a convolution whose weights are dequantized), and the
per-tensor activation range was taken before the per-channel scaling BatchNorm applies.
:func:`fold_functional_batchnorm` folds such calls as ``fuse`` folds the modules, and also a
BatchNorm after a channel concat of convolutions (timm's ``MixedConv2d``: MixNet's 34), each
convolution taking the slice of the statistics its channels are.
"""

from __future__ import annotations

import inspect
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import fuse_conv_bn_weights

_BATCH_NORM = inspect.signature(F.batch_norm)


def fold_functional_batchnorm(traced: fx.GraphModule) -> int:
    """Fold each eval-mode ``F.batch_norm`` call whose input is a ``Conv2d``'s output, or the
    channel concat of several (each read by nothing else but its shape), into those convolutions,
    in place; returns how many were folded.

    A convolution called more than once (shared weights) is left as it is, as are BatchNorm
    statistics or affine parameters that are not the network's own tensors.
    """
    modules = dict(traced.named_modules())
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    folded = 0
    for node in list(traced.graph.nodes):
        if node.op != "call_function" or node.target is not F.batch_norm:
            continue
        bound = _BATCH_NORM.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        if arguments["training"]:
            continue
        parts = _convolutions(arguments["input"], node, modules, calls)
        statistics = _statistics(traced, arguments) if parts else None
        if statistics is None:
            continue
        convs = [modules[part.target] for part in parts]
        if sum(conv.out_channels for conv in convs) != len(statistics[0]):
            continue
        start = 0
        for conv in convs:
            channels = slice(start, start + conv.out_channels)
            start += conv.out_channels
            mean, var, gamma, beta = (tensor[channels] for tensor in statistics)
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, mean, var, arguments["eps"], gamma, beta
            )
        node.replace_all_uses_with(arguments["input"])
        traced.graph.erase_node(node)
        folded += 1
    if folded:
        traced.graph.eliminate_dead_code()
        traced.delete_all_unused_submodules()
        traced.recompile()
    return folded


def _statistics(traced: fx.GraphModule, arguments: dict):
    """``(mean, var, gamma, beta)`` the call reads (gamma 1 and beta 0 where it has no affine
    parameter), or None where one is not a tensor the network holds."""
    mean = _tensor_of(traced, arguments["running_mean"])
    var = _tensor_of(traced, arguments["running_var"])
    if mean is None or var is None:
        return None
    gamma, beta = arguments["weight"], arguments["bias"]
    gamma = torch.ones_like(mean) if gamma is None else _tensor_of(traced, gamma)
    beta = torch.zeros_like(mean) if beta is None else _tensor_of(traced, beta)
    return None if gamma is None or beta is None else (mean, var, gamma, beta)


def _convolutions(input_node, norm_node: fx.Node, modules: dict, calls: dict) -> list | None:
    """The convolution nodes whose outputs the BatchNorm normalises: the one it reads, or each
    part of the ``torch.cat(..., 1)`` it reads, in channel order; None when that is not so."""
    if _foldable(input_node, norm_node, modules, calls):
        return [input_node]
    if not isinstance(input_node, fx.Node) or input_node.target is not torch.cat:
        return None
    parts = input_node.args[0]
    dim = input_node.args[1] if len(input_node.args) > 1 else input_node.kwargs.get("dim", 0)
    if dim != 1 or not all(user is norm_node or _reads_shape(user) for user in input_node.users):
        return None
    if len(set(parts)) < len(parts):  # one convolution's output twice: two slices, one weight
        return None
    if not all(_foldable(part, input_node, modules, calls) for part in parts):
        return None
    return list(parts)


def _foldable(conv_node, norm_node: fx.Node, modules: dict, calls: dict) -> bool:
    """The BatchNorm reads a convolution called once, whose output only it reads (its shape
    aside: timm checks the input's dimensions)."""
    if not isinstance(conv_node, fx.Node) or conv_node.op != "call_module":
        return False
    if not isinstance(modules.get(conv_node.target), nn.Conv2d) or calls[conv_node.target] > 1:
        return False
    return all(user is norm_node or _reads_shape(user) for user in conv_node.users)


def _reads_shape(node: fx.Node) -> bool:
    """``x.shape``, ``x.ndim``, ``x.dim()``, ``x.size()``: the same before and after folding."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "ndim")
    return node.op == "call_method" and node.target in ("dim", "size")


def _tensor_of(traced: fx.GraphModule, argument) -> torch.Tensor | None:
    """The parameter or buffer a ``get_attr`` node reads, else None."""
    if not isinstance(argument, fx.Node) or argument.op != "get_attr":
        return None
    owner, _, name = argument.target.rpartition(".")
    tensor = getattr(traced.get_submodule(owner), name, None)
    return tensor if isinstance(tensor, torch.Tensor) else None
