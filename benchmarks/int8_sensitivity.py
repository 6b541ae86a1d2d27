"""Where an INT8 network's own noise comes from: for each activation quantizer of the
fake-quantized network, in the order the forward reaches them, the share of its codes that change
when the inputs change by float32's own precision.

    python benchmarks/int8_sensitivity.py torchvision:mnasnet1_0        # as the coverage sweep
    python benchmarks/int8_sensitivity.py torchvision:resnet18 --eps 1e-6

The network is trained, pruned and quantized exactly as ``architecture_coverage.py`` does (same
seed, data and steps), then run twice on the test images: as they are, and times
(1 + eps * standard normal noise). A code that changes is a rounding boundary crossed; where the
share of changed codes jumps from one quantizer to the next, that layer amplifies what it is
given. The export check calls a network that moves by itself on most images one proven only to
its own noise (``"proof": "reference noise"``): this says why a network is such a one.
Prints a table; writes ``benchmarks/results/int8_sensitivity_<model>.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import architecture_coverage as sweep  # noqa: E402  (the sweep's training, data and steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="torchvision:NAME or timm:NAME, as the coverage sweep")
    parser.add_argument("--eps", type=float, default=1e-6, help="relative input change")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    import torch

    import compress
    from compress.core.fileio import write_json_atomic
    from compress.core.machine import machine_info
    from compress.nets.models import build_model, count_params_macs
    from compress.quantization.fake_quant import ActQuant

    torch.manual_seed(0)
    size, model = sweep.fitting_size(args.model, build_model)
    _, macs = count_params_macs(model, size)
    train, test = sweep.digits(size)
    steps = sweep.training_steps(macs, args.steps, sweep.TRAIN_GMACS)
    ce = [compress.loss("ce")]
    sweep.train_well(compress, model, train, test, steps, ce, lr=1e-3)
    teacher = copy.deepcopy(model).eval()
    kd = [compress.loss("kd", temperature=4, alpha=0.9)]
    sweep.fit(compress, model, train, min(20, steps), kd, teacher=teacher, lr=2e-4)
    calibration = [images for images, _ in sweep.batches(train, 4)]
    compress.prune(
        model, test[0][0][:2], compress.PruneSpec(speedup=1.5), calibration_data=calibration
    )
    sweep.train_well(compress, model, train, test, min(60, steps), ce, lr=5e-4)
    top1_float = sweep.top1(model, test)
    qmodel = compress.quantize(model, calibration).eval()

    images = torch.cat([batch for batch, _ in test])[:297]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    outputs: dict[str, list[torch.Tensor]] = {}
    order: list[str] = []

    def record(name):
        def hook(_module, _inputs, output):
            if name not in outputs:
                order.append(name)
            outputs.setdefault(name, []).append(output.detach())

        return hook

    quantizers = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, ActQuant)]
    handles = [m.register_forward_hook(record(n)) for n, m in quantizers]
    with torch.no_grad():
        logits = [qmodel(images), qmodel(images * (1 + args.eps * noise))]
    for handle in handles:
        handle.remove()

    scales = dict(quantizers)
    rows = []
    for name in order:
        calls = outputs[name]  # the clean run's calls, then the moved run's (a shared quantizer
        half = len(calls) // 2  # is called more than once per forward)
        clean = torch.cat([out.flatten(1) for out in calls[:half]], 1)
        moved = torch.cat([out.flatten(1) for out in calls[half:]], 1)
        changed = (clean != moved).float()
        per_image = changed.mean(1)
        codes = ((moved - clean).abs() / scales[name].scale).round()
        rows.append(
            {
                "quantizer": name,
                "changed_codes": float(changed.mean()),
                "images_touched": float((per_image > 0).float().mean()),
                "largest_code_step": int(codes.max()),
                "scale": float(scales[name].scale),
            }
        )
    diff = (logits[0] - logits[1]).abs().amax(1)
    flips = (logits[0].argmax(1) != logits[1].argmax(1)).float().mean()
    result = {
        "machine": machine_info(),
        "model": args.model,
        "image_size": size,
        "eps": args.eps,
        "top1_float": top1_float,
        "images": len(images),
        "images_moved": float((diff > 0).float().mean()),
        "top1_flips": float(flips),
        "logit_change_p50": float(diff.median()),
        "logit_change_max": float(diff.max()),
        "largest_logit": float(logits[0].abs().max()),
        "quantizers": rows,
    }
    print(f"{args.model} at {size} px, inputs x (1 + {args.eps:g} noise), {len(images)} images:")
    print(
        f"  images moved {result['images_moved']:.1%}, top-1 flips {result['top1_flips']:.1%}, "
        f"logit change p50 {result['logit_change_p50']:.3g} max {result['logit_change_max']:.3g}"
        f" (largest logit {result['largest_logit']:.3g})"
    )
    print("| # | quantizer | codes changed | images touched | largest step | scale |")
    print("|---|---|---|---|---|---|")
    for index, row in enumerate(rows):
        print(
            f"| {index} | {row['quantizer']} | {row['changed_codes']:.2e} | "
            f"{row['images_touched']:.0%} | {row['largest_code_step']} | {row['scale']:.3g} |"
        )
    stem = args.model.replace(":", "_")
    path = write_json_atomic(HERE / "results" / f"int8_sensitivity_{stem}.json", result)
    print(f"written {path}")


if __name__ == "__main__":
    main()
