"""Datasets and loaders: bundled digits, CIFAR-10/100, npz folders and ImageFolder trees.

Every dataset yields ``(uint8 CxHxW tensor, int label)`` at the recipe's ``image_size``; loaders
yield uint8 NCHW batches. Augmentation and normalisation happen later, on a whole batch on its
device, in :class:`Preprocess`: decoding stays cheap and the same on every backend, and the
exported model receives exactly the normalised tensors it was trained on.

``data.unlabeled`` appends extra images to the train split with label ``UNLABELED`` (-1): only
the teacher-driven loss terms learn from them (:func:`load_unlabeled`).

Image files (``imagefolder`` and unlabeled folders) are checked before anything trains: files
whose names are hidden (``.DS_Store``, macOS ``._photo.jpg``) or lack an image extension are not
part of the dataset, hidden folders (``.ipynb_checkpoints/``) are not classes, and every image file
a split uses must open as an image (its header is read, nothing is decoded); otherwise one
:class:`DataError` names the first bad file and how many there are. A file that is damaged
further in (a truncated JPEG) can only be found by decoding it: it raises a one-line
:class:`DataError` naming it when it is first read, in a worker process too. Bad files are
never skipped silently: remove or fix them.

Example:
    >>> bundle = load_dataset(DataConfig(kind="digits"))
    >>> train_loader, test_loader = make_loaders(bundle, DataConfig(kind="digits"), seed=0)
    >>> prep = Preprocess(bundle.mean, bundle.std, augment=True)
    >>> images, labels = next(iter(train_loader))
    >>> x = prep(images, train=True)  # float, normalised, augmented
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset

from compress import distributed
from compress.compat import torchvision
from compress.config import DataConfig, UnlabeledConfig
from compress.errors import DataError
from compress.losses import UNLABELED
from compress.registry import Registry

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DIGITS_SPLIT_SEED = 0  # the digits test split never changes with the recipe seed
TEST_SUBSET_SEED = 0  # neither does a test subset: accuracies stay comparable across seeds
_RESIZE_CHUNK = 1024  # images resized at once: bounds the float copy's memory
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # files an unlabeled folder offers

DATASETS: Registry[Callable[[DataConfig], DatasetBundle]] = Registry("dataset kind", DataError)


@dataclass(frozen=True)
class DatasetBundle:
    """Both splits of a dataset plus what a model and :class:`Preprocess` need to know about it."""

    train: Dataset
    test: Dataset
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    image_size: int
    in_channels: int = 3
    unlabeled: int = 0  # images at the end of ``train`` whose label is UNLABELED (-1)


class TensorImageDataset(Dataset):
    """A split held in memory as one uint8 NCHW tensor: indexing is a view, no decoding."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images = images
        self.targets = labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.targets[index])


class IndexedDataset(Dataset):
    """Items as ``(image, label, index)``: lets a training step look up per-image cached values."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image, label = self.dataset[index]
        return image, label, index


class ImageFileDataset(Dataset):
    """Image files decoded on access like ImageFolder's (RGB, short side resized, centre crop)."""

    def __init__(self, files: Sequence[str], label: int, image_size: int):
        self.files = list(files)
        self.targets = torch.full((len(self.files),), label, dtype=torch.int64)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return _decode_image(self.files[index], self.image_size), int(self.targets[index])


class LabeledConcat(ConcatDataset):
    """``ConcatDataset`` with the ``targets`` of all parts, as :func:`balanced_subset` needs."""

    def __init__(self, parts: Sequence[Dataset]):
        super().__init__(parts)
        self.targets = torch.cat([torch.as_tensor(_targets(part), dtype=torch.int64) for part in parts])


# --- public API --------------------------------------------------------------------------------


