"""Latency-targeted vs MACs-targeted pruning of the CIFAR-10 reference student, at equal measured
latency, same fine-tune budget, same runtime (issue 15, item 1).

    python benchmarks/latency_prune_vs_macs.py      # from the repository root

1. The reference run (``recipes/cifar10_cpu.yaml``, under ``--out``) must be finished: its prune
   stage is the MACs-targeted one (2x fewer MACs), followed by QAT, export and bench.
2. Its distilled student, exported INT8 as the prune stage would (PTQ), and the reference's final
   INT8 student are measured in ``--processes`` interleaved fresh processes (ONNX Runtime CPU, 1
   thread, at `--batch-size`): their pairwise ratio is the speed-up MACs pruning delivered.
3. The same recipe runs again with ``prune.target.latency_speedup`` set to that ratio and every
   other setting unchanged (its teacher and distill stages are the reference's, copied).
4. The three exported files (teacher, MACs-pruned and latency-pruned INT8 students) are measured
   interleaved at batch 1 and 64; the table shows accuracy (full test split), MACs and latency.

5. With ``--macs-round-to N`` (e.g. 16, ONNX Runtime's INT8 block width) a MACs-targeted run at
   that ``round_to`` (the reference's MACs target, or ``--macs-speedup``) is added, and a
   latency run targeted at the speed-up *it* delivered: the equal-latency comparison, where
   8-channel MACs pruning delivered none. ``--equal-latency-only`` runs this pair alone.

Resumable: each run is a pipeline run in its own folder, and the measured speed-up is
written into its recipe the first time. Prints a table and writes
``benchmarks/results/latency_prune_vs_macs.json`` with the machine's CPU and flags.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from compress.benchmark.backend_table import BACKENDS
from compress.benchmark.rows import BenchResult
from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info
from compress.core.records import StageRecord
from compress.data.augment import Preprocess
from compress.data.load import load_dataset
from compress.exporters.onnx.graph import read_onnx_info
from compress.pipeline.recipe.load import load_recipe
from compress.pipeline.runner import plan, run
from compress.pruning.latency import interleaved_p50

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "cifar10_cpu.yaml"
LATENCY_NAME_SUFFIX = "-latency-b{batch}"
CALIBRATION_IMAGES = 2048  # the reference's quantize.calibration_images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(HERE.parent / "exported" / "cifar10_reference"))
    parser.add_argument("--processes", type=int, default=7)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="the batch of the latency target (1 or 64)"
    )
    parser.add_argument(
        "--speedup",
        type=float,
        help="the latency target when MACs pruning delivered no speed-up (equal latency is then "
        "out of the question: the comparison is at this target instead)",
    )
    parser.add_argument(
        "--macs-round-to",
        type=int,
        help="also run MACs-targeted pruning at this round_to and a latency target at its speed-up",
    )
    parser.add_argument(
        "--macs-speedup",
        type=float,
        help="the MACs reduction of the --macs-round-to run (default: the reference's); a wider "
        "round_to cannot reach every reduction",
    )
    parser.add_argument(
        "--equal-latency-only",
        action="store_true",
        help="with --macs-round-to: only the equal-latency pair (no latency run at --speedup)",
    )
    parser.add_argument("--result", default=str(HERE / "results" / "latency_prune_vs_macs.json"))
    args = parser.parse_args()
    if args.equal_latency_only and not args.macs_round_to:
        raise SystemExit("--equal-latency-only: expected --macs-round-to N as well")

    started = time.perf_counter()
    recipe, reference, data = finished_reference(args.out)
    unpruned = unpruned_int8(reference, data)
    runs = {"teacher": reference, "macs-targeted": reference}
    speedup = measured_speedup(args, unpruned, reference)
    print(f"MACs pruning delivered {speedup:.3f}x at batch {args.batch_size} (INT8)")
    if speedup <= 1.0:
        if args.speedup is None:
            raise SystemExit(
                f"MACs pruning made the INT8 student no faster at batch {args.batch_size} "
                f"({speedup:.3f}x the unpruned one): at equal latency a latency target prunes "
                "nothing; give --speedup to compare at a target of your choice"
            )
        speedup = args.speedup
    suffix = LATENCY_NAME_SUFFIX.format(batch=args.batch_size)
    if not args.equal_latency_only:
        runs["latency-targeted"] = run_variant(args, reference, suffix, latency_edit(args, speedup))
    if args.macs_round_to:
        rounded = f"macs-targeted-r{args.macs_round_to}" + (
            f"-x{args.macs_speedup:g}" if args.macs_speedup else ""
        )
        runs[rounded] = run_variant(args, reference, f"-{rounded}", round_to_edit(args))
        rounded_speedup = measured_speedup(args, unpruned, runs[rounded])
        print(f"MACs pruning at round_to {args.macs_round_to}: {rounded_speedup:.3f}x (INT8)")
        runs[f"latency-targeted-at-{rounded.removeprefix('macs-targeted-')}"] = run_variant(
            args,
            reference,
            f"{suffix}-at-{rounded.removeprefix('macs-targeted-')}",
            latency_edit(args, max(rounded_speedup, 1.0)),
        )
    entries = {name: _entry(name, artifacts) for name, artifacts in runs.items()}
    entries = {"teacher": entries.pop("teacher"), "unpruned INT8 (PTQ)": None} | entries
    described = read_onnx_info(unpruned)  # counted from the graph, as the bench rows are
    entries["unpruned INT8 (PTQ)"] = {
        "file": unpruned,
        "onnx_top1": _onnx_top1(unpruned, data),
        "macs": described["macs"],
        "params": described["params"],
        "prune": None,
    }
    backend = BACKENDS.get("onnxruntime")
    record = {
        "machine": machine_record(),
        "reference_run": str(Path(args.out) / recipe.name),
        "latency_speedup_target": (
            _target_of(runs["latency-targeted"]) if "latency-targeted" in runs else None
        ),
        "variants": {},
        "wall_s": None,
    }
    files = [entry["file"] for entry in entries.values()]
    b1 = interleaved_p50(backend, files, 1, 1, args.processes)
    b64 = interleaved_p50(backend, files, 64, 1, max(3, args.processes // 2))
    for index, (name, entry) in enumerate(entries.items()):
        prune = entry["prune"]
        record["variants"][name] = {
            "file": str(entry["file"]),
            "onnx_top1": entry["onnx_top1"],
            "macs": entry["macs"],
            "params": entry["params"],
            **timing_record(b1, b64, index),
            "speedup_b1_vs_teacher": statistics.median(
                t / s for t, s in zip(b1[0], b1[index], strict=True)
            ),
            "latency_target": None if prune is None else _target_of(runs[name]),
            "pruned_top1": None if prune is None else prune["top1"],
            "pruned_macs_reduction": None if prune is None else prune["macs_reduction"],
            "prune_steps": None if prune is None else prune["steps"],
        }
    record["wall_s"] = time.perf_counter() - started
    print(table(record))
    write_json_atomic(Path(args.result), record)


def timing_record(b1: list, b64: list, index: int) -> dict:
    """File ``index``'s batch-1 and batch-64 p50 (median of its processes) and per process, from
    :func:`interleaved_p50` results."""
    return {
        "p50_ms_b1": statistics.median(b1[index]),
        "p50_ms_b1_processes": b1[index],
        "p50_ms_b64": statistics.median(b64[index]),
        "p50_ms_b64_processes": b64[index],
    }


def finished_reference(out: str):
    """``(recipe, artifacts, data)`` of the finished reference run under ``out``, loaded from
    its own resolved recipe (its stage keys include the data path as that run spelled it, so a
    differently spelled data path would retrain its teacher); exits with one line when it is
    missing or unfinished."""
    resolved = Path(out) / yaml.safe_load(RECIPE.read_text())["name"] / "recipe.yaml"
    if not resolved.is_file():
        raise SystemExit(f"{resolved}: run benchmarks/cifar10_reference.py first")
    recipe = load_recipe(resolved, out=out)
    pending = [stage for stage, done in plan(recipe).items() if not done]
    if pending:
        raise SystemExit(f"the reference run would re-run {', '.join(pending)}; finish it first")
    return recipe, run(recipe), load_dataset(recipe.data, seed=recipe.seed)


def training_images(data, count: int) -> list[torch.Tensor]:
    """The first ``count`` training images, normalised as the network takes them, in batches of
    256 (calibration and timing inputs)."""
    normalise = Preprocess(data.mean, data.std, augment=False)
    return [normalise(batch, train=False) for batch in data.train.images[:count].split(256)]


def run_variant(args, reference, suffix: str, edit) -> dict:
    """Run the reference recipe with its prune stage edited (``edit(prune)``) under the name
    ``<reference><suffix>``; the recipe is written once (a rerun keeps the measured target) and
    the folder starts with copies of the reference's teacher and distill stages (they skip)."""
    raw = yaml.safe_load((Path(args.out) / "cifar10_cpu" / "recipe.yaml").read_text())
    name = raw["name"] + suffix
    path = Path(args.out) / f"{name}.yaml"
    if not path.is_file():
        reference_dir = Path(reference["teacher"].files["model"]).parent.parent
        folder = Path(args.out) / name
        for stage in ("teacher", "distill"):
            if not (folder / stage).exists():
                shutil.copytree(reference_dir / stage, folder / stage)
        for stage in raw["stages"]:
            if isinstance(stage, dict) and "prune" in stage:
                edit(stage["prune"])
        raw["name"] = name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return run(load_recipe(path, out=args.out))


