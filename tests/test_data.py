"""Datasets and loaders: every kind on small files written here, plus the real CIFAR-10 copy."""

from __future__ import annotations

import os
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress.data.augment import Preprocess
from compress.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN
from compress.data.common import IMAGENET_MEAN, balanced_subset
from compress.data.load import load_dataset
from compress.data.loaders import make_loaders, test_arrays
from compress.data.spec import DATASET_KINDS, UNLABELED, DataConfig, SubsetConfig, UnlabeledConfig
from compress.errors import DataError


def _labels(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


def _image_bytes(dataset) -> Counter:
    return Counter(dataset[i][0].numpy().tobytes() for i in range(len(dataset)))


def test_every_kind_names_a_reader():
    from compress.core.registry import load_entry

    assert all(callable(load_entry(entry)) for entry in DATASET_KINDS.values())


# --- digits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(kind="digits", image_size=16))


def test_digits_shapes_and_labels(digits):
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    image, label = digits.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert isinstance(label, int)
    assert digits.num_classes == 10 and digits.classes == tuple(str(k) for k in range(10))
    assert (digits.image_size, digits.in_channels) == (16, 3)
    labels = _labels(digits.train) + _labels(digits.test)
    assert set(labels) == set(range(10))
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grey replicated
    assert 0.2 < digits.mean[0] < 0.4 and 0.2 < digits.std[0] < 0.45


def test_digits_split_is_stratified(digits):
    train, test = Counter(_labels(digits.train)), Counter(_labels(digits.test))
    for k in range(10):
        assert abs(test[k] / (train[k] + test[k]) - 0.2) < 0.02


def test_digits_split_is_deterministic_and_a_partition():
    from sklearn.datasets import load_digits

    a = load_dataset(DataConfig(kind="digits", image_size=8), seed=0)
    b = load_dataset(DataConfig(kind="digits", image_size=8), seed=123)  # recipe seed: no effect
    assert torch.equal(a.test.images, b.test.images) and torch.equal(
        a.train.targets, b.train.targets
    )
    # At image_size 8 there is no resize: train + test must be exactly the 1,797 images.
    everything = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    expected = Counter(np.repeat(img[None], 3, 0).tobytes() for img in everything)
    assert _image_bytes(a.train) + _image_bytes(a.test) == expected


# --- npz ---------------------------------------------------------------------------------------


def _write_npz(
    folder: Path, train_x, train_y, test_x, test_y, classes: list[str] | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", x=train_x, y=train_y)
    np.savez(folder / "test.npz", x=test_x, y=test_y)
    if classes is not None:
        (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    return folder


def _random_split(rng, n, size=12, channels=3, classes=3):
    shape = (n, size, size, channels) if channels else (n, size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8), (np.arange(n) % classes).astype(np.int64)


def test_npz_loads_nhwc_and_computes_stats(tmp_path):
    rng = np.random.default_rng(0)
    train, test = _random_split(rng, 30), _random_split(rng, 9)
    folder = _write_npz(tmp_path / "d", *train, *test)
    bundle = load_dataset(DataConfig(kind="npz", path=str(folder), image_size=12))
    assert bundle.num_classes == 3 and bundle.classes == ("0", "1", "2")
    image, label = bundle.train[4]
    assert torch.equal(image, torch.from_numpy(train[0][4]).permute(2, 0, 1))
    assert label == 1
    pixels = train[0].reshape(-1, 3) / 255
    assert np.allclose(bundle.mean, pixels.mean(0), atol=1e-5)
    assert np.allclose(bundle.std, pixels.std(0), atol=1e-5)


def test_npz_grey_classes_file_and_resize(tmp_path):
    rng = np.random.default_rng(1)
    train, test = (
        _random_split(rng, 8, channels=0, classes=2),
        _random_split(rng, 4, channels=0, classes=2),
    )
    folder = _write_npz(tmp_path / "d", *train, *test, classes=["cat", "dog", "emu"])
    bundle = load_dataset(DataConfig(kind="npz", path=str(folder), image_size=20))
    assert bundle.classes == ("cat", "dog", "emu") and bundle.num_classes == 3
    image, _ = bundle.test[0]
    assert image.shape == (3, 20, 20) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[2])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda tr, te: ((tr[0].astype(np.float32), tr[1]), te), "uint8"),
        (lambda tr, te: ((tr[0][..., :2], tr[1]), te), "1 or 3 channels"),
        (lambda tr, te: ((tr[0], tr[1][:-1]), te), "integer labels"),
        (lambda tr, te: (tr, (te[0], te[1] - 5)), "labels must be in 0..2"),
        (lambda tr, te: (tr, (te[0][:0], te[1][:0])), "test split is empty"),
    ],
)
def test_npz_malformed_arrays_raise_data_error(tmp_path, change, message):
    rng = np.random.default_rng(2)
    train, test = change(_random_split(rng, 6), _random_split(rng, 3))
    folder = _write_npz(tmp_path / "d", *train, *test)
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(kind="npz", path=str(folder)))


