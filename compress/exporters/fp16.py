"""FP16 ONNX: an exported FP32 file converted to half-precision weights (and, by default, IO).

Why FP16: GPUs run half precision on their tensor cores at several times their FP32 rate
(every NVIDIA card since Volta), the weights and activations move half the bytes, and the file is
half the size. For a classifier the price is a rounding error well below what changes a
prediction (measured below), with no calibration data and no retraining, unlike INT8.

Why this converter: ``onnxruntime.transformers.float16.convert_float_to_float16`` ships inside
onnxruntime (no new dependency) and is what Microsoft's own model optimiser uses. It keeps the
ops that have no FP16 definition (its ``DEFAULT_OP_BLOCK_LIST``: TopK, Range, Min/Max, ...) in
FP32 behind Cast nodes and clamps weights into FP16's finite range. We only add what it does not
do: sort the graph again (with ``keep_io_types`` it appends its input/output Casts at the end of
the node list, which ``onnx.checker`` rejects), keep our metadata, and refuse a file that is not
plain FP32.

On CPU the file gains nothing: it is a GPU format (CUDA or TensorRT execution providers). ONNX
Runtime's CPU provider has FP16 kernels for few ops; it wraps the others in Casts to FP32 and
then merges the Casts between neighbours away, which for our CNNs upcasts the whole graph at load
(FP32 copies of the FP16 weights, one Cast after the input and one before the output: the
``InsertedPrecisionFreeCast_*`` names of its optimised graph), and the extra casts make it
slower (batch 32, 2 threads: MobileNetV2 25 ms vs 18 ms in FP32, ResNet18 76 vs 72 ms). We still
verify the file on CPU with :func:`compress.exporters.onnx.verify_onnx`: that catches a broken
conversion and measures the rounding of the weights and of FP16 input/output, but not the rounding
of every intermediate activation that a GPU adds. :data:`FP16_TOLERANCE` is therefore set from
PyTorch's own FP16 run (activations rounded after every op, as on a GPU), the larger error of the
two.

Example:
    >>> path = convert_to_fp16(run / "student.onnx", run / "student_fp16.onnx")
    >>> verify_onnx(path, model, images, tolerance=FP16_TOLERANCE,
    ...             min_agreement=FP16_MIN_AGREEMENT, relative=True)
"""

from __future__ import annotations

from pathlib import Path

import onnx

from compress.errors import ExportError, first_line
from compress.exporters.onnx.export import META_PRECISION, set_metadata
from compress.exporters.onnx.files import write_onnx
from compress.exporters.onnx.graph import load_onnx
from compress.exporters.onnx.verify import compare_onnx_files, verify_onnx
from compress.exporters.spec import ExportConfig

# Bounds for verify_onnx(..., relative=True): max |FP16 - PyTorch FP32| logit over the largest
# |logit|, and top-1 agreement. Measured on 512 CIFAR-10 test images at 32x32, cifar-stem models
# either trained 2 epochs on 4,000 images (~40% top-1) or random with random BatchNorm statistics;
# "ORT": the FP16 file on ONNX Runtime 1.32 CPU (FP16 IO; FP32 IO is ~10% lower; both exporters
# give the same numbers), "torch": model.half() in PyTorch, every activation rounded as on a GPU:
#                               ORT max_rel  agreement   torch max_rel  agreement
#   ResNet18, trained             0.049%      100%          0.058%        100%
#   ResNet18, random              0.059%      99.8%         0.14%         100%
#   MobileNetV2, trained          0.28%       99.8%         0.42%         99.6%
#   MobileNetV2, random           0.034%      100%          0.10%         100%
# FP16 rounds to 2^-11 = 0.05% relative, so tenths of a percent after ~50 layers is expected.
# 2% is ~5x the worst of these, room for a GPU's own kernels and deeper models, and still far
# below what a broken conversion (a mangled weight, a missing cast) does. A flip needs two
# nearly tied logits (at most 2 of 512 images here); 98% allows 5 flips in 256 images.
FP16_TOLERANCE = 0.02
FP16_MIN_AGREEMENT = 0.98

_QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
}


