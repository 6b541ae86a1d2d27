"""Loading a recipe's data: the reader its ``kind`` names
(:data:`compress.data.spec.DATASET_KINDS`),
the unlabeled pool, the kind of a folder, and the check that every image file opens."""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, Dataset, Subset

from compress.core.compat import torchvision
from compress.core.registry import load_entry
from compress.data.cifar import _CIFAR10, _CIFAR100
from compress.data.common import (
    TEST_SUBSET_SEED,
    _check_not_empty,
    _existing_dir,
    _image_files,
    _resize,
    _seeded_selection,
    balanced_subset,
)
from compress.data.containers import (
    DatasetBundle,
    ImageFileDataset,
    LabeledConcat,
    TensorImageDataset,
)
from compress.data.npz import _npz_images, _read_unlabeled_npz
from compress.data.spec import DATASET_KINDS, UNLABELED, DataConfig, UnlabeledConfig
from compress.errors import DataError


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
    bundle = load_entry(DATASET_KINDS[cfg.kind])(cfg)
    _check_not_empty(bundle, cfg)
    bundle = dataclasses.replace(
        bundle,
        train=balanced_subset(bundle.train, cfg.subset.train, seed),
        test=balanced_subset(bundle.test, cfg.subset.test, TEST_SUBSET_SEED),
    )
    if cfg.unlabeled.path is not None:
        pool = load_unlabeled(cfg.unlabeled, cfg.image_size, seed)
        bundle = dataclasses.replace(
            bundle, train=LabeledConcat([bundle.train, pool]), unlabeled=len(pool)
        )
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
    raise DataError(
        f"unlabeled path {path} {what} (expected a .npz with array x, or a folder of images)"
    )


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
        f"{folder}: cannot tell the dataset kind (expected train.npz/test.npz, "
        "cifar-10-batches-py/, cifar-100-python/ or train/ + val/ class folders); pass --data-kind"
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
        problems = [
            (path, problem)
            for path, problem in zip(
                files, pool.map(_image_problem, files, chunksize=64), strict=True
            )
            if problem
        ]
    if problems:
        path, problem = problems[0]
        raise DataError(
            f"{len(problems)} of {len(files)} image files cannot be read (first: {path}: "
            f"{problem}); fix or remove them"
        )


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
    # hostile files fail PIL's parsers in many ways (and bombs are refused)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
