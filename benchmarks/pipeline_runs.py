"""Run shipped recipes end to end and record what they measured.

    python benchmarks/pipeline_runs.py quickstart
    python benchmarks/pipeline_runs.py cifar10-short --data ../shared/data/cifar10

Prints a table (accuracy of teacher and student in PyTorch and as exported ONNX, latency,
speed-up, size) and writes ``benchmarks/results/<name>.json`` with the machine description.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from compress.benchmark import machine_info, versions
from compress.fileio import write_json_atomic
from compress.pipeline import run
from compress.recipe import load_recipe

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes"

# name -> (recipe, CLI-style overrides). Budgets are what a 2-core CPU runs in minutes.
RUNS = {
    "quickstart": ("quickstart.yaml", {}),
    "cifar10-short": ("resnet18_to_mobile.yaml", {"epochs": 3, "subset": (5000, 2000)}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    bench = json.loads(artifacts["bench"].files["json"].read_text())
    rows = {row["role"]: row for row in bench["rows"]}
    stage_seconds = {stage: round(a.seconds, 1) for stage, a in artifacts.items()}

    def latency(role, batch):
        entry = next(b for b in rows[role]["latency"] if b["batch_size"] == batch)
        return entry["latency_ms"]["p50"]

    return {
        "name": name, "recipe": recipe_file, "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
        "teacher_top1_torch": artifacts["teacher"].metrics["top1"], "student_top1_torch": artifacts["distill"].metrics["top1"],
        "teacher_top1_onnx": rows["teacher"]["top1"], "student_top1_onnx": rows["student"]["top1"],
        "test_samples": rows["student"]["eval_samples"],
        "teacher_p50_b1_ms": latency("teacher", 1), "student_p50_b1_ms": latency("student", 1),
        "ratios": bench["ratios"]["student"], "teacher_params": rows["teacher"]["params"], "student_params": rows["student"]["params"],
        "teacher_macs": rows["teacher"]["macs"], "student_macs": rows["student"]["macs"],
        "stage_seconds": stage_seconds, "wall_s": round(wall_s, 1), "machine": machine_info(), "versions": versions(),
    }


def table(r: dict) -> str:
    ratios = r["ratios"]
    return "\n".join([
        "| run | teacher top-1 (torch / onnx) | student top-1 (torch / onnx) | p50 b1 teacher -> student (ms) | speed-up b1 | throughput x | size x | wall |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['name']} | {r['teacher_top1_torch']:.2f} / {r['teacher_top1_onnx']:.2f} | {r['student_top1_torch']:.2f} / {r['student_top1_onnx']:.2f} "
        f"| {r['teacher_p50_b1_ms']:.3f} -> {r['student_p50_b1_ms']:.3f} | {ratios['speedup_b1']:.2f} | {ratios['speedup_throughput']:.2f} "
        f"| {ratios['size_reduction']:.2f} | {r['wall_s']:.0f}s |",
    ])


if __name__ == "__main__":
    main()
