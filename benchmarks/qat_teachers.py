"""Who should teach QAT, and how hard: the quantize stage run with several QAT settings on a
finished run's float student.

    python benchmarks/qat_teachers.py exported/quickstart
    python benchmarks/qat_teachers.py exported/cifar10_reference/cifar10_cpu --epochs 2

Each variant is the run's own quantize stage (its recipe settings, ``calibration: auto`` and
the held-out decision included) with one QAT setting changed: the teacher (``self``, the float
student itself, or the run's ``teacher`` stage) and the optimiser and learning rate. Every
candidate the stage recorded is listed (held-out and test top-1, agreement with the float
student) with what it shipped. Prints a table and writes
``benchmarks/results/qat_teachers-<run>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from int8_portability import completed_stages, latest_float

from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions
from compress.pipeline.config import QuantizeConfig
from compress.pipeline.context import RunContext
from compress.pipeline.recipe.load import load_recipe
from compress.pipeline.stages.quantize import quantize

HERE = Path(__file__).resolve().parent
# name: (teacher, optimizer, lr); None: the run's own setting
VARIANTS = {
    "self, run's optimiser": ("self", None, None),
    "teacher stage, run's optimiser": ("teacher", None, None),
    "self, sgd lr 0.001": ("self", "sgd", 0.001),
    "self, adamw lr 3e-5 (the stage's default)": ("self", "adamw", 3e-5),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a finished run folder (exported/<name>)")
    parser.add_argument("--epochs", type=int, help="QAT epochs (default: the run's, at least 1)")
    parser.add_argument(
        "--only", nargs="*", choices=list(VARIANTS), help="run these variants (default: all)"
    )
    args = parser.parse_args()

    started = time.perf_counter()
    recipe = load_recipe(args.run_dir / "recipe.yaml")
    artifacts = completed_stages(args.run_dir)
    source = latest_float(artifacts)
    ctx = RunContext(recipe, args.run_dir, torch.device("cpu"), show_progress=False)
    ctx.artifacts = {name: a for name, a in artifacts.items() if not a.quantized}
    ctx.artifacts["_source"] = dataclasses.replace(source, role="student")
    base = next(
        (s.config for s in recipe.stages if isinstance(s.config, QuantizeConfig)), QuantizeConfig()
    )
    epochs = args.epochs or max(base.train.epochs, 1)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (teacher, optimizer, lr) in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            train = dataclasses.replace(
                base.train,
                epochs=epochs,
                optimizer=optimizer or base.train.optimizer,
                lr=lr or base.train.lr,
            )
            cfg = dataclasses.replace(base, mode="qat", teacher=teacher, train=train)
            ctx.stage_dir = Path(folder) / str(len(results))
            began = time.perf_counter()
            metrics = quantize(cfg, ctx).metrics
            results[name] = {
                "teacher": teacher,
                "optimizer": train.optimizer,
                "lr": train.lr,
                "epochs": epochs,
                "fp32_top1": metrics["fp32_top1"],
                "candidates": metrics["candidates"],
                "shipped": metrics["shipped"],
                "seconds": time.perf_counter() - began,
            }
            print(table({name: results[name]}), flush=True)
    record = {
        "run_dir": str(args.run_dir),
        "student": source.network.model,
        "variants": results,
        "machine": machine_info(),
        "versions": versions(),
        "wall_s": time.perf_counter() - started,
    }
    print(table(results))
    out = HERE / "results" / f"qat_teachers-{args.run_dir.name}.json"
    if args.only and out.exists():  # the other variants' results stay
        record["variants"] = json.loads(out.read_text())["variants"] | results
    write_json_atomic(out, record)
    print(f"written: {out}")


def table(results: dict) -> str:
    lines = [
        "| QAT variant | candidate | held-out top-1 | test top-1 | agreement with FP32 | shipped |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, result in results.items():
        for candidate in result["candidates"]:
            held = candidate["holdout_top1"]
            lines.append(
                f"| {name} | {candidate['name']} | "
                f"{'—' if held is None else f'{held:.2f}'} | {candidate['test_top1']:.2f} | "
                f"{candidate['agreement_with_fp32']:.2%} | "
                f"{'yes' if candidate['name'] == result['shipped'] else ''} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
