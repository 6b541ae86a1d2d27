"""Measure exported models and compare them: one row per model, ratios vs a reference, a table.

A row describes the exported file, not the PyTorch model: size, parameters and MACs read from
the ONNX graph; latency, throughput and memory from a bench backend (a fresh child process per
model); top-1 accuracy of the exported model itself through ONNX Runtime. Whatever fails in a
row (a corrupt file, a crashed runtime, missing preprocessing metadata) is recorded in that row's
``status``/``error`` and the other rows go on (STYLE habit 7).

Typical use (what the bench stage does)::

    result = bench_models({"teacher": t_path, "student": s_path}, cfg, (images, labels))
    write_bench(result, run_dir / "bench")
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from compress.backends import BACKENDS
from compress.config import BenchConfig
from compress.cpu_features import CpuFeatures, cpu_features
from compress.errors import CompressError, DataError, ExportError
from compress.exporters.onnx import META_MEAN, META_STD, open_session, read_onnx_info
from compress.fileio import write_json_atomic, write_text_atomic

TestData = tuple[np.ndarray, np.ndarray]


# --- one model ------------------------------------------------------------------------------


def bench_model(
    path: Path,
    cfg: BenchConfig,
    test_data: TestData | None,
    *,
    role: str,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    reference_predictions: np.ndarray | None = None,
) -> dict:
    """Benchmark one exported model; never raises for a broken model (its row says why).

    Args:
        path: the ``.onnx`` file.
        cfg: the bench settings (backend, batch size, warm-up, iterations, budget, threads,
            eval_samples).
        test_data: ``(images, labels)``: uint8 (N, C, H, W) images and integer labels, for the
            top-1 accuracy of the exported model; None skips accuracy.
        role: the row's name ("teacher", "student", or a file stem).
        mean: per-channel mean of [0, 1] pixels, used only when the file's metadata has no
            ``compress.mean`` (the file is the authority on its own preprocessing).
        std: per-channel std, likewise for ``compress.std``.
        reference_predictions: top-1 predictions of the reference model on the same images;
            when given, the row gets ``agreement_with_reference``.

    Returns:
        A row: ``role``, ``path``, ``status`` ("ok"/"error"), ``error``, ``file_bytes``,
        ``params``, ``macs``, ``opset``, ``latency`` (one entry per batch size: 1 and
        ``cfg.batch_size``), ``peak_rss_mb``, ``model_rss_mb``, ``runtime`` and, with test data,
        ``top1`` (percent, like every training metric), ``eval_samples`` and maybe
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
    static = feed.shape[0] if isinstance(feed.shape[0], int) else None  # a static batch runs only at its size
    batch_size = static or batch_size
    predictions = []
    for start in range(0, len(images), batch_size):
        chunk = normalise_images(images[start : start + batch_size], mean, std).astype(dtype)
        count = len(chunk)
        if static and count < static:  # pad the last chunk with copies; their predictions are dropped
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], static - count, axis=0)])
        logits = session.run(None, {feed.name: chunk})[0]
        predictions.append(logits[:count].argmax(axis=1))
    return np.concatenate(predictions).astype(np.int64) if predictions else np.zeros(0, np.int64)