def load_dataset(cfg: DataConfig, seed: int = 0) -> DatasetBundle:
    """Load the dataset a recipe names, resized to ``cfg.image_size``, with optional subsets.

    With ``cfg.unlabeled.path`` set, the train split is the labeled train split (after its
    subset) followed by the unlabeled pool, labeled ``UNLABELED``; ``bundle.unlabeled`` counts
    them. The test split never includes unlabeled images.

    Args:
        cfg: The recipe's data section (kind, path, image_size, subset, unlabeled).
        seed: Seeds the train subset's and the unlabeled pool's selections. The test subset
            uses a fixed seed, so test accuracy is measured on the same images whatever the
            recipe seed.

    Returns:
        The bundle; in-memory kinds hold each split as one uint8 tensor.

    Raises:
        DataError: The path or its files are missing, arrays/labels are malformed, or image
            files of the splits (after subsetting) do not open as images; the message names
            the file and what was expected.
    """
    bundle = DATASETS.get(cfg.kind)(cfg)
    _check_not_empty(bundle, cfg)
    bundle = dataclasses.replace(
        bundle,
        train=balanced_subset(bundle.train, cfg.subset.train, seed),
        test=balanced_subset(bundle.test, cfg.subset.test, TEST_SUBSET_SEED),
    )
    if cfg.unlabeled.path is not None:
        pool = load_unlabeled(cfg.unlabeled, cfg.image_size, seed)
        bundle = dataclasses.replace(bundle, train=LabeledConcat([bundle.train, pool]), unlabeled=len(pool))
    check_image_files(bundle.train, bundle.test)
    return bundle


def load_unlabeled(cfg: UnlabeledConfig, image_size: int, seed: int) -> Dataset:
    """The unlabeled pool: every item labeled ``UNLABELED``, at ``image_size``.

    Args:
        cfg: ``path`` is a ``.npz`` file with ``x`` (uint8 NHWC with 1 or 3 channels, or NHW
            grey), resized like the npz kind; or a folder searched recursively for
            png/jpg/jpeg/bmp/webp files, decoded lazily like ImageFolder. ``limit`` keeps a
            seeded random selection of at most that many (in file/array order).
        image_size: The dataset's image size.
        seed: Seeds the ``limit`` selection.

    Returns:
        An in-memory :class:`TensorImageDataset` (npz) or an :class:`ImageFileDataset` (folder).

    Raises:
        DataError: The path is missing or holds no images, ``x`` is malformed; the message
            names the path. An undecodable file raises when it is read, naming the file.
    """
    if cfg.path is None:
        raise DataError("unlabeled.path is not set: expected a .npz file or a folder of images")
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        files = _image_files(path)
        keep = _seeded_selection(len(files), cfg.limit, seed)
        return ImageFileDataset([files[i] for i in keep.tolist()], UNLABELED, image_size)
    if path.is_file() and path.suffix.lower() == ".npz":
        x = _read_unlabeled_npz(path)
        keep = _seeded_selection(len(x), cfg.limit, seed).numpy()
        images = _resize(_npz_images(x[keep], path), image_size)
        return TensorImageDataset(images, torch.full((len(images),), UNLABELED, dtype=torch.int64))
    what = "is not a .npz file or a folder" if path.exists() else "does not exist"
    raise DataError(f"unlabeled path {path} {what} (expected a .npz with array x, or a folder of images)")


def detect_kind(path: str | Path) -> str:
    """Guess a dataset folder's kind from its layout (for ``compress bench --data``).

    Raises:
        DataError: the folder is missing or matches no known layout.
    """
    folder = _existing_dir(path, "a dataset")
    if (folder / "train.npz").is_file() or (folder / "test.npz").is_file():
        return "npz"
    if (folder / _CIFAR10.folder_name).is_dir() or (folder / _CIFAR10.test_file).is_file():
        return "cifar10"
    if (folder / _CIFAR100.folder_name).is_dir() or (folder / _CIFAR100.meta_file).is_file():
        return "cifar100"
    if (folder / "train").is_dir() and any((folder / split).is_dir() for split in ("val", "test")):
        return "imagefolder"
    raise DataError(
        f"{folder}: cannot tell the dataset kind (expected train.npz/test.npz, cifar-10-batches-py/, "
        "cifar-100-python/ or train/ + val/ class folders); pass --data-kind"
    )


