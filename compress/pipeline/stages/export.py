"""Stage ``export``: teacher and student to ONNX (and FP16 ONNX, TensorRT engines), each file
proven against PyTorch on real test images.

Also the engine of ``compress export SOURCE --format ...``, which needs no run: a stage folder is
exported the same way, an existing ONNX file converted.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from compress.benchmark.measure import normalise_images
from compress.data.containers import DatasetBundle
from compress.data.loaders import test_arrays
from compress.data.spec import DataConfig
from compress.errors import ExportError
from compress.exporters.formats import FORMATS
from compress.exporters.network import export_derived_formats, export_network, proven
from compress.exporters.onnx.export import preprocessing_metadata
from compress.exporters.spec import ExportConfig
from compress.nets.rebuild import StageNetwork
from compress.pipeline.artifacts import Artifact
from compress.pipeline.context import RunContext
from compress.pipeline.stages.networks import load_network, network_of


def export(cfg: ExportConfig, ctx: RunContext) -> Artifact:
    """Write ``<run>/teacher.onnx`` and ``<run>/student.onnx``, plus the recipe's other formats.

    The preprocessing (mean, std, image size, class names) travels in the ONNX metadata so the
    file can be benchmarked and deployed on its own. Each file is checked with ONNX Runtime
    against the PyTorch model on ``cfg.check_samples`` test images; the max difference and
    top-1 agreement are recorded, and a mismatch beyond the tolerance fails the stage.

    A quantized student is exported as a QDQ graph with INT8 weights and checked against its
    fake-quantized PyTorch model with the INT8 bounds, and its graph is verified (see
    :func:`export_network`). The float student it came from is exported beside it as
    ``student_fp32.onnx`` so the bench measures what quantization bought.

    Further formats are built from each ONNX file: ``onnx-fp16`` (``<role>.fp16.onnx``, float
    models only, verified against PyTorch with the FP16 bounds) and ``tensorrt``
    (``<role>.engine``). Without TensorRT or a GPU the engines are skipped with a warning and the
    run goes on; the reason is recorded in ``metrics[role]["formats"]``.

    Returns:
        Artifact whose files are ``{role: .onnx}`` plus ``{"role@format": file}`` per extra
        format built, and whose metrics hold each file's verification.
    """
    images = normalised_test_images(ctx.data, cfg.check_samples)
    files, metrics = {}, {}
    for role, artifact in models_to_export(ctx):
        model = load_network(ctx, artifact).cpu()
        path = ctx.run_dir / f"{role}.onnx"
        quantization = network_of(artifact).quantization
        metadata = onnx_metadata(ctx.data, role, network_of(artifact).model, ctx.recipe.name)
        metrics[role] = export_network(
            model,
            path,
            cfg,
            images,
            metadata,
            quantization,
            **input_of(ctx.data),
            warn=ctx.show_progress,
        )
        # which stage's network the file holds (bench, report)
        metrics[role]["stage"] = artifact.stage
        files[role] = path
        derived = export_derived_formats(
            path,
            model,
            cfg,
            images,
            quantization,
            warn=ctx.show_progress,
            timing_cache=ctx.run_dir / "tensorrt.cache",
        )
        metrics[role]["formats"] = {fmt: outcome for fmt, (outcome, _) in derived.items()}
        files |= {f"{role}@{fmt}": file for fmt, (_, file) in derived.items() if file is not None}
    return Artifact("export", files=files, metrics=metrics)


def models_to_export(ctx: RunContext) -> list[tuple[str, Artifact]]:
    """(file role, artifact): the teacher, the last student and, if that student is quantized,
    the float student it was quantized from."""
    models = [("teacher", ctx.latest("teacher"))]
    if not any(a.role == "student" for a in ctx.artifacts.values()):
        return models
    student = ctx.latest("student")
    source = student.metrics.get("source_stage")
    if student.quantized and source in ctx.artifacts:
        models.append(("student_fp32", ctx.artifacts[source]))
    return models + [("student", student)]


def input_of(data: DatasetBundle) -> dict[str, int]:
    """The input an exported file declares, from the dataset it was trained on."""
    return {"image_size": data.image_size, "in_channels": data.in_channels}


def normalised_test_images(data: DatasetBundle, limit: int) -> np.ndarray:
    images, _ = test_arrays(data, limit=limit)
    return normalise_images(images, data.mean, data.std)


def onnx_metadata(data: DatasetBundle, role: str, model_name: str, run_name: str) -> dict[str, str]:
    return preprocessing_metadata(
        data.mean, data.std, data.image_size, [c.replace(",", " ") for c in data.classes]
    ) | {
        "compress.role": role,
        "compress.model": model_name,
        "compress.run": run_name,
        "compress.num_classes": str(data.num_classes),
        "compress.torch": torch.__version__,
    }


# --- compress export (no run) -----------------------------------------------------------------


def export_file(
    source: str | Path, fmt: str, out: str | Path | None, cfg: ExportConfig, data: str | None = None
) -> tuple[Path, dict]:
    """``compress export``: one model to one format, outside a run.

    Args:
        source: a stage folder of a run (``exported/<run>/<stage>``: any stage that holds a
            network) or, for ``onnx-fp16`` and ``tensorrt``, an ``.onnx`` file.
        fmt: a name of :data:`compress.exporters.FORMATS`.
        out: the file to write; default: next to the source, named after it.
        cfg: export settings (opset, exporter, batch, tolerances, engine options).
        data: dataset path for the preprocessing metadata and the check images of a stage
            folder; default: the data of the recipe that made the stage.

    Returns:
        ``(written file, record)``: the verification record of the export or conversion.

    Raises:
        ExportError / ModelError / DataError: with one line saying what is wrong.
    """
    source = Path(source)
    suffix = FORMATS.get(fmt).suffix
    if source.suffix == ".onnx":
        if fmt == "onnx":
            raise ExportError(f"{source} is already ONNX; ask for --format onnx-fp16 or tensorrt")
        target = Path(out) if out else source.with_name(source.name.removesuffix(".onnx") + suffix)
        with proven(target) as pending:
            return target, FORMATS.get(fmt).converter(source, pending, cfg)
    from compress.nets.rebuild import load_stage_network

    model, network = load_stage_network(source)
    quantization = network.spec.quantization
    bundle = _stage_data(network, data)
    target = Path(out) if out else source.parent / f"{network.stage}{suffix}"
    images = normalised_test_images(bundle, cfg.check_samples)
    metadata = onnx_metadata(bundle, network.stage, network.spec.model, source.parent.name)
    if fmt == "onnx":
        return target, export_network(
            model, target, cfg, images, metadata, quantization, **input_of(bundle)
        )
    reason = FORMATS.get(fmt).not_applicable(quantization)
    if reason is not None:
        raise ExportError(f"cannot export {source} as {fmt}: {reason}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:  # the ONNX file it is built from
        onnx_path = Path(folder) / f"{network.stage}.onnx"
        record = {
            "onnx": export_network(
                model, onnx_path, cfg, images, metadata, quantization, **input_of(bundle)
            )
        }
        record[fmt] = FORMATS.get(fmt).builder(
            onnx_path, target, model, images, cfg, int8=quantization is not None
        )
    return target, record


def _stage_data(network: StageNetwork, data: str | None) -> DatasetBundle:
    """The dataset the stage was trained on (for its metadata and check images), or ``data``."""
    from compress.data.load import detect_kind, load_dataset
    from compress.pipeline.recipe.convert import section_from_dict

    if data is not None:
        cfg = DataConfig(kind=detect_kind(data), path=data, image_size=network.image_size)
    else:
        cfg = section_from_dict(DataConfig, network.record.recipe["data"], "data")
    bundle = load_dataset(cfg)
    classes = network.spec.num_classes
    if bundle.num_classes != classes:
        raise ExportError(
            f"{network.record.folder}: the network has {classes} classes, the data "
            f"{bundle.num_classes}"
        )
    return bundle
