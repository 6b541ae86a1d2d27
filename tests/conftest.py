"""Shared fixtures: where the real data lies, and small recipes that run in seconds."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cifar10_folder() -> Path | None:
    """../shared/data/cifar10 next to the checkout (or $COMPRESS_CIFAR10), if present."""
    folder = Path(os.environ.get("COMPRESS_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10"))
    return folder if (folder / "train.npz").is_file() else None


@pytest.fixture(scope="session")
def tiny_data_section() -> str:
    """A few hundred real images: CIFAR-10 when the shared copy exists, else bundled digits."""
    folder = cifar10_folder()
    if folder is None:
        return "data: {kind: digits, image_size: 16, batch_size: 64, augment: false}"
    return f"data: {{kind: cifar10, path: '{folder}', image_size: 16, batch_size: 64, subset: {{train: 1000, test: 300}}}}"
