"""The package's structure: no import circles, comments without history."""

from __future__ import annotations

import ast
import os
import re

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "convgru_triton")


def _modules():
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return found


def _imports(module: str, path: str, modules) -> set:
    """Every package module ``module`` imports, at its top or inside a function."""
    targets = set()
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            subs = {f"{target}.{a.name}" for a in node.names} & set(modules)
            targets |= subs or ({target} & set(modules))
        elif isinstance(node, ast.Import):
            targets |= {a.name for a in node.names} & set(modules)
    targets.discard(module)
    return targets


def test_no_import_circles():
    """No module imports, directly or through others, a module that imports it
    (function-level imports count: they are how circles hide)."""
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                assert nxt != start, "import circle: " + " -> ".join(path + [nxt])
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))


HISTORY = re.compile(r"\bissue\s*#?\d+|\bissues?'s\b|\btoday's\b|\bcommit\s+[0-9a-f]{7,}|\bat\s+[0-9a-f]{7,40}\b",
                     re.IGNORECASE)


def test_comments_and_docstrings_tell_no_history():
    """Comments say what the code does and why, never its history (issue
    numbers, commit ids, "today's path")."""
    offenders = []
    for module, path in _modules().items():
        for number, line in enumerate(open(path), 1):
            if HISTORY.search(line):
                offenders.append(f"{os.path.relpath(path, PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
