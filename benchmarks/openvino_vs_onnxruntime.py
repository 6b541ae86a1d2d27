"""ONNX Runtime vs OpenVINO on the exported files of a finished run, in one bench run.

    python benchmarks/openvino_vs_onnxruntime.py [exported/cifar10_reference/cifar10_cpu]

Every ONNX file the run's export stage wrote (the FP32 teacher, the FP32 student, the INT8
student) is measured by ``compress``'s bench on both CPU backends (``onnxruntime`` then
``openvino``) in one ``bench_models`` call: batch 1 and batch 64 latency, one thread by
default, top-1 on the run's test split computed by each runtime itself, and each model's
agreement with the teacher of its own runtime. On top of the bench:

* **cross-runtime agreement**: per file, the share of test images on which OpenVINO predicts
  what ONNX Runtime predicts (a second pass over the test split with each runtime);
* **how OpenVINO ran each file**: its matrix layers' runtime precision (u8/i8 = integer
  kernels), from the compiled model's runtime graph;
* **OpenVINO without VNNI** (x86 only; ``--no-avx2-check`` skips it): each file predicted again
  in a child process whose oneDNN is capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``: the kernels
  of a CPU without VNNI, whose u8 x s8 pair sums saturate at 16 bits), with the kernels it
  chose and its agreement with OpenVINO's default kernels. A portable INT8 file agrees on every
  image.

Prints the bench table and a summary, and writes ``benchmarks/results/openvino_vs_onnxruntime.json``
(the summary, the whole bench result, the CPU model and its flags, the versions). Needs the
openvino extra (``pip install -e '.[openvino]'``). Latency wants a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from compress.benchmark.backend_table import BACKENDS
from compress.benchmark.backends.child import child_env
from compress.benchmark.compare import BenchTarget, bench_models
from compress.benchmark.measure import normalisation, predict_on
from compress.benchmark.rows import BenchResult
from compress.benchmark.spec import BenchConfig
from compress.benchmark.table import bench_table_markdown
from compress.core.cpu_features import cpu_features
from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions
from compress.core.records import StageRecord
from compress.data.load import load_dataset
from compress.data.loaders import test_arrays
from compress.exporters.onnx.graph import read_onnx_info
from compress.pipeline.recipe.load import load_recipe

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_RUN = ROOT / "exported" / "cifar10_reference" / "cifar10_cpu"
BACKEND_NAMES = ("onnxruntime", "openvino")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, nargs="?", default=DEFAULT_RUN)
    parser.add_argument("--data", help="the test data (default: the run's recipe's data.path)")
    parser.add_argument("--eval-samples", type=int, help="default: the whole test split")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--time-budget", type=float, default=15.0, help="seconds per batch size")
    parser.add_argument(
        "--no-avx2-check", action="store_true", help="skip OpenVINO capped at AVX2 (no VNNI)"
    )
    parser.add_argument(
        "--out", type=Path, default=HERE / "results" / "openvino_vs_onnxruntime.json"
    )
    args = parser.parse_args()

    started = time.perf_counter()
    targets = exported_files(args.run_dir)
    test_data = test_split(args.run_dir, args.data, args.eval_samples)
    cfg = BenchConfig(
        backends=BACKEND_NAMES,
        batch_size=args.batch_size,
        warmup=args.warmup,
        iterations=args.iterations,
        time_budget_s=args.time_budget,
        threads=args.threads,
        eval_samples=args.eval_samples,
    )
    result = bench_models(targets, cfg, test_data, reference="teacher")
    across, without_vnni = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        images = Path(folder) / "images.npy"
        np.save(images, test_data[0])
        for target in targets:
            ort, ov = (predict(name, target.path, test_data[0], cfg) for name in BACKEND_NAMES)
            across[target.model] = float(np.mean(ort == ov))
            if not args.no_avx2_check and cpu_features().x86:
                without_vnni[target.model] = capped_at_avx2(target.path, images, ov, cfg)
    record = {
        "run_dir": str(args.run_dir),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "summary": summarise(result, across, args.batch_size),
        "openvino_without_vnni": without_vnni,
        "bench": result.to_json(),
        "machine": machine_info(),
        "versions": versions(),
        "wall_s": time.perf_counter() - started,
    }
    print(bench_table_markdown(result))
    print(table(record))
    write_json_atomic(args.out, record)
    print(f"written: {args.out}")


def exported_files(run_dir: Path) -> list[BenchTarget]:
    """The ONNX files of the run's export stage (not FP16 copies: a GPU format), each proven to
    be the file the stage wrote."""
    record = StageRecord.read(run_dir / "export", expected="a finished export stage")
    targets = []
    for key in record.files:
        role, _, fmt = key.partition("@")
        if (fmt or "onnx") == "onnx":
            targets.append(BenchTarget(role, record.path(key), "onnx"))
    return targets


def test_split(run_dir: Path, data: str | None, limit: int | None):
    """(uint8 images, labels) of the run's test split, as its bench stage read them."""
    recipe = load_recipe(run_dir / "recipe.yaml", data=data)
    path = recipe.data.path
    if data is None and path is not None and not Path(path).exists():
        # recipes name their data relative to where the run was started: the repository root
        recipe = load_recipe(run_dir / "recipe.yaml", data=str(ROOT / path))
    return test_arrays(load_dataset(recipe.data, seed=recipe.seed), limit=limit)


