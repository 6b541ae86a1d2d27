"""Benchmark rows, ratios and tables of exported models, measured in a child process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import compress.benchmark.backends.child as child
from compress.benchmark.backend_table import BACKENDS
from compress.benchmark.compare import bench_models
from compress.benchmark.measure import bench_model
from compress.benchmark.ratios import compare, did_not_pay
from compress.benchmark.rows import BenchResult, BenchRow, LatencyPoint, LatencyStats, Ratios
from compress.benchmark.spec import BenchConfig
from compress.benchmark.table import bench_table_markdown, write_bench
from compress.core.fileio import sha256_file, write_json_atomic
from compress.errors import StageError
from compress.exporters.onnx.export import export_onnx, preprocessing_metadata

SIZE = 16
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
# one process per model: these tests check what one process measures (several: see
# test_several_processes_per_model_interleaved and tests/test_latency.py)
CFG = BenchConfig(batch_size=8, warmup=1, iterations=10, time_budget_s=0.5, threads=1, processes=1)
FIRST_KEYS = ["role", "path", "status", "error", "backend", "format"]  # of every row in bench.json


def cnn(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    ).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A large 'teacher' and a small 'student', exported with our preprocessing metadata."""
    folder = tmp_path_factory.mktemp("bench")
    metadata = preprocessing_metadata(MEAN, STD, SIZE, 10)
    paths = {}
    for role, width, seed in (("teacher", 64, 0), ("student", 8, 1)):
        paths[role] = export_onnx(
            cnn(width, seed),
            folder / f"{role}.onnx",
            image_size=SIZE,
            exporter="torchscript",
            metadata=metadata,
        )
    return paths


@pytest.fixture(scope="module")
def test_data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 3, SIZE, SIZE), dtype=np.uint8), rng.integers(0, 10, 40)


def manual_predictions(path, images) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = (images.astype(np.float32) / 255 - np.array(MEAN, np.float32)[:, None, None]) / np.array(
        STD, np.float32
    )[:, None, None]
    return session.run(None, {"input": x.astype(np.float32)})[0].argmax(axis=1)


# --- rows -----------------------------------------------------------------------------------


def test_rows_have_every_field_and_sane_numbers(models):
    rows = {role: bench_model(path, CFG, None, role=role) for role, path in models.items()}
    for role, row in rows.items():
        assert (row.role, row.status, row.error) == (role, "ok", None)
        assert [point.batch_size for point in row.latency] == [1, 8]
        for point in row.latency:
            lat = point.latency_ms
            assert point.ok and 5 <= point.runs <= CFG.iterations
            assert 0 < lat.min <= lat.p50 <= lat.p90 <= lat.p95 <= lat.p99 <= lat.max
            assert point.cv == pytest.approx(lat.std / lat.mean) and point.noisy == (
                point.cv > 0.10
            )
            assert point.throughput_ips == pytest.approx(
                point.batch_size * point.runs / point.total_s
            )
        assert row.peak_rss_mb > 0 and row.model_rss_mb >= 0
        assert row.runtime["providers"] == ["CPUExecutionProvider"]
        assert row.runtime["threads"] == 1 and row.runtime["onnxruntime"] == ort.__version__
        assert row.top1 is None
        # bench.json's shape, which CI jobs gate on: these keys, in this order, nothing more
        assert list(row.to_json()) == FIRST_KEYS + [
            "file_bytes",
            "params",
            "macs",
            "opset",
            "input_shape",
            "int8_portable",
            "latency",
            "peak_rss_mb",
            "model_rss_mb",
            "gpu_peak_mb",
            "runtime",
        ]
    big, small = rows["teacher"], rows["student"]
    assert big.params > small.params > 0 and big.macs > small.macs > 0
    assert big.file_bytes > small.file_bytes > 0


def test_accuracy_is_the_exported_models_own(models, test_data):
    images, labels = test_data
    cfg = BenchConfig(batch_size=8, warmup=0, iterations=5, time_budget_s=0.1, eval_samples=30)
    row = bench_model(models["student"], cfg, test_data, role="student")
    expected = float(np.mean(manual_predictions(models["student"], images[:30]) == labels[:30]))
    assert row.ok and row.eval_samples == 30
    assert row.top1 == pytest.approx(100 * expected)
    assert "predictions" not in row.to_json()


