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
:func:`fold_functional_batchnorm` folds such calls as ``fuse`` folds the modules.
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
    """Fold each eval-mode ``F.batch_norm`` call whose input is a ``Conv2d``'s output (read by
    nothing else but its shape) into that convolution, in place; returns how many were folded.

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
        conv_node = arguments["input"]
        if arguments["training"] or not _foldable(conv_node, node, modules, calls):
            continue
        statistics = _statistics(traced, arguments)
        if statistics is None:
            continue
        conv = modules[conv_node.target]
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, *statistics[:2], arguments["eps"], *statistics[2:]
        )
        node.replace_all_uses_with(conv_node)
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
