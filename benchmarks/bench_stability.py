"""Is the batch-1 speed-up of ``compress bench`` stable from one run to the next?

    python benchmarks/bench_stability.py            # the quickstart teacher vs its INT8 student

Runs the bench (the library call ``compress bench`` makes) ``--repeats`` times on the same two
files, batch 1 only, with ``--processes`` fresh processes per model (interleaved, the median of
their medians, ratios paired by round; see ``compress/benchmark/latency.py``) and, alternating
with it so both see the same machine, the old single-process mode (``processes=1``). Prints
each mode's speed-ups, their mean and their largest deviation from it (the goal: within +-5%),
and writes ``benchmarks/results/bench_stability.json`` with the per-process medians, the CPU
model and its flags. Run it on a quiet machine: latency measured next to other work says little.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from compress.benchmark.compare import bench_models
from compress.benchmark.spec import BenchConfig
from compress.core.cpu_features import cpu_features
from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "exported" / "quickstart"
GOAL = 0.05  # speed-ups of repeated runs within +-5% of their mean


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", type=Path, default=QUICKSTART / "teacher.onnx")
    parser.add_argument("--model", type=Path, default=QUICKSTART / "student.onnx")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=BenchConfig().processes)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=BenchConfig().iterations)
    parser.add_argument("--time-budget", type=float, default=BenchConfig().time_budget_s)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_stability.json")
    args = parser.parse_args()

    modes = {f"processes={args.processes}": args.processes, "processes=1": 1}
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        for mode, processes in modes.items():  # alternate: both modes see the same machine
            cfg = BenchConfig(
                batch_size=1,
                iterations=args.iterations,
                time_budget_s=args.time_budget,
                threads=args.threads,
                processes=processes,
            )
            result = bench_models(
                {"reference": args.reference, "model": args.model}, cfg, None, reference="reference"
            )
            runs[mode].append(summary(result))
            print(f"repeat {repeat + 1}, {mode}: {runs[mode][-1]['speedup_b1']:.3f}x", flush=True)
    record = {
        "files": {"reference": str(args.reference), "model": str(args.model)},
        "settings": {
            "repeats": args.repeats,
            "threads": args.threads,
            "iterations": args.iterations,
            "time_budget_s": args.time_budget,
            "batch_size": 1,
        },
        "modes": {mode: stability(found) for mode, found in runs.items()},
        "machine": machine_info(),
        "versions": versions(),
    }
    print(table(record))
    write_json_atomic(args.out, record)
    print(f"written: {args.out}")


def summary(result) -> dict:
    """One bench run: the paired batch-1 speed-up, its spread and each model's processes."""
    ratios = result.ratios["model"]
    models = {}
    for role in ("reference", "model"):
        row = result.row(role)
        point = row.latency_at(1) if row is not None else None
        models[role] = {
            "status": row.status if row is not None else "missing",
            "error": row.error if row is not None else None,
            "p50_ms": point.latency_ms.p50 if point and point.latency_ms else None,
            "process_p50_ms": [p.p50_ms for p in point.processes] if point else [],
            "spread": point.spread if point else None,
            "unstable": point.unstable if point else None,
            "cv": point.cv if point else None,
        }
    return {
        "speedup_b1": ratios.speedup_b1,
        "speedup_b1_spread": ratios.speedup_b1_spread,
        "models": models,
    }


def stability(found: list[dict]) -> dict:
    """The speed-ups of one mode, their mean and their largest deviation from it."""
    speedups = [run["speedup_b1"] for run in found if run["speedup_b1"] is not None]
    mean = statistics.fmean(speedups) if speedups else None
    deviation = max(abs(s / mean - 1) for s in speedups) if speedups else None
    return {
        "speedups_b1": speedups,
        "mean": mean,
        "max_deviation": deviation,
        "within_goal": None if deviation is None else deviation <= GOAL,
        "runs": found,
    }


def table(record: dict) -> str:
    lines = [
        "| mode | batch-1 speed-ups | mean | max deviation from mean | within +-5% "
        "| unstable runs |",
        "|---|---|---:|---:|---|---:|",
    ]
    for mode, found in record["modes"].items():
        speedups = ", ".join(f"{s:.3f}x" for s in found["speedups_b1"])
        unstable = sum(any(m["unstable"] for m in run["models"].values()) for run in found["runs"])
        mean = "—" if found["mean"] is None else f"{found['mean']:.3f}x"
        deviation = (
            "—" if found["max_deviation"] is None else f"{100 * found['max_deviation']:.1f}%"
        )
        verdict = {True: "yes", False: "no", None: "—"}[found["within_goal"]]
        lines.append(
            f"| {mode} | {speedups} | {mean} | {deviation} | {verdict} | "
            f"{unstable} of {len(found['runs'])} |"
        )
    machine = record["machine"]
    return "\n".join(lines) + (
        f"\n\n{machine['cpu']} ({cpu_features().summary()}), {machine['usable_cores']} usable "
        f"cores, {record['settings']['threads']} ONNX Runtime thread(s)"
    )


if __name__ == "__main__":
    main()
