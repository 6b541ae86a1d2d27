"""Can the bench's latency numbers be trusted? Ours vs a plain loop, and run-to-run spread.

    python benchmarks/bench_accuracy.py exported/benchmarks/quickstart/teacher.onnx \
exported/benchmarks/quickstart/student.onnx

For each ONNX file and batch size:

* **ours**: the p50 that ``compress bench`` reports (the onnxruntime backend: a fresh worker
  process, warm-up, timed runs), measured ``--repeats`` times;
* **plain**: an independent loop in this process, written the obvious way — one
  ``InferenceSession`` with the same settings (CPU provider, all graph optimisations, default
  threads), the same warm-up and iteration count, ``time.perf_counter`` around ``session.run``;
* the difference of the two medians (target: within 5%) and the coefficient of variation of
  our p50 across repeats (how much two runs of ``compress bench`` on this machine disagree).

Prints a table and writes ``benchmarks/results/bench_accuracy.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compress.benchmark.backend_table import BACKENDS
from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions

HERE = Path(__file__).resolve().parent
TARGET = 0.05  # ours vs plain, relative difference of the medians


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = []
    for path in args.models:
        ours = [
            BACKENDS.get("onnxruntime").measure(
                path,
                batch_sizes=batch_sizes,
                warmup=args.warmup,
                iterations=args.iterations,
                time_budget_s=None,
                threads=0,
            )
            for _ in range(args.repeats)
        ]
        for index, batch in enumerate(batch_sizes):
            ours_p50 = [run["batches"][index]["latency_ms"]["p50"] for run in ours]
            plain_p50 = plain_loop(path, batch, args.warmup, args.iterations)
            median = float(np.median(ours_p50))
            rows.append(
                {
                    "model": str(path),
                    "batch_size": batch,
                    "ours_p50_ms": ours_p50,
                    "ours_median_ms": median,
                    "plain_p50_ms": plain_p50,
                    "difference": median / plain_p50 - 1,
                    "run_to_run_cv": float(np.std(ours_p50) / np.mean(ours_p50)),
                }
            )
    record = {
        "rows": rows,
        "target": TARGET,
        "repeats": args.repeats,
        "iterations": args.iterations,
        "machine": machine_info(),
        "versions": versions(),
    }
    print(table(record))
    write_json_atomic(HERE / "results" / "bench_accuracy.json", record)


def plain_loop(path: Path, batch_size: int, warmup: int, iterations: int) -> float:
    """p50 (ms) of the obvious measurement loop, in this process."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    value = session.get_inputs()[0]
    feed = {
        value.name: np.random.default_rng(0).standard_normal(
            (batch_size, *value.shape[1:]), dtype=np.float32
        )
    }
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def table(record: dict) -> str:
    lines = [
        "| model | batch | compress bench p50 (median of repeats, ms) | plain loop p50 (ms) | "
        "difference | run-to-run CV | within 5% |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in record["rows"]:
        ok = "yes" if abs(r["difference"]) <= record["target"] else "no"
        lines.append(
            f"| {Path(r['model']).name} | {r['batch_size']} | {r['ours_median_ms']:.3f} | "
            f"{r['plain_p50_ms']:.3f} | {100 * r['difference']:+.1f}% | "
            f"{100 * r['run_to_run_cv']:.1f}% | {ok} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
