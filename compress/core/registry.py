"""Named registries at the extension points (KD losses, models, export formats, bench backends),
and :func:`load_entry` for the tables that name their functions as ``"module:function"`` so that
reading the table imports nothing heavy (stages, dataset readers, pruning criteria)."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from compress.errors import CompressError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table whose lookup error lists what exists.

    Example:
        >>> LOSSES = Registry("loss")
        >>> @LOSSES.register("kd")
        ... def kd(...): ...
        >>> LOSSES.get("kd")
    """

    def __init__(self, kind: str, error: type[CompressError] = CompressError):
        self.kind = kind
        self._error = error
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise self._error(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        names = self.names()
        known = (
            ", ".join(names)
            if len(names) <= 12
            else f"{len(names)} names, listed by `compress list`"
        )
        return f"unknown {self.kind} {name!r}{hint}; known: {known}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def load_entry(entry: str) -> Callable:
    """The object ``"package.module:name"`` names, its module imported on first use."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)
