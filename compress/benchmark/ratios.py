"""The ratios a bench result is read by (speed-up, size, accuracy deltas against the reference
model), shared by the table, the gates and the report."""

from __future__ import annotations

from collections.abc import Sequence

from compress.benchmark.rows import BenchResult, BenchRow, Ratios


def compare(rows: Sequence[BenchRow], reference: str = "teacher") -> BenchResult:
    """Ratios of every row against the reference row.

    A ratio is None when either side lacks the number (an error row, no test data, no
    reference). "Reduction" and "speedup" are > 1 when the row is smaller or faster.

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


def _ratios(row: BenchRow, ref: BenchRow | None) -> Ratios:
    if ref is None:
        return Ratios(agreement_with_reference=row.agreement_with_reference)
    batch = _common_batch(row, ref)
    return Ratios(
        speedup_b1=_ratio(ref.p50_ms(1), row.p50_ms(1)),
        speedup_throughput=_ratio(_throughput(row, batch), _throughput(ref, batch)),
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


def _throughput(row: BenchRow, batch_size: int | None) -> float | None:
    point = row.latency_at(batch_size)
    return point.throughput_ips if point else None


def _common_batch(row: BenchRow, ref: BenchRow) -> int | None:
    common = row.measured_batch_sizes() & ref.measured_batch_sizes()
    return max(common) if common else None
