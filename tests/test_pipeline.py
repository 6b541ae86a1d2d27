"""End to end through the CLI in a subprocess, on real images: teacher -> distill -> prune -> QAT
-> export -> bench -> report, then resume, reruns, gates and the standalone commands. One run
(module-scoped) serves every test; the numbers asserted are the ones the run itself recorded."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch
from conftest import run_cli as compress

from compress.benchmark.latency import paired_speedup
from compress.benchmark.rows import BenchResult
from compress.pipeline.run_lock import LOCK_NAME

pytestmark = pytest.mark.slow

# Digits: a few epochs give confident models, so top-1 agreement measures quantization error
# rather than coin flips between near-tied classes of an undertrained network.
RECIPE = """
name: full
seed: 0
data: {{kind: digits, image_size: 16, batch_size: 64, augment: false}}
teacher:
  model: cifar:resnet32
  train: {{epochs: 5, optimizer: adamw, lr: 0.003, weight_decay: 0.01}}
student:
  model: torchvision:mobilenet_v2
stages:
  - teacher
  - distill:
      loss: {{name: kd, temperature: 4, alpha: 0.9}}
      train: {{epochs: 5, optimizer: adamw, lr: 0.003, weight_decay: 0.01}}
  - prune:
      speedup: 2.0
      steps: 2
      train: {{epochs: 1, optimizer: adamw, lr: 0.001, weight_decay: 0.0}}
  - quantize:
      mode: qat
      calibration_images: 256
      train: {{epochs: 1, optimizer: adamw, lr: 0.0001, weight_decay: 0.0}}
  - export: {{check_samples: 200, formats: [onnx, onnx-fp16, tensorrt]}}
  - bench: {{iterations: 30, warmup: 3, time_budget_s: 2, batch_size: 16, \
backends: [onnxruntime, torch], processes: 2}}
"""
STAGES = ["teacher", "distill", "prune", "quantize", "export", "bench"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    recipe = folder / "full.yaml"
    recipe.write_text(RECIPE.format())
    result = compress("run", recipe, "--out", folder / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe, folder / "out" / "full", result


def metrics(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "stage.json").read_text())["metrics"]


# A run to interrupt: the Ctrl-C test needs one of its own.
INTERRUPTED_RECIPE = """
name: tiny
seed: 0
{data}
teacher:
  model: cifar:resnet32
  train: {{epochs: 6, optimizer: adamw, lr: 0.003, weight_decay: 0.01}}
student:
  model: cifar:resnet20
stages:
  - teacher
  - distill:
      loss: {{name: kd, temperature: 4, alpha: 0.9}}
      train: {{epochs: 6, optimizer: adamw, lr: 0.003, weight_decay: 0.01}}
  - export
  - bench: {{iterations: 30, warmup: 3, time_budget_s: 2, batch_size: 16}}
