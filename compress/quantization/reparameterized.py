"""Multi-branch blocks in the form they are deployed in, before quantization.

timm's RepVGG, MobileOne, FastViT, RepGhost and RepViT train blocks whose parallel branches (a
kxk and a 1x1 convolution, an identity, each with its BatchNorm) are summed, and fold them into
one convolution for inference (``reparameterize()``, ``switch_to_deploy()``, ``fuse()``: exact
up to float rounding). Quantized as trained, every branch is a convolution of its own with an
INT8 output, and their sum is rounded again: three roundings where the deployed block has one,
three convolutions to run where it has one, and a weakly trained MobileOne-S0 whose INT8 form
moved its top-1 on a quarter of the images when its inputs changed by 1e-6. Folded first (timm's
``reparameterize_model``, on a copy), each block is the one convolution ONNX Runtime runs.
"""

from __future__ import annotations

import importlib

from torch import nn

from compress.core.compat import torchvision  # noqa: F401  (imported before timm: see compat)

# timm's names for the method that folds a block into its inference form
FOLDS = ("fuse", "reparameterize", "switch_to_deploy")


def reparameterizable(module: nn.Module) -> bool:
    return any(callable(getattr(module, name, None)) for name in FOLDS)


def with_reparameterized_branches(model: nn.Module) -> nn.Module:
    """``model`` itself when no block of it folds, else a copy with every block folded into its
    inference form (``model`` is not modified: it may go on training with its branches)."""
    if not any(reparameterizable(m) for m in model.modules()):
        return model
    try:
        timm_model_utils = importlib.import_module("timm.utils.model")  # after compat's torchvision
    except ImportError:  # such blocks come from timm: without it, they are quantized as they are
        return model
    return timm_model_utils.reparameterize_model(model, inplace=False)