def normalise_images(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (N, C, H, W) -> the float32 input our exported models expect: (x / 255 - mean) / std."""
    mean_c, std_c = _channel_stats(images, mean, std)
    return ((images.astype(np.float32) / 255.0 - mean_c) / std_c).astype(np.float32)


def normalisation(
    metadata: dict[str, str], path: Path, mean: list[float] | None = None, std: list[float] | None = None
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
        "export it with preprocessing_metadata(...) or pass mean= and std="
    )


def _bench(path, cfg, test_data, role, mean, std, reference_predictions, backend: str | None = None, fmt: str | None = None):
    """(row, predictions or None): bench_model plus the predictions, kept out of the row."""
    path = Path(path)
    backend = BACKENDS.get(backend or cfg.backends[0])
    fmt = fmt or artifact_format(path)
    row: dict = {"role": role, "path": str(path), "status": "ok", "error": None, "backend": backend.name, "format": fmt}
    errors: list[str] = []
    predictions = None
    try:
        info = describe_artifact(path, fmt)
        row.update({k: info.get(k) for k in ("file_bytes", "params", "macs", "opset", "input_shape")})
        if fmt in ONNX_FORMATS:
            row["int8_portable"] = int8_portable(path, info["metadata"])
            if row["int8_portable"] is False and backend.name == "onnxruntime" and cpu_features().saturates_u8s8:
                row["warning"] = saturation_warning(path)
                print(f"warning: {row['warning']}", file=sys.stderr)
        row.update(_latency_fields(path, backend, cfg, info.get("input_shape"), errors))
        if test_data is not None and fmt in ONNX_FORMATS:
            mean, std = normalisation(info["metadata"], path, mean, std)
            fields, predictions = _accuracy_fields(path, cfg, test_data, mean, std, reference_predictions)
            row.update(fields)
    except Exception as exc:
        errors.append(_describe(exc))
    if errors:
        row.update(status="error", error="; ".join(errors))
    return row, predictions


ONNX_FORMATS = ("onnx", "onnx-fp16")  # files ONNX Runtime runs; accuracy is measured on these


def int8_portable(path: Path, metadata: dict[str, str]) -> bool | None:
    """Whether an ONNX file's integer layers compute the same on x86 CPUs with and without VNNI
    (:func:`compress.exporters.qdq.int8_portability`): from the verdict the export wrote into its
    metadata, else from its weights. None for a file without integer layers."""
    from compress.exporters.onnx import load_onnx
    from compress.exporters.qdq import int8_portability, portable_from_metadata

    portable = portable_from_metadata(metadata)
    if portable is not None:
        return portable
    report = int8_portability(load_onnx(path))
    return report.portable if report.layers else None


def saturation_warning(path: Path) -> str:
    """The one line a user sees when a non-portable INT8 file is measured where it computes wrong sums."""
    return (
        f"{path.name} has full-range INT8 weights and this CPU ({cpu_features().summary()}) adds its products in "
        "saturating 16-bit lanes: its accuracy and agreement here are wrong (re-export with quantize.weight_range: auto)"
    )


def artifact_format(path: Path) -> str:
    """"checkpoint" (a stage folder), "tensorrt" (.engine/.plan), "onnx-fp16" or "onnx"."""
    if path.is_dir() or path.name == "stage.json":
        return "checkpoint"
    if path.suffix in (".engine", ".plan"):
        return "tensorrt"
    return "onnx-fp16" if path.name.endswith(".fp16.onnx") else "onnx"


def describe_artifact(path: Path, fmt: str) -> dict:
    """Size, parameters and MACs of what a row measures: read from the ONNX graph, from a
    stage's record for a checkpoint, and only the file size for an engine (opaque)."""
    if fmt in ONNX_FORMATS:
        return read_onnx_info(path)
    if fmt == "checkpoint":
        import json

        record_path = path if path.name == "stage.json" else path / "stage.json"
        try:
            record = json.loads(record_path.read_text())
            weights = record_path.parent.parent / record["files"]["model"]["path"]
            metrics = record["metrics"]
            return {"file_bytes": weights.stat().st_size, "params": metrics.get("params"), "macs": metrics.get("macs")}
        except (OSError, ValueError, KeyError, TypeError):
            raise ExportError(f"{path}: not a finished stage holding a network (no readable stage.json with a model)") from None
    if not path.is_file():
        raise ExportError(f"{path}: no such engine file")
    return {"file_bytes": path.stat().st_size}


def _latency_fields(path: Path, backend, cfg: BenchConfig, input_shape, errors: list[str]) -> dict:
    static = input_shape[0] if input_shape and isinstance(input_shape[0], int) else None
    batch_sizes = [static] if static else sorted({1, cfg.batch_size})  # a static batch runs only at its size
    measured = backend.measure(
        path,
        batch_sizes=batch_sizes,
        warmup=cfg.warmup,
        iterations=cfg.iterations,
        time_budget_s=cfg.time_budget_s,
        threads=cfg.threads,
    )
    if measured["status"] != "ok":
        errors.append(f"latency: {measured['error']}")
    memory_keys = ("peak_rss_mb", "model_rss_mb", "gpu_peak_mb")
    skipped = {"status", "error", "batches", "baseline_rss_mb", *memory_keys}
    return {
        "latency": measured.get("batches", []),
        **{key: measured.get(key) for key in memory_keys},
        "runtime": {"backend": backend.name, **{k: v for k, v in measured.items() if k not in skipped}},
    }


def _accuracy_fields(path, cfg, test_data, mean, std, reference_predictions) -> tuple[dict, np.ndarray]:
    images, labels = test_data
    n = len(images) if cfg.eval_samples is None else min(cfg.eval_samples, len(images))
    predictions = predict_onnx(path, images[:n], mean=mean, std=std, batch_size=cfg.batch_size, threads=cfg.threads)
    fields = {"top1": 100.0 * float(np.mean(predictions == np.asarray(labels[:n]))), "eval_samples": n}
    if reference_predictions is not None:
        fields["agreement_with_reference"] = agreement(predictions, reference_predictions)
    return fields, predictions


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
        raise DataError(f"cannot compare predictions on {len(predictions)} and {len(reference)} images")
    return float(np.mean(np.asarray(predictions) == np.asarray(reference)))


def _channel_stats(images: np.ndarray, mean, std) -> tuple[np.ndarray, np.ndarray]:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {images.shape}")
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"mean/std have {len(mean)}/{len(std)} values for {channels}-channel images")
    shape = (1, channels, 1, 1)
    return np.asarray(mean, np.float32).reshape(shape), np.asarray(std, np.float32).reshape(shape)


