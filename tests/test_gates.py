"""`compress check`: passes on equal results, fails (exit 1) on each planted regression, and
compares latency as a ratio to the run's reference model so a slower machine is not a regression."""

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from compress.benchmark.rows import BenchResult
from compress.cli import cli
from compress.errors import DataError
from compress.pipeline.config import GatesConfig
from compress.pipeline.gates import check, load_bench_result

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def row(role, top1, p50_ms, size):
    latency = [
        {"batch_size": 1, "status": "ok", "latency_ms": {"p50": p50_ms}},
        {"batch_size": 64, "status": "ok", "latency_ms": {"p50": 20 * p50_ms}},
    ]
    return {
        "role": role,
        "status": "ok",
        "error": None,
        "top1": top1,
        "file_bytes": size,
        "latency": latency,
    }


BASELINE = {
    "reference": "teacher",
    "rows": [
        row("teacher", 95.0, 3.0, 40_000_000),
        row("student_fp32", 93.0, 0.6, 4_000_000),
        row("student", 92.8, 0.3, 1_000_000),
    ],
}


def run_check(tmp_path, current, *options):
    (tmp_path / "baseline.json").write_text(json.dumps(BASELINE))
    (tmp_path / "current.json").write_text(json.dumps(current))
    return CliRunner().invoke(
        cli,
        [
            "check",
            str(tmp_path / "current.json"),
            "--baseline",
            str(tmp_path / "baseline.json"),
            *options,
        ],
    )


def planted(role, **changes):
    current = copy.deepcopy(BASELINE)
    target = next(r for r in current["rows"] if r["role"] == role)
    for key, value in changes.items():
        if key == "p50_ms":
            target["latency"][0]["latency_ms"]["p50"] = value
        else:
            target[key] = value
    return current


def test_equal_results_pass(tmp_path):
    result = run_check(tmp_path, BASELINE)
    assert result.exit_code == 0, result.output
    assert "all 8 gates passed" in result.output and "FAIL" not in result.output


def test_rows_that_never_carry_accuracy_get_no_accuracy_gate(tmp_path):
    # a PyTorch backend's rows time a checkpoint and measure no top-1, in the baseline as now
    with_torch_rows = copy.deepcopy(BASELINE)
    with_torch_rows["rows"].append(row("student [torch]", None, 1.2, 2_000_000))
    (tmp_path / "baseline.json").write_text(json.dumps(with_torch_rows))
    (tmp_path / "current.json").write_text(json.dumps(with_torch_rows))
    result = CliRunner().invoke(
        cli,
        ["check", str(tmp_path / "current.json"), "--baseline", str(tmp_path / "baseline.json")],
    )
    assert result.exit_code == 0, result.output
    assert "all 10 gates passed" in result.output
    assert "| student [torch] | top-1" not in result.output
    lost = copy.deepcopy(with_torch_rows)
    lost["rows"][2]["top1"] = None  # a row that had accuracy and lost it still fails
    (tmp_path / "current.json").write_text(json.dumps(lost))
    result = CliRunner().invoke(
        cli,
        ["check", str(tmp_path / "current.json"), "--baseline", str(tmp_path / "baseline.json")],
    )
    assert (
        result.exit_code == 1 and "| student | top-1 (%) | 92.8 | — | not measured" in result.output
    )


@pytest.mark.parametrize(
    ("current", "failing"),
    [
        (planted("student", top1=92.1), "| student | top-1 (%) | 92.8 | 92.1 | -0.70 pts"),
        (
            planted("student", p50_ms=0.36),
            "| student | p50 batch 1 / teacher's | 0.1 | 0.12 | +20.0%",
        ),
        (
            planted("student_fp32", file_bytes=4_400_000),
            "| student_fp32 | file size (bytes) | 4,000,000 | 4,400,000 | +10.0%",
        ),
        (
            planted("student", status="error", error="latency: worker crashed"),
            "| student | status | — | — | error: latency: worker crashed",
        ),
    ],
)
def test_each_planted_regression_fails_with_exit_1(tmp_path, current, failing):
    result = run_check(tmp_path, current)
    assert result.exit_code == 1, result.output
    assert failing in result.output and "1 of " in result.output


def test_a_missing_model_fails(tmp_path):
    current = copy.deepcopy(BASELINE)
    current["rows"] = current["rows"][:2]
    result = run_check(tmp_path, current)
    assert result.exit_code == 1 and "| student | status | — | — | missing |" in result.output


def test_a_slower_machine_is_no_regression_in_relative_mode_but_is_in_absolute(tmp_path):
    slower = copy.deepcopy(BASELINE)
    for r in slower["rows"]:
        r["latency"][0]["latency_ms"]["p50"] *= 2
    assert run_check(tmp_path, slower).exit_code == 0
    absolute = run_check(tmp_path, slower, "--latency", "absolute")
    assert absolute.exit_code == 1 and "+100.0%" in absolute.output


