"""Which distillation method gives the best student at an equal budget?

One teacher is trained by the pipeline; then the same student architecture is trained with
every method (same data, epochs, optimiser, seeds): a CE-only baseline, kd, logit_mse, hybrid,
fitnet, at, dkd and kd+mixup. Prints a table (mean and spread of test top-1 over the seeds) and
writes ``benchmarks/results/distill_methods.json``.

    python benchmarks/distill_methods.py --data ../shared/data/cifar10            # CPU budget
    python benchmarks/distill_methods.py --data ../shared/data/cifar10 --full     # a GPU job

Target (issue 3): the best method beats CE-only by >= 1.0 top-1 point.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import yaml

from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions
from compress.pipeline.recipe.load import load_recipe
from compress.pipeline.runner import run

HERE = Path(__file__).resolve().parent

KD = {"name": "kd", "temperature": 4.0, "alpha": 0.9}
METHODS = {
    "ce": {"loss": ["ce"]},
    "kd": {"loss": [KD]},
    "logit_mse": {"loss": ["logit_mse", "ce"]},
    "hybrid": {"loss": [{"name": "hybrid", "alpha": 0.5}, "ce"]},
    "fitnet": {
        "loss": [
            KD,
            {
                "name": "fitnet",
                "weight": 10.0,
                "pairs": [{"teacher": "layer2", "student": "layer2"}],
            },
        ]
    },
    "at": {
        "loss": [
            KD,
            {
                "name": "at",
                "pairs": [
                    {"teacher": "layer2", "student": "layer2"},
                    {"teacher": "layer3", "student": "layer3"},
                ],
            },
        ]
    },
    "dkd": {"loss": [{"name": "dkd", "warmup_epochs": 2}]},
    "kd+mixup": {"loss": [KD], "augment": {"mixup_alpha": 0.2}},
}
BUDGETS = {  # CPU: minutes on 2 cores; full: the GPU job
    "cpu": {
        "image_size": 16,
        "subset": {"train": 5000, "test": 2000},
        "teacher_epochs": 10,
        "epochs": 6,
    },
    "full": {
        "image_size": 32,
        "subset": {"train": None, "test": None},
        "teacher_epochs": 60,
        "epochs": 60,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", required=True, help="CIFAR-10 folder (cifar-10-batches-py or train/test.npz)"
    )
    parser.add_argument(
        "--full", action="store_true", help="full CIFAR-10 at 32x32, 60 epochs (GPU)"
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--teacher", default="cifar:resnet56")
    parser.add_argument("--student", default="cifar:resnet20")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=str(HERE.parent / "exported" / "distill_methods"))
    args = parser.parse_args()

    budget = BUDGETS["full" if args.full else "cpu"]
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    teacher = train_teacher(args, budget, work)
    results = {}
    for method in args.methods.split(","):
        results[method] = [
            distill_once(args, budget, work, teacher, method, seed) for seed in range(args.seeds)
        ]
        print(f"{method}: {results[method]}", flush=True)
    summary = summarise(results, teacher, args, budget, time.perf_counter() - started)
    print(table(summary))
    write_json_atomic(HERE / "results" / "distill_methods.json", summary)


def base_recipe(args, budget, name: str, seed: int) -> dict:
    return {
        "name": name,
        "seed": seed,
        "data": {
            "kind": "cifar10",
            "path": args.data,
            "image_size": budget["image_size"],
            "batch_size": 128,
            "subset": budget["subset"],
        },
        "teacher": {"model": args.teacher, "train": train_settings(budget["teacher_epochs"])},
        "student": {"model": args.student},
    }


def train_settings(epochs: int) -> dict:
    # AdamW: on the short CPU budget SGD at lr 0.1 left a ResNet56 teacher at ~25% after 10 epochs.
    return {
        "epochs": epochs,
        "optimizer": "adamw",
        "lr": 0.003,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup_epochs": 1,
    }


def train_teacher(args, budget, work: Path) -> dict:
    raw = base_recipe(args, budget, "teacher", 0) | {"stages": ["teacher"]}
    artifact = run_raw(raw, work)["teacher"]
    return {
        "checkpoint": str(artifact.files["model"]),
        "top1": artifact.metrics["top1"],
        "seconds": artifact.seconds,
    }


def distill_once(args, budget, work: Path, teacher: dict, method: str, seed: int) -> float:
    raw = base_recipe(args, budget, f"{method.replace('+', '_')}-seed{seed}", seed)
    raw["teacher"]["checkpoint"] = teacher["checkpoint"]
    raw["stages"] = [
        "teacher",
        {"distill": METHODS[method] | {"train": train_settings(budget["epochs"])}},
    ]
    return run_raw(raw, work)["distill"].metrics["top1"]


def run_raw(raw: dict, work: Path):
    path = work / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return run(load_recipe(path, out=str(work)))


def summarise(results: dict, teacher: dict, args, budget, wall_s: float) -> dict:
    rows = {
        method: {
            "top1": values,
            "mean": statistics.mean(values),
            "spread": (max(values) - min(values)) / 2,
        }
        for method, values in results.items()
    }
    baseline = rows.get("ce", {}).get("mean")
    for row in rows.values():
        row["vs_ce"] = None if baseline is None else row["mean"] - baseline
    return {
        "teacher_model": args.teacher,
        "student_model": args.student,
        "teacher_top1": teacher["top1"],
        "budget": budget,
        "seeds": args.seeds,
        "methods": rows,
        "wall_s": round(wall_s, 1),
        "machine": machine_info(),
        "versions": versions(),
    }


def table(summary: dict) -> str:
    lines = [
        "| method | top-1 mean (%) | ± half-range | vs CE-only (pts) |",
        "|---|---:|---:|---:|",
    ]
    for method, row in summary["methods"].items():
        delta = "—" if row["vs_ce"] is None else f"{row['vs_ce']:+.2f}"
        lines.append(f"| {method} | {row['mean']:.2f} | {row['spread']:.2f} | {delta} |")
    lines.append(
        f"\nteacher {summary['teacher_model']}: {summary['teacher_top1']:.2f}%; student "
        f"{summary['student_model']}; wall {summary['wall_s']:.0f} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
