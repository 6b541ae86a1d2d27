"""Artifacts -> what a person reads: the summary printed at the end of a run, and the run report
(``report.md``, ``report.json``, ``report.png``) written from the stage records alone."""

from __future__ import annotations

import io
from pathlib import Path

from compress.benchmark.rows import BenchResult
from compress.core.fileio import (
    read_text_bounded,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from compress.core.records import STAGE_RECORD, StageRecord
from compress.errors import DataError, ModelError
from compress.pipeline.artifacts import Artifact


def summary_table(artifacts: dict[str, Artifact]) -> str:
    """One Markdown row per stage: what happened, how long, and its headline numbers."""
    lines = ["| stage | status | time | peak memory | result |", "|---|---|---:|---:|---|"]
    for name, artifact in artifacts.items():
        status = "skipped (unchanged)" if artifact.skipped else "ran"
        memory = "-" if artifact.peak_rss_mb is None else f"{artifact.peak_rss_mb:,.0f} MiB"
        lines.append(
            f"| {name} | {status} | {artifact.seconds:.1f}s | {memory} | {headline(artifact)} |"
        )
    warnings = [
        f"Did not pay: {line}."
        for artifact in artifacts.values()
        if artifact.kind == "bench"
        for line in artifact.metrics.get("did_not_pay") or ()
    ]
    return "\n".join(lines + ([""] if warnings else []) + warnings)


def headline(artifact: Artifact) -> str:
    m = artifact.metrics
    if artifact.kind in ("teacher", "distill", "prune", "quantize"):
        text = (
            f"top-1 {m['top1']:.2f}%, {m['params'] / 1e6:.2f}M params, {m['macs'] / 1e6:.1f}M MACs"
        )
        if artifact.kind == "distill" and m.get("teacher_top1") is not None:
            text += f" (teacher {m['teacher_top1']:.2f}%)"
        if artifact.kind == "prune":
            text += f" ({m['macs_reduction']:.2f}x fewer MACs, {m['top1_delta']:+.2f} pts)"
        if artifact.kind == "quantize":
            text += (
                f" (INT8 {m.get('shipped') or m['quantization']['mode']}, "
                f"{m['top1_delta']:+.2f} pts vs FP32, PTQ {m['ptq_top1']:.2f}%{_qat_note(m)}"
                f"{_budget_note(m)})"
            )
        return text
    if artifact.kind == "export":
        return ", ".join(
            f"{role}: max |diff| {check['max_abs_diff']:.1e}, agreement "
            f"{100 * check['top1_agreement']:.1f}%{_portability_note(check)}{_proof_note(check)}"
            for role, check in m.items()
        )
    if artifact.kind == "bench":
        return bench_headline(m)
    return ""


def _qat_note(m: dict) -> str:
    """Says so when QAT ran and did not beat the best PTQ network on the held-out images."""
    trained = any(c["name"] == "qat" for c in m.get("candidates") or ())
    if trained and m.get("shipped") != "qat":
        return "; QAT not shipped: no better than the best PTQ on the held-out images"
    return ""


def _budget_note(m: dict) -> str:
    """What the accuracy budget kept in float, and the drop the exported file measured."""
    budget = m.get("accuracy_budget")
    if not budget:
        return ""
    step = budget["steps"][-1]
    layers = ", ".join(budget["float_layers"]) or "none"
    return (
        f"; max_drop {budget['max_drop']:g}: float {layers}, file drop {step['drop']:.2f} pts "
        f"on {budget['holdout_images']} held-out images"
    )


def _proof_note(check: dict) -> str:
    """Says so when the file was proven only to the PyTorch model's own reproducibility."""
    if check.get("proof") != "reference noise":
        return ""
    return (
        f" (proven only as far as the model reproduces itself: its logits move by "
        f"{check['reference_noise_max']:.2g} alone; train it further)"
    )


def _portability_note(check: dict) -> str:
    """Where an INT8 file computes what was verified: everywhere, or on VNNI CPUs only."""
    portability = check.get("portability")
    if not portability:
        return ""
    return (
        " (INT8, exact on every CPU)"
        if portability["portable"]
        else " (INT8, exact only on CPUs with VNNI)"
    )


def bench_headline(m: dict) -> str:
    if m.get("student_status") != "ok" or m.get("teacher_status") != "ok":
        return (
            f"teacher {m.get('teacher_status')}, student {m.get('student_status')} (see bench.md)"
        )
    parts = [
        f"student {m['speedup_b1']:.2f}x faster at batch 1",
        f"{m['speedup_throughput']:.2f}x throughput",
        f"{m['size_reduction']:.2f}x smaller",
    ]
    if m.get("accuracy_delta") is not None:
        parts.append(f"top-1 {m['accuracy_delta']:+.2f} pts")
    if m.get("int8_speedup_b1") is not None:
        parts.append(f"INT8 {m['int8_speedup_b1']:.2f}x faster than FP32 student")
    return ", ".join(parts)


# --- the run report: every model of a run, side by side, and the accuracy/latency trade-off ---


REPORT_FILES = {"json": "report.json", "markdown": "report.md", "plot": "report.png"}


def remove_report(run_dir: Path) -> None:
    """Delete a run's report: a stage is re-running, so it no longer describes the run."""
    for name in REPORT_FILES.values():
        (run_dir / name).unlink(missing_ok=True)


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into a run folder, from its
    artifacts.

    Every network the run produced (teacher, distilled, pruned, quantized students) gets one
    entry: its PyTorch accuracy, parameters and MACs from its stage record, and, for the files
    the export stage wrote, what the bench measured on them (ONNX top-1, batch-1 latency,
    throughput, size) with ratios to the teacher. The plot shows top-1 against batch-1 latency
    with the Pareto front (no other model is both faster and more accurate) marked.

    Args:
        run_dir: ``<out>/<run>``, after at least one stage completed.

    Returns:
        ``{"json": ..., "markdown": ..., "plot": ...}`` (no plot when no model was benchmarked).

    Raises:
        DataError: the folder holds no completed stage.
    """
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    paths = {"json": write_json_atomic(run_dir / REPORT_FILES["json"], report)}
    paths["markdown"] = write_text_atomic(
        run_dir / REPORT_FILES["markdown"], report_markdown(report)
    )
    if any(m.get("onnx") for m in report["models"]):
        paths["plot"] = write_bytes_atomic(run_dir / REPORT_FILES["plot"], pareto_plot(report))
    else:  # an earlier run's plot would show models this run no longer has
        (run_dir / REPORT_FILES["plot"]).unlink(missing_ok=True)
    return paths


def build_report(run_dir: Path) -> dict:
    """The report's data (see :func:`write_report`), read from stage records only."""
    records, not_shown = _stage_records(run_dir)
    if not records:
        raise DataError(
            f"{run_dir}: no completed stage (no */stage.json"
            + (f"; {not_shown[0]}" if not_shown else "")
            + "); run the recipe first"
        )
    result = _bench_result(records)
    bench = _bench_rows(result, records) if result is not None else {}
    models = []
    for record in records:
        metrics = record.metrics
        if "top1" not in metrics or "params" not in metrics:
            continue
        models.append(
            {
                "name": record.stage,
                "kind": record.kind,
                "model": record.network.model if record.network else None,
                "top1": metrics["top1"],
                "params": metrics["params"],
                "macs": metrics.get("macs"),
                "quantized": bool(record.network and record.network.quantized),
                "float_layers": list(record.network.quantization.skip)
                if record.network and record.network.quantization
                else [],
                "onnx": bench.get(record.stage),
            }
        )
    teacher = next((m for m in models if m["kind"] == "teacher"), None)
    speedups = _paired_speedups(result, records) if result is not None else {}
    for entry in models:
        entry["vs_teacher"] = _ratios(entry, teacher, speedups.get(entry["name"]))
    return {
        "run": run_dir.name,
        "models": models,
        "pareto": pareto_front(models),
        "more": _other_measurements(result) if result is not None else [],
        "not_shown": not_shown,
    }


def _bench_result(records: list[StageRecord]) -> BenchResult | None:
    """The ``bench.json`` the run's (last) bench stage recorded; None before a bench stage ran.

    Raises:
        DataError: the file is there but is not a bench result.
    """
    bench = next((r for r in reversed(records) if r.kind == "bench" and "json" in r.files), None)
    return BenchResult.read(bench.path("json")) if bench is not None else None


def _other_measurements(result: BenchResult) -> list[dict]:
    """The bench rows beyond the headline group: other formats (FP16 ONNX, engines) and
    backends (PyTorch, CUDA providers), each with the speed-up over the teacher measured alike."""
    groups = result.groups or []
    more = []
    for row in result.rows:
        if not groups or row.group in (None, groups[0]):
            continue
        widest = row.widest()
        ratios = result.ratios.get(row.role)
        more.append(
            {
                "model": row.model_name,
                "group": row.group,
                "status": row.status,
                "error": row.error,
                "file": Path(row.path or "").name,
                "top1": row.top1,
                "file_bytes": row.file_bytes,
                "p50_b1_ms": row.p50_ms(1),
                "throughput_ips": widest.throughput_ips if widest else None,
                "speedup_b1": ratios.speedup_b1 if ratios else None,
            }
        )
    return more


def _stage_records(run_dir: Path) -> tuple[list[StageRecord], list[str]]:
    """Completed stage records, in the recipe's order when the resolved recipe is there, and
    why each other ``stage.json`` is not shown.

    A record is shown only if it and every file it lists are this run's: inside the run folder
    (no ``..``, no link out) and as the stage wrote them (sha256). Otherwise its numbers would
    be reported as this run's while describing something else.
    """
    import yaml

    records, not_shown = {}, []
    inside = run_dir.resolve()
    for path in sorted(run_dir.glob(f"*/{STAGE_RECORD}")):
        try:
            if not path.resolve().is_relative_to(inside):
                raise ModelError(f"{path}: links to {path.resolve()}, outside the run folder")
            record = StageRecord.read(path)
            for role in record.files:
                record.path(role)  # inside the run and the file the stage wrote, or ModelError
        except ModelError as exc:
            not_shown.append(str(exc))
            continue
        records[record.stage] = record
    order = []
    try:
        recipe = yaml.safe_load(read_text_bounded(run_dir / "recipe.yaml", max_bytes=1 << 20))
        for item in recipe.get("stages", []):
            kind, settings = next(iter(item.items())) if isinstance(item, dict) else (item, {})
            order.append((settings or {}).get("name") or kind)
    except (OSError, ValueError, RecursionError, yaml.YAMLError, AttributeError, StopIteration):
        pass
    ranked = [records[name] for name in order if name in records]
    return ranked + [r for name, r in sorted(records.items()) if name not in order], not_shown


def _bench_rows(result: BenchResult, records: list[StageRecord]) -> dict[str, dict]:
    """Stage name -> what the bench measured on the ONNX file holding that stage's network."""
    export = next((r for r in records if r.kind == "export"), None)
    if export is None:
        return {}
    measured = {}
    for role, check in export.metrics.items():
        row, stage = result.row(role), _exported_stage(role, check, records)
        if stage is None or row is None or not row.ok:
            continue
        widest = row.widest()
        measured[stage] = {
            "file": f"{role}.onnx",
            "top1": row.top1,
            "file_bytes": row.file_bytes,
            "p50_b1_ms": row.p50_ms(1),
            "throughput_ips": widest.throughput_ips if widest else None,
            "throughput_batch": widest.batch_size if widest else None,
        }
    return measured


def _exported_stage(role: str, check: dict, records: list[StageRecord]) -> str | None:
    """The stage whose network ``<role>.onnx`` holds: recorded by the export stage, or (runs made
    before it recorded it) the latest stage of that role."""
    if isinstance(check, dict) and "stage" in check:
        return check["stage"]
    by_role = [r for r in records if r.role == ("teacher" if role == "teacher" else "student")]
    if not by_role:
        return None
    if role == "student_fp32":
        return by_role[-1].metrics.get("source_stage")
    return by_role[0].stage if role == "teacher" else by_role[-1].stage


def _paired_speedups(result: BenchResult, records: list[StageRecord]) -> dict[str, float]:
    """Stage name -> batch-1 speed-up of its ONNX file over the bench's reference (the teacher),
    as the bench computed it: paired by round over the processes (see
    :mod:`compress.benchmark.latency`)."""
    export = next((r for r in records if r.kind == "export"), None)
    found = {}
    for role, check in (export.metrics if export else {}).items():
        stage, ratios = _exported_stage(role, check, records), result.ratios.get(role)
        if stage is not None and ratios is not None and ratios.speedup_b1 is not None:
            found[stage] = ratios.speedup_b1
    return found


def _ratios(entry: dict, teacher: dict | None, speedup: float | None = None) -> dict:
    """The entry against the teacher; ``speedup``: the bench's paired batch-1 speed-up, which
    a ratio of the two headline p50s only approximates."""
    if teacher is None:
        return {}
    ours, theirs = entry.get("onnx") or {}, teacher.get("onnx") or {}

    def ratio(a, b):
        return a / b if a and b else None

    return {
        "top1_delta": entry["top1"] - teacher["top1"],
        "params_reduction": ratio(teacher["params"], entry["params"]),
        "macs_reduction": ratio(teacher.get("macs"), entry.get("macs")),
        "speedup_b1": speedup or ratio(theirs.get("p50_b1_ms"), ours.get("p50_b1_ms")),
        "size_reduction": ratio(theirs.get("file_bytes"), ours.get("file_bytes")),
    }


def pareto_front(models: list[dict]) -> list[str]:
    """Names of the benchmarked models that no other is both at least as fast and as accurate as
    (and strictly better in one), fastest first."""
    points = [
        (m["onnx"]["p50_b1_ms"], m["onnx"]["top1"], m["name"])
        for m in models
        if m.get("onnx")
        and m["onnx"].get("p50_b1_ms") is not None
        and m["onnx"].get("top1") is not None
    ]
    front = [
        (ms, top1, name)
        for ms, top1, name in points
        if not any(
            o_ms <= ms and o_top1 >= top1 and (o_ms < ms or o_top1 > top1)
            for o_ms, o_top1, _ in points
        )
    ]
    return [name for _, _, name in sorted(front)]


def report_markdown(report: dict) -> str:
    lines = [
        f"# Run `{report['run']}`",
        "",
        "| model | network | top-1 (PyTorch) | params (M) | MACs (M) | ONNX file | top-1 (ONNX) | "
        "p50 batch 1 (ms) | throughput (img/s) | size (MiB) | vs teacher |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for m in report["models"]:
        onnx, ratios = m.get("onnx") or {}, m.get("vs_teacher") or {}
        parts = [
            ("speedup_b1", "{:.2f}x faster"),
            ("size_reduction", "{:.2f}x smaller"),
            ("macs_reduction", "{:.2f}x fewer MACs"),
            ("top1_delta", "{:+.2f} pts"),
        ]
        versus = (
            ", ".join(fmt.format(ratios[key]) for key, fmt in parts if ratios.get(key) is not None)
            if m["kind"] != "teacher"
            else ""
        )
        name = (
            m["name"]
            + (" (INT8)" if m["quantized"] else "")
            + (f" (float: {', '.join(m['float_layers'])})" if m.get("float_layers") else "")
            + (" ★" if m["name"] in report["pareto"] else "")
        )
        lines.append(
            f"| {name} | {m['model']} | {m['top1']:.2f} | {m['params'] / 1e6:.3f} | "
            f"{_fmt(m['macs'], '{:.1f}', 1e-6)} | {onnx.get('file', '—')} | "
            f"{_fmt(onnx.get('top1'), '{:.2f}')} | {_fmt(onnx.get('p50_b1_ms'), '{:.3f}')} | "
            f"{_fmt(onnx.get('throughput_ips'), '{:.0f}')} | "
            f"{_fmt(onnx.get('file_bytes'), '{:.2f}', 2**-20)} | {versus or '—'} |"
        )
    lines += [
        "",
        "★ on the Pareto front of accuracy vs batch-1 latency (exported files, ONNX Runtime).",
    ]
    if report.get("not_shown"):
        lines += ["", "## Not shown (not this run's records)", ""]
        lines += [f"- {reason}" for reason in report["not_shown"]]
    if report.get("more"):
        lines += [
            "",
            "## Other formats and backends",
            "",
            "| model | measured on | file | top-1 | p50 batch 1 (ms) | throughput (img/s) | size "
            "(MiB) | vs teacher alike |",
            "|---|---|---|---:|---:|---:|---:|---|",
        ]
        for m in report["more"]:
            speed = f"{m['speedup_b1']:.2f}x faster" if m.get("speedup_b1") else "—"
            if m["status"] != "ok":
                speed = f"error: {m['error']}"
            lines.append(
                f"| {m['model']} | {m['group']} | {m['file']} | {_fmt(m['top1'], '{:.2f}')} | "
                f"{_fmt(m['p50_b1_ms'], '{:.3f}')} | {_fmt(m['throughput_ips'], '{:.0f}')} | "
                f"{_fmt(m['file_bytes'], '{:.2f}', 2**-20)} | {speed} |"
            )
    return "\n".join(lines) + "\n"


def _fmt(value, fmt: str, scale: float = 1.0) -> str:
    return "—" if value is None else fmt.format(value * scale)


def pareto_plot(report: dict) -> bytes:
    """PNG: ONNX top-1 against batch-1 latency per benchmarked model; the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    models = [
        m
        for m in report["models"]
        if m.get("onnx") and m["onnx"].get("p50_b1_ms") and m["onnx"].get("top1") is not None
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for m in models:
        on_front = m["name"] in report["pareto"]
        ax.scatter(
            m["onnx"]["p50_b1_ms"],
            m["onnx"]["top1"],
            s=60,
            zorder=3,
            color="tab:red" if on_front else "tab:gray",
            marker="*" if on_front else "o",
        )
        ax.annotate(
            m["name"] + (" INT8" if m["quantized"] else ""),
            (m["onnx"]["p50_b1_ms"], m["onnx"]["top1"]),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    front = [next(m for m in models if m["name"] == name) for name in report["pareto"]]
    if len(front) > 1:
        ax.plot(
            [m["onnx"]["p50_b1_ms"] for m in front],
            [m["onnx"]["top1"] for m in front],
            color="tab:red",
            lw=1,
            zorder=2,
            label="Pareto front",
        )
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    # plain decimals at 1-2-5 steps: matplotlib's minor log labels (3x10^-1 4x10^-1 ...) collide
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency p50, batch 1 (ms, log scale)")
    ax.set_ylabel("top-1 accuracy of the exported model (%)")
    ax.set_title(f"{report['run']}: accuracy vs latency (ONNX Runtime)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
