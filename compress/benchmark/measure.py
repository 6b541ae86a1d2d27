"""Measuring one model: accuracy and predictions (with ONNX Runtime, or the backend's own
runtime), latency and memory through a backend, size, parameters and MACs from the file or the
stage record."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from compress.benchmark.backend_table import BACKENDS
from compress.benchmark.latency import LatencyJob, measure_interleaved
from compress.benchmark.rows import BenchRow, LatencyPoint
from compress.benchmark.spec import BenchConfig
from compress.core.cpu_features import cpu_features
from compress.core.records import STAGE_RECORD, StageRecord
from compress.core.registry import load_entry
from compress.errors import CompressError, DataError, ExportError, ModelError
from compress.exporters.formats import ONNX_FORMATS, format_of_file
from compress.exporters.onnx.export import META_MEAN, META_STD
from compress.exporters.onnx.graph import read_onnx_info
from compress.exporters.onnx.verify import open_session

TestData = tuple[np.ndarray, np.ndarray]


def bench_model(
    path: Path,
    cfg: BenchConfig,
    test_data: TestData | None,
    *,
    role: str,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    reference_predictions: np.ndarray | None = None,
) -> BenchRow:
    """Benchmark one exported model; never raises for a broken model (its row says why).

    Args:
        path: the ``.onnx`` file.
        cfg: the bench settings (backend, batch size, warm-up, iterations, budget, threads,
            processes, eval_samples).
        test_data: ``(images, labels)``: uint8 (N, C, H, W) images and integer labels, for the
            top-1 accuracy of the exported model; None skips accuracy.
        role: the row's name ("teacher", "student", or a file stem).
        mean: per-channel mean of [0, 1] pixels, used only when the file's metadata has no
            ``compress.mean`` (the file is the authority on its own preprocessing).
        std: per-channel std, likewise for ``compress.std``.
        reference_predictions: top-1 predictions of the reference model on the same images;
            when given, the row gets ``agreement_with_reference``.

    Returns:
        Its row: status, size, parameters, MACs, latency at batch sizes 1 and ``cfg.batch_size``,
        memory and, with test data, ``top1`` (percent, like every training metric) and maybe
        ``agreement_with_reference``. Fields measured before a failure are kept.
    """
    row, _ = _bench(path, cfg, test_data, role, mean, std, reference_predictions)
    return row


def predict_onnx(
    path: Path,
    images: np.ndarray,
    *,
    mean: list[float],
    std: list[float],
    batch_size: int = 64,
    threads: int = 0,
) -> np.ndarray:
    """Top-1 class of each image according to the exported model, through ONNX Runtime.

    Args:
        path: the ``.onnx`` file.
        images: uint8 (N, C, H, W) images.
        mean: per-channel mean of pixels scaled to [0, 1].
        std: per-channel standard deviation of pixels scaled to [0, 1].
        batch_size: images per ``session.run`` (a file with a static batch axis gets exactly
            its batch; the last chunk is padded).
        threads: ONNX Runtime intra-op threads; 0 keeps its default.

    Returns:
        int64 array of N predicted classes.

    Raises:
        DataError: the images are not uint8 NCHW or mean/std do not match their channels.
        ExportError: ONNX Runtime cannot load the file.
    """
    _channel_stats(images, mean, std)  # fail on bad shapes before loading the model
    session = open_session(Path(path), threads=threads)
    feed = session.get_inputs()[0]
    dtype = np.float16 if feed.type == "tensor(float16)" else np.float32  # FP16 I/O files
    # a static batch runs only at its size
    static = feed.shape[0] if isinstance(feed.shape[0], int) else None
    return _top1_per_batch(
        lambda chunk: session.run(None, {feed.name: chunk})[0],
        images,
        mean,
        std,
        batch_size,
        dtype=dtype,
        static=static,
    )


def predict_on(
    backend,
    path: Path,
    images: np.ndarray,
    *,
    mean: list[float],
    std: list[float],
    batch_size: int = 64,
    threads: int = 0,
) -> np.ndarray:
    """Top-1 class of each image according to the exported model as ``backend`` runs it.

    The backend's ``predictor`` computes the logits (OpenVINO's own for ``openvino``); a
    backend without one predicts through ONNX Runtime on the CPU (:func:`predict_onnx`).

    Args:
        backend: a :class:`compress.benchmark.backend_table.Backend` that runs ONNX files.
        path, images, mean, std, batch_size, threads: as :func:`predict_onnx`.

    Returns:
        int64 array of N predicted classes.

    Raises:
        DataError: the images are not uint8 NCHW or mean/std do not match their channels.
        CompressError: the backend's runtime cannot run the file (one line).
    """
    if backend.predictor is None:
        return predict_onnx(
            path, images, mean=mean, std=std, batch_size=batch_size, threads=threads
        )
    _channel_stats(images, mean, std)  # fail on bad shapes before loading the model
    run = load_entry(backend.predictor)(Path(path), batch_size=batch_size, threads=threads)
    return _top1_per_batch(run, images, mean, std, batch_size)


def _top1_per_batch(
    run, images: np.ndarray, mean, std, batch_size: int, *, dtype=np.float32, static=None
) -> np.ndarray:
    """The arg-max of ``run(normalised chunk)`` over ``images`` in chunks of ``batch_size``; a
    model with a static batch axis (``static``) runs only at its size, so the last chunk is
    padded with copies whose predictions are dropped."""
    batch_size = static or batch_size
    predictions = []
    for start in range(0, len(images), batch_size):
        chunk = normalise_images(images[start : start + batch_size], mean, std)
        chunk = chunk.astype(dtype, copy=False)
        count = len(chunk)
        if static and count < static:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], static - count, axis=0)])
        predictions.append(run(chunk)[:count].argmax(axis=1))
    return np.concatenate(predictions).astype(np.int64) if predictions else np.zeros(0, np.int64)


def normalise_images(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (N, C, H, W) -> the float32 input our exported models expect:
    (x / 255 - mean) / std."""
    mean_c, std_c = _channel_stats(images, mean, std)
    return ((images.astype(np.float32) / 255.0 - mean_c) / std_c).astype(np.float32)