def test_npz_label_outside_classes_file_raises(tmp_path):
    rng = np.random.default_rng(3)
    folder = _write_npz(
        tmp_path / "d", *_random_split(rng, 6), *_random_split(rng, 3), classes=["a", "b"]
    )
    # the names file is what is short (issue 14), not the labels
    with pytest.raises(
        DataError, match=r"classes\.txt: names 2 classes, but the labels go up to \d"
    ):
        load_dataset(DataConfig(kind="npz", path=str(folder)))


def test_npz_missing_file_names_it(tmp_path):
    rng = np.random.default_rng(4)
    folder = _write_npz(tmp_path / "d", *_random_split(rng, 6), *_random_split(rng, 3))
    (folder / "test.npz").unlink()
    with pytest.raises(DataError, match=r"missing .*test\.npz"):
        load_dataset(DataConfig(kind="npz", path=str(folder)))


@pytest.mark.parametrize("kind", ["npz", "cifar10", "cifar100", "imagefolder"])
def test_missing_path_names_it(tmp_path, kind):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_dataset(DataConfig(kind=kind, path=str(missing)))


# --- CIFAR python format -----------------------------------------------------------------------


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_batch(rng, n, label_key, classes):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return {
        b"batch_label": b"fake",
        label_key: [int(k) for k in rng.integers(0, classes, n)],
        b"data": data,
    }


def _fake_cifar10(root: Path, rng) -> tuple[Path, list[dict]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [_cifar_batch(rng, 4, b"labels", 10) for _ in range(5)]
    for i, batch in enumerate(batches, start=1):
        _pickle(folder / f"data_batch_{i}", batch)
    _pickle(folder / "test_batch", _cifar_batch(rng, 3, b"labels", 10))
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return folder, batches


@pytest.mark.parametrize("use_parent", [True, False])
def test_cifar10_python_format(tmp_path, use_parent):
    folder, batches = _fake_cifar10(tmp_path, np.random.default_rng(5))
    path = folder.parent if use_parent else folder
    bundle = load_dataset(DataConfig(kind="cifar10", path=str(path)))
    assert (len(bundle.train), len(bundle.test)) == (20, 3)
    assert bundle.classes[0] == "airplane" and bundle.num_classes == 10
    assert (bundle.mean, bundle.std) == (CIFAR10_MEAN, CIFAR10_STD)
    image, label = bundle.train[5]  # second batch, second row
    assert torch.equal(image, torch.from_numpy(batches[1][b"data"][1].reshape(3, 32, 32)))
    assert label == batches[1][b"labels"][1]


def test_cifar10_python_format_resizes_and_checks(tmp_path):
    folder, _ = _fake_cifar10(tmp_path, np.random.default_rng(6))
    bundle = load_dataset(DataConfig(kind="cifar10", path=str(folder), image_size=16))
    assert bundle.train[0][0].shape == (3, 16, 16)
    _pickle(folder / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(
        DataError, match=r"data_batch_3: b'data' must be uint8 of shape \(N, 3072\)"
    ):
        load_dataset(DataConfig(kind="cifar10", path=str(folder)))
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR python-format batch"):
        load_dataset(DataConfig(kind="cifar10", path=str(folder)))
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="missing test_batch"):
        load_dataset(DataConfig(kind="cifar10", path=str(folder)))


def test_cifar100_python_format_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(7)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = _cifar_batch(rng, 6, b"fine_labels", 100)
    train[b"coarse_labels"] = [0] * 6
    _pickle(folder / "train", train)
    _pickle(folder / "test", _cifar_batch(rng, 2, b"fine_labels", 100))
    names = [f"class{k}".encode() for k in range(100)]
    _pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"x"] * 20})
    bundle = load_dataset(DataConfig(kind="cifar100", path=str(tmp_path)))
    assert bundle.num_classes == 100 and bundle.classes[99] == "class99"
    assert bundle.mean == CIFAR100_MEAN
    assert _labels(bundle.train) == train[b"fine_labels"]


