"""``benchmarks/pack_cifar10.py``: what carries CIFAR-10 to the GPU machine must give back the
exact images and labels (a lossy copy would make the GPU numbers incomparable)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pack_cifar10.py"


def pack_module():
    spec = importlib.util.spec_from_file_location("pack_cifar10", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pack_then_unpack_gives_back_the_exact_images_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "cifar10"
    source.mkdir()
    splits = {}
    for split, count in (("train", 40), ("test", 20)):
        images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        images[0] = 255  # deltas wrap around mod 256 at both ends
        images[1, :, ::2] = 0
        labels = rng.integers(0, 10, count)
        np.savez_compressed(source / f"{split}.npz", x=images, y=labels)
        splits[split] = images, labels
    tool = pack_module()
    tool.pack(source, tmp_path / "packed", train_images=25)
    tool.unpack(tmp_path / "packed", tmp_path / "unpacked")
    train = np.load(tmp_path / "unpacked" / "train.npz")
    test = np.load(tmp_path / "unpacked" / "test.npz")
    assert np.array_equal(train["x"], splits["train"][0][:25])
    assert np.array_equal(train["y"], splits["train"][1][:25])
    assert np.array_equal(test["x"], splits["test"][0]) and np.array_equal(
        test["y"], splits["test"][1]
    )
