"""scikit-learn's 8x8 digits: the zero-setup quickstart's data, split with a fixed seed."""

from __future__ import annotations

import numpy as np
import torch

from compress.data.common import _in_memory_bundle
from compress.data.containers import DatasetBundle
from compress.data.spec import DataConfig

DIGITS_SPLIT_SEED = 0  # the digits test split never changes with the recipe seed


def load_digits(cfg: DataConfig) -> DatasetBundle:
    """scikit-learn's bundled 8x8 digits (1,797 images): a dataset that needs no download.

    Pixels 0..16 are scaled to 0..255, upsampled bilinearly to ``image_size`` and replicated to
    3 channels so ImageNet-shaped models take them. The 80/20 split is stratified with a fixed
    seed: the test images never change.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    pixels = torch.from_numpy(np.rint(digits.images * (255 / 16)).astype(np.uint8))
    images = pixels.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=0.2,
        stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    classes = [str(k) for k in range(10)]
    return _in_memory_bundle(
        (images[train_idx], labels[train_idx]),
        (images[test_idx], labels[test_idx]),
        classes,
        cfg.image_size,
    )
