"""The ratios a bench result is read by (speed-up, size, accuracy deltas against the reference
model), shared by the table, the gates and the report."""

from __future__ import annotations


def compare(rows: list[dict], reference: str = "teacher") -> dict:
    """Ratios of every row against the reference row.

    A ratio is None when either side lacks the number (an error row, no test data, no
    reference). "Reduction" and "speedup" are > 1 when the row is smaller or faster.

    Args:
        rows: rows from :func:`bench_model`.
        reference: the role to compare against.

    A row is compared with the reference model's row of its own group (same backend and format).

    Returns:
        ``{"reference", "rows", "ratios": {role: {"speedup_b1", "speedup_throughput",
        "throughput_batch_size", "size_reduction", "params_reduction", "macs_reduction",
        "accuracy_delta", "agreement_with_reference"}}}`` for every role but the reference;
        ``speedup_b1`` is reference p50 / row p50 at batch 1, ``speedup_throughput`` row /
        reference images per second at the largest batch size both measured, and
        ``accuracy_delta`` (row - reference) top-1 in percentage points.
    """
    ratios = {
        row["role"]: _ratios(row, reference_row(rows, row, reference) or {})
        for row in rows
        if row_model(row) != reference
    }
    return {"reference": reference, "rows": rows, "ratios": ratios}


def row_model(row: dict) -> str:
    """The model a row measures ("teacher", "student", ...; its role in results without groups)."""
    return row.get("model", row["role"])


def reference_row(rows: list[dict], row: dict, reference: str | None) -> dict | None:
    """The reference model's row measured like ``row`` (same backend group)."""
    return next(
        (r for r in rows if row_model(r) == reference and r.get("group") == row.get("group")), None
    )


def _ratios(row: dict, ref: dict) -> dict:
    batch = _common_batch(row, ref)
    accuracy = (row.get("top1"), ref.get("top1"))
    return {
        "speedup_b1": _ratio(p50_ms(ref, 1), p50_ms(row, 1)),
        "speedup_throughput": _ratio(_throughput(row, batch), _throughput(ref, batch)),
        "throughput_batch_size": batch,
        "size_reduction": _ratio(ref.get("file_bytes"), row.get("file_bytes")),
        "params_reduction": _ratio(ref.get("params"), row.get("params")),
        "macs_reduction": _ratio(ref.get("macs"), row.get("macs")),
        "accuracy_delta": None if None in accuracy else accuracy[0] - accuracy[1],
        "agreement_with_reference": row.get("agreement_with_reference"),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def latency_entry(row: dict | None, batch_size: int | None) -> dict | None:
    """The successful latency measurement of a bench row at ``batch_size``, if there is one."""
    for entry in (row or {}).get("latency") or []:
        if entry.get("batch_size") == batch_size and entry.get("status") == "ok":
            return entry
    return None


def p50_ms(row: dict | None, batch_size: int) -> float | None:
    """A bench row's median latency (ms) at ``batch_size``; None when not measured."""
    entry = latency_entry(row, batch_size)
    return entry["latency_ms"]["p50"] if entry else None


def _throughput(row: dict, batch_size: int | None) -> float | None:
    entry = latency_entry(row, batch_size)
    return entry["throughput_ips"] if entry else None


def _ok_batches(row: dict) -> set[int]:
    return {e["batch_size"] for e in row.get("latency") or [] if e.get("status") == "ok"}


def _common_batch(row: dict, ref: dict) -> int | None:
    common = _ok_batches(row) & _ok_batches(ref)
    return max(common) if common else None