def latency_edit(args, speedup: float):
    """A prune-stage edit: the MACs target replaced by a measured speed-up target."""

    def edit(prune: dict) -> None:
        for key in ("speedup", "target_macs", "pruning_ratio"):
            prune.pop(key, None)
        prune["target"] = {"latency_speedup": round(speedup, 3), "batch_size": args.batch_size}

    return edit


def round_to_edit(args):
    """A prune-stage edit: channels kept in multiples of ``round_to``, at the reference's MACs
    target or ``--macs-speedup``."""

    def edit(prune: dict) -> None:
        prune["round_to"] = args.macs_round_to
        if args.macs_speedup:
            for key in ("target_macs", "pruning_ratio"):
                prune.pop(key, None)
            prune["speedup"] = args.macs_speedup

    return edit


def unpruned_int8(reference, data) -> Path:
    """The distilled student before pruning, exported INT8 (PTQ, calibrated on the first 2,048
    training images as the quantize stage does), kept in the reference run's folder for every
    later measurement: the latency a speed-up is measured against, and the accuracy a latency
    target keeps when it prunes nothing."""
    from compress.api import export, quantize

    path = Path(reference["distill"].files["model"]).parent / "unpruned_int8_ptq.onnx"
    if not path.is_file():
        model = load_student(reference["distill"])
        calibration = training_images(data, CALIBRATION_IMAGES)
        with tempfile.TemporaryDirectory() as folder:
            staged = Path(folder) / path.name
            export(
                quantize(model.eval(), calibration), staged, check_inputs=torch.zeros(1, 3, 32, 32)
            )
            shutil.move(staged, path)
    return path


