"""KD-aware batch augmentation: each method's output is recomputed from the draws it made."""

from __future__ import annotations

import pytest
import torch

from compress.data import augment
from compress.data.augment import BatchMix, MixedBatch, cutmix, cutout, mixup
from compress.data.spec import MixConfig


def _batch(n: int = 8, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    # Distinct, strictly positive pixels: a zero can only come from cutout, and no two images agree.
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) + 1.0
    return images, torch.arange(n) % 5


def _draw(cfg: MixConfig, seed: int = 0) -> MixedBatch:
    images, labels = _batch()
    torch.manual_seed(seed)
    return BatchMix(cfg)(images, labels)


def test_inactive_config_is_identity():
    images, labels = _batch()
    mix = BatchMix(MixConfig())
    assert not mix.active and not mix.random
    out = mix(images, labels)
    assert out.images is images and out.labels is labels
    assert out.mixed_labels is None and out.lam == 1.0


def test_prob_zero_leaves_the_batch_untouched():
    images, labels = _batch()
    mix = BatchMix(MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0))
    assert not mix.active  # nothing random happens, so teacher logits may be cached
    for _ in range(5):
        out = mix(images, labels)
        assert torch.equal(out.images, images) and out.mixed_labels is None and out.lam == 1.0


def test_mixup_is_lam_x_plus_one_minus_lam_x_perm():
    images, labels = _batch()
    torch.manual_seed(3)
    out = BatchMix(MixConfig(mixup_alpha=0.4))(images, labels)
    torch.manual_seed(3)
    torch.rand(())  # the prob draw
    perm = torch.randperm(len(images))
    lam = float(torch.distributions.Beta(torch.tensor(0.4), torch.tensor(0.4)).sample())
    assert out.lam == pytest.approx(lam) and 0.0 <= out.lam <= 1.0
    torch.testing.assert_close(out.images, lam * images + (1 - lam) * images[perm])
    assert torch.equal(out.mixed_labels, labels[perm]) and torch.equal(out.labels, labels)
    assert torch.equal(images, _batch()[0])  # the input is not modified in place


def _box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """Bounding box (top, bottom, left, right) of an (H, W) bool mask."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    return rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_pastes_one_box_from_the_partner(seed):
    images, labels = _batch()
    torch.manual_seed(seed)
    out = BatchMix(MixConfig(cutmix_alpha=1.0))(images, labels)
    torch.manual_seed(seed)
    torch.rand(())
    perm = torch.randperm(len(images))
    assert torch.equal(out.mixed_labels, labels[perm])
    changed = (out.images != images).any(1)  # (n, h, w): where the partner shows
    h, w = images.shape[-2:]
    if not changed.any():  # an empty box (lam ~ 1): nothing mixed
        assert out.lam == 1.0
        return
    top, bottom, left, right = _box(changed.any(0))
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    for i, j in enumerate(perm.tolist()):
        assert torch.equal(out.images[i][:, ~inside], images[i][:, ~inside])
        assert torch.equal(out.images[i][:, inside], images[j][:, inside])
    assert out.lam == pytest.approx(1 - (bottom - top) * (right - left) / (h * w))


def test_cutmix_lam_counts_the_clipped_box():
    images = torch.rand(4, 1, 10, 10) + 1.0
    perm = torch.tensor([1, 2, 3, 0])
    areas = set()
    for seed in range(20):
        torch.manual_seed(seed)
        mixed, lam = cutmix(images, perm, 0.5)
        pasted = (mixed != images).any(1)[0].sum().item()
        assert lam == pytest.approx(1 - pasted / 100)
        areas.add(pasted)
    assert max(areas) == 49 and min(areas) < 49  # 7x7 when inside, smaller when clipped


def test_cutout_erases_one_clipped_square_per_image():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 12, 12) + 1.0
    out = cutout(images, 5)
    zero = out == 0
    assert torch.equal(zero[:, 0], zero[:, 1]) and torch.equal(zero[:, 0], zero[:, 2])
    boxes = set()
    for mask in zero[:, 0]:
        top, bottom, left, right = _box(mask)
        assert mask.sum() == (bottom - top) * (right - left)  # a filled rectangle
        assert bottom - top <= 5 and right - left <= 5
        assert (bottom - top == 5 or top == 0 or bottom == 12) and (
            right - left == 5 or left == 0 or right == 12
        )
        boxes.add((top, left))
    assert len(boxes) > 20  # per-image positions
    assert torch.equal(out[~zero], images[~zero])


def test_cutout_applies_with_and_without_mixing():
    out = _draw(MixConfig(cutout=4))
    assert out.mixed_labels is None and out.lam == 1.0
    assert ((out.images == 0).all(1).flatten(1).sum(1) > 0).all()
    mixed = _draw(MixConfig(mixup_alpha=1.0, cutout=4))
    assert (
        mixed.mixed_labels is not None and ((mixed.images == 0).all(1).flatten(1).sum(1) > 0).all()
    )


def test_both_alphas_pick_either_method(monkeypatch):
    calls = []
    for name in ("mixup", "cutmix"):
        original = getattr(augment, name)
        monkeypatch.setattr(
            augment, name, lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args)
        )
    for seed in range(20):
        _draw(MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0), seed)
    assert len(calls) == 20 and 3 < calls.count("cutmix") < 17


def test_prob_mixes_some_batches():
    mixed = [
        _draw(MixConfig(mixup_alpha=1.0, prob=0.5), seed).mixed_labels is not None
        for seed in range(40)
    ]
    assert 5 < sum(mixed) < 35


def test_reproducible_with_manual_seed():
    cfg = MixConfig(mixup_alpha=0.3, cutmix_alpha=1.0, prob=0.8, cutout=3)
    for seed in range(5):
        a, b = _draw(cfg, seed), _draw(cfg, seed)
        assert torch.equal(a.images, b.images) and a.lam == b.lam
        assert (a.mixed_labels is None) == (b.mixed_labels is None)
        assert a.mixed_labels is None or torch.equal(a.mixed_labels, b.mixed_labels)
    assert not torch.equal(_draw(cfg, 0).images, _draw(cfg, 1).images)


def test_mixup_helper_and_active_flags():
    images, _ = _batch(4)
    perm = torch.tensor([3, 2, 1, 0])
    torch.testing.assert_close(mixup(images, perm, 0.25), 0.25 * images + 0.75 * images.flip(0))
    assert BatchMix(MixConfig(cutout=2)).active and BatchMix(MixConfig(cutmix_alpha=1.0)).random