def predict(backend: str, path: Path, images: np.ndarray, cfg: BenchConfig) -> np.ndarray:
    """Top-1 classes of the images, as ``backend``'s runtime computes them."""
    mean, std = normalisation(read_onnx_info(path)["metadata"], path)
    return predict_on(
        BACKENDS.get(backend),
        path,
        images,
        mean=mean,
        std=std,
        batch_size=cfg.batch_size,
        threads=cfg.threads,
    )


# Runs with oneDNN capped at AVX2: the convolution kernels OpenVINO chose, and its predictions.
_CAPPED = """
import json, sys
import numpy as np
import openvino as ov
sys.path.insert(0, sys.argv[1])
from openvino_vs_onnxruntime import predict
from compress.benchmark.backends.openvino import compile_settings, with_batch
from compress.benchmark.spec import BenchConfig
path, images, out = sys.argv[2], np.load(sys.argv[3]), sys.argv[4]
cfg = BenchConfig(batch_size=int(sys.argv[5]), threads=int(sys.argv[6]))
core = ov.Core()
compiled = core.compile_model(
    with_batch(ov, core.read_model(path), 1), "CPU", compile_settings(ov, cfg.threads)
)
kernels = sorted({
    node.get_rt_info()["primitiveType"].astype(str)
    for node in compiled.get_runtime_model().get_ordered_ops()
    if node.get_rt_info()["layerType"].astype(str) in ("Convolution", "FullyConnected")
})
np.save(out, predict("openvino", __import__("pathlib").Path(path), images, cfg))
print(json.dumps(kernels))
"""


def capped_at_avx2(path: Path, images: Path, default: np.ndarray, cfg: BenchConfig) -> dict:
    """OpenVINO's predictions for ``path`` with the kernels of an x86 CPU without VNNI, and their
    agreement with ``default`` (its predictions with this CPU's own kernels)."""
    out = images.with_name("capped.npy")
    done = subprocess.run(
        [sys.executable, "-c", _CAPPED, str(HERE), str(path), str(images), str(out)]
        + [str(cfg.batch_size), str(cfg.threads)],
        capture_output=True,
        text=True,
        errors="replace",
        env=child_env() | {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    kernels = json.loads(done.stdout.strip().splitlines()[-1])
    capped = np.load(out)
    os.unlink(out)
    return {
        "kernels": kernels,
        "capped": bool(kernels) and all("avx2" in k or "gemm" in k for k in kernels),
        "agreement_with_default": float(np.mean(capped == default)),
    }


def summarise(result: BenchResult, across: dict[str, float], batch: int) -> list[dict]:
    """One entry per (file, runtime): latency, throughput, top-1, agreement, precisions."""
    entries = []
    for row in result.rows:
        wide = row.latency_at(batch)
        runtime = row.runtime or {}
        entries.append(
            {
                "model": row.model_name,
                "file": Path(row.path).name,
                "runtime": row.backend,
                "status": row.status,
                "error": row.error,
                "p50_b1_ms": row.p50_ms(1),
                f"p50_b{batch}_ms": row.p50_ms(batch),
                f"images_per_s_b{batch}": wide.throughput_ips if wide else None,
                "cv_b1": row.latency_at(1).cv if row.latency_at(1) else None,
                "model_rss_mb": row.model_rss_mb,
                "top1": row.top1,
                "agreement_with_teacher": row.agreement_with_reference,
                "agreement_across_runtimes": across.get(row.model_name),
                "matmul_layers": runtime.get("matmul_layers"),
                "layer_precisions": runtime.get("layer_precisions"),
                "properties": runtime.get("properties"),
            }
        )
    return entries


def table(record: dict) -> str:
    batch = record["batch_size"]
    lines = [
        f"| model | runtime | p50 b1 (ms) | p50 b{batch} (ms) | images/s b{batch} | top-1 (%) | "
        "agreement with teacher | OpenVINO = ONNX Runtime | integer matrix layers |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in record["summary"]:
        layers = e["matmul_layers"]
        integer = f"{layers['integer']}/{layers['total']}" if layers else "—"
        lines.append(
            f"| {e['model']} | {e['runtime']} | {_num(e['p50_b1_ms'], '{:.3f}')} | "
            f"{_num(e[f'p50_b{batch}_ms'], '{:.2f}')} | "
            f"{_num(e[f'images_per_s_b{batch}'], '{:.0f}')} | {_num(e['top1'], '{:.2f}')} | "
            f"{_num(e['agreement_with_teacher'], '{:.2%}')} | "
            f"{_num(e['agreement_across_runtimes'], '{:.2%}')} | {integer} |"
        )
    checks = [
        f"- OpenVINO capped at AVX2 (no VNNI), {model}: "
        + (
            f"{check['agreement_with_default']:.2%} of the images predicted as with this CPU's "
            f"kernels ({', '.join(check['kernels'])})"
            if "error" not in check
            else f"failed: {check['error']}"
        )
        for model, check in record["openvino_without_vnni"].items()
    ]
    if checks:
        lines += [""] + checks
    machine, flags = record["machine"], record["machine"]["cpu_features"].get("flags", [])
    lines.append(
        f"\n{machine['cpu']} ({' '.join(flags)}), {machine['usable_cores']} usable cores, "
        f"{record['threads']} thread(s); "
        + ", ".join(f"{name} {version}" for name, version in record["versions"].items())
    )
    return "\n".join(lines)


def _num(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


if __name__ == "__main__":
    main()
