"""The child process that measures one ONNX model with ONNX Runtime (CPU or CUDA provider).

Started by :func:`compress.benchmark.backends.onnxruntime.measure` as ``python -m
compress.benchmark.backends._ort_worker``: a JSON request on stdin, one JSON result on stdout (see
:func:`compress.benchmark.backends.child.serve`). It imports only the standard library, numpy and
onnxruntime (never torch, never the heavy ``compress`` modules), so the memory it reports is the
runtime's and the model's own.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from compress.benchmark.backends.child import serve
from compress.benchmark.backends.timing import (
    gpu_memory_mb,
    measured,
    one_line,
    peak_rss_mb,
    summarize,
    timed_runs,
)

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def measure(request: dict) -> dict:
    """Latency per batch size plus the process's memory; see
    compress.benchmark.backends.onnxruntime."""
    baseline = peak_rss_mb()  # after imports, before the model is loaded
    provider = request.get("provider", "CPUExecutionProvider")
    session = _session(request["path"], request["threads"], provider)
    rng = np.random.default_rng(request.get("seed", 0))
    batches = [
        _measure_batch(session, batch_size, request, rng) for batch_size in request["batch_sizes"]
    ]
    return measured(batches, baseline) | {
        "gpu_peak_mb": gpu_memory_mb() if provider == "CUDAExecutionProvider" else None,
        "device": "cuda" if provider == "CUDAExecutionProvider" else "cpu",
        "providers": session.get_providers(),
        "threads": request["threads"],
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "onnxruntime": ort.__version__,
    }


def _session(path: str, threads: int, provider: str) -> ort.InferenceSession:
    if provider not in ort.get_available_providers():
        raise RuntimeError(
            f"{provider} is not available in this onnxruntime build "
            f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a machine "
            "with CUDA"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    providers = (
        [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    )
    return ort.InferenceSession(path, options, providers=providers)


def _measure_batch(session: ort.InferenceSession, batch_size: int, request: dict, rng) -> dict:
    try:
        feed = _random_feed(session, batch_size, rng)
        for _ in range(request["warmup"]):
            session.run(None, feed)
        times = timed_runs(
            lambda: session.run(None, feed), request["iterations"], request["time_budget_s"]
        )
    except Exception as exc:
        return {"batch_size": batch_size, "status": "error", "error": one_line(exc)}
    return {"batch_size": batch_size, "status": "ok", **summarize(times, batch_size)}


def _random_feed(session: ort.InferenceSession, batch_size: int, rng) -> dict:
    feed = {}
    for value in session.get_inputs():
        batch, rest = value.shape[0], value.shape[1:]
        if not all(isinstance(d, int) for d in rest):
            raise ValueError(
                f"input {value.name!r} has dynamic axes besides the batch: {value.shape}"
            )
        if isinstance(batch, int) and batch != batch_size:
            raise ValueError(
                f"input {value.name!r} has a static batch of {batch}; export with a dynamic batch "
                f"to measure {batch_size}"
            )
        if value.type == "tensor(uint8)":  # quantized activations (latency table cells)
            feed[value.name] = rng.integers(0, 256, (batch_size, *rest), dtype=np.uint8)
            continue
        if value.type not in _DTYPES:
            raise ValueError(
                f"input {value.name!r} has type {value.type}; only float and uint8 inputs are "
                "supported"
            )
        feed[value.name] = rng.standard_normal((batch_size, *rest), dtype=np.float32).astype(
            _DTYPES[value.type]
        )
    return feed


if __name__ == "__main__":
    serve(measure)
