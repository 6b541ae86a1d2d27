"""Does QAT beat the best PTQ network on the architecture-coverage networks? (issue 27, item 2)

    python benchmarks/qat_vs_ptq.py                                  # the default networks
    python benchmarks/qat_vs_ptq.py --only torchvision:resnet18      # one

For each network, in a child process of its own (as ``architecture_coverage.py`` runs them, with
its data and training helpers): trained with cross-entropy on scikit-learn's digits at the
coverage benchmark's image size (1,200 training images; 300 more held out; 297 test images),
then what the quantize stage does with ``calibration: auto``:

1. ``compress.quantize`` with held-out images: each calibration method, with and without bias
   correction, ranked on the held-out images (top-1, agreement with the float network, KL);
2. QAT from the best of them: its ranges frozen, BatchNorm folded, the quantize stage's default
   training (``QuantizeConfig().train``: one epoch, AdamW at 3e-5, cosine; ``--qat-optimizer``,
   ``--qat-lr`` and ``--qat-epochs`` change it), taught by the float network itself (KD);
3. the verdict: QAT >= PTQ when its held-out rank is at least the best PTQ's (the stage ships
   PTQ otherwise), with each network's test top-1 and agreement beside it.

Prints a table and writes ``benchmarks/results/qat_vs_ptq.json``. No timing: any machine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from architecture_coverage import digits, fit, fitting_size, top1  # noqa: E402

RESULT = HERE / "results" / "qat_vs_ptq.json"
MODELS = (
    "torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:mobilenet_v3_large",
    "torchvision:efficientnet_b0", "torchvision:regnet_y_400mf", "torchvision:shufflenet_v2_x1_0",
    "timm:ghostnet_100", "timm:mobileone_s0",
)  # fmt: skip
HELD_OUT_BATCHES = 9  # the last 9 training batches of 32 (288 images) decide, never train


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", help="networks (torchvision:NAME, timm:NAME)")
    parser.add_argument("--steps", type=int, default=200, help="training batches (default 200)")
    parser.add_argument("--qat-epochs", type=int, help="default: the quantize stage's")
    parser.add_argument("--qat-lr", type=float, help="default: the quantize stage's")
    parser.add_argument("--qat-optimizer", help="default: the quantize stage's")
    parser.add_argument("--timeout", type=float, default=2400.0, help="seconds per network")
    parser.add_argument("--report", action="store_true", help="only the table of the JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        print(markdown_table(json.loads(RESULT.read_text())["rows"]))
        return
    if args.child:
        print(json.dumps(run_network(args.child, args)), flush=True)
        return
    print(f"QAT: {qat_settings(args)}", flush=True)
    rows = []
    for name in args.only or MODELS:
        started = time.perf_counter()
        row = run_child(name, args)
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(summary(row), flush=True)
    write_result(rows, args)
    print(markdown_table(rows))


def run_child(name: str, args) -> dict:
    command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps)]
    for flag in ("qat_epochs", "qat_lr", "qat_optimizer"):
        if getattr(args, flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"timed out after {args.timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "error": tail}
    return json.loads(lines[-1])


def run_network(name: str, args) -> dict:
    import torch

    import compress
    from compress import api
    from compress.nets.models import build_model
    from compress.quantization.fake_quant import clone

    torch.manual_seed(0)
    size, model = fitting_size(name, build_model)
    train, test = digits(size)
    train, held = train[:-HELD_OUT_BATCHES], train[-HELD_OUT_BATCHES:]
    fit(compress, model, train, args.steps, [compress.loss("ce")], lr=1e-3)
    model.eval()
    calibration = [images for images, _ in train[:8]]  # 256 images, as the stage's default
    ptq = compress.quantize(model, calibration, calibration="auto", holdout=held)
    candidates = ptq.calibration_candidates
    qat = clone(ptq)
    teacher = copy.deepcopy(model).eval()
    compress.distill(
        qat.train(),
        teacher,
        train,
        losses=[compress.loss("kd", temperature=4, alpha=0.9)],
        recalibrate_batchnorm=False,  # folded into the convolutions
        **qat_settings(args),
    )
    qat.eval()
    qat_scores = api.holdout_scores(qat, model, held)
    best = candidates[0]
    best_rank = api.holdout_rank(
        best["holdout_top1"], best["holdout_agreement"], best["holdout_kl"]
    )
    return {
        "model": name,
        "image_size": size,
        "float": {"holdout_top1": top1(model, held), "test_top1": top1(model, test)},
        "ptq": [
            {
                key: c[key]
                for key in (
                    "method",
                    "bias_corrected",
                    "holdout_top1",
                    "holdout_agreement",
                    "holdout_kl",
                )
            }  # fmt: skip
            for c in candidates
        ],
        "best_ptq": {
            "name": f"{best['method']}{'+bias' if best['bias_corrected'] else ''}",
            "test_top1": top1(ptq, test),
            "test_agreement": agreement(ptq, model, test),
        },
        "qat": {
            "holdout_top1": qat_scores[0],
            "holdout_agreement": qat_scores[1],
            "holdout_kl": qat_scores[2],
            "test_top1": top1(qat, test),
            "test_agreement": agreement(qat, model, test),
        },
        "qat_at_least_ptq": api.holdout_rank(*qat_scores) >= best_rank,
        "error": None,
    }


def qat_settings(args) -> dict:
    """The quantize stage's default QAT training, with what the flags change."""
    from compress.pipeline.config import QuantizeConfig

    settings = dataclasses.asdict(QuantizeConfig().train)
    for key, flag in (("epochs", "qat_epochs"), ("lr", "qat_lr"), ("optimizer", "qat_optimizer")):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    return settings


