"""Atomic file writes, bounded reads and content hashes, shared by every stage that leaves an
artifact or reads one back.

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
import stat
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
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename in (None, str(tmp), tmp_name):  # name the file the user knows (disk full)
            exc.filename = str(path)
        raise
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


# A file too large for its own format continues in a sidecar beside it: an ONNX file over
# protobuf's 2 GiB keeps its weights in ``<name>.onnx.data`` (compress.exporters.onnx.files).
SIDECAR_SUFFIX = ".data"


def sidecar(path: str | os.PathLike) -> Path:
    """Where the rest of a file too large for its format lies: ``<name>.data`` beside it."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def file_parts(path: str | os.PathLike) -> list[Path]:
    """The file, and its :func:`sidecar` when it has one."""
    path = Path(path)
    return [path, *(part for part in [sidecar(path)] if part.is_file())]


def content_sha256(path: str | os.PathLike) -> str:
    """:func:`sha256_file` of a file, or of it and its sidecar (the SHA-256 of both digests): a
    changed sidecar is a changed file."""
    digests = [sha256_file(part) for part in file_parts(path)]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def content_bytes(path: str | os.PathLike) -> int:
    """A file's size on disk, its sidecar's included."""
    return sum(part.stat().st_size for part in file_parts(path))


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


# the largest text record the tool reads back (stage records, bench results, baselines, recipes):
# the biggest it writes is a bench.json of a few hundred KB
MAX_RECORD_BYTES = 64 << 20


class UnreadableFile(ValueError):
    """A file the tool reads back is not what a record can be (not a regular file, too large,
    not text, nested beyond what can be parsed); the message says which, without the path
    (the caller names the file)."""


def not_a_file(path: str | os.PathLike) -> str | None:
    """None if ``path`` leads to a regular file (links followed); else what is there, in words
    for an error line: "no such file", "a FIFO, not a file", "a device, not a file"...

    Why: ``/dev/zero`` or a FIFO given as a model or a record was reported as "no such file",
    which sends the user looking for a file that is there (issue 28)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None if stat.S_ISREG(info.st_mode) else _kind(info.st_mode)


def _kind(mode: int) -> str:
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a folder"
        if stat.S_ISDIR(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    return f"{kind}, not a file"


def read_text_bounded(path: str | os.PathLike, *, max_bytes: int = MAX_RECORD_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``.

    Why: a FIFO planted as ``stage.json`` made every command that reads it hang, and a link to
    ``/dev/zero`` read until memory ran out (issue 28). ``stat`` follows links, so what the path
    leads to is checked, and no more than ``max_bytes + 1`` bytes are ever read.

    Raises:
        OSError: the file is missing or cannot be opened.
        UnreadableFile: not a regular file, larger than ``max_bytes``, or not UTF-8.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableFile(_kind(info.st_mode))
    if info.st_size > max_bytes:
        raise UnreadableFile(f"{info.st_size:,} bytes; a record is at most {max_bytes:,}")
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnreadableFile(f"more than {max_bytes:,} bytes; a record is at most that")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnreadableFile("not a text file: not UTF-8") from None


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_RECORD_BYTES) -> Any:
    """:func:`read_text_bounded`, parsed as JSON.

    Raises:
        OSError: the file is missing or cannot be opened.
        UnreadableFile: as :func:`read_text_bounded`, or nested too deep to parse (a JSON of
            100,000 levels raised RecursionError through every command).
        ValueError: not JSON (``json.JSONDecodeError``).
    """
    text = read_text_bounded(path, max_bytes=max_bytes)
    try:
        return json.loads(text)
    except RecursionError:
        raise UnreadableFile("JSON nested deeper than a record can be") from None
