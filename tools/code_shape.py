#!/usr/bin/env python3
"""The package's shape at a git revision: its largest classes, modules, import cycles,
cross-module private imports and string-tagged pipe messages.

Everything is read with ``ast`` from ``git show REV:path`` (nothing is imported or run),
so any two revisions can be compared from one checkout::

    python tools/code_shape.py              # HEAD
    python tools/code_shape.py 436af2f      # an older revision
    python tools/code_shape.py --json HEAD

The analysis functions (``module_name``, ``package_imports``, ``import_graph``,
``cycles``, ``private_imports``, ``foreign_imports``, ``class_shapes``) work on a
``{path: source}`` mapping; ``tests/test_architecture.py`` runs them over the working tree.

What is counted:

- an import is every ``import`` / ``from ... import`` anywhere in a module, function-level
  and ``TYPE_CHECKING`` ones included; ``from . import x`` is an import of the module
  ``x`` when ``x`` is one, else of the package;
- a cycle is a strongly connected set of modules in that graph (an import of a module's
  own parent package counts: the parent may be half-initialised then);
- a private import is ``from .x import _y`` (or ``from . import _y`` of a package-level
  name) across modules: importing a private *module* (``_mp``, ``_shm``) or its public
  names is not;
- a class's lines run from ``class`` to its last line; its methods are the functions in
  its body; its attributes are the names it assigns at class level and as ``self.NAME``
  in its methods;
- a string-tagged pipe message is a ``.send(("tag", ...))`` call in the source text.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

PACKAGE = "mpmultifd"
# packages that must never be imported by the runtime package (test and tool side only)
FOREIGN = ("fuzz", "tests", "tools")
SEND_TAGGED = re.compile(r"""\.send\(\(\s*["']""")
CONN_SEND_TAGGED = re.compile(r"""\bconn\.send\(\(\s*["']""")

__all__ = [
    "ClassShape",
    "Import",
    "class_shapes",
    "cycles",
    "foreign_imports",
    "import_graph",
    "module_name",
    "package_imports",
    "private_attribute_uses",
    "private_imports",
    "shape",
    "sources_at",
    "sources_in",
    "strongly_connected",
]


@dataclass(frozen=True)
class Import:
    """One imported name: ``module`` (the importer) at ``line`` imports ``name`` from ``target``
    (``name`` is None for ``import target``); ``is_module``: ``target`` is itself the imported module."""

    module: str
    line: int
    target: str
    name: str | None
    is_module: bool
    alias: str = ""  # the local name it binds

    def __str__(self) -> str:
        what = self.target if self.name is None else f"from {self.target} import {self.name}"
        return f"{self.module}:{self.line}: {what}"


@dataclass(frozen=True)
class ClassShape:
    module: str
    name: str
    lines: int
    methods: int
    attributes: int


# ---------------------------------------------------------------------------- reading


def sources_in(root: str, package: str = PACKAGE) -> dict[str, str]:
    """``{relative path: source}`` of every ``.py`` file under ``root/package``."""
    out: dict[str, str] = {}
    base = os.path.join(root, package)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    out[os.path.relpath(path, root).replace(os.sep, "/")] = fh.read()
    return out


def sources_at(rev: str, package: str = PACKAGE, repo: str = ".") -> dict[str, str]:
    """``{path: source}`` of every ``.py`` file under ``package/`` at git revision ``rev``."""
    names = subprocess.run(
        ["git", "-C", repo, "ls-tree", "-r", "--name-only", rev, "--", f"{package}/"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    out = {}
    for path in names:
        if path.endswith(".py"):
            out[path] = subprocess.run(
                ["git", "-C", repo, "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
            ).stdout
    return out


def module_name(path: str) -> str:
    """``mpmultifd/methods/compress.py`` -> ``mpmultifd.methods.compress``; ``__init__.py`` names its package."""
    parts = path[:-3].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _parse(sources: Mapping[str, str]) -> dict[str, tuple[ast.Module, bool]]:
    """``{module name: (tree, is a package)}``."""
    return {module_name(p): (ast.parse(src, filename=p), p.endswith("__init__.py")) for p, src in sources.items()}


# ---------------------------------------------------------------------------- imports


def package_imports(sources: Mapping[str, str]) -> list[Import]:
    """Every import in every module (anywhere in the module), with relative imports resolved."""
    parsed = _parse(sources)
    known = set(parsed)
    out: list[Import] = []
    for mod, (tree, is_pkg) in sorted(parsed.items()):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    out.append(Import(mod, node.lineno, alias.name, None, True, bound))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    bound = alias.asname or alias.name
                    if sub in known:
                        out.append(Import(mod, node.lineno, sub, None, True, bound))
                    else:
                        out.append(Import(mod, node.lineno, base, alias.name, base in known, bound))
    return out


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def import_graph(imports: Iterable[Import], package: str = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` (every module of ``imports`` is a key)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.module, set())
        if _inside(imp.target, package) and imp.target != imp.module:
            graph[imp.module].add(imp.target)
    return graph


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (each sorted; the list sorted).
    Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = 0
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    succ = {n: sorted(graph.get(n, ())) for n in nodes}
    for root in nodes:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            recurse = False
            for j in range(i, len(succ[node])):
                nxt = succ[node][j]
                if nxt not in index:
                    work.append((node, j + 1))
                    work.append((nxt, 0))
                    recurse = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if recurse:
                continue
            if low[node] == index[node]:
                scc = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    scc.append(w)
                    if w == node:
                        break
                if len(scc) > 1:
                    sccs.append(sorted(scc))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return sorted(sccs)


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The import cycles: for each strongly connected set, one shortest cycle through its first
    module (``[a, b, a]``)."""
    succ = {n: sorted(ts) for n, ts in graph.items()}
    return [_one_cycle(scc, succ) for scc in strongly_connected(graph)]


def _one_cycle(scc: list[str], succ: Mapping[str, list[str]]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected set (breadth first)."""
    members = set(scc)
    start = scc[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in succ.get(node, ()):
                if nxt not in members:
                    continue
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt not in prev:
                    prev[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return scc  # not reached for a strongly connected set


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(imports: Iterable[Import], package: str = PACKAGE) -> list[Import]:
    """Imports of another module's underscore name from inside the package. Importing a private
    module itself (``from . import _mp``, ``import mpmultifd._shm``) or a public name of one is allowed."""
    return [
        imp for imp in imports
        if imp.name is not None and _private(imp.name) and _inside(imp.target, package) and imp.target != imp.module
    ]


def private_attribute_uses(sources: Mapping[str, str], package: str = PACKAGE) -> list[str]:
    """``module:line: alias._name`` for each underscore attribute read through another package
    module bound by an import (``from . import worker`` ... ``worker._report``); private modules
    reached as attributes (``mpmultifd._shm``) are allowed."""
    imports = package_imports(sources)
    known = {module_name(p) for p in sources}
    out = []
    for mod, (tree, _) in _parse(sources).items():
        bound = {}
        for imp in imports:
            if imp.module == mod and imp.name is None and _inside(imp.target, package) and imp.target != mod:
                bound[imp.alias] = imp.target if imp.alias == imp.target.rsplit(".", 1)[-1] or "." not in imp.target \
                    else imp.target.split(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
                target = bound[node.value.id]
                if _private(node.attr) and f"{target}.{node.attr}" not in known:
                    out.append(f"{mod}:{node.lineno}: {node.value.id}.{node.attr}")
    return sorted(out)


def foreign_imports(imports: Iterable[Import], foreign: Iterable[str] = FOREIGN) -> list[Import]:
    """Imports of the test and tool side (the fuzz harnesses, tests, tools) from inside the package."""
    foreign = tuple(foreign)
    return [imp for imp in imports if any(_inside(imp.target, f) for f in foreign)]


# ---------------------------------------------------------------------------- classes


def class_shapes(sources: Mapping[str, str]) -> list[ClassShape]:
    """Every class (nested ones too), largest first."""
    out = []
    for mod, (tree, _) in _parse(sources).items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            attrs: set[str] = set()
            for stmt in node.body:
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(
                    stmt, ast.AnnAssign) else []
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            attrs.add(n.id)
            for fn in methods:
                if not fn.args.args:
                    continue
                me = fn.args.args[0].arg
                for n in ast.walk(fn):
                    if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and isinstance(
                            n.value, ast.Name) and n.value.id == me:
                        attrs.add(n.attr)
            assert node.end_lineno is not None
            out.append(ClassShape(mod, node.name, node.end_lineno - node.lineno + 1, len(methods), len(attrs)))
    return sorted(out, key=lambda c: (-c.lines, c.module, c.name))


# ---------------------------------------------------------------------------- report


def shape(sources: Mapping[str, str], top: int = 10, package: str = PACKAGE) -> dict:
    imports = package_imports(sources)
    graph = import_graph(imports, package)
    found = cycles(graph)
    private = private_imports(imports, package)
    text = "\n".join(sources.values())
    return {
        "modules": len(sources),
        "lines": sum(src.count("\n") for src in sources.values()),
        "largest_classes": [asdict(c) for c in class_shapes(sources)[:top]],
        "import_edges": sum(len(v) for v in graph.values()),
        "import_cycles": len(found),
        "cycles": [" -> ".join(c) for c in found],
        "private_imports": len(private),
        "private_import_list": [str(i) for i in private],
        "private_attribute_uses": private_attribute_uses(sources, package),
        "foreign_imports": [str(i) for i in foreign_imports(imports)],
        "tagged_sends": len(SEND_TAGGED.findall(text)),
        "conn_send_tagged": len(CONN_SEND_TAGGED.findall(text)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", nargs="?", default="HEAD", help="git revision (default HEAD)")
    ap.add_argument("--top", type=int, default=10, help="how many of the largest classes (default 10)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short", args.rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    got = shape(sources_at(rev, repo=repo), args.top)
    got["rev"] = rev
    if args.json:
        print(json.dumps(got, indent=2))
        return 0
    print(f"# {PACKAGE} at {rev}: {got['modules']} modules, {got['lines']} lines, "
          f"{got['import_edges']} import edges between them")
    print(f"\n{'class':<40} {'lines':>6} {'methods':>8} {'attributes':>11}")
    for c in got["largest_classes"]:
        name = f"{c['module'].removeprefix(PACKAGE + '.')}.{c['name']}"
        print(f"{name:<40} {c['lines']:>6} {c['methods']:>8} {c['attributes']:>11}")
    print()
    for title, items in (
        ("import cycles", got["cycles"]),
        ("cross-module private imports", got["private_import_list"]),
        ("private attributes read through an imported package module", got["private_attribute_uses"]),
        ("imports of fuzz/tests/tools", got["foreign_imports"]),
    ):
        print(f"{title}: {len(items)}")
        for item in items:
            print(f"  {item}")
    print(f"string-tagged pipe messages (.send((\"tag\", ...)): {got['tagged_sends']} "
          f"(conn.send((\"...: {got['conn_send_tagged']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
