"""The "onnxruntime" and "onnxruntime-cuda" bench backends: an ONNX file in a fresh ONNX Runtime.

Measured in a child process (see :mod:`compress.benchmark.backends.child` for why) that imports only
numpy and onnxruntime, so ``model_rss_mb`` (peak minus the worker's peak right before the
session is created) is what loading and running the model cost. On CUDA the worker also reads
the GPU memory the process holds (NVML, when ``nvidia-ml-py`` is installed).

This module must stay import-light: the child imports it through ``compress.benchmark.backends``.
"""

from __future__ import annotations

from pathlib import Path

from compress.benchmark.backends.child import measure_in_child, run_child

WORKER_MODULE = "compress.benchmark.backends._ort_worker"
TABLE_WORKER_MODULE = "compress.benchmark.backends._ort_table_worker"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def measure(
    path: Path,
    *,
    batch_sizes: list[int],
    warmup: int,
    iterations: int,
    time_budget_s: float | None,
    threads: int,
    device: str = "cpu",
    timeout_s: float | None = None,
) -> dict:
    """Measure latency, throughput and memory of an ONNX model in a fresh process.

    Per batch size: a random normal input, ``warmup`` untimed runs, then timed runs
    (``time.perf_counter`` around each ``session.run``, which returns only once the outputs are
    on the host, so CUDA timings are synchronised) until ``iterations`` runs or, after at least
    5 runs, ``time_budget_s`` is spent.

    Args:
        path: the ``.onnx`` file.
        batch_sizes: batch sizes to measure, in order (a static batch axis allows only its own).
        warmup: untimed runs before timing each batch size.
        iterations: most timed runs per batch size.
        time_budget_s: seconds after which timing a batch size stops early; None: no limit.
        threads: ONNX Runtime intra-op threads; 0 keeps its default (one per physical core).
        device: "cpu" (CPUExecutionProvider) or "cuda" (CUDAExecutionProvider, which must be
            available: the row is an error rather than a silent CPU fallback).
        timeout_s: wall-clock limit for the whole child process; None: derived from the budget.

    Returns:
        ``{"status": "ok"|"error", "error": str|None, "batches": [{"batch_size", "status",
        "latency_ms": {"p50", "p90", "p95", "p99", "mean", "std", "min", "max"}, "cv", "noisy",
        "runs", "total_s", "throughput_ips"}, ...], "peak_rss_mb", "baseline_rss_mb",
        "model_rss_mb", "gpu_peak_mb" (CUDA with NVML, else None), "device", "providers",
        "threads", "graph_optimization_level", "onnxruntime"}``. A batch size that fails has
        ``"status": "error"`` and ``"error"``. When the child cannot load the model or crashes,
        only ``status`` and ``error`` are present. Never raises for a broken model.
    """
    return measure_in_child(
        WORKER_MODULE,
        path,
        batch_sizes=batch_sizes,
        warmup=warmup,
        iterations=iterations,
        time_budget_s=time_budget_s,
        threads=threads,
        timeout_s=timeout_s,
        provider=PROVIDERS[device],
    )


def measure_each(
    paths: list[Path],
    *,
    batch_size: int,
    threads: int,
    rounds: int = 5,
    runs: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    timeout_s: float | None = None,
) -> dict:
    """Latency of each of many small ONNX files, all in ONE fresh process, interleaved in rounds
    (see :mod:`compress.benchmark.backends._ort_table_worker` for why one process).

    Args:
        paths: the ``.onnx`` files (each with one float input whose batch axis is dynamic).
        batch_size: the batch every file runs at.
        threads: intra-op threads; 0 keeps ONNX Runtime's default.
        rounds: visits of every file; its value is the median of its round medians.
        runs: timed runs per visit.
        warmup: untimed runs before each visit.
        device: "cpu" or "cuda".
        timeout_s: wall-clock limit for the child; None: none.

    Returns:
        ``{"status": "ok", "ms": [...], "spread": [...]}`` (one value per path, in order) or
        ``{"status": "error", "error": one line}``. Never raises.
    """
    request = {
        "paths": [str(Path(p).resolve()) for p in paths],
        "batch_size": int(batch_size),
        "threads": int(threads),
        "rounds": int(rounds),
        "runs": int(runs),
        "warmup": int(warmup),
        "provider": PROVIDERS[device],
    }
    return run_child(TABLE_WORKER_MODULE, request, timeout_s)