def agreement(network, reference, data) -> float:
    import torch

    same = total = 0
    with torch.no_grad():
        for images, _ in data:
            same += int((network(images).argmax(1) == reference(images).argmax(1)).sum())
            total += len(images)
    return round(same / max(total, 1), 4)


def summary(row: dict) -> str:
    if row.get("error"):
        return f"{row['model']}: error: {row['error']}"
    best, qat = row["best_ptq"], row["qat"]
    return (
        f"{row['model']} {row['image_size']}px: best PTQ {best['name']} held-out "
        f"{row['ptq'][0]['holdout_top1']:.2f}, QAT {qat['holdout_top1']:.2f} -> "
        f"{'QAT >= PTQ' if row['qat_at_least_ptq'] else 'PTQ ships'} ({row['seconds']} s)"
    )


def write_result(rows: list[dict], args) -> None:
    from compress.core.fileio import write_json_atomic
    from compress.core.machine import machine_info, versions

    record = {"machine": machine_info() | {"versions": versions()}, "qat": qat_settings(args)}
    write_json_atomic(RESULT, record | {"rows": rows})


def markdown_table(rows: list[dict]) -> str:
    """One line per network: float, best PTQ and QAT on the held-out images (top-1, then agreement
    with the float network) and the test split, QAT's held-out top-1 against the best PTQ's, and
    what the stage's rule would ship."""
    lines = [
        "| network | float held-out / test | best PTQ: held-out / agreement / test | QAT: "
        "held-out / agreement / test | QAT - PTQ, held-out top-1 | ships |",
        "|---|---:|---|---|---:|---|",
    ]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['model']} | error: {row['error']} | | | | |")
            continue
        f, best, qat, ptq = row["float"], row["best_ptq"], row["qat"], row["ptq"][0]
        gain = qat["holdout_top1"] - ptq["holdout_top1"]
        lines.append(
            f"| {row['model']} ({row['image_size']} px) | {f['holdout_top1']:.2f} / "
            f"{f['test_top1']:.2f} | {best['name']}: {ptq['holdout_top1']:.2f} / "
            f"{100 * ptq['holdout_agreement']:.1f}% / {best['test_top1']:.2f} | "
            f"{qat['holdout_top1']:.2f} / {100 * qat['holdout_agreement']:.1f}% / "
            f"{qat['test_top1']:.2f} | {gain:+.2f} | "
            f"{'QAT' if row['qat_at_least_ptq'] else 'PTQ'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
