"""What every bench backend's child process shares: the timed loop, its summary, peak memory.

Import-light on purpose (standard library and numpy only): the measuring children import it
before they import their runtime, so the memory baseline they record is not inflated by it.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable

import numpy as np

from compress.errors import first_line

MIN_RUNS = 5  # a time budget stops the timed loop only after this many runs
NOISY_CV = 0.10  # above this the machine was busy (or the run too short): the row is flagged


def timed_runs(
    run_once: Callable[[], object],
    iterations: int,
    budget_s: float | None,
    clock: Callable[[Callable], float] | None = None,
) -> list[float]:
    """Seconds per run, until ``iterations`` runs or (after MIN_RUNS) the budget is spent.

    Args:
        run_once: one inference.
        iterations: most timed runs.
        budget_s: wall-clock seconds after which timing stops early; None: no limit.
        clock: times one call of ``run_once`` and returns seconds; the default wraps it in
            ``time.perf_counter``. GPU backends pass one that synchronises (CUDA events).
    """
    clock = clock or _wall_clock
    times: list[float] = []
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    while len(times) < iterations:
        times.append(clock(run_once))
        if deadline is not None and len(times) >= MIN_RUNS and time.perf_counter() >= deadline:
            break
    return times


def _wall_clock(run_once: Callable[[], object]) -> float:
    start = time.perf_counter()
    run_once()
    return time.perf_counter() - start


def summarize(times: list[float], batch_size: int) -> dict:
    """Percentiles, mean/std, coefficient of variation and throughput of one batch size's runs."""
    ms = np.asarray(times) * 1000.0
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    total = float(np.sum(times))
    cv = float(ms.std() / ms.mean()) if ms.mean() > 0 else 0.0
    return {
        "latency_ms": {
            "p50": float(p50),
            "p90": float(p90),
            "p95": float(p95),
            "p99": float(p99),
            "mean": float(ms.mean()),
            "std": float(ms.std()),
            "min": float(ms.min()),
            "max": float(ms.max()),
        },
        "cv": cv,  # coefficient of variation of the timed runs
        "noisy": cv > NOISY_CV,
        "runs": len(times),
        "total_s": total,
        "throughput_ips": batch_size * len(times) / total,
    }


def measured(batches: list[dict], baseline_rss_mb: float) -> dict:
    """The keys every backend's result starts with: status (error when any batch size failed),
    the batches, and the process's peak memory over the baseline taken before the model loaded."""
    peak = peak_rss_mb()
    errors = [f"batch {b['batch_size']}: {b['error']}" for b in batches if b["status"] != "ok"]
    return {
        "status": "error" if errors else "ok",
        "error": "; ".join(errors) or None,
        "batches": batches,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline_rss_mb,
        "model_rss_mb": peak - baseline_rss_mb,
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    On Linux, VmHWM of /proc/self/status, not ``ru_maxrss``: the kernel carries ``ru_maxrss``
    over from the parent across fork + exec, so a child of a 2 GB parent would report 2 GB.
    VmHWM belongs to the address space that exec created: this process's own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # bytes on macOS, KiB elsewhere
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, at most 300 characters."""
    return f"{type(exc).__name__}: {first_line(exc)}"[:300]


def gpu_memory_mb() -> float | None:
    """GPU memory this process holds now, in MiB, read through NVML (``nvidia-ml-py``).

    For runtimes that allocate outside PyTorch (ONNX Runtime's CUDA provider, TensorRT): what
    the driver reports for this process id is what the model costs on the GPU. None when NVML
    is not installed or the process is not on the GPU.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            total = 0
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == os.getpid() and proc.usedGpuMemory:
                        total += proc.usedGpuMemory
            return total / 2**20 if total else None
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None


def torch_latency(
    model, example, *, warmup: int = 5, iterations: int = 50, time_budget_s: float = 2.0
) -> dict:
    """Latency of a PyTorch model on CPU, in this process: what the prune stage reports before and
    after it changes a network (the bench measures in child processes instead).

    Runs under ``torch.inference_mode()`` in eval mode (on a CPU copy when the model lives on a
    GPU) after ``warmup`` untimed runs, with :func:`timed_runs`; every module's mode is restored.

    Returns:
        ``{"p50_ms", "p90_ms", "p99_ms", "runs"}``.
    """
    import copy

    import torch

    from compress.nets.modes import evaluating

    on_cpu = all(t.device.type == "cpu" for t in model.state_dict().values())
    target = model if on_cpu else copy.deepcopy(model).cpu()
    example = example.cpu()
    with evaluating(target), torch.inference_mode():
        for _ in range(warmup):
            target(example)
        times = timed_runs(lambda: target(example), iterations, time_budget_s)
    p50, p90, p99 = np.percentile(np.asarray(times) * 1000.0, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "runs": len(times)}
