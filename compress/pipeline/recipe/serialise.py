"""A recipe back to plain data: the resolved ``recipe.yaml`` of a run and the input keys of its
stages."""

from __future__ import annotations

import dataclasses
from typing import Any

from compress.core.fields import ADDED_LATER, default_of
from compress.pipeline.config import Recipe
from compress.training.spec import LossConfig


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data (what gets written next to every artifact)."""
    out = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if f.name == "stages":
            out["stages"] = [
                {s.kind: ({"name": s.name} if s.name != s.kind else {}) | _plain(s.config)}
                for s in value
            ]
        else:
            out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, LossConfig):
        return {"name": value.name, "weight": value.weight, **_plain(value.params)}
    if dataclasses.is_dataclass(value):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not _unchanged_addition(f, getattr(value, f.name))
        }
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _unchanged_addition(f: dataclasses.Field, value: Any) -> bool:
    """A field added after runs were recorded (marked ``ADDED_LATER``) still at its default: it is
    left out, so the input keys of finished stages, which never saw it, stay the same and an
    upgrade does not rerun them."""
    if not f.metadata.get(ADDED_LATER):
        return False
    default = default_of(f)
    return value == default