def normalisation(
    metadata: dict[str, str],
    path: Path,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> tuple[list[float], list[float]]:
    """The mean/std to preprocess images for a file: its metadata first, else the caller's.

    Args:
        metadata: the file's ``metadata_props`` (``read_onnx_info(path)["metadata"]``).
        path: the file, for the error message.
        mean: fallback per-channel mean.
        std: fallback per-channel std.

    Returns:
        ``(mean, std)`` as lists of floats.

    Raises:
        ExportError: neither the metadata nor the caller gives both, or the metadata is not a
            comma-separated list of numbers.
    """
    if META_MEAN in metadata and META_STD in metadata:
        return _floats(metadata, META_MEAN, path), _floats(metadata, META_STD, path)
    if mean is not None and std is not None:
        return [float(m) for m in mean], [float(s) for s in std]
    raise ExportError(
        f"{Path(path).name} has no {META_MEAN}/{META_STD} metadata to normalise images with; "
        "export it with compress (which writes them), add them to the file with "
        "compress.exporters.onnx.export.add_metadata(path, preprocessing_metadata(mean, std, "
        "image_size, classes)), or bench it from Python with compress.bench(..., mean=[...], "
        "std=[...])"
    )


def _bench(
    path,
    cfg,
    test_data,
    role,
    mean,
    std,
    reference_predictions,
    backend: str | None = None,
    fmt: str | None = None,
    measured: dict | None = None,
):
    """(row, predictions or None): bench_model plus the predictions, kept out of the row.

    ``measured``: the latency already timed for this model (interleaved with the other models
    of its backend, see :func:`compress.benchmark.latency.measure_interleaved`); None times it
    here."""
    path = Path(path)
    backend = BACKENDS.get(backend or cfg.backends[0])
    fmt = fmt or artifact_format(path)
    row = BenchRow(role=role, path=str(path), status="ok", backend=backend.name, format=fmt)
    errors: list[str] = []
    predictions = None
    try:
        info = describe_artifact(path, fmt)
        shape = info.get("input_shape")
        row = replace(
            row,
            file_bytes=info.get("file_bytes"),
            params=info.get("params"),
            macs=info.get("macs"),
            opset=info.get("opset"),
            input_shape=None if shape is None else tuple(shape),
        )
        if fmt in ONNX_FORMATS:
            row = replace(row, int8_portable=int8_portable(path, info["metadata"]))
            if (
                row.int8_portable is False
                and backend.saturates_without_vnni
                and cpu_features().saturates_u8s8
            ):
                row = replace(row, warning=saturation_warning(path))
                print(f"warning: {row.warning}", file=sys.stderr)
        row = _timed(row, path, backend, cfg, errors, measured)
        if test_data is not None and fmt in ONNX_FORMATS:
            mean, std = normalisation(info["metadata"], path, mean, std)
            row, predictions = _with_accuracy(
                row, cfg, test_data, mean, std, reference_predictions, backend
            )
    except Exception as exc:
        message = _describe(exc)
        if not any(e.endswith(message) for e in errors):  # e.g. a runtime that is not installed
            errors.append(message)
    if errors:
        row = replace(row, status="error", error="; ".join(errors))
    return row, predictions


CHECKPOINT = "checkpoint"  # a stage folder (or its stage.json): what the PyTorch backends measure


def int8_portable(path: Path, metadata: dict[str, str]) -> bool | None:
    """Whether an ONNX file's integer layers compute the same on x86 CPUs with and without VNNI
    (:func:`compress.exporters.qdq.int8_portability`): from the verdict the export wrote into its
    metadata, else from its weights. None for a file without integer layers."""
    from compress.exporters.onnx.graph import load_onnx
    from compress.exporters.qdq import int8_portability, portable_from_metadata

    portable = portable_from_metadata(metadata)
    if portable is not None:
        return portable
    report = int8_portability(load_onnx(path))
    return report.portable if report.layers else None


def saturation_warning(path: Path) -> str:
    """The one line a user sees when a non-portable INT8 file is measured where it computes wrong
    sums."""
    return (
        f"{path.name} has full-range INT8 weights and this CPU ({cpu_features().summary()}) adds "
        "its products in saturating 16-bit lanes: its accuracy and agreement here are wrong "
        "(re-export with quantize.weight_range: auto)"
    )


def artifact_format(path: Path) -> str:
    """ "checkpoint" (a stage folder or its record), else the export format its suffix names
    (``.onnx`` when none does: ONNX Runtime then says what is wrong with the file)."""
    if path.is_dir() or path.name == STAGE_RECORD:
        return CHECKPOINT
    fmt = format_of_file(path.name)
    return fmt.name if fmt is not None else "onnx"


def describe_artifact(path: Path, fmt: str) -> dict:
    """Size, parameters and MACs of what a row measures: read from the ONNX graph, from a
    stage's record for a checkpoint, and only the file size for an engine (opaque)."""
    if fmt in ONNX_FORMATS:
        return read_onnx_info(path)
    if fmt == "checkpoint":
        try:
            record = StageRecord.read(path, expected="a finished stage holding a network")
            weights = record.network_file()
            return {
                "file_bytes": weights.stat().st_size,
                "params": record.metrics.get("params"),
                "macs": record.metrics.get("macs"),
            }
        except (ModelError, OSError) as exc:
            raise ExportError(
                str(exc) if isinstance(exc, ModelError) else f"{path}: its weights file is missing"
            ) from None
    if not path.is_file():
        raise ExportError(f"{path}: no such engine file")
    return {"file_bytes": path.stat().st_size}


def batch_sizes_for(input_shape, cfg: BenchConfig) -> tuple[int, ...]:
    """The batch sizes a model is timed at: 1 and ``cfg.batch_size``, or only the static batch
    of a file that has one."""
    static = input_shape[0] if input_shape and isinstance(input_shape[0], int) else None
    return (static,) if static else tuple(sorted({1, cfg.batch_size}))


def planned_batch_sizes(path: Path, fmt: str, cfg: BenchConfig) -> tuple[int, ...] | None:
    """:func:`batch_sizes_for` an artifact before its row is made; None when it cannot be
    described (its row then records why, and nothing is timed)."""
    try:
        return batch_sizes_for(describe_artifact(Path(path), fmt).get("input_shape"), cfg)
    except Exception:
        return None


def _timed(
    row: BenchRow, path: Path, backend, cfg: BenchConfig, errors: list[str], measured=None
) -> BenchRow:
    """The row with the latency and memory the backend's child processes measured (their JSON
    results combined and turned into the row's fields)."""
    if measured is None:
        job = LatencyJob(path, batch_sizes_for(row.input_shape, cfg))
        measured = measure_interleaved(backend, [job], cfg)[0]
    if measured["status"] != "ok":
        errors.append(f"latency: {measured['error']}")
    memory_keys = ("peak_rss_mb", "model_rss_mb", "gpu_peak_mb")
    skipped = {"status", "error", "batches", "baseline_rss_mb", *memory_keys}
    return replace(
        row,
        latency=tuple(LatencyPoint.from_json(batch) for batch in measured.get("batches", [])),
        peak_rss_mb=measured.get("peak_rss_mb"),
        model_rss_mb=measured.get("model_rss_mb"),
        gpu_peak_mb=measured.get("gpu_peak_mb"),
        runtime={
            "backend": backend.name,
            **{k: v for k, v in measured.items() if k not in skipped},
        },
    )


def _with_accuracy(
    row: BenchRow, cfg, test_data, mean, std, reference_predictions, backend
) -> tuple[BenchRow, np.ndarray]:
    images, labels = test_data
    n = len(images) if cfg.eval_samples is None else min(cfg.eval_samples, len(images))
    predictions = predict_on(
        backend,
        Path(row.path),
        images[:n],
        mean=mean,
        std=std,
        batch_size=cfg.batch_size,
        threads=cfg.threads,
    )
    row = replace(
        row, top1=100.0 * float(np.mean(predictions == np.asarray(labels[:n]))), eval_samples=n
    )
    if reference_predictions is not None:
        row = replace(row, agreement_with_reference=agreement(predictions, reference_predictions))
    return row, predictions


def agreement(predictions: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of images on which two models predict the same top-1 class.

    Args:
        predictions: one model's classes.
        reference: the other model's classes on the same images, in the same order.

    Returns:
        A fraction in [0, 1].

    Raises:
        DataError: the two were computed on different numbers of images.
    """
    if len(predictions) != len(reference) or len(predictions) == 0:
        raise DataError(
            f"cannot compare predictions on {len(predictions)} and {len(reference)} images"
        )
    return float(np.mean(np.asarray(predictions) == np.asarray(reference)))


def _channel_stats(images: np.ndarray, mean, std) -> tuple[np.ndarray, np.ndarray]:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {images.shape}")
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise DataError(
            f"mean/std have {len(mean)}/{len(std)} values for {channels}-channel images"
        )
    shape = (1, channels, 1, 1)
    return np.asarray(mean, np.float32).reshape(shape), np.asarray(std, np.float32).reshape(shape)


def _floats(metadata: dict[str, str], key: str, path: Path) -> list[float]:
    """The comma-separated numbers of a preprocessing entry: finite, and for the std positive
    (a NaN or zero there would make every input NaN or infinite, and top-1 a number anyway)."""
    text = metadata[key][:1000]
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ExportError(
            f"{Path(path).name}: metadata {key}={text!r} is not a comma-separated list of numbers"
        ) from None
    positive = key == META_STD
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        raise ExportError(
            f"{Path(path).name}: metadata {key}={text!r}: expected finite numbers"
            + (" above 0" if positive else "")
        )
    return values


def _describe(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return text if isinstance(exc, CompressError) else f"{type(exc).__name__}: {text}"
