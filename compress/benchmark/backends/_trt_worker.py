"""The child process that measures one TensorRT engine (TensorRT 10 name-based tensor API).

Started by :func:`compress.benchmark.backends.tensorrt.measure` as ``python -m
compress.benchmark.backends._trt_worker``: a JSON request on stdin, one JSON result on stdout (see
:func:`compress.benchmark.backends.child.serve`). The I/O buffers are PyTorch CUDA tensors and the
runs go
on a dedicated PyTorch CUDA stream, timed with CUDA events recorded on it. The memory baseline
is taken after torch and tensorrt are imported and before CUDA is initialised or the engine is
read.

Unverified on real hardware until a GPU session runs the test marked ``tensorrt``: see
:mod:`compress.benchmark.backends.tensorrt`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress.benchmark.backends.child import error, serve
from compress.benchmark.backends.timing import (
    gpu_memory_mb,
    measured,
    one_line,
    peak_rss_mb,
    summarize,
    timed_runs,
)
from compress.exporters.tensorrt import INSTALL_HINT
from compress.exporters.tensorrt_engine import (
    bind,
    device_memory_bytes,
    io_tensors,
    load_engine,
    profile_batch,
)


def measure(request: dict) -> dict:
    """Latency per batch size plus the process's memory; see
    compress.benchmark.backends.tensorrt."""
    try:
        import tensorrt as trt
    except ImportError:
        return error(
            "the tensorrt backend needs the tensorrt package, which is not installed; "
            f"{INSTALL_HINT}"
        )
    baseline = peak_rss_mb()  # after imports, before CUDA and the engine
    if not torch.cuda.is_available():
        return error(
            f"TensorRT engines run on an NVIDIA GPU, and this PyTorch ({torch.__version__}) sees "
            "no usable CUDA device"
        )
    torch.cuda.init()  # TensorRT then shares PyTorch's (primary) CUDA context
    runtime, engine = load_engine(trt, Path(request["path"]))
    context = engine.create_execution_context()
    if context is None:
        raise RuntimeError(
            f"{Path(request['path']).name}: TensorRT could not create an execution context "
            "(out of GPU memory?)"
        )
    io = io_tensors(trt, engine)
    profile = profile_batch(engine, io)
    stream = torch.cuda.Stream()
    batches = [
        _measure_batch(context, io, profile, stream, batch_size, request)
        for batch_size in request["batch_sizes"]
    ]
    device_memory = device_memory_bytes(engine)
    process_mb = gpu_memory_mb()
    estimate_mb = (device_memory + torch.cuda.max_memory_allocated()) / 2**20
    del context, engine, runtime  # TensorRT objects go before the runtime that made them
    return measured(batches, baseline) | {
        "gpu_peak_mb": process_mb if process_mb is not None else estimate_mb,
        "gpu_memory_source": "nvml" if process_mb is not None else "estimate",
        "device": "cuda",
        "gpu": torch.cuda.get_device_name(),
        "threads": request["threads"],
        "tensorrt": trt.__version__,
        "engine": {
            "profile_batch": list(profile),
            "inputs": {name: list(shape) for name, (is_input, shape, _) in io.items() if is_input},
            "outputs": {
                name: list(shape) for name, (is_input, shape, _) in io.items() if not is_input
            },
            "device_memory_mb": device_memory / 2**20,
        },
    }


def _measure_batch(
    context, io: dict, profile: tuple[int, int, int], stream, batch_size: int, request: dict
) -> dict:
    try:
        if not profile[0] <= batch_size <= profile[2]:
            raise ValueError(
                f"batch {batch_size} is outside the engine's optimisation profile (batch "
                f"{profile[0]} to {profile[2]}); rebuild the engine with export.engine_batch "
                "covering it"
            )
        buffers = bind(context, io, batch_size)  # kept alive while the engine reads them
        torch.cuda.synchronize()  # the inputs were written on the default stream

        def run_once() -> None:
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("execute_async_v3 failed (see the TensorRT log)")

        for _ in range(request["warmup"]):
            run_once()
        stream.synchronize()
        times = timed_runs(
            run_once, request["iterations"], request["time_budget_s"], clock=_event_clock(stream)
        )
        del buffers
    except Exception as exc:
        return {"batch_size": batch_size, "status": "error", "error": one_line(exc)}
    return {"batch_size": batch_size, "status": "ok", **summarize(times, batch_size)}


def _event_clock(stream):
    """A clock for timed_runs: CUDA events on ``stream`` around one run (the stream was idle)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def clock(run_once) -> float:
        start.record(stream)
        run_once()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    return clock


if __name__ == "__main__":
    serve(measure)
