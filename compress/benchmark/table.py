"""A bench result as people read it: the Markdown table with its machine line, and the
``bench.json``/``bench.md`` pair."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from compress.benchmark.latency import NOISE_BAR
from compress.benchmark.ratios import did_not_pay
from compress.benchmark.rows import BenchResult, BenchRow, LatencyPoint, LatencyStats, Ratios
from compress.core.cpu_features import CpuFeatures
from compress.core.fileio import write_json_atomic, write_text_atomic


def bench_table_markdown(result: BenchResult) -> str:
    """Markdown tables, one per backend group (headline first): metrics as rows; the reference,
    then each model and its ratio, as columns.

    Args:
        result: :func:`compare`'s (or :func:`bench_models`') result.

    Returns:
        The tables, plus one line on the machine when ``result`` has it.
    """
    groups = result.groups or [None]
    sections = []
    for index, group in enumerate(groups):
        rows = [row for row in result.rows if row.group == group]
        if not rows:
            continue
        table = _group_table(result, rows)
        sections.append(table if index == 0 else f"### {group}\n\n{table}")
    return "\n\n".join(sections) + _machine_note(result) + "\n"


def _group_table(result: BenchResult, rows: list[BenchRow]) -> str:
    """One group's table; columns are named after the model (the group is the table's heading)."""
    reference = next(
        (row.role for row in rows if row.model_name == result.reference), result.reference
    )
    rows = sorted(rows, key=lambda row: row.role != reference)  # reference first
    batch = max((b for row in rows for b in row.measured_batch_sizes()), default=None)
    name = {row.role: row.model_name for row in rows}
    header = ["Metric"]
    for row in rows:
        header.append(name[row.role])
        if row.role != reference:
            header.append(f"{name[row.role]} vs {name.get(reference, reference)}")
    lines = [_md_row(header), _md_row(["---"] + ["---:"] * (len(header) - 1))]
    metrics = _metrics(batch, name.get(reference, reference))
    if any(row.gpu_peak_mb is not None for row in rows):
        metrics.insert(
            -2, ("GPU peak memory (MiB)", lambda row: row.gpu_peak_mb, "{:.1f}", None, None)
        )
    if any(p.spread is not None for row in rows for p in row.latency):
        at = next(i for i, m in enumerate(metrics) if m[0].startswith("Latency CV")) + 1
        metrics.insert(at, _spread_metric())
    for label, value, fmt, ratio_of, ratio_fmt in metrics:
        cells = [label]
        for row in rows:
            cells.append(_cell(value(row), fmt))
            if row.role != reference:
                ratios = result.ratios.get(row.role, Ratios())
                cells.append(_cell(ratio_of(ratios), ratio_fmt) if ratio_of else "")
        lines.append(_md_row(cells))
    lines.insert(2, _md_row(["Status"] + _status_cells(rows, reference)))
    noisy = [
        f"{name[row.role]} (batch {point.batch_size})"
        for row in rows
        for point in row.latency
        if point.noisy
    ]
    note = (
        f"\n\nNoisy timings (coefficient of variation over 10%): {', '.join(noisy)}. Re-run on a "
        "quiet machine."
        if noisy
        else ""
    )
    return (
        "\n".join(lines)
        + note
        + _unstable_note(rows, name)
        + _simulated_int8_note(rows, name)
        + _did_not_pay_note(rows, result.reference)
    )


def _did_not_pay_note(rows: list[BenchRow], reference: str) -> str:
    """One line per model that compression made slower (:func:`did_not_pay`)."""
    lines = did_not_pay(rows, reference)
    return "".join(f"\n\nDid not pay: {line}." for line in lines)


def _simulated_int8_note(rows: list[BenchRow], name: dict[str, str]) -> str:
    """One line naming the rows that ran a fake-quantized network in PyTorch: float kernels
    plus rounding, slower than the float network itself, so their latency says nothing about
    INT8 (first seen on the GPU: the INT8 student 2.5x slower than its float source)."""
    found = [
        name[row.role]
        for row in rows
        if ((row.runtime or {}).get("network") or {}).get("quantized")
    ]
    if not found:
        return ""
    return (
        f"\n\nSimulated INT8: {', '.join(found)} ran as fake quantization (float kernels that "
        "round to the INT8 grid, what QAT trains); its latency is not INT8 latency. Time INT8 on "
        "the exported file with an integer runtime (onnxruntime, openvino, tensorrt)."
    )


def _unstable_note(rows: list[BenchRow], name: dict[str, str]) -> str:
    """One line naming the measurements whose processes disagreed, with each process's median."""
    found = [
        f"{name[row.role]} (batch {point.batch_size}: "
        + ", ".join("—" if p.p50_ms is None else f"{p.p50_ms:.3f}" for p in point.processes)
        + " ms)"
        for row in rows
        for point in row.latency
        if point.unstable
    ]
    if not found:
        return ""
    return (
        f"\n\nUnstable (process medians more than {100 * NOISE_BAR:g}% apart): "
        f"{'; '.join(found)}. The p50 is their median and the ratios pair the processes of each "
        "round; re-run, or measure with more processes, before trusting them."
    )


