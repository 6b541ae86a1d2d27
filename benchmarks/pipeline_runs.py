"""Run shipped recipes end to end and record what they measured.

    python benchmarks/pipeline_runs.py quickstart
    python benchmarks/pipeline_runs.py cifar10-short --data ../shared/data/cifar10

Prints a table (accuracy of teacher and student in PyTorch and as exported ONNX, latency,
speed-up, size) and writes ``benchmarks/results/<name>.json`` with the machine description.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from compress.benchmark.rows import BenchResult
from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions
from compress.pipeline.recipe.load import load_recipe
from compress.pipeline.runner import run

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes"

# name -> (recipe, CLI-style overrides). Budgets are what a 2-core CPU runs in minutes.
RUNS = {
    "quickstart": ("quickstart.yaml", {}),
    "cifar10-short": ("resnet18_to_mobile.yaml", {"epochs": 3, "subset": (5000, 2000)}),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", choices=sorted(RUNS))
    parser.add_argument("--data", help="dataset path for recipes that need one")
    parser.add_argument("--out", default=str(HERE.parent / "exported" / "benchmarks"))
    parser.add_argument("--force", action="store_true", help="re-run stages even if done")
    args = parser.parse_args()

    recipe_file, overrides = RUNS[args.name]
    recipe = load_recipe(RECIPES / recipe_file, data=args.data, out=args.out, **overrides)
    started = time.perf_counter()
    artifacts = run(recipe, force=args.force)
    result = summarise(args.name, recipe_file, overrides, artifacts, time.perf_counter() - started)
    print(table(result))
    write_json_atomic(HERE / "results" / f"{args.name}.json", result)


def summarise(name, recipe_file, overrides, artifacts, wall_s) -> dict:
    """The run's numbers: PyTorch accuracy per model stage, and the bench rows of every ONNX
    file."""
    bench = BenchResult.read(artifacts["bench"].files["json"])

    stages = {
        stage: {key: a.metrics.get(key) for key in STAGE_KEYS if key in a.metrics}
        for stage, a in artifacts.items()
        if "top1" in a.metrics
    }
    onnx = {
        row.role: {
            "top1": row.top1,
            "p50_b1_ms": row.p50_ms(1),
            "file_bytes": row.file_bytes,
            "params": row.params,
            "macs": row.macs,
        }
        for row in bench.rows
    }
    return {
        "name": name,
        "recipe": recipe_file,
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
        "stages": stages,
        "onnx": onnx,
        "test_samples": bench.row("student").eval_samples,
        "ratios": bench.to_json()["ratios"],
        "headline": artifacts["bench"].metrics,
        "stage_seconds": {stage: round(a.seconds, 1) for stage, a in artifacts.items()},
        "wall_s": round(wall_s, 1),
        "machine": machine_info(),
        "versions": versions(),
    }


STAGE_KEYS = (
    "top1",
    "params",
    "macs",
    "macs_reduction",
    "top1_delta",
    "fp32_top1",
    "ptq_top1",
    "agreement_with_fp32",
    "latency_ms_b1",
    "latency_ms_b1_before",
)


def table(r: dict) -> str:
    """One row per stage (PyTorch), then one per exported file (ONNX Runtime)."""
    lines = [
        f"run {r['name']} ({r['recipe']}, overrides {r['overrides']}), wall {r['wall_s']:.0f}s",
        "",
        "| stage | top-1 (%) | params (M) | MACs (M) |",
        "|---|---:|---:|---:|",
    ]
    for stage, m in r["stages"].items():
        lines.append(
            f"| {stage} | {m['top1']:.2f} | {m['params'] / 1e6:.3f} | {m['macs'] / 1e6:.1f} |"
        )
    lines += [
        "",
        "| ONNX file | top-1 (%) | p50 b1 (ms) | size (MiB) | speed-up b1 vs teacher |",
        "|---|---:|---:|---:|---:|",
    ]
    teacher_ms = r["onnx"]["teacher"]["p50_b1_ms"]
    for role, m in r["onnx"].items():
        lines.append(
            f"| {role} | {m['top1']:.2f} | {m['p50_b1_ms']:.3f} | {m['file_bytes'] / 2**20:.2f} | "
            f"{teacher_ms / m['p50_b1_ms']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
