"""The package's structure: no import circles, comments without history."""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "convgru_triton")


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
    """Comments say what the code does and why, never its history (project
    issue numbers, commit ids, a path named by the day it was current)."""
    offenders = []
    for module, path in _modules().items():
        for number, line in enumerate(open(path), 1):
            if HISTORY.search(line):
                offenders.append(f"{os.path.relpath(path, PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# Outside the package: the tests, the benchmarks (bench/results/ holds measurement
# records, not code), the example and CI's scripts.
TOOL_FOLDERS = ("tests", "bench", "examples", ".ci")
SKIPPED_FOLDERS = {os.path.join("bench", "results"), "__pycache__"}


def _tool_files():
    """Every Python and shell file of TOOL_FOLDERS, relative to the repository root."""
    found = []
    for top in TOOL_FOLDERS:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            rel = os.path.relpath(folder, ROOT)
            dirs[:] = sorted(d for d in dirs if os.path.join(rel, d) not in SKIPPED_FOLDERS and d not in SKIPPED_FOLDERS)
            for name in sorted(files):
                path = os.path.join(folder, name)
                if name.endswith((".py", ".sh")) or open(path, "rb").read(64).startswith(b"#!/usr/bin/env bash"):
                    found.append(os.path.relpath(path, ROOT))
    return found


def _pattern_lines(tree: ast.Module) -> set:
    """The lines of this file's own pattern definition (the ``HISTORY = ...`` statement),
    which necessarily spell out what it looks for."""
    return {n for node in tree.body if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "HISTORY" for t in node.targets)
            for n in range(node.lineno, node.end_lineno + 1)}


def _python_comments_and_docstrings(source: str):
    """``(line, text)`` of every comment and every docstring line of a Python file:
    string literals elsewhere are data (expected output, test input) and are not read."""
    tree = ast.parse(source)
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                for number in range(first.lineno, first.end_lineno + 1):
                    yield number, lines[number - 1]


def _shell_comments(source: str):
    """``(line, text)`` of every comment of a shell script: from a ``#`` that starts
    the line or follows a blank (``$#``, ``${#x}`` and ``a#b`` are not comments)."""
    for number, line in enumerate(source.splitlines(), 1):
        match = re.search(r"(?:^|\s)(#.*)$", line)
        if match:
            yield number, match.group(1)


def test_tools_comments_and_docstrings_tell_no_history():
    """The same rule for the tests, the benchmarks, the example and CI's scripts:
    their comments and docstrings (Python) and comments (shell) name no project
    issue, no commit and no day-named path. Other strings are data and keep what
    they must match; this file's own pattern definition is left out."""
    offenders = []
    for rel in _tool_files():
        source = open(os.path.join(ROOT, rel)).read()
        if rel.endswith(".py"):
            skip = _pattern_lines(ast.parse(source)) if rel == os.path.join("tests", "test_architecture.py") else set()
            texts = [(n, t) for n, t in _python_comments_and_docstrings(source) if n not in skip]
        else:
            texts = list(_shell_comments(source))
        offenders += [f"{rel}:{n}: {t.strip()}" for n, t in sorted(set(texts)) if HISTORY.search(t)]
    assert not offenders, "\n".join(offenders)


def test_tools_history_check_reads_comments_and_docstrings_only():
    """What the check reads: comments and docstrings, not other strings; the shell
    reading takes ``#`` comments and leaves ``$#`` alone."""
    source = ('"""Module doc, issue 7."""\n'
              "x = 'data: issue 8'  # comment: issue 9\n"
              "def f():\n    '''Function doc, commit 0123abc4.'''\n    return 'commit 0123abc5'\n")
    found = [t for _, t in _python_comments_and_docstrings(source) if HISTORY.search(t)]
    assert sorted(found) == sorted(['"""Module doc, issue 7."""', "# comment: issue 9",
                                    "    '''Function doc, commit 0123abc4.'''"])
    shell = "echo ${#a[@]} $# # at 0123abc4\n  # issue 3\nurl=a#b\n"
    assert [t for _, t in _shell_comments(shell)] == ["# at 0123abc4", "# issue 3"]
    assert {os.path.join("bench", "gpu_check.sh"), os.path.join(".ci", "run"),
            os.path.join("tests", "test_architecture.py")} <= set(_tool_files())
    assert not any(rel.startswith(os.path.join("bench", "results")) for rel in _tool_files())
