"""What a dataset is here: the train/test bundle with its classes and normalisation, and the
``Dataset`` types the readers return (in-memory uint8 tensors, image files, indexed views)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset

from compress.core.compat import torchvision
from compress.errors import DataError


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
        self.targets = torch.cat(
            [torch.as_tensor(_targets(part), dtype=torch.int64) for part in parts]
        )


def _targets(dataset: Dataset) -> Sequence[int] | Tensor:
    if isinstance(dataset, Subset):
        return torch.as_tensor(_targets(dataset.dataset))[list(dataset.indices)]
    return dataset.targets


def _decode_image(path: str, image_size: int) -> Tensor:
    """PIL decode -> RGB -> short side to ``image_size`` -> centre crop -> uint8 CHW tensor."""
    tf = torchvision.transforms.functional
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except Exception as exc:
        # corrupt files fail PIL's decoders in many ways (OSError, SyntaxError, struct.error...)
        raise DataError(f"cannot decode image {path}: {exc or type(exc).__name__}") from None
    resized = tf.resize(
        rgb, image_size, interpolation=tf.InterpolationMode.BILINEAR, antialias=True
    )
    return tf.pil_to_tensor(tf.center_crop(resized, image_size))
