"""Reading a recipe: YAML (``safe_load`` only, size-limited) plus command-line overrides, to a
validated :class:`~compress.pipeline.config.Recipe`; and the device a run asks for."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from compress.core.fileio import UnreadableFile, read_text_bounded
from compress.errors import RecipeError
from compress.pipeline.config import Recipe
from compress.pipeline.recipe.checks import _check_recipe, check_references
from compress.pipeline.recipe.convert import _build, _build_stages, _kind
from compress.pipeline.recipe.defaults import resolve_latency_targets
from compress.pipeline.recipe.overrides import apply_override, apply_shorthands
from compress.pipeline.recipe.yamlio import YamlProblem, load_yaml

# a recipe is a page of YAML; a value can be long (a pasted list), but 16 MiB is not a recipe
MAX_RECIPE_BYTES = 16 << 20


def load_recipe(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    data: str | None = None,
    epochs: int | None = None,
    subset: tuple[int | None, int | None] | None = None,
    device: str | None = None,
    out: str | None = None,
) -> Recipe:
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
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = load_yaml(read_text_bounded(path, max_bytes=MAX_RECIPE_BYTES))
    except UnreadableFile as exc:
        raise RecipeError(f"{path}: not a recipe file ({exc})") from None
    except YamlProblem as exc:
        raise RecipeError(f"{path}: {exc}") from None
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
        raise RecipeError(
            f"{path}: expected a mapping of recipe fields at the top level, got {_kind(raw)}"
        )
    return raw


def _yaml_limit(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    return f"a value cannot be read ({str(exc).split(';')[0]})"


def recipe_from_dict(raw: Any, source: str = "recipe") -> Recipe:
    """Validate a plain mapping (as read from YAML) into a :class:`Recipe`."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected a mapping at the top level, got {_kind(raw)}")
    raw = dict(raw)
    stages_raw = raw.pop("stages", None)
    if "name" not in raw:
        raise RecipeError(
            f"{source}: name: missing; every recipe names its run (used as the output folder)"
        )
    recipe = _build(Recipe, raw, "")
    stages = resolve_latency_targets(_build_stages(stages_raw))
    recipe = dataclasses.replace(recipe, stages=stages)
    _check_recipe(recipe)
    return recipe