def test_cifar10_accepts_an_npz_folder(tmp_path):
    rng = np.random.default_rng(8)
    folder = _write_npz(
        tmp_path / "c",
        *_random_split(rng, 10, size=32, classes=10),
        *_random_split(rng, 10, size=32, classes=10),
    )
    bundle = load_dataset(DataConfig(kind="cifar10", path=str(folder)))
    assert (len(bundle.train), bundle.num_classes) == (10, 10)


# --- ImageFolder -------------------------------------------------------------------------------


def _write_png(
    path: Path, size: tuple[int, int], color: tuple[int, int, int], mode: str = "RGB"
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).convert(mode).save(path)


def _image_tree(root: Path, test_name: str = "val") -> Path:
    for split, count in (("train", 3), (test_name, 1)):
        for k, cls in enumerate(("ant", "bee")):
            for i in range(count):
                _write_png(
                    root / split / cls / f"{i}.png",
                    (40, 20),
                    (200 * k, 50, 10 * i),
                    mode="L" if i == 2 else "RGB",
                )
    return root


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_imagefolder_decodes_resizes_and_crops(tmp_path, test_name):
    root = _image_tree(tmp_path / "imgs", test_name)
    bundle = load_dataset(DataConfig(kind="imagefolder", path=str(root), image_size=16))
    assert bundle.classes == ("ant", "bee") and bundle.num_classes == 2
    assert (len(bundle.train), len(bundle.test)) == (6, 2)
    assert bundle.mean == IMAGENET_MEAN
    image, label = bundle.train[3]  # bee/0.png: a flat (200, 50, 0) image
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and label == 1
    assert image[:, 8, 8].tolist() == [200, 50, 0]
    assert bundle.train[2][0].shape == (3, 16, 16)  # grey file converted to RGB
    images, labels = test_arrays(bundle)
    assert images.shape == (2, 3, 16, 16) and images.dtype == np.uint8 and labels.tolist() == [0, 1]


def test_imagefolder_loads_in_worker_processes(tmp_path):
    root = _image_tree(tmp_path / "imgs")
    cfg = DataConfig(kind="imagefolder", path=str(root), image_size=8, batch_size=4, workers=1)
    _, test = make_loaders(load_dataset(cfg), cfg, seed=0)
    images, labels = next(iter(test))
    assert (
        images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8 and labels.tolist() == [0, 1]
    )


def test_imagefolder_corrupt_file_names_it_before_training(tmp_path):
    root = _image_tree(tmp_path / "imgs")
    bad = root / "train" / "ant" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(
        DataError, match=re.escape(f"1 of 9 image files cannot be read (first: {bad}: ")
    ):
        load_dataset(DataConfig(kind="imagefolder", path=str(root)))


def test_imagefolder_file_deleted_during_a_run_is_named(tmp_path):
    root = _image_tree(tmp_path / "imgs")
    cfg = DataConfig(kind="imagefolder", path=str(root), image_size=8, batch_size=4)
    train, _ = make_loaders(load_dataset(cfg), cfg, seed=0)
    gone = root / "train" / "bee" / "1.png"
    gone.unlink()  # e.g. the dataset folder was cleaned up while training
    with pytest.raises(
        DataError, match=re.escape(f"cannot decode image {gone}: ") + ".*No such file"
    ):
        for _ in train:
            pass


def test_imagefolder_class_mismatch_and_missing_split(tmp_path):
    root = _image_tree(tmp_path / "imgs")
    _write_png(root / "val" / "cow" / "0.png", (8, 8), (1, 2, 3))
    with pytest.raises(DataError, match="differ from"):
        load_dataset(DataConfig(kind="imagefolder", path=str(root)))
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="val/<class>"):
        load_dataset(DataConfig(kind="imagefolder", path=str(empty)))


