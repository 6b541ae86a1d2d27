"""Multi-branch blocks in the form they are deployed in, before quantization.

timm's RepVGG, MobileOne, FastViT, RepGhost and RepViT train blocks whose parallel branches (a
kxk and a 1x1 convolution, an identity, each with its BatchNorm) are summed, and fold them into
one convolution for inference (``reparameterize()``, ``switch_to_deploy()``, ``fuse()``: exact
up to float rounding). Quantized as trained, every branch is a convolution of its own with an
INT8 output, and their sum is rounded again: three roundings where the deployed block has one,
three convolutions to run where it has one, and a weakly trained MobileOne-S0 whose INT8 form
moved its top-1 on a quarter of the images when its inputs changed by 1e-6. Folded first (timm's
``reparameterize_model``, on a copy), each block is the one convolution ONNX Runtime runs.

A block is folded only where its fold computes what its branches do: timm folds from attributes
the block was built with, and a pruned block's (MobileOne's ``groups`` of a depthwise block,
after its channels were cut) no longer match its layers, so its fold fails or computes something
else; such a block is quantized as its branches. The check runs on a copy of the block with
fixed made-up values, on inputs of the shapes it is given: which blocks fold depends on the
network's structure alone, so a stage's INT8 network rebuilt from a fresh network of the same
structure (uninitialised weights, zeros for input) folds the same blocks and its saved state fits.
"""

from __future__ import annotations

import copy
import importlib

import torch
from torch import nn

from compress.core.compat import torchvision  # noqa: F401  (imported before timm: see compat)

# timm's names for the method that folds a block into its inference form
FOLDS = ("fuse", "reparameterize", "switch_to_deploy")
FOLD_TOLERANCE = 1e-4  # of the block's largest output: float rounding, not a different function


def reparameterizable(module: nn.Module) -> bool:
    return any(callable(getattr(module, name, None)) for name in FOLDS)


def with_reparameterized_branches(model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """``model`` itself when no block of it folds, else a copy with every block that folds
    exactly in its inference form (``model`` is not modified: it may go on training)."""
    if not any(reparameterizable(m) for m in model.modules()):
        return model
    try:
        timm_model_utils = importlib.import_module("timm.utils.model")  # after compat's torchvision
    except ImportError:  # such blocks come from timm: without it, they are quantized as they are
        return model
    model = copy.deepcopy(model)
    training = model.training
    model.eval()  # the copy: folding reads BatchNorm's running statistics, as inference does
    inputs = _block_inputs(model, example_inputs)
    _fold_children(model, inputs, timm_model_utils.reparameterize_model)
    return model.train(training)


def _block_inputs(model: nn.Module, example_inputs: torch.Tensor) -> dict[nn.Module, tuple]:
    """What each foldable block is given when ``model`` (in eval mode) runs on
    ``example_inputs`` (its first call)."""
    seen: dict[nn.Module, tuple] = {}

    def record(module, args):
        seen.setdefault(module, args)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if reparameterizable(m)]
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _fold_children(module: nn.Module, inputs: dict, fold_model) -> None:
    for name, child in module.named_children():
        if child in inputs and _fold_holds(child, inputs[child], fold_model):
            setattr(module, name, _folded(child, fold_model))
        else:  # not foldable, or its fold does not hold: its own blocks may
            _fold_children(child, inputs, fold_model)


def _folded(block: nn.Module, fold_model) -> nn.Module:
    holder = nn.Sequential(copy.deepcopy(block).eval())  # timm folds a model's children
    fold_model(holder, inplace=True)
    return holder[0]


def _fold_holds(block: nn.Module, args: tuple, fold_model) -> bool:
    """Whether ``block``'s fold computes what its branches do, judged on a copy holding fixed
    made-up weights and statistics and on made-up inputs of the shapes of ``args``."""
    generator = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(block).eval()
    with torch.no_grad():
        for tensor in probe.parameters():
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
        for norm in probe.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats:
                norm.running_mean.copy_(0.1 * torch.randn(norm.num_features, generator=generator))
                norm.running_var.copy_(0.5 + torch.rand(norm.num_features, generator=generator))
        made_up = tuple(  # on the block's device: a network quantized on a GPU folds too
            torch.randn(a.shape, generator=generator).to(a.device)
            if isinstance(a, torch.Tensor)
            else a
            for a in args
        )
        try:
            expected = probe(*made_up)
            got = _folded(probe, fold_model)(*made_up)
        except Exception:  # a fold timm cannot do on this block as it is now
            return False
    if not (isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor)):
        return False
    if got.shape != expected.shape:
        return False
    scale = expected.abs().max().clamp_min(1e-12)
    return bool((got - expected).abs().max() / scale <= FOLD_TOLERANCE)
