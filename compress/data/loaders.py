"""Batches: the training and test ``DataLoader``s (seeded, distributed-aware) and the test split
as arrays for the bench."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from compress import distributed
from compress.config import DataConfig
from compress.data.common import _take
from compress.data.containers import DatasetBundle


def make_loaders(
    bundle: DatasetBundle, cfg: DataConfig, seed: int, *, pin_memory: bool = False
) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders yielding ``(uint8 NCHW, int64 labels)`` batches.

    In a distributed run (:mod:`compress.distributed`) the train loader gives this rank its
    share: a ``DistributedSampler`` (shuffled with ``seed``, reshuffled by ``set_epoch``; the
    split is padded to a multiple of the ranks, nothing is dropped) and ``cfg.batch_size``
    divided by the number of ranks, so one step of all ranks together sees a global batch of
    ``cfg.batch_size`` images. Every rank's test loader holds the whole test split.

    Args:
        bundle: From :func:`load_dataset`.
        cfg: Supplies ``batch_size`` (the global batch), ``eval_batch_size`` and ``workers``.
        seed: Seeds the train shuffle (its own ``torch.Generator``), so two runs with the same
            seed see the same batches in the same order.
        pin_memory: Page-locked batches, for asynchronous copies to a CUDA device.

    Returns:
        ``(train_loader, test_loader)``; train is shuffled and keeps its last partial batch,
        test is in dataset order.

    Raises:
        RecipeError: the batch does not split evenly over the ranks.
    """
    generator = torch.Generator().manual_seed(seed)
    common = {
        "num_workers": cfg.workers,
        "persistent_workers": cfg.workers > 0,
        "pin_memory": pin_memory,
    }
    if distributed.active():
        sampler = DistributedSampler(
            bundle.train,
            num_replicas=distributed.world_size(),
            rank=distributed.rank(),
            shuffle=True,
            seed=seed,
            drop_last=False,
        )
        batch_size = distributed.per_process_batch(cfg.batch_size)
        train = DataLoader(
            bundle.train,
            batch_size=batch_size,
            sampler=sampler,
            generator=generator,
            drop_last=False,
            **common,
        )
    else:
        train = DataLoader(
            bundle.train,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=generator,
            drop_last=False,
            **common,
        )
    test = DataLoader(bundle.test, batch_size=cfg.eval_batch_size, shuffle=False, **common)
    return train, test


def test_arrays(bundle: DatasetBundle, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The test split as numpy arrays, to check and benchmark exported (ONNX) models.

    Args:
        bundle: From :func:`load_dataset`.
        limit: Keep only the first ``limit`` items; None keeps all.

    Returns:
        ``(images, labels)``: uint8 NCHW and int64, unnormalised (apply mean/std yourself).
    """
    count = len(bundle.test) if limit is None else min(limit, len(bundle.test))
    images, labels = _take(bundle.test, range(count))
    return images.numpy(), labels.numpy()


test_arrays.__test__ = (
    False  # its name starts with "test": keep pytest from collecting it where imported
)
