"""timm's blocks that ``torch.fx`` cannot trace, each swapped for a traceable twin before
quantization, so that INT8 reaches their layers.

timm marks a few blocks not traceable (shape-dependent Python: window or patch partitions sized
with an ``if`` or ``math.ceil``, a device check around autocast). The tracer keeps such a block
whole and float, and with it most of a hybrid network's linear work. Each twin here is a
``forward`` put over the block's own class (the block keeps its names, parameters and
methods): it calls the block's layers around functions ``torch.fx`` keeps whole, and computes
what the block computes; declared once in :data:`TRACED_TWINS`, found by the block's class.
"""

from __future__ import annotations

import importlib

from torch import nn

from compress.core.compat import torchvision  # noqa: F401  (imported before timm: see compat)
from compress.quantization.layer_swaps import with_forward_of
from compress.quantization.lite_mla import TracedLiteMLA
from compress.quantization.mobile_vit_block import TracedMobileVitBlock, TracedMobileVitV2Block
from compress.quantization.tiny_vit_block import TracedTinyVitBlock

# (timm module, block class) -> its traceable twin
TRACED_TWINS: dict[tuple[str, str], type[nn.Module]] = {
    ("timm.models.tiny_vit", "TinyVitBlock"): TracedTinyVitBlock,
    ("timm.models.mobilevit", "MobileVitBlock"): TracedMobileVitBlock,
    ("timm.models.mobilevit", "MobileVitV2Block"): TracedMobileVitV2Block,
    ("timm.models.efficientvit_mit", "LiteMLA"): TracedLiteMLA,
}


def with_traced_timm_blocks(model: nn.Module) -> nn.Module:
    """``model`` itself when it has none of timm's untraceable blocks, else a copy in which each
    computes with its traceable twin's forward (``model`` is not modified)."""
    names = {type(module).__name__ for module in model.modules()}
    for (module_name, class_name), twin in TRACED_TWINS.items():
        if class_name not in names:
            continue  # no timm import for every other network
        try:
            kind = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):  # without timm (or this timm) no such block
            continue
        model = with_forward_of(model, lambda module, kind=kind: type(module) is kind, twin)
    return model
