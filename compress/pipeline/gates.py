"""Regression gates: compare a bench result with a baseline, model by model (``compress check``).

A CI job keeps the ``bench.json`` of a known-good run as its baseline and checks every new run
against it: top-1 accuracy may drop by at most so many points, batch-1 latency and file size
may grow by at most so many percent. Absolute times drift between machines (a CI runner is not
the laptop that recorded the baseline), so latency is compared, by default, as the ratio to the
reference model measured in the same run (the teacher): a student that got slower relative to
its teacher is a regression on any machine.

Example::

    results = check(load_bench_result("exported/run/bench"), load_bench_result("baseline.json"),
                    GatesConfig())
    print(gates_table(results)); sys.exit(0 if all(r.passed for r in results) else 1)
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from compress.benchmark.ratios import reference_row, speedup
from compress.benchmark.rows import BenchResult, BenchRow
from compress.core.fileio import not_a_file
from compress.errors import DataError
from compress.pipeline.config import GatesConfig


@dataclass(frozen=True)
class GateResult:
    """One metric of one model: baseline, current value, the change and whether it is allowed.

    ``status`` is PASS, FAIL, or SKIPPED when the gate could not be evaluated (the baseline
    lacks the metric or records 0): a skipped gate fails the check unless
    ``GatesConfig.allow_missing``, so nothing passes that was not checked.
    """

    model: str
    metric: str
    baseline: float | None
    current: float | None
    change: str
    limit: str
    status: str
    allow_missing: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "PASS" or (self.status == "SKIPPED" and self.allow_missing)


def load_bench_result(path: str | Path) -> BenchResult:
    """A ``bench.json``: given as the file, its ``bench/`` folder, or the run folder.

    Raises:
        DataError: the file is missing, not JSON, or not a bench result (one line naming it).
    """
    path = Path(path)
    for candidate in (path, path / "bench.json", path / "bench" / "bench.json"):
        if candidate.is_file():
            return BenchResult.read(candidate)
    problem = not_a_file(path)
    there = "" if problem in ("no such file", "a folder, not a file") else f"{problem}; "
    raise DataError(
        f"{path}: {there}no bench result here (expected bench.json, its bench/ folder or the run "
        "folder)"
    )


def check(
    current: BenchResult, baseline: BenchResult | None, gates: GatesConfig
) -> list[GateResult]:
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


def _int8_agreement(current: BenchResult, floor: float) -> GateResult:
    """The INT8 student's top-1 agreement with the float student it came from, on the test split
    (both exported files through ONNX Runtime): quantization must not change the predictions."""
    value = (current.agreement or {}).get("student", {}).get("student_fp32")
    limit = f">= {100 * floor:g}%"
    if value is None:
        return GateResult(
            "student",
            "INT8 agreement with student_fp32 (%)",
            None,
            None,
            "not measured (no INT8 student, or no test data)",
            limit,
            "FAIL",
        )
    return GateResult(
        "student",
        "INT8 agreement with student_fp32 (%)",
        None,
        100 * value,
        "",
        limit,
        _verdict(value >= floor),
    )


def _compare(current: BenchResult, baseline: BenchResult, gates: GatesConfig) -> list[GateResult]:
    relative = gates.latency == "relative" or (
        gates.latency == "auto" and _has_reference(current) and _has_reference(baseline)
    )
    results = []
    for base in baseline.rows:
        model, row = base.role, current.row(base.role)
        if row is None or not row.ok:
            why = "missing" if row is None else f"error: {row.error}"
            results.append(GateResult(model, "status", None, None, why, "ok", "FAIL"))
            continue
        # a row kind that never measures accuracy (a PyTorch backend's) gets no accuracy gate
        if base.top1 is not None or row.top1 is not None:
            results.append(_accuracy(model, base, row, gates))
        # the reference is the yardstick itself
        if not (relative and base.model_name == current.reference):
            results.append(_latency(model, base, row, baseline, current, gates, relative))
        results.append(
            _growth(
                model, "file size (bytes)", base.file_bytes, row.file_bytes, gates.max_size_increase
            )
        )
    return [dataclasses.replace(r, allow_missing=gates.allow_missing) for r in results]


def _accuracy(model: str, base: BenchRow, row: BenchRow, gates: GatesConfig) -> GateResult:
    before, after = base.top1, row.top1
    limit = f">= -{gates.max_accuracy_drop:g} pts"
    if before is None:
        return GateResult(model, "top-1 (%)", None, after, "not in baseline", limit, "SKIPPED")
    if after is None:
        return GateResult(model, "top-1 (%)", before, None, "not measured", limit, "FAIL")
    drop = after - before
    return GateResult(
        model,
        "top-1 (%)",
        before,
        after,
        f"{drop:+.2f} pts",
        limit,
        _verdict(drop >= -gates.max_accuracy_drop),
    )


def _latency(model, base, row, baseline, current, gates, relative) -> GateResult:
    if relative:
        before = _relative_p50(base, baseline)
        after = _relative_p50(row, current)
        metric = f"p50 batch 1 / {current.reference}'s"
    else:
        before, after, metric = base.p50_ms(1), row.p50_ms(1), "p50 batch 1 (ms)"
    result = _growth(model, metric, before, after, gates.max_latency_increase)
    shaky = _unstable(row, current, relative)
    if shaky and result.status != "SKIPPED":
        result = dataclasses.replace(result, change=f"{result.change} (unstable: {shaky})")
    return result


def _unstable(row: BenchRow, result: BenchResult, relative: bool) -> str:
    """The models of the current result whose batch-1 processes disagreed (the row, and the
    reference it is compared with): their gate's verdict may flip on a re-run."""
    ref = reference_row(result.rows, row, result.reference) if relative else None
    rows = [row] + ([ref] if ref is not None and ref is not row else [])
    names = [r.model_name for r in rows if (p := r.latency_at(1)) is not None and p.unstable]
    return ", ".join(names)


