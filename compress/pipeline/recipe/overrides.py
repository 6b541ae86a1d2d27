"""``--set key.path=value`` and the shorthand flags (``--data``, ``--epochs``, ...), applied to
the raw mapping before validation so they are checked exactly like the file."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from compress.errors import RecipeError
from compress.pipeline.config import STAGE_KINDS
from compress.pipeline.recipe.convert import _did_you_mean, _kind, _stage_name_and_settings
from compress.pipeline.recipe.yamlio import YamlProblem, load_yaml


def apply_shorthands(
    raw: dict, *, data=None, epochs=None, subset=None, device=None, out=None
) -> dict:
    """The CLI's short options, written as the equivalent ``--set`` overrides."""
    items = []
    if data is not None:
        items.append(("data.path", data))
    if device is not None:
        items.append(("device", device))
    if out is not None:
        items.append(("out", out))
    if subset is not None:
        items += [("data.subset.train", subset[0]), ("data.subset.test", subset[1])]
    if epochs is not None:
        items.append(("teacher.train.epochs", epochs))
        for index, item in enumerate(raw.get("stages") or []):
            name, settings = (
                _stage_name_and_settings(item, index)
                if isinstance(item, (str, dict))
                else (None, None)
            )
            if name in STAGE_KINDS and "train" in {
                f.name for f in dataclasses.fields(STAGE_KINDS[name].config)
            }:
                items.append((f"stages.{index}.train.epochs", epochs))
    for key, value in items:
        raw = _set(raw, key.split("."), value, key)
    return raw


def apply_override(raw: dict, item: str) -> dict:
    """Apply one ``key.path=value`` override; the value is parsed as YAML (``3``, ``0.1``,
    ``null``)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(
            f"--set {item!r}: expected key.path=value, e.g. stages.distill.train.epochs=3"
        )
    try:
        value = load_yaml(text)
    except YamlProblem as exc:
        raise RecipeError(f"--set {item!r}: {exc}") from None
    except (yaml.YAMLError, ValueError, RecursionError):
        raise RecipeError(f"--set {item!r}: the value is not valid YAML") from None
    return _set(raw, key.strip().split("."), value, item)


def _set(node: Any, keys: list[str], value: Any, item: str) -> Any:
    """Return a copy of ``node`` with ``value`` at ``keys``, creating mappings as needed."""
    if not keys:
        return value
    head, rest = keys[0], keys[1:]
    if isinstance(node, list):
        index = _stage_index(node, head, item)
        copy = list(node)
        name, settings = _stage_name_and_settings(copy[index], index)
        copy[index] = (
            {
                name: _set(
                    dict(settings) if isinstance(settings, dict) else settings, rest, value, item
                )
            }
            if rest
            else value
        )
        return copy
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise RecipeError(f"--set {item!r}: {head!r} is inside a {_kind(node)}, not a mapping")
    copy = dict(node)
    copy[head] = _set(copy.get(head), rest, value, item)
    return copy


def _stage_index(stages: list, key: str, item: str) -> int:
    if key.isdigit():
        if int(key) >= len(stages):
            raise RecipeError(
                f"--set {item!r}: the recipe has {len(stages)} stages, no index {key}"
            )
        return int(key)
    names = [_instance_name(item, index) for index, item in enumerate(stages)]
    if key not in names:
        raise RecipeError(
            f"--set {item!r}: no stage {key!r} in the recipe{_did_you_mean(key, names)}; stages: "
            f"{', '.join(names)}"
        )
    return names.index(key)


def _instance_name(item: Any, index: int) -> str:
    kind, settings = _stage_name_and_settings(item, index)
    name = settings.get("name") if isinstance(settings, dict) else None
    return name if isinstance(name, str) else kind


def parse_subset(text: str | None) -> tuple[int | None, int | None] | None:
    """``--subset N`` or ``--subset N,M`` -> (train, test); M defaults to N // 4 (at least 100)."""
    if text is None:
        return None
    parts = str(text).split(",")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) <= 0:
        raise RecipeError(f"--subset: expected N or N,M (positive integers), got {text!r}")
    train = numbers[0]
    test = numbers[1] if len(numbers) == 2 else max(100, train // 4)
    return train, test
