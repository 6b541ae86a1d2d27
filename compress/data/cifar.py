"""CIFAR-10/100 in the official python format, unpickled with an allow-list (no code runs)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from compress.data.common import _check_labels, _existing_dir, _in_memory_bundle
from compress.data.containers import DatasetBundle
from compress.data.npz import load_npz
from compress.data.spec import DataConfig
from compress.errors import DataError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


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
    "cifar-100-python",
    ("train",),
    "test",
    "meta",
    b"fine_labels",
    b"fine_label_names",
    CIFAR100_MEAN,
    CIFAR100_STD,
)


def load_cifar10(cfg: DataConfig) -> DatasetBundle:
    """CIFAR-10 from ``cifar-10-batches-py/`` (or its parent), or a train.npz/test.npz folder."""
    folder = _existing_dir(cfg.path, "cifar10")
    if (folder / "train.npz").is_file() and (folder / "test.npz").is_file():
        return load_npz(cfg)
    return _load_cifar(folder, _CIFAR10, cfg.image_size)


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
    [
        (f"numpy.{core}.multiarray", name)
        for core in ("core", "_core")
        for name in ("_reconstruct", "scalar")
    ]
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
            f"{file}: refused: unpickling it would import {exc}, and a CIFAR python-format file "
            "holds only arrays, lists, bytes and numbers"
        ) from None
    except Exception as exc:  # a file that is not a pickle fails the unpickler in many ways
        raise DataError(
            f"{file}: not a CIFAR python-format batch ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(content, dict):
        raise DataError(
            f"{file}: expected a pickled dict (CIFAR python format), got {type(content).__name__}"
        )
    return content


def _cifar_batch(file: Path, label_key: bytes) -> tuple[Tensor, Tensor]:
    content = _unpickle(file)
    if b"data" not in content or label_key not in content:
        raise DataError(f"{file}: expected keys b'data' and {label_key!r}")
    data, labels = np.asarray(content[b"data"]), np.asarray(content[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{file}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{file}: {label_key!r} must be {len(data)} integer labels, got {labels.dtype} "
            f"{labels.shape}"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # rows are already CHW
    return images, torch.from_numpy(labels.astype(np.int64))


def _cifar_names(file: Path, names_key: bytes) -> list[str]:
    content = _unpickle(file)
    names = content.get(names_key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{file}: expected a non-empty list of class names under {names_key!r}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
