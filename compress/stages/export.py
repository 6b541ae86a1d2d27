"""Stage ``export``: teacher and student to ONNX, each proven against PyTorch on real test images."""

from __future__ import annotations

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
    """
    images = normalised_test_images(ctx, cfg.check_samples)
    roles = ["teacher"] + (["student"] if any(a.role == "student" for a in ctx.artifacts.values()) else [])
    files, metrics = {}, {}
    for role in roles:
        artifact = ctx.latest(role)
        model = load_network(ctx, artifact).cpu()
        path = ctx.run_dir / f"{role}.onnx"
        export_onnx(model, path, image_size=ctx.data.image_size, in_channels=ctx.data.in_channels, opset=cfg.opset, exporter=cfg.exporter, metadata=onnx_metadata(ctx, role, artifact.metrics["model"]))
        metrics[role] = verify_onnx(path, model, images, tolerance=cfg.tolerance, min_agreement=cfg.min_agreement)
        files[role] = path
    return Artifact("export", files=files, metrics=metrics)


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
