"""Our INT8 file against what a user gets elsewhere from the same float ONNX file.

    python benchmarks/int8_vs_peers.py exported/qs/quickstart exported/cifar10_reference/cifar10_cpu
    python benchmarks/int8_vs_peers.py RUN --keep benchmarks/reference/NAME   # commit the files

For each finished run: its float student (``student_fp32.onnx``) is handed to the peers' post-
training quantizers, calibrated on the same number of training images (normalised as the file's
metadata says) as the run's quantize stage:

* ONNX Runtime ``quantize_static`` after ``quant_pre_process`` (what its documentation asks):
  QDQ, per-channel weights, U8S8, each calibration method (MinMax, Entropy, Percentile,
  Distribution). The ``ort_ptq`` row is the method with the best top-1 on the held-out training
  images the run's quantize stage decided on (the same images, the same rule as ours; ties to
  ONNX Runtime's default, MinMax); every method's test top-1 is recorded beside it
  (``top1_by_method``), with the best of them as ``best_on_test`` (a choice made on the test
  split, which neither tool may make);
* NNCF's ``nncf.quantize`` on the ONNX model (its defaults: the ``performance`` preset, 300
  calibration images at most, fast bias correction).

Then the float file, ours (``student.onnx``), the best ONNX Runtime file and NNCF's are benched
together by ``compress``'s bench (``bench_models``): ONNX Runtime and OpenVINO, one thread,
batch 1 and batch 64, the files interleaved in fresh processes; top-1 on the run's test split as
each runtime computes it, agreement with the float file, file size. Each file's portability
verdict is the pair-sum check of :func:`compress.exporters.qdq.int8_portability` (x86 u8s8 kernels
without VNNI add pairs of products in 16 bits).

The goal (issue 27): on every model ours >= the best peer's top-1 - 0.1 points, at least as fast
on ONNX Runtime (within the bench's noise bar), and portable. Prints a table and writes
``benchmarks/results/int8_vs_peers.json``: ``{"machine", "models": [{"name", "fp32_top1",
"tools": {"ours", "ort_ptq", "nncf_ptq": {"top1", "p50_ms_b1", "p50_ms_b64", "portable", ...}},
"files": {name: {"file", "sha256", "bytes"}}, "goal": {...}}]}``. Needs the ``peers`` extra
(``pip install -e '.[peers]'``: NNCF) and the openvino extra. Latency wants a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the helpers of the OpenVINO comparison

import torch  # noqa: E402
from int8_portability import completed_stages, latest_float  # noqa: E402
from openvino_vs_onnxruntime import exported_files, test_split  # noqa: E402

import compress  # noqa: E402
from compress.benchmark.backend_table import BACKENDS  # noqa: E402
from compress.benchmark.compare import BenchTarget, bench_models  # noqa: E402
from compress.benchmark.latency import NOISE_BAR, paired_ratio  # noqa: E402
from compress.benchmark.measure import normalisation, normalise_images, predict_on  # noqa: E402
from compress.benchmark.spec import BenchConfig  # noqa: E402
from compress.core.fileio import write_json_atomic  # noqa: E402
from compress.core.machine import machine_info, versions  # noqa: E402
from compress.data.load import load_dataset  # noqa: E402
from compress.data.loaders import split_arrays, split_holdout  # noqa: E402
from compress.exporters.onnx.graph import read_onnx_info  # noqa: E402
from compress.exporters.qdq import int8_portability  # noqa: E402
from compress.pipeline.config import QuantizeConfig  # noqa: E402
from compress.pipeline.context import RunContext  # noqa: E402
from compress.pipeline.recipe.load import load_recipe  # noqa: E402
from compress.pipeline.stages.export import onnx_metadata  # noqa: E402
from compress.pipeline.stages.networks import load_network  # noqa: E402

RUNTIMES = ("onnxruntime", "openvino")
ORT_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")
TOLERANCE_POINTS = 0.1  # ours may be this far below the best peer's top-1
TOOLS = ("ours", "ort_ptq", "nncf_ptq")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", type=Path, nargs="+", help="finished runs (exported/<name>)")
    parser.add_argument("--data", help="the data path, when the recipe's is not where it says")
    parser.add_argument("--eval-samples", type=int, help="test images (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--time-budget", type=float, default=8.0, help="seconds per batch size")
    parser.add_argument("--processes", type=int, default=5, help="fresh processes per file")
    parser.add_argument(
        "--requantize",
        action="store_true",
        help="ours = the run's float student quantized by this checkout (PTQ), not its file",
    )
    parser.add_argument("--keep", type=Path, help="copy the compared files here (one run only)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "int8_vs_peers.json")
    parser.add_argument(
        "--update",
        action="store_true",
        help="replace these runs' models in --out and keep its others (same machine only): "
        "runs compared with and without --requantize in one table",
    )
    args = parser.parse_args()
    if args.keep and len(args.run_dirs) != 1:
        parser.error("--keep takes one run")

    started = time.perf_counter()
    models = []
    with tempfile.TemporaryDirectory() as scratch:
        for run_dir in args.run_dirs:
            folder = Path(scratch) / run_dir.name
            folder.mkdir()
            models.append(compare_run(run_dir, folder, args))
            print(table_rows([models[-1]]), flush=True)
    record = {
        "machine": machine_info(),
        "versions": versions() | {"nncf": _version("nncf")},
        "settings": {
            "threads": 1,
            "batch_size": args.batch_size,
            "processes": args.processes,
            "time_budget_s": args.time_budget,
            "tolerance_points": TOLERANCE_POINTS,
            "speed_noise_bar": NOISE_BAR,
        },
        "models": kept_models(args.out, models) if args.update else models,
        "wall_s": time.perf_counter() - started,
    }
    print(table(record))
    write_json_atomic(args.out, record)
    print(f"written: {args.out}")


def kept_models(out: Path, models: list[dict]) -> list[dict]:
    """The models of the earlier ``out`` with those just compared replaced (or appended): only
    if it was measured on this machine, since its latencies sit in the same table."""
    earlier = json.loads(out.read_text())
    if earlier["machine"].get("cpu") != machine_info().get("cpu"):
        sys.exit(f"--update: {out} was measured on {earlier['machine'].get('cpu')}, not here")
    fresh = {m["name"]: m for m in models}
    merged = [fresh.pop(m["name"], m) for m in earlier["models"]]
    return merged + list(fresh.values())


def compare_run(run_dir: Path, folder: Path, args) -> dict:
    """One model: the peers' files made from the run's float student, everything benched."""
    files = {t.model: t.path for t in exported_files(run_dir)}
    fp32, ours = files["student_fp32"], files["student"]
    recipe = load_recipe(run_dir / "recipe.yaml", data=args.data)
    test_data = test_split(run_dir, args.data, args.eval_samples)
    mean, std = normalisation(read_onnx_info(fp32)["metadata"], fp32)
    settings = next(
        (s.config for s in recipe.stages if isinstance(s.config, QuantizeConfig)), QuantizeConfig()
    )
    bundle, held_out = split_holdout(
        load_dataset(recipe.data, seed=recipe.seed), settings.holdout_images, recipe.seed
    )
    held_out = (held_out[0].numpy(), held_out[1].numpy())
    images, _ = split_arrays(bundle.train, settings.calibration_images)
    calibration = normalise_images(images, mean, std)
    if args.requantize:
        ours = requantize(run_dir, recipe, calibration, held_out, (mean, std), folder)
    print(
        f"{run_dir.name}: {len(calibration)} calibration, {len(held_out[1])} held-out images",
        flush=True,
    )

    ort = {m: ort_quantize(fp32, calibration, m, folder / f"ort-{m}.onnx") for m in ORT_METHODS}
    ort_test, ort_held = {}, {}
    for method, path in ort.items():
        if path is not None:
            ort_test[method] = top1_of(path, test_data, mean, std)
            ort_held[method] = top1_of(path, held_out, mean, std)
            print(
                f"  ort_ptq {method}: held-out {ort_held[method]:.2f}%, test "
                f"{ort_test[method]:.2f}%",
                flush=True,
            )
    best_ort = max(ort_held, key=lambda m: (ort_held[m], m == ORT_METHODS[0]))
    nncf_file = nncf_quantize(fp32, calibration, folder / "nncf.onnx")
    compared = {
        "fp32": fp32,
        "ours": ours,
        "ort_ptq": ort[best_ort],
        "nncf_ptq": nncf_file,
    }
    cfg = BenchConfig(
        backends=RUNTIMES,
        batch_size=args.batch_size,
        warmup=10,
        iterations=200,
        time_budget_s=args.time_budget,
        threads=1,
        processes=args.processes,
        eval_samples=args.eval_samples,
    )
    targets = [BenchTarget(name, path) for name, path in compared.items()]
    result = bench_models(targets, cfg, test_data, reference="fp32", mean=mean, std=std)
    rows = {(row.model_name, row.backend): row for row in result.rows}
    tools = {}
    for name in TOOLS:
        ort_row, ov_row = (rows[(name, runtime)] for runtime in RUNTIMES)
        portability = int8_portability(onnx.load(str(compared[name]), load_external_data=False))
        tools[name] = {
            "top1": ort_row.top1,
            "p50_ms_b1": ort_row.p50_ms(1),
            "p50_ms_b64": ort_row.p50_ms(args.batch_size),
            "portable": portability.portable,
            "agreement_with_fp32": ort_row.agreement_with_reference,
            "openvino_top1": ov_row.top1,
            "openvino_p50_ms_b1": ov_row.p50_ms(1),
            "openvino_p50_ms_b64": ov_row.p50_ms(args.batch_size),
            "bytes": compared[name].stat().st_size,
            "worst_pair_sum": portability.worst_pair_sum,
            "layers_at_risk": portability.layers_at_risk,
            "paired_layers": portability.paired_layers,
        }
    tools["ort_ptq"] |= {
        "method": best_ort,
        "holdout_top1_by_method": ort_held,
        "top1_by_method": ort_test,
        "best_on_test": max(ort_test.values()),
    }
    tools["ours"]["holdout_top1"] = top1_of(ours, held_out, mean, std)
    ratios = {"b1": paired_vs_peers(rows, 1), "b64": paired_vs_peers(rows, args.batch_size)}
    fp32_row = rows[("fp32", "onnxruntime")]
    model = {
        "name": run_dir.name,
        "student": recipe.student.model if recipe.student else None,
        "ours": "re-quantized by this checkout (PTQ, calibration auto)"
        if args.requantize
        else "the run's student.onnx",
        "fp32_top1": fp32_row.top1,
        "fp32_p50_ms_b1": fp32_row.p50_ms(1),
        "fp32_p50_ms_b64": fp32_row.p50_ms(args.batch_size),
        "test_images": len(test_data[1]),
        "calibration_images": len(calibration),
        "tools": tools,
        "files": {name: file_record(path) for name, path in compared.items()},
        "goal": goal(tools, ratios) | {"one_test_image_points": 100 / len(test_data[1])},
        "bench": result.to_json(),
    }
    if args.keep:
        keep(compared, args.keep)  # the teacher (MBs, not compared) stays out of the repository
    return model


def requantize(run_dir, recipe, calibration, held_out, normalisation_, folder) -> Path:
    """The run's float student quantized by this checkout's ``compress.quantize`` (PTQ,
    ``calibration: auto`` on the same held-out images) and exported by ``compress.export``: ours
    as the code now makes it, without re-running the pipeline (no QAT)."""
    mean, std = normalisation_
    source = latest_float(completed_stages(run_dir))
    ctx = RunContext(recipe, run_dir, torch.device("cpu"), show_progress=False)
    model = load_network(ctx, source).eval()
    batches = [torch.from_numpy(calibration[i : i + 64]) for i in range(0, len(calibration), 64)]
    holdout = [
        (
            torch.from_numpy(normalise_images(held_out[0][i : i + 256], mean, std)),
            torch.from_numpy(held_out[1][i : i + 256]),
        )
        for i in range(0, len(held_out[1]), 256)
    ]
    qmodel = compress.quantize(model, batches, calibration="auto", holdout=holdout)
    path = folder / "ours.onnx"
    metadata = onnx_metadata(ctx.data, "student", source.network.model, recipe.name)
    compress.export(qmodel, path, check_inputs=batches[0][:64], metadata=metadata)
    print(f"  ours re-quantized: PTQ {qmodel.calibration_method}", flush=True)
    return path


def top1_of(path: Path, data: tuple[np.ndarray, np.ndarray], mean, std) -> float:
    """Top-1 (%) of an ONNX file on ``(uint8 images, labels)``, run by ONNX Runtime."""
    runtime = BACKENDS.get("onnxruntime")
    predicted = predict_on(runtime, path, data[0], mean=mean, std=std, threads=1)
    return 100 * float(np.mean(predicted == data[1]))


def ort_quantize(fp32: Path, images: np.ndarray, method: str, out: Path) -> Path | None:
    """ONNX Runtime's static QDQ quantization as its documentation shows it; None if it fails."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(images[i : i + 32] for i in range(0, len(images), 32))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {name: batch}

    prepared = out.with_suffix(".pre.onnx")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(fp32), str(prepared))
            quantize_static(
                str(prepared),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, method),
            )
    except Exception as exc:  # a peer's failure is a result, recorded
        print(f"  ort_ptq {method} failed: {type(exc).__name__}: {exc}", flush=True)
        return None
    return out


