"""The torch and TensorRT bench backends: result shape, timing, memory, and every way to fail.

The torch backend measures a stage folder of a run; the fixtures write real ones with the
pipeline's own helpers (save_weights, record_stage). TensorRT runs only where the package and
a GPU exist (marked ``tensorrt``); elsewhere its error says how to get it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.benchmark.backend_table import BACKENDS
from compress.benchmark.backends import tensorrt as trt_backend
from compress.benchmark.backends import torch as torch_backend
from compress.benchmark.backends.child import child_env
from compress.core.records import NetworkSpec, QuantSpec
from compress.nets.models import build_model
from compress.nets.weights import save_weights
from compress.pipeline.artifacts import Artifact, record_stage

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
IMAGE_SIZE = 8
ARCH = NetworkSpec(model="cifar:resnet20", num_classes=10, cifar_stem=True)  # as stages record it
LATENCY_KEYS = {"p50", "p90", "p95", "p99", "mean", "std", "min", "max"}
BATCH_KEYS = {
    "batch_size",
    "status",
    "latency_ms",
    "cv",
    "noisy",
    "runs",
    "total_s",
    "throughput_ips",
}
COMMON_KEYS = {
    "status",
    "error",
    "batches",
    "peak_rss_mb",
    "baseline_rss_mb",
    "model_rss_mb",
    "gpu_peak_mb",
    "device",
    "threads",
}
FAST = {"warmup": 1, "iterations": 20, "time_budget_s": 0.3, "threads": 1}


def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ARCH.model, num_classes=ARCH.num_classes, cifar_stem=ARCH.cifar_stem).eval()


def write_stage(run_dir: Path, name: str, model: torch.nn.Module, spec: NetworkSpec) -> Path:
    """A finished stage folder ``run_dir/name`` holding ``model``, as the pipeline writes one."""
    folder = run_dir / name
    weights = save_weights(model, folder / "model.pt")
    artifact = Artifact(stage=name, files={"model": weights}, role="student", network=spec)
    record_stage(folder, run_dir, artifact, config={}, recipe={"data": {"image_size": IMAGE_SIZE}})
    return folder


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Path:
    """A float cifar:resnet20 stage at 8x8 (random weights: only speed is measured)."""
    return write_stage(tmp_path_factory.mktemp("run"), "distill", network(), ARCH)


@pytest.fixture(scope="module")
def qat_stage(tmp_path_factory) -> Path:
    """The same network fake-quantized (QAT graph, uncalibrated scales), as quantize writes it."""
    from compress.quantization.fake_quant import prepare_quantized

    example = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    model = prepare_quantized(network(), target="onnxruntime-cpu", example_inputs=example)
    spec = dataclasses.replace(
        ARCH, quantization=QuantSpec(target="onnxruntime-cpu", weight_range=model.weight_range)
    )
    return write_stage(tmp_path_factory.mktemp("run"), "quantize", model, spec)


def check_batches(result: dict, batch_sizes: list[int], iterations: int) -> None:
    assert [b["batch_size"] for b in result["batches"]] == batch_sizes
    for entry in result["batches"]:
        lat = entry["latency_ms"]
        assert entry["status"] == "ok" and BATCH_KEYS <= set(entry) and set(lat) == LATENCY_KEYS
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert 5 <= entry["runs"] <= iterations
        assert entry["throughput_ips"] == pytest.approx(
            entry["batch_size"] * entry["runs"] / entry["total_s"]
        )


# --- the torch backend ----------------------------------------------------------------------


def test_torch_cpu_result_has_the_common_shape(stage):
    result = torch_backend.measure(stage, batch_sizes=[1, 4], **FAST)
    assert (result["status"], result["error"]) == ("ok", None)
    assert COMMON_KEYS | {"torch", "compile", "compile_s", "network"} <= set(result)
    check_batches(result, [1, 4], FAST["iterations"])
    assert result["baseline_rss_mb"] > 100  # torch was imported before the baseline
    assert result["model_rss_mb"] > 0 and result["peak_rss_mb"] == pytest.approx(
        result["baseline_rss_mb"] + result["model_rss_mb"]
    )
    assert (result["device"], result["threads"], result["gpu_peak_mb"]) == ("cpu", 1, None)
    assert (result["torch"], result["compile"], result["compile_s"]) == (
        torch.__version__,
        False,
        None,
    )
    assert result["network"] == {
        "stage": "distill",
        "model": "cifar:resnet20",
        "image_size": IMAGE_SIZE,
        "in_channels": 3,
        "quantized": False,
    }
    assert all("compile_s" not in b for b in result["batches"])


@pytest.mark.slow
def test_torch_timing_stops_at_the_budget(stage):
    budget = 0.2
    result = torch_backend.measure(
        stage, batch_sizes=[1], warmup=0, iterations=100_000, time_budget_s=budget, threads=1
    )
    (entry,) = result["batches"]
    assert 5 <= entry["runs"] < 100_000
    # the loop stops after the run that crosses the deadline: at most one run (and the loop's
    # own overhead) past the budget
    assert entry["total_s"] <= budget + entry["latency_ms"]["max"] / 1000 + 0.1


def test_torch_through_the_registry_and_a_fake_quantized_stage(qat_stage):
    result = BACKENDS.get("torch").measure(qat_stage, batch_sizes=[2], **FAST)
    assert result["status"] == "ok", result["error"]
    check_batches(result, [2], FAST["iterations"])
    assert result["network"]["quantized"] is True and result["network"]["stage"] == "quantize"


@pytest.mark.slow
def test_torch_compile_on_cpu(stage):
    """torch.compile (inductor, C++ codegen) works on the CPU build: each batch size compiles in
    its first warm-up call, which is timed apart as that batch's ``compile_s`` and never among the
    timed runs. Marked slow: cifar:resnet20 at 8x8 takes ~20 s to compile on 2 busy cores with a
    cold inductor cache (~8 s warm)."""
    result = BACKENDS.get("torch-compile").measure(
        stage, batch_sizes=[2], warmup=2, iterations=20, time_budget_s=0.3, threads=1
    )
    assert result["status"] == "ok", result["error"]
    check_batches(result, [2], 20)
    (entry,) = result["batches"]
    assert (
        result["compile"] is True
        and entry["compile_s"] > 0
        and result["compile_s"] == entry["compile_s"]
    )
    assert (
        entry["compile_s"] > 10 * entry["latency_ms"]["p50"] / 1000
    )  # compilation is not a timed run


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_torch_cuda_without_cuda_is_a_clear_error_not_a_cpu_run(stage):
    result = BACKENDS.get("torch-cuda").measure(stage, batch_sizes=[1], **FAST)
    assert result["status"] == "error" and "batches" not in result
    assert (
        "device cuda" in result["error"]
        and "no usable CUDA device" in result["error"]
        and "\n" not in result["error"]
    )


def test_unknown_device_is_refused_without_a_child():
    result = torch_backend.measure("anywhere", batch_sizes=[1], device="tpu", **FAST)
    assert result == {
        "status": "error",
        "error": "device must be one of ('cpu', 'cuda'), got 'tpu'",
    }


def test_a_folder_that_is_not_a_stage_is_a_one_line_error(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a stage")
    result = torch_backend.measure(tmp_path, batch_sizes=[1], **FAST)
    assert result["status"] == "error" and "batches" not in result
    assert (
        "not a finished stage holding a network" in result["error"]
        and str(tmp_path) in result["error"]
    )
    assert "\n" not in result["error"]


class _Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path, stage):
    run_dir = tmp_path / "run"
    record = (stage / "stage.json").read_text()
    (run_dir / "distill").mkdir(parents=True)
    (run_dir / "distill" / "stage.json").write_text(record)
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": _Payload(marker)}, run_dir / "distill" / "model.pt")
    result = torch_backend.measure(run_dir / "distill", batch_sizes=[1], **FAST)
    assert result["status"] == "error" and "\n" not in result["error"]
    assert "model.pt" in result["error"]
    assert not marker.exists()
    # the payload is live: an unsafe load (never done by compress) would have run it
    control = tmp_path / "control"
    torch.save({"conv1.weight": _Payload(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()


# --- the TensorRT backend -------------------------------------------------------------------


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed here")
def test_tensorrt_without_the_package_says_how_to_get_it(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0" * 16)
    result = BACKENDS.get("tensorrt").measure(engine, batch_sizes=[1], **FAST)
    assert result["status"] == "error" and "batches" not in result
    assert "needs the tensorrt package, which is not installed" in result["error"]
    assert "pip install -e '.[tensorrt]'" in result["error"] and "NVIDIA GPU" in result["error"]


@pytest.mark.tensorrt
@pytest.mark.skipif(
    not (HAVE_TENSORRT and torch.cuda.is_available()), reason="needs tensorrt and a CUDA device"
)
def test_tensorrt_measures_a_tiny_engine_within_its_batch_profile(tmp_path):
    import tensorrt as trt

    from compress.exporters.onnx.export import export_onnx
    from compress.exporters.tensorrt import build_engine

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    ).eval()
    onnx_path = export_onnx(net, tmp_path / "m.onnx", image_size=IMAGE_SIZE)
    engine = build_engine(onnx_path, tmp_path / "m.engine", fp16=True, batch=(1, 4, 8))
    result = trt_backend.measure(
        engine, batch_sizes=[1, 8, 16], warmup=2, iterations=50, time_budget_s=0.5, threads=0
    )
    assert COMMON_KEYS | {"tensorrt", "engine", "gpu", "gpu_memory_source"} <= set(result)
    assert result["tensorrt"] == trt.__version__ and result["device"] == "cuda"
    assert result["engine"]["profile_batch"] == [1, 4, 8]
    assert result["engine"]["inputs"] == {"input": [-1, 3, IMAGE_SIZE, IMAGE_SIZE]}
    assert list(result["engine"]["outputs"].values()) == [[-1, 10]]
    ok, too_big = result["batches"][:2], result["batches"][2]
    check_batches({"batches": ok}, [1, 8], 50)
    assert (
        too_big["status"] == "error"
        and "outside the engine's optimisation profile (batch 1 to 8)" in too_big["error"]
    )
    assert result["status"] == "error" and result["error"].startswith("batch 16: ")
    assert result["gpu_peak_mb"] > 0 and result["model_rss_mb"] > 0


# --- both -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKENDS.names())
def test_every_backend_entry_takes_the_common_arguments(name):
    backend = BACKENDS.get(name)
    module, _, function = backend.entry.partition(":")
    params = inspect.signature(getattr(importlib.import_module(module), function)).parameters
    assert {"batch_sizes", "warmup", "iterations", "time_budget_s", "threads", "timeout_s"} <= set(
        params
    )
    assert set(backend.options) <= set(params)


def imported_modules(statement: str) -> set[str]:
    """Top-level packages loaded by ``statement`` in a fresh interpreter."""
    code = (
        f"import json, sys; {statement}; print(json.dumps(sorted({{m.split('.')[0] for m in "
        "sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), check=True
    ).stdout
    return set(json.loads(out))


def test_parent_modules_import_no_runtime():
    loaded = imported_modules(
        "import compress.benchmark.backends.torch, compress.benchmark.backends.tensorrt"
    )
    assert not loaded & {"torch", "tensorrt", "onnx", "onnxruntime", "numpy"}


def test_torch_worker_imports_no_onnx_runtime():
    # onnx itself comes in with compress.pipeline.stages (its export stage); the baseline memory is
    # taken
    # after these imports, so only a runtime (ONNX Runtime, TensorRT) would distort model_rss_mb.
    loaded = imported_modules("import compress.benchmark.backends._torch_worker")
    assert "torch" in loaded and "onnxruntime" not in loaded and "tensorrt" not in loaded