def test_missing_normalisation_is_a_row_error_unless_given(tmp_path, test_data):
    path = export_onnx(cnn(8, 0), tmp_path / "bare.onnx", image_size=SIZE, exporter="torchscript")
    cfg = BenchConfig(batch_size=4, warmup=0, iterations=5, time_budget_s=0.1)
    row = bench_model(path, cfg, test_data, role="bare")
    assert row.status == "error" and "compress.mean" in row.error and "mean=" in row.error
    assert row.latency[0].ok  # what was measured before the failure is kept
    row = bench_model(path, cfg, test_data, role="bare", mean=MEAN, std=STD)
    assert row.ok
    assert row.top1 == pytest.approx(
        100 * float(np.mean(manual_predictions(path, test_data[0]) == test_data[1]))
    )


def test_corrupt_model_is_an_error_row_and_others_go_on(tmp_path, models, test_data):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(os.urandom(4096))
    cfg = BenchConfig(batch_size=4, warmup=0, iterations=5, time_budget_s=0.1)
    result = bench_models({"teacher": corrupt, "student": models["student"]}, cfg, test_data)
    teacher, student = result.rows
    assert (
        teacher.status == "error" and "corrupt.onnx" in teacher.error and "\n" not in teacher.error
    )
    assert list(teacher.to_json()) == FIRST_KEYS + ["model", "group"]  # nothing measured
    assert student.ok and student.top1 is not None
    assert result.ratios["student"] == Ratios()
    table = bench_table_markdown(result)
    assert "error: " in table and "corrupt.onnx" in table


def test_bench_models_agreement_and_context(models, test_data):
    images, labels = test_data
    result = bench_models(models, CFG, test_data)
    teacher, student = (manual_predictions(models[r], images) for r in ("teacher", "student"))
    ratios = result.ratios["student"]
    assert ratios.agreement_with_reference == float(np.mean(teacher == student))
    assert result.row("student").agreement_with_reference == ratios.agreement_with_reference
    assert ratios.accuracy_delta == pytest.approx(
        result.row("student").top1 - result.row("teacher").top1
    )
    assert ratios.params_reduction > 1 and ratios.throughput_batch_size == 8
    assert result.machine["cores"] >= 1 and result.machine["cpu"]
    assert {"python", "onnxruntime", "onnx", "numpy", "torch"} <= set(result.versions)
    assert "gpus" in result.machine
    assert result.config["batch_size"] == 8


# --- the child process ----------------------------------------------------------------------


def test_worker_crash_is_an_error_row(monkeypatch, models):
    monkeypatch.setattr(
        child, "worker_command", lambda module: [sys.executable, "-c", "import os; os._exit(3)"]
    )
    row = bench_model(models["student"], CFG, None, role="student")
    assert row.status == "error" and "exit code 3" in row.error
    assert row.params > 0 and row.latency == () and row.to_json()["latency"] == []


def test_worker_killed_by_signal(monkeypatch, models):
    kill = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(child, "worker_command", lambda module: [sys.executable, "-c", kill])
    result = BACKENDS.get("onnxruntime").measure(
        models["student"], batch_sizes=[1], warmup=0, iterations=5, time_budget_s=None, threads=0
    )
    assert result == {
        "status": "error",
        "error": "the measuring process was killed by SIGKILL (out of memory?)",
    }


def test_peak_memory_is_the_workers_own(models):
    # ru_maxrss would carry this process's peak over fork + exec into the worker.
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    result = BACKENDS.get("onnxruntime").measure(
        models["student"], batch_sizes=[1], warmup=0, iterations=5, time_budget_s=None, threads=1
    )
    assert ballast[-1] == 1.0
    assert 0 < result["baseline_rss_mb"] < result["peak_rss_mb"] < 300
    assert result["model_rss_mb"] == pytest.approx(
        result["peak_rss_mb"] - result["baseline_rss_mb"]
    )


