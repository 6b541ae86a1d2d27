"""The table of export formats: one entry per format, in one place.

Each :class:`ExportFormat` says what file it makes, which bench backends run it, whether it needs
a GPU, which networks it applies to and which function builds it. Builders are named as
``"module:function"`` and imported only when used, so listing the formats (``compress --help``,
a recipe check) never imports torch or TensorRT. A new format is one more ``register_format``
call below plus its module in :mod:`compress.exporters`; the recipe's ``export.formats``,
``compress export --format``, the export stage and the bench all read this table.

Example:
    >>> fmt = FORMATS.get("onnx-fp16")
    >>> record = fmt.builder(run / "student.onnx", run / f"student{fmt.suffix}", model, images,
                             ExportConfig(), int8=False)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compress.core.registry import Registry, load_entry
from compress.errors import ExportError

if TYPE_CHECKING:
    from compress.core.records import QuantSpec


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: the recipe's name for it.
        title: what a person calls one such file, for messages ("TensorRT engine").
        suffix: file suffix of the artifact, with the dot.
        needs_gpu: whether exporting (or running) it needs a CUDA device.
        options_doc: one line on the options its builder takes.
        artifact: the kind of file it is, ``"onnx"`` or ``"engine"``: bench backends declare the
            same word for what they run (:attr:`compress.benchmark.backend_table.Backend.artifact`).
        build: ``"module:function"`` that builds it from a proven ONNX file and verifies it
            against the PyTorch network, ``(onnx_path, target, model, images, cfg, *, int8,
            timing_cache) -> verification record``; None for ONNX itself, the file every
            other format is built from (:func:`compress.pipeline.stages.export.export_network`).
        convert: ``"module:function"`` that converts an existing ``.onnx`` file outside a run
            (``compress export model.onnx --format ...``), ``(source, target, cfg) -> record``.
        float_only: it applies to float networks only.
        int8_target: the ``quantize.target`` an INT8 network must have been quantized for
            (None: any).
        other_suffixes: further suffixes that name this format's files.
    """

    name: str
    title: str
    suffix: str
    needs_gpu: bool
    options_doc: str
    artifact: str
    build: str | None = None
    convert: str | None = None
    float_only: bool = False
    int8_target: str | None = None
    other_suffixes: tuple[str, ...] = ()

    @property
    def builder(self) -> Callable[..., dict]:
        """The build function, imported on first use."""
        return _resolve(
            self.build, f"{self.name} is the base format; it is exported, not built from ONNX"
        )

    @property
    def converter(self) -> Callable[..., dict]:
        """The conversion function for an existing ``.onnx`` file, imported on first use."""
        return _resolve(self.convert, f"{self.name} is not converted from an ONNX file")

    def not_applicable(self, quantization: QuantSpec | None) -> str | None:
        """Why a network with this quantization cannot be built in this format; None if it can."""
        if quantization is None:
            return None
        if self.float_only:
            return f"an INT8 model: an {self.title} holds a float model"
        if self.int8_target is not None and quantization.target != self.int8_target:
            return (
                f"quantized for {quantization.target}; an INT8 {self.title} needs quantize.target: "
                f"{self.int8_target}"
            )
        return None

    def names_file(self, filename: str) -> bool:
        return filename.endswith((self.suffix, *self.other_suffixes))


def _resolve(entry: str | None, missing: str) -> Callable:
    if entry is None:
        raise ExportError(missing)
    return load_entry(entry)


FORMATS: Registry[ExportFormat] = Registry("export format", ExportError)


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Add a format to :data:`FORMATS` under its own name.

    Args:
        fmt: the format; its name must be new.

    Returns:
        ``fmt``.
    """
    return FORMATS.register(fmt.name)(fmt)


def format_of_file(filename: str) -> ExportFormat | None:
    """The format whose suffix names this file (the longest matching suffix wins:
    ``a.fp16.onnx`` is ``onnx-fp16``, not ``onnx``); None for an unknown suffix."""
    matches = [
        FORMATS.get(name) for name in FORMATS.names() if FORMATS.get(name).names_file(filename)
    ]
    return max(matches, key=lambda f: len(f.suffix), default=None)


register_format(
    ExportFormat(
        name="onnx",
        title="ONNX file",
        suffix=".onnx",
        needs_gpu=False,
        options_doc=(
            "opset=18, exporter='dynamo'|'torchscript', batch=None (dynamic) or N, simplify; "
            "verified against PyTorch"
        ),
        artifact="onnx",
    )
)

register_format(
    ExportFormat(
        name="onnx-fp16",
        title="FP16 ONNX file",
        suffix=".fp16.onnx",
        needs_gpu=False,  # converted and verified on CPU; fast only on a GPU runtime
        options_doc=(
            "from the exported float .onnx, FP16 weights and I/O; verified with fp16_tolerance"
        ),
        artifact="onnx",
        build="compress.exporters.fp16:build_from_onnx",
        convert="compress.exporters.fp16:convert_onnx",
        float_only=True,
    )
)

register_format(
    ExportFormat(
        name="tensorrt",
        title="TensorRT engine",
        suffix=".engine",
        needs_gpu=True,
        options_doc=(
            "from the exported .onnx: engine_fp16, INT8 from a QDQ file, engine_batch (min, opt, "
            "max), engine_workspace_mib"
        ),
        artifact="engine",
        build="compress.exporters.tensorrt:build_from_onnx",
        convert="compress.exporters.tensorrt:convert_onnx",
        int8_target="tensorrt",
        other_suffixes=(".plan",),
    )
)

# ONNX Runtime runs these; the bench measures accuracy on them
ONNX_FORMATS = tuple(name for name in FORMATS.names() if FORMATS.get(name).artifact == "onnx")

__all__ = ["FORMATS", "ONNX_FORMATS", "ExportFormat", "format_of_file", "register_format"]
