"""User-facing errors.

Anything a user can cause (a bad recipe, a missing file, a corrupt checkpoint) raises a
subclass of :class:`CompressError`. The CLI prints its one-line message and exits with
``exit_code`` (2) without a traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

# torch's DataLoader re-raises a worker's error with this text
_WORKER_MARK = "\nOriginal Traceback"


class CompressError(Exception):
    """Base of every error caused by user input; its message is the whole explanation.

    A DataLoader worker process cannot hand its exception over as it is: torch re-raises it in
    the main process as ``type(exc)(message)``, the message being "Caught X in DataLoader worker
    process N." followed by the worker's whole traceback. Such a message is cut back to the
    worker's own one line here and the worker's traceback becomes a note (``--debug`` shows it),
    so the CLI still prints one line. Any other line break (from a key or path in the recipe) is
    written as ``\\n``.
    """

    exit_code = 2

    def __init__(self, message: object = "", *args: object):
        text = str(message)
        if _WORKER_MARK in text:
            last = text.rstrip().splitlines()[-1]
            prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
            super().__init__(last.removeprefix(prefix), *args)
            self.add_note(text)
        else:  # a user's value with a line break in it must not break the one-line contract
            super().__init__(
                _bounded(text.replace("\r", "\\r").replace("\n", "\\n"))
                if isinstance(message, str)
                else message,
                *args,
            )


MAX_MESSAGE = 600  # characters of one error line: a 5 MB value from a recipe is not echoed whole


def _bounded(text: str) -> str:
    """The message, its middle elided when it is longer than MAX_MESSAGE (the head names the
    field, the tail usually says what is expected)."""
    if len(text) <= MAX_MESSAGE:
        return text
    keep = (MAX_MESSAGE - 30) // 2
    return f"{text[:keep]} ...[{len(text) - 2 * keep:,} characters]... {text[-keep:]}"


class SettingError(CompressError):
    """A setting given to a library function (a layer pattern, a target, a range) is unknown or
    does not fit the model: what a recipe field would say, without a recipe."""


class RecipeError(SettingError):
    """A recipe field is unknown, mistyped, out of range or points to a missing file."""


class DataError(CompressError):
    """A dataset is missing, malformed or does not match what the recipe says."""


class ModelError(CompressError):
    """An unknown model name or a checkpoint that does not fit the model."""


class StageError(CompressError):
    """A stage could not do its job (e.g. its inputs are missing or training diverged)."""


class ExportError(CompressError):
    """An export failed, or the exported file does not reproduce the PyTorch model."""


class UnprovableNetworkError(ExportError):
    """The file cannot be judged either way: the PyTorch network's own outputs move, under
    inputs and layer outputs changed at float32's precision, by as much as the file differs (a
    barely trained network with near-equal logits). Nothing is known to be wrong with the file;
    the network needs training before its export can be proven."""


class OutputError(CompressError):
    """An output could not be written: a full disk, a read-only or unwritable folder."""


WRITE_ERRNOS = {
    "ENOSPC": "the disk is full",
    "EDQUOT": "the disk quota is exceeded",
    "EIO": "an I/O error while writing",
    "EROFS": "the file system is read-only",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
}


def output_error(exc: OSError) -> OutputError | None:
    """The one-line error for an OSError that means "cannot write here", else None (a bug or an
    input problem keeps its traceback). Atomic writes leave the previous file intact."""
    import errno

    name = errno.errorcode.get(exc.errno or -1)
    if name not in WRITE_ERRNOS:
        return None
    where = f" {exc.filename}" if exc.filename else ""
    return OutputError(
        f"cannot write{where}: {WRITE_ERRNOS[name]} (files written before are intact; free space "
        "or fix the folder, then run the same command to resume)"
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, colour codes removed, at most
    ``limit`` characters (a third-party traceback becomes one line of our error)."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