def nncf_quantize(fp32: Path, images: np.ndarray, out: Path) -> Path:
    """NNCF's post-training quantization of the ONNX model, with its defaults."""
    import nncf

    model = onnx.load(str(fp32))
    name = model.graph.input[0].name
    dataset = nncf.Dataset([images[i : i + 1] for i in range(len(images))], lambda x: {name: x})
    quantized = nncf.quantize(model, dataset, subset_size=min(300, len(images)))
    onnx.save(quantized, str(out))
    return out


def paired_vs_peers(rows: dict, batch: int) -> dict[str, float | None]:
    """Per peer, the median over the interleaved rounds of ours / the peer's process median on
    ONNX Runtime at ``batch`` (:func:`compress.benchmark.latency.paired_ratio`: a round's
    shared machine state cancels, as in the bench's own ratios)."""

    def processes(name: str) -> list[float | None]:
        point = rows[(name, "onnxruntime")].latency_at(batch)
        return [p.p50_ms for p in point.processes] if point else []

    return {peer: paired_ratio(processes("ours"), processes(peer))[0] for peer in TOOLS[1:]}


def goal(tools: dict, ratios: dict[str, dict[str, float | None]]) -> dict:
    """Issue 27's goal on one model: top-1 within TOLERANCE_POINTS of the best peer, as fast on
    ONNX Runtime as the fastest peer (paired ratio within the bench's noise bar), portable."""
    peers = [tools[name] for name in TOOLS[1:]]
    ours = tools["ours"]
    best_peer = max(p["top1"] for p in peers)
    speed = {b: max(r for r in by_peer.values() if r is not None) for b, by_peer in ratios.items()}
    accurate = ours["top1"] >= best_peer - TOLERANCE_POINTS
    fast = all(ratio <= 1 + NOISE_BAR for ratio in speed.values())
    return {
        "top1_vs_best_peer": ours["top1"] - best_peer,
        "latency_vs_fastest_peer": speed,  # ours / the fastest peer, paired by round
        "accurate": accurate,
        "fast": fast,
        "portable": bool(ours["portable"]),
        "met": accurate and fast and bool(ours["portable"]),
    }


