"""Every ``"module:function"`` string in the package (the stage, loss, criterion, dataset,
format and backend tables load their code by name, on use) names a module that exists and
defines that name at its top level: a renamed function or a moved module fails here, not when a
user first reaches that entry."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "compress"
ENTRY = re.compile(r"^(compress(?:\.\w+)+):(\w+)$")


def entry_strings() -> list[tuple[str, str, str]]:
    """``(where, module, name)`` for every string constant of the package shaped like an entry."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                match = ENTRY.match(node.value)
                if match:
                    where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                    found.append((where, match.group(1), match.group(2)))
    return found


def top_level_names(module: str) -> set[str]:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"no module {module}"
    tree = ast.parse(Path(spec.origin).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


ENTRIES = entry_strings()


def test_the_tables_hold_entries():
    assert len(ENTRIES) >= 25  # stages, losses, criteria, datasets, formats, backends


@pytest.mark.parametrize(("where", "module", "name"), ENTRIES, ids=[e[0] for e in ENTRIES])
def test_each_entry_resolves(where, module, name):
    assert name in top_level_names(module), f"{where}: {module} defines no {name}"
