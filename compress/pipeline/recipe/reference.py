"""The recipe reference page (``docs/recipe-reference.md``), generated from the specs the way the
JSON Schema is (:mod:`compress.pipeline.recipe.schema`): one table per section with each field's
type, default, choices and the comment beside it, so the page cannot drift from the code
(``compress schema --markdown`` prints it; a test keeps the file current)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from compress.core.fields import choices_of, default_of
from compress.data.spec import DataConfig, MixConfig, SubsetConfig, UnlabeledConfig
from compress.pipeline.config import STAGE_KINDS, GatesConfig, Recipe, StudentConfig, TeacherConfig
from compress.pipeline.recipe.schema import field_docs, summary
from compress.pruning.spec import LatencyTarget
from compress.training.loss_params import LOSSES
from compress.training.spec import LossConfig, TrainConfig

INTRO = """# Recipe reference

Every field a recipe can set, generated from the specs (`compress schema --markdown`); the
guide to what they do together is [Writing recipes](recipes.md). A recipe is YAML: the top-level
fields, then `stages`, a list of stage kinds or `{kind: settings}` mappings run in order. Unknown
fields are an error naming the closest known one; `compress validate` checks a recipe and the
files it names without running anything, and editors check it against `recipe.schema.json`.
"""


def recipe_reference() -> str:
    """The whole page, in Markdown."""
    sections = [
        ("Top level", Recipe),
        ("data", DataConfig),
        ("data.subset", SubsetConfig),
        ("data.unlabeled", UnlabeledConfig),
        ("teacher", TeacherConfig),
        ("student", StudentConfig),
        ("train (in teacher and every training stage)", TrainConfig),
        ("augment (in every training stage)", MixConfig),
        ("gates", GatesConfig),
    ]
    for kind in STAGE_KINDS.values():
        if dataclasses.fields(kind.config):
            sections.append((f"stages: {kind.name}", kind.config))
    sections.append(("prune.target (a measured latency)", LatencyTarget))
    parts = [INTRO]
    for title, cls in sections:
        parts.append(_section(title, cls))
    parts.append(_losses())
    return "\n".join(parts)


_LINKS = {
    TrainConfig: "[train](#train-in-teacher-and-every-training-stage)",
    MixConfig: "[augment](#augment-in-every-training-stage)",
    SubsetConfig: "[data.subset](#datasubset)",
    UnlabeledConfig: "[data.unlabeled](#dataunlabeled)",
    LatencyTarget: "[prune.target](#prunetarget-a-measured-latency)",
    StudentConfig: "[student](#student)",
}


def _section(title: str, cls: type) -> str:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows = ["| field | type | default | what it is |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name == "stages":
            continue
        kind = _type_name(hints[f.name])
        choices = choices_of(f)
        text = docs.get(f.name, "")
        if choices:
            text = f"one of {', '.join(f'`{c}`' for c in choices)}" + (f"; {text}" if text else "")
        if f.name == "loss":
            kind = "loss terms"
            text = (text + "; " if text else "") + "see [loss terms](#loss-terms)"
        rows.append(f"| `{f.name}` | {kind} | {_default(f)} | {_cell(_markdown(text))} |")
    lead = _markdown(summary(cls))
    return f"## {title}\n\n" + (f"{lead}\n\n" if lead else "") + "\n".join(rows) + "\n"


def _losses() -> str:
    """Each loss term's parameters (``loss: [{name: kd, temperature: 4}, ...]``)."""
    lines = [
        "## Loss terms",
        "",
        "`loss:` takes a term name (`loss: kd`), one term with its parameters "
        "(`loss: {name: kd, temperature: 4}`) or a list of terms, summed with their `weight` "
        f"(default {LossConfig().weight:g}). `compress list losses` lists them.",
        "",
    ]
    for name in LOSSES.names():
        params = LOSSES.get(name).params
        lines.append(f"### {name}\n")
        lead = _markdown(summary(params))
        if lead:
            lines.append(f"{lead}\n")
        fields = dataclasses.fields(params)
        if fields:
            hints = typing.get_type_hints(params)
            lines += ["| parameter | type | default |", "|---|---|---|"]
            lines += [
                f"| `{f.name}` | {_type_name(hints[f.name])} | {_default(f)} |" for f in fields
            ]
            lines.append("")
    return "\n".join(lines)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if origin is tuple:
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:
            return f"list of {_type_name(items[0])}"
        return f"list of {len(items)} {_type_name(items[0])}"
    if dataclasses.is_dataclass(hint):
        return _LINKS.get(hint, "mapping")
    return {type(None): "null", bool: "bool", int: "int", float: "number", str: "string"}.get(
        hint, "any"
    )


def _default(f: dataclasses.Field) -> str:
    value = default_of(f)
    if value is dataclasses.MISSING:
        return "required"
    if dataclasses.is_dataclass(value):
        return _section_default(value)
    if isinstance(value, tuple):
        if any(dataclasses.is_dataclass(v) for v in value):
            return ", ".join(getattr(v, "name", "?") for v in value)
        return "`[" + ", ".join(map(str, value)) + "]`"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _section_default(value: Any) -> str:
    """ "see its section", or the fields where this stage's default differs from the section's
    own (QAT trains with AdamW at 3e-5, not the section's SGD at 0.05)."""
    try:
        own = type(value)()
    except TypeError:  # a section with required fields
        return "see its section"
    changed = [
        f"{f.name}: {getattr(value, f.name)}"
        for f in dataclasses.fields(value)
        if getattr(value, f.name) != getattr(own, f.name)
    ]
    return f"`{', '.join(changed)}`, the rest as its section" if changed else "see its section"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown(text: str) -> str:
    """Docstring markup as Markdown: ````x```` -> ```x```, ``:class:`~a.B``` -> ```B```."""
    text = re.sub(r":[a-z]+:`~?(?:[\w.]+\.)?([\w]+)`", r"`\1`", text)
    return text.replace("``", "`")
