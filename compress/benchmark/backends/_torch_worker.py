"""The child process that measures one stage's PyTorch network, eager or ``torch.compile``d.

Started by :func:`compress.benchmark.backends.torch.measure` as ``python -m
compress.benchmark.backends._torch_worker``: a JSON request on stdin, one JSON result on stdout (see
:func:`compress.benchmark.backends.child.serve`). The memory baseline is taken after torch and the
``compress`` modules that rebuild the network are imported and before the network is built, so
``model_rss_mb`` is what building and running the network cost.
"""

from __future__ import annotations

import time

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
from compress.nets.rebuild import StageNetwork, load_stage_network


def measure(request: dict) -> dict:
    """Latency per batch size plus the process's memory; see compress.benchmark.backends.torch."""
    baseline = peak_rss_mb()  # after imports, before the network is built
    device, compiled = request.get("device", "cpu"), bool(request.get("compile", False))
    if device == "cuda" and not torch.cuda.is_available():
        return error(
            f"device cuda was asked for, but this PyTorch ({torch.__version__}) sees no usable "
            "CUDA device; use the CPU backend or a machine with an NVIDIA GPU"
        )
    if request["threads"] > 0:
        torch.set_num_threads(request["threads"])
    model, network = load_stage_network(request["path"])
    if device == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        model = model.to("cuda", memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(request.get("seed", 0))
    batches = [
        _measure_batch(model, batch_size, network, request, generator)
        for batch_size in request["batch_sizes"]
    ]
    cuda = device == "cuda"
    return measured(batches, baseline) | {
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "gpu_process_mb": gpu_memory_mb() if cuda else None,
        "device": device,
        "threads": request["threads"],
        "torch": torch.__version__,
        "compile": compiled,
        "compile_s": sum(b.get("compile_s", 0.0) for b in batches) if compiled else None,
        "network": {
            "stage": network.stage,
            "model": network.spec.model,
            "image_size": network.image_size,
            "in_channels": network.in_channels,
            "quantized": network.spec.quantized,
        },
    }


def _measure_batch(
    model, batch_size: int, network: StageNetwork, request: dict, generator: torch.Generator
) -> dict:
    cuda, compiled = request.get("device") == "cuda", bool(request.get("compile", False))
    point: dict = {"batch_size": batch_size}  # JSON for the parent's LatencyPoint
    try:
        shape = (batch_size, network.in_channels, network.image_size, network.image_size)
        x = torch.randn(shape, generator=generator)
        if cuda:
            x = x.to("cuda", memory_format=torch.channels_last)
        sync = torch.cuda.synchronize if cuda else _no_sync
        warmup = request["warmup"]
        with torch.inference_mode():
            if compiled:  # the first call compiles this batch size's graph: a warm-up timed apart
                model = _compiled(model)
                start = time.perf_counter()
                model(x)
                sync()
                point["compile_s"] = time.perf_counter() - start
                warmup -= 1
            for _ in range(warmup):
                model(x)
            sync()
            times = timed_runs(
                lambda: model(x),
                request["iterations"],
                request["time_budget_s"],
                clock=_cuda_clock if cuda else None,
            )
    except Exception as exc:
        return {"batch_size": batch_size, "status": "error", "error": one_line(exc)}
    return point | {"status": "ok", **summarize(times, batch_size)}


def _compiled(model):
    """``torch.compile`` for one batch size: a static graph specialised to it, compiled from a
    clean state (so no batch size counts against dynamo's recompile limit and falls back to eager;
    inductor's on-disk cache may still shorten the compilation)."""
    torch.compiler.reset()
    return torch.compile(model, dynamic=False)


def _cuda_clock(run_once) -> float:
    """Seconds of one run on the GPU, from CUDA events around it (the GPU was idle before)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run_once()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def _no_sync() -> None:
    pass


if __name__ == "__main__":
    serve(measure)
