"""Batches: the training and test ``DataLoader``s (seeded, distributed-aware), the test split
as arrays for the bench, and a held-out slice of the training split."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from compress.core import distributed
from compress.data.common import _take, balanced_subset
from compress.data.containers import DatasetBundle, _targets
from compress.data.spec import UNLABELED, DataConfig
from compress.errors import DataError


def make_loaders(
    bundle: DatasetBundle, cfg: DataConfig, seed: int, *, pin_memory: bool = False
) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders yielding ``(uint8 NCHW, int64 labels)`` batches.

    In a distributed run (:mod:`compress.core.distributed`) the train loader gives this rank its
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
    test = DataLoader(
        bundle.test,
        batch_size=cfg.eval_batch_size,
        shuffle=False,
        # its own generator: without one, every pass draws its workers' seed from torch's global
        # generator, so evaluating would change the augmentation of the training that follows
        generator=torch.Generator().manual_seed(seed),
        **common,
    )
    return train, test


def test_arrays(bundle: DatasetBundle, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The test split as numpy arrays, to check and benchmark exported (ONNX) models.

    Args:
        bundle: From :func:`load_dataset`.
        limit: Keep only the first ``limit`` items; None keeps all.

    Returns:
        ``(images, labels)``: uint8 NCHW and int64, unnormalised (apply mean/std yourself).
    """
    return split_arrays(bundle.test, limit)


def split_arrays(split: Dataset, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` items of a split (all with None) as ``(uint8 NCHW, int64)`` arrays."""
    count = len(split) if limit is None else min(limit, len(split))
    images, labels = _take(split, range(count))
    return images.numpy(), labels.numpy()


# its name starts with "test": keep pytest from collecting it where imported
test_arrays.__test__ = False


# the held-out images split_holdout sets aside unless told: a fifth of the labeled training
# images, at most this many
HOLDOUT_IMAGES = 2000


def split_holdout(
    bundle: DatasetBundle, size: int | None, seed: int
) -> tuple[DatasetBundle, tuple[torch.Tensor, torch.Tensor]]:
    """Set ``size`` labeled training images aside, for decisions that must not be taken on the
    test split (the quantize stage's accuracy budget) nor on images the network trained on.

    The selection is :func:`balanced_subset`'s (seeded, class-balanced) among the labeled
    images of the train split; the unlabeled pool stays in training.

    Args:
        bundle: From :func:`load_dataset`.
        size: Images to set aside; None: a fifth of the labeled training images, at most
            :data:`HOLDOUT_IMAGES`.
        seed: Seeds the selection: the same seed sets the same images aside.

    Returns:
        ``(bundle without them, (uint8 NCHW images, int64 labels))``; the bundle's train split
        keeps every other image in its order.

    Raises:
        DataError: ``size`` leaves no labeled training image.
    """
    labels = torch.as_tensor(_targets(bundle.train), dtype=torch.int64)
    labeled = torch.nonzero(labels != UNLABELED).flatten()
    if size is None:
        size = max(1, min(HOLDOUT_IMAGES, len(labeled) // 5))
    if size >= len(labeled):
        raise DataError(
            f"holdout_images: {size} would leave no training image (the train split has "
            f"{len(labeled)} labeled images)"
        )
    chosen = balanced_subset(Subset(bundle.train, labeled.tolist()), size, seed)
    held = labeled[torch.as_tensor(chosen.indices, dtype=torch.int64)]
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    rest = Subset(bundle.train, torch.nonzero(keep).flatten().tolist())
    return dataclasses.replace(bundle, train=rest), _take(bundle.train, held.tolist())
