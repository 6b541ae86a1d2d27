"""An ImageFolder tree (one folder per class) of image files, decoded and resized on read."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from compress.core.compat import torchvision
from compress.data.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _existing_dir,
    _is_image_file,
    refuse_directory_links,
)
from compress.data.containers import DatasetBundle, _decode_image
from compress.data.spec import DataConfig
from compress.errors import DataError


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
        raise DataError(
            f"{folder}: expected subfolders train/<class>/ and val/<class>/ (or test/<class>/)"
        )
    loader = functools.partial(_decode_image, image_size=cfg.image_size)
    train, test = _image_folder(folder / "train", loader), _image_folder(test_dir, loader)
    if test.classes != train.classes:
        raise DataError(
            f"{test_dir}: class folders {test.classes} differ from {folder / 'train'}'s "
            f"{train.classes}"
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
        classes = sorted(
            e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")
        )
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        _check_class_folders(Path(directory), classes)
        return classes, {name: index for index, name in enumerate(classes)}


def _check_class_folders(split: Path, classes: list[str]) -> None:
    """Each class folder a tree of its own: no links inside, none of them inside another.

    A class folder may itself be a link (datasets are often assembled that way), but one
    that resolves to the split, an ancestor of it, or into another class's folder would count
    images twice under two labels.
    """
    split_real = split.resolve()
    owners: dict[Path, str] = {}
    for name in classes:
        real = (split / name).resolve()
        if real == split_real or real in split_real.parents:
            raise DataError(
                f"{split / name}: the class folder links to {real}, which contains the split "
                "itself (the walk would loop)"
            )
        for other_real, other in owners.items():
            if real == other_real or other_real in real.parents or real in other_real.parents:
                raise DataError(
                    f"{split / name}: the class folder resolves to {real}, which overlaps class "
                    f"{other!r} ({other_real}): images would be counted under both labels"
                )
        owners[real] = name
        refuse_directory_links(split / name)


def _image_folder(root: Path, loader: Callable[[str], Tensor]) -> Dataset:
    try:
        return _ImageFolder(str(root), loader=loader, is_valid_file=_is_image_file)
    except FileNotFoundError as exc:
        raise DataError(f"{root}: {exc}") from None