def _spread_metric() -> tuple[str, Callable, str, None, None]:
    """The row of the processes' spread at batch 1: (max - min) / median of their medians."""

    def cell(point: LatencyPoint) -> str | None:
        if point.spread is None:
            return None
        return f"{100 * point.spread:.1f}" + (" (unstable)" if point.unstable else "")

    return (
        "Latency spread over processes, batch 1 (%)",
        lambda row: _at(row, 1, cell, "{}"),
        "{}",
        None,
        None,
    )


def _with_spread(value: float | None, spread: float | None, fmt: str) -> str | None:
    """A ratio cell, with the spread of its per-round ratios when it was paired by round."""
    if value is None:
        return None
    return fmt.format(value) + ("" if spread is None else f" (spread {100 * spread:.1f}%)")


def _metrics(
    batch: int | None, reference: str
) -> list[tuple[str, Callable, str, Callable | None, str | None]]:
    """(label with unit, value getter, format, ratio getter, ratio format) per table row.

    A file with a static batch axis has no batch-1 or throughput-batch entry: its cells show
    what it was measured at, marked ``(batch N)``.
    """

    def latency(stat: Callable[[LatencyStats], float | None]) -> Callable:
        return lambda row: _at(row, 1, lambda p: p.latency_ms and stat(p.latency_ms), "{:.3f}")

    def mean_std(point: LatencyPoint) -> str | None:
        stats = point.latency_ms
        if stats is None or stats.mean is None or stats.std is None:
            return None
        return f"{stats.mean:.3f} ± {stats.std:.3f}"

    def scaled(value: Callable[[BenchRow], float | None], factor: float) -> Callable:
        return lambda row: None if value(row) is None else value(row) * factor

    return [
        (
            "File size (MiB)",
            scaled(lambda row: row.file_bytes, 1 / 2**20),
            "{:.2f}",
            lambda ratios: ratios.size_reduction,
            "{:.2f}× smaller",
        ),
        (
            "Parameters (M)",
            scaled(lambda row: row.params, 1e-6),
            "{:.3f}",
            lambda ratios: ratios.params_reduction,
            "{:.2f}× fewer",
        ),
        (
            "MACs, batch 1 (M)",
            scaled(lambda row: row.macs, 1e-6),
            "{:.1f}",
            lambda ratios: ratios.macs_reduction,
            "{:.2f}× fewer",
        ),
        (
            "Latency p50, batch 1 (ms)",
            latency(lambda stats: stats.p50),
            "{:.3f}",
            lambda ratios: _with_spread(
                ratios.speedup_b1, ratios.speedup_b1_spread, "{:.2f}× faster"
            ),
            "{}",
        ),
        ("Latency p90, batch 1 (ms)", latency(lambda stats: stats.p90), "{:.3f}", None, None),
        ("Latency p95, batch 1 (ms)", latency(lambda stats: stats.p95), "{:.3f}", None, None),
        ("Latency p99, batch 1 (ms)", latency(lambda stats: stats.p99), "{:.3f}", None, None),
        (
            "Latency mean ± std, batch 1 (ms)",
            lambda row: _at(row, 1, mean_std, "{}"),
            "{}",
            None,
            None,
        ),
        ("Latency CV, batch 1 (%)", lambda row: _at(row, 1, _cv_cell, "{}"), "{}", None, None),
        (
            f"Throughput, batch {batch} (images/s)",
            lambda row: _at(row, batch, lambda p: p.throughput_ips, "{:.1f}"),
            "{:.1f}",
            lambda ratios: _with_spread(
                ratios.speedup_throughput, ratios.speedup_throughput_spread, "{:.2f}× faster"
            ),
            "{}",
        ),
        ("Peak memory (MiB)", lambda row: row.peak_rss_mb, "{:.1f}", None, None),
        ("Model memory (MiB)", lambda row: row.model_rss_mb, "{:.1f}", None, None),
        (
            "Top-1 accuracy (%)",
            lambda row: row.top1,
            "{:.2f}",
            lambda ratios: ratios.accuracy_delta,
            "{:+.2f} pts",
        ),
        (
            f"Top-1 agreement with {reference} (%)",
            scaled(lambda row: row.agreement_with_reference, 100.0),
            "{:.2f}",
            None,
            None,
        ),
    ]