def check_image_files(*splits: Dataset) -> None:
    """Open every image file the splits read (the header only: no decoding), before training.

    A zero-byte file, a text file named ``.jpg`` or a format Pillow does not know would
    otherwise stop a run mid-epoch. Files are opened by a few threads: on network storage the
    check waits on I/O, not on the CPU.

    Raises:
        DataError: naming the first bad file (in path order), its problem and how many of the
            files are bad.
    """
    files = sorted({path for split in splits for path in _files_of(split) if path is not None})
    if not files:
        return
    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [(path, problem) for path, problem in zip(files, pool.map(_image_problem, files, chunksize=64), strict=True) if problem]
    if problems:
        path, problem = problems[0]
        raise DataError(f"{len(problems)} of {len(files)} image files cannot be read (first: {path}: {problem}); fix or remove them")


def _files_of(dataset: Dataset) -> list[str | None]:
    """The file behind each item (None for in-memory items), aligned with the dataset's indices."""
    if isinstance(dataset, Subset):
        files = _files_of(dataset.dataset)
        return [files[i] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        return [path for part in dataset.datasets for path in _files_of(part)]
    if isinstance(dataset, ImageFileDataset):
        return list(dataset.files)
    if isinstance(dataset, torchvision.datasets.DatasetFolder):
        return [path for path, _ in dataset.samples]
    return [None] * len(dataset)


def _image_problem(path: str) -> str | None:
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path):
            return None
    except UnidentifiedImageError:
        return "not an image file Pillow can read"
    except Exception as exc:  # hostile files fail PIL's parsers in many ways (and bombs are refused)
        return f"{type(exc).__name__}: {exc}"


def make_loaders(bundle: DatasetBundle, cfg: DataConfig, seed: int, *, pin_memory: bool = False) -> tuple[DataLoader, DataLoader]:
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
    common = {"num_workers": cfg.workers, "persistent_workers": cfg.workers > 0, "pin_memory": pin_memory}
    if distributed.active():
        sampler = DistributedSampler(bundle.train, num_replicas=distributed.world_size(), rank=distributed.rank(), shuffle=True, seed=seed, drop_last=False)
        batch_size = distributed.per_process_batch(cfg.batch_size)
        train = DataLoader(bundle.train, batch_size=batch_size, sampler=sampler, generator=generator, drop_last=False, **common)
    else:
        train = DataLoader(bundle.train, batch_size=cfg.batch_size, shuffle=True, generator=generator, drop_last=False, **common)
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


test_arrays.__test__ = False  # its name starts with "test": keep pytest from collecting it where imported