def test_imagefolder_directory_link_loop_is_refused_naming_it(tmp_path):
    """A loop (``train/ant/loop -> ..``) would walk the split again: bee images labelled ant."""
    root = _image_tree(tmp_path / "imgs")
    loop = root / "train" / "ant" / "loop"
    loop.symlink_to("..", target_is_directory=True)
    with pytest.raises(DataError, match=re.escape(f"{loop}: a directory link (to ..)")):
        load_dataset(DataConfig(kind="imagefolder", path=str(root)))
    loop.unlink()
    elsewhere = tmp_path / "more_ants"
    _write_png(elsewhere / "x.png", (8, 8), (1, 2, 3))
    (root / "val" / "ant" / "more").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DataError, match="more: a directory link"):  # out of the tree: refused too
        load_dataset(DataConfig(kind="imagefolder", path=str(root)))


def test_imagefolder_class_folder_links_must_not_overlap(tmp_path):
    """A class folder may be a link to a tree elsewhere, but not to the split or another class."""
    root = _image_tree(tmp_path / "imgs")
    outside = tmp_path / "cows"
    for split in ("train", "val"):
        _write_png(outside / split / "0.png", (8, 8), (1, 2, 3))
        (root / split / "cow").symlink_to(outside / split, target_is_directory=True)
    bundle = load_dataset(DataConfig(kind="imagefolder", path=str(root)))
    assert bundle.classes == ("ant", "bee", "cow") and len(bundle.train) == 7
    (root / "train" / "cow").unlink()
    (root / "train" / "cow").symlink_to(root / "train" / "bee", target_is_directory=True)
    with pytest.raises(DataError, match="overlaps class 'bee'"):
        load_dataset(DataConfig(kind="imagefolder", path=str(root)))
    (root / "train" / "cow").unlink()
    (root / "train" / "cow").symlink_to(root, target_is_directory=True)
    with pytest.raises(DataError, match="contains the split itself"):
        load_dataset(DataConfig(kind="imagefolder", path=str(root)))


# --- subsets -----------------------------------------------------------------------------------


def test_subsets_are_balanced_seeded_and_capped(digits):
    cfg = DataConfig(kind="digits", image_size=16, subset=SubsetConfig(train=95, test=5000))
    a, b, c = (load_dataset(cfg, seed=s) for s in (1, 1, 2))
    counts = Counter(_labels(a.train))
    assert sum(counts.values()) == 95 and max(counts.values()) - min(counts.values()) <= 1
    assert a.train.indices == b.train.indices and a.train.indices != c.train.indices
    assert len(a.test) == len(digits.test)  # larger than the split: the whole split
    small = DataConfig(kind="digits", image_size=16, subset=SubsetConfig(test=30))
    assert load_dataset(small, seed=1).test.indices == load_dataset(small, seed=2).test.indices


def _real_cifar10() -> Path:
    env = os.environ.get("COMPRESS_CIFAR10")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/cifar10"


@pytest.mark.skipif(
    not (_real_cifar10() / "train.npz").is_file(), reason="real CIFAR-10 copy not present"
)
def test_real_cifar10_subset():
    cfg = DataConfig(
        kind="cifar10", path=str(_real_cifar10()), subset=SubsetConfig(train=500, test=200)
    )
    bundle = load_dataset(cfg, seed=0)
    assert bundle.classes[0] == "airplane" and bundle.classes[9] == "truck"
    assert np.allclose(bundle.mean, CIFAR10_MEAN, atol=2e-4) and np.allclose(
        bundle.std, CIFAR10_STD, atol=2e-4
    )
    assert Counter(_labels(bundle.train)) == {k: 50 for k in range(10)}
    assert Counter(_labels(bundle.test)) == {k: 20 for k in range(10)}
    images, labels = test_arrays(bundle, limit=50)
    assert images.shape == (50, 3, 32, 32) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == _labels(bundle.test)[:50]
    assert torch.equal(torch.from_numpy(images[7]), bundle.test[7][0])


# --- loaders and preprocessing -----------------------------------------------------------------


