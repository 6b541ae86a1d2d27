"""YAML recipe -> validated, frozen :class:`~compress.config.Recipe`.

The YAML is read with ``yaml.safe_load`` (no code-executing tags) and every mapping is checked
against its dataclass: unknown keys get a "did you mean", wrong types and out-of-range values
name the field's full path (``stages[1].distill.train.epochs``). Command-line overrides are
applied to the raw mapping before validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import torch
import yaml

from compress import config as C
from compress.errors import RecipeError
from compress.losses import LOSSES

# Names that become folders under ``out``: no separators, no "..", no hidden or empty names. A
# stage folder sits beside run files (recipe.yaml, report.md, student.onnx), so it has no dot.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
_PATH_FIELDS = ("out", "data.path", "data.unlabeled.path", "teacher.checkpoint", "gates.baseline")
_MAX_SEED = 2**32 - 1  # what numpy's seeding accepts; torch takes more


def load_recipe(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    data: str | None = None,
    epochs: int | None = None,
    subset: tuple[int | None, int | None] | None = None,
    device: str | None = None,
    out: str | None = None,
) -> C.Recipe:
    """Read, override and validate a recipe.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings (value parsed as YAML), applied in order;
            stages are addressed by name (``stages.distill.train.epochs=3``) or index.
        data, epochs, subset, device, out: the CLI's shorthand overrides: dataset path, the
            epochs of every training section, (train, test) subset sizes, device, output root.

    Returns:
        The validated recipe.

    Raises:
        RecipeError: with the field path and what is expected.
    """
    path = Path(path)
    raw = _read_yaml(path)
    raw = apply_shorthands(raw, data=data, epochs=epochs, subset=subset, device=device, out=out)
    for item in overrides:
        raw = apply_override(raw, item)
    recipe = recipe_from_dict(raw, source=path.name)
    check_references(recipe)
    return recipe


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:  # what PyYAML's constructor does not wrap
        raise RecipeError(f"{path}: not a usable recipe: {_yaml_limit(exc)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of recipe fields at the top level, got {_kind(raw)}")
    return raw


def _yaml_limit(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    return f"a value cannot be read ({str(exc).split(';')[0]})"


def recipe_from_dict(raw: Any, source: str = "recipe") -> C.Recipe:
    """Validate a plain mapping (as read from YAML) into a :class:`Recipe`."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected a mapping at the top level, got {_kind(raw)}")
    raw = dict(raw)
    stages_raw = raw.pop("stages", None)
    if "name" not in raw:
        raise RecipeError(f"{source}: name: missing; every recipe names its run (used as the output folder)")
    recipe = _build(C.Recipe, raw, "")
    stages = _build_stages(stages_raw)
    recipe = dataclasses.replace(recipe, stages=stages)
    _check_recipe(recipe)
    return recipe


def _check_recipe(recipe: C.Recipe) -> None:
    if not _RUN_NAME.fullmatch(recipe.name):
        raise RecipeError(f"name: expected letters, digits, '.', '_' or '-' (a folder name, max 100 chars), got {recipe.name!r}")
    if not 0 <= recipe.seed <= _MAX_SEED:
        raise RecipeError(f"seed: expected 0..{_MAX_SEED}, got {recipe.seed}")
    for field in _PATH_FIELDS:
        value = _field(recipe, field)
        if value is not None and (not value.strip() or "\0" in value):
            raise RecipeError(f"{field}: expected a file or folder path, got {value!r}")
    if not recipe.stages:
        raise RecipeError(f"stages: expected a non-empty list, e.g. [teacher, distill, export, bench]; known stages: {', '.join(C.STAGE_CONFIGS)}")
    kinds: list[str] = []
    models: list[str] = []  # names of earlier stages that produced a network
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}].{stage.name}"
        for need in C.STAGE_NEEDS[stage.kind]:
            if need not in kinds:
                raise RecipeError(f"{where}: needs a {need!r} stage before it")
        if stage.name in [s.name for s in recipe.stages[:index]]:
            raise RecipeError(f"{where}: the name {stage.name!r} appears twice; give repeated stages a distinct `name:`")
        if stage.kind in C.TEACHING_STAGES:
            _check_teaching_stage(recipe, stage, where, models)
        kinds.append(stage.kind)
        if stage.kind in C.MODEL_STAGES:
            models.append(stage.name)
    teacher = recipe.teacher
    if "teacher" in kinds and teacher.checkpoint is None and teacher.train.epochs < 1:
        raise RecipeError("teacher: give a checkpoint to load or train.epochs >= 1 to train one")


