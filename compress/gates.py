"""Regression gates: compare a bench result with a baseline, model by model (``compress check``).

A CI job keeps the ``bench.json`` of a known-good run as its baseline and checks every new run
against it: top-1 accuracy may drop by at most so many points, batch-1 latency and file size
may grow by at most so many percent. Absolute times drift between machines (a CI runner is not
the laptop that recorded the baseline), so latency is compared, by default, as the ratio to the
reference model measured in the same run (the teacher): a student that got slower relative to
its teacher is a regression on any machine.

Example::

    results = check(load_bench_result("exported/run/bench"), load_bench_result("baseline.json"), GatesConfig())
    print(gates_table(results)); sys.exit(0 if all(r.passed for r in results) else 1)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from compress.benchmark.ratios import p50_ms, reference_row, row_model
from compress.config import GatesConfig
from compress.errors import DataError


@dataclass(frozen=True)
class GateResult:
    """One metric of one model: baseline, current value, the change and whether it is allowed."""

    model: str
    metric: str
    baseline: float | None
    current: float | None
    change: str
    limit: str
    passed: bool


def load_bench_result(path: str | Path) -> dict:
    """A ``bench.json``: given as the file, its ``bench/`` folder, or the run folder.

    Raises:
        DataError: the file is missing, not JSON, or not a bench result (one line naming it).
    """
    path = Path(path)
    for candidate in (path, path / "bench.json", path / "bench" / "bench.json"):
        if candidate.is_file():
            path = candidate
            break
    else:
        raise DataError(f"{path}: no bench result here (expected bench.json, its bench/ folder or the run folder)")
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a JSON bench result ({type(exc).__name__})") from None
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list) or not all(isinstance(r, dict) and "role" in r for r in result["rows"]):
        raise DataError(f"{path}: not a bench result (expected an object with a list of 'rows', as compress bench writes)")
    return result


def check(current: dict, baseline: dict | None, gates: GatesConfig) -> list[GateResult]:
    """Every gate of every model of the baseline, against the current result, then the floors.

    A model of the baseline that is missing from the current result, or whose current row
    failed, fails its gates; models only in the current result are new and not gated. Floors
    (``min_int8_agreement``) need no baseline: they judge the current result alone.

    Returns:
        One :class:`GateResult` per (model, metric), in the baseline's model order.
    """
    results = [] if baseline is None else _compare(current, baseline, gates)
    if gates.min_int8_agreement is not None:
        results.append(_int8_agreement(current, gates.min_int8_agreement))
    return results


def _int8_agreement(current: dict, floor: float) -> GateResult:
    """The INT8 student's top-1 agreement with the float student it came from, on the test split
    (both exported files through ONNX Runtime): quantization must not change the predictions."""
    value = (current.get("agreement") or {}).get("student", {}).get("student_fp32")
    limit = f">= {100 * floor:g}%"
    if value is None:
        return GateResult("student", "INT8 agreement with student_fp32 (%)", None, None, "not measured (no INT8 student, or no test data)", limit, False)
    return GateResult("student", "INT8 agreement with student_fp32 (%)", None, 100 * value, "", limit, value >= floor)


def _compare(current: dict, baseline: dict, gates: GatesConfig) -> list[GateResult]:
    relative = gates.latency == "relative" or (gates.latency == "auto" and _has_reference(current) and _has_reference(baseline))
    rows = {row["role"]: row for row in current["rows"]}
    results = []
    for base in baseline["rows"]:
        model, row = base["role"], rows.get(base["role"])
        if row is None or row.get("status") != "ok":
            why = "missing" if row is None else f"error: {row.get('error')}"
            results.append(GateResult(model, "status", None, None, why, "ok", False))
            continue
        results.append(_accuracy(model, base, row, gates))
        if not (relative and row_model(base) == current.get("reference")):  # the reference is the yardstick itself
            results.append(_latency(model, base, row, baseline, current, gates, relative))
        results.append(_growth(model, "file size (bytes)", base.get("file_bytes"), row.get("file_bytes"), gates.max_size_increase))
    return results


def _accuracy(model: str, base: dict, row: dict, gates: GatesConfig) -> GateResult:
    before, after = base.get("top1"), row.get("top1")
    limit = f">= -{gates.max_accuracy_drop:g} pts"
    if before is None:
        return GateResult(model, "top-1 (%)", None, after, "not in baseline", limit, True)
    if after is None:
        return GateResult(model, "top-1 (%)", before, None, "not measured", limit, False)
    drop = after - before
    return GateResult(model, "top-1 (%)", before, after, f"{drop:+.2f} pts", limit, drop >= -gates.max_accuracy_drop)


def _latency(model, base, row, baseline, current, gates, relative) -> GateResult:
    if relative:
        before = _relative_p50(base, baseline)
        after = _relative_p50(row, current)
        metric = f"p50 batch 1 / {current.get('reference')}'s"
    else:
        before, after, metric = p50_ms(base, 1), p50_ms(row, 1), "p50 batch 1 (ms)"
    return _growth(model, metric, before, after, gates.max_latency_increase)


def _growth(model: str, metric: str, before: float | None, after: float | None, allowed: float) -> GateResult:
    limit = f"<= +{100 * allowed:g}%"
    if before is None:
        return GateResult(model, metric, None, after, "not in baseline", limit, True)
    if after is None:
        return GateResult(model, metric, before, None, "not measured", limit, False)
    growth = after / before - 1 if before else 0.0
    return GateResult(model, metric, before, after, f"{100 * growth:+.1f}%", limit, growth <= allowed)


def _relative_p50(row: dict, result: dict) -> float | None:
    """Batch-1 p50 of a row over that of the reference model measured the same way (same backend)."""
    ours, theirs = p50_ms(row, 1), p50_ms(reference_row(result["rows"], row, result.get("reference")), 1)
    return ours / theirs if ours and theirs else None


def _has_reference(result: dict) -> bool:
    return any(p50_ms(row, 1) is not None for row in result["rows"] if row_model(row) == result.get("reference"))


def gates_table(results: list[GateResult]) -> str:
    """Markdown: one line per gate with baseline, current, change, limit and PASS/FAIL."""
    lines = ["| model | metric | baseline | current | change | limit | result |", "|---|---|---:|---:|---:|---|---|"]
    for r in results:
        lines.append(
            f"| {r.model} | {r.metric} | {_number(r.baseline)} | {_number(r.current)} | {r.change} | {r.limit} | {'PASS' if r.passed else 'FAIL'} |"
        )
    failed = sum(not r.passed for r in results)
    verdict = f"{failed} of {len(results)} gates failed" if failed else f"all {len(results)} gates passed"
    return "\n".join(lines) + f"\n\n{verdict}\n"


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def gate_run(gates: GatesConfig, run_dir: str | Path) -> list[GateResult]:
    """The recipe's ``gates`` applied to a finished run; the table is also written to ``gates.md``.

    Raises:
        DataError: the run has no bench result, or the baseline cannot be read.
    """
    from compress.fileio import write_text_atomic

    baseline = load_bench_result(gates.baseline) if gates.baseline is not None else None
    results = check(load_bench_result(run_dir), baseline, gates)
    write_text_atomic(Path(run_dir) / "gates.md", gates_table(results))
    return results