class Preprocess(nn.Module):
    """Batch augmentation and normalisation, vectorised on the batch's device.

    Training with ``augment``: a random crop of the image zero-padded by ``pad`` pixels and a
    random horizontal flip, drawn independently per image (the standard CIFAR recipe of He et
    al. 2016), done by gathering pixels with per-image indices: no loop over samples. Then
    ``/255`` and per-channel ``(x - mean) / std``; evaluation only normalises. Randomness comes
    from torch's global generator on the batch's device (seed it with ``torch.manual_seed``).

    Args:
        mean: Per-channel mean in [0, 1] pixel units (``DatasetBundle.mean``).
        std: Per-channel std in [0, 1] pixel units.
        augment: Whether training batches are augmented at all.
        pad: Zero padding around the image before the random crop; 0 disables the crop.
        flip: Whether to flip horizontally with probability 0.5.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: bool, pad: int = 4, flip: bool = True):
        super().__init__()
        self.augment = augment
        self.pad = pad
        self.flip = flip
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images_uint8: Tensor, train: bool) -> Tensor:
        """Augment (training only) and normalise a uint8 NCHW batch into float32."""
        images = images_uint8
        if train and self.augment and (self.pad > 0 or self.flip):
            images = self._crop_and_flip(images)
        images = images.float().div_(255)
        return (images - self.mean) / self.std

    def _crop_and_flip(self, images: Tensor) -> Tensor:
        n, _, h, w = images.shape
        padded = F.pad(images, (self.pad,) * 4)  # zeros
        device = images.device
        top = torch.randint(0, 2 * self.pad + 1, (n, 1), device=device)
        left = torch.randint(0, 2 * self.pad + 1, (n, 1), device=device)
        rows = top + torch.arange(h, device=device)  # (n, h)
        cols = left + torch.arange(w, device=device)  # (n, w)
        if self.flip:
            flipped = torch.rand(n, 1, device=device) < 0.5
            cols = torch.where(flipped, cols.flip(1), cols)
        batch = torch.arange(n, device=device).view(n, 1, 1)
        # Advanced indices around the channel slice put their (n, h, w) shape first.
        crops = padded[batch, :, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
        return crops.permute(0, 3, 1, 2).contiguous()


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
    labels = torch.unique(torch.as_tensor(_targets(dataset), dtype=torch.int64), return_inverse=True)[1]
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


# --- helpers shared by the loaders -------------------------------------------------------------


def _targets(dataset: Dataset) -> Sequence[int] | Tensor:
    if isinstance(dataset, Subset):
        return torch.as_tensor(_targets(dataset.dataset))[list(dataset.indices)]
    return dataset.targets


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
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


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
        raise DataError(f"dataset path {folder} does not exist or is not a folder ({kind} data expected there)")
    return folder


def _resize(images: Tensor, size: int) -> Tensor:
    """Bilinear (antialiased when shrinking) resize of a uint8 NCHW tensor, in chunks."""
    if images.shape[-2:] == (size, size):
        return images
    chunks = [
        F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        for chunk in images.split(_RESIZE_CHUNK)
    ]
    return torch.cat(chunks) if chunks else images.new_empty((0, images.shape[1], size, size))


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
            f"{where}: labels must be in 0..{num_classes - 1}, found {labels.min().item()}..{labels.max().item()}"
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


# --- digits ------------------------------------------------------------------------------------


@DATASETS.register("digits")
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
        np.arange(len(labels)), test_size=0.2, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
    )
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    classes = [str(k) for k in range(10)]
    return _in_memory_bundle(
        (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx]), classes, cfg.image_size
    )


# --- npz ---------------------------------------------------------------------------------------


@DATASETS.register("npz")
def load_npz(cfg: DataConfig) -> DatasetBundle:
    """A folder with ``train.npz`` / ``test.npz`` (``x`` uint8 NHWC or NHW, ``y`` int labels).

    Optional ``classes.txt`` names the classes, one per line; otherwise they are "0".."K-1"
    with K = largest label + 1. Mean/std are computed from the train images.
    """
    folder = _existing_dir(cfg.path, "npz")
    train, test = _read_npz(folder / "train.npz"), _read_npz(folder / "test.npz")
    classes = _npz_classes(folder, train[1], test[1])
    _check_labels(train[1], len(classes), str(folder / "train.npz"))
    _check_labels(test[1], len(classes), str(folder / "test.npz"))
    _check_same_size(train[0], test[0], folder)
    return _in_memory_bundle(train, test, classes, cfg.image_size)


def _read_npz(file: Path) -> tuple[Tensor, Tensor]:
    if not file.is_file():
        raise DataError(f"missing {file}: an npz dataset needs train.npz and test.npz (arrays x, y)")
    try:
        with np.load(file, allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise DataError(f"{file}: expected arrays 'x' (images) and 'y' (labels), found {', '.join(arrays.files)}")
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: not a readable npz file ({exc})") from None
    return _npz_images(x, file), _npz_labels(y, len(x), file)


def _npz_images(x: np.ndarray, file: Path) -> Tensor:
    if x.dtype != np.uint8:
        raise DataError(f"{file}: x must be uint8 pixels 0..255, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{file}: x must be NHWC with 1 or 3 channels, or NHW grey; got shape {x.shape}")
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return images.expand(-1, 3, -1, -1).contiguous()


def _npz_labels(y: np.ndarray, count: int, file: Path) -> Tensor:
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (count,):
        raise DataError(f"{file}: y must be {count} integer labels (shape ({count},)), got {y.dtype} {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def _npz_classes(folder: Path, *labels: Tensor) -> list[str]:
    names_file = folder / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise DataError(f"{names_file}: expected one class name per line, found none")
        return names
    largest = max((int(y.max()) for y in labels if len(y)), default=-1)
    return [str(k) for k in range(largest + 1)]


def _check_same_size(train_x: Tensor, test_x: Tensor, folder: Path) -> None:
    if len(train_x) and len(test_x) and train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"{folder}: train and test images differ in shape ({tuple(train_x.shape[1:])} vs {tuple(test_x.shape[1:])})"
        )


def _read_unlabeled_npz(file: Path) -> np.ndarray:
    try:
        with np.load(file, allow_pickle=False) as arrays:
            if "x" not in arrays:
                raise DataError(f"{file}: expected an array 'x' (unlabeled images), found {', '.join(arrays.files) or 'none'}")
            x = arrays["x"]
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: not a readable npz file ({exc})") from None
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise DataError(f"{file}: x must be uint8 NHWC with 1 or 3 channels, or NHW grey; got {x.dtype} {x.shape}")
    if len(x) == 0:
        raise DataError(f"{file}: x holds no images")
    return x


# --- CIFAR (official python format) ------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    folder_name: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    mean: tuple[float, ...]
    std: tuple[float, ...]


_CIFAR10 = _CifarLayout(
    "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
    "batches.meta", b"labels", b"label_names", CIFAR10_MEAN, CIFAR10_STD,
)  # fmt: skip
_CIFAR100 = _CifarLayout(
    "cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names", CIFAR100_MEAN, CIFAR100_STD
)


@DATASETS.register("cifar10")
def load_cifar10(cfg: DataConfig) -> DatasetBundle:
    """CIFAR-10 from ``cifar-10-batches-py/`` (or its parent), or a train.npz/test.npz folder."""
    folder = _existing_dir(cfg.path, "cifar10")
    if (folder / "train.npz").is_file() and (folder / "test.npz").is_file():
        return load_npz(cfg)
    return _load_cifar(folder, _CIFAR10, cfg.image_size)


@DATASETS.register("cifar100")
def load_cifar100(cfg: DataConfig) -> DatasetBundle:
    """CIFAR-100 (fine labels) from ``cifar-100-python/`` or its parent."""
    return _load_cifar(_existing_dir(cfg.path, "cifar100"), _CIFAR100, cfg.image_size)


def _load_cifar(folder: Path, layout: _CifarLayout, image_size: int) -> DatasetBundle:
    if (folder / layout.folder_name).is_dir():
        folder = folder / layout.folder_name
    expected = [*layout.train_files, layout.test_file, layout.meta_file]
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{folder}: missing {', '.join(missing)} (expected the official {layout.folder_name}/ "
            f"folder or its parent: {', '.join(expected)})"
        )
    classes = _cifar_names(folder / layout.meta_file, layout.names_key)
    batches = [_cifar_batch(folder / name, layout.label_key) for name in layout.train_files]
    train = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    test = _cifar_batch(folder / layout.test_file, layout.label_key)
    _check_labels(train[1], len(classes), str(folder / layout.train_files[0]))
    _check_labels(test[1], len(classes), str(folder / layout.test_file))
    return _in_memory_bundle(train, test, classes, image_size, stats=(layout.mean, layout.std))


# Everything the CIFAR python-format files pickle: numpy arrays (their reconstructors under the
# numpy 1 and numpy 2 module names, and protocol 5's buffer form), numpy scalars, and protocol 2's
# way of writing bytes. Nothing else is importable while unpickling, so a planted file cannot run
# code (the same guarantee ``torch.load(weights_only=True)`` gives for checkpoints).
_CIFAR_GLOBALS = frozenset(
    [(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
)


class _Refused(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def _unpickle(file: Path) -> dict:
    # The official CIFAR distribution is a set of Python pickles (Krizhevsky's own loading
    # recipe is ``pickle.load(fo, encoding="bytes")``); they are read with an unpickler that
    # can only build arrays, lists, dicts, bytes and numbers.
    try:
        with open(file, "rb") as f:
            content = _CifarUnpickler(f, encoding="bytes").load()
    except _Refused as exc:
        raise DataError(
            f"{file}: refused: unpickling it would import {exc}, and a CIFAR python-format file holds only arrays, lists, bytes and numbers"
        ) from None
    except Exception as exc:  # a file that is not a pickle fails the unpickler in many ways
        raise DataError(f"{file}: not a CIFAR python-format batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(content, dict):
        raise DataError(f"{file}: expected a pickled dict (CIFAR python format), got {type(content).__name__}")
    return content


def _cifar_batch(file: Path, label_key: bytes) -> tuple[Tensor, Tensor]:
    content = _unpickle(file)
    if b"data" not in content or label_key not in content:
        raise DataError(f"{file}: expected keys b'data' and {label_key!r}")
    data, labels = np.asarray(content[b"data"]), np.asarray(content[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{file}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{file}: {label_key!r} must be {len(data)} integer labels, got {labels.dtype} {labels.shape}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # rows are already CHW
    return images, torch.from_numpy(labels.astype(np.int64))


def _cifar_names(file: Path, names_key: bytes) -> list[str]:
    content = _unpickle(file)
    names = content.get(names_key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{file}: expected a non-empty list of class names under {names_key!r}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


# --- ImageFolder -------------------------------------------------------------------------------


@DATASETS.register("imagefolder")
def load_imagefolder(cfg: DataConfig) -> DatasetBundle:
    """``path/train/<class>/*.png|jpg...`` and ``path/val/`` (or ``path/test/``), decoded lazily.

    Images are decoded with PIL, converted to RGB, resized so the short side is ``image_size``
    and centre-cropped (the usual ImageNet evaluation transform); ImageNet mean/std. Hidden
    files and folders and files without an image extension are ignored; the files that remain
    must be images (see the module docstring: bad files raise, they are never skipped).
    """
    folder = _existing_dir(cfg.path, "imagefolder")
    test_dir = next((folder / name for name in ("val", "test") if (folder / name).is_dir()), None)
    if not (folder / "train").is_dir() or test_dir is None:
        raise DataError(f"{folder}: expected subfolders train/<class>/ and val/<class>/ (or test/<class>/)")
    loader = functools.partial(_decode_image, image_size=cfg.image_size)
    train, test = _image_folder(folder / "train", loader), _image_folder(test_dir, loader)
    if test.classes != train.classes:
        raise DataError(
            f"{test_dir}: class folders {test.classes} differ from {folder / 'train'}'s {train.classes}"
        )
    return DatasetBundle(
        train=train,
        test=test,
        num_classes=len(train.classes),
        classes=tuple(train.classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        image_size=cfg.image_size,
        in_channels=3,
    )


class _ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder without hidden entries: ``.ipynb_checkpoints/`` is no class."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: index for index, name in enumerate(classes)}


def _image_folder(root: Path, loader: Callable[[str], Tensor]) -> Dataset:
    try:
        return _ImageFolder(str(root), loader=loader, is_valid_file=_is_image_file)
    except FileNotFoundError as exc:
        raise DataError(f"{root}: {exc}") from None


def _is_image_file(path: str | Path) -> bool:
    """An image extension and not hidden (``.DS_Store``, macOS's ``._photo.jpg`` metadata)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS)


def _image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), sorted so selections are reproducible."""
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not files:
        raise DataError(f"unlabeled folder {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found in it or below")
    return files


def _decode_image(path: str, image_size: int) -> Tensor:
    """PIL decode -> RGB -> short side to ``image_size`` -> centre crop -> uint8 CHW tensor."""
    tf = torchvision.transforms.functional
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except Exception as exc:  # corrupt files fail PIL's decoders in many ways (OSError, SyntaxError, struct.error...)
        raise DataError(f"cannot decode image {path}: {exc or type(exc).__name__}") from None
    resized = tf.resize(rgb, image_size, interpolation=tf.InterpolationMode.BILINEAR, antialias=True)
    return tf.pil_to_tensor(tf.center_crop(resized, image_size))
