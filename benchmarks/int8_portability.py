"""What portability costs: every INT8 weight range, PTQ and QAT, on a finished run's float student.

    python benchmarks/int8_portability.py exported/quickstart
    python benchmarks/int8_portability.py exported/cifar10_cpu --network distill --qat-epochs 1

For each weight range of ``compress.quantization.int8_kernels.WEIGHT_RANGES`` (portable ones and
``full``)
and each mode (PTQ, QAT with the run's own quantize settings), the network is quantized by the
quantize stage itself, exported and proven by the export stage itself, and the float network
and every INT8 file are benchmarked side by side with ONNX Runtime (one thread): top-1 on the
test split, batch-1 and batch-64 latency. Each file's portability verdict (the largest weight
pair, against the 128 that x86 kernels without VNNI allow) comes from the exported file.

``full`` files are only correct on CPUs with VNNI: on a CPU without it their ONNX top-1 is what
that CPU computes (wrong), and the table says so. Prints a table and writes
``benchmarks/results/int8_portability-<run>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch

from compress.benchmark.compare import bench_models
from compress.benchmark.rows import BenchResult
from compress.benchmark.spec import BenchConfig
from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions
from compress.core.records import StageRecord
from compress.data.loaders import test_arrays
from compress.exporters.network import export_network
from compress.pipeline.artifacts import Artifact
from compress.pipeline.config import QuantizeConfig
from compress.pipeline.context import RunContext
from compress.pipeline.recipe.load import load_recipe
from compress.pipeline.stages.export import input_of, normalised_test_images, onnx_metadata
from compress.pipeline.stages.networks import load_network
from compress.pipeline.stages.quantize import quantize
from compress.quantization.int8_kernels import WEIGHT_RANGES
from compress.training.spec import LossConfig

HERE = Path(__file__).resolve().parent
MODES = ("ptq", "qat")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a finished run folder (exported/<name>)")
    parser.add_argument(
        "--network",
        help=(
            "the stage whose float network is quantized (default: the latest float student, else "
            "the teacher)"
        ),
    )
    parser.add_argument(
        "--qat-epochs", type=int, help="QAT epochs (default: the run's quantize stage, else 1)"
    )
    parser.add_argument(
        "--eval-samples", type=int, help="test images for top-1 (default: the whole test split)"
    )
    parser.add_argument(
        "--time-budget", type=float, default=10.0, help="seconds of timing per file and batch size"
    )
    args = parser.parse_args()

    started = time.perf_counter()
    recipe = load_recipe(args.run_dir / "recipe.yaml")
    artifacts = completed_stages(args.run_dir)
    source = artifacts[args.network] if args.network else latest_float(artifacts)
    ctx = RunContext(recipe, args.run_dir, torch.device("cpu"), show_progress=False)
    ctx.artifacts = {name: a for name, a in artifacts.items() if not a.quantized}
    ctx.artifacts["_source"] = dataclasses.replace(
        source, role="student"
    )  # the network quantized, whatever it was
    base = quantize_settings(recipe, args.qat_epochs)
    cfg = BenchConfig(
        batch_size=64,
        warmup=10,
        iterations=200,
        time_budget_s=args.time_budget,
        threads=1,
        eval_samples=args.eval_samples,
    )
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        files = {"fp32": export_float(ctx, source, folder)}
        runs = {}
        for mode in MODES:
            for name in WEIGHT_RANGES:
                label = f"{mode}-{name}"
                settings = dataclasses.replace(base, mode=mode, weight_range=name)
                runs[label], files[label] = quantize_and_export(ctx, settings, folder / label)
                print(
                    f"{label}: PyTorch top-1 {runs[label]['top1']:.2f}%, worst pair "
                    f"{runs[label]['portability']['worst_pair_sum']}",
                    flush=True,
                )
        bench = bench_models(
            files, cfg, test_arrays(ctx.data, limit=args.eval_samples), reference="fp32"
        )
    record = summarise(args, recipe, source, runs, bench, time.perf_counter() - started)
    print(table(record))
    write_json_atomic(HERE / "results" / f"int8_portability-{args.run_dir.name}.json", record)


def completed_stages(run_dir: Path) -> dict[str, Artifact]:
    """Every finished stage of the run, oldest first, with the network it holds."""
    artifacts = {}
    for path in sorted(run_dir.glob("*/stage.json"), key=lambda p: p.stat().st_mtime):
        record = StageRecord.read(path.parent)
        artifacts[record.stage] = Artifact(
            record.stage,
            files={key: record.path(key) for key in record.files},
            metrics=record.metrics,
            role=record.role,
            network=record.network,
        )
    return artifacts


def latest_float(artifacts: dict[str, Artifact]) -> Artifact:
    networks = [
        a
        for a in artifacts.values()
        if "model" in a.files and "top1" in a.metrics and not a.quantized
    ]
    students = [a for a in networks if a.role == "student"]
    return (students or networks)[-1]


def quantize_settings(recipe, qat_epochs: int | None) -> QuantizeConfig:
    """The run's own quantize settings (or the defaults), with the KD loss when no distill stage
    gave one and ``qat_epochs`` if set."""
    found = next(
        (spec.config for spec in recipe.stages if isinstance(spec.config, QuantizeConfig)),
        QuantizeConfig(),
    )
    loss = found.loss or (LossConfig("kd"),)
    train = (
        found.train if qat_epochs is None else dataclasses.replace(found.train, epochs=qat_epochs)
    )
    return dataclasses.replace(found, loss=loss, train=train)


def export_float(ctx: RunContext, source: Artifact, folder: Path) -> Path:
    model = load_network(ctx, source).cpu()
    path = folder / "fp32.onnx"
    export_cfg = export_settings(ctx)
    images = normalised_test_images(ctx.data, export_cfg.check_samples)
    export_network(
        model,
        path,
        export_cfg,
        images,
        onnx_metadata(ctx.data, "student_fp32", source.network.model, ctx.recipe.name),
        None,
        **input_of(ctx.data),
    )
    return path


def quantize_and_export(
    ctx: RunContext, settings: QuantizeConfig, folder: Path
) -> tuple[dict, Path]:
    """The quantize stage with ``settings``, then the export stage's proof of the INT8 file."""
    ctx.stage_dir = folder
    artifact = quantize(settings, ctx)
    model = load_network(ctx, artifact).cpu()
    export_cfg = export_settings(ctx)
    images = normalised_test_images(ctx.data, export_cfg.check_samples)
    path = folder / "int8.onnx"
    metadata = onnx_metadata(ctx.data, "student", artifact.network.model, ctx.recipe.name)
    proof = export_network(
        model,
        path,
        export_cfg,
        images,
        metadata,
        artifact.network.quantization,
        **input_of(ctx.data),
        warn=False,
    )
    keys = ("fp32_top1", "ptq_top1", "top1", "agreement_with_fp32")
    extra = {
        "portability": proof["portability"],
        "max_rel_diff": proof["max_rel_diff"],
        "weight_sqnr_db": weight_sqnr_db(model),
    }
    return {key: artifact.metrics[key] for key in keys} | extra, path


