"""The "tensorrt" bench backend: a serialized TensorRT engine (``.engine``) on the GPU.

The engine is one built by :func:`compress.exporters.tensorrt.build_engine` (one optimisation
profile over the batch axis). It is measured in a child process (see
:mod:`compress.benchmark.backends.child` for why) with the TensorRT 10 name-based API: the engine is
deserialized, each input's shape set with ``set_input_shape``, every I/O tensor bound with
``set_tensor_address`` to a PyTorch CUDA tensor (torch is a core dependency; no pycuda), and
each run is one ``execute_async_v3`` on a dedicated CUDA stream, timed with CUDA events on that
stream.

Unverified on real hardware: written from the TensorRT 10 Python API documentation on a machine
without a GPU or tensorrt. It stays so until a GPU session runs the test marked ``tensorrt`` in
``tests/test_backends.py`` (which builds a tiny engine and measures it).

This module must stay import-light (no torch, no tensorrt): the parent imports it to start the
child.
"""

from __future__ import annotations

from pathlib import Path

from compress.benchmark.backends.child import measure_in_child

WORKER_MODULE = "compress.benchmark.backends._trt_worker"


def measure(
    path: Path,
    *,
    batch_sizes: list[int],
    warmup: int,
    iterations: int,
    time_budget_s: float | None,
    threads: int,
    timeout_s: float | None = None,
) -> dict:
    """Measure latency, throughput and memory of a TensorRT engine in a fresh process.

    Per batch size: the inputs' shapes set to that batch, random normal inputs already on the
    GPU (host-device copies are not timed, as in ``trtexec --noDataTransfers``), ``warmup``
    untimed runs, then timed runs (CUDA events around each ``execute_async_v3``) until
    ``iterations`` runs or, after at least 5 runs, ``time_budget_s`` is spent. A batch size
    outside the engine's optimisation profile is an error row naming the profile's range.

    Args:
        path: the ``.engine`` file (built by this machine's TensorRT version for this GPU).
        batch_sizes: batch sizes to measure, in order.
        warmup: untimed runs before timing each batch size.
        iterations: most timed runs per batch size.
        time_budget_s: seconds after which timing a batch size stops early; None: no limit.
        threads: recorded only (TensorRT runs on the GPU; it has no CPU thread setting).
        timeout_s: wall-clock limit for the whole child process; None: derived from the budget.

    Returns:
        ``{"status": "ok"|"error", "error": str|None, "batches": [{"batch_size", "status",
        "latency_ms": {"p50", "p90", "p95", "p99", "mean", "std", "min", "max"}, "cv", "noisy",
        "runs", "total_s", "throughput_ips"}, ...], "peak_rss_mb", "baseline_rss_mb",
        "model_rss_mb", "gpu_peak_mb", "gpu_memory_source" ("nvml": what the driver reports
        for the process, CUDA context included, as ONNX Runtime's; "estimate" without
        ``nvidia-ml-py``: the engine's activation memory plus the I/O buffers, weights and
        context not counted), "device" ("cuda"), "gpu", "threads", "tensorrt", "engine"
        ({"profile_batch": [min, opt, max], "inputs": {name: shape}, "outputs": {name: shape},
        "device_memory_mb"})}``. A batch size that fails has ``"status": "error"`` and
        ``"error"``. Without tensorrt, without a CUDA device, for an engine that does not
        deserialize or a crashed child, only ``status`` and ``error`` are present. Never raises
        for a broken engine.
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
    )
