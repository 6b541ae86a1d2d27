"""What INT8 buys each architecture of a finished run: FP32 vs INT8 (PTQ) on ONNX Runtime CPU.

    python benchmarks/int8_latency.py exported/benchmarks/resnet18_to_mobile

Every float network the run trained (the teacher, the distilled student, the pruned student) is
quantized post-training exactly as the quantize stage does it (BatchNorm folded, per-channel INT8
weights, uint8 activations, percentile calibration on training images), exported as FP32 and as
INT8 QDQ, and both files are benchmarked side by side (batch-1 latency, throughput, size,
top-1 accuracy and agreement). Prints a table and writes ``benchmarks/results/int8_latency.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from compress.benchmark.compare import bench_models
from compress.benchmark.rows import BenchRow
from compress.benchmark.spec import BenchConfig
from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions
from compress.core.records import STAGE_RECORD, StageRecord
from compress.data.loaders import test_arrays
from compress.exporters.onnx.export import export_onnx
from compress.exporters.qdq import check_qdq, store_int8_weights
from compress.pipeline.artifacts import Artifact
from compress.pipeline.context import RunContext
from compress.pipeline.recipe.load import load_recipe
from compress.pipeline.stages.export import onnx_metadata
from compress.pipeline.stages.networks import (
    calibration_batches,
    example_batch,
    load_network,
    preprocess,
)
from compress.quantization.fake_quant import calibrate, prepare_quantized

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a finished run folder (exported/<name>)")
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--time-budget", type=float, default=20.0)
    args = parser.parse_args()

    ctx = RunContext(
        load_recipe(args.run_dir / "recipe.yaml"),
        args.run_dir,
        torch.device("cpu"),
        show_progress=False,
    )
    cfg = BenchConfig(
        batch_size=64,
        warmup=20,
        iterations=300,
        time_budget_s=args.time_budget,
        eval_samples=args.eval_samples,
    )
    test_data = test_arrays(ctx.data, limit=args.eval_samples)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for stage, artifact in float_networks(args.run_dir).items():
            files = export_pair(ctx, stage, artifact, Path(folder), args.calibration_images)
            bench = bench_models(files, cfg, test_data, reference="fp32")
            results[stage] = {
                "model": artifact.network.model,
                "rows": [row.to_json() for row in bench.rows],
                "ratios": bench.ratios["int8"].to_json(),
                "agreement": bench.agreement,
            }
    record = {
        "run": str(args.run_dir),
        "results": results,
        "machine": machine_info(),
        "versions": versions(),
    }
    print(table(record))
    write_json_atomic(HERE / "results" / "int8_latency.json", record)


def float_networks(run_dir: Path) -> dict[str, Artifact]:
    """Every completed stage of the run that holds a float network."""
    networks = {}
    for record_path in sorted(run_dir.glob(f"*/{STAGE_RECORD}"), key=lambda p: p.stat().st_mtime):
        record = StageRecord.read(record_path)
        if (
            record.network is not None
            and "model" in record.files
            and "top1" in record.metrics
            and not record.network.quantized
        ):
            files = {"model": record.path("model")}
            networks[record.stage] = Artifact(
                record.stage,
                files=files,
                metrics=record.metrics,
                role=record.role,
                network=record.network,
            )
    return networks


def export_pair(
    ctx: RunContext, stage: str, artifact: Artifact, folder: Path, images: int
) -> dict[str, Path]:
    model = load_network(ctx, artifact).cpu().eval()
    metadata = onnx_metadata(ctx.data, stage, artifact.network.model, ctx.recipe.name)
    size, channels = ctx.data.image_size, ctx.data.in_channels
    fp32 = export_onnx(
        model,
        folder / f"{stage}_fp32.onnx",
        image_size=size,
        in_channels=channels,
        metadata=metadata,
    )
    qmodel = prepare_quantized(model, target="onnxruntime-cpu", example_inputs=example_batch(ctx))
    train_loader, _ = ctx.loaders()
    calibrate(
        qmodel, calibration_batches(ctx, train_loader, preprocess(ctx), images), method="percentile"
    )
    int8 = export_onnx(
        qmodel.eval(),
        folder / f"{stage}_int8.onnx",
        image_size=size,
        in_channels=channels,
        exporter="torchscript",
        metadata=metadata,
        transform=store_int8_weights,
    )
    check_qdq(int8, target="onnxruntime-cpu")
    return {"fp32": fp32, "int8": int8}


def table(record: dict) -> str:
    lines = [
        "| network | model | FP32 p50 b1 (ms) | INT8 p50 b1 (ms) | speed-up b1 | speed-up b64 | "
        "size | FP32 / INT8 top-1 (%) | agreement |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for stage, r in record["results"].items():
        rows = {row.role: row for row in map(BenchRow.from_json, r["rows"])}  # as written
        fp32, int8, ratios = rows["fp32"], rows["int8"], r["ratios"]
        lines.append(
            f"| {stage} | {r['model']} | {fp32.p50_ms(1):.3f} | {int8.p50_ms(1):.3f} | "
            f"{ratios['speedup_b1']:.2f}x | {ratios['speedup_throughput']:.2f}x | "
            f"{ratios['size_reduction']:.2f}x | {fp32.top1:.2f} / {int8.top1:.2f} | "
            f"{100 * r['agreement']['int8']['fp32']:.1f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
