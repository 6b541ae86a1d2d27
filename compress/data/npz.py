"""A folder with ``train.npz`` and ``test.npz`` (``x``: NCHW or NHWC uint8 images,
``y``: labels)."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from compress.data.common import _check_labels, _existing_dir, _in_memory_bundle
from compress.data.containers import DatasetBundle
from compress.data.spec import DataConfig
from compress.errors import DataError, first_line

# the most classes a dataset may have (ImageNet-21k has 21,841): a label of 10^9 is refused
# before a name is made for every class below it
MAX_CLASSES = 100_000


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
        raise DataError(
            f"missing {file}: an npz dataset needs train.npz and test.npz (arrays x, y)"
        )
    x, y = _arrays(file, ("x", "y"), "arrays 'x' (images) and 'y' (labels)")
    return _npz_images(x, file), _npz_labels(y, len(x), file)


_ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive of .npy files


def _arrays(file: Path, names: tuple[str, ...], wanted: str) -> list[np.ndarray]:
    """The named arrays of an .npz file, never unpickling anything; a file that is empty, not a
    zip archive, truncated or holding object arrays is one DataError saying so."""
    try:
        with file.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise DataError(f"{file}: cannot read it ({exc.strerror or exc})") from None
    if head != _ZIP_MAGIC:
        what = "the file is empty" if not head else "it is not a zip archive of .npy arrays"
        raise DataError(
            f"{file}: not a valid numpy .npz archive ({what}); write it with numpy.savez"
        )
    try:
        _check_declared_sizes(file)
        with np.load(file, allow_pickle=False) as archive:
            missing = [name for name in names if name not in archive]
            if missing:
                raise DataError(
                    f"{file}: expected {wanted}, found {', '.join(archive.files) or 'no arrays'}"
                )
            return [archive[name] for name in names]
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc) or "Object arrays" in str(exc):
            raise DataError(
                f"{file}: holds object arrays (pickled Python objects), which are never loaded; "
                "save numeric arrays"
            ) from None
        raise DataError(f"{file}: not a valid numpy .npz archive ({first_line(exc)})") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"{file}: not a valid numpy .npz archive, or truncated ({type(exc).__name__}: "
            f"{first_line(exc)})"
        ) from None


def _check_declared_sizes(file: Path) -> None:
    """Every ``.npy`` member's header must declare exactly the bytes the member holds, read
    before numpy allocates the array it declares: a planted header of shape (10^7, 224, 224, 3)
    over 1 KB of data would otherwise ask for 1.4 TiB. Its read errors are :func:`_arrays`'s."""
    with zipfile.ZipFile(file) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(member)
                header = member.tell()
            if dtype.hasobject:
                continue  # refused when read (never unpickled)
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if declared != info.file_size - header:
                raise DataError(
                    f"{file}: array {info.filename[:-4]!r} declares shape {tuple(shape)} "
                    f"({declared:,} bytes) but holds {info.file_size - header:,} bytes; the "
                    "archive is corrupt or forged"
                )


def _npz_images(x: np.ndarray, file: Path) -> Tensor:
    if x.dtype != np.uint8:
        raise DataError(f"{file}: x must be uint8 pixels 0..255, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or 0 in x.shape[1:3]:
        raise DataError(
            f"{file}: x must be NHWC with 1 or 3 channels, or NHW grey, images at least 1x1; got "
            f"shape {x.shape}"
        )
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return images.expand(-1, 3, -1, -1).contiguous()


def _npz_labels(y: np.ndarray, count: int, file: Path) -> Tensor:
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (count,):
        raise DataError(
            f"{file}: y must be {count} integer labels (shape ({count},)), got {y.dtype} {y.shape}"
        )
    return torch.from_numpy(y.astype(np.int64))


def _npz_classes(folder: Path, *labels: Tensor) -> list[str]:
    names_file = folder / "classes.txt"
    if names_file.is_file():
        names = [
            line.strip()
            for line in names_file.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        if not names:
            raise DataError(f"{names_file}: expected one class name per line, found none")
        largest = max((int(y.max()) for y in labels if len(y)), default=-1)
        if largest >= len(names):
            raise DataError(
                f"{names_file}: names {len(names)} classes, but the labels go up to {largest}; "
                "give one name per class, one per line"
            )
        return names
    largest = max((int(y.max()) for y in labels if len(y)), default=-1)
    if largest >= MAX_CLASSES:
        raise DataError(
            f"{folder}: the labels go up to {largest:,}; expected class indices 0..K-1 with K at "
            f"most {MAX_CLASSES:,}"
        )
    return [str(k) for k in range(largest + 1)]


def _check_same_size(train_x: Tensor, test_x: Tensor, folder: Path) -> None:
    if len(train_x) and len(test_x) and train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"{folder}: train and test images differ in shape ({tuple(train_x.shape[1:])} vs "
            f"{tuple(test_x.shape[1:])})"
        )


def _read_unlabeled_npz(file: Path) -> np.ndarray:
    (x,) = _arrays(file, ("x",), "an array 'x' (unlabeled images)")
    if (
        x.dtype != np.uint8
        or x.ndim not in (3, 4)
        or (x.ndim == 4 and x.shape[-1] not in (1, 3))
        or 0 in x.shape[1:3]
    ):
        raise DataError(
            f"{file}: x must be uint8 NHWC with 1 or 3 channels, or NHW grey, images at least "
            f"1x1; got {x.dtype} {x.shape}"
        )
    if len(x) == 0:
        raise DataError(f"{file}: x holds no images")
    return x