def _entry(name: str, artifacts) -> dict:
    """A run's exported file (the teacher's, or the final student's) and its bench numbers."""
    row = BenchResult.read(artifacts["bench"].files["json"]).row(
        "teacher" if name == "teacher" else "student"
    )
    return {
        "file": artifacts["export"].files["teacher" if name == "teacher" else "student"],
        "onnx_top1": row.top1,
        "macs": row.macs,
        "params": row.params,
        "prune": artifacts["prune"].metrics if name != "teacher" else None,
    }


def _onnx_top1(path: Path, data) -> float:
    """Top-1 (%) of an ONNX file on the full test split, through ONNX Runtime."""
    from compress.benchmark.measure import predict_onnx

    images, labels = data.test.images.numpy(), data.test.targets.numpy()
    predicted = predict_onnx(path, images, mean=list(data.mean), std=list(data.std))
    return float(100.0 * (predicted == labels).mean())


def measured_speedup(args, unpruned: Path, pruned) -> float:
    """Median pairwise ratio: the unpruned INT8 student over a pruned run's INT8 student,
    interleaved processes."""
    times = interleaved_p50(
        BACKENDS.get("onnxruntime"),
        [unpruned, pruned["export"].files["student"]],
        args.batch_size,
        1,
        args.processes,
    )
    return statistics.median(a / b for a, b in zip(*times, strict=True))


def load_student(artifact):
    from compress.nets.models import build_model
    from compress.nets.weights import load_weights

    network = artifact.network
    model = build_model(
        network.model, num_classes=network.num_classes, cifar_stem=network.cifar_stem
    )
    return load_weights(model, artifact.files["model"])


def _target_of(artifacts) -> float | None:
    """The latency speed-up a run's prune stage aimed at (None for a MACs target)."""
    record = StageRecord.read(Path(artifacts["prune"].files["model"]).parent)
    return ((record.config or {}).get("target") or {}).get("latency_speedup")


def _target_text(variant: dict) -> str:
    if variant["prune_steps"] is None:
        return ""
    if variant.get("latency_target"):
        return f"{variant['latency_target']}x latency"
    return f"{variant['pruned_macs_reduction']:.2f}x MACs"


def machine_record() -> dict:
    machine = machine_info()
    return {
        "cpu": machine["cpu"],
        "cores": machine["cores"],
        "flags": list(machine["cpu_features"]["flags"]),
    }


def table(record: dict) -> str:
    lines = [
        f"latency target: {record['latency_speedup_target']}x over the unpruned INT8 student "
        "(what MACs pruning delivered, or --speedup; None: not run)",
        "",
        "| variant | target | INT8 ONNX top-1 (%) | MACs | params | b1 ms | b64 ms "
        "| b1 vs teacher |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in record["variants"].items():
        lines.append(
            f"| {name} | {_target_text(v)} | {v['onnx_top1']:.2f} | {v['macs']:,} "
            f"| {v['params']:,} | "
            f"{v['p50_ms_b1']:.3f} | {v['p50_ms_b64']:.3f} | {v['speedup_b1_vs_teacher']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
