"""A recipe back to plain data: the resolved ``recipe.yaml`` of a run and the input keys of its
stages."""

from __future__ import annotations

import dataclasses
from typing import Any

from compress import config as C


def recipe_to_dict(recipe: C.Recipe) -> dict:
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
    if isinstance(value, C.LossConfig):
        return {"name": value.name, "weight": value.weight, **_plain(value.params)}
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