def test_seeded_loaders_repeat_their_batches(digits):
    cfg = DataConfig(kind="digits", batch_size=100, eval_batch_size=64)
    first = [next(iter(make_loaders(digits, cfg, seed)[0])) for seed in (3, 3, 4)]
    assert first[0][0].dtype == torch.uint8 and first[0][0].shape == (100, 3, 16, 16)
    assert first[0][1].dtype == torch.int64
    assert torch.equal(first[0][0], first[1][0]) and torch.equal(first[0][1], first[1][1])
    assert not torch.equal(first[0][1], first[2][1])
    train, test = make_loaders(digits, cfg, seed=0)
    assert sum(len(y) for _, y in train) == len(digits.train)  # last partial batch kept
    images, labels = next(iter(test))
    assert torch.equal(labels, torch.tensor(_labels(digits.test)[:64]))


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_preprocess_eval_only_normalises():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    for prep, train in (
        (Preprocess(MEAN, STD, augment=True), False),
        (Preprocess(MEAN, STD, augment=False), True),
    ):
        out = prep(images, train=train)
        assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-6)


def _all_crops_and_flips(image: torch.Tensor, pad: int) -> torch.Tensor:
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (pad,) * 4)
    crops = [
        padded[:, i : i + h, j : j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)
    ]
    return torch.stack(crops + [c.flip(-1) for c in crops])


