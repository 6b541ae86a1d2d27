"""Stage ``export``: teacher and student to ONNX, each proven against PyTorch on real test images."""

from __future__ import annotations

import sys

import numpy as np
import torch

from compress.artifacts import Artifact
from compress.benchmark import normalise_images
from compress.config import ExportConfig
from compress.context import RunContext
from compress.data import test_arrays
from compress.exporters.onnx import export_onnx, preprocessing_metadata, verify_onnx
from compress.stages import STAGES
from compress.stages.networks import load_network


@STAGES.register("export")
def export(cfg: ExportConfig, ctx: RunContext) -> Artifact:
    """Write ``<run>/teacher.onnx`` and ``<run>/student.onnx`` (dynamic batch axis).

    The preprocessing (mean, std, image size, class names) travels in the ONNX metadata so the
    file can be benchmarked and deployed on its own. Each file is checked with ONNX Runtime
    against the PyTorch model on ``cfg.check_samples`` test images; the max abs difference and
    top-1 agreement are recorded, and a mismatch beyond ``cfg.tolerance`` fails the stage.

    A quantized student is exported as a QDQ graph with INT8 weights and checked against its
    fake-quantized PyTorch model with the INT8 bounds (``int8_tolerance``, ``int8_min_agreement``:
    ONNX Runtime's integer kernels round differently), and its graph is verified (Q/DQ nodes,
    INT8 weights with zero point 0, the target's activation type, no FP32 convolution left after
    ONNX Runtime's optimisation). The float student it came from is exported beside it as
    ``student_fp32.onnx`` so the bench measures what quantization bought.
    """
    images = normalised_test_images(ctx, cfg.check_samples)
    files, metrics = {}, {}
    for role, artifact in models_to_export(ctx):
        model = load_network(ctx, artifact).cpu()
        path = ctx.run_dir / f"{role}.onnx"
        metadata = onnx_metadata(ctx, role, artifact.metrics["model"])
        quantization = artifact.metrics.get("quantization")
        if quantization is None:
            export_onnx(model, path, image_size=ctx.data.image_size, in_channels=ctx.data.in_channels, opset=cfg.opset, exporter=cfg.exporter, metadata=metadata, simplify=cfg.simplify)
            metrics[role] = verify_onnx(path, model, images, tolerance=cfg.tolerance, min_agreement=cfg.min_agreement)
        else:
            metrics[role] = export_quantized(model, path, cfg, ctx, images, metadata | {"compress.quantization": quantization["target"]}, quantization)
        metrics[role]["stage"] = artifact.stage  # which stage's network the file holds (for the report)
        files[role] = path
    return Artifact("export", files=files, metrics=metrics)


def models_to_export(ctx: RunContext) -> list[tuple[str, Artifact]]:
    """(file role, artifact): the teacher, the last student and, if that student is quantized,
    the float student it was quantized from."""
    models = [("teacher", ctx.latest("teacher"))]
    if not any(a.role == "student" for a in ctx.artifacts.values()):
        return models
    student = ctx.latest("student")
    source = student.metrics.get("source_stage")
    if student.metrics.get("quantization") and source in ctx.artifacts:
        models.append(("student_fp32", ctx.artifacts[source]))
    return models + [("student", student)]


QUANTIZED_EXPORTER = "torchscript"


def export_quantized(model, path, cfg: ExportConfig, ctx: RunContext, images: np.ndarray, metadata: dict, quantization: dict) -> dict:
    from compress.exporters.qdq import check_qdq, store_int8_weights
    from compress.quantization import kept_float_convs

    export_onnx(  # torch.export has no fake-tensor kernels for the fake-quantize ops: the tracer exports them
        model, path, image_size=ctx.data.image_size, in_channels=ctx.data.in_channels, opset=cfg.opset,
        exporter=QUANTIZED_EXPORTER, metadata=metadata, transform=store_int8_weights, simplify=cfg.simplify,
    )
    result = verify_onnx(path, model, images, tolerance=cfg.int8_tolerance, min_agreement=cfg.int8_min_agreement, relative=True)
    result["qdq"] = check_qdq(path, target=quantization["target"], skip_count=kept_float_convs(model))
    requantized = result["qdq"].get("skipped_but_quantized_by_onnxruntime")
    if requantized and ctx.show_progress:
        print(
            f"warning: {requantized} layer(s) in quantize.skip sit between quantized layers; ONNX Runtime quantizes "
            f"them anyway (per tensor) when it loads {path.name}. Only layers at the edges of the graph stay float.",
            file=sys.stderr,
        )
    return result


def normalised_test_images(ctx: RunContext, limit: int) -> np.ndarray:
    images, _ = test_arrays(ctx.data, limit=limit)
    return normalise_images(images, ctx.data.mean, ctx.data.std)


def onnx_metadata(ctx: RunContext, role: str, model_name: str) -> dict[str, str]:
    data = ctx.data
    return preprocessing_metadata(data.mean, data.std, data.image_size, [c.replace(",", " ") for c in data.classes]) | {
        "compress.role": role,
        "compress.model": model_name,
        "compress.run": ctx.recipe.name,
        "compress.num_classes": str(data.num_classes),
        "compress.torch": torch.__version__,
    }
