"""What data a run reads and how batches are mixed: the ``data`` section and the ``augment``
settings of the training stages, with the table of dataset kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compress.core.fields import check, check_choices, choice

# label value of an image from the unlabeled pool (datasets, losses and the loop agree on it)
UNLABELED = -1


# Dataset kind -> the reader that loads it, ``(DataConfig) -> DatasetBundle`` (imported on use).
DATASET_KINDS: dict[str, str] = {
    "digits": "compress.data.digits:load_digits",
    "cifar10": "compress.data.cifar:load_cifar10",
    "cifar100": "compress.data.cifar:load_cifar100",
    "npz": "compress.data.npz:load_npz",
    "imagefolder": "compress.data.imagefolder:load_imagefolder",
}


@dataclass(frozen=True)
class SubsetConfig:
    """Use only the first N (seeded, class-balanced shuffle) images of a split: quick runs."""

    # training images to keep (null: all)
    train: int | None = None
    # test images to keep (null: all)
    test: int | None = None

    def __post_init__(self):
        for name in ("train", "test"):
            value = getattr(self, name)
            check(
                value is None or value > 0,
                f"{name}: expected a positive integer or null, got {value}",
            )


@dataclass(frozen=True)
class UnlabeledConfig:
    """Extra images without labels; only the teacher-driven loss terms apply to them."""

    # a .npz with `x` (uint8 NHWC) or a folder of images (searched recursively)
    path: str | None = None
    limit: int | None = None  # use at most this many (a seeded random selection)

    def __post_init__(self):
        check(
            self.limit is None or self.limit > 0,
            f"limit: expected a positive integer or null, got {self.limit}",
        )


@dataclass(frozen=True)
class DataConfig:
    # the dataset reader (`compress list datasets`)
    kind: str = choice("digits", DATASET_KINDS)
    # the dataset's file or folder (digits needs none; `--data PATH` sets it)
    path: str | None = None
    # the side the images are resized to, in pixels; networks are built for it
    image_size: int = 32
    # the training batch of all processes together
    batch_size: int = 128
    # the batch for evaluation, calibration and checks
    eval_batch_size: int = 256
    # DataLoader worker processes that decode images (0: in the main process)
    workers: int = 0
    # random crop and flip of training batches, on their device
    augment: bool = True
    # a seeded, class-balanced share of each split, for quick runs
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    # extra images without labels that only the teacher-driven terms learn from
    unlabeled: UnlabeledConfig = field(default_factory=UnlabeledConfig)

    def __post_init__(self):
        check_choices(self)
        check(
            self.kind == "digits" or self.path is not None,
            f"path: dataset kind {self.kind!r} needs a path (or pass --data PATH)",
        )
        check(8 <= self.image_size <= 1024, f"image_size: expected 8..1024, got {self.image_size}")
        check(
            self.batch_size > 0, f"batch_size: expected a positive integer, got {self.batch_size}"
        )
        check(
            self.eval_batch_size > 0,
            f"eval_batch_size: expected a positive integer, got {self.eval_batch_size}",
        )
        check(self.workers >= 0, f"workers: expected >= 0, got {self.workers}")


@dataclass(frozen=True)
class MixConfig:
    """KD-aware batch augmentation: teacher and student see the same mixed/erased batch.

    mixup (Zhang et al. 2018) and cutmix (Yun et al. 2019) are drawn per batch with probability
    ``prob``; when both alphas are > 0 one of the two is picked at random. cutout (DeVries &
    Taylor 2017) erases one ``cutout``-pixel square per image.
    """

    # Beta(alpha, alpha) mixing of image pairs (0: off)
    mixup_alpha: float = 0.0
    # Beta(alpha, alpha) area of a box pasted from another image (0: off)
    cutmix_alpha: float = 0.0
    # the probability that a batch is mixed at all
    prob: float = 1.0
    # side in pixels of a square erased from each image (0: off)
    cutout: int = 0

    def __post_init__(self):
        check(
            self.mixup_alpha >= 0,
            f"mixup_alpha: expected >= 0 (0 disables), got {self.mixup_alpha}",
        )
        check(
            self.cutmix_alpha >= 0,
            f"cutmix_alpha: expected >= 0 (0 disables), got {self.cutmix_alpha}",
        )
        check(0 <= self.prob <= 1, f"prob: expected 0..1, got {self.prob}")
        check(self.cutout >= 0, f"cutout: expected >= 0 pixels (0 disables), got {self.cutout}")
