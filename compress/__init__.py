"""compress: teacher -> distilled, pruned, quantized student -> ONNX -> measured, from one YAML
recipe (:func:`run`) or from Python on any ``nn.Module`` (:func:`distill`, :func:`prune`,
:func:`quantize`, :func:`keep_float`, :func:`float_where_slower`, :func:`export`,
:func:`bench`).

The public API is imported lazily so that light entry points (the CLI's ``--help``, the bench
worker process whose memory we measure) do not pay for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    # the library: any nn.Module and DataLoader, no recipe (compress.api)
    "distill": "compress.api",
    "prune": "compress.api",
    "quantize": "compress.api",
    "keep_float": "compress.api",
    "float_where_slower": "compress.api",
    "export": "compress.api",
    "bench": "compress.api",
    "loss": "compress.api",
    "DistillSpec": "compress.training.spec",
    "QuantizeSpec": "compress.quantization.spec",
    "PruneSpec": "compress.pruning.spec",
    "PruneStep": "compress.core.records",
    "LoopSettings": "compress.training.teaching",
    "LatencyTarget": "compress.pruning.spec",
    "TrainConfig": "compress.training.spec",
    "MixConfig": "compress.data.spec",
    "ExportConfig": "compress.exporters.spec",
    "BenchConfig": "compress.benchmark.spec",
    "build_model": "compress.nets.models",
    "build_pretrained": "compress.nets.pretrained",
    "load_pretrained": "compress.nets.pretrained",
    "BenchResult": "compress.benchmark.rows",
    # the recipe pipeline
    "load_recipe": "compress.pipeline.recipe.load",
    "run": "compress.pipeline.runner",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
