"""End to end through the CLI in a subprocess: teacher -> distill -> ONNX -> bench, then resume."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import run_cli as compress

from compress.benchmark.rows import BenchResult
from compress.run_lock import LOCK_NAME

pytestmark = pytest.mark.slow

RECIPE = """
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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data_section):
    folder = tmp_path_factory.mktemp("e2e")
    recipe = folder / "tiny.yaml"
    recipe.write_text(RECIPE.format(data=tiny_data_section))
    result = compress("run", recipe, "--out", folder / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe, folder / "out" / "tiny", result


def stage_record(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "stage.json").read_text())


def test_every_artifact_is_written_and_self_describing(finished_run):
    _, run_dir, _ = finished_run
    for path in [
        "recipe.yaml",
        "teacher/model.pt",
        "distill/model.pt",
        "teacher.onnx",
        "student.onnx",
        "bench/bench.json",
        "bench/bench.md",
    ]:
        assert (run_dir / path).is_file(), path
    for stage in ["teacher", "distill", "export", "bench"]:
        record = stage_record(run_dir, stage)
        assert record["stage"] == stage and len(record["key"]) == 16
        assert {"torch", "onnxruntime", "compress"} <= set(record["versions"])
        assert record["recipe"]["name"] == "tiny"
        assert json.loads((run_dir / stage / "metrics.json").read_text()) == record["metrics"]
    assert not list(run_dir.rglob("*.tmp")), "temporary files left behind"


def test_distilled_student_learns_far_above_chance(finished_run):
    _, run_dir, _ = finished_run
    distill = stage_record(run_dir, "distill")["metrics"]
    chance = 10.0
    assert distill["top1_at_start"] < 2 * chance
    assert distill["top1"] > 2.5 * chance, distill
    assert distill["params"] < distill["teacher_params"]


def test_onnx_matches_pytorch(finished_run):
    _, run_dir, _ = finished_run
    export = stage_record(run_dir, "export")["metrics"]
    for role in ("teacher", "student"):
        assert export[role]["max_abs_diff"] <= 1e-3
        assert export[role]["top1_agreement"] >= 0.99
        assert export[role]["samples"] > 100


def test_bench_json_has_sane_fields(finished_run):
    _, run_dir, result = finished_run
    bench = BenchResult.read(run_dir / "bench" / "bench.json")
    assert [row.role for row in bench.rows] == ["teacher", "student"]
    for row in bench.rows:
        assert row.ok, row
        assert [point.batch_size for point in row.latency] == [1, 16]
        for point in row.latency:
            ms = point.latency_ms
            assert 0 < ms.min <= ms.p50 <= ms.p90 <= ms.p99 <= ms.max
            assert point.throughput_ips > 0 and point.runs >= 5
        assert row.peak_rss_mb > 0 and row.file_bytes > 0 and row.macs > 0
        assert 0 <= row.top1 <= 100
    teacher, student = bench.row("teacher"), bench.row("student")
    assert student.params < teacher.params and student.macs < teacher.macs
    # the exported student's own accuracy equals the PyTorch student's on the same test split
    distill = stage_record(run_dir, "distill")["metrics"]
    assert student.top1 == pytest.approx(distill["top1"], abs=1.0)
    assert bench.ratios["student"].speedup_b1 > 0
    assert "| Metric | teacher | student | student vs teacher |" in result.stdout


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


def test_second_run_skips_everything_and_changes_nothing(finished_run):
    recipe, run_dir, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    again = compress("run", recipe, "--out", run_dir.parent)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in ("teacher", "distill", "export", "bench"):
        assert f"[{stage}] skipped (unchanged)" in again.stderr
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    changed = {p.name for p in after if after[p] != before.get(p)}
    assert changed <= {
        "recipe.yaml",
        "report.json",
        "report.md",
        "report.png",
        "gates.md",
    }  # rewritten, same content


def test_changing_a_stage_reruns_it_and_those_after(finished_run, tmp_path):
    recipe, run_dir, _ = finished_run
    copy = tmp_path / "out"
    subprocess.run(["cp", "-r", str(run_dir.parent), str(copy)], check=True)
    teacher_before = stage_record(copy / "tiny", "teacher")
    result = compress(
        "run",
        recipe,
        "--out",
        copy,
        "--set",
        "stages.distill.loss.temperature=2",
        "--set",
        "stages.distill.train.epochs=1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[teacher] skipped (unchanged)" in result.stderr
    for stage in ("distill", "export", "bench"):
        assert f"[{stage}] done in" in result.stderr
    assert stage_record(copy / "tiny", "teacher") == teacher_before
    assert stage_record(copy / "tiny", "distill")["config"]["loss"][0]["temperature"] == 2.0


def test_ctrl_c_leaves_no_half_written_artifact_and_resume_completes(tmp_path, tiny_data_section):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE.format(data=tiny_data_section).replace("epochs: 6", "epochs: 30"))
    # A shell's background job (`pytest &`) ignores SIGINT and its children inherit that, so the
    # child gets Ctrl-C's default disposition back whatever started the suite.
    proc = subprocess.Popen(
        [sys.executable, "-m", "compress", "run", str(recipe), "--out", str(tmp_path / "out")],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(8)  # in the middle of teacher training
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    run_dir = tmp_path / "out" / "tiny"
    assert not (run_dir / "teacher" / "stage.json").exists()
    # the run lock (an empty file the OS locks; kept, as removing it would race) is no temporary
    left = [p for p in run_dir.rglob("*") if p.name.startswith(".") and p != run_dir / LOCK_NAME]
    assert not left, "temporary files left behind"


def test_bench_command_standalone(finished_run, tmp_path, tiny_data_section):
    _, run_dir, _ = finished_run
    data_args = []
    from conftest import cifar10_folder

    if cifar10_folder() is not None:
        data_args = ["--data", cifar10_folder(), "--eval-samples", 300]
    result = compress(
        "bench",
        run_dir / "student.onnx",
        "--against",
        run_dir / "teacher.onnx",
        *data_args,
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
    assert bench.reference == "teacher"
    assert (
        "| Metric | student | teacher | student vs teacher |" in result.stdout
        or "student" in result.stdout
    )


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
