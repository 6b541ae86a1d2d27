"""What the readers share: seeded class-balanced subsets, resizing, channel statistics, label
and folder checks, and the in-memory bundle they all build."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from compress.core.compat import torchvision
from compress.data.containers import DatasetBundle, TensorImageDataset, _targets
from compress.data.spec import DataConfig
from compress.errors import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


TEST_SUBSET_SEED = 0  # neither does a test subset: accuracies stay comparable across seeds


_RESIZE_CHUNK = 1024  # images resized at once: bounds the float copy's memory


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # files an unlabeled folder offers


def balanced_subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A seeded, class-balanced selection of ``size`` items (the whole split if it is smaller).

    Classes are drawn round-robin from a seeded shuffle, so counts differ by at most one
    between classes that have enough items, and which classes get the remainder is random.

    Args:
        dataset: A dataset with a ``targets`` attribute (labels).
        size: Number of items; None keeps the whole split.
        seed: Seeds the selection.

    Returns:
        ``dataset`` itself, or a ``torch.utils.data.Subset`` of it in dataset order.
    """
    if size is None or size >= len(dataset):
        return dataset
    # Class ids 0..K-1 in label order, so UNLABELED (-1) is just one more group.
    labels = torch.unique(
        torch.as_tensor(_targets(dataset), dtype=torch.int64), return_inverse=True
    )[1]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    shuffled = labels[order]
    by_class = torch.sort(shuffled, stable=True).indices
    counts = torch.bincount(shuffled)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(shuffled)
    rank[by_class] = torch.arange(len(shuffled)) - starts[shuffled[by_class]]
    round_robin = torch.argsort(rank * len(shuffled) + torch.arange(len(shuffled)))
    chosen = torch.sort(order[round_robin[:size]]).values
    return Subset(dataset, chosen.tolist())


def _take(dataset: Dataset, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Items ``indices`` as (uint8 NCHW, int64) tensors; a single gather for in-memory splits."""
    if isinstance(dataset, Subset):
        return _take(dataset.dataset, [dataset.indices[i] for i in indices])
    if isinstance(dataset, TensorImageDataset):
        index = torch.as_tensor(list(indices), dtype=torch.int64)
        return dataset.images[index], dataset.targets[index]
    items = [dataset[i] for i in indices]
    if not items:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return torch.stack([x for x, _ in items]), torch.tensor(
        [y for _, y in items], dtype=torch.int64
    )


def _seeded_selection(count: int, limit: int | None, seed: int) -> Tensor:
    """Sorted indices of a seeded random ``limit`` of ``count`` items (all when None or more)."""
    if limit is None or limit >= count:
        return torch.arange(count)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return torch.sort(order[:limit]).values


def _check_not_empty(bundle: DatasetBundle, cfg: DataConfig) -> None:
    for split in ("train", "test"):
        if len(getattr(bundle, split)) == 0:
            raise DataError(f"{cfg.kind} dataset at {cfg.path}: the {split} split is empty")


def _existing_dir(path: str | Path | None, kind: str) -> Path:
    if path is None:
        raise DataError(f"dataset kind {kind!r} needs a path")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"dataset path {folder} does not exist or is not a folder ({kind} data expected there)"
        )
    return folder


def _resize(images: Tensor, size: int) -> Tensor:
    """Bilinear (antialiased when shrinking) resize of a uint8 NCHW tensor, in chunks."""
    if images.shape[-2:] == (size, size):
        return images
    if len(images) == 0:  # not interpolated: that costs time in the declared (any) image size
        return images.new_empty((0, images.shape[1], size, size))
    chunks = [
        F.interpolate(
            chunk.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        for chunk in images.split(_RESIZE_CHUNK)
    ]
    return torch.cat(chunks)


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of uint8 NCHW images from 256-bin histograms (no float copy)."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        total = hist.sum()
        mean = (hist * values).sum() / total
        var = (hist * values.square()).sum() / total - mean.square()
        means.append(round(mean.item(), 6))
        stds.append(round(var.clamp_min(0).sqrt().item(), 6))
    return tuple(means), tuple(stds)


def _check_labels(labels: Tensor, num_classes: int, where: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{where}: labels must be in 0..{num_classes - 1}, found "
            f"{labels.min().item()}..{labels.max().item()}"
        )


def _in_memory_bundle(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    classes: Sequence[str],
    image_size: int,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> DatasetBundle:
    """Resize both splits once and wrap them; ``stats`` None computes mean/std from train."""
    train_x, test_x = _resize(train[0], image_size), _resize(test[0], image_size)
    mean, std = stats if stats is not None else _channel_stats(train_x)
    return DatasetBundle(
        train=TensorImageDataset(train_x, train[1]),
        test=TensorImageDataset(test_x, test[1]),
        num_classes=len(classes),
        classes=tuple(classes),
        mean=mean,
        std=std,
        image_size=image_size,
        in_channels=train_x.shape[1],
    )


def _is_image_file(path: str | Path) -> bool:
    """An image extension and not hidden (``.DS_Store``, macOS's ``._photo.jpg`` metadata)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(
        torchvision.datasets.folder.IMG_EXTENSIONS
    )


def refuse_directory_links(folder: Path) -> None:
    """Raise DataError at the first directory link below ``folder``.

    A link inside an image tree either loops (``a/loop -> ..``: the walk would count the tree
    again, labelling another class's images as this one) or silently adds or skips a tree
    elsewhere, depending on whether the walker follows it. Neither is what a user meant to
    train on, so the tree must be plain folders (links to files are fine).
    """
    for root, dirs, _ in os.walk(folder, followlinks=False):
        for name in sorted(dirs):
            link = os.path.join(root, name)
            if os.path.islink(link):
                raise DataError(
                    f"{link}: a directory link (to {os.readlink(link)}) inside an image folder; "
                    "links in the tree are not followed (they can loop or relabel images): "
                    "copy or move the folder there instead"
                )


def _image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), sorted so selections are reproducible."""
    refuse_directory_links(folder)
    files = sorted(
        str(p)
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if not files:
        raise DataError(
            f"unlabeled folder {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found in it "
            "or below"
        )
    return files
