"""How :func:`compress.export` writes and proves a file (:class:`ExportConfig`, the recipe's
``export`` section).
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.core.fields import check, check_choices, choice
from compress.exporters.formats import FORMATS

EXPORTERS = ("dynamo", "torchscript")


TORCHSCRIPT_MAX_OPSET = 20  # newer opsets are stamped on the file but not implemented by it


@dataclass(frozen=True)
class ExportConfig:
    """Export of teacher and student, each file proven against PyTorch on real test images.

    ``formats``: ONNX always (every other format is built from it), plus ``onnx-fp16`` (FP16
    weights and I/O for GPU runtimes) and ``tensorrt`` (an engine, when TensorRT and a GPU are
    present; otherwise a warning and the run goes on). ``batch``: null keeps a dynamic batch
    axis; a number fixes it (some runtimes and accelerators want static shapes).
    """

    # the files to write (`compress list formats`); onnx is always one
    formats: tuple[str, ...] = choice(("onnx",), FORMATS.names)
    # the ONNX opset of every file (dynamo exports 18+, converted down by ONNX's converter or
    # refused; torchscript up to 20): the file is at this opset or the export fails
    opset: int = 18
    # torch.onnx's exporter (torchscript: the fallback when dynamo fails)
    exporter: str = choice("dynamo", EXPORTERS)
    # a fixed batch size in the file (null: dynamic)
    batch: int | None = None
    # the largest |ONNX Runtime - PyTorch| of a float file, relative to the largest logit
    tolerance: float = 1e-3
    # the share of check images on which the float file and PyTorch agree on the class
    min_agreement: float = 0.99
    # quantized student vs its fake-quantized model: max |diff| / max |logit|
    int8_tolerance: float = 0.2
    # the same, for an INT8 file
    int8_min_agreement: float = 0.95
    # FP16 file vs the FP32 model: max |diff| / max |logit| (measured: exporters/fp16.py)
    fp16_tolerance: float = 0.02
    # the same, for an FP16 file
    fp16_min_agreement: float = 0.98
    # test images each file is checked on
    check_samples: int = 256
    # onnxslim graph simplification, verified against PyTorch like any export
    simplify: bool = False
    engine_fp16: bool = True  # TensorRT may pick FP16 kernels for float layers
    # TensorRT optimisation profile: min, opt, max batch
    engine_batch: tuple[int, int, int] = (
        1,
        32,
        64,
    )
    # TensorRT's builder workspace
    engine_workspace_mib: int = 2048

    def __post_init__(self):
        check_choices(self)

        check(7 <= self.opset <= 23, f"opset: expected 7..23, got {self.opset}")
        check(
            self.exporter != "torchscript" or self.opset <= TORCHSCRIPT_MAX_OPSET,
            f"opset: the torchscript exporter writes opsets up to {TORCHSCRIPT_MAX_OPSET}, got "
            f"{self.opset} (use exporter: dynamo)",
        )
        check(
            "onnx" in self.formats,
            "formats: must include onnx (every other format is built from the ONNX file)",
        )
        check(
            len(set(self.formats)) == len(self.formats),
            f"formats: listed twice in {list(self.formats)}",
        )
        check(
            self.batch is None or self.batch > 0,
            f"batch: expected a positive integer or null (dynamic), got {self.batch}",
        )
        for name in ("tolerance", "int8_tolerance", "fp16_tolerance"):
            check(getattr(self, name) > 0, f"{name}: expected > 0, got {getattr(self, name)}")
        for name in ("min_agreement", "int8_min_agreement", "fp16_min_agreement"):
            check(
                0 <= getattr(self, name) <= 1, f"{name}: expected 0..1, got {getattr(self, name)}"
            )
        check(self.check_samples > 0, f"check_samples: expected > 0, got {self.check_samples}")
        check(
            len(self.engine_batch) == 3
            and 1 <= self.engine_batch[0] <= self.engine_batch[1] <= self.engine_batch[2],
            "engine_batch: expected [min, opt, max] with 1 <= min <= opt <= max, got "
            f"{list(self.engine_batch)}",
        )
        check(
            self.engine_workspace_mib > 0,
            f"engine_workspace_mib: expected > 0, got {self.engine_workspace_mib}",
        )
