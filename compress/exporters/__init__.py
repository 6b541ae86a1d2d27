"""The table of export formats: one entry per format, in one place.

Each :class:`ExportFormat` says what file it makes, whether it needs a GPU and which options it
takes. Its exporter is named as ``"module:function"`` and imported only when used, so listing the
formats (``compress --help``, a recipe check) never imports torch or TensorRT. A new format
is one more ``register_format`` call below plus its module; the recipe's ``export.formats``
and ``compress export --format`` take these names.

Example:
    >>> fmt = FORMATS.get("onnx")
    >>> fmt.export_fn(model, run / f"student{fmt.suffix}", image_size=32)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compress.errors import ExportError
from compress.registry import Registry


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: the recipe's name for it.
        suffix: file suffix of the artifact, with the dot.
        needs_gpu: whether exporting (or running) it needs a CUDA device.
        options_doc: one line on the options its exporter takes.
        entry: ``"module:function"`` of the exporter; see :attr:`export_fn`.
    """

    name: str
    suffix: str
    needs_gpu: bool
    options_doc: str
    entry: str

    @property
    def export_fn(self) -> Callable[..., Path]:
        """The exporter function, imported on first use."""
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(module), function)


FORMATS: Registry[ExportFormat] = Registry("export format", ExportError)


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Add a format to :data:`FORMATS` under its own name.

    Args:
        fmt: the format; its name must be new.

    Returns:
        ``fmt``.
    """
    return FORMATS.register(fmt.name)(fmt)


register_format(
    ExportFormat(
        name="onnx",
        suffix=".onnx",
        needs_gpu=False,
        options_doc="image_size, in_channels=3, opset=18, exporter='dynamo'|'torchscript', batch=None (dynamic) or N, simplify, metadata",
        entry="compress.exporters.onnx:export_onnx",
    )
)

register_format(
    ExportFormat(
        name="onnx-fp16",
        suffix=".fp16.onnx",
        needs_gpu=False,  # converted and verified on CPU; fast only on a GPU runtime
        options_doc="from an exported float .onnx: keep_io_types=False (FP16 input and output)",
        entry="compress.exporters.fp16:convert_to_fp16",
    )
)

register_format(
    ExportFormat(
        name="tensorrt",
        suffix=".engine",
        needs_gpu=True,
        options_doc="from an exported .onnx: fp16=False, int8=False (for a QDQ file), batch=(min, opt, max), workspace_mib, timing_cache",
        entry="compress.exporters.tensorrt:build_engine",
    )
)

__all__ = ["FORMATS", "ExportFormat", "register_format"]
