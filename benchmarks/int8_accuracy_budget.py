"""INT8 within an accuracy budget (``quantize.max_drop``) on a real student: full INT8, INT8 with
the budget met, and FP32, side by side.

    python benchmarks/int8_accuracy_budget.py exported/cifar10_reference/cifar10_cpu \\
        --data ../shared/data/cifar10

The run's pruned student (its ``prune`` stage, else its last float student) is quantized
post-training as the quantize stage does it, calibrated on training images outside a held-out
slice of ``--holdout-images`` training images (seeded, class-balanced: the stage's
``split_holdout``). For each budget of ``--budgets`` the search of
:func:`compress.quantization.budget.keep_float` keeps the most sensitive layers in float until the
exported file is within the budget on the held-out images (a budget it cannot meet is reported
with its best step). Every file of every step (FP32, full INT8, each number of float layers) is
evaluated with ONNX Runtime on the held-out images and on the whole test split, and, unless
``--no-timing``, timed with ONNX Runtime on one CPU thread at batch 1 and 64 (what each float
layer costs). Prints a table and writes ``benchmarks/results/int8_accuracy_budget.json`` with
the machine's CPU model and flags.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

from compress.benchmark.compare import bench_models
from compress.benchmark.measure import predict_onnx
from compress.benchmark.spec import BenchConfig
from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions
from compress.core.records import StageRecord
from compress.data.loaders import make_loaders, split_holdout, test_arrays
from compress.exporters.network import export_network, run_exported
from compress.exporters.spec import ExportConfig
from compress.pipeline.artifacts import Artifact
from compress.pipeline.context import RunContext
from compress.pipeline.recipe.load import load_recipe
from compress.pipeline.stages.export import normalised_test_images, onnx_metadata
from compress.pipeline.stages.networks import (
    calibration_batches,
    example_batch,
    load_network,
    preprocess,
)
from compress.quantization.budget import BudgetNotMet, keep_float
from compress.quantization.fake_quant import calibrate, prepare_quantized, with_float_layers

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a finished run folder (exported/<name>)")
    parser.add_argument("--data", help="the dataset path, if the recipe's does not resolve here")
    parser.add_argument("--stage", default="prune", help="the float student's stage")
    parser.add_argument("--holdout-images", type=int, default=2000)
    parser.add_argument("--calibration-images", type=int, default=2048)
    parser.add_argument("--calibration", default="percentile")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.1, 0.0])
    parser.add_argument("--no-timing", action="store_true", help="accuracy only (a busy machine)")
    parser.add_argument("--time-budget", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "int8_accuracy_budget.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    recipe = load_recipe(args.run_dir / "recipe.yaml", data=args.data)
    ctx = RunContext(recipe, args.run_dir, torch.device("cpu"), show_progress=False)
    source = float_artifact(args.run_dir, args.stage)
    student = load_network(ctx, source).eval()
    prep = preprocess(ctx)
    rest, (held_images, held_labels) = split_holdout(ctx.data, args.holdout_images, recipe.seed)
    train_loader, _ = make_loaders(rest, recipe.data, seed=recipe.seed)
    batches = calibration_batches(ctx, train_loader, prep, args.calibration_images)
    holdout = [(prep(held_images, train=False), held_labels)]

    qmodel = prepare_quantized(student, target="onnxruntime-cpu", example_inputs=example_batch(ctx))
    recalibrate = partial(calibrate, batches=batches, method=args.calibration)
    recalibrate(qmodel)
    qmodel.eval()

    searches = {}
    for budget in args.budgets:
        try:
            _, record = keep_float(
                qmodel,
                student,
                holdout,
                max_drop=budget,
                run_file=run_exported,
                recalibrate=recalibrate,
            )
            searches[f"{budget:g}"] = {"met": True, "record": record.to_json()}
        except BudgetNotMet as exc:
            searches[f"{budget:g}"] = {
                "met": False,
                "error": str(exc),
                "record": exc.budget.to_json(),
            }

    networks = {"fp32": student, "int8": qmodel}
    for search in searches.values():  # every step of every search: k float layers
        for step in search["record"]["steps"][1:]:
            names = tuple(step["float_layers"])
            key = f"int8+{len(names)} float"
            if key not in networks:
                network = with_float_layers(
                    qmodel, student, names, example_inputs=holdout[0][0][:2]
                )
                recalibrate(network)
                networks[key] = network.eval()
                networks[key].float_layers = names
    test_images, test_labels = test_arrays(ctx.data)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        files, checks = {}, {}
        for name, network in networks.items():
            files[name] = Path(folder) / f"{safe(name)}.onnx"
            checks[name] = export(ctx, network, files[name]).get("qdq") or {}
        for name, path in files.items():
            rows[name] = {
                "float_layers": list(getattr(networks[name], "float_layers", ())),
                "onnxruntime_float_convs": checks[name].get("fp32_conv_layers"),
                "onnxruntime_qlinear_convs": checks[name].get("qlinear_conv"),
                "holdout_top1": top1(path, held_images.numpy(), held_labels.numpy(), ctx),
                "test_top1": top1(path, test_images, test_labels, ctx),
                "file_bytes": path.stat().st_size,
            }
        if not args.no_timing:
            cfg = BenchConfig(
                batch_size=64, warmup=20, iterations=300, threads=1, time_budget_s=args.time_budget
            )
            bench = bench_models(files, cfg, None, reference="fp32")
            for row in bench.rows:
                rows[row.role] |= {
                    "p50_b1_ms": row.p50_ms(1),
                    "p50_b64_ms": row.p50_ms(64),
                    "status": row.status,
                }
    fp32 = rows["fp32"]
    for row in rows.values():
        row["holdout_drop"] = fp32["holdout_top1"] - row["holdout_top1"]
        row["test_drop"] = fp32["test_top1"] - row["test_top1"]
    record = {
        "run": str(args.run_dir),
        "stage": args.stage,
        "model": source.network.model,
        "params": source.metrics.get("params"),
        "holdout_images": args.holdout_images,
        "calibration": args.calibration,
        "calibration_images": args.calibration_images,
        "test_images": len(test_labels),
        "timed": not args.no_timing,
        "rows": rows,
        "searches": searches,
        "machine": machine_info(),
        "versions": versions(),
    }
    print(table(record))
    write_json_atomic(args.out, record)


def float_artifact(run_dir: Path, stage: str) -> Artifact:
    record = StageRecord.read(run_dir / stage)
    return Artifact(
        stage,
        files={"model": record.path("model")},
        metrics=record.metrics,
        role=record.role,
        network=record.network,
    )


def export(ctx: RunContext, network, path: Path) -> dict:
    """Write the file the export stage would write (verified against PyTorch on 512 test
    images, float layers proven float in ONNX Runtime's optimized graph); its check record."""
    return export_network(
        network,
        path,
        ExportConfig(check_samples=512),
        normalised_test_images(ctx.data, 512),
        onnx_metadata(ctx.data, path.stem, "student", ctx.recipe.name),
        getattr(network, "quant_spec", None),
        image_size=ctx.data.image_size,
        in_channels=ctx.data.in_channels,
        warn=False,
    )


def top1(path: Path, images: np.ndarray, labels: np.ndarray, ctx: RunContext) -> float:
    predicted = predict_onnx(path, images, mean=list(ctx.data.mean), std=list(ctx.data.std))
    return float(100.0 * np.mean(predicted == labels))


def safe(name: str) -> str:
    return name.replace("+", "_").replace(" ", "_")


def table(record: dict) -> str:
    lines = [
        f"held-out: {record['holdout_images']} training images; test: {record['test_images']}",
        "",
        "| file | float layers (float Conv in ORT's optimized graph) | held-out top-1 (drop) | "
        "test top-1 (drop) | p50 b1 (ms) | vs INT8 b1 | p50 b64 (ms) | vs INT8 b64 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    int8 = record["rows"]["int8"]
    for name, row in record["rows"].items():
        timing = []
        for key in ("p50_b1_ms", "p50_b64_ms"):
            value, base = row.get(key), int8.get(key)
            timing.append("—" if value is None else f"{value:.3f}")
            timing.append("—" if value is None or not base else f"{value / base:.2f}x")
        ort = row.get("onnxruntime_float_convs")
        lines.append(
            f"| {name} | {', '.join(row['float_layers']) or '—'}"
            f"{'' if ort is None else f' ({len(ort)})'} | "
            f"{row['holdout_top1']:.2f} ({row['holdout_drop']:+.2f}) | "
            f"{row['test_top1']:.2f} ({row['test_drop']:+.2f}) | " + " | ".join(timing) + " |"
        )
    lines += ["", "| max_drop | met | float layers | steps (float layers: held-out drop) |"]
    lines.append("|---:|---|---|---|")
    for budget, search in record["searches"].items():
        steps = search["record"]["steps"]
        lines.append(
            f"| {budget} | {'yes' if search['met'] else 'no'} | "
            f"{', '.join(steps[-1]['float_layers']) or '—'} | "
            + "; ".join(f"{len(s['float_layers'])}: {s['drop']:.2f}" for s in steps)
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
