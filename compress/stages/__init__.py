"""The stages a recipe lists, by name. Each is one function ``stage(cfg, ctx) -> Artifact``.

Importing a stage module registers it; this package imports them all so the registry is full.
"""

from __future__ import annotations

from collections.abc import Callable

from compress.errors import RecipeError
from compress.registry import Registry

STAGES: Registry[Callable] = Registry("stage", RecipeError)

from compress.stages import bench, distill, export, prune, quantize, teacher  # noqa: E402,F401
