"""Raw YAML mappings to the frozen config dataclasses, field by field: unknown keys get a "did
you mean", wrong types name the field's full path (``stages[1].distill.train.epochs``)."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any

from compress.core.fields import default_of
from compress.errors import RecipeError
from compress.pipeline.config import STAGE_KINDS, DistillConfig, StageSpec
from compress.training.loss_params import LOSSES
from compress.training.spec import LossConfig

_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


def _build_stages(raw: Any) -> tuple[StageSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RecipeError(
            "stages: expected a list of stage names or {name: settings} mappings, got "
            f"{_kind(raw)}"
        )
    return tuple(_build_stage(item, index) for index, item in enumerate(raw))


def _stage_name_and_settings(item: Any, index: int) -> tuple[str, Any]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and len(item) == 1:
        name, settings = next(iter(item.items()))
        return str(name), {} if settings is None else settings
    raise RecipeError(
        f"stages[{index}]: expected a stage name or a one-key mapping {{name: settings}}, got "
        f"{_kind(item)}"
    )


def _build_stage(item: Any, index: int) -> StageSpec:
    kind, settings = _stage_name_and_settings(item, index)
    if kind not in STAGE_KINDS:
        raise RecipeError(
            f"stages[{index}]: unknown stage {kind!r}{_did_you_mean(kind, STAGE_KINDS)}; known: "
            f"{', '.join(STAGE_KINDS)}"
        )
    name = kind
    if isinstance(settings, dict) and "name" in settings:
        settings = dict(settings)
        name = settings.pop("name")
        if not isinstance(name, str) or not _STAGE_NAME.fullmatch(name):
            raise RecipeError(
                f"stages[{index}].{kind}.name: expected letters, digits, '_' or '-' (a folder in "
                f"the run folder, max 100 chars), got {name!r}"
            )
    where = f"stages[{index}].{name}"
    return StageSpec(name, _build(STAGE_KINDS[kind].config, settings, where), kind)


_TEACHING_CONFIGS = tuple(kind.config for kind in STAGE_KINDS.values() if kind.teaches)


def section_from_dict(cls: type, raw: Any, path: str) -> Any:
    """One recipe section (e.g. ``DataConfig`` from a stage record's resolved recipe), checked
    like a whole recipe: unknown keys and wrong types are a RecipeError naming ``path``."""
    return _build(cls, raw, path)


def _build(cls: type, raw: Any, path: str, base: Any = None) -> Any:
    """``cls`` from the mapping ``raw``; with ``base`` (an instance), ``raw`` only changes the
    fields it names."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {_kind(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in raw.items():
        where = _join(path, _show_key(key))
        if key not in names:
            raise RecipeError(
                f"{where}: unknown field{_did_you_mean(str(key), names)}; expected one of: "
                f"{', '.join(names)}"
            )
        is_loss = (
            key == "loss"
            and cls in _TEACHING_CONFIGS
            and not (value is None and cls is not DistillConfig)
        )
        partial = value is None or isinstance(value, dict)
        section = _section_default(fields[key]) if partial else None
        if is_loss:
            kwargs[key] = _losses(value, where)
        elif section is not None:
            kwargs[key] = _build(type(section), value, where, base=section)
        else:
            kwargs[key] = _convert(hints[key], value, where)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except RecipeError as exc:
        raise RecipeError(_join(path, str(exc))) from None


def _section_default(field: dataclasses.Field) -> Any:
    """The default of a field that is a section of its own (a dataclass), else None: a partial
    section in a recipe changes only what it names, so ``quantize: {train: {epochs: 2}}`` keeps
    QAT's own learning rate instead of falling back to ``TrainConfig``'s."""
    value = default_of(field)
    return value if dataclasses.is_dataclass(value) and not isinstance(value, type) else None


def _losses(raw: Any, path: str) -> tuple[LossConfig, ...]:
    """``loss: kd``, ``loss: {name: kd, ...}`` or a list of such terms."""
    if isinstance(raw, list):
        if not raw:
            raise RecipeError(f"{path}: expected at least one loss term")
        return tuple(_loss(item, f"{path}[{index}]") for index, item in enumerate(raw))
    return (_loss(raw, path),)


def _loss(raw: Any, path: str) -> LossConfig:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path}: expected a loss name or a mapping with 'name' and its parameters, got "
            f"{_kind(raw)}"
        )
    raw = dict(raw)
    name = raw.pop("name", "kd")
    weight = _convert(float, raw.pop("weight", 1.0), f"{path}.weight")
    if not isinstance(name, str) or name not in LOSSES:
        raise RecipeError(f"{path}.name: {LOSSES.unknown_message(str(name))}")
    try:
        return LossConfig(
            name=name, weight=weight, params=_build(LOSSES.get(name).params, raw, path)
        )
    except RecipeError as exc:
        if str(exc).startswith(path):
            raise
        raise RecipeError(_join(path, str(exc))) from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise RecipeError(f"{path}: expected {_describe(hint)}, got null")
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except RecipeError:
                continue
        raise RecipeError(f"{path}: expected {_describe(hint)}, got {_kind(value)} {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise RecipeError(
                f"{path}: expected a list of {_describe(item_hint)}, got {_kind(value)}"
            )
        return tuple(
            _convert(item_hint, item, f"{path}[{index}]") for index, item in enumerate(value)
        )
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is typing.Any:
        return value
    raise RecipeError(f"{path}: expected {_describe(hint)}, got {_kind(value)} {value!r}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "null",
    }.get(hint, "a mapping" if dataclasses.is_dataclass(hint) else str(hint))


def _kind(value: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show_key(key: Any) -> str:
    """A key as written in a field path: quoted when it is empty, not text, or holds blanks or
    control characters (a key with a line break must not break a one-line error)."""
    plain = isinstance(key, str) and key and key.isprintable() and key.strip() == key
    return key if plain else repr(key)


def _join(path: str, rest: str) -> str:
    return f"{path}.{rest}" if path else rest
