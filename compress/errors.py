"""User-facing errors.

Anything a user can cause (a bad recipe, a missing file, a corrupt checkpoint) raises a
subclass of :class:`CompressError`. The CLI prints its one-line message and exits with
``exit_code`` (2) without a traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CompressError(Exception):
    """Base of every error caused by user input; its message is the whole explanation."""

    exit_code = 2


class RecipeError(CompressError):
    """A recipe field is unknown, mistyped, out of range or points to a missing file."""


class DataError(CompressError):
    """A dataset is missing, malformed or does not match what the recipe says."""


class ModelError(CompressError):
    """An unknown model name or a checkpoint that does not fit the model."""


class StageError(CompressError):
    """A stage could not do its job (e.g. its inputs are missing or training diverged)."""


class ExportError(CompressError):
    """An export failed, or the exported file does not reproduce the PyTorch model."""
