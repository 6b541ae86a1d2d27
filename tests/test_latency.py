"""Several processes per model: the median of their medians, their spread and the unstable flag,
ratios paired by round, the interleaving order, and results written before processes existed.

Everything here runs on synthetic per-process numbers or a fake backend: no timing decides a
test (the end-to-end run with real processes is in test_bench.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from compress.benchmark.latency import (
    NOISE_BAR,
    LatencyJob,
    combine,
    measure_interleaved,
    measure_latency,
    paired_ratio,
    paired_speedup,
    spread,
    unstable,
)
from compress.benchmark.ratios import compare
from compress.benchmark.rows import BenchResult, BenchRow, LatencyPoint, ProcessLatency
from compress.benchmark.spec import BenchConfig
from compress.benchmark.table import bench_table_markdown
from compress.errors import DataError, RecipeError, StageError
from compress.pipeline.config import GatesConfig
from compress.pipeline.gates import check
from compress.pipeline.recipe.load import load_recipe

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def process_result(p50: float, *, batch_size: int = 1, runs: int = 100, peak: float = 80.0):
    """What one measuring process returns for one batch size (see onnxruntime.measure)."""
    return {
        "status": "ok",
        "error": None,
        "batches": [
            {
                "batch_size": batch_size,
                "status": "ok",
                "latency_ms": {
                    "p50": p50,
                    "p90": p50 * 1.1,
                    "p95": p50 * 1.2,
                    "p99": p50 * 1.3,
                    "mean": p50 * 1.05,
                    "std": p50 * 0.03,
                    "min": p50 * 0.9,
                    "max": p50 * 1.5,
                },
                "cv": 0.03,
                "noisy": False,
                "runs": runs,
                "total_s": runs * p50 / 1000,
                "throughput_ips": batch_size * 1000 / p50,
            }
        ],
        "peak_rss_mb": peak,
        "baseline_rss_mb": 50.0,
        "model_rss_mb": peak - 50.0,
        "providers": ["CPUExecutionProvider"],
        "threads": 1,
    }


# --- the maths -------------------------------------------------------------------------------


def test_spread_is_range_over_median_and_needs_two_values():
    assert spread([1.0, 1.1, 0.9]) == pytest.approx(0.2)
    assert spread([0.38, 0.62, 0.40]) == pytest.approx((0.62 - 0.38) / 0.40)
    assert spread([2.0, None, 2.0]) == 0.0
    assert spread([5.0]) is None and spread([]) is None
    assert unstable(spread([1.0, 1.0, 1.0 + NOISE_BAR * 1.01])) is True
    assert unstable(spread([1.0, 1.0, 1.0 + NOISE_BAR * 0.99])) is False
    assert unstable(None) is None


def test_paired_ratio_is_the_median_of_per_round_ratios():
    ratio, found = paired_ratio([4.0, 4.0, 6.0], [1.0, 2.0, 2.0])  # rounds: 4, 2, 3
    assert ratio == pytest.approx(3.0) and found == pytest.approx((4 - 2) / 3)
    # a failed process (None) leaves its round out; nothing in common: no ratio
    assert paired_ratio([4.0, None, 6.0], [2.0, 1.0, 3.0]) == (pytest.approx(2.0), 0.0)
    assert paired_ratio([None, 4.0], [1.0, None]) == (None, None)
    assert paired_ratio([4.0], [2.0]) == (2.0, None)  # one round: no spread


def test_pairing_cancels_a_slow_spell_that_hits_both_models_of_a_round():
    # rounds 0 and 4 ran while the machine was twice as slow: each model's own median is then
    # a draw between states, but within a round both models saw the same machine
    reference = [8.0, 4.0, 4.0, 4.0, 8.0]
    student = [2.0, 1.0, 1.0, 2.0, 2.0]  # round 3: only the student's process was slow
    assert sorted(reference)[2] / sorted(student)[2] == 2.0  # medians compared apart
    assert paired_ratio(reference, student)[0] == 4.0  # paired: the speed-up of 4 rounds of 5


def test_combine_takes_the_median_process_and_flags_disagreeing_processes():
    # two modes 1.6x apart, as measured for the quickstart INT8 student
    results = [process_result(0.40, peak=80), process_result(0.62, peak=85), process_result(0.38)]
    combined = combine(results)
    point = LatencyPoint.from_json(combined["batches"][0])
    assert combined["status"] == "ok" and combined["error"] is None
    assert point.latency_ms.p50 == 0.40  # the median of 0.40, 0.62, 0.38
    assert [p.p50_ms for p in point.processes] == [0.40, 0.62, 0.38]  # in the order they ran
    assert [p.runs for p in point.processes] == [100, 100, 100]
    assert point.spread == pytest.approx((0.62 - 0.38) / 0.40) and point.unstable is True
    # percentiles and CV of the median process; extremes over all; sums of runs and time
    assert point.latency_ms.p90 == pytest.approx(0.44) and point.latency_ms.p99 == 0.40 * 1.3
    assert point.latency_ms.min == pytest.approx(0.38 * 0.9)
    assert point.latency_ms.max == pytest.approx(0.62 * 1.5)
    assert point.runs == 300 and point.total_s == pytest.approx(100 * (0.40 + 0.62 + 0.38) / 1000)
    assert point.throughput_ips == pytest.approx(1000 / 0.40)  # median of the throughputs
    assert combined["peak_rss_mb"] == 85 and combined["model_rss_mb"] == 35  # the largest
    assert combined["providers"] == ["CPUExecutionProvider"]


def test_combine_agreeing_processes_are_stable_and_one_process_is_as_before():
    point = LatencyPoint.from_json(
        combine([process_result(1.00), process_result(1.02), process_result(0.99)])["batches"][0]
    )
    assert point.latency_ms.p50 == 1.00 and point.unstable is False
    single = combine([process_result(0.5)])
    alone = single["batches"][0]
    original = process_result(0.5)["batches"][0]
    assert alone["latency_ms"] == original["latency_ms"]
    assert {k: alone[k] for k in ("runs", "total_s", "throughput_ips", "cv")} == {
        k: original[k] for k in ("runs", "total_s", "throughput_ips", "cv")
    }
    assert alone["spread"] is None and alone["unstable"] is None
    assert alone["processes"] == [{"p50_ms": 0.5, "throughput_ips": 2000.0, "runs": 100}]


def test_combine_even_count_uses_the_true_median_and_the_slower_middle_process():
    point = LatencyPoint.from_json(
        combine([process_result(v) for v in (1.0, 1.4, 1.2, 3.0)])["batches"][0]
    )
    assert point.latency_ms.p50 == pytest.approx(1.3)
    assert point.latency_ms.p90 == pytest.approx(1.4 * 1.1)  # the 1.4 ms process's
    # two processes far apart (as measured: 0.245 and 0.441 ms): the statistics stay ordered
    apart = LatencyPoint.from_json(
        combine([process_result(0.245), process_result(0.441)])["batches"][0]
    ).latency_ms
    assert apart.p50 == pytest.approx(0.343)
    assert apart.min <= apart.p50 <= apart.p90 <= apart.p99 <= apart.max


def test_combine_keeps_the_processes_that_worked_and_says_which_failed():
    crashed = {"status": "error", "error": "the measuring process was killed by SIGSEGV"}
    combined = combine([process_result(1.0), crashed, process_result(1.1)])
    point = LatencyPoint.from_json(combined["batches"][0])
    assert combined["status"] == "error"
    assert combined["error"] == "the measuring process was killed by SIGSEGV (process 2 of 3)"
    assert point.ok and point.latency_ms.p50 == pytest.approx(1.05)
    assert point.processes[1] == ProcessLatency(error=crashed["error"])
    assert paired_speedup(point, point) == (1.0, 0.0)  # round 2 is left out of pairs

    broken = {"status": "error", "error": "InvalidGraph: bad file"}
    assert combine([broken, broken]) == {
        "status": "error",
        "error": "InvalidGraph: bad file (all 2 processes)",
    }
    assert combine([broken]) == {"status": "error", "error": "InvalidGraph: bad file"}


# --- the interleaving ------------------------------------------------------------------------


class RecordingBackend:
    """A backend that records what it was asked to measure, in order, and answers at once."""

    name = "fake"

    def __init__(self, answers: dict[str, list[dict]] | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.answers = answers or {}

    def measure(self, path, **settings) -> dict:
        self.calls.append((Path(path).name, settings))
        queued = self.answers.get(Path(path).name)
        return queued.pop(0) if queued else process_result(1.0)


def test_rounds_interleave_the_models_and_split_the_time_budget():
    backend = RecordingBackend()
    cfg = BenchConfig(processes=3, time_budget_s=6.0, iterations=40, warmup=4, threads=1)
    jobs = [LatencyJob(Path("a.onnx"), (1, 64)), LatencyJob(Path("b.onnx"), (4,))]
    results = measure_interleaved(backend, jobs, cfg)
    assert [name for name, _ in backend.calls] == ["a.onnx", "b.onnx"] * 3  # A B A B A B
    for name, settings in backend.calls:
        assert settings == {
            "batch_sizes": [1, 64] if name == "a.onnx" else [4],
            "warmup": 4,  # every fresh process warms up
            "iterations": 40,  # at most, per process
            "time_budget_s": 2.0,  # the budget split among the processes, not multiplied
            "threads": 1,
        }
    assert [len(r["batches"][0]["processes"]) for r in results] == [3, 3]
    unlimited = RecordingBackend()
    measure_interleaved(unlimited, jobs, BenchConfig(processes=2, time_budget_s=None))
    assert all(settings["time_budget_s"] is None for _, settings in unlimited.calls)


def test_a_model_that_cannot_load_is_not_started_again():
    broken = {"status": "error", "error": "InvalidProtobuf: not an ONNX file"}
    backend = RecordingBackend({"bad.onnx": [broken]})
    jobs = [LatencyJob(Path("bad.onnx"), (1,)), LatencyJob(Path("good.onnx"), (1,))]
    bad, good = measure_interleaved(backend, jobs, BenchConfig(processes=3))
    assert [name for name, _ in backend.calls] == ["bad.onnx"] + ["good.onnx"] * 3
    assert bad == broken and good["status"] == "ok"


def test_measure_latency_is_the_library_call_a_search_can_use(monkeypatch):
    backend = RecordingBackend(
        {
            "ref.onnx": [process_result(4.0), process_result(8.0), process_result(4.0)],
            "cand.onnx": [process_result(2.0), process_result(4.0), process_result(2.1)],
            "bad.onnx": [{"status": "error", "error": "Fail: no such file"}],
        }
    )
    monkeypatch.setattr("compress.benchmark.latency.BACKENDS", {"onnxruntime": backend})
    reference, candidate = measure_latency(["ref.onnx", "cand.onnx"], BenchConfig(processes=3))
    assert [name for name, _ in backend.calls] == ["ref.onnx", "cand.onnx"] * 3
    assert backend.calls[0][1]["batch_sizes"] == [1]
    assert [p.p50_ms for p in candidate.processes] == [2.0, 4.0, 2.1]
    assert paired_speedup(reference, candidate)[0] == pytest.approx(2.0)  # round 2: slow machine
    with pytest.raises(StageError, match="bad.onnx: could not time it: Fail: no such file"):
        measure_latency(["bad.onnx"], BenchConfig(processes=3))


def test_processes_is_a_validated_recipe_setting():
    assert BenchConfig().processes % 2 == 1  # odd: the median is one process's own number
    with pytest.raises(RecipeError, match=r"processes: expected 1\.\.50"):
        BenchConfig(processes=0)
    recipe = load_recipe(RECIPES / "quickstart.yaml", ["stages.bench.processes=3"])
    assert next(s.config for s in recipe.stages if s.kind == "bench").processes == 3


# --- ratios, table and gates read the pairs --------------------------------------------------


def row_with_processes(role: str, p50s: list[float]) -> BenchRow:
    point = LatencyPoint.from_json(combine([process_result(v) for v in p50s])["batches"][0])
    return BenchRow(role=role, status="ok", latency=(point,))


def test_ratios_are_paired_by_round_with_their_spread():
    teacher = row_with_processes("teacher", [4.0, 4.2, 4.0])
    student = row_with_processes("student", [1.0, 1.05, 2.0])  # rounds: 4.0, 4.0, 2.0
    ratios = compare([teacher, student]).ratios["student"]
    assert ratios.speedup_b1 == pytest.approx(4.0)
    assert ratios.speedup_b1_spread == pytest.approx(0.5)
    assert ratios.speedup_throughput == pytest.approx(4.0)  # throughput pairs alike
    assert ratios.speedup_throughput_spread == pytest.approx(0.5)
    assert teacher.p50_ms(1) / student.p50_ms(1) == pytest.approx(4.0 / 1.05)  # unpaired

    table = bench_table_markdown(compare([teacher, student]))
    assert "| Latency p50, batch 1 (ms) | 4.000 | 1.050 | 4.00× faster (spread 50.0%) |" in table
    assert "| Latency spread over processes, batch 1 (%) | 5.0 | 95.2 (unstable) |  |" in table
    assert (
        "Unstable (process medians more than 10% apart): student (batch 1: 1.000, 1.050, "
        "2.000 ms)." in table
    )
    assert "teacher (batch 1" not in table.split("Unstable")[1]


def test_the_relative_latency_gate_uses_the_paired_speedup_and_names_unstable_models():
    teacher = row_with_processes("teacher", [4.0, 4.2, 4.0])
    baseline = compare([teacher, row_with_processes("student", [1.0, 1.0, 1.0])])
    current = compare([teacher, row_with_processes("student", [1.0, 1.05, 2.0])])
    gate = next(r for r in check(current, baseline, GatesConfig()) if "p50" in r.metric)
    # paired: 1 / 4.0 now and before (the medians apart would say 1.05 / 4.0: +5%)
    assert gate.baseline == pytest.approx(0.25) and gate.current == pytest.approx(0.25)
    assert gate.passed and gate.change == "+0.0% (unstable: student)"


def test_the_report_takes_the_benchs_paired_speedup():
    from compress.pipeline.report import _paired_speedups, _ratios

    result = compare(
        [
            row_with_processes("teacher", [4.0, 4.2, 4.0]),
            row_with_processes("student", [1, 1.05, 2]),
        ]
    )
    export = SimpleNamespace(kind="export", metrics={"student": {"stage": "prune"}})
    speedups = _paired_speedups(result, [export])
    assert speedups == {"prune": pytest.approx(4.0)}
    entry = {"top1": 90.0, "params": 1, "onnx": {"p50_b1_ms": 1.05}}
    teacher = {"top1": 95.0, "params": 4, "onnx": {"p50_b1_ms": 4.0}}
    assert _ratios(entry, teacher, speedups["prune"])["speedup_b1"] == pytest.approx(4.0)
    assert _ratios(entry, teacher)["speedup_b1"] == pytest.approx(4.0 / 1.05)  # old runs


# --- results written before processes --------------------------------------------------------


@pytest.mark.parametrize("name", ["baselines/quickstart.json", "results/cifar10-short-bench.json"])
def test_old_results_read_without_processes_and_keep_their_ratios(name):
    raw = json.loads((BENCHMARKS / name).read_text())
    result = BenchResult.from_json(raw)
    points = [p for row in result.rows for p in row.latency]
    assert points and all(p.processes == () and p.spread is None for p in points)
    assert all(p.unstable is None for p in points)
    recomputed = compare(result.rows, result.reference)  # falls back to the headline p50s
    for role, ratios in result.ratios.items():
        assert recomputed.ratios[role].speedup_b1 == pytest.approx(ratios.speedup_b1)
        assert recomputed.ratios[role].speedup_b1_spread is None
    assert json.dumps(recomputed.ratios["student"].to_json()) == json.dumps(
        raw["ratios"]["student"]
    )  # written back key for key: no spread keys appear


def test_a_result_with_processes_round_trips_and_a_bad_process_number_is_refused(tmp_path):
    result = compare(
        [row_with_processes("teacher", [4.0, 4.2, 3.9]), row_with_processes("s", [1.0, 1.6, 1.1])]
    )
    raw = json.loads(json.dumps(result.to_json()))
    assert BenchResult.from_json(raw) == result
    entry = raw["rows"][1]["latency"][0]
    assert entry["processes"][1] == {"p50_ms": 1.6, "throughput_ips": 625.0, "runs": 100}
    assert entry["unstable"] is True and raw["ratios"]["s"]["speedup_b1_spread"] > 0

    bad = copy.deepcopy(raw)
    bad["rows"][1]["latency"][0]["processes"][2]["p50_ms"] = "fast"
    (tmp_path / "bench.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"processes\[2\]\.p50_ms is 'fast'"):
        BenchResult.read(tmp_path / "bench.json")
