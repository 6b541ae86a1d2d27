"""Two versions of ``compress.quantize`` on the same trained weights: which quantizes better.

    python benchmarks/quantize_ab.py train timm:mobilenetv3_large_100 timm:efficientnet_b0
    PYTHONPATH=../old-checkout python benchmarks/quantize_ab.py eval --label before timm:...
    python benchmarks/quantize_ab.py eval --label after timm:...

``train`` trains each network as ``architecture_coverage.py`` trains it (digits at 64 px, 200
batches, again while under 50% top-1) and keeps its weights in
``exported/quantize_ab/``; ``eval`` quantizes them with the ``compress`` on the path (PTQ, the
sweep's four calibration batches) and compares the fake-quantized network with its float self on
the 297 test images: top-1 of each, top-1 agreement, largest logit difference over the largest
logit. Prints a table and writes ``benchmarks/results/quantize_ab-<label>.json`` (with the
commit of the ``compress`` that quantized, the machine and its CPU flags).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import architecture_coverage as coverage
import torch

import compress
from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions
from compress.nets.models import build_model

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE.parent / "exported" / "quantize_ab"
SIZE = 64


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("phase", choices=("train", "eval"))
    parser.add_argument("models", nargs="+", help="model names (timm:NAME, torchvision:NAME)")
    parser.add_argument("--label", default="current", help="names the eval's result file")
    args = parser.parse_args()
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    train, test = coverage.digits(SIZE)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, num_classes=10, image_size=SIZE)
        path = WEIGHTS / (name.replace(":", "__") + ".pt")
        if args.phase == "train":
            losses = [compress.loss("ce")]
            top1, _ = coverage.train_well(compress, model, train, test, 200, losses, lr=1e-3)
            torch.save(model.state_dict(), path)
            print(f"{name}: trained to {top1:.2f}% top-1, {path}", flush=True)
            continue
        model.load_state_dict(torch.load(path, weights_only=True))
        rows.append(compare(name, model.eval(), train, test))
        print(line(rows[-1]), flush=True)
    if args.phase == "eval":
        out = HERE / "results" / f"quantize_ab-{args.label}.json"
        record = {
            "compress": coverage.source_commit(),
            "machine": machine_info(),
            "versions": versions(),
        }
        write_json_atomic(out, record | {"rows": rows})
        print(f"written: {out}")


def compare(name: str, model: torch.nn.Module, train, test) -> dict:
    calibration = [images for images, _ in coverage.batches(train, 4)]
    qmodel = compress.quantize(model, calibration).eval()
    images, labels = test[0]
    with torch.no_grad():
        float_logits, int8_logits = model(images), qmodel(images)
    return {
        "model": name,
        "float_top1": top1(float_logits, labels),
        "int8_top1": top1(int8_logits, labels),
        "agreement": float((float_logits.argmax(1) == int8_logits.argmax(1)).float().mean()),
        "max_diff_ratio": float(
            (float_logits - int8_logits).abs().max() / float_logits.abs().max()
        ),
    }


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((logits.argmax(1) == labels).float().mean()) * 100, 2)


def line(row: dict) -> str:
    return (
        f"| {row['model']} | {row['float_top1']:.2f} | {row['int8_top1']:.2f} | "
        f"{row['agreement']:.4f} | {row['max_diff_ratio']:.4f} |"
    )


if __name__ == "__main__":
    main()