def test_tolerances_from_the_command_line(tmp_path):
    current = planted("student", top1=92.1, p50_ms=0.36)
    assert run_check(tmp_path, current).exit_code == 1
    assert (
        run_check(
            tmp_path, current, "--max-accuracy-drop", "1", "--max-latency-increase", "25%"
        ).exit_code
        == 0
    )
    assert (
        run_check(
            tmp_path, current, "--max-accuracy-drop", "1", "--max-latency-increase", "0.25"
        ).exit_code
        == 0
    )
    bad = run_check(tmp_path, current, "--max-latency-increase", "ten")
    assert bad.exit_code == 2 and "expected a percentage" in bad.output


def test_accuracy_better_and_faster_pass():
    current = planted("student", top1=94.0, p50_ms=0.2, file_bytes=900_000)
    assert all(
        r.passed
        for r in check(
            BenchResult.from_json(current), BenchResult.from_json(BASELINE), GatesConfig()
        )
    )


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"rows": [{"no_role": 1}]}'])
def test_a_file_that_is_not_a_bench_result_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bench.json"
    path.write_text(content)
    with pytest.raises(DataError, match="bench.json"):
        load_bench_result(path)
    result = CliRunner().invoke(cli, ["check", str(path), "--baseline", str(path)])
    assert (
        result.exit_code == 2
        and result.output.startswith("error: ")
        and "Traceback" not in result.output
    )


def test_run_folder_and_bench_folder_are_accepted(tmp_path):
    (tmp_path / "run" / "bench").mkdir(parents=True)
    (tmp_path / "run" / "bench" / "bench.json").write_text(json.dumps(BASELINE))
    assert (
        load_bench_result(tmp_path / "run")
        == load_bench_result(tmp_path / "run" / "bench")
        == BenchResult.from_json(BASELINE)
    )


@pytest.mark.parametrize(("agreement", "code"), [(0.995, 0), (0.985, 1), (None, 1)])
def test_int8_agreement_floor_needs_no_baseline(tmp_path, agreement, code):
    current = copy.deepcopy(BASELINE)
    if agreement is not None:
        current["agreement"] = {"student": {"student_fp32": agreement, "teacher": 0.9}}
    (tmp_path / "current.json").write_text(json.dumps(current))
    result = CliRunner().invoke(
        cli, ["check", str(tmp_path / "current.json"), "--min-int8-agreement", "99%"]
    )
    assert result.exit_code == code, result.output
    expected = (
        f"| {100 * agreement:.4g} |  | >= 99% | {'PASS' if code == 0 else 'FAIL'} |"
        if agreement
        else "not measured"
    )
    assert (
        "| student | INT8 agreement with student_fp32 (%) |" in result.output
        and expected in result.output
    )


def test_check_with_nothing_to_check_is_a_usage_error(tmp_path):
    (tmp_path / "current.json").write_text(json.dumps(BASELINE))
    result = CliRunner().invoke(cli, ["check", str(tmp_path / "current.json")])
    assert result.exit_code == 2 and "nothing to check" in result.output


def test_recipe_floor_alone_turns_the_gates_on():
    assert (
        not GatesConfig().active
        and GatesConfig(min_int8_agreement=0.99).active
        and GatesConfig(baseline="b.json").active
    )


@pytest.mark.parametrize(
    "name", ["baselines/quickstart.json", "results/cifar10-short-bench.json"]
)  # the committed baseline, and a result written before rows named their backend and format
def test_committed_bench_results_read_back_into_the_same_file(name):
    raw = json.loads((BENCHMARKS / name).read_text())
    result = BenchResult.from_json(raw)
    assert json.dumps(result.to_json()) == json.dumps(raw)  # same keys, values and key order
    assert all(r.passed for r in check(result, result, GatesConfig()))


def test_keys_missing_from_an_old_file_read_as_none_and_unknown_keys_are_ignored():
    raw = json.loads((BENCHMARKS / "baselines" / "quickstart.json").read_text())
    for key in ("agreement", "groups"):
        del raw[key]
    for r in raw["rows"]:
        for key in ("backend", "format", "int8_portable", "gpu_peak_mb", "model", "group"):
            r.pop(key)
        for point in r["latency"]:
            del point["cv"], point["noisy"], point["latency_ms"]["p95"]
    old = copy.deepcopy(raw)
    raw["written_by"] = "a newer compress"
    raw["ratios"]["student"]["new_ratio"] = 2.0
    raw["rows"][0]["new_field"] = {"any": "thing"}
    raw["rows"][0]["latency"][0]["new_field"] = 1
    raw["rows"][0]["latency"][0]["latency_ms"]["p999"] = 9.0

    result = BenchResult.from_json(raw)
    teacher = result.row("teacher")
    assert result.groups is None and result.agreement is None
    assert (teacher.backend, teacher.format, teacher.model, teacher.group) == (None,) * 4
    assert teacher.model_name == "teacher" and teacher.latency[0].cv is None
    assert teacher.latency[0].latency_ms.p95 is None and teacher.p50_ms(1) > 0
    assert result.to_json() == old  # what an old file holds, it writes back; nothing more
    assert all(r.passed for r in check(result, result, GatesConfig()))
