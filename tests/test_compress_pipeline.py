"""End to end through the CLI: teacher -> distill -> prune -> QAT -> export -> bench, on real
images, then resume. The numbers asserted are the ones the run itself recorded."""

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

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
  - export: {{check_samples: 200}}
  - bench: {{iterations: 30, warmup: 3, time_budget_s: 2, batch_size: 16}}
"""
STAGES = ["teacher", "distill", "prune", "quantize", "export", "bench"]


def compress(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress", *map(str, args)], capture_output=True, text=True)


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


def test_pruned_student_has_half_the_macs_and_reloads_safely(finished_run):
    _, run_dir, _ = finished_run
    prune, distill = metrics(run_dir, "prune"), metrics(run_dir, "distill")
    assert prune["macs_before"] == distill["macs"]
    assert prune["macs_reduction"] == pytest.approx(distill["macs"] / prune["macs"])
    assert 1.8 <= prune["macs_reduction"] <= 2.2, prune
    assert prune["params"] < distill["params"]
    assert prune["top1"] > 80, prune  # digits: still far above chance (10%) after losing half its MACs
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
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4]
    assert int8 and not floats, "every conv weight must be stored as INT8"
    uint8_zero_points = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert uint8_zero_points, "onnxruntime-cpu activations are uint8"


def test_bench_compares_teacher_float_and_int8_students(finished_run):
    _, run_dir, result = finished_run
    bench = json.loads((run_dir / "bench" / "bench.json").read_text())
    rows = {row["role"]: row for row in bench["rows"]}
    assert set(rows) == {"teacher", "student_fp32", "student"}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    assert rows["student"]["params"] == rows["student_fp32"]["params"]  # INT8 weights are counted
    assert rows["student"]["file_bytes"] < rows["student_fp32"]["file_bytes"] / 3
    assert rows["student_fp32"]["macs"] < rows["teacher"]["macs"]
    assert rows["student"]["top1"] == pytest.approx(metrics(run_dir, "quantize")["top1"], abs=2.0)
    headline = metrics(run_dir, "bench")
    assert headline["int8_speedup_b1"] > 0 and headline["int8_size_reduction"] > 3
    assert headline["int8_agreement_with_fp32"] == bench["agreement"]["student"]["student_fp32"] >= 0.9
    assert "| Metric | teacher | student_fp32 |" in result.stdout


def test_second_run_skips_every_stage(finished_run):
    recipe, run_dir, _ = finished_run
    again = compress("run", recipe, "--out", run_dir.parent)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in STAGES:
        assert f"[{stage}] skipped (unchanged)" in again.stderr


def test_report_lists_every_model_with_its_exported_numbers_and_regenerates(finished_run):
    _, run_dir, _ = finished_run
    report = json.loads((run_dir / "report.json").read_text())
    models = {m["name"]: m for m in report["models"]}
    assert list(models) == ["teacher", "distill", "prune", "quantize"]
    assert models["prune"]["onnx"]["file"] == "student_fp32.onnx" and models["quantize"]["onnx"]["file"] == "student.onnx"
    assert models["distill"]["onnx"] is None and models["quantize"]["quantized"]
    bench = {row["role"]: row for row in json.loads((run_dir / "bench" / "bench.json").read_text())["rows"]}
    assert models["quantize"]["onnx"]["top1"] == bench["student"]["top1"]
    assert models["prune"]["vs_teacher"]["macs_reduction"] == pytest.approx(models["teacher"]["macs"] / models["prune"]["macs"])
    assert report["pareto"] and set(report["pareto"]) <= {"teacher", "prune", "quantize"}
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| quantize (INT8)" in (run_dir / "report.md").read_text()
    again = compress("report", run_dir)
    assert again.returncode == 0 and json.loads((run_dir / "report.json").read_text()) == report


def test_pareto_front_keeps_only_undominated_models():
    from compress.report import pareto_front

    def model(name, ms, top1):
        return {"name": name, "onnx": {"p50_b1_ms": ms, "top1": top1}}

    models = [model("teacher", 3.0, 95.0), model("fast", 0.3, 90.0), model("dominated", 0.5, 89.0), model("middle", 1.0, 93.0), model("unmeasured", None, 99.0)]
    assert pareto_front(models) == ["fast", "middle", "teacher"]
