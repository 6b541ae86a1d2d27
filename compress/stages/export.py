"""Stage ``export``: teacher and student to ONNX (and FP16 ONNX, TensorRT engines), each file
proven against PyTorch on real test images.

Also the engine of ``compress export SOURCE --format ...``, which needs no run: a stage folder is
exported the same way, an existing ONNX file converted.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from compress.artifacts import Artifact
from compress.benchmark import normalise_images
from compress.config import DataConfig, ExportConfig
from compress.context import RunContext
from compress.data import DatasetBundle, test_arrays
from compress.errors import ExportError
from compress.exporters import FORMATS
from compress.exporters.onnx import export_onnx, preprocessing_metadata, verify_onnx
from compress.stages import STAGES
from compress.stages.networks import load_network

QUANTIZED_EXPORTER = "torchscript"


@STAGES.register("export")
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
        quantization = artifact.metrics.get("quantization")
        metadata = onnx_metadata(ctx.data, role, artifact.metrics["model"], ctx.recipe.name)
        metrics[role] = export_network(model, path, cfg, ctx.data, images, metadata, quantization, warn=ctx.show_progress)
        metrics[role]["stage"] = artifact.stage  # which stage's network the file holds (bench, report)
        files[role] = path
        derived = export_derived_formats(path, model, cfg, images, quantization, warn=ctx.show_progress, timing_cache=ctx.run_dir / "tensorrt.cache")
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
    if student.metrics.get("quantization") and source in ctx.artifacts:
        models.append(("student_fp32", ctx.artifacts[source]))
    return models + [("student", student)]


def export_network(model, path: Path, cfg: ExportConfig, data: DatasetBundle, images: np.ndarray, metadata: dict, quantization: dict | None, *, warn: bool = True) -> dict:
    """One network to one proven ONNX file: FP32, or a QDQ graph for a quantized network.

    A quantized network goes through the TorchScript exporter (``torch.export`` has no
    fake-tensor kernels for the fake-quantize ops), gets its weights stored as INT8
    initializers, is checked against its fake-quantized PyTorch model with the INT8 bounds
    (ONNX Runtime's integer kernels round differently) and has its graph verified (Q/DQ nodes,
    INT8 weights with zero point 0, the target's activation type, no FP32 convolution left after
    ONNX Runtime's optimisation).

    Returns:
        The verification record (see :func:`compress.exporters.onnx.verify_onnx`), with
        ``"qdq"`` for a quantized network and ``"batch"`` (None: dynamic).
    """
    common = dict(image_size=data.image_size, in_channels=data.in_channels, opset=cfg.opset, batch=cfg.batch, simplify=cfg.simplify)
    if quantization is None:
        export_onnx(model, path, exporter=cfg.exporter, metadata=metadata, **common)
        return verify_onnx(path, model, images, tolerance=cfg.tolerance, min_agreement=cfg.min_agreement) | {"batch": cfg.batch}
    from compress.exporters.qdq import check_qdq, store_int8_weights
    from compress.quantization import kept_float_convs

    weight_range = quantization.get("weight_range", "full")  # stages quantized before ranges existed
    metadata = metadata | {"compress.quantization": quantization["target"], "compress.int8_weight_range": weight_range}
    export_onnx(model, path, exporter=QUANTIZED_EXPORTER, metadata=metadata, transform=store_int8_weights, **common)
    portability, exact = prove_portability(path, weight_range, quantization["target"], warn=warn)
    result = verify_onnx(path, model, images, tolerance=cfg.int8_tolerance, min_agreement=cfg.int8_min_agreement, relative=True, exact_int8=exact)
    result["portability"] = portability
    result["qdq"] = check_qdq(path, target=quantization["target"], skip_count=kept_float_convs(model))
    requantized = result["qdq"].get("skipped_but_quantized_by_onnxruntime")
    if requantized and warn:
        print(
            f"warning: {requantized} layer(s) in quantize.skip sit between quantized layers; ONNX Runtime quantizes "
            f"them anyway (per tensor) when it loads {path.name}. Only layers at the edges of the graph stay float.",
            file=sys.stderr,
        )
    return result | {"batch": cfg.batch}


def prove_portability(path: Path, weight_range: str, target: str, *, warn: bool) -> tuple[dict, bool]:
    """Check an INT8 file against the overflow bound of x86 kernels without VNNI and write the
    verdict into its metadata (:func:`compress.exporters.qdq.int8_portability`).

    A file that is not portable cannot be verified with ONNX Runtime's default kernels on a CPU
    that saturates it: there it is verified with the exact u8u8 kernels instead, which compute
    what a VNNI CPU does, and a warning says so.

    Returns:
        ``(record for the export metrics, whether to verify with exact_int8)``.

    Raises:
        ExportError: a portable ``weight_range`` produced a file that is not portable.
    """
    from compress.cpu_features import cpu_features
    from compress.exporters.onnx import add_metadata, load_onnx
    from compress.exporters.qdq import int8_portability
    from compress.int8_kernels import WEIGHT_RANGES

    report = int8_portability(load_onnx(path))
    add_metadata(path, report.metadata())
    if WEIGHT_RANGES[weight_range].portable and not report.portable:
        raise ExportError(
            f"{path.name}: weight_range {weight_range} should stay within the 16-bit lanes of CPUs without VNNI, "
            f"but layer {report.worst_layer} pairs weights summing to {report.worst_pair_sum} (limit {report.limit})"
        )
    cpu = cpu_features()
    exact = cpu.saturates_u8s8 and not report.portable
    if exact and warn and target == "onnxruntime-cpu":
        print(
            f"warning: {path.name} has full-range INT8 weights (quantize.weight_range: {weight_range}), which this CPU "
            f"({cpu.summary()}) saturates; it was verified with ONNX Runtime's exact u8u8 kernels and gives these answers "
            "only on CPUs with VNNI (or ARM). Use weight_range: auto for a file that is right everywhere.",
            file=sys.stderr,
        )
    verified_with = "u8u8 (session.x64quantprecision)" if exact else "u8s8"
    return report.to_dict() | {"weight_range": weight_range, "cpu": cpu.summary(), "verified_with": verified_with}, exact


def export_derived_formats(onnx_path: Path, model, cfg: ExportConfig, images: np.ndarray, quantization: dict | None, *, warn: bool, timing_cache: Path | None) -> dict[str, tuple[dict, Path | None]]:
    """Every format of ``cfg.formats`` but ONNX, built from the proven ONNX file.

    Returns:
        ``{format: (outcome, file or None)}``; outcome is ``{"status": "ok", "file", ...the
        verification}`` or ``{"status": "skipped", "reason"}`` (a float-only format for an INT8
        model, TensorRT absent).
    """
    derived = {}
    for fmt in cfg.formats:
        if fmt == "onnx":
            continue
        target = onnx_path.with_name(onnx_path.name.removesuffix(".onnx") + FORMATS.get(fmt).suffix)
        reason = _not_applicable(fmt, quantization)
        if reason is None:
            try:
                outcome = _build_format(fmt, onnx_path, target, model, cfg, images, quantization, timing_cache)
            except ExportError as exc:
                if not _is_unavailable(exc):
                    raise
                reason = str(exc)
        if reason is not None:
            if warn and fmt == "tensorrt":
                print(f"warning: no TensorRT engine for {onnx_path.name}: {reason}", file=sys.stderr)
            derived[fmt] = ({"status": "skipped", "reason": reason}, None)
        else:
            derived[fmt] = ({"status": "ok", "file": target.name, **outcome}, target)
    return derived


def _not_applicable(fmt: str, quantization: dict | None) -> str | None:
    if quantization is None:
        return None
    if fmt == "onnx-fp16":
        return "an INT8 model: FP16 conversion applies to float models"
    if fmt == "tensorrt" and quantization["target"] != "tensorrt":
        return f"quantized for {quantization['target']} (uint8 activations); TensorRT needs quantize.target: tensorrt"
    return None


def _build_format(fmt, onnx_path, target, model, cfg, images, quantization, timing_cache) -> dict:
    if fmt == "onnx-fp16":
        from compress.exporters.fp16 import convert_to_fp16

        convert_to_fp16(onnx_path, target)
        return verify_onnx(target, model, images, tolerance=cfg.fp16_tolerance, min_agreement=cfg.fp16_min_agreement, relative=True)
    from compress.exporters.tensorrt import build_engine

    batch = (cfg.batch,) * 3 if cfg.batch is not None else cfg.engine_batch
    int8 = quantization is not None
    build_engine(onnx_path, target, fp16=cfg.engine_fp16, int8=int8, batch=batch, workspace_mib=cfg.engine_workspace_mib, timing_cache=timing_cache)
    return verify_engine(target, model, images, cfg, int8=int8) | {"fp16": cfg.engine_fp16, "int8": int8, "batch": list(batch)}


def verify_engine(path: Path, model, images: np.ndarray, cfg: ExportConfig, *, int8: bool) -> dict:
    """An engine against its PyTorch model on the check images, with the bounds of its
    precision (INT8: the ``int8_*`` bounds; FP16 kernels: the ``fp16_*`` ones; else FP32's)."""
    from compress.backends._trt_worker import infer
    from compress.exporters.onnx import compare_logits

    try:
        ours = infer(path, images)
    except Exception as exc:
        raise ExportError(f"{path.name}: TensorRT cannot run the engine it built: {exc}") from exc
    with torch.no_grad():
        theirs = model.eval()(torch.from_numpy(images)).numpy()
    tolerance, agreement = (
        (cfg.int8_tolerance, cfg.int8_min_agreement) if int8 else (cfg.fp16_tolerance, cfg.fp16_min_agreement) if cfg.engine_fp16 else (cfg.tolerance, cfg.min_agreement)
    )
    return compare_logits(ours, theirs, path, tolerance=tolerance, min_agreement=agreement, relative=int8 or cfg.engine_fp16)


def _is_unavailable(exc: ExportError) -> bool:
    from compress.exporters.tensorrt import TensorRTUnavailable

    return isinstance(exc, TensorRTUnavailable)


def normalised_test_images(data: DatasetBundle, limit: int) -> np.ndarray:
    images, _ = test_arrays(data, limit=limit)
    return normalise_images(images, data.mean, data.std)


def onnx_metadata(data: DatasetBundle, role: str, model_name: str, run_name: str) -> dict[str, str]:
    return preprocessing_metadata(data.mean, data.std, data.image_size, [c.replace(",", " ") for c in data.classes]) | {
        "compress.role": role,
        "compress.model": model_name,
        "compress.run": run_name,
        "compress.num_classes": str(data.num_classes),
        "compress.torch": torch.__version__,
    }


# --- compress export (no run) -----------------------------------------------------------------


def export_file(source: str | Path, fmt: str, out: str | Path | None, cfg: ExportConfig, data: str | None = None) -> tuple[Path, dict]:
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
        return target, _convert_onnx(source, fmt, target, cfg)
    from compress.stages.networks import load_stage_network

    model, info = load_stage_network(source)
    bundle = _stage_data(source, info, data)
    target = Path(out) if out else source.parent / f"{info['stage']}{suffix}"
    images = normalised_test_images(bundle, cfg.check_samples)
    metadata = onnx_metadata(bundle, info["stage"], info["model"], source.parent.name)
    if fmt == "onnx":
        return target, export_network(model, target, cfg, bundle, images, metadata, info["quantization"])
    reason = _not_applicable(fmt, info["quantization"])
    if reason is not None:
        raise ExportError(f"cannot export {source} as {fmt}: {reason}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:  # the ONNX file it is built from
        onnx_path = Path(folder) / f"{info['stage']}.onnx"
        record = {"onnx": export_network(model, onnx_path, cfg, bundle, images, metadata, info["quantization"])}
        record[fmt] = _build_format(fmt, onnx_path, target, model, cfg, images, info["quantization"], timing_cache=None)
    return target, record


def _stage_data(folder: Path, info: dict, data: str | None) -> DatasetBundle:
    """The dataset the stage was trained on (for its metadata and check images), or ``data``."""
    import json

    from compress.data import detect_kind, load_dataset
    from compress.recipe import section_from_dict

    if data is not None:
        cfg = DataConfig(kind=detect_kind(data), path=data, image_size=info["image_size"])
    else:
        record = json.loads((folder / "stage.json").read_text())
        cfg = section_from_dict(DataConfig, record["recipe"]["data"], "data")
    bundle = load_dataset(cfg)
    if bundle.num_classes != info["num_classes"]:
        raise ExportError(f"{folder}: the network has {info['num_classes']} classes, the data {bundle.num_classes}")
    return bundle


def _convert_onnx(source: Path, fmt: str, target: Path, cfg: ExportConfig) -> dict:
    """An existing ONNX file to FP16 ONNX (checked against the source in ONNX Runtime) or an engine."""
    from compress.exporters.onnx import read_onnx_info

    info = read_onnx_info(source)
    if fmt == "tensorrt":
        from compress.exporters.tensorrt import build_engine

        int8 = "compress.quantization" in info["metadata"]
        batch = tuple([info["input_shape"][0]] * 3) if isinstance(info["input_shape"][0], int) else cfg.engine_batch
        build_engine(source, target, fp16=cfg.engine_fp16, int8=int8, batch=batch, workspace_mib=cfg.engine_workspace_mib, timing_cache=source.parent / "tensorrt.cache")
        return {"fp16": cfg.engine_fp16, "int8": int8, "batch": list(batch)}
    from compress.exporters.fp16 import convert_to_fp16

    convert_to_fp16(source, target)
    return compare_onnx_files(target, source, cfg.check_samples, tolerance=cfg.fp16_tolerance, min_agreement=cfg.fp16_min_agreement)


def compare_onnx_files(candidate: Path, reference: Path, samples: int, *, tolerance: float, min_agreement: float) -> dict:
    """Check a converted file against the file it came from on random normal inputs (no
    PyTorch model or dataset at hand), relative to the largest |logit|, with top-1 agreement."""
    from compress.exporters.onnx import compare_logits, open_session

    sessions = [open_session(p) for p in (candidate, reference)]
    shape = [d if isinstance(d, int) else None for d in sessions[1].get_inputs()[0].shape]
    inputs = np.random.default_rng(0).standard_normal((shape[0] or min(samples, 64), *shape[1:]), dtype=np.float32)
    outputs = []
    for session in sessions:
        feed = inputs.astype(np.float16) if session.get_inputs()[0].type == "tensor(float16)" else inputs
        outputs.append(session.run(None, {session.get_inputs()[0].name: feed})[0])
    result = compare_logits(outputs[0], outputs[1], candidate, tolerance=tolerance, min_agreement=min_agreement, relative=True)
    return result | {"inputs": "random normal", "reference": reference.name}
