"""Static checks of the package's shape: module sizes, import cycles, reaches into private attributes.

    python scripts/architecture.py [--max-lines 800] [--max-private 3]

Prints every module over ``--max-lines`` lines, every import cycle between modules and between
sub-packages (imports inside functions and ``TYPE_CHECKING`` blocks count: they are dependencies too), and
every reach into another object's private state: ``obj._name`` where ``obj`` is not ``self`` / ``cls`` /
``super()``, and ``from hf_atm.x import _name``. Exit status 1 when a limit is broken. ``tests/test_architecture.py``
runs the same checks.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hf_atm"


@dataclass(frozen=True)
class PrivateReach:
    module: str
    line: int
    text: str


def modules(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package (``__init__`` files as the package)."""
    out = {}
    for f in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` (``from pkg import sub`` resolves to the submodule)."""
    known = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, f in known.items():
        is_pkg = f.name == "__init__.py"
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t.split(".")[0] != PACKAGE:
                    continue
                dep = _resolve(t, known)
                if dep and dep != mod:
                    graph[mod].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def subpackage_of(module: str) -> str:
    """``hf_atm.atm.trainer`` -> ``hf_atm.atm``; top-level modules are their own unit."""
    parts = module.split(".")
    return ".".join(parts[:2])


def subpackage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between sub-packages; the package root (``hf_atm/__init__``, which only re-exports
    the public API) is left out, as is every module's import of a leaf the whole package may use."""
    out: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        if mod == PACKAGE:
            continue
        a = subpackage_of(mod)
        out.setdefault(a, set())
        for d in deps:
            b = subpackage_of(d)
            if b != a and d != PACKAGE:
                out[a].add(b)
    return out


def private_reaches(root: Path = ROOT) -> list[PrivateReach]:
    """``x._name`` with ``x`` not self / cls / super(), and ``from hf_atm... import _name``."""
    out = []
    for mod, f in modules(root).items():
        src = f.read_text()
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src, str(f))):
            if isinstance(node, ast.Attribute):
                a = node.attr
                if not a.startswith("_") or (a.startswith("__") and a.endswith("__")):
                    continue
                v = node.value
                if isinstance(v, ast.Name) and v.id in ("self", "cls"):
                    continue
                if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                    continue
                out.append(PrivateReach(mod, node.lineno, lines[node.lineno - 1].strip()))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        out.append(PrivateReach(mod, node.lineno, lines[node.lineno - 1].strip()))
    return out


def oversized(max_lines: int, root: Path = ROOT) -> list[tuple[str, int]]:
    out = []
    for mod, f in modules(root).items():
        n = len(f.read_text().splitlines())
        if n > max_lines:
            out.append((mod, n))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-lines", type=int, default=800)
    p.add_argument("--max-private", type=int, default=3)
    a = p.parse_args(argv)
    bad = False
    big = oversized(a.max_lines)
    print(f"modules over {a.max_lines} lines: {len(big)}")
    for m, n in big:
        print(f"  {m}: {n}")
    graph = import_graph()
    for label, g in (("modules", graph), ("sub-packages", subpackage_graph(graph))):
        cyc = cycles(g)
        print(f"import cycles between {label}: {len(cyc)}")
        for c in cyc:
            print("  " + " <-> ".join(c))
        bad |= bool(cyc)
    reaches = private_reaches()
    print(f"reaches into private attributes: {len(reaches)} (limit {a.max_private})")
    for r in reaches:
        print(f"  {r.module}:{r.line}: {r.text}")
    bad |= bool(big) or len(reaches) > a.max_private
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
