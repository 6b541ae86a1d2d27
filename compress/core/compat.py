"""Import torchvision on a CPU-only torch whose torchvision wheel was built for CUDA.

PyPI's torchvision 0.28.0 is a CUDA build: its C extension cannot load against a CPU build of
torch, and ``import torchvision`` then dies in ``_meta_registrations`` registering fake kernels
for ``torchvision::nms`` / ``torchvision::qnms``, ops that only the extension defines. The
models, transforms and datasets we use are pure Python, so defining those two schemas first is
enough. When the extension loads (a matching CUDA or CPU install), nothing is touched.

Import torchvision through this module everywhere: ``from compress.core.compat import torchvision``.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

# The op schemas the extension would have defined and torchvision's Python side refers to at
# import time (torchvision/csrc/ops/nms.cpp).
_MISSING_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library_keepalive: list[torch.library.Library] = []


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # not installed: let the import raise its own error
    for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*")):
        try:
            torch.ops.load_library(path)
            return True
        except (OSError, ImportError):
            return False
    return False


def _define_missing_ops() -> None:
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_OP_SCHEMAS:
        lib.define(schema)
    _library_keepalive.append(lib)


if not _extension_loads():
    _define_missing_ops()

import torchvision  # noqa: E402

__all__ = ["torchvision"]