def _field(node: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        node = getattr(node, name)
    return node


def _check_teaching_stage(recipe: C.Recipe, stage: C.StageSpec, where: str, models: list[str]) -> None:
    cfg = stage.config
    if cfg.teacher not in models:
        raise RecipeError(f"{where}.teacher: expected an earlier stage that trains a network ({', '.join(models)}), got {cfg.teacher!r}")
    if cfg.train.label_smoothing > 0:
        raise RecipeError(f"{where}.train.label_smoothing: applies to teacher training only; a {stage.kind} stage's hard-label term is its `ce`/`kd` loss")
    if stage.kind == "distill" and cfg.cache_teacher_logits:
        _check_cacheable(recipe, cfg, where)
    if stage.kind == "quantize":
        for index, term in enumerate(cfg.loss or ()):
            if getattr(term.params, "pairs", ()):
                raise RecipeError(
                    f"{where}.loss[{index}]: {term.name!r} reads intermediate layers, which BatchNorm folding removes or renames "
                    "in the quantized graph; use logit terms (kd, logit_mse, hybrid, dkd, ce) for quantization-aware training"
                )


def _check_cacheable(recipe: C.Recipe, cfg: C.DistillConfig, where: str) -> None:
    """Cached teacher logits are only right when the teacher sees each image identically every epoch."""
    mix = cfg.augment
    reasons = []
    if recipe.data.augment:
        reasons.append("data.augment is on")
    if mix.cutout or (mix.prob > 0 and (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0)):
        reasons.append("augment mixes or erases images")
    if any(getattr(term.params, "pairs", ()) for term in cfg.loss):
        reasons.append("a feature term reads teacher layers every step")
    if reasons:
        raise RecipeError(f"{where}.cache_teacher_logits: needs identical teacher inputs every epoch, but {' and '.join(reasons)}")


def recipe_warnings(recipe: C.Recipe) -> list[str]:
    """Legal settings that are probably mistakes; the CLI prints them, nothing is changed."""
    warnings = []
    smoothing = recipe.teacher.train.label_smoothing
    if smoothing > 0 and any(s.kind == "distill" for s in recipe.stages):
        warnings.append(
            f"teacher.train.label_smoothing={smoothing}: a teacher trained with label smoothing makes a worse "
            "distillation teacher (Muller, Kornblith & Hinton 2019, 'When does label smoothing help?'); use 0 unless you measured otherwise"
        )
    return warnings


def check_references(recipe: C.Recipe) -> None:
    """Models, files, folders and the device the recipe names must exist before anything runs."""
    from compress.models import MODELS

    resolve_device(recipe.device)

    for section in ("teacher", "student"):
        name = getattr(recipe, section).model
        if name not in MODELS:
            raise RecipeError(f"{section}.model: {MODELS.unknown_message(name)}")
    check_layer_names(recipe)
    if recipe.data.path is not None and not _path_is(recipe.data.path, "exists", "data.path"):
        raise RecipeError(f"data.path: no such file or folder: {recipe.data.path}")
    if recipe.teacher.checkpoint is not None and not _path_is(recipe.teacher.checkpoint, "is_file", "teacher.checkpoint"):
        raise RecipeError(f"teacher.checkpoint: no such file: {recipe.teacher.checkpoint}")
    if recipe.gates.baseline is not None and not _path_is(recipe.gates.baseline, "exists", "gates.baseline"):
        raise RecipeError(f"gates.baseline: no such file or folder: {recipe.gates.baseline}")
    if recipe.gates.baseline is not None and "bench" not in [s.kind for s in recipe.stages]:
        raise RecipeError("gates.baseline: gates compare the run's bench result; add a bench stage")


def _path_is(value: str, test: str, field: str) -> bool:
    try:
        return getattr(Path(value), test)()
    except OSError as exc:  # e.g. a name too long; a missing file is just False
        raise RecipeError(f"{field}: cannot use this path ({exc.strerror or exc}): {value[:200]!r}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RecipeError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device: {name!r} asked for, but this torch build sees no CUDA device")
    return device


def check_layer_names(recipe: C.Recipe) -> None:
    """Layers named by feature losses (fitnet, at) must exist in the networks they refer to."""
    from compress.models import module_names

    arch = {"teacher": recipe.teacher.model}
    student = recipe.student.model
    for index, stage in enumerate(recipe.stages):
        if stage.kind not in C.TEACHING_STAGES:
            continue
        if stage.kind == "distill":
            student = (stage.config.student or recipe.student).model
        arch[stage.name] = student
        for term_index, term in enumerate(stage.config.loss or ()):
            for pair_index, pair in enumerate(getattr(term.params, "pairs", ())):
                where = f"stages[{index}].{stage.name}.loss[{term_index}].pairs[{pair_index}]"
                for side, model in (("teacher", arch.get(stage.config.teacher)), ("student", student)):
                    layer = getattr(pair, side)
                    names = module_names(model)
                    if layer not in names:
                        raise RecipeError(f"{where}.{side}: no layer {layer!r} in {model}{_did_you_mean(layer, names)}")


# ----------------------------------------------------------------------------- stages


def _build_stages(raw: Any) -> tuple[C.StageSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RecipeError(f"stages: expected a list of stage names or {{name: settings}} mappings, got {_kind(raw)}")
    return tuple(_build_stage(item, index) for index, item in enumerate(raw))


def _stage_name_and_settings(item: Any, index: int) -> tuple[str, Any]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and len(item) == 1:
        name, settings = next(iter(item.items()))
        return str(name), {} if settings is None else settings
    raise RecipeError(f"stages[{index}]: expected a stage name or a one-key mapping {{name: settings}}, got {_kind(item)}")


def _build_stage(item: Any, index: int) -> C.StageSpec:
    kind, settings = _stage_name_and_settings(item, index)
    if kind not in C.STAGE_CONFIGS:
        raise RecipeError(f"stages[{index}]: unknown stage {kind!r}{_did_you_mean(kind, C.STAGE_CONFIGS)}; known: {', '.join(C.STAGE_CONFIGS)}")
    name = kind
    if isinstance(settings, dict) and "name" in settings:
        settings = dict(settings)
        name = settings.pop("name")
        if not isinstance(name, str) or not _STAGE_NAME.fullmatch(name):
            raise RecipeError(f"stages[{index}].{kind}.name: expected letters, digits, '_' or '-' (a folder in the run folder, max 100 chars), got {name!r}")
    where = f"stages[{index}].{name}"
    return C.StageSpec(name, _build(C.STAGE_CONFIGS[kind], settings, where), kind)


# ----------------------------------------------------------------------------- dataclasses


_TEACHING_CONFIGS = tuple(C.STAGE_CONFIGS[kind] for kind in C.TEACHING_STAGES)


def section_from_dict(cls: type, raw: Any, path: str) -> Any:
    """One recipe section (e.g. ``DataConfig`` from a stage record's resolved recipe), checked
    like a whole recipe: unknown keys and wrong types are a RecipeError naming ``path``."""
    return _build(cls, raw, path)


def _build(cls: type, raw: Any, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {_kind(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = _join(path, _show_key(key))
        if key not in names:
            raise RecipeError(f"{where}: unknown field{_did_you_mean(str(key), names)}; expected one of: {', '.join(names)}")
        is_loss = key == "loss" and cls in _TEACHING_CONFIGS and not (value is None and cls is not C.DistillConfig)
        kwargs[key] = _losses(value, where) if is_loss else _convert(hints[key], value, where)
    try:
        return cls(**kwargs)
    except RecipeError as exc:
        raise RecipeError(_join(path, str(exc))) from None


def _losses(raw: Any, path: str) -> tuple[C.LossConfig, ...]:
    """``loss: kd``, ``loss: {name: kd, ...}`` or a list of such terms."""
    if isinstance(raw, list):
        if not raw:
            raise RecipeError(f"{path}: expected at least one loss term")
        return tuple(_loss(item, f"{path}[{index}]") for index, item in enumerate(raw))
    return (_loss(raw, path),)


def _loss(raw: Any, path: str) -> C.LossConfig:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a loss name or a mapping with 'name' and its parameters, got {_kind(raw)}")
    raw = dict(raw)
    name = raw.pop("name", "kd")
    weight = _convert(float, raw.pop("weight", 1.0), f"{path}.weight")
    if not isinstance(name, str) or name not in LOSSES:
        raise RecipeError(f"{path}.name: {LOSSES.unknown_message(str(name))}")
    try:
        return C.LossConfig(name=name, weight=weight, params=_build(LOSSES.get(name).params, raw, path))
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
            raise RecipeError(f"{path}: expected a list of {_describe(item_hint)}, got {_kind(value)}")
        return tuple(_convert(item_hint, item, f"{path}[{index}]") for index, item in enumerate(value))
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
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}.get(
        hint, "a mapping" if dataclasses.is_dataclass(hint) else str(hint)
    )


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__
    )


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


# ----------------------------------------------------------------------------- overrides


def apply_shorthands(raw: dict, *, data=None, epochs=None, subset=None, device=None, out=None) -> dict:
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
            name, settings = _stage_name_and_settings(item, index) if isinstance(item, (str, dict)) else (None, None)
            if name in C.STAGE_CONFIGS and "train" in {f.name for f in dataclasses.fields(C.STAGE_CONFIGS[name])}:
                items.append((f"stages.{index}.train.epochs", epochs))
    for key, value in items:
        raw = _set(raw, key.split("."), value, key)
    return raw


def apply_override(raw: dict, item: str) -> dict:
    """Apply one ``key.path=value`` override; the value is parsed as YAML (``3``, ``0.1``, ``null``)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected key.path=value, e.g. stages.distill.train.epochs=3")
    try:
        value = yaml.safe_load(text)
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
        copy[index] = {name: _set(dict(settings) if isinstance(settings, dict) else settings, rest, value, item)} if rest else value
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
            raise RecipeError(f"--set {item!r}: the recipe has {len(stages)} stages, no index {key}")
        return int(key)
    names = [_instance_name(item, index) for index, item in enumerate(stages)]
    if key not in names:
        raise RecipeError(f"--set {item!r}: no stage {key!r} in the recipe{_did_you_mean(key, names)}; stages: {', '.join(names)}")
    return names.index(key)


def _instance_name(item: Any, index: int) -> str:
    kind, settings = _stage_name_and_settings(item, index)
    name = settings.get("name") if isinstance(settings, dict) else None
    return name if isinstance(name, str) else kind


def recipe_to_dict(recipe: C.Recipe) -> dict:
    """The resolved recipe as plain data (what gets written next to every artifact)."""
    out = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if f.name == "stages":
            out["stages"] = [{s.kind: ({"name": s.name} if s.name != s.kind else {}) | _plain(s.config)} for s in value]
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
