"""What INT8 buys a vision transformer at 224 px: FP32 vs INT8 files on ONNX Runtime and OpenVINO.

    python benchmarks/transformer_int8.py --data ../shared/data/cifar10
    python benchmarks/transformer_int8.py --data ... --only timm:vit_tiny_patch16_224

Each model is built at 224 px (random weights but a head with real margins: speed does not
depend on the weights, and the export check needs logits that are not all ties), quantized by
``compress.quantize`` (every linear layer INT8; percentile calibration on 64 CIFAR-10 test images
resized to 224) and exported twice by ``compress.export`` with its checks (FP32, INT8). Both
files are benchmarked by ``compress.bench`` on both backends, batch 1 and ``--batch-size``, in
one process per file, ``--threads`` threads. Prints a table and writes
``benchmarks/results/transformer_int8.json`` (with the machine and CPU flags).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import compress
from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions
from compress.nets.models import build_model, count_params_macs
from compress.quantization.fake_quant import quantized_layers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT = HERE / "results" / "transformer_int8.json"
MODELS = (
    "timm:vit_tiny_patch16_224",
    "timm:deit_small_patch16_224",
    "torchvision:vit_b_16",
    "torchvision:swin_t",
    # hybrids whose untraceable blocks quantize through their traced twins (timm_blocks.py)
    "timm:tiny_vit_5m_224",
    "timm:mobilevit_xxs",
    "timm:mobilevitv2_050",
    "timm:efficientvit_b0",
)
BACKENDS = ("onnxruntime", "openvino")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 (test.npz)")
    parser.add_argument("--only", nargs="*", help="models (default: all of MODELS)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-budget", type=float, default=8.0, help="seconds per batch size")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    images = cifar_images(args.data, args.size, 96)
    rows = []
    for name in args.only or MODELS:
        started = time.perf_counter()
        rows.append(measure(name, images, args) | {"wall_s": round(time.perf_counter() - started)})
        print(row_line(rows[-1]), flush=True)
    record = {"machine": machine_info(), "versions": versions(), "args": vars(args), "rows": rows}
    record["args"] = {k: str(v) for k, v in record["args"].items()}
    write_json_atomic(args.out, record)
    print(table(rows, args.batch_size))
    print(f"written: {args.out}")


def cifar_images(folder: Path, size: int, count: int) -> torch.Tensor:
    with np.load(folder / "test.npz") as archive:
        x = torch.from_numpy(archive["x"][:count]).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def with_margins(model: torch.nn.Module) -> torch.nn.Module:
    """The classifier's weights drawn wide enough that the logits of different images differ
    (torchvision starts a ViT's head at zero: every logit 0, every comparison a tie)."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(head.weight, std=1.0 / head.in_features**0.5)
    return model


def measure(name: str, images: torch.Tensor, args) -> dict:
    torch.manual_seed(0)
    model = with_margins(build_model(name, num_classes=10, image_size=args.size)).eval()
    params, macs = count_params_macs(model, args.size)
    calibration, check = [images[:32], images[32:64]], images[64:]
    qmodel = compress.quantize(model, calibration)
    folder = ROOT / "exported" / "transformer_int8" / name.replace(":", "__")
    folder.mkdir(parents=True, exist_ok=True)
    records = {
        "fp32": compress.export(model, folder / "fp32.onnx", check_inputs=check),
        "int8": compress.export(qmodel, folder / "int8.onnx", check_inputs=check),
    }
    result = compress.bench(
        {"fp32": folder / "fp32.onnx", "int8": folder / "int8.onnx"},
        backends=BACKENDS,
        batch_size=args.batch_size,
        threads=args.threads,
        processes=1,
        warmup=3,
        iterations=50,
        time_budget_s=args.time_budget,
    )
    latency = {
        f"{row.model}/{row.backend}/b{batch}": row.p50_ms(batch)
        for row in result.rows
        for batch in (1, args.batch_size)
    }
    return {
        "model": name,
        "image_size": args.size,
        "params": params,
        "gmacs": round(macs / 1e9, 2),
        "int8_layers": len(quantized_layers(qmodel)),
        "int8_max_diff_ratio": records["int8"]["max_rel_diff"],
        "int8_agreement": records["int8"]["top1_agreement"],
        "portable": records["int8"]["portability"]["portable"],
        "p50_ms": latency,
        "bench": result.to_json(),
    }


def row_line(row: dict) -> str:
    return f"{row['model']}: {row['int8_layers']} INT8 layers, {row['p50_ms']}"


def table(rows: list[dict], batch: int) -> str:
    lines = [
        f"| model | GMACs | INT8 agreement | backend | FP32 b1 ms | INT8 b1 ms | INT8 speed-up b1 "
        f"| FP32 b{batch} ms | INT8 b{batch} ms | INT8 speed-up b{batch} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for backend in BACKENDS:
            cells = []
            for b in (1, batch):
                fp32 = row["p50_ms"].get(f"fp32/{backend}/b{b}")
                int8 = row["p50_ms"].get(f"int8/{backend}/b{b}")
                ratio = f"{fp32 / int8:.2f}x" if fp32 and int8 else "-"
                cells += [_ms(fp32), _ms(int8), ratio]
            lines.append(
                f"| {row['model']} | {row['gmacs']} | {row['int8_agreement']:.3f} | {backend} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
