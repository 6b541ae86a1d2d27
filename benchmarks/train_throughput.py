"""What our distill step costs over the least any distillation can cost: images/s side by side.

    python benchmarks/train_throughput.py [--device cuda] [--batches 20] [--batch-size 64]

* **ours**: :func:`compress.training.teaching.train_with_teacher`, what the distill stage runs (the
  shared ``fit`` loop: batch augmentation and normalisation on the device, the teacher forward
  under ``no_grad``, the registered ``kd`` loss, optimiser and schedule, running accuracy,
  progress accounting, one evaluation pass over a single test batch);
* **plain**: a hand-written PyTorch loop doing only what distillation cannot avoid: normalise,
  teacher forward under ``no_grad``, student forward, Hinton KD + CE written inline, backward,
  SGD step. Same networks, batches, optimiser, autocast dtype and memory format.

Both train a CIFAR-stem ResNet18 teacher -> MobileNetV2 student at 32x32 on real CIFAR-10
images (``../shared/data/cifar10`` or ``--data``), else on random images. Each side runs
``--repeats`` times, alternating, after one untimed warm-up of each; the table shows the
median images/s and our overhead (plain / ours - 1; the issue's target is <= 10%). Writes
``benchmarks/results/train_throughput.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info, versions
from compress.data.augment import Preprocess
from compress.data.spec import MixConfig
from compress.nets.models import build_model
from compress.training.loop import autocast_dtype, uses_channels_last
from compress.training.spec import LossConfig, TrainConfig
from compress.training.teaching import frozen, train_with_teacher

HERE = Path(__file__).resolve().parent
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
TEMPERATURE, ALPHA = 4.0, 0.9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=20, help="training batches per timed pass")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "cifar10"
    )
    parser.add_argument("--teacher", default="torchvision:resnet18")
    parser.add_argument("--student", default="torchvision:mobilenet_v2")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "train_throughput.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    images, labels, source = training_images(args.data, args.batches * args.batch_size)
    dataset = torch.utils.data.TensorDataset(images, labels)
    train_cfg = TrainConfig(
        epochs=1, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"
    )
    teacher = frozen(build_model(args.teacher, num_classes=10, cifar_stem=True).to(device))
    runs = {"ours": [], "plain": []}
    for repeat in range(args.repeats + 1):  # the first round warms up both and is not recorded
        for name, measure in (("ours", time_ours), ("plain", time_plain)):
            torch.manual_seed(repeat)
            student = build_model(args.student, num_classes=10, cifar_stem=True).to(device)
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=args.batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(0),
            )
            seconds = measure(student, teacher, loader, train_cfg, device)
            if repeat > 0:
                runs[name].append(len(dataset) / seconds)
    record = {
        "device": str(device),
        "data": source,
        "teacher": args.teacher,
        "student": args.student,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "images_per_s": runs,
        "median_images_per_s": {name: statistics.median(values) for name, values in runs.items()},
        "machine": machine_info(),
        "versions": versions(),
    }
    record["overhead"] = (
        record["median_images_per_s"]["plain"] / record["median_images_per_s"]["ours"] - 1
    )
    print(table(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, record)


def training_images(folder: Path, count: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    file = folder / "train.npz"
    if file.is_file():
        with np.load(file, allow_pickle=False) as data:
            x, y = data["x"][:count], data["y"][:count]
        return (
            torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
            torch.from_numpy(y.astype(np.int64)),
            str(file),
        )
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator),
        torch.randint(0, 10, (count,), generator=generator),
        "random",
    )


def time_ours(student, teacher, loader, cfg: TrainConfig, device: torch.device) -> float:
    prep = Preprocess(MEAN, STD, augment=True).to(device)
    one_test_batch = [next(iter(loader))[:2]]
    loss = (LossConfig(name="kd"),)  # kd's defaults: temperature 4, alpha 0.9, as in the plain loop
    synchronize(device)
    start = time.perf_counter()
    train_with_teacher(
        student,
        teacher,
        loss,
        cfg,
        MixConfig(),
        device=device,
        show_progress=False,
        desc="ours",
        prep=prep,
        loaders=(loader, one_test_batch),
    )
    synchronize(device)
    return time.perf_counter() - start


def time_plain(student, teacher, loader, cfg: TrainConfig, device: torch.device) -> float:
    prep = Preprocess(MEAN, STD, augment=True).to(device)
    dtype = autocast_dtype(cfg, device)
    memory_format = (
        torch.channels_last if uses_channels_last(cfg, device) else torch.contiguous_format
    )
    student.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(
        student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    synchronize(device)
    start = time.perf_counter()
    for images, labels in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            inputs = prep(images, train=True)
            with torch.no_grad():
                soft = F.softmax(teacher(inputs) / TEMPERATURE, dim=1)
            logits = student(inputs)
            kd = (
                F.kl_div(F.log_softmax(logits / TEMPERATURE, dim=1), soft, reduction="batchmean")
                * TEMPERATURE**2
            )
            loss = ALPHA * kd + (1 - ALPHA) * F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(record: dict) -> str:
    med = record["median_images_per_s"]
    lines = [
        f"Distill step, {record['teacher']} -> {record['student']}, batch {record['batch_size']} x "
        f"{record['batches']}, {record['device']} ({record['data']})",
        "",
        "| loop | images/s (median) | runs |",
        "|---|---:|---|",
        f"| plain PyTorch (student + teacher forward) | {med['plain']:.1f} | "
        f"{', '.join(f'{v:.1f}' for v in record['images_per_s']['plain'])} |",
        f"| compress (train_with_teacher) | {med['ours']:.1f} | "
        f"{', '.join(f'{v:.1f}' for v in record['images_per_s']['ours'])} |",
        "",
        f"Our overhead: {100 * record['overhead']:+.1f}% (target <= 10%)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
