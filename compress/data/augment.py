"""Augmentation on whole batches, on their device: crop, flip and normalisation of uint8 batches
(:class:`Preprocess`), then the KD-aware mixing of normalised ones (:class:`BatchMix`).

KD-aware batch augmentation: mixup, cutmix and cutout on a normalised batch.

Why "KD-aware": the distill stage hands the *same* augmented batch to the teacher and the
student, so the teacher's soft targets describe the image the student actually sees, mixed or
erased. This is the "function matching" view of distillation of Beyer et al. 2022 ("Knowledge
distillation: A good teacher is patient and consistent"): aggressive mixing is harmless, even
helpful, because the target is recomputed for every augmented image instead of being a label
that no longer fits it. The hard-label term still needs both labels and their weight, so the
result carries ``mixed_labels`` and ``lam`` for :class:`compress.training.losses.DistillBatch`.

Randomness comes from torch's global generators (seed them with ``torch.manual_seed``): the
per-batch scalars (whether to mix, which method, ``lam``, the cutmix box) from the CPU
generator, the per-image draws (permutation, cutout centres) on the batch's device.

Example:
    >>> mix = BatchMix(MixConfig(mixup_alpha=0.2, cutout=8))
    >>> out = mix(prep(images, train=True), labels)
    >>> batch = DistillBatch(student(out.images), teacher(out.images), out.labels,
    ...                      mixed_labels=out.mixed_labels, lam=out.lam)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.data.spec import MixConfig


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

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool,
        pad: int = 4,
        flip: bool = True,
    ):
        super().__init__()
        self.augment = augment
        self.pad = pad
        self.flip = flip
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

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


@dataclass
class MixedBatch:
    """One augmented batch and the labels a mixed hard-label loss needs.

    Attributes:
        images: The batch teacher and student both see (N, C, H, W).
        labels: The original labels, unchanged.
        mixed_labels: Labels of the images mixed in (``labels[perm]``); None without mixing.
        lam: Weight of ``labels`` (1.0 without mixing); ``mixed_labels`` weigh ``1 - lam``.
    """

    images: Tensor
    labels: Tensor
    mixed_labels: Tensor | None
    lam: float


class BatchMix:
    """Mixup / cutmix (per batch, with probability ``cfg.prob``) then cutout (per image).

    * mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization"):
      ``lam ~ Beta(a, a)``, ``x = lam * x + (1 - lam) * x[perm]``.
    * cutmix (Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers
      with Localizable Features"): a box of area ``(1 - lam) * H * W`` centred uniformly,
      clipped at the borders and pasted from ``x[perm]``; ``lam`` is recomputed from the
      clipped box so it is the exact share of pixels kept.
    * cutout (DeVries & Taylor 2017, "Improved Regularization of Convolutional Neural Networks
      with Cutout"): one ``cfg.cutout``-pixel square per image, its centre uniform over the
      image (clipped at the borders), set to 0 = the dataset mean after normalisation.
      Applied whether or not the batch was mixed.

    When both alphas are > 0, each mixed batch uses one of the two, picked with probability 0.5.
    The input batch is never modified in place.

    Args:
        cfg: The distill stage's ``augment`` section.
    """

    def __init__(self, cfg: MixConfig):
        self.cfg = cfg

    @property
    def mixes(self) -> bool:
        """Whether some batches get mixup or cutmix (an alpha > 0 and ``prob`` > 0)."""
        return self.cfg.prob > 0 and (self.cfg.mixup_alpha > 0 or self.cfg.cutmix_alpha > 0)

    @property
    def active(self) -> bool:
        """Whether calling this changes anything; False means the call is the identity."""
        return self.mixes or self.cfg.cutout > 0

    @property
    def random(self) -> bool:
        """Whether outputs differ between calls: if so, teacher logits must not be cached."""
        return self.active

    def __call__(self, images: Tensor, labels: Tensor) -> MixedBatch:
        """Augment a normalised float NCHW batch; see the class docstring for what happens."""
        out = MixedBatch(images, labels, None, 1.0)
        if self.mixes and len(images) > 1 and torch.rand(()).item() < self.cfg.prob:
            out = self._mix(images, labels)
        if self.cfg.cutout > 0:
            out.images = cutout(out.images, self.cfg.cutout)
        return out

    def _mix(self, images: Tensor, labels: Tensor) -> MixedBatch:
        use_cutmix = self.cfg.cutmix_alpha > 0 and (
            self.cfg.mixup_alpha == 0 or torch.rand(()).item() < 0.5
        )
        perm = torch.randperm(len(images), device=images.device)
        if use_cutmix:
            mixed, lam = cutmix(images, perm, _beta(self.cfg.cutmix_alpha))
        else:
            lam = _beta(self.cfg.mixup_alpha)
            mixed = mixup(images, perm, lam)
        return MixedBatch(mixed, labels, labels[perm], lam)


def mixup(images: Tensor, perm: Tensor, lam: float) -> Tensor:
    """``lam * images + (1 - lam) * images[perm]`` (Zhang et al. 2018)."""
    return images * lam + images[perm] * (1.0 - lam)


def cutmix(images: Tensor, perm: Tensor, lam: float) -> tuple[Tensor, float]:
    """Paste one box of ``images[perm]`` into ``images`` (Yun et al. 2019).

    Args:
        images: (N, C, H, W) batch.
        perm: Partner of each image.
        lam: Target share of the image kept; the box has area ``(1 - lam) * H * W`` before
            clipping at the borders.

    Returns:
        The new batch and the exact ``lam = 1 - box_area / (H * W)`` after clipping.
    """
    h, w = images.shape[-2:]
    (top, bottom), (left, right) = _box_side(h, lam), _box_side(w, lam)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images[perm, :, top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (h * w)


def cutout(images: Tensor, size: int) -> Tensor:
    """Zero one ``size`` x ``size`` square per image, centres uniform and independent.

    Vectorised: a per-image (H, W) mask built from row and column ranges, no loop over images.
    The square is clipped where it crosses a border (DeVries & Taylor 2017).
    """
    n, _, h, w = images.shape
    rows = _square_mask(n, h, size, images.device)  # (n, h)
    cols = _square_mask(n, w, size, images.device)  # (n, w)
    mask = rows[:, None, :, None] & cols[:, None, None, :]  # (n, 1, h, w)
    return images.masked_fill(mask, 0.0)


def _beta(alpha: float) -> float:
    concentration = torch.tensor(float(alpha))
    return float(torch.distributions.Beta(concentration, concentration).sample())


def _box_side(length: int, lam: float) -> tuple[int, int]:
    """Start/end of the cutmix box along one axis: side ``length * sqrt(1 - lam)``, clipped."""
    side = int(length * (1.0 - lam) ** 0.5)
    centre = int(torch.randint(0, length, ()).item())
    return max(centre - side // 2, 0), min(centre - side // 2 + side, length)


def _square_mask(n: int, length: int, size: int, device: torch.device) -> Tensor:
    """(n, length) bool: inside each image's square along one axis (centre uniform, clipped)."""
    start = torch.randint(0, length, (n, 1), device=device) - size // 2
    positions = torch.arange(length, device=device)
    return (positions >= start) & (positions < start + size)
