"""The stages a recipe lists. Each is one function ``stage(cfg, ctx) -> Artifact`` in its own
module, declared with its config class and needs in :data:`compress.pipeline.config.STAGE_KINDS`."""

from __future__ import annotations

from collections.abc import Callable

from compress.core.registry import load_entry
from compress.pipeline.config import STAGE_KINDS


def stage_function(kind: str) -> Callable:
    """The function that runs stage ``kind``, imported on first use."""
    return load_entry(STAGE_KINDS[kind].run)
