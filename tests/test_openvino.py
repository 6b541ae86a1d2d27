"""The openvino bench backend: a second CPU runtime for our exported files, QDQ files as INT8.

Tests that need OpenVINO skip without it (``pytest.importorskip``); the path without it (a
one-line error row naming the extra) is tested everywhere by hiding the package. The models
are tiny CNNs exported the way the export stage writes them: an FP32 file and its QDQ INT8
version (portable weights, ``weight_range: auto``), with our preprocessing metadata.

Tolerances (OpenVINO against ONNX Runtime, same file, 240 images): an FP32 file computes the
same float model in both, so they agree on at least 99% of the images; the INT8 file's
integer layers are exact in both, but the float steps around them (requantisation, rounding
of the activation scales) are other code, so at least 97%. Top-1 and agreement with the
teacher are then within 2 (FP32) and 4 (INT8) points of ONNX Runtime's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import compress.benchmark.backends.child as child
import compress.benchmark.measure as measure_module
from compress.benchmark.backend_table import BACKENDS
from compress.benchmark.backends import onnxruntime as ort_backend
from compress.benchmark.backends import openvino as ov_backend
from compress.benchmark.compare import bench_models
from compress.benchmark.measure import bench_model, predict_on
from compress.benchmark.rows import BenchResult
from compress.benchmark.spec import BenchConfig
from compress.benchmark.table import bench_table_markdown
from compress.core.cpu_features import cpu_features
from compress.errors import StageError
from compress.exporters.onnx.export import export_onnx, preprocessing_metadata
from compress.exporters.onnx.graph import load_onnx
from compress.exporters.qdq import store_int8_weights
from compress.quantization.fake_quant import calibrate, prepare_quantized

SIZE = 16
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
IMAGES = 240
BATCH = 16  # not a divisor of IMAGES: the last batch is padded
CFG = BenchConfig(
    backends=("onnxruntime", "openvino"),
    batch_size=BATCH,
    warmup=1,
    iterations=10,
    time_budget_s=0.3,
    threads=1,
)
FP32_MIN_AGREEMENT, INT8_MIN_AGREEMENT = 0.99, 0.97
FP32_TOP1_POINTS, INT8_TOP1_POINTS = 2.0, 4.0
MISSING = (
    "the openvino backend needs the openvino package, which is not installed; "
    "pip install -e '.[openvino]'"
)


def cnn(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    ).eval()


def normalised(images: np.ndarray) -> torch.Tensor:
    mean, std = (np.array(v, np.float32)[:, None, None] for v in (MEAN, STD))
    return torch.from_numpy((images.astype(np.float32) / 255 - mean) / std)


@pytest.fixture(scope="module")
def data():
    """Random images, labelled by the float teacher (so its top-1 is 100% and the students'
    top-1 is their agreement with it: numbers with room to differ)."""
    images = np.random.default_rng(0).integers(0, 256, (IMAGES, 3, SIZE, SIZE), dtype=np.uint8)
    with torch.no_grad():
        labels = cnn(32, 0)(normalised(images)).argmax(1).numpy()
    return images, labels


@pytest.fixture(scope="module")
def files(tmp_path_factory, data):
    """teacher (FP32, width 32), student_fp32 (FP32, width 16) and student (its QDQ INT8 file)."""
    folder = tmp_path_factory.mktemp("openvino")
    metadata = preprocessing_metadata(MEAN, STD, SIZE, 10)
    common = dict(image_size=SIZE, exporter="torchscript", metadata=metadata)
    student = cnn(16, 1)
    qmodel = prepare_quantized(
        student, target="onnxruntime-cpu", example_inputs=normalised(data[0][:2])
    )
    calibrate(qmodel, [normalised(data[0][:128])], method="minmax")
    return {
        "teacher": export_onnx(cnn(32, 0), folder / "teacher.onnx", **common),
        "student_fp32": export_onnx(student, folder / "student_fp32.onnx", **common),
        "student": export_onnx(
            qmodel.eval(), folder / "student.onnx", transform=store_int8_weights, **common
        ),
    }


@pytest.fixture
def without_openvino(tmp_path, monkeypatch):
    """openvino made unimportable here and in the measuring children (a package of that name
    that raises ImportError, first on their path), as on a machine without the extra."""
    fake = tmp_path / "hidden" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('openvino is hidden by the test')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    monkeypatch.setitem(sys.modules, "openvino", None)


# --- without openvino (runs everywhere) ---------------------------------------------------------


def test_without_openvino_the_row_is_one_line_naming_the_extra(files, data, without_openvino):
    row = bench_model(
        files["student"],
        BenchConfig(backends=("openvino",), batch_size=4, warmup=0, iterations=5),
        data,
        role="student",
    )
    # what the file holds is still read; the error is said once, not once per step
    assert row.status == "error" and row.error == f"latency: {MISSING}"
    assert row.params > 0 and row.int8_portable is True and row.latency == ()
    assert row.top1 is None


def test_without_openvino_onnx_runtime_rows_go_on(files, data, without_openvino):
    result = bench_models({"student": files["student"]}, CFG, data)
    ort, ov = result.rows
    assert (ort.role, ov.role) == ("student", "student [openvino]")
    assert ort.ok and ort.top1 is not None and ort.latency
    assert ov.error == f"latency: {MISSING}" and ov.top1 is None
    assert f"error: latency: {MISSING}" in bench_table_markdown(result)


def test_without_openvino_the_predictor_says_how_to_install(files, without_openvino):
    with pytest.raises(StageError) as caught:
        ov_backend.open_predictor(files["student"], batch_size=4, threads=1)
    assert str(caught.value) == MISSING


def imported_modules(statement: str) -> set[str]:
    """Top-level packages loaded by ``statement`` in a fresh interpreter."""
    code = f"import sys; {statement}; print(' '.join({{m.split('.')[0] for m in sys.modules}}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child.child_env()
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


def test_listing_backends_imports_no_openvino():
    loaded = imported_modules(
        "import compress.benchmark.backend_table, compress.benchmark.backends.openvino"
    )
    assert not loaded & {"openvino", "numpy", "onnxruntime", "torch"}
    assert "openvino" in BACKENDS.names()
    backend = BACKENDS.get("openvino")
    assert (backend.artifact, backend.device, backend.needs_gpu) == ("onnx", "cpu", False)


def test_every_predictor_takes_the_common_arguments():
    import importlib
    import inspect

    predictors = [BACKENDS.get(n).predictor for n in BACKENDS.names()]
    assert "compress.benchmark.backends.openvino:open_predictor" in predictors
    for entry in filter(None, predictors):
        module, _, function = entry.partition(":")
        params = inspect.signature(getattr(importlib.import_module(module), function)).parameters
        assert list(params)[0] == "path" and {"batch_size", "threads"} <= set(params)


def test_openvino_messages_lose_their_source_locations():
    raised = RuntimeError(
        "Exception from src/inference/src/cpp/core.cpp:84:\n"
        "Check 'util::file_exists(path)' failed at src/frontends/common/src/frontend.cpp:117:\n"
        "FrontEnd API failed with GeneralFailure:\n"
        'onnx: Could not open the file: "/nowhere/m.onnx"\n\n'
    )
    assert ov_backend.ov_message(raised) == (
        'RuntimeError: onnx: Could not open the file: "/nowhere/m.onnx"'
    )


def test_integer_layers_counts_matrix_layers_only():
    precisions = {
        "Convolution": {"u8": 9, "f32": 1},
        "FullyConnected": {"i8": 1},
        "FakeQuantize": {"f32": 4},  # not a matrix layer
        "Reorder": {"u8": 3},
    }
    assert ov_backend.integer_layers(precisions) == {"integer": 10, "total": 11}
    assert ov_backend.integer_layers({}) == {"integer": 0, "total": 0}


def test_a_child_that_writes_raw_bytes_to_stderr_is_an_error_not_a_crash(monkeypatch):
    # OpenVINO's frontends log the bytes of a corrupt file they tried to parse; the parent used
    # to fail decoding them (UnicodeDecodeError) instead of returning the error row
    code = "import sys; sys.stderr.buffer.write(b'bad \\x8e\\xff byte\\n'); sys.exit(2)"
    monkeypatch.setattr(child, "worker_command", lambda module: [sys.executable, "-c", code])
    result = child.run_child("anything", {}, timeout_s=60)
    assert result["status"] == "error" and "exit code 2" in result["error"]
    assert "bad" in result["error"]


# --- with openvino ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openvino():
    return pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def result(openvino, files, data):
    return bench_models(files, CFG, data)


def matrix_layers(path) -> int:
    return sum(node.op_type in ("Conv", "Gemm", "MatMul") for node in load_onnx(path).graph.node)


@pytest.mark.slow
def test_openvino_rows_form_their_own_group_with_latency(result, openvino):
    assert result.groups == ("onnxruntime", "openvino")
    rows = [row for row in result.rows if row.group == "openvino"]
    assert [row.role for row in rows] == [
        "teacher [openvino]",
        "student_fp32 [openvino]",
        "student [openvino]",
    ]
    for row in rows:
        assert row.ok and row.backend == "openvino", row.error
        assert [point.batch_size for point in row.latency] == [1, BATCH]
        assert all(point.ok and point.latency_ms.p50 > 0 for point in row.latency)
        assert row.peak_rss_mb > 0 and row.gpu_peak_mb is None
        runtime = row.runtime
        assert runtime["openvino"] == openvino.get_version() and runtime["threads"] == 1
        assert runtime["properties"]["PERFORMANCE_HINT"] == "LATENCY"
        assert runtime["properties"]["INFERENCE_NUM_THREADS"] == 1
        assert runtime["properties"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert result.ratios["student [openvino]"].speedup_b1 is not None
    assert "### openvino" in bench_table_markdown(result)
    assert "OpenVINO " in bench_table_markdown(result).splitlines()[-1]  # the machine line
    assert BenchResult.from_json(json.loads(json.dumps(result.to_json()))).rows == result.rows


def test_openvino_runs_the_qdq_file_in_integer_and_the_float_file_in_float(result, files):
    student, fp32 = result.row("student [openvino]"), result.row("student_fp32 [openvino]")
    layers = matrix_layers(files["student"])
    assert layers == 3
    assert student.runtime["matmul_layers"] == {"integer": layers, "total": layers}
    assert student.runtime["layer_precisions"]["Convolution"] == {"u8": 2}
    assert fp32.runtime["matmul_layers"] == {"integer": 0, "total": layers}


def test_openvino_accuracy_and_agreement_are_close_to_onnx_runtimes(result):
    for model, points in (("student_fp32", FP32_TOP1_POINTS), ("student", INT8_TOP1_POINTS)):
        ort, ov = result.row(model), result.row(f"{model} [openvino]")
        assert ov.eval_samples == ort.eval_samples == IMAGES
        assert abs(ov.top1 - ort.top1) <= points
        assert abs(ov.agreement_with_reference - ort.agreement_with_reference) <= points / 100
    assert result.row("teacher [openvino]").top1 >= 100 - FP32_TOP1_POINTS
    # agreement is computed within a group: the OpenVINO student against the OpenVINO teacher
    assert set(result.agreement["student [openvino]"]) == {
        "teacher [openvino]",
        "student_fp32 [openvino]",
    }


@pytest.mark.parametrize(
    ("model", "least"), [("student_fp32", FP32_MIN_AGREEMENT), ("student", INT8_MIN_AGREEMENT)]
)
def test_openvino_predicts_what_onnx_runtime_predicts(openvino, files, data, model, least):
    kwargs = dict(mean=MEAN, std=STD, batch_size=BATCH, threads=1)
    ours = predict_on(BACKENDS.get("openvino"), files[model], data[0], **kwargs)
    theirs = predict_on(BACKENDS.get("onnxruntime"), files[model], data[0], **kwargs)
    assert ours.shape == (IMAGES,) and ours.dtype == np.int64
    assert np.mean(ours == theirs) >= least


def test_openvino_top1_is_its_own_not_onnx_runtimes(openvino, files, data, monkeypatch):
    """With ONNX Runtime's predictions replaced by a wrong class for every image, the ONNX
    Runtime rows' accuracy drops to 0 and the OpenVINO rows' does not: theirs come from
    OpenVINO."""
    images, labels = data
    monkeypatch.setattr(
        measure_module, "predict_onnx", lambda path, images, **_: (labels[: len(images)] + 1) % 10
    )
    not_timed = {"status": "error", "error": "not timed in this test"}  # accuracy is measured
    for module in (ov_backend, ort_backend):
        monkeypatch.setattr(module, "measure", lambda path, **_: not_timed)
    result = bench_models({"teacher": files["teacher"], "student": files["student"]}, CFG, data)
    assert result.row("teacher").top1 == result.row("student").top1 == 0.0
    assert result.row("teacher [openvino]").top1 >= 100 - FP32_TOP1_POINTS
    run = ov_backend.open_predictor(files["student"], batch_size=7, threads=1)
    by_hand = run(normalised(images).numpy()).argmax(1)
    assert result.row("student [openvino]").top1 == pytest.approx(100 * np.mean(by_hand == labels))


def test_a_file_openvino_cannot_read_is_a_one_line_error(openvino, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(1).bytes(4096))
    result = BACKENDS.get("openvino").measure(
        corrupt, batch_sizes=[1], warmup=0, iterations=5, time_budget_s=None, threads=1
    )
    assert result["status"] == "error" and "batches" not in result
    assert "Unable to read the model" in result["error"] and "\n" not in result["error"]
    assert not result["error"].startswith("RuntimeError: Exception from")
    with pytest.raises(StageError, match=r"^OpenVINO cannot run corrupt.onnx: RuntimeError: "):
        ov_backend.open_predictor(corrupt, batch_size=4, threads=1)


def test_a_static_batch_runs_only_at_its_batch(openvino, tmp_path):
    static = export_onnx(
        cnn(8, 2), tmp_path / "static.onnx", image_size=SIZE, exporter="torchscript", batch=4
    )
    result = BACKENDS.get("openvino").measure(
        static, batch_sizes=[4, 8], warmup=0, iterations=5, time_budget_s=None, threads=1
    )
    ok, refused = result["batches"]
    assert ok["status"] == "ok" and ok["batch_size"] == 4
    assert refused["status"] == "error" and "static batch of 4" in refused["error"]
    assert result["status"] == "error" and result["error"].startswith("batch 8: ")
    # predictions run at the file's own batch whatever the bench's is: 10 images, 3 batches
    run = ov_backend.open_predictor(static, batch_size=64, threads=1)
    images = np.random.default_rng(2).standard_normal((10, 3, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        expected = cnn(8, 2)(torch.from_numpy(images)).numpy()
    assert np.abs(run(images) - expected).max() < 1e-4


def test_openvino_worker_imports_no_torch_or_onnx_runtime():
    loaded = imported_modules("import compress.benchmark.backends._ov_worker")
    assert not loaded & {"torch", "onnx", "onnxruntime", "tensorrt", "openvino"}


# --- INT8 on x86 CPUs without VNNI ----------------------------------------------------------

# Runs in a child whose oneDNN is capped at AVX2 (no VNNI): each file's logits on an all-ones
# image, and the kernels the CPU plugin chose for its convolutions.
_AVX2_CHILD = """
import json, sys
import numpy as np
import openvino as ov
from compress.benchmark.backends.openvino import compile_settings, with_batch
core, found = ov.Core(), {}
for path in sys.argv[1:]:
    compiled = core.compile_model(
        with_batch(ov, core.read_model(path), 1), "CPU", compile_settings(ov, 1)
    )
    kernels = sorted({
        node.get_rt_info()["primitiveType"].astype(str)
        for node in compiled.get_runtime_model().get_ordered_ops()
        if node.get_rt_info()["layerType"].astype(str) == "Convolution"
    })
    logits = compiled.create_infer_request().infer({0: np.ones((1, 3, 8, 8), np.float32)})[0]
    found[path] = {"kernels": kernels, "logits": logits.tolist()}
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def saturating(tmp_path_factory):
    """One conv whose weights are all equal, INT8 with full-range and with portable weights,
    calibrated so that an all-ones image is u8 255 everywhere: in full range every pair of
    products is 2 x 127 x 255 = 64,770, past the 32,767 a 16-bit lane holds; pair-limit
    weights keep each pair at most 128 x 255."""
    folder = tmp_path_factory.mktemp("saturating")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with torch.no_grad():
        net[0].weight.fill_(0.05)
        net[0].bias.zero_()
        net[3].weight.copy_(torch.linspace(-1, 1, net[3].weight.numel()).view_as(net[3].weight))
    calibration = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    files = {}
    for weight_range in ("full", "pair-limit"):
        qmodel = prepare_quantized(
            net.eval(),
            target="onnxruntime-cpu",
            example_inputs=calibration,
            weight_range=weight_range,
        )
        calibrate(qmodel, [calibration], method="minmax")
        files[weight_range] = export_onnx(
            qmodel.eval(),
            folder / f"{weight_range}.onnx",
            image_size=8,
            exporter="torchscript",
            transform=store_int8_weights,
        )
    return files