def _at(row: BenchRow, batch_size: int | None, value: Callable[[LatencyPoint], object], fmt: str):
    """``value`` of the row's measurement at ``batch_size``; for a row measured only at other
    batch sizes (a static batch), that of its single measured batch, as text marked with it."""
    point = row.latency_at(batch_size)
    if point is not None:
        return value(point)
    measured = [p for p in row.latency if p.ok]
    if len(measured) != 1:
        return None
    found = value(measured[0])
    return None if found is None else f"{fmt.format(found)} (batch {measured[0].batch_size})"


def _cv_cell(point: LatencyPoint) -> str | None:
    if point.cv is None:
        return None
    return f"{100 * point.cv:.1f}" + (" (noisy)" if point.noisy else "")


def _status_cells(rows: list[BenchRow], reference: str) -> list[str]:
    cells = []
    for row in rows:
        cells.append("ok" if row.ok else f"error: {row.error}")
        if row.role != reference:
            cells.append("")
    return cells


def _cell(value: float | str | None, fmt: str | None) -> str:
    if isinstance(value, str):  # already formatted (a static-batch entry)
        return value
    return "—" if value is None or fmt is None else fmt.format(value)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _machine_note(result: BenchResult) -> str:
    machine, runtime = result.machine, result.versions or {}
    if not machine:
        return ""
    threads = (result.config or {}).get("threads")
    thread_note = (
        f", {threads} thread{'s' if threads > 1 else ''}" if threads else ", default threads"
    )
    processes = (result.config or {}).get("processes")
    if processes:
        thread_note += f", {processes} process{'es' if processes > 1 else ''} per model"
    gpus = "".join(f", {g['name']} (driver {g['driver']})" for g in machine.get("gpus") or [])
    torch_note = f", PyTorch {runtime['torch']}" if "torch" in runtime else ""
    trt_note = f", TensorRT {runtime['tensorrt']}" if "tensorrt" in runtime else ""
    measured_by = {row.backend for row in result.rows}
    ov_note = (
        f", OpenVINO {runtime['openvino']}"
        if "openvino" in runtime and "openvino" in measured_by
        else ""
    )
    features = _features_note(machine.get("cpu_features"))
    return (
        f"\n\nMeasured on {machine['cpu']} ({features}{machine['usable_cores']} usable "
        f"cores{thread_note}){gpus}, {machine['platform']}, ONNX Runtime "
        f"{runtime.get('onnxruntime', '?')}{torch_note}{trt_note}{ov_note}."
    )


def _features_note(features: dict | None) -> str:
    if not features:
        return ""
    return (
        CpuFeatures(features["arch"], tuple(features["flags"]), features["known"]).summary() + "; "
    )


def write_bench(result: BenchResult, folder: Path) -> tuple[Path, Path]:
    """Write ``bench.json`` and ``bench.md`` into ``folder``, each atomically.

    Args:
        result: :func:`bench_models`' (or :func:`compare`'s) result.
        folder: destination; created if missing.

    Returns:
        ``(json_path, markdown_path)``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(folder / "bench.json", result.to_json())
    md_path = write_text_atomic(folder / "bench.md", bench_table_markdown(result))
    return json_path, md_path
