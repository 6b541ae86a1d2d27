"""compress: teacher -> distilled, pruned, quantized student -> ONNX -> measured, from one YAML recipe.

The public API is imported lazily so that light entry points (the CLI's ``--help``, the bench
worker process whose memory we measure) do not pay for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load_recipe": "compress.recipe",
    "run": "compress.pipeline",
    "build_model": "compress.models",
    "teacher": "compress.stages.teacher",
    "distill": "compress.stages.distill",
    "prune": "compress.stages.prune",
    "quantize": "compress.stages.quantize",
    "export": "compress.stages.export",
    "bench": "compress.stages.bench",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
