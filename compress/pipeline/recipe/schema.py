"""The recipe's JSON Schema, generated from the config dataclasses, so that editors complete and
check a recipe while it is written (``compress schema``; ``recipe.schema.json`` in the
repository, which a test keeps equal to this output).

Everything comes from where it is declared once: the fields, their types and defaults; the values
of a choice field (:func:`compress.core.fields.choice`, registries included); the loss terms and
their parameters (:data:`compress.training.loss_params.LOSSES`); the stage kinds; and each field's
description,
the comment written beside it in its spec module (:func:`field_docs`). Ranges and
cross-field rules stay in the dataclasses' checks, which ``compress validate`` runs.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from functools import cache
from typing import Any

from compress.core.fields import choices_of, default_of
from compress.pipeline.config import STAGE_KINDS, DistillConfig, Recipe
from compress.training.loss_params import LOSSES

SCHEMA_URL = "https://json-schema.org/draft/2020-12/schema"
# YAML 1.1 reads 5e-4 (no dot) as a string; the recipe reader takes it as the number it means
_FLOAT_STRING = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"


def recipe_schema() -> dict:
    """The JSON Schema (draft 2020-12) every valid recipe satisfies."""
    schema = _object(Recipe, required=("name",))
    schema["properties"]["stages"] = {
        "description": "The stages to run, in order: a stage kind, or {kind: settings}.",
        "type": "array",
        "items": {"anyOf": [{"enum": list(STAGE_KINDS)}, _stage_entries()]},
    }
    return {
        "$schema": SCHEMA_URL,
        "title": "compress recipe",
        "description": "A compress recipe: data, teacher, student, gates and the stages to run.",
    } | schema


def _stage_entries() -> dict:
    """``{kind: settings}`` with one key; settings may be empty (null) and may rename the stage."""
    entries = {}
    for kind in STAGE_KINDS.values():
        settings = _object(kind.config)
        settings["properties"]["name"] = {
            "description": "The stage's folder and the name later stages refer to it by "
            "(default: its kind).",
            "type": "string",
            "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$",
        }
        entries[kind.name] = {"anyOf": [{"type": "null"}, settings]}
    return {
        "type": "object",
        "properties": entries,
        "additionalProperties": False,
        "minProperties": 1,
        "maxProperties": 1,
    }


def _object(cls: type, required: tuple[str, ...] = ()) -> dict:
    """A config dataclass as a closed object: its fields, described, with their defaults."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    teaches = any(kind.teaches and kind.config is cls for kind in STAGE_KINDS.values())
    properties = {}
    for f in dataclasses.fields(cls):
        if teaches and f.name == "loss":
            prop = _losses(optional=cls is not DistillConfig)
        elif choices := choices_of(f):
            prop = _choice(hints[f.name], list(choices))
        else:
            prop = _type(hints[f.name])
        default = _default(f)
        if default is not dataclasses.MISSING:
            prop["default"] = default
        if f.name in docs:
            prop = {"description": docs[f.name]} | prop
        properties[f.name] = prop
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    lead = summary(cls)
    if lead:
        schema = {"description": lead} | schema
    if required:
        schema["required"] = list(required)
    return schema


def _type(hint: Any) -> dict:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_type(option) for option in typing.get_args(hint)]
        return {"anyOf": options}
    if dataclasses.is_dataclass(hint):
        return _object(hint)
    if origin is tuple:
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:
            return {"type": "array", "items": _type(items[0])}
        return {
            "type": "array",
            "prefixItems": [_type(item) for item in items],
            "items": False,
            "minItems": len(items),
        }
    if hint is type(None):
        return {"type": "null"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"anyOf": [{"type": "number"}, {"type": "string", "pattern": _FLOAT_STRING}]}
    if hint is str:
        return {"type": "string"}
    return {}


def _choice(hint: Any, choices: list) -> dict:
    """A choice field: its enum (per item for a list), null where the type allows it."""
    enum = {"enum": choices}
    if typing.get_origin(hint) is tuple:
        return {"type": "array", "items": enum}
    if type(None) in typing.get_args(hint):
        return {"anyOf": [{"type": "null"}, enum]}
    return enum


def _losses(optional: bool) -> dict:
    """``loss: kd``, ``loss: {name: kd, ...}`` or a list of such terms (null: the stage's
    default where ``optional``)."""
    term = {"anyOf": [{"enum": LOSSES.names()}, *map(_loss_term, LOSSES.names())]}
    forms = [term, {"type": "array", "items": term, "minItems": 1}]
    if optional:
        forms.insert(0, {"type": "null"})
    return {"anyOf": forms}


def _loss_term(name: str) -> dict:
    params = _object(LOSSES.get(name).params)
    params["properties"] = {
        "name": {"const": name},
        "weight": {
            "description": "The term's weight in the sum.",
            "type": "number",
            "minimum": 0,
            "default": 1.0,
        },
    } | params["properties"]
    params["required"] = ["name"]
    params["description"] = f"The {name} loss term. " + params.get("description", "")
    return params


def _default(f: dataclasses.Field) -> Any:
    value = default_of(f)
    if value is dataclasses.MISSING:
        return value
    if dataclasses.is_dataclass(value) or (
        isinstance(value, tuple) and any(dataclasses.is_dataclass(v) for v in value)
    ):
        return dataclasses.MISSING  # described by the nested object's own defaults
    return list(value) if isinstance(value, tuple) else value


def summary(cls: type) -> str:
    """The first paragraph of a class's own docstring, on one line."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):
        return ""  # the signature dataclasses write when a class has no docstring
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's description: the comment on its line, or the comment lines right above it,
    in the class that declares it (base classes first, so a subclass's comment wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and klass.__module__.startswith("compress."):
            docs |= _own_field_docs(klass)
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    docs = {}
    body = ast.parse(source).body[0]
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        inline = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n >= 1 and n in comments and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        text = " ".join(above + inline).strip()
        if text:
            docs[node.target.id] = text
    return docs