def _growth(
    model: str, metric: str, before: float | None, after: float | None, allowed: float
) -> GateResult:
    limit = f"<= +{100 * allowed:g}%"
    if before is None or before <= 0:  # nothing to grow from: the gate cannot be evaluated
        return GateResult(
            model,
            metric,
            before,
            after,
            "not in baseline" if before is None else "baseline is 0",
            limit,
            "SKIPPED",
        )
    if after is None:
        return GateResult(model, metric, before, None, "not measured", limit, "FAIL")
    growth = after / before - 1
    return GateResult(
        model, metric, before, after, f"{100 * growth:+.1f}%", limit, _verdict(growth <= allowed)
    )


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def different_networks(current: BenchResult, baseline: BenchResult) -> list[str]:
    """One warning per model whose network differs between the two results (parameters, MACs or
    input shape): gating a different architecture or recipe against this baseline is allowed,
    but should not go unnoticed."""
    warnings = []
    for base in baseline.rows:
        row = current.row(base.role)
        if row is None:
            continue
        changed = [
            f"{name} {_shown(before)} -> {_shown(after)}"
            for name, before, after in (
                ("params", base.params, row.params),
                ("macs", base.macs, row.macs),
                ("input_shape", base.input_shape, row.input_shape),
            )
            if before is not None and after is not None and before != after
        ]
        if changed:
            warnings.append(
                f"warning: {base.role} is a different network than in the baseline "
                f"({', '.join(changed)}); is this the right baseline?"
            )
    return warnings


def _shown(value):
    """A value as the JSON file shows it (an input shape as a list)."""
    return list(value) if isinstance(value, tuple) else value


def _relative_p50(row: BenchRow, result: BenchResult) -> float | None:
    """Batch-1 latency of a row relative to the reference model measured the same way (same
    backend): 1 / its speed-up, which pairs the processes of each round
    (:func:`compress.benchmark.ratios.speedup`)."""
    found = speedup(row, reference_row(result.rows, row, result.reference), 1)
    return 1 / found if found else None


def _has_reference(result: BenchResult) -> bool:
    return any(
        row.p50_ms(1) is not None for row in result.rows if row.model_name == result.reference
    )


def gates_table(results: list[GateResult]) -> str:
    """Markdown: one line per gate with baseline, current, change, limit and PASS/FAIL."""
    lines = [
        "| model | metric | baseline | current | change | limit | result |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        shown = (
            r.status
            if r.status != "SKIPPED"
            else (
                "SKIPPED (allowed)"
                if r.allow_missing
                else "SKIPPED (fails; --allow-missing to accept)"
            )
        )
        lines.append(
            f"| {r.model} | {r.metric} | {_number(r.baseline)} | {_number(r.current)} | {r.change} "
            f"| {r.limit} | {shown} |"
        )
    failed = sum(not r.passed for r in results)
    skipped = sum(r.status == "SKIPPED" for r in results)
    verdict = (
        f"{failed} of {len(results)} gates failed" if failed else f"all {len(results)} gates passed"
    )
    if skipped:
        verdict += (
            f" ({skipped} could not be evaluated"
            f"""{
                ", allowed"
                if all(r.allow_missing for r in results if r.status == "SKIPPED")
                else ""
            })"""
        )
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
    from compress.core.fileio import write_text_atomic

    baseline = load_bench_result(gates.baseline) if gates.baseline is not None else None
    current = load_bench_result(run_dir)
    for warning in different_networks(current, baseline) if baseline is not None else []:
        print(warning, file=sys.stderr)
    results = check(current, baseline, gates)
    write_text_atomic(Path(run_dir) / "gates.md", gates_table(results))
    return results
