"""YAML without surprises: ``safe_load``'s types (no code-executing tags), with the node graph
checked before any Python object is built.

* Aliases are references in the composed graph; a "billion laughs" document expands them into
  billions of values only when constructed. The expanded size is counted on the graph first
  (cheap: each node once) and a document beyond :data:`MAX_VALUES` values is refused.
* A key written twice in one mapping (``seed:`` twice) is refused, naming both lines; plain
  ``yaml.safe_load`` keeps the last one silently.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_VALUES = 100_000  # values of the fully expanded document; a real recipe has a few hundred


class YamlProblem(ValueError):
    """What is wrong with the document, in words (the caller adds the file name)."""


def load_yaml(text: str) -> Any:
    """The document in ``text`` as plain Python data, like ``yaml.safe_load``.

    Raises:
        yaml.YAMLError: not YAML.
        YamlProblem: more than :data:`MAX_VALUES` values, or aliases that expand beyond it, a
            recursive alias, or a key given twice in one mapping.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_size(root: yaml.Node) -> None:
    """A document too big by itself, told apart from one whose aliases make it big."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > MAX_VALUES:
            raise YamlProblem(
                f"it holds more than {MAX_VALUES:,} values (line {node.start_mark.line + 1}); a "
                "recipe has a few hundred"
            )
        stack.extend(_children(node))


def _check_graph(root: yaml.Node) -> None:
    _check_size(root)
    expanded: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: deep nesting cannot exhaust Python's stack here
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            expanded[key] = 1 + sum(expanded[id(child)] for child in _children(node))
            open_nodes.discard(key)
            if expanded[key] > MAX_VALUES:
                raise YamlProblem(
                    f"its aliases expand to more than {MAX_VALUES:,} values (line "
                    f"{node.start_mark.line + 1}); write the values out"
                )
            continue
        if key in expanded:
            continue
        if key in open_nodes:
            raise YamlProblem(
                f"an alias refers to a value that contains it (line {node.start_mark.line + 1})"
            )
        open_nodes.add(key)
        if isinstance(node, yaml.MappingNode):
            _check_unique_keys(node)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in expanded)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_unique_keys(node: yaml.MappingNode) -> None:
    seen: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        line = key.start_mark.line + 1
        ident = (key.tag, key.value)
        if ident in seen:
            raise YamlProblem(
                f"the key {key.value[:80]!r} is given twice in one mapping (lines {seen[ident]} "
                f"and {line})"
            )
        seen[ident] = line