def weight_sqnr_db(model: torch.nn.Module) -> float:
    """Signal-to-quantization-noise ratio of all INT8 weights together (dB): the precision a
    weight range keeps, independent of how many test images there are."""
    from compress.quantization.fake_quant import WeightQuant

    signal = noise = 0.0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, WeightQuant):
                signal += float((module.weight**2).sum())
                noise += float(((module.weight - module.quantized_weight()) ** 2).sum())
    return 10 * math.log10(signal / noise) if noise else float("inf")


def export_settings(ctx: RunContext):
    from compress.exporters.spec import ExportConfig

    return next(
        (spec.config for spec in ctx.recipe.stages if isinstance(spec.config, ExportConfig)),
        ExportConfig(),
    )


def summarise(
    args, recipe, source: Artifact, runs: dict, bench: BenchResult, wall_s: float
) -> dict:
    fp32 = bench.row("fp32")
    results = {}
    for label, run in runs.items():
        row = bench.row(label)
        results[label] = run | {
            "onnx_top1": row.top1,
            "onnx_top1_delta": None if row.top1 is None else row.top1 - fp32.top1,
            "p50_ms_b1": row.p50_ms(1),
            "p50_ms_b64": row.p50_ms(64),
            "speedup_b1": ratio(fp32.p50_ms(1), row.p50_ms(1)),
            "speedup_b64": ratio(fp32.p50_ms(64), row.p50_ms(64)),
            "agreement_with_fp32_onnx": bench.agreement.get(label, {}).get("fp32"),
            "status": row.status,
        }
    return {
        "run": str(args.run_dir),
        "recipe": recipe.name,
        "network": source.stage,
        "model": source.network.model,
        "fp32": {
            "onnx_top1": fp32.top1,
            "p50_ms_b1": fp32.p50_ms(1),
            "p50_ms_b64": fp32.p50_ms(64),
        },
        "results": results,
        "eval_samples": fp32.eval_samples,
        "wall_s": round(wall_s, 1),
        "machine": machine_info(),
        "versions": versions(),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def table(record: dict) -> str:
    fp32 = record["fp32"]
    lines = [
        f"{record['recipe']}: {record['network']} ({record['model']}), FP32 ONNX top-1 "
        f"{fp32['onnx_top1']:.2f}%, p50 {fp32['p50_ms_b1']:.3f} ms (b1) / {fp32['p50_ms_b64']:.2f} "
        f"ms (b64), {record['eval_samples']} test images",
        "",
        "| mode | weight range | portable | worst pair (<= 128) | weight SQNR (dB) | PyTorch top-1 "
        "| ONNX top-1 | vs FP32 | agreement with FP32 | p50 b1 (ms) | p50 b64 (ms) | speed-up b1 | "
        "speed-up b64 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in record["results"].items():
        mode, name = label.split("-", 1)
        p = r["portability"]
        lines.append(
            f"| {mode.upper()} | {name} | {'yes' if p['portable'] else 'no (VNNI only)'} | "
            f"{p['worst_pair_sum']} | {r['weight_sqnr_db']:.1f} | {r['top1']:.2f} | "
            f"{_num(r['onnx_top1'], '.2f')} | {_num(r['onnx_top1_delta'], '+.2f')} | "
            f"{_num(_pct(r['agreement_with_fp32_onnx']), '.2f')}% | {_num(r['p50_ms_b1'], '.3f')} "
            f"| {_num(r['p50_ms_b64'], '.2f')} | {_num(r['speedup_b1'], '.2f')}x | "
            f"{_num(r['speedup_b64'], '.2f')}x |"
        )
    machine = record["machine"]
    lines.append(
        f"\n{machine['cpu']}, {machine['usable_cores']} cores, flags: "
        f"{' '.join(machine['cpu_features']['flags'])}"
    )
    return "\n".join(lines)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


if __name__ == "__main__":
    main()
