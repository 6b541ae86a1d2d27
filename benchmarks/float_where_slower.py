"""Float where INT8 is slower, measured: `compress.float_where_slower` on a run's student.

    python benchmarks/float_where_slower.py exported/quickstart                 # MobileNetV2
    python benchmarks/float_where_slower.py exported/cifar10_reference/cifar10_cpu  # ResNet-8
    python benchmarks/float_where_slower.py --model timm:mobilevit_xxs --batch-sizes 1 8

The run's latest float student (or ``--model``: built at ``--size`` px with random weights, as
``transformer_int8.py`` builds it, calibrated on CIFAR-10 images resized) is quantized as the
quantize stage does it with ``calibration: minmax`` (PTQ; the ranges do not change the
latency), then ``compress.float_where_slower`` times each INT8 convolution and linear layer
alone as an integer kernel and as a float layer between INT8 ones
(ONNX Runtime, one thread), proposes the layers faster in float, and measures the whole network
both ways in interleaved fresh processes. Per batch size (default 1 and 64): every layer's two
timings, the layers proposed, the whole-network ratio mixed / all-INT8 (the INT8/FP32 ratio with
and without the option is that times the all-INT8 one) and whether the option would keep the
mixed network. Prints a table and writes ``benchmarks/results/float_where_slower-<run>.json``
(``-<source>_<model>.json`` for ``--model``).
Latency wants a quiet machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from int8_portability import completed_stages, latest_float
from transformer_int8 import cifar_images, with_margins

import compress
from compress.benchmark.backend_table import BACKENDS
from compress.benchmark.latency import paired_ratio
from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions
from compress.nets.models import build_model
from compress.pipeline.context import RunContext
from compress.pipeline.recipe.load import load_recipe
from compress.pipeline.stages.networks import calibration_batches, load_network, preprocess
from compress.pruning.latency import interleaved_p50
from compress.quantization.fake_quant import with_float_layers

HERE = Path(__file__).resolve().parent
CIFAR10 = HERE.parent.parent / "shared" / "data" / "cifar10"
ORT = BACKENDS.get("onnxruntime")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, nargs="?", help="a finished run (exported/<name>)")
    parser.add_argument("--model", help="a model name instead of a run (timm:mobilevit_xxs)")
    parser.add_argument("--size", type=int, default=224, help="--model's image size")
    parser.add_argument("--data", type=Path, default=CIFAR10, help="CIFAR-10, for --model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--processes", type=int, default=5, help="whole-network processes")
    args = parser.parse_args()
    if (args.run_dir is None) == (args.model is None):
        parser.error("give a run folder or --model, not both")

    started = time.perf_counter()
    label, student, model, batches = run_student(args) if args.run_dir else named_model(args)
    qmodel = compress.quantize(model, batches, calibration="minmax")
    by_batch = {}
    with tempfile.TemporaryDirectory() as folder:
        for batch in args.batch_sizes:
            result = compress.float_where_slower(
                qmodel, model, batches[0], batch_size=batch, processes=args.processes
            )
            record = result.float_where_slower
            by_batch[batch] = record.to_json() | against_fp32(
                model, qmodel, record.float_layers, batches[0], batch, args.processes, folder
            )
            print(table(by_batch[batch]), flush=True)
    record = {
        "run_dir": str(args.run_dir) if args.run_dir else None,
        "student": student,
        "by_batch_size": by_batch,
        "machine": machine_info(),
        "versions": versions(),
        "wall_s": time.perf_counter() - started,
    }
    out = HERE / "results" / f"float_where_slower-{label}.json"
    write_json_atomic(out, record)
    print(f"written: {out}")


def run_student(args):
    """The run's latest float student and 256 of its calibration images."""
    recipe = load_recipe(args.run_dir / "recipe.yaml")
    source = latest_float(completed_stages(args.run_dir))
    ctx = RunContext(recipe, args.run_dir, torch.device("cpu"), show_progress=False)
    model = load_network(ctx, source).eval()
    train_loader, _ = ctx.loaders()
    batches = calibration_batches(ctx, train_loader, preprocess(ctx), 256)
    return args.run_dir.name, source.network.model, model, batches


def named_model(args):
    """``--model`` at ``--size`` px (random weights, a head with margins) and 64 CIFAR-10 test
    images resized to it, in two batches."""
    torch.manual_seed(0)
    model = with_margins(build_model(args.model, num_classes=10, image_size=args.size)).eval()
    images = cifar_images(args.data, args.size, 64)
    return args.model.replace(":", "_"), args.model, model, [images[:32], images[32:]]


def against_fp32(model, qmodel, float_layers, example, batch, processes, folder) -> dict:
    """The float network, the all-INT8 one and (when layers were proposed) the mixed one,
    exported and timed together in interleaved processes: each INT8 file's latency over the
    FP32 file's, the median of the per-round ratios."""
    networks = {"fp32": model, "int8": qmodel}
    if float_layers:
        skip = [*qmodel.quant_spec.skip, *float_layers]
        networks["mixed"] = with_float_layers(qmodel, model, skip, example_inputs=example)
    paths = []
    for name, network in networks.items():
        path = Path(folder) / f"{name}-b{batch}.onnx"
        compress.export(network, path, check_inputs=example)
        paths.append(path)
    times = dict(zip(networks, interleaved_p50(ORT, paths, batch, 1, processes), strict=True))
    return {
        f"{name}_vs_fp32": paired_ratio(times[name], times["fp32"])[0]
        for name in networks
        if name != "fp32"
    }


def table(record: dict) -> str:
    lines = [
        f"batch {record['batch_size']}, {record['backend']}, {record['threads']} thread(s)",
        "| layer | INT8 (us) | float between INT8 (us) | float faster |",
        "|---|---:|---:|---|",
    ]
    for layer in record["layers"]:
        faster = layer["name"] in record["float_layers"]
        lines.append(
            f"| {layer['name']} | {layer['int8_ms'] * 1000:.1f} | {layer['float_ms'] * 1000:.1f} "
            f"| {'yes' if faster else ''} |"
        )
    ratio = record["ratio"]
    lines.append(
        f"\nwhole network vs FP32: all-INT8 {record['int8_vs_fp32']:.2f}x the FP32 latency"
        + (
            f", with the proposed float layers {record['mixed_vs_fp32']:.2f}x"
            if "mixed_vs_fp32" in record
            else ""
        )
    )
    lines.append(
        f"\n{len(record['float_layers'])} of {len(record['layers'])} layers faster in float alone; "
        + (
            f"whole network with them in float: {ratio:.2f}x the all-INT8 latency "
            f"({'kept' if record['kept'] else 'not kept'})"
            if ratio is not None
            else "nothing to measure"
        )
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
