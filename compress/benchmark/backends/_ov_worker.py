"""The child process that measures one ONNX model with OpenVINO on the CPU.

Started by :func:`compress.benchmark.backends.openvino.measure` as ``python -m
compress.benchmark.backends._ov_worker``: a JSON request on stdin, one JSON result on stdout (see
:func:`compress.benchmark.backends.child.serve`). It imports only the standard library, numpy and
openvino (never torch, never onnxruntime, never the heavy ``compress`` modules), so the memory
it reports is the runtime's and the model's own. openvino is imported inside :func:`measure`,
so a missing package is a one-line error result rather than a crash.
"""

from __future__ import annotations

import numpy as np

from compress.benchmark.backends.child import error, serve
from compress.benchmark.backends.openvino import (
    DEVICE,
    MISSING,
    compile_settings,
    integer_layers,
    layer_precisions,
    ov_message,
    recorded_properties,
    with_batch,
)
from compress.benchmark.backends.timing import measured, peak_rss_mb, summarize, timed_runs


def measure(request: dict) -> dict:
    """Latency per batch size plus the process's memory; see
    compress.benchmark.backends.openvino."""
    try:
        import openvino as ov
    except ImportError:
        return error(MISSING)
    baseline = peak_rss_mb()  # after imports, before the model is read
    core = ov.Core()
    try:
        core.read_model(request["path"])  # a file it cannot read fails the row, not each batch
    except RuntimeError as exc:
        return error(ov_message(exc))
    rng = np.random.default_rng(request.get("seed", 0))
    runtime: dict = {}
    batches = [
        _measure_batch(ov, core, batch_size, request, rng, runtime)
        for batch_size in request["batch_sizes"]
    ]
    return (
        measured(batches, baseline)
        | {
            "gpu_peak_mb": None,
            "device": "cpu",
            "threads": request["threads"],
            "openvino": ov.get_version(),
            "cpu": core.get_property(DEVICE, "FULL_DEVICE_NAME"),
        }
        | runtime
    )


def _measure_batch(ov, core, batch_size: int, request: dict, rng, runtime: dict) -> dict:
    """One batch size; the first compiled model's settings and layer precisions go into
    ``runtime``."""
    try:
        model = with_batch(ov, core.read_model(request["path"]), batch_size)
        compiled = core.compile_model(model, DEVICE, compile_settings(ov, request["threads"]))
        if not runtime:
            precisions = layer_precisions(compiled)
            runtime.update(
                properties=recorded_properties(compiled),
                layer_precisions=precisions,
                matmul_layers=integer_layers(precisions),
            )
        infer = compiled.create_infer_request()
        feed = {
            index: rng.standard_normal(tuple(value.get_shape()), dtype=np.float32).astype(
                value.get_element_type().to_dtype()
            )
            for index, value in enumerate(compiled.inputs)
        }
        for _ in range(request["warmup"]):
            infer.infer(feed, share_inputs=True)
        times = timed_runs(
            lambda: infer.infer(feed, share_inputs=True),
            request["iterations"],
            request["time_budget_s"],
        )
    except Exception as exc:
        return {"batch_size": batch_size, "status": "error", "error": ov_message(exc)}
    return {"batch_size": batch_size, "status": "ok", **summarize(times, batch_size)}


if __name__ == "__main__":
    serve(measure)