def test_worker_stays_import_light():
    code = (
        "import sys, compress.benchmark.backends._ort_worker; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'torchvision'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=child.child_env(),
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_time_budget_stops_early_after_five_runs(models):
    result = BACKENDS.get("onnxruntime").measure(
        models["teacher"],
        batch_sizes=[1],
        warmup=0,
        iterations=10_000,
        time_budget_s=0.05,
        threads=1,
    )
    assert result["status"] == "ok" and 5 <= result["batches"][0]["runs"] < 10_000


def test_several_processes_per_model_interleaved(monkeypatch, models):
    started = []
    run_child = child.run_child

    def recording(module, request, timeout_s):
        started.append(os.path.basename(request["path"]))
        return run_child(module, request, timeout_s)

    monkeypatch.setattr("compress.benchmark.backends.child.run_child", recording)
    cfg = replace(CFG, processes=2, time_budget_s=1.0)
    result = bench_models(models, cfg, None)
    assert started == ["teacher.onnx", "student.onnx"] * 2  # round by round, A B A B
    for row in result.rows:
        assert row.ok and [p.batch_size for p in row.latency] == [1, 8]
        for point in row.latency:
            medians = [process.p50_ms for process in point.processes]
            assert len(medians) == 2 and all(m > 0 for m in medians)
            assert point.latency_ms.p50 == pytest.approx(sum(medians) / 2)  # their median
            assert point.spread == pytest.approx(abs(medians[0] - medians[1]) / (sum(medians) / 2))
            assert point.unstable == (point.spread > 0.10)
            assert point.runs == sum(process.runs for process in point.processes)
            assert all(5 <= process.runs <= cfg.iterations for process in point.processes)
    ratios = result.ratios["student"]
    teacher, student = (result.row(role).latency_at(1).processes for role in models)
    per_round = sorted(t.p50_ms / s.p50_ms for t, s in zip(teacher, student, strict=True))
    assert ratios.speedup_b1 == pytest.approx(sum(per_round) / 2)
    assert ratios.speedup_b1_spread == pytest.approx(
        (per_round[1] - per_round[0]) / ratios.speedup_b1
    )
    assert result.config["processes"] == 2
    assert "Latency spread over processes, batch 1 (%)" in bench_table_markdown(result)


def test_cli_processes_option_reaches_the_result(models, tmp_path):
    from click.testing import CliRunner

    from compress.cli import cli

    args = ["bench", str(models["student"]), "--processes", "2", "--iterations", "5"]
    args += ["--time-budget", "0.2", "--batch-size", "2", "--threads", "1"]
    outcome = CliRunner().invoke(cli, args + ["--out", str(tmp_path)])
    assert outcome.exit_code == 0, outcome.output
    result = BenchResult.read(tmp_path / "bench.json")
    assert result.config["processes"] == 2
    assert all(len(point.processes) == 2 for point in result.rows[0].latency)
    assert "2 processes per model" in (tmp_path / "bench.md").read_text()
    refused = CliRunner().invoke(cli, ["bench", str(models["student"]), "--processes", "0"])
    assert refused.exit_code == 2 and "--processes" in refused.output


def test_unknown_backend_lists_known():
    with pytest.raises(StageError, match="known: .*onnxruntime.*torch"):
        BACKENDS.get("tflite")


# --- ratios and output ----------------------------------------------------------------------


def synthetic_row(role, p50, throughput, file_bytes, params, macs, top1, agreement=None):
    return BenchRow(
        role=role,
        status="ok",
        file_bytes=file_bytes,
        params=params,
        macs=macs,
        latency=(
            LatencyPoint(
                batch_size=1,
                status="ok",
                latency_ms=LatencyStats(p50=p50, p90=p50 * 2, p99=p50 * 3),
                throughput_ips=1000 / p50,
            ),
            LatencyPoint(
                batch_size=64,
                status="ok",
                latency_ms=LatencyStats(p50=64000 / throughput),
                throughput_ips=throughput,
            ),
        ),
        peak_rss_mb=100.0,
        model_rss_mb=20.0,
        top1=top1,
        agreement_with_reference=agreement,
    )


def test_compare_ratios_exact():
    rows = [
        synthetic_row("teacher", 8.0, 400.0, 4_000_000, 2_000_000, 600_000_000, 90.0),
        synthetic_row(
            "student", 2.0, 1600.0, 1_000_000, 500_000, 100_000_000, 87.5, agreement=0.95
        ),
    ]
    result = compare(rows)
    assert result.reference == "teacher" and result.rows == tuple(rows)
    assert result.ratios == {
        "student": Ratios(
            speedup_b1=4.0,
            speedup_throughput=4.0,
            throughput_batch_size=64,
            size_reduction=4.0,
            params_reduction=4.0,
            macs_reduction=6.0,
            accuracy_delta=pytest.approx(-2.5),
            agreement_with_reference=0.95,
        )
    }


def test_compare_without_reference_or_numbers():
    broken = BenchRow(role="teacher", status="error", error="boom")
    student = synthetic_row("student", 2.0, 1600.0, 1, 1, 1, 0.5)
    assert compare([broken, student]).ratios["student"] == Ratios()
    assert compare([student], reference="nobody").ratios["student"] == Ratios()


def test_markdown_table():
    rows = [
        synthetic_row("teacher", 8.0, 400.0, 4 * 2**20, 2_000_000, 600_000_000, 90.0),
        synthetic_row("student", 2.0, 1600.0, 2**20, 500_000, 100_000_000, 87.5, agreement=0.95),
        BenchRow(role="pruned", status="error", error="model | broke"),
    ]
    table = bench_table_markdown(compare(rows))
    lines = table.splitlines()
    assert (
        lines[0]
        == "| Metric | teacher | student | student vs teacher | pruned | pruned vs teacher |"
    )
    assert "| Status | ok | ok |  | error: model \\| broke |  |" in lines
    assert "| File size (MiB) | 4.00 | 1.00 | 4.00× smaller | — | — |" in lines
    assert "| Latency p50, batch 1 (ms) | 8.000 | 2.000 | 4.00× faster | — | — |" in lines
    assert "| Throughput, batch 64 (images/s) | 400.0 | 1600.0 | 4.00× faster | — | — |" in lines
    assert "| Top-1 accuracy (%) | 90.00 | 87.50 | -2.50 pts | — | — |" in lines
    assert "| Top-1 agreement with teacher (%) | — | 95.00 |  | — |  |" in lines


def test_write_bench_is_atomic_json_and_markdown(tmp_path, models):
    result = compare(
        [
            synthetic_row("teacher", 8.0, 400.0, 4, 2, 6, 90.0),
            synthetic_row("student", 2.0, 1600.0, 1, 1, 1, 80.0),
        ]
    )
    json_path, md_path = write_bench(result, tmp_path / "bench")
    assert json.loads(json_path.read_text()) == result.to_json()
    assert BenchResult.read(json_path) == result
    assert md_path.read_text() == bench_table_markdown(result)
    assert sorted(os.listdir(tmp_path / "bench")) == ["bench.json", "bench.md"]


def test_write_json_atomic_keeps_old_file_on_bad_object(tmp_path):
    path = write_json_atomic(tmp_path / "a.json", {"n": np.int64(3), "p": tmp_path})
    assert json.loads(path.read_text()) == {"n": 3, "p": str(tmp_path)}
    digest = sha256_file(path)
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert sha256_file(path) == digest and os.listdir(tmp_path) == ["a.json"]


def test_noisy_timings_are_flagged_in_the_table():
    quiet = synthetic_row("teacher", 4.0, 400.0, 40 * 2**20, 11e6, 500e6, 95.0)
    busy = synthetic_row("student", 1.0, 2000.0, 4 * 2**20, 2e6, 90e6, 93.0)
    quiet = replace(quiet, latency=(replace(quiet.latency[0], cv=0.03, noisy=False),))
    busy = replace(busy, latency=(replace(busy.latency[0], cv=0.42, noisy=True),))
    table = bench_table_markdown(compare([quiet, busy]))
    assert "| Latency CV, batch 1 (%) | 3.0 | 42.0 (noisy) |" in table
    assert "Noisy timings (coefficient of variation over 10%): student (batch 1)" in table
    assert "teacher (batch" not in table.split("Noisy timings")[1]


def test_a_static_batch_file_is_measured_at_its_batch_and_marked_in_the_table(
    tmp_path, models, test_data
):
    static = export_onnx(
        cnn(8, 1),
        tmp_path / "static.onnx",
        image_size=SIZE,
        exporter="torchscript",
        batch=4,
        metadata=preprocessing_metadata(MEAN, STD, SIZE, 10),
    )
    result = bench_models({"teacher": models["teacher"], "static": static}, CFG, test_data)
    row = result.row("static")
    assert row.ok and [point.batch_size for point in row.latency] == [4] and row.input_shape[0] == 4
    assert (
        row.top1 is not None and result.ratios["static"].speedup_b1 is None
    )  # no batch-1 number to compare
    assert " (batch 4) |" in bench_table_markdown(result)


def test_a_fake_quantized_pytorch_row_is_named_simulated_int8():
    teacher = synthetic_row("teacher", 1.0, 50000.0, 1, 1, 1, None)
    student = dataclasses.replace(
        synthetic_row("student", 6.8, 8800.0, 1, 1, 1, None),
        runtime={"backend": "torch-cuda", "network": {"stage": "quantize", "quantized": True}},
    )
    flagged = bench_table_markdown(compare([teacher, student]))
    assert "Simulated INT8: student ran as fake quantization" in flagged
    plain = dataclasses.replace(student, runtime={"network": {"quantized": False}})
    assert "Simulated INT8" not in bench_table_markdown(compare([teacher, plain]))


# --- when compression did not pay -------------------------------------------------------------


def on_runtime(row: BenchRow) -> BenchRow:
    return dataclasses.replace(row, backend="onnxruntime")


def test_a_student_slower_than_its_teacher_is_said_in_one_line():
    teacher = on_runtime(synthetic_row("teacher", 1.0, 2000.0, 4000, 100, 1000, 90.0))
    student = on_runtime(synthetic_row("student", 2.5, 4000.0, 1000, 25, 250, 88.0))
    lines = did_not_pay([teacher, student], "teacher")
    assert lines == ["student is slower than teacher on onnxruntime: 0.40x at batch 1"]
    table = bench_table_markdown(compare([teacher, student], reference="teacher"))
    assert "Did not pay: student is slower than teacher on onnxruntime: 0.40x at batch 1." in table


def test_an_int8_student_slower_than_its_float_version_is_said_even_when_faster_than_the_teacher():
    teacher = on_runtime(synthetic_row("teacher", 4.0, 500.0, 4000, 100, 1000, 90.0))
    fp32 = on_runtime(synthetic_row("student_fp32", 1.0, 2000.0, 1000, 25, 250, 88.0))
    int8 = on_runtime(synthetic_row("student", 0.8, 1600.0, 300, 25, 250, 87.9))
    lines = did_not_pay([teacher, fp32, int8], "teacher")
    assert lines == ["student is slower than its float version on onnxruntime: 0.80x at batch 64"]


def test_nothing_is_said_when_compression_paid_everywhere():
    teacher = on_runtime(synthetic_row("teacher", 4.0, 500.0, 4000, 100, 1000, 90.0))
    fp32 = on_runtime(synthetic_row("student_fp32", 1.0, 2000.0, 1000, 25, 250, 88.0))
    int8 = on_runtime(synthetic_row("student", 0.5, 4000.0, 300, 25, 250, 87.9))
    assert did_not_pay([teacher, fp32, int8], "teacher") == []
    assert "Did not pay" not in bench_table_markdown(compare([teacher, fp32, int8]))


def test_the_run_summary_repeats_what_did_not_pay():
    from compress.pipeline.artifacts import Artifact
    from compress.pipeline.report import summary_table

    bench = Artifact(
        "bench",
        metrics={
            "teacher_status": "ok",
            "student_status": "ok",
            "speedup_b1": 0.4,
            "speedup_throughput": 2.0,
            "size_reduction": 4.0,
            "did_not_pay": ["student is slower than teacher on onnxruntime: 0.40x at batch 1"],
        },
    )
    bench.seconds = 1.0
    summary = summary_table({"bench": bench})
    assert summary.endswith(
        "Did not pay: student is slower than teacher on onnxruntime: 0.40x at batch 1."
    )
