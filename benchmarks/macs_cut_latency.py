"""How deep must MACs-targeted pruning cut to be as fast as the latency target? (issue 15, item 1)

    python benchmarks/macs_cut_latency.py      # from the repository root, on a quiet machine

The equal-latency comparison of ``latency_prune_vs_macs.py`` needs a MACs-targeted network as
fast as the latency-targeted one. This finds it, or shows there is none: the reference run's
distilled student is cut by Torch-Pruning to each MACs reduction in ``--speedups`` at each
``--round-to`` (1 is Torch-Pruning's default, 8 the reference recipe's, 16 ONNX Runtime's INT8
block), BatchNorm re-estimated, quantized as the prune-and-quantize path would (PTQ, 2,048
training images) and exported. No fine-tuning: latency does not depend on the weights, and
accuracy of an unfine-tuned cut says nothing. All files, the unpruned INT8 student and the
latency-targeted run's final student are then measured together in interleaved fresh processes
(ONNX Runtime CPU, 1 thread) at batch 1 and 64.

Per ``round_to`` the table says the smallest MACs reduction that is as fast as the latency
target at batch 64 (within ``--tolerance``), or that none in the sweep is. Exported cuts are
kept under ``<out>/macs_cuts/`` (a rerun measures again without re-cutting). Prints a table
and writes ``benchmarks/results/macs_cut_latency.json`` with the machine's CPU and flags.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from latency_prune_vs_macs import (
    CALIBRATION_IMAGES,
    finished_reference,
    load_student,
    machine_record,
    timing_record,
    training_images,
    unpruned_int8,
)

from compress.benchmark.backend_table import BACKENDS
from compress.core.fileio import write_json_atomic
from compress.errors import StageError
from compress.exporters.onnx.graph import read_onnx_info
from compress.pruning.latency import interleaved_p50

HERE = Path(__file__).resolve().parent
LATENCY_RUN = "cifar10_cpu-latency-b64-at-r16-x1.6"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(HERE.parent / "exported" / "cifar10_reference"))
    parser.add_argument(
        "--latency-run",
        default=LATENCY_RUN,
        help="the latency-targeted run (a folder under --out) whose final student is the bar",
    )
    parser.add_argument("--round-to", default="1,8,16", help="comma-separated round_to values")
    parser.add_argument(
        "--speedups", default="1.5,1.6,1.75,2,2.5,3,4,5,6", help="comma-separated MACs reductions"
    )
    parser.add_argument("--processes", type=int, default=5, help="fresh processes at batch 1")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.03,
        help="a cut within this fraction of the bar's batch-64 latency counts as as fast",
    )
    parser.add_argument("--result", default=str(HERE / "results" / "macs_cut_latency.json"))
    args = parser.parse_args()
    round_tos = [int(value) for value in args.round_to.split(",")]
    speedups = [float(value) for value in args.speedups.split(",")]

    started = time.perf_counter()
    out = Path(args.out)
    bar = out / args.latency_run / "student.onnx"
    _, reference, data = finished_reference(args.out)
    if not bar.is_file():
        raise SystemExit(f"{bar}: run benchmarks/latency_prune_vs_macs.py first")
    calibration = training_images(data, CALIBRATION_IMAGES)
    student = load_student(reference["distill"]).eval()

    cuts = {}  # file -> what was asked
    described = {}
    for round_to in round_tos:
        for speedup in speedups:
            path = out / "macs_cuts" / f"r{round_to}-x{speedup:g}.onnx"
            if not path.is_file() and not cut(student, round_to, speedup, calibration, path):
                print(f"round_to {round_to}, {speedup:g}x fewer MACs: out of reach, skipped")
                continue
            described[path] = read_onnx_info(path)
            macs = described[path]["macs"]
            if any(
                asked["round_to"] == round_to and described[other]["macs"] == macs
                for other, asked in cuts.items()
            ):
                continue  # Torch-Pruning stopped at the same network: measured once
            cuts[path] = {"round_to": round_to, "speedup_asked": speedup}

    files = [unpruned_int8(reference, data), bar, *cuts]
    described |= {path: read_onnx_info(path) for path in files[:2]}
    base_macs = described[files[0]]["macs"]
    print(f"measuring {len(files)} INT8 files, interleaved")
    b1 = interleaved_p50(BACKENDS.get("onnxruntime"), files, 1, 1, args.processes)
    b64 = interleaved_p50(BACKENDS.get("onnxruntime"), files, 64, 1, max(3, args.processes // 2))
    rows = []
    for index, path in enumerate(files):
        asked = cuts.get(path, {})
        rows.append(
            {
                "file": str(path),
                "variant": "unpruned"
                if index == 0
                else ("latency-targeted" if index == 1 else "macs-targeted"),
                "round_to": asked.get("round_to"),
                "speedup_asked": asked.get("speedup_asked"),
                "macs": described[path]["macs"],
                "macs_reduction": base_macs / described[path]["macs"],
                **timing_record(b1, b64, index),
                "speedup_b64_vs_unpruned": statistics.median(
                    a / b for a, b in zip(b64[0], b64[index], strict=True)
                ),
            }
        )
    bar_ms = rows[1]["p50_ms_b64"]
    summary = {}
    for round_to in round_tos:
        fast = [
            row
            for row in rows[2:]
            if row["round_to"] == round_to and row["p50_ms_b64"] <= bar_ms * (1 + args.tolerance)
        ]
        first = min(fast, key=lambda row: row["macs_reduction"], default=None)
        summary[str(round_to)] = None if first is None else first["macs_reduction"]
    record = {
        "machine": machine_record(),
        "latency_run": str(out / args.latency_run),
        "tolerance": args.tolerance,
        "rows": rows,
        "as_fast_as_latency_target_at_macs_reduction": summary,
        "wall_s": time.perf_counter() - started,
    }
    print(table(record))
    write_json_atomic(Path(args.result), record)


def cut(student, round_to: int, speedup: float, calibration, path: Path) -> bool:
    """Prune a copy of ``student`` to ``speedup``x fewer MACs at ``round_to``, re-estimate its
    BatchNorm, quantize it (PTQ) and export it to ``path``; False if Torch-Pruning cannot reach
    the reduction within the layers' limits."""
    from compress.api import export, prune, quantize
    from compress.pruning.spec import PruneSpec

    model = copy.deepcopy(student)
    example = torch.zeros(1, 3, 32, 32)
    try:
        prune(
            model,
            example,
            PruneSpec(speedup=speedup, round_to=round_to),
            calibration_data=calibration,
        )
    except StageError:
        return False
    with tempfile.TemporaryDirectory() as folder:
        staged = Path(folder) / path.name
        export(quantize(model.eval(), calibration), staged, check_inputs=example)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staged, path)
    return True


def table(record: dict) -> str:
    bar = record["rows"][1]
    lines = [
        "| network | round_to | MACs reduction (asked) | MACs | b1 ms | b64 ms | b64 speed-up "
        "| as fast as the latency target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in record["rows"]:
        asked = f" ({row['speedup_asked']:g})" if row["speedup_asked"] else ""
        fast = row["p50_ms_b64"] <= bar["p50_ms_b64"] * (1 + record["tolerance"])
        lines.append(
            f"| {row['variant']} | {row['round_to'] or ''} | {row['macs_reduction']:.2f}x{asked} "
            f"| {row['macs']:,} | {row['p50_ms_b1']:.3f} | {row['p50_ms_b64']:.3f} "
            f"| {row['speedup_b64_vs_unpruned']:.2f}x "
            f"| {'yes' if fast and row['variant'] == 'macs-targeted' else ''} |"
        )
    lines.append("")
    for round_to, reduction in record["as_fast_as_latency_target_at_macs_reduction"].items():
        lines.append(
            f"round_to {round_to}: "
            + (
                f"as fast as the latency target from {reduction:.2f}x fewer MACs"
                if reduction
                else "no cut in the sweep is as fast as the latency target"
            )
            + f" (its {bar['macs_reduction']:.2f}x)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
