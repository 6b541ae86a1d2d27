"""What folding multi-branch blocks buys the FP32 file: the network as trained (every branch a
convolution) vs as ``compress.export`` writes it (each block folded into one convolution).

    python benchmarks/reparameterized_export.py
    python benchmarks/reparameterized_export.py --only timm:mobileone_s0 --size 224

Each timm model is built at ``--size`` px with random weights and BatchNorm statistics drawn as
training leaves them (speed does not depend on the values; the fold's exactness is checked on
them), exported twice: by ``compress.export`` (folded, proven against the network with its
branches) and by the exporter alone (``compress.exporters.onnx.export_onnx``: every branch kept).
Both files are benchmarked by ``compress.bench`` on ONNX Runtime and OpenVINO, one process per
file, batch 1 and ``--batch-size``. Prints a table and writes
``benchmarks/results/reparameterized_export.json`` (with the machine and CPU flags).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import onnx
import torch
from torch import nn

import compress
from compress.core.compat import torchvision  # noqa: F401  (before timm: its CPU import)
from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions
from compress.exporters.onnx.export import export_onnx
from compress.nets.models import build_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT = HERE / "results" / "reparameterized_export.json"
MODELS = ("timm:mobileone_s0", "timm:repvgg_a0", "timm:fastvit_t8")
BACKENDS = ("onnxruntime", "openvino")
FILES = ("branches", "folded")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", help="models (default: all of MODELS)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-budget", type=float, default=6.0, help="seconds per batch size")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    rows = []
    for name in args.only or MODELS:
        started = time.perf_counter()
        rows.append(measure(name, args) | {"wall_s": round(time.perf_counter() - started)})
        print(f"{name}: {rows[-1]['convs']} convolutions, {rows[-1]['p50_ms']}", flush=True)
    record = {"machine": machine_info(), "versions": versions(), "args": vars(args), "rows": rows}
    record["args"] = {k: str(v) for k, v in record["args"].items()}
    write_json_atomic(args.out, record)
    print(table(rows, args.batch_size))
    print(f"written: {args.out}")


def as_trained(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and scales away from their initial values (1 and 0), as training
    leaves them: a fold of untouched statistics would prove little."""
    generator = torch.Generator().manual_seed(0)
    for norm in model.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.copy_(0.1 * torch.randn(norm.num_features, generator=generator))
            norm.running_var.copy_(0.5 + torch.rand(norm.num_features, generator=generator))
            # scales under 1: a block sums three or four branches, and at 1 a random network's
            # activations grow block by block (MobileOne-S0: logits of 1e15; at 0.4-0.6, about 1e3)
            norm.weight.data.copy_(0.4 + 0.2 * torch.rand(norm.num_features, generator=generator))
    return model.eval()


def measure(name: str, args) -> dict:
    torch.manual_seed(0)
    model = as_trained(build_model(name, num_classes=10, image_size=args.size))
    images = torch.randn(32, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    folder = ROOT / "exported" / "reparameterized_export" / name.replace(":", "__")
    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(model, folder / "branches.onnx", image_size=args.size)
    record = compress.export(model, folder / "folded.onnx", check_inputs=images)
    result = compress.bench(
        {file: folder / f"{file}.onnx" for file in FILES},
        backends=BACKENDS,
        batch_size=args.batch_size,
        threads=args.threads,
        processes=1,
        warmup=3,
        iterations=50,
        time_budget_s=args.time_budget,
    )
    return {
        "model": name,
        "image_size": args.size,
        "convs": {file: convolutions(folder / f"{file}.onnx") for file in FILES},
        "folded_max_rel_diff": record["max_rel_diff"],  # of the largest logit
        "folded_agreement": record["top1_agreement"],
        "p50_ms": {
            f"{row.model}/{row.backend}/b{batch}": row.p50_ms(batch)
            for row in result.rows
            for batch in (1, args.batch_size)
        },
        "bench": result.to_json(),
    }


def convolutions(path: Path) -> int:
    return sum(node.op_type == "Conv" for node in onnx.load(path).graph.node)


def table(rows: list[dict], batch: int) -> str:
    lines = [
        "| model | convolutions (branches -> folded) | backend | b1 branches | b1 folded "
        f"| speed-up | b{batch} branches | b{batch} folded | speed-up |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for backend in BACKENDS:
            cells = [row["model"], "{branches} -> {folded}".format(**row["convs"]), backend]
            for b in (1, batch):
                before, after = (row["p50_ms"].get(f"{f}/{backend}/b{b}") for f in FILES)
                if before is None or after is None:
                    cells += ["-", "-", "-"]
                else:
                    cells += [f"{before:.1f} ms", f"{after:.1f} ms", f"{before / after:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
