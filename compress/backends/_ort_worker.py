"""The child process that measures one ONNX model with ONNX Runtime (CPU).

Started by :func:`compress.backends.onnxruntime.measure` as ``python -m
compress.backends._ort_worker``: a JSON request on stdin, one JSON result on stdout. A fresh
process per model makes ``ru_maxrss`` (the peak resident memory) the runtime's and that model's
own, not whatever the parent had loaded before. For the same reason this module imports only the
standard library, numpy and onnxruntime: never torch, never the heavy ``compress`` modules.
Peak memory is read from /proc/self/status (VmHWM) on Linux; see ``_peak_rss_mb`` for why not
``ru_maxrss``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np
import onnxruntime as ort

MIN_RUNS = 5  # a time budget stops the timed loop only after this many runs
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def main() -> None:
    """Read the request, measure, write the result; errors become ``{"status": "error"}``."""
    result_fd = os.dup(1)
    os.dup2(2, 1)  # anything else printed (ORT's C++ logging included) goes to stderr, not our JSON
    try:
        result = measure(json.load(sys.stdin))
    except Exception as exc:
        result = {"status": "error", "error": _one_line(exc)}
    with os.fdopen(result_fd, "w") as out:
        json.dump(result, out)


def measure(request: dict) -> dict:
    """Latency per batch size plus the process's memory; see compress.backends.onnxruntime."""
    baseline = _peak_rss_mb()  # after imports, before the model is loaded
    session = _session(request["path"], request["threads"])
    rng = np.random.default_rng(request.get("seed", 0))
    batches = [_measure_batch(session, batch_size, request, rng) for batch_size in request["batch_sizes"]]
    peak = _peak_rss_mb()
    errors = [f"batch {b['batch_size']}: {b['error']}" for b in batches if b["status"] != "ok"]
    return {
        "status": "error" if errors else "ok",
        "error": "; ".join(errors) or None,
        "batches": batches,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "model_rss_mb": peak - baseline,
        "providers": session.get_providers(),
        "threads": request["threads"],
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "onnxruntime": ort.__version__,
    }


def _session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _measure_batch(session: ort.InferenceSession, batch_size: int, request: dict, rng) -> dict:
    try:
        feed = _random_feed(session, batch_size, rng)
        for _ in range(request["warmup"]):
            session.run(None, feed)
        times = _timed_runs(session, feed, request["iterations"], request["time_budget_s"])
    except Exception as exc:
        return {"batch_size": batch_size, "status": "error", "error": _one_line(exc)}
    return {"batch_size": batch_size, "status": "ok", **_summary(times, batch_size)}


def _random_feed(session: ort.InferenceSession, batch_size: int, rng) -> dict:
    feed = {}
    for value in session.get_inputs():
        rest = value.shape[1:]
        if not all(isinstance(d, int) for d in rest):
            raise ValueError(f"input {value.name!r} has dynamic axes besides the batch: {value.shape}")
        if value.type not in _DTYPES:
            raise ValueError(f"input {value.name!r} has type {value.type}; only float inputs are supported")
        shape = (batch_size, *rest)
        feed[value.name] = rng.standard_normal(shape, dtype=np.float32).astype(_DTYPES[value.type])
    return feed


def _timed_runs(session, feed: dict, iterations: int, budget_s: float | None) -> list[float]:
    """Seconds per run, until ``iterations`` runs or (after MIN_RUNS) the budget is spent."""
    times: list[float] = []
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    while len(times) < iterations:
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
        if deadline is not None and len(times) >= MIN_RUNS and time.perf_counter() >= deadline:
            break
    return times


NOISY_CV = 0.10  # above this the machine was busy (or the run too short): the row is flagged


def _summary(times: list[float], batch_size: int) -> dict:
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


def _peak_rss_mb() -> float:
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
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


if __name__ == "__main__":
    main()