def test_preprocess_augments_each_image_independently():
    torch.manual_seed(0)
    image = torch.randint(1, 256, (3, 10, 10), dtype=torch.uint8)  # no zeros: padding is visible
    batch = image.expand(64, -1, -1, -1).contiguous()
    prep = Preprocess(MEAN, STD, augment=True, pad=2)
    out = prep(batch, train=True)
    assert out.shape == batch.shape and out.dtype == torch.float32
    candidates = prep(_all_crops_and_flips(image, pad=2), train=False)
    matches = [
        int(torch.isclose(o, candidates, atol=1e-6).flatten(1).all(1).nonzero()[0]) for o in out
    ]
    assert len(set(matches)) > 10  # per-image offsets and flips, not one for the whole batch
    assert {m >= len(candidates) // 2 for m in matches} == {True, False}  # some flipped, some not
    assert not torch.allclose(out, prep(batch, train=False))
    torch.manual_seed(0)
    torch.randint(1, 256, (3, 10, 10), dtype=torch.uint8)
    assert torch.equal(prep(batch, train=True), out)  # seeded by torch.manual_seed


# --- unlabeled pool ----------------------------------------------------------------------------


def _labeled_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    return _write_npz(tmp_path / "labeled", *_random_split(rng, 12), *_random_split(rng, 6))


def _with_pool(folder: Path, pool: Path, limit: int | None = None, **kwargs) -> DataConfig:
    return DataConfig(
        kind="npz",
        path=str(folder),
        image_size=12,
        unlabeled=UnlabeledConfig(str(pool), limit),
        **kwargs,
    )


def test_unlabeled_npz_is_appended_with_label_minus_one(tmp_path):
    folder = _labeled_npz(tmp_path)
    pool_x = np.random.default_rng(6).integers(
        0, 256, (7, 24, 24), dtype=np.uint8
    )  # NHW grey, resized
    np.savez(tmp_path / "pool.npz", x=pool_x)
    plain = load_dataset(DataConfig(kind="npz", path=str(folder), image_size=12))
    bundle = load_dataset(_with_pool(folder, tmp_path / "pool.npz"))
    assert plain.unlabeled == 0 and bundle.unlabeled == 7 and len(bundle.train) == 12 + 7
    assert _labels(bundle.train) == _labels(plain.train) + [UNLABELED] * 7 and UNLABELED == -1
    assert torch.equal(bundle.train[3][0], plain.train[3][0])
    image = bundle.train[12][0]
    assert (
        image.shape == (3, 12, 12)
        and image.dtype == torch.uint8
        and torch.equal(image[0], image[2])
    )
    assert _image_bytes(bundle.test) == _image_bytes(plain.test) and _labels(
        bundle.test
    ) == _labels(plain.test)
    assert (bundle.mean, bundle.num_classes) == (
        plain.mean,
        plain.num_classes,
    )  # stats from labeled train


def test_unlabeled_limit_is_seeded(tmp_path):
    folder = _labeled_npz(tmp_path)
    pool_x = (
        np.arange(20, dtype=np.uint8)[:, None, None, None].repeat(12, 1).repeat(12, 2).repeat(3, 3)
    )
    np.savez(tmp_path / "pool.npz", x=pool_x, y=np.zeros(20))  # extra arrays are ignored
    cfg = _with_pool(folder, tmp_path / "pool.npz", limit=5)
    a, b, c = (load_dataset(cfg, seed=s) for s in (1, 1, 2))

    def picked(bundle):
        return [int(bundle.train[i][0][0, 0, 0]) for i in range(12, len(bundle.train))]

    assert a.unlabeled == 5 and len(picked(a)) == 5 and picked(a) == sorted(picked(a))
    assert picked(a) == picked(b) and picked(a) != picked(c)
    assert load_dataset(_with_pool(folder, tmp_path / "pool.npz", limit=50)).unlabeled == 20


def test_unlabeled_folder_is_searched_recursively(tmp_path):
    folder = _labeled_npz(tmp_path)
    pool = tmp_path / "pool"
    for i, name in enumerate(("a.png", "sub/b.PNG", "sub/deeper/c.jpg", "d.bmp", "e.webp")):
        _write_png(pool / name, (30, 20), (10 * i, 100, 200), mode="L" if i == 1 else "RGB")
    (pool / "notes.txt").write_text("not an image")
    (pool / "sub" / "loop").symlink_to("..", target_is_directory=True)
    with pytest.raises(DataError, match="loop: a directory link"):  # rglob skips it silently
        load_dataset(_with_pool(folder, pool))
    (pool / "sub" / "loop").unlink()
    bundle = load_dataset(_with_pool(folder, pool))
    assert bundle.unlabeled == 5 and _labels(bundle.train)[12:] == [UNLABELED] * 5
    first = bundle.train[12][0]
    assert first.shape == (3, 12, 12) and first[:, 6, 6].tolist() == [0, 100, 200]  # a.png
    limited = load_dataset(_with_pool(folder, pool, limit=2, batch_size=8))
    assert limited.unlabeled == 2
    train, _ = make_loaders(limited, _with_pool(folder, pool, batch_size=8), seed=0)
    labels = torch.cat([y for _, y in train])
    assert sorted(labels.tolist())[:2] == [UNLABELED] * 2 and len(labels) == 14


def test_subset_applies_to_labeled_part_only(tmp_path):
    np.savez(tmp_path / "pool.npz", x=np.zeros((9, 8, 8, 3), dtype=np.uint8))
    cfg = DataConfig(
        kind="digits",
        image_size=16,
        subset=SubsetConfig(train=40),
        unlabeled=UnlabeledConfig(str(tmp_path / "pool.npz")),
    )
    bundle = load_dataset(cfg, seed=3)
    labels = _labels(bundle.train)
    assert len(labels) == 49 and labels[40:] == [UNLABELED] * 9
    assert Counter(labels[:40]) == {k: 4 for k in range(10)}
    both = balanced_subset(bundle.train, 22, seed=0)  # -1 is one more group, not an error
    assert Counter(_labels(both)) == {**{k: 2 for k in range(10)}, UNLABELED: 2}


def test_unlabeled_bad_inputs_name_the_path(tmp_path):
    folder = _labeled_npz(tmp_path)
    np.savez(tmp_path / "float.npz", x=np.zeros((2, 8, 8, 3), dtype=np.float32))
    np.savez(tmp_path / "flat.npz", x=np.zeros((2, 64), dtype=np.uint8))
    np.savez(tmp_path / "noimages.npz", y=np.zeros(2))
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for name, message in (
        ("missing.npz", "does not exist"), ("float.npz", "uint8"), ("flat.npz", "NHWC"),
        ("noimages.npz", "expected an array 'x'"), ("empty", "no image files"),
        ("file.txt", "not a .npz"),
    ):  # fmt: skip
        with pytest.raises(
            DataError, match=re.escape(str(tmp_path / name)) + ".*" + re.escape(message)
        ):
            load_dataset(_with_pool(folder, tmp_path / name))


def test_unlabeled_undecodable_file_names_it(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    bad = pool / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(
        DataError, match=re.escape(f"1 of 1 image files cannot be read (first: {bad}: ")
    ):
        load_dataset(_with_pool(_labeled_npz(tmp_path), pool))
