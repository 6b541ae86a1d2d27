"""The field conventions every spec dataclass shares: range checks that raise a one-line
:class:`~compress.errors.RecipeError`, choice fields declared once (checked here, published in the
recipe's JSON Schema) and options added after runs were recorded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from compress.errors import RecipeError

# Field metadata of an option added after runs were recorded, whose default changes nothing: the
# recipe's serialisation leaves it out while it is at its default, so finished stages keep their
# input keys (compress.pipeline.recipe.serialise).
ADDED_LATER = "added_later"


# Field metadata: the values a field may take (a tuple, a dict's keys, or a function returning
# them, called on use so that registries load lazily): checked by _check_choices, published as
# the field's enum in the recipe's JSON Schema (compress.pipeline.recipe.schema).
CHOICES = "choices"


def choice(default: Any, options: Any, **metadata: Any) -> Any:
    """A field whose value (each value, for a tuple) is one of ``options``."""
    return field(default=default, metadata={CHOICES: options, **metadata})


def choices_of(f: dataclasses.Field) -> tuple | None:
    """The values field ``f`` may take, or None when it is not a choice."""
    options = f.metadata.get(CHOICES)
    if options is None:
        return None
    return tuple(options() if callable(options) else options)


def default_of(f: dataclasses.Field) -> Any:
    """Field ``f``'s default value (a fresh one from its factory); ``dataclasses.MISSING`` when
    the field is required."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (a non-UTF-8 byte of argv arrives as a lone
    surrogate, which does not: printing it later raises)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` with each byte that is not UTF-8 written as ``\\xff``, safe to print."""
    try:  # argv's lone surrogates back to the bytes the user typed
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return raw.decode("utf-8", "backslashreplace")


def check(condition: bool, message: str) -> None:
    if not condition:
        raise RecipeError(message)


def check_count(value: int, name: str, low: int, high: int, why: str) -> None:
    """A count a recipe or flag sets is within ``low..high``; ``why`` says what the upper bound
    protects (a count of 10^4 processes validated and would have run for hours)."""
    check(
        low <= value <= high,
        f"{name}: expected {low}..{high:,} ({why}), got {value}",
    )


def check_choices(config: Any) -> None:
    """Every choice field of ``config`` holds one of its values (None passes: "not set")."""
    for f in dataclasses.fields(config):
        options = choices_of(f)
        value = getattr(config, f.name)
        if options is None or value is None:
            continue
        if isinstance(value, tuple):
            unknown = [item for item in value if item not in options]
            check(
                not unknown,
                f"{f.name}: unknown {', '.join(map(repr, unknown))}; expected some of "
                f"{', '.join(map(str, options))}",
            )
        else:
            check(
                value in options,
                f"{f.name}: expected one of {', '.join(map(str, options))}, got {value!r}",
            )
