"""INT8 speed of networks with SiLU and squeeze-excitation gates, against ONNX Runtime's own PTQ.

    python benchmarks/gated_int8_speed.py --data ../shared/data/cifar10
    python benchmarks/gated_int8_speed.py --data ... --only torchvision:efficientnet_b0

Each model is built at 224 px (random weights, BatchNorm statistics and calibration from 64
CIFAR-10 test images resized to 224: speed does not depend on the weights) and written four
ways, all checked by ``compress.export`` except ONNX Runtime's:

* ``fp32``: the float network;
* ``whole``: ``compress.quantize`` (PTQ minmax) with each SiLU left whole, as ``compress`` did
  before SiLU was written as a product (``product_activations=("hardswish",)``): the SiLU runs
  in float between Dequantize and Quantize;
* ``ours``: ``compress.quantize`` as it ships (every SiLU ``x * sigmoid(x)``, its gate and its
  product quantized: ``QLinearSigmoid`` and ``QLinearMul``);
* ``ort_ptq``: the FP32 file through ONNX Runtime's ``quant_pre_process`` and ``quantize_static``
  (QDQ, per-channel, U8S8, MinMax; the same 32 calibration images).

The four files are timed in one ONNX Runtime process, interleaved in rounds
(:func:`compress.benchmark.backends.onnxruntime.measure_each`), one thread, batch 1 and
``--batch-size``; the ops each runs in float after ONNX Runtime's optimisation are counted; and
each file once on OpenVINO (``compress.bench``, a process per file, one thread), where
integer products are known to run slower than float ones (``integer_products``). Prints
a table and writes ``benchmarks/results/gated_int8_speed.json`` (machine and CPU flags included).
A quiet machine gives the cleanest ratios; they are paired within one process either way.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from int8_vs_peers import ort_quantize
from transformer_int8 import cifar_images, with_margins

import compress
from compress.benchmark.backends.onnxruntime import measure_each
from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions
from compress.exporters.qdq import float_ops, optimized_nodes
from compress.nets.models import build_model, count_params_macs
from compress.quantization.fake_quant import calibrate, prepare_quantized

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "gated_int8_speed.json"
MODELS = (
    "torchvision:efficientnet_b0",
    "timm:efficientnet_b0",
    "timm:tinynet_e",
    "timm:rexnet_100",
    "timm:mixnet_s",
    "torchvision:mobilenet_v3_large",  # hard-swish only: unchanged, a control
)
FILES = ("fp32", "whole", "ours", "ort_ptq")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 (test.npz)")
    parser.add_argument("--only", nargs="*", help="models (default: all of MODELS)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    images = cifar_images(args.data, args.size, 96)
    rows = []
    for name in args.only or MODELS:
        started = time.perf_counter()
        rows.append(measure(name, images, args) | {"wall_s": round(time.perf_counter() - started)})
        print(table(rows[-1:], args.batch_size).splitlines()[-1], flush=True)
    record = {
        "machine": machine_info(),
        "versions": versions(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    write_json_atomic(args.out, record)
    print(table(rows, args.batch_size))
    print(f"written: {args.out}")


def measure(name: str, images: torch.Tensor, args) -> dict:
    torch.manual_seed(0)
    model = with_margins(build_model(name, num_classes=10, image_size=args.size))
    with torch.no_grad():  # BatchNorm statistics of real images, not of the initialisation's
        model.train()(images[:64])
    model.eval()
    params, macs = count_params_macs(model, args.size)
    calibration, check = images[:32], images[64:]
    whole = prepare_quantized(
        model,
        target="onnxruntime-cpu",
        example_inputs=calibration[:2],
        product_activations=("hardswish",),
    )
    calibrate(whole, [calibration], method="minmax")
    ours = compress.quantize(model, [calibration], calibration="minmax")
    with tempfile.TemporaryDirectory() as folder:
        paths = {key: Path(folder) / f"{key}.onnx" for key in FILES}
        checks = {
            "fp32": compress.export(model, paths["fp32"], check_inputs=check),
            "whole": compress.export(whole, paths["whole"], check_inputs=check),
            "ours": compress.export(ours, paths["ours"], check_inputs=check),
        }
        with contextlib.redirect_stderr(io.StringIO()):
            ort_quantize(paths["fp32"], calibration.numpy(), "MinMax", paths["ort_ptq"])
        floats = {
            key: float_ops(Counter(node.op_type for node in optimized_nodes(path)))
            for key, path in paths.items()
        }
        timings = {
            batch: measure_each(
                [paths[key] for key in FILES],
                batch_size=batch,
                threads=1,
                rounds=args.rounds,
                runs=10,
                warmup=2,
            )
            for batch in (1, args.batch_size)
        }
        openvino = compress.bench(
            {key: paths[key] for key in FILES},
            backends=("openvino",),
            batch_size=args.batch_size,
            threads=1,
            processes=1,
            warmup=2,
            iterations=30,
            time_budget_s=4.0,
        )
    p50 = {}
    for batch, timing in timings.items():
        if timing["status"] != "ok":
            raise SystemExit(f"{name}: timing failed: {timing['error']}")
        p50[f"b{batch}"] = dict(zip(FILES, timing["ms"], strict=True))
    return {
        "model": name,
        "image_size": args.size,
        "params": params,
        "gmacs": round(macs / 1e9, 3),
        "int8_agreement": {key: checks[key]["top1_agreement"] for key in ("whole", "ours")},
        "float_ops": floats,
        "p50_ms": p50,
        "openvino_p50_ms": {
            f"b{batch}": {row.model: row.p50_ms(batch) for row in openvino.rows}
            for batch in (1, args.batch_size)
        },
        "timings": {f"b{batch}": timing for batch, timing in timings.items()},
    }


def table(rows: list[dict], batch: int) -> str:
    lines = [
        "| model | GMACs | runtime | batch | FP32 ms | SiLU whole ms | ours ms | ORT PTQ ms "
        "| ours vs FP32 | ours vs SiLU whole | ours vs ORT PTQ "
        "| float ops (whole / ours / ORT PTQ) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        counts = " / ".join(
            str(sum(row["float_ops"][key].values())) for key in ("whole", "ours", "ort_ptq")
        )
        for runtime, timing in (("ORT", row["p50_ms"]), ("OpenVINO", row["openvino_p50_ms"])):
            for key in ("b1", f"b{batch}"):
                ms = timing[key]
                lines.append(
                    f"| {row['model']} | {row['gmacs']} | {runtime} | {key[1:]} | "
                    + " | ".join(_ms(ms[file]) for file in FILES)
                    + f" | {_ratio(ms, 'fp32')} | {_ratio(ms, 'whole')} | {_ratio(ms, 'ort_ptq')}"
                    f" | {counts if runtime == 'ORT' else ''} |"
                )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(ms: dict, other: str) -> str:
    """How many times faster ours is than ``other``."""
    if ms.get(other) is None or ms.get("ours") is None:
        return "-"
    return f"{ms[other] / ms['ours']:.2f}x"


if __name__ == "__main__":
    main()
