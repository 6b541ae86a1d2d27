"""Atomic file writes and content hashes, shared by every stage that leaves an artifact.

A run can be interrupted at any moment (Ctrl-C, out of memory, a crashed GPU driver). A reader
must then find either the previous version of a file or the complete new one, never half of
it: we write a temporary file in the same folder (same file system, so the rename is atomic),
flush and fsync it, then ``os.replace`` it over the target. On any failure the temporary file is
removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it over ``path`` when the block succeeds.

    For writers that insist on a file name (``torch.save``, ``onnx.save``). Whatever happens
    inside the block, including KeyboardInterrupt, no temporary file is left behind.

    Args:
        path: the final destination; its folder must exist.

    Yields:
        A fresh, empty temporary file in the same folder.

    Example:
        >>> with atomic_path(run / "model.pt") as tmp:
        ...     torch.save(state, tmp)
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, _default_mode())  # mkstemp makes it 0600; give it a normal file's mode
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring).

    Args:
        path: destination file; its folder must exist.
        data: the complete new content.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically.

    Args:
        path: destination file; its folder must exist.
        text: the complete new content.
        encoding: text encoding.

    Returns:
        ``path`` as a Path.
    """
    return write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Serialise ``obj`` as JSON and write it atomically.

    Serialising happens before the file is touched, so an object that is not JSON-able raises
    TypeError and leaves the old file as it was. Paths are written as strings.

    Args:
        path: destination file; its folder must exist.
        obj: JSON-serialisable data; ``pathlib.Path`` values and numpy scalars/arrays are
            converted.
        indent: pretty-printing indent.

    Returns:
        ``path`` as a Path.
    """
    text = json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n"
    return write_text_atomic(path, text)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in chunks so large weights do not fill memory.

    Args:
        path: the file to hash.
        chunk_size: bytes read at a time.

    Returns:
        The 64-character hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays, without importing numpy here
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")