def build_from_onnx(
    onnx_path: Path,
    target: Path,
    model,
    images,
    cfg: ExportConfig,
    *,
    int8: bool = False,
    timing_cache: Path | None = None,
) -> dict:
    """The ``onnx-fp16`` format of :data:`compress.exporters.FORMATS`: ``target`` converted from a
    proven FP32 file and verified against the PyTorch network with ``cfg``'s FP16 bounds."""
    convert_to_fp16(onnx_path, target)
    return verify_onnx(
        target,
        model,
        images,
        tolerance=cfg.fp16_tolerance,
        min_agreement=cfg.fp16_min_agreement,
        relative=True,
    )


def convert_onnx(source: Path, target: Path, cfg: ExportConfig) -> dict:
    """``compress export model.onnx --format onnx-fp16``: no PyTorch network at hand, so the FP16
    file is checked against the FP32 file it came from, with the same bounds."""
    convert_to_fp16(source, target)
    return compare_onnx_files(
        target,
        source,
        cfg.check_samples,
        tolerance=cfg.fp16_tolerance,
        min_agreement=cfg.fp16_min_agreement,
    )


def convert_to_fp16(
    onnx_path: Path | str,
    out_path: Path | str,
    *,
    keep_io_types: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Convert an exported FP32 ONNX file to FP16 weights and, by default, FP16 input and output.

    The graph keeps its input ``"input"``, output ``"logits"`` and batch axis (dynamic or
    static); ops without FP16 support stay in FP32 behind Casts. The result is checked with
    ``onnx.checker`` and written atomically; ``onnx_path`` is not modified. Verify it against
    PyTorch with ``verify_onnx(..., tolerance=FP16_TOLERANCE, min_agreement=FP16_MIN_AGREEMENT,
    relative=True)``.

    Args:
        onnx_path: an FP32 file from :func:`compress.exporters.onnx.export_onnx`.
        out_path: destination ``.onnx`` file; its folder is created if missing.
        keep_io_types: keep the input and output FP32 (Casts at both ends), for a consumer that
            cannot feed half-precision arrays; GPU deployments want the default, FP16 IO, which
            saves the two casts and half the input transfer.
        metadata: extra string key/values for ``metadata_props``, on top of those of
            ``onnx_path`` (our preprocessing keys are kept); ``compress.precision`` is set to
            ``fp16`` whatever is passed.

    Returns:
        ``out_path`` as a Path.

    Raises:
        ExportError: ``onnx_path`` is missing or not ONNX, is not FP32 (already FP16, or an INT8
            QDQ model), or the converter failed; one line naming the file.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    model = load_onnx(onnx_path)
    reason = _not_fp32_reason(model)
    if reason:
        raise ExportError(f"{onnx_path}: cannot convert to FP16: {reason}")
    model = _converted(model, keep_io_types, onnx_path)
    set_metadata(model, {**(metadata or {}), META_PRECISION: "fp16"})
    return write_onnx(model, out_path)


def _not_fp32_reason(model: onnx.ModelProto) -> str | None:
    """Why the converter must not touch this model, or None for a plain FP32 graph."""
    quantized = sorted({node.op_type for node in model.graph.node} & _QUANTIZED_OPS)
    if quantized:
        return (
            f"it is an INT8 (QDQ) model ({', '.join(quantized)} nodes); FP16 would round its "
            "quantization scales and gain nothing (build a TensorRT engine with fp16 and int8 "
            "instead)"
        )
    weights = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in weights]
    types = {onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in inputs}
    if types == {"FLOAT16"}:
        return "it is already FP16 (FLOAT16 input)"
    if types != {"FLOAT"}:
        return f"its input is {', '.join(sorted(types)) or 'missing'}, not FP32 (FLOAT)"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer):
        return "it is already FP16 (FLOAT16 weights behind an FP32 input)"
    return None


def _converted(model: onnx.ModelProto, keep_io_types: bool, path: Path) -> onnx.ModelProto:
    # Imported here: onnxruntime.transformers appends its own folder to sys.path on import.
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    try:
        converted = convert_float_to_float16(model, keep_io_types=keep_io_types)
        OnnxModel.graph_topological_sort(converted.graph)  # its IO casts are appended last
    except Exception as exc:
        raise ExportError(f"{path}: FP16 conversion failed: {first_line(exc)}") from exc
    return converted
