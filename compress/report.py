"""Artifacts -> the summary a person reads at the end of a run."""

from __future__ import annotations

from compress.artifacts import Artifact


def summary_table(artifacts: dict[str, Artifact]) -> str:
    """One Markdown row per stage: what happened, how long, and its headline numbers."""
    lines = ["| stage | status | time | result |", "|---|---|---:|---|"]
    for name, artifact in artifacts.items():
        status = "skipped (unchanged)" if artifact.skipped else "ran"
        lines.append(f"| {name} | {status} | {artifact.seconds:.1f}s | {headline(artifact)} |")
    return "\n".join(lines)


def headline(artifact: Artifact) -> str:
    m = artifact.metrics
    if artifact.kind in ("teacher", "distill", "prune", "quantize"):
        text = f"top-1 {m['top1']:.2f}%, {m['params'] / 1e6:.2f}M params, {m['macs'] / 1e6:.1f}M MACs"
        if artifact.kind == "distill" and m.get("teacher_top1") is not None:
            text += f" (teacher {m['teacher_top1']:.2f}%)"
        if artifact.kind == "prune":
            text += f" ({m['macs_reduction']:.2f}x fewer MACs, {m['top1_delta']:+.2f} pts)"
        if artifact.kind == "quantize":
            text += f" (INT8 {m['quantization']['mode']}, {m['top1_delta']:+.2f} pts vs FP32, PTQ {m['ptq_top1']:.2f}%)"
        return text
    if artifact.kind == "export":
        return ", ".join(
            f"{role}: max |diff| {check['max_abs_diff']:.1e}, agreement {100 * check['top1_agreement']:.1f}%"
            for role, check in m.items()
        )
    if artifact.kind == "bench":
        return bench_headline(m)
    return ""


def bench_headline(m: dict) -> str:
    if m.get("student_status") != "ok" or m.get("teacher_status") != "ok":
        return f"teacher {m.get('teacher_status')}, student {m.get('student_status')} (see bench.md)"
    parts = [f"student {m['speedup_b1']:.2f}x faster at batch 1", f"{m['speedup_throughput']:.2f}x throughput", f"{m['size_reduction']:.2f}x smaller"]
    if m.get("accuracy_delta") is not None:
        parts.append(f"top-1 {m['accuracy_delta']:+.2f} pts")
    if m.get("int8_speedup_b1") is not None:
        parts.append(f"INT8 {m['int8_speedup_b1']:.2f}x faster than FP32 student")
    return ", ".join(parts)