def file_record(path: Path) -> dict:
    return {"file": path.name, "sha256": sha256(path), "bytes": path.stat().st_size}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def keep(files: dict[str, Path | None], folder: Path) -> None:
    """Copy the compared files to ``folder``, named after what they are."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        if path is not None:
            shutil.copyfile(path, folder / f"{name}.onnx")
            print(f"kept {folder / f'{name}.onnx'} ({sha256(path)[:12]})")


def table_rows(models: list[dict]) -> str:
    lines = []
    for model in models:
        lines.append(
            f"| **{model['name']}** FP32 | {model['fp32_top1']:.2f} | 100% | "
            f"{model['fp32_p50_ms_b1']:.3f} | {model['fp32_p50_ms_b64']:.2f} | | | |"
        )
        for name in TOOLS:
            t = model["tools"][name]
            label = f"{name} ({t['method']})" if "method" in t else name
            lines.append(
                f"| {label} | {t['top1']:.2f} | {t['agreement_with_fp32']:.2%} | "
                f"{t['p50_ms_b1']:.3f} | {t['p50_ms_b64']:.2f} | "
                f"{_num(t['openvino_p50_ms_b1'], '{:.3f}')} | "
                f"{_num(t['openvino_p50_ms_b64'], '{:.2f}')} | "
                f"{'yes' if t['portable'] else 'no'} ({t['layers_at_risk']}/{t['paired_layers']} "
                f"at risk) |"
            )
        g = model["goal"]
        lines.append(
            f"| goal | {g['top1_vs_best_peer']:+.2f} pts vs best peer | | "
            f"{g['latency_vs_fastest_peer']['b1']:.2f}x fastest peer | "
            f"{g['latency_vs_fastest_peer']['b64']:.2f}x | | | "
            f"{'met' if g['met'] else 'NOT met'} |"
        )
    return "\n".join(lines)


def table(record: dict) -> str:
    batch = record["settings"]["batch_size"]
    header = [
        f"| file | top-1 (%) | agreement with FP32 | ORT p50 b1 (ms) | ORT p50 b{batch} (ms) | "
        f"OpenVINO b1 (ms) | OpenVINO b{batch} (ms) | portable without VNNI |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    machine = record["machine"]
    flags = machine["cpu_features"].get("flags", [])
    footer = (
        f"\n{machine['cpu']} ({' '.join(flags)}), {machine['usable_cores']} usable cores, 1 "
        "thread; " + ", ".join(f"{n} {v}" for n, v in record["versions"].items())
    )
    return "\n".join(header) + "\n" + table_rows(record["models"]) + footer


def _version(package: str) -> str | None:
    with contextlib.suppress(Exception):
        return __import__(package).__version__
    return None


def _num(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


if __name__ == "__main__":
    main()
