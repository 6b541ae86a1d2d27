"""The ratios a bench result is read by (speed-up, size, accuracy deltas against the reference
model), shared by the table, the gates and the report."""

from __future__ import annotations

from collections.abc import Sequence

from compress.benchmark.latency import paired_speedup, paired_throughput_ratio
from compress.benchmark.rows import BenchResult, BenchRow, Ratios


def compare(rows: Sequence[BenchRow], reference: str = "teacher") -> BenchResult:
    """Ratios of every row against the reference row.

    A ratio is None when either side lacks the number (an error row, no test data, no
    reference). "Reduction" and "speedup" are > 1 when the row is smaller or faster. Speed-ups
    are paired by round: the median over rounds of the ratio of the two processes of a round.

    Args:
        rows: rows from :func:`bench_model`.
        reference: the role to compare against.

    A row is compared with the reference model's row of its own group (same backend and format).

    Returns:
        The rows and :class:`Ratios` for every role but the reference's.
    """
    ratios = {
        row.role: _ratios(row, reference_row(rows, row, reference))
        for row in rows
        if row.model_name != reference
    }
    return BenchResult(reference=reference, rows=tuple(rows), ratios=ratios)


def reference_row(
    rows: Sequence[BenchRow], row: BenchRow, reference: str | None
) -> BenchRow | None:
    """The reference model's row measured like ``row`` (same backend group)."""
    return next((r for r in rows if r.model_name == reference and r.group == row.group), None)


# the role of the float file an INT8 student was quantized from (the export stage writes both)
FLOAT_STUDENT, INT8_STUDENT = "student_fp32", "student"


def did_not_pay(rows: Sequence[BenchRow], reference: str) -> list[str]:
    """One line per model and backend where compression did not pay: the model runs slower than
    ``reference`` (a student slower than its teacher), or the INT8 student slower than the float
    student it was quantized from, at batch 1 or at the largest batch both measured (paired
    ratios, as the table's). Seen on real runs: a MobileNetV2 student at 0.41x its teacher in
    eager PyTorch on a GPU; an INT8 MobileNetV3 slower than FP32 at batch 64 on ONNX Runtime."""
    pairs = [(row, reference_row(rows, row, reference), reference) for row in rows]
    pairs += [
        (row, reference_row(rows, row, FLOAT_STUDENT), "its float version")
        for row in rows
        if row.model_name == INT8_STUDENT and reference != FLOAT_STUDENT
    ]
    lines = []
    for row, ref, against in pairs:
        if ref is None or ref is row or not (row.ok and ref.ok):
            continue
        slower = [
            f"{ratio:.2f}x at batch {batch}"
            for batch in sorted({1, _common_batch(row, ref) or 1})
            if (ratio := speedup(row, ref, batch)) is not None and ratio < 1
        ]
        if slower:
            where = row.group or row.backend or "its backend"
            lines.append(
                f"{row.model_name} is slower than {against} on {where}: {', '.join(slower)}"
            )
    return lines


def speedup(row: BenchRow, ref: BenchRow | None, batch_size: int = 1) -> float | None:
    """How many times faster ``row`` runs than ``ref`` at ``batch_size`` (ref p50 / row p50),
    pair by pair over the rounds both were measured in (see
    :func:`compress.benchmark.latency.paired_speedup`); what the ratios and the gates read."""
    if ref is None:
        return None
    return paired_speedup(ref.latency_at(batch_size), row.latency_at(batch_size))[0]


def _ratios(row: BenchRow, ref: BenchRow | None) -> Ratios:
    if ref is None:
        return Ratios(agreement_with_reference=row.agreement_with_reference)
    batch = _common_batch(row, ref)
    b1, b1_spread = paired_speedup(ref.latency_at(1), row.latency_at(1))
    throughput, throughput_spread = paired_throughput_ratio(
        ref.latency_at(batch), row.latency_at(batch)
    )
    return Ratios(
        speedup_b1=b1,
        speedup_b1_spread=b1_spread,
        speedup_throughput=throughput,
        speedup_throughput_spread=throughput_spread,
        throughput_batch_size=batch,
        size_reduction=_ratio(ref.file_bytes, row.file_bytes),
        params_reduction=_ratio(ref.params, row.params),
        macs_reduction=_ratio(ref.macs, row.macs),
        accuracy_delta=None if None in (row.top1, ref.top1) else row.top1 - ref.top1,
        agreement_with_reference=row.agreement_with_reference,
    )


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _common_batch(row: BenchRow, ref: BenchRow) -> int | None:
    common = row.measured_batch_sizes() & ref.measured_batch_sizes()
    return max(common) if common else None