def _floats(metadata: dict[str, str], key: str, path: Path) -> list[float]:
    try:
        return [float(v) for v in metadata[key].split(",")]
    except ValueError:
        raise ExportError(f"{Path(path).name}: metadata {key}={metadata[key]!r} is not a comma-separated list of numbers") from None


def _describe(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return text if isinstance(exc, CompressError) else f"{type(exc).__name__}: {text}"


# --- several models -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchTarget:
    """One artifact to measure: which model it is, the file (or stage folder), its format."""

    model: str
    path: Path
    format: str = "onnx"


def bench_models(
    models: dict[str, Path] | list[BenchTarget],
    cfg: BenchConfig,
    test_data: TestData | None,
    *,
    reference: str = "teacher",
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> dict:
    """Benchmark several models on every backend of ``cfg.backends`` and compare them.

    Each backend measures the targets it can run (ONNX Runtime the ``.onnx`` files, PyTorch the
    stage checkpoints, TensorRT the engines). Rows are grouped by backend (and by format when a
    backend runs more than one, e.g. FP16 ONNX): the group of the first backend's own format is
    the headline and its rows are named after their model ("teacher", "student"); other rows
    are named ``"student [torch-cuda]"``. Ratios compare each row with the reference model of
    its own group. Accuracy is measured once per ONNX file, with ONNX Runtime on CPU.

    Args:
        models: role -> ``.onnx`` file, or a list of :class:`BenchTarget`.
        cfg: the bench settings.
        test_data: ``(uint8 NCHW images, labels)`` or None (no accuracy, no agreement).
        reference: the model the ratios are computed against.
        mean: fallback normalisation for files without preprocessing metadata.
        std: likewise.

    Returns:
        :func:`compare`'s dict plus ``config``, ``machine``, ``versions``, ``groups`` (headline
        first) and ``agreement`` (``{row: {other row: top-1 agreement}}`` for every pair with
        predictions in the same group).
    """
    targets = [BenchTarget(role, Path(path), artifact_format(Path(path))) for role, path in models.items()] if isinstance(models, dict) else list(models)
    rows, predictions, by_file = [], {}, {}
    headline = _group(BACKENDS.get(cfg.backends[0]), _natural_format(cfg.backends[0]))
    for backend_name in cfg.backends:
        backend = BACKENDS.get(backend_name)
        for target in (t for t in targets if backend_runs(backend, t.format)):
            group = _group(backend, target.format)
            label = target.model if group == headline else f"{target.model} [{group}]"
            cached = by_file.get(target.path)  # accuracy does not depend on the backend: measure it once
            data = None if cached is not None else test_data
            row, found = _bench(target.path, cfg, data, label, mean, std, None, backend.name, target.format)
            if cached is not None:
                row.update({k: cached[0][k] for k in ("top1", "eval_samples") if k in cached[0]})
                found = cached[1]
            elif found is not None:
                by_file[target.path] = (row, found)
            row.update(model=target.model, group=group)
            rows.append(row)
            predictions[label] = found
    result = compare(rows, reference)
    for row in rows:
        ref = reference_row(rows, row, reference)
        ours, theirs = predictions.get(row["role"]), predictions.get(ref["role"]) if ref else None
        if ref is not None and ref is not row and ours is not None and theirs is not None:
            row["agreement_with_reference"] = result["ratios"][row["role"]]["agreement_with_reference"] = agreement(ours, theirs)
    result["agreement"] = {
        row["role"]: {
            other["role"]: agreement(predictions[row["role"]], predictions[other["role"]])
            for other in rows if other is not row and other.get("group") == row.get("group") and predictions.get(other["role"]) is not None
        }
        for row in rows if predictions.get(row["role"]) is not None
    }
    result["groups"] = list(dict.fromkeys([headline] + [row["group"] for row in rows]))
    result.update(config=dataclasses.asdict(cfg), machine=machine_info(), versions=versions())
    return result


def _natural_format(backend_name: str) -> str:
    return {"onnx": "onnx", "engine": "tensorrt", "checkpoint": "checkpoint"}[BACKENDS.get(backend_name).artifact]


def backend_runs(backend, fmt: str) -> bool:
    """Whether ``backend`` measures artifacts of format ``fmt``."""
    return {"onnx": fmt in ONNX_FORMATS, "engine": fmt == "tensorrt", "checkpoint": fmt == "checkpoint"}[backend.artifact]


def _group(backend, fmt: str) -> str:
    return backend.name if fmt == _natural_format(backend.name) else f"{backend.name}, {fmt}"


def compare(rows: list[dict], reference: str = "teacher") -> dict:
    """Ratios of every row against the reference row.

    A ratio is None when either side lacks the number (an error row, no test data, no
    reference). "Reduction" and "speedup" are > 1 when the row is smaller or faster.

    Args:
        rows: rows from :func:`bench_model`.
        reference: the role to compare against.

    A row is compared with the reference model's row of its own group (same backend and format).

    Returns:
        ``{"reference", "rows", "ratios": {role: {"speedup_b1", "speedup_throughput",
        "throughput_batch_size", "size_reduction", "params_reduction", "macs_reduction",
        "accuracy_delta", "agreement_with_reference"}}}`` for every role but the reference;
        ``speedup_b1`` is reference p50 / row p50 at batch 1, ``speedup_throughput`` row /
        reference images per second at the largest batch size both measured, and
        ``accuracy_delta`` (row - reference) top-1 in percentage points.
    """
    ratios = {row["role"]: _ratios(row, reference_row(rows, row, reference) or {}) for row in rows if row_model(row) != reference}
    return {"reference": reference, "rows": rows, "ratios": ratios}


def row_model(row: dict) -> str:
    """The model a row measures ("teacher", "student", ...; its role in results without groups)."""
    return row.get("model", row["role"])


def reference_row(rows: list[dict], row: dict, reference: str | None) -> dict | None:
    """The reference model's row measured like ``row`` (same backend group)."""
    return next((r for r in rows if row_model(r) == reference and r.get("group") == row.get("group")), None)


def _ratios(row: dict, ref: dict) -> dict:
    batch = _common_batch(row, ref)
    accuracy = (row.get("top1"), ref.get("top1"))
    return {
        "speedup_b1": _ratio(p50_ms(ref, 1), p50_ms(row, 1)),
        "speedup_throughput": _ratio(_throughput(row, batch), _throughput(ref, batch)),
        "throughput_batch_size": batch,
        "size_reduction": _ratio(ref.get("file_bytes"), row.get("file_bytes")),
        "params_reduction": _ratio(ref.get("params"), row.get("params")),
        "macs_reduction": _ratio(ref.get("macs"), row.get("macs")),
        "accuracy_delta": None if None in accuracy else accuracy[0] - accuracy[1],
        "agreement_with_reference": row.get("agreement_with_reference"),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def latency_entry(row: dict | None, batch_size: int | None) -> dict | None:
    """The successful latency measurement of a bench row at ``batch_size``, if there is one."""
    for entry in (row or {}).get("latency") or []:
        if entry.get("batch_size") == batch_size and entry.get("status") == "ok":
            return entry
    return None


def p50_ms(row: dict | None, batch_size: int) -> float | None:
    """A bench row's median latency (ms) at ``batch_size``; None when not measured."""
    entry = latency_entry(row, batch_size)
    return entry["latency_ms"]["p50"] if entry else None


def _throughput(row: dict, batch_size: int | None) -> float | None:
    entry = latency_entry(row, batch_size)
    return entry["throughput_ips"] if entry else None


def _ok_batches(row: dict) -> set[int]:
    return {e["batch_size"] for e in row.get("latency") or [] if e.get("status") == "ok"}


def _common_batch(row: dict, ref: dict) -> int | None:
    common = _ok_batches(row) & _ok_batches(ref)
    return max(common) if common else None


# --- context: machine and versions ----------------------------------------------------------


def machine_info() -> dict:
    """What the numbers were measured on: CPU model, cores, platform and the GPUs, if any."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_features": cpu_features().to_dict(),
        "gpus": _gpus(),
    }


def versions() -> dict:
    """Versions of what ran the benchmark; torch and tensorrt from their installed metadata
    (importing them would cost seconds and memory the ONNX-only path does not need)."""
    from importlib import metadata

    import onnx
    import onnxruntime

    found = {
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }
    for package in ("torch", "tensorrt"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def _gpus() -> list[dict]:
    """Name, driver and memory of each NVIDIA GPU, from nvidia-smi (empty without one)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory_mib": float(parts[2]) if parts[2].replace(".", "").isdigit() else None})
    return gpus


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- output ---------------------------------------------------------------------------------


def bench_table_markdown(result: dict) -> str:
    """Markdown tables, one per backend group (headline first): metrics as rows; the reference,
    then each model and its ratio, as columns.

    Args:
        result: :func:`compare`'s (or :func:`bench_models`') dict.

    Returns:
        The tables, plus one line on the machine when ``result`` has it.
    """
    groups = result.get("groups") or [None]
    sections = []
    for index, group in enumerate(groups):
        rows = [row for row in result["rows"] if row.get("group") == group]
        if not rows:
            continue
        table = _group_table(result, rows)
        sections.append(table if index == 0 else f"### {group}\n\n{table}")
    return "\n\n".join(sections) + _machine_note(result) + "\n"


def _group_table(result: dict, rows: list[dict]) -> str:
    """One group's table; columns are named after the model (the group is the table's heading)."""
    reference = next((row["role"] for row in rows if row_model(row) == result["reference"]), result["reference"])
    rows = sorted(rows, key=lambda row: row["role"] != reference)  # reference first
    batch = max((b for row in rows for b in _ok_batches(row)), default=None)
    name = {row["role"]: row_model(row) for row in rows}
    header = ["Metric"]
    for row in rows:
        header.append(name[row["role"]])
        if row["role"] != reference:
            header.append(f"{name[row['role']]} vs {name.get(reference, reference)}")
    lines = [_md_row(header), _md_row(["---"] + ["---:"] * (len(header) - 1))]
    metrics = _metrics(batch, name.get(reference, reference))
    if any(row.get("gpu_peak_mb") is not None for row in rows):
        metrics.insert(-2, ("GPU peak memory (MiB)", lambda row: row.get("gpu_peak_mb"), "{:.1f}", None, None))
    for label, value, fmt, ratio_key, ratio_fmt in metrics:
        cells = [label]
        for row in rows:
            cells.append(_cell(value(row), fmt))
            if row["role"] != reference:
                ratio = result["ratios"].get(row["role"], {}).get(ratio_key) if ratio_key else None
                cells.append(_cell(ratio, ratio_fmt) if ratio_key else "")
        lines.append(_md_row(cells))
    lines.insert(2, _md_row(["Status"] + _status_cells(rows, reference)))
    noisy = [f"{name[row['role']]} (batch {e['batch_size']})" for row in rows for e in row.get("latency") or [] if e.get("noisy")]
    note = f"\n\nNoisy timings (coefficient of variation over 10%): {', '.join(noisy)}. Re-run on a quiet machine." if noisy else ""
    return "\n".join(lines) + note


def _metrics(batch: int | None, reference: str) -> list[tuple[str, Callable, str, str | None, str | None]]:
    """(label with unit, value getter, format, ratio key, ratio format) per table row.

    A file with a static batch axis has no batch-1 or throughput-batch entry: its cells show
    what it was measured at, marked ``(batch N)``.
    """

    def latency(stat: str) -> Callable:
        return lambda row: _at(row, 1, lambda e: e.get("latency_ms", {}).get(stat), "{:.3f}")

    def mean_std(row: dict) -> str | None:
        def text(entry: dict) -> str | None:
            stats = entry.get("latency_ms", {})
            return f"{stats['mean']:.3f} ± {stats['std']:.3f}" if "mean" in stats and "std" in stats else None

        return _at(row, 1, text, "{}")

    def scaled(key: str, factor: float) -> Callable:
        return lambda row: None if row.get(key) is None else row[key] * factor

    return [
        ("File size (MiB)", scaled("file_bytes", 1 / 2**20), "{:.2f}", "size_reduction", "{:.2f}× smaller"),
        ("Parameters (M)", scaled("params", 1e-6), "{:.3f}", "params_reduction", "{:.2f}× fewer"),
        ("MACs, batch 1 (M)", scaled("macs", 1e-6), "{:.1f}", "macs_reduction", "{:.2f}× fewer"),
        ("Latency p50, batch 1 (ms)", latency("p50"), "{:.3f}", "speedup_b1", "{:.2f}× faster"),
        ("Latency p90, batch 1 (ms)", latency("p90"), "{:.3f}", None, None),
        ("Latency p95, batch 1 (ms)", latency("p95"), "{:.3f}", None, None),
        ("Latency p99, batch 1 (ms)", latency("p99"), "{:.3f}", None, None),
        ("Latency mean ± std, batch 1 (ms)", mean_std, "{}", None, None),
        ("Latency CV, batch 1 (%)", lambda row: _at(row, 1, _cv_cell, "{}"), "{}", None, None),
        (f"Throughput, batch {batch} (images/s)", lambda row: _at(row, batch, lambda e: e.get("throughput_ips"), "{:.1f}"), "{:.1f}", "speedup_throughput", "{:.2f}× faster"),
        ("Peak memory (MiB)", scaled("peak_rss_mb", 1.0), "{:.1f}", None, None),
        ("Model memory (MiB)", scaled("model_rss_mb", 1.0), "{:.1f}", None, None),
        ("Top-1 accuracy (%)", scaled("top1", 1.0), "{:.2f}", "accuracy_delta", "{:+.2f} pts"),
        (f"Top-1 agreement with {reference} (%)", scaled("agreement_with_reference", 100.0), "{:.2f}", None, None),
    ]


def _at(row: dict, batch_size: int | None, value: Callable[[dict], object], fmt: str):
    """``value`` of the row's entry at ``batch_size``; for a row measured only at other batch
    sizes (a static batch), that of its single measured batch, as text marked with it."""
    entry = latency_entry(row, batch_size)
    if entry is not None:
        return value(entry)
    measured = [e for e in row.get("latency") or [] if e.get("status") == "ok"]
    if len(measured) != 1:
        return None
    found = value(measured[0])
    return None if found is None else f"{fmt.format(found)} (batch {measured[0]['batch_size']})"


def _cv_cell(entry: dict | None) -> str | None:
    if not entry or entry.get("cv") is None:
        return None
    return f"{100 * entry['cv']:.1f}" + (" (noisy)" if entry.get("noisy") else "")


def _status_cells(rows: list[dict], reference: str) -> list[str]:
    cells = []
    for row in rows:
        cells.append("ok" if row["status"] == "ok" else f"error: {row['error']}")
        if row["role"] != reference:
            cells.append("")
    return cells


def _cell(value: float | str | None, fmt: str | None) -> str:
    if isinstance(value, str):  # already formatted (a static-batch entry)
        return value
    return "—" if value is None or fmt is None else fmt.format(value)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _machine_note(result: dict) -> str:
    machine, runtime = result.get("machine"), result.get("versions", {})
    if not machine:
        return ""
    threads = (result.get("config") or {}).get("threads")
    thread_note = f", {threads} thread{'s' if threads > 1 else ''}" if threads else ", default threads"
    gpus = "".join(f", {g['name']} (driver {g['driver']})" for g in machine.get("gpus") or [])
    torch_note = f", PyTorch {runtime['torch']}" if "torch" in runtime else ""
    trt_note = f", TensorRT {runtime['tensorrt']}" if "tensorrt" in runtime else ""
    features = _features_note(machine.get("cpu_features"))
    return (
        f"\n\nMeasured on {machine['cpu']} ({features}{machine['usable_cores']} usable cores{thread_note}){gpus}, "
        f"{machine['platform']}, ONNX Runtime {runtime.get('onnxruntime', '?')}{torch_note}{trt_note}."
    )


def _features_note(features: dict | None) -> str:
    if not features:
        return ""
    return CpuFeatures(features["arch"], tuple(features["flags"]), features["known"]).summary() + "; "


def write_bench(result: dict, folder: Path) -> tuple[Path, Path]:
    """Write ``bench.json`` and ``bench.md`` into ``folder``, each atomically.

    Args:
        result: :func:`bench_models`' (or :func:`compare`'s) dict.
        folder: destination; created if missing.

    Returns:
        ``(json_path, markdown_path)``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(folder / "bench.json", result)
    md_path = write_text_atomic(folder / "bench.md", bench_table_markdown(result))
    return json_path, md_path


# --- PyTorch latency (before/after a model stage) ---------------------------------------------


def measure_torch_latency(model, example, *, warmup: int = 5, iterations: int = 50, time_budget_s: float = 2.0) -> dict:
    """Latency of a PyTorch model on CPU: what a stage reports before and after it changes a model.

    Runs under ``torch.inference_mode()`` in eval mode (on a CPU copy when the model lives on a
    GPU), after ``warmup`` untimed runs; timed runs stop at ``iterations`` or, after at least 5,
    once ``time_budget_s`` is spent. Percentiles, not means: one scheduler hiccup must not move
    the number. The model's train/eval mode is restored afterwards.

    Args:
        model: a ``torch.nn.Module``.
        example: an input batch (e.g. ``(1, 3, 32, 32)`` for batch-1 latency).
        warmup: untimed runs first (allocator, oneDNN kernel selection).
        iterations: at most this many timed runs.
        time_budget_s: stop timing after this many seconds (with at least 5 runs).

    Returns:
        ``{"p50_ms", "p90_ms", "p99_ms", "runs"}``.
    """
    import copy
    import time

    import torch

    on_cpu = all(t.device.type == "cpu" for t in model.state_dict().values())
    target = model if on_cpu else copy.deepcopy(model).cpu()
    example = example.cpu()
    modes = {module: module.training for module in target.modules()}
    target.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                target(example)
            deadline = time.perf_counter() + time_budget_s
            while len(times) < iterations:
                start = time.perf_counter()
                target(example)
                times.append(time.perf_counter() - start)
                if len(times) >= 5 and time.perf_counter() >= deadline:
                    break
    finally:
        for module, training in modes.items():
            module.training = training
    p50, p90, p99 = np.percentile(np.asarray(times) * 1000.0, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "runs": len(times)}
