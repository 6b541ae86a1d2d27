"""The "torch", "torch-compile" and their "-cuda" bench backends: a stage's checkpoint in PyTorch.

What they measure is the network before export: a stage folder of a run (``stage.json`` +
``model.pt``), rebuilt by :func:`compress.nets.rebuild.load_stage_network` (weights loaded
with ``weights_only=True``, so a checkpoint that would run code is refused, never executed).
Eager PyTorch is the baseline an exported model is compared with; ``torch.compile`` shows how
much of the gap a compiler closes without leaving PyTorch. A quantized (QAT) stage runs as its
fake-quantized graph: slow, because fake quantization is float math plus rounding; the real
INT8 speed is the exported model's.

Measured in a child process (see :mod:`compress.benchmark.backends.child` for why).
This module must stay import-light (no torch): the parent imports it to start the child.
"""

from __future__ import annotations

from pathlib import Path

from compress.benchmark.backends.child import measure_in_child

WORKER_MODULE = "compress.benchmark.backends._torch_worker"
DEVICES = ("cpu", "cuda")
COMPILE_STARTUP_S = 600.0  # torch.compile's first call per batch size: inductor codegen + C++ build


def measure(
    path: Path,
    *,
    batch_sizes: list[int],
    warmup: int,
    iterations: int,
    time_budget_s: float | None,
    threads: int,
    device: str = "cpu",
    compile: bool = False,
    timeout_s: float | None = None,
) -> dict:
    """Measure latency, throughput and memory of a stage's PyTorch network in a fresh process.

    Per batch size: a random normal input under ``torch.inference_mode()``, ``warmup`` untimed
    runs, then timed runs until ``iterations`` runs or, after at least 5 runs,
    ``time_budget_s`` is spent. On CUDA the model and input are ``channels_last`` and each run
    is timed with CUDA events (the clock waits for the GPU). With ``compile`` the network is
    compiled afresh for each batch size (``torch.compiler.reset()``, then
    ``torch.compile(dynamic=False)``: a graph specialised to that batch, as a deployment at a
    fixed batch would use): its first call compiles, is never among the timed runs, and its
    seconds are that batch's ``compile_s`` (compilation plus one run; it counts as one of the
    ``warmup`` runs, and is made even when ``warmup`` is 0). Inductor's on-disk cache can make
    a repeated compilation much shorter.

    Example:
        >>> measure("exported/quickstart/distill", batch_sizes=[1, 32], warmup=5,
        ...         iterations=100, time_budget_s=5.0, threads=0)["batches"][0]["latency_ms"]["p50"]

    Args:
        path: a stage folder of a run holding a network (``exported/<run>/<stage>``) or its
            ``stage.json``.
        batch_sizes: batch sizes to measure, in order.
        warmup: untimed runs before timing each batch size.
        iterations: most timed runs per batch size.
        time_budget_s: seconds after which timing a batch size stops early; None: no limit.
        threads: ``torch.set_num_threads``; 0 keeps PyTorch's default.
        device: "cpu" or "cuda" (which must be available: the result is an error rather than
            a silent CPU fallback).
        compile: measure ``torch.compile(model)`` instead of eager mode.
        timeout_s: wall-clock limit for the whole child process; None: derived from the budget,
            with extra startup time for compilation.

    Returns:
        ``{"status": "ok"|"error", "error": str|None, "batches": [{"batch_size", "status",
        "latency_ms": {"p50", "p90", "p95", "p99", "mean", "std", "min", "max"}, "cv", "noisy",
        "runs", "total_s", "throughput_ips"} (+ "compile_s" when compiled), ...],
        "peak_rss_mb", "baseline_rss_mb", "model_rss_mb", "gpu_peak_mb" (CUDA: the peak of
        PyTorch's allocator, weights + activations, without the CUDA context; else None),
        "gpu_process_mb" (CUDA with NVML: what the driver reports for the process, context
        included, comparable with ONNX Runtime's ``gpu_peak_mb``), "device", "threads", "torch",
        "compile", "compile_s" (total over batch sizes, None in eager mode), "network"
        ({"stage", "model", "image_size", "in_channels", "quantized"})}``. A batch size that
        fails has ``"status": "error"`` and ``"error"``. When the child cannot load the network,
        cannot use the device or crashes, only ``status`` and ``error`` are present. Never raises
        for a broken model.
    """
    if device not in DEVICES:
        return {"status": "error", "error": f"device must be one of {DEVICES}, got {device!r}"}
    return measure_in_child(
        WORKER_MODULE,
        path,
        batch_sizes=batch_sizes,
        warmup=warmup,
        iterations=iterations,
        time_budget_s=time_budget_s,
        threads=threads,
        timeout_s=timeout_s,
        startup_s=120.0 + (COMPILE_STARTUP_S * len(batch_sizes) if compile else 0.0),
        device=device,
        compile=bool(compile),
    )