"""


def test_pruned_student_has_half_the_macs_and_reloads_safely(finished_run):
    _, run_dir, _ = finished_run
    prune, distill = metrics(run_dir, "prune"), metrics(run_dir, "distill")
    assert prune["macs_before"] == distill["macs"]
    assert prune["macs_reduction"] == pytest.approx(distill["macs"] / prune["macs"])
    assert 1.8 <= prune["macs_reduction"] <= 2.2, prune
    assert prune["params"] < distill["params"]
    assert prune["top1"] > 80, (
        prune
    )  # digits: still far above chance (10%) after losing half its MACs
    checkpoint = torch.load(run_dir / "prune" / "model.pt", weights_only=True)
    assert set(checkpoint) == {"structure", "state_dict"}


def test_quantized_student_stays_close_to_its_float_version(finished_run):
    _, run_dir, _ = finished_run
    quantize, prune = metrics(run_dir, "quantize"), metrics(run_dir, "prune")
    assert quantize["source_stage"] == "prune"
    assert quantize["fp32_top1"] == pytest.approx(prune["top1"])
    assert quantize["top1"] >= quantize["fp32_top1"] - 3, quantize
    assert quantize["agreement_with_fp32"] >= 0.9, quantize
    assert quantize["quantization"]["target"] == "onnxruntime-cpu"


def test_int8_onnx_is_int8_and_matches_its_pytorch_model(finished_run):
    _, run_dir, _ = finished_run
    export = metrics(run_dir, "export")
    assert set(export) == {"teacher", "student_fp32", "student"}
    assert export["student_fp32"]["max_abs_diff"] <= 1e-3
    assert export["student"]["top1_agreement"] >= 0.98
    assert export["student"]["max_rel_diff"] <= 0.2 and export["student"]["relative"]
    qdq = export["student"]["qdq"]
    assert qdq["fp32_conv"] == 0 and qdq["qlinear_conv"] > 0, qdq
    model = onnx.load(run_dir / "student.onnx")
    int8 = [
        t
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4
    ]
    floats = [
        t
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4
    ]
    assert int8 and not floats, "every conv weight must be stored as INT8"
    uint8_zero_points = [
        t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8
    ]
    assert uint8_zero_points, "onnxruntime-cpu activations are uint8"
    portability = export["student"][
        "portability"
    ]  # the default weight range computes the same on every CPU
    assert (
        portability["portable"]
        and portability["weight_range"] == "pair-limit"
        and portability["worst_pair_sum"] <= 128
    )
    metadata = {p.key: p.value for p in model.metadata_props}
    assert (
        metadata["compress.int8_portable"] == "true"
        and metadata["compress.int8_weight_range"] == "pair-limit"
    )


def test_bench_compares_teacher_float_and_int8_students(finished_run):
    _, run_dir, result = finished_run
    bench = BenchResult.read(run_dir / "bench" / "bench.json")
    rows = {row.role: row for row in bench.rows if row.group == "onnxruntime"}
    assert set(rows) == {"teacher", "student_fp32", "student"}
    assert all(row.ok for row in rows.values()), rows
    teacher, fp32, int8 = rows["teacher"], rows["student_fp32"], rows["student"]
    assert int8.int8_portable is True and teacher.int8_portable is None
    assert bench.machine["cpu_features"]["arch"]
    assert int8.params == fp32.params  # INT8 weights are counted
    assert int8.file_bytes < fp32.file_bytes / 3 and fp32.macs < teacher.macs
    assert int8.top1 == pytest.approx(metrics(run_dir, "quantize")["top1"], abs=2.0)
    headline = metrics(run_dir, "bench")
    assert headline["int8_speedup_b1"] > 0 and headline["int8_size_reduction"] > 3
    assert headline["int8_agreement_with_fp32"] == bench.agreement["student"]["student_fp32"] >= 0.9
    assert "| Metric | teacher | student_fp32 |" in result.stdout


def test_second_run_skips_every_stage_and_changes_nothing(finished_run):
    recipe, run_dir, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    again = compress("run", recipe, "--out", run_dir.parent)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in STAGES:
        assert f"[{stage}] skipped (unchanged)" in again.stderr
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    changed = {p.name for p in after if after[p] != before.get(p)}
    # rewritten with the same content
    assert changed <= {"recipe.yaml", "report.json", "report.md", "report.png", "gates.md"}


def test_report_lists_every_model_with_its_exported_numbers_and_regenerates(finished_run):
    _, run_dir, _ = finished_run
    report = json.loads((run_dir / "report.json").read_text())
    models = {m["name"]: m for m in report["models"]}
    assert list(models) == ["teacher", "distill", "prune", "quantize"]
    assert (
        models["prune"]["onnx"]["file"] == "student_fp32.onnx"
        and models["quantize"]["onnx"]["file"] == "student.onnx"
    )
    assert models["distill"]["onnx"] is None and models["quantize"]["quantized"]
    bench = BenchResult.read(run_dir / "bench" / "bench.json")
    assert models["quantize"]["onnx"]["top1"] == bench.row("student").top1
    assert models["prune"]["vs_teacher"]["macs_reduction"] == pytest.approx(
        models["teacher"]["macs"] / models["prune"]["macs"]
    )
    assert report["pareto"] and set(report["pareto"]) <= {"teacher", "prune", "quantize"}
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| quantize (INT8)" in (run_dir / "report.md").read_text()
    more = {(m["model"], m["group"]): m for m in report["more"]}
    assert {
        ("student", "torch"),
        ("teacher", "onnxruntime, onnx-fp16"),
        ("student_fp32", "onnxruntime, onnx-fp16"),
    } <= set(more)
    assert (
        more[("student", "torch")]["file"] == "quantize"
        and "## Other formats and backends" in (run_dir / "report.md").read_text()
    )
    again = compress("report", run_dir)
    assert again.returncode == 0 and json.loads((run_dir / "report.json").read_text()) == report


def test_pareto_front_keeps_only_undominated_models():
    from compress.pipeline.report import pareto_front

    def model(name, ms, top1):
        return {"name": name, "onnx": {"p50_b1_ms": ms, "top1": top1}}

    models = [
        model("teacher", 3.0, 95.0),
        model("fast", 0.3, 90.0),
        model("dominated", 0.5, 89.0),
        model("middle", 1.0, 93.0),
        model("unmeasured", None, 99.0),
    ]
    assert pareto_front(models) == ["fast", "middle", "teacher"]


def tensorrt_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def test_fp16_files_are_verified_and_engines_skipped_without_tensorrt(finished_run):
    _, run_dir, result = finished_run
    export = metrics(run_dir, "export")
    for role in ("teacher", "student_fp32"):
        fp16 = export[role]["formats"]["onnx-fp16"]
        assert fp16["status"] == "ok" and fp16["file"] == f"{role}.fp16.onnx"
        assert fp16["max_rel_diff"] <= fp16["tolerance"] and fp16["top1_agreement"] >= 0.98
        model = onnx.load(run_dir / fp16["file"])
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        assert (run_dir / fp16["file"]).stat().st_size < 0.6 * (
            run_dir / f"{role}.onnx"
        ).stat().st_size
    assert export["student"]["formats"]["onnx-fp16"] == {
        "status": "skipped",
        "reason": "an INT8 model: an FP16 ONNX file holds a float model",
    }
    if not tensorrt_installed():
        engine = export["teacher"]["formats"]["tensorrt"]
        assert engine["status"] == "skipped" and "tensorrt" in engine["reason"]
        assert "warning: no TensorRT engine for teacher.onnx" in result.stderr
        assert not list(run_dir.glob("*.engine"))


def test_every_backend_gets_its_own_table_compared_within_it(finished_run):
    _, run_dir, result = finished_run
    bench = BenchResult.read(run_dir / "bench" / "bench.json")
    assert bench.groups == ("onnxruntime", "onnxruntime, onnx-fp16", "torch")
    rows = {row.role: row for row in bench.rows}
    assert {
        "teacher [torch]",
        "student_fp32 [torch]",
        "student [torch]",
        "teacher [onnxruntime, onnx-fp16]",
    } <= set(rows)
    assert all(row.ok for row in rows.values()), {r: row.error for r, row in rows.items()}
    # paired by round: the median of the per-round ratios of the two rows' process medians
    assert bench.ratios["student_fp32 [torch]"].speedup_b1 == pytest.approx(
        paired_speedup(
            rows["teacher [torch]"].latency_at(1), rows["student_fp32 [torch]"].latency_at(1)
        )[0]
    )
    assert (
        rows["student_fp32 [torch]"].macs == metrics(run_dir, "prune")["macs"]
        and rows["student_fp32 [torch]"].top1 is None
    )
    fp16, fp32 = rows["teacher [onnxruntime, onnx-fp16]"], rows["teacher"]
    assert abs(fp16.top1 - fp32.top1) <= 1.0 and fp16.file_bytes < 0.6 * fp32.file_bytes
    torch_table = result.stdout.split("### torch\n")[1]
    assert torch_table.startswith(
        "\n| Metric | teacher | student_fp32 | student_fp32 vs teacher | student | student vs "
        "teacher |"
    )


def test_compress_export_outside_a_run(finished_run, tmp_path):
    _, run_dir, _ = finished_run
    done = compress(
        "export",
        run_dir / "prune",
        "--format",
        "onnx",
        "--batch",
        "4",
        "--out",
        tmp_path / "pruned.onnx",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout)
    assert record["max_abs_diff"] <= 1e-3 and record["batch"] == 4
    dims = onnx.load(tmp_path / "pruned.onnx").graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 4
    from_stage = compress(
        "export",
        run_dir / "prune",
        "--format",
        "onnx-fp16",
        "--out",
        tmp_path / "fp16" / "pruned16.onnx",
    )
    assert from_stage.returncode == 0, from_stage.stderr[-2000:]
    assert [p.name for p in (tmp_path / "fp16").iterdir()] == [
        "pruned16.onnx"
    ]  # the FP32 file it came from is not left behind
    assert json.loads(from_stage.stdout)["onnx-fp16"]["max_rel_diff"] <= 0.02
    half = compress(
        "export",
        run_dir / "teacher.onnx",
        "--format",
        "onnx-fp16",
        "--out",
        tmp_path / "teacher16.onnx",
    )
    assert half.returncode == 0, half.stderr[-2000:]
    assert json.loads(half.stdout)["max_rel_diff"] <= 0.02
    for args, message in [
        ((run_dir / "bench", "--format", "onnx"), "not a finished stage holding a network"),
        ((run_dir / "teacher.onnx", "--format", "onnx"), "is already ONNX"),
        ((run_dir / "teacher.onnx", "--format", "tflite"), "unknown export format 'tflite'"),
        (
            (run_dir / "quantize", "--format", "onnx-fp16"),
            "an INT8 model: an FP16 ONNX file holds a float model",
        ),
    ] + (
        []
        if tensorrt_installed()
        else [((run_dir / "teacher.onnx", "--format", "tensorrt"), "pip install -e '.[tensorrt]'")]
    ):
        failed = compress("export", *args)
        assert (
            failed.returncode == 2 and message in failed.stderr and "Traceback" not in failed.stderr
        ), failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1


def test_compress_bench_of_stage_folders_needs_a_torch_backend(finished_run, tmp_path):
    _, run_dir, _ = finished_run
    wrong = compress("bench", run_dir / "prune")
    assert wrong.returncode == 2 and "use --backend torch" in wrong.stderr
    done = compress(
        "bench",
        run_dir / "prune",
        "--against",
        run_dir / "teacher",
        "--backend",
        "torch",
        "--iterations",
        "10",
        "--time-budget",
        "1",
        "--processes",
        "1",  # the fresh processes are tested in test_bench; here the stage folders are
        "--out",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    bench = BenchResult.read(tmp_path / "bench.json")
    assert [row.role for row in bench.rows] == ["prune", "teacher"]
    assert bench.ratios["prune"].speedup_b1 > 0


def test_int8_agreement_floor_on_a_real_run(finished_run):
    from compress.pipeline.config import GatesConfig
    from compress.pipeline.gates import gate_run

    _, run_dir, _ = finished_run
    agreement = BenchResult.read(run_dir / "bench" / "bench.json").agreement["student"][
        "student_fp32"
    ]
    [passed] = gate_run(GatesConfig(min_int8_agreement=agreement), run_dir)
    [failed] = gate_run(GatesConfig(min_int8_agreement=min(1.0, agreement + 0.001)), run_dir)
    assert passed.passed and passed.current == pytest.approx(100 * agreement)
    assert not failed.passed or agreement == 1.0
    assert "INT8 agreement with student_fp32" in (run_dir / "gates.md").read_text()
    done = compress("check", run_dir, "--min-int8-agreement", f"{max(0.0, agreement - 0.001):.4f}")
    assert done.returncode == 0 and "all 1 gates passed" in done.stdout, done.stdout


def test_every_artifact_is_written_and_self_describing(finished_run):
    _, run_dir, _ = finished_run
    for path in [
        "recipe.yaml",
        "teacher/model.pt",
        "distill/model.pt",
        "prune/model.pt",
        "quantize/model.pt",
        "teacher.onnx",
        "student_fp32.onnx",
        "student.onnx",
        "bench/bench.json",
        "bench/bench.md",
        "report.json",
    ]:
        assert (run_dir / path).is_file(), path
    for stage in STAGES:
        record = json.loads((run_dir / stage / "stage.json").read_text())
        assert record["stage"] == stage and len(record["key"]) == 16
        assert {"torch", "onnxruntime", "compress"} <= set(record["versions"])
        assert record["recipe"]["name"] == "full"
        assert 50 < record["peak_rss_mb"] < 20_000  # MiB: this process's, while the stage ran
        assert json.loads((run_dir / stage / "metrics.json").read_text()) == record["metrics"]
    assert not list(run_dir.rglob("*.tmp")), "temporary files left behind"


def test_distilled_student_learns_far_above_chance(finished_run):
    _, run_dir, _ = finished_run
    distill = metrics(run_dir, "distill")
    chance = 10.0
    assert distill["top1_at_start"] < 2 * chance
    assert distill["top1"] > 2.5 * chance, distill


def test_float_onnx_files_match_pytorch(finished_run):
    _, run_dir, _ = finished_run
    export = metrics(run_dir, "export")
    for role in ("teacher", "student_fp32"):
        assert export[role]["max_abs_diff"] <= 1e-3
        assert export[role]["top1_agreement"] >= 0.99
        assert export[role]["samples"] > 100


def test_bench_rows_have_sane_latency_memory_and_size(finished_run):
    _, run_dir, _ = finished_run
    bench = BenchResult.read(run_dir / "bench" / "bench.json")
    for row in (row for row in bench.rows if row.group == "onnxruntime"):
        assert row.ok, row
        assert [point.batch_size for point in row.latency] == [1, 16]
        for point in row.latency:
            ms = point.latency_ms
            assert 0 < ms.min <= ms.p50 <= ms.p90 <= ms.p99 <= ms.max
            assert point.throughput_ips > 0 and point.runs >= 5
        assert row.peak_rss_mb > 0 and row.file_bytes > 0 and row.macs > 0
        assert 0 <= row.top1 <= 100
    assert bench.ratios["student"].speedup_b1 > 0


def test_check_gates_a_real_result_against_itself(finished_run):
    _, run_dir, _ = finished_run
    result = compress("check", run_dir, "--baseline", run_dir / "bench" / "bench.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| student | top-1 (%) |" in result.stdout and "gates passed" in result.stdout


def test_recipe_gates_pass_against_itself_and_fail_on_a_better_baseline(finished_run, tmp_path):
    recipe, run_dir, _ = finished_run
    baseline = BenchResult.read(run_dir / "bench" / "bench.json")
    (tmp_path / "same.json").write_text(json.dumps(baseline.to_json()))
    same = compress(
        "run", recipe, "--out", run_dir.parent, "--set", f"gates.baseline={tmp_path / 'same.json'}"
    )
    assert same.returncode == 0, same.stderr[-2000:]
    assert "gates passed" in same.stdout and "gates passed" in (run_dir / "gates.md").read_text()
    better = replace(  # the baseline student was better: the new run is a regression
        baseline,
        rows=tuple(
            replace(row, top1=row.top1 + 5.0) if row.role == "student" else row
            for row in baseline.rows
        ),
    )
    (tmp_path / "better.json").write_text(json.dumps(better.to_json()))
    worse = compress(
        "run",
        recipe,
        "--out",
        run_dir.parent,
        "--set",
        f"gates.baseline={tmp_path / 'better.json'}",
        "--set",
        "gates.max_accuracy_drop=1",
    )
    assert worse.returncode == 1, worse.stderr[-2000:]
    assert (
        "| student | top-1 (%) |" in worse.stdout
        and "-5.00 pts | >= -1 pts | FAIL |" in worse.stdout
    )
    missing = compress(
        "run", recipe, "--out", run_dir.parent, "--set", f"gates.baseline={tmp_path / 'nope.json'}"
    )
    assert missing.returncode == 2 and "gates.baseline: no such file" in missing.stderr


def test_changing_a_stage_reruns_it_and_those_after(finished_run, tmp_path):
    recipe, run_dir, _ = finished_run
    copy = tmp_path / "out"
    subprocess.run(["cp", "-r", str(run_dir.parent), str(copy)], check=True)
    prune_before = json.loads((copy / "full" / "prune" / "stage.json").read_text())
    result = compress(
        "run", recipe, "--out", copy, "--set", "stages.quantize.calibration_images=128"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for stage in ("teacher", "distill", "prune"):
        assert f"[{stage}] skipped (unchanged)" in result.stderr
    for stage in ("quantize", "export", "bench"):
        assert f"[{stage}] done in" in result.stderr
    assert json.loads((copy / "full" / "prune" / "stage.json").read_text()) == prune_before
    quantize = json.loads((copy / "full" / "quantize" / "stage.json").read_text())
    assert quantize["config"]["calibration_images"] == 128


def test_ctrl_c_leaves_no_half_written_artifact_and_resume_completes(tmp_path, tiny_data_section):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(INTERRUPTED_RECIPE.format(data=tiny_data_section))
    # A shell's background job (`pytest &`) ignores SIGINT and its children inherit that, so the
    # child gets Ctrl-C's default disposition back whatever started the suite.
    proc = subprocess.Popen(
        [sys.executable, "-m", "compress", "run", str(recipe), "--out", str(tmp_path / "out")],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # in the middle of teacher training: after its first epoch checkpoint, 5 epochs before its
    # end (a fixed sleep was a race: on a fast, quiet CPU the teacher had finished by then)
    teacher_dir = tmp_path / "out" / "tiny" / "teacher"
    deadline = time.monotonic() + 120
    while not any(teacher_dir.glob("train-*.ckpt")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before its first teacher epoch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    run_dir = tmp_path / "out" / "tiny"
    assert not (run_dir / "teacher" / "stage.json").exists()
    # the run lock (an empty file the OS locks; kept, as removing it would race) is no temporary
    left = [p for p in run_dir.rglob("*") if p.name.startswith(".") and p != run_dir / LOCK_NAME]
    assert not left, "temporary files left behind"


def test_bench_command_standalone(finished_run, tmp_path):
    _, run_dir, _ = finished_run
    result = compress(
        "bench",
        run_dir / "student.onnx",
        "--against",
        run_dir / "teacher.onnx",
        "--iterations",
        10,
        "--warmup",
        1,
        "--time-budget",
        1,
        "--batch-size",
        8,
        "--out",
        tmp_path / "b",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    bench = BenchResult.read(tmp_path / "b" / "bench.json")
    assert [row.role for row in bench.rows] == ["student", "teacher"]
    assert bench.reference == "teacher" and all(row.ok for row in bench.rows)
    # the table puts the reference model first, whatever order the files were given in
    assert "| Metric | teacher | student | student vs teacher |" in result.stdout


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all", os.urandom(256)])
def test_bench_command_refuses_bad_files_cleanly(tmp_path, content):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(content)
    result = compress("bench", bad)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "model.onnx" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_list_prints_registries():
    result = compress("list")
    assert result.returncode == 0
    for name in (
        "teacher",
        "distill",
        "prune",
        "quantize",
        "export",
        "bench",
        "kd",
        "taylor",
        "cifar:resnet56",
        "torchvision:mobilenet_v2",
        "digits",
        "imagefolder",
    ):
        assert name in result.stdout