@pytest.mark.skipif(
    not cpu_features().x86 or not cpu_features().known, reason="x86 INT8 kernels only"
)
def test_without_vnni_openvino_saturates_full_range_weights_not_portable_ones(
    openvino, saturating, monkeypatch
):
    """OpenVINO's oneDNN kernels on an x86 CPU without VNNI (emulated on any x86 CPU by
    capping oneDNN at AVX2) add u8 x s8 pairs in 16-bit lanes, like ONNX Runtime's: the
    full-range file is far off ONNX Runtime's exact kernels, the portable one is not. So the
    bench's saturation warning is declared for the openvino backend too."""
    from compress.exporters.onnx.verify import open_session

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    out = subprocess.run(
        [sys.executable, "-c", _AVX2_CHILD, *map(str, saturating.values())],
        capture_output=True,
        text=True,
        env=child.child_env(),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout)
    kernels = {kernel for entry in found.values() for kernel in entry["kernels"]}
    if not kernels or any("avx2" not in kernel for kernel in kernels):
        pytest.skip(f"this OpenVINO build ignores ONEDNN_MAX_CPU_ISA (kernels: {kernels})")
    image = np.ones((1, 3, 8, 8), np.float32)
    error = {}
    for name, path in saturating.items():
        exact = open_session(path, exact_int8=True).run(None, {"input": image})[0]
        ours = np.asarray(found[str(path)]["logits"])
        error[name] = float(np.abs(ours - exact).max() / np.abs(exact).max())
    assert error["pair-limit"] < 1e-4
    assert error["full"] > 0.2  # the sums are clipped: about half of each conv output is lost
    assert BACKENDS.get("openvino").saturates_without_vnni
