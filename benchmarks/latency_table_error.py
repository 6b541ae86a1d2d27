"""How far the latency planner's table predictions are from the runtime, plan by plan.

    python benchmarks/latency_table_error.py      # from the repository root, on a quiet machine

The reference run's distilled ResNet-8 gets a latency pruner per precision (``--precisions``,
FP32 and INT8 QDQ) on ONNX Runtime CPU, 1 thread, at ``--batch-size``, its table built (or read
from ``<out>/latency_tables/``). For each speed-up in ``--speedups`` every candidate plan
(importance, uniform, latency) is exported and measured against the unpruned network
(``LatencyPruner.preview``: interleaved fresh processes, pairwise ratios), nothing cut or
fine-tuned. The column that matters is *saving ratio*: the measured saving over the predicted
one (1.0: the table is right; below 1: it overstates what the cut saves).

With ``--model NAME`` (e.g. ``torchvision:mobilenet_v2``) the network is that registry model
at CIFAR-10 size (CIFAR stem, 10 classes) with random weights, its BatchNorm statistics
estimated on random images so that its activations have a real scale: latency does not depend
on the weights (the importance plan's channel choice then means nothing, its widths still do).

Prints a table and writes ``benchmarks/results/latency_table_error.json`` (``--result``) with the
machine's CPU and flags.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from latency_prune_vs_macs import finished_reference, load_student, machine_record, training_images

from compress.benchmark.backend_table import BACKENDS
from compress.core.fileio import write_json_atomic
from compress.errors import StageError
from compress.pruning.latency import LatencyPruner
from compress.pruning.spec import LatencyTarget, PruneSpec

HERE = Path(__file__).resolve().parent
NUM_CLASSES = 10  # CIFAR-10


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(HERE.parent / "exported" / "cifar10_reference"))
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--speedups", default="1.2,1.28", help="comma-separated goals (INT8 reaches about 1.29x)"
    )
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument(
        "--model", help="a registry model with random weights instead of the reference's student"
    )
    parser.add_argument("--result", default=str(HERE / "results" / "latency_table_error.json"))
    args = parser.parse_args()

    started = time.perf_counter()
    network, calibration = random_network(args.model) if args.model else reference_student(args)
    name = args.model or "reference ResNet-8 (distilled)"
    rows = []
    for precision in args.precisions.split(","):
        spec = PruneSpec(
            target=LatencyTarget(
                latency_speedup=2.0, batch_size=args.batch_size, processes=args.processes
            )
        )
        cache = Path(args.out) / "latency_tables"
        cache.mkdir(exist_ok=True)
        pruner = LatencyPruner(
            copy.deepcopy(network),
            calibration[0][:2],  # the export check compares on an image, not on zeros
            spec,
            backend=BACKENDS.get("onnxruntime"),
            precision=precision,
            calibration=calibration,
            num_classes=NUM_CLASSES,
            cache=cache,
            judge=lambda network: 0.0,  # every plan, in rule order
        )
        for speedup in (float(value) for value in args.speedups.split(",")):
            try:
                plans = pruner.preview(pruner.base_ms / speedup)
            except StageError as error:
                print(f"{precision} {speedup:g}x: {error}")
                continue
            for candidate in plans:
                measured_ms = pruner.base_ms / candidate.speedup  # pairwise, as a cut judges
                rows.append(
                    {
                        "model": name,
                        "precision": precision,
                        "goal_speedup": speedup,
                        "rule": candidate.rule,
                        "base_ms": pruner.base_ms,
                        "predicted_ms": candidate.predicted_ms,
                        "measured_ms": measured_ms,
                        "measured_p50_ms": candidate.measured_ms,
                        "speedup": candidate.speedup,
                        "saving_ratio": (pruner.base_ms - measured_ms)
                        / (pruner.base_ms - candidate.predicted_ms),
                        "widths": candidate.widths,
                    }
                )
    record = {
        "machine": machine_record(),
        "model": name,
        "batch_size": args.batch_size,
        "processes": args.processes,
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }
    print(table(rows))
    write_json_atomic(Path(args.result), record)


def reference_student(args) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The reference run's distilled student and 512 normalised training images."""
    _, reference, data = finished_reference(args.out)
    return load_student(reference["distill"]).eval(), training_images(data, 512)


def random_network(name: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """Registry model ``name`` at CIFAR-10 size with random weights, its BatchNorm statistics
    estimated on random images, and those images. (With the statistics it is built with, the
    untrained MobileNetV2's logits were 6e-10 and the INT8 export check cannot compare them.)"""
    from compress.nets.models import build_model
    from compress.training.batchnorm import recalibrate_batchnorm

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    network = build_model(name, num_classes=NUM_CLASSES, cifar_stem=True)
    images = [torch.randn(64, 3, 32, 32, generator=generator) for _ in range(4)]
    recalibrate_batchnorm(network, images)
    return network.eval(), images


def table(rows: list[dict]) -> str:
    lines = [
        "| precision | goal | plan | unpruned ms | predicted ms | measured ms | saving ratio |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['precision']} | {row['goal_speedup']:g}x | {row['rule']} "
            f"| {row['base_ms']:.3f} | {row['predicted_ms']:.3f} | {row['measured_ms']:.3f} "
            f"| {row['saving_ratio']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
